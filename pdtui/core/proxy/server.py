"""The proxy served on a socket in the caller's event loop (``ProxyServer``)."""

from __future__ import annotations

import socket

from pdtui.core.proxy import httpio
from pdtui.core.proxy.contract import MAX_BODY_BYTES, Proxy


class ProxyServer:
    """The proxy served in the caller's event loop (tests; ``pdtui proxy``'s own process).

    ``pdtui up`` and the bench never run it in their own loop: they run ``pdtui proxy`` as a
    process (``pdtui.core.proxy.process.ProxyProcess``), so the dashboard's drawing, its garbage
    collections and the bench's client never hold a stream back."""

    def __init__(self, proxy: Proxy, host: str, port: int) -> None:
        self.proxy = proxy
        self.host, self.port = host, port
        self._server: httpio.Server | None = None

    async def start(self) -> None:
        from pdtui.core.supervisor import check_port_free

        check_port_free(self.host, self.port, "proxy")
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(1024)
        sock.setblocking(False)
        self.proxy.start()
        self._server = await httpio.serve(self.proxy.handle, sock, max_body=MAX_BODY_BYTES, on_error=_log_error)

    async def stop(self) -> None:
        await self.proxy.aclose()
        if self._server is not None:
            await self._server.close()
            self._server = None


def _log_error(e: BaseException) -> None:
    import sys
    import traceback

    print("pdtui proxy: internal error:", "".join(traceback.format_exception(e)), file=sys.stderr, flush=True)
