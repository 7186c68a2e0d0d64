"""The client side of the control socket (``pdtui ctl``, ``pdtui attach``), and where the sockets are.

Kept apart from ``pdtui.core.control`` and free of heavy imports (no asyncio servers, no httpx):
``pdtui ctl`` is typed while the engines take every core, and each module imported costs it
CPU time it has to wait for. ``pdtui.core.control`` re-exports all of it.

An address is a Unix socket's path (the owner-only socket every pdtui serves) or a ``(host,
port)`` pair (``pdtui up --listen``, which needs a token: ``request(..., token=...)`` puts it in
the request line).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

from pdtui.core.paths import state_dir

MAX_SOCKET_PATH = 107
"""sun_path holds 108 bytes with the terminating NUL."""


Address: TypeAlias = Path | tuple[str, int]
"""A control socket: a Unix socket's path, or (host, port) on TCP."""


class NotListening(ConnectionError):
    """No pdtui answers on this socket (the message names it)."""


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9000`` for IPv6) -> (host, port); ValueError names what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:8799")
    return host.strip("[]"), int(port)


def describe(address: Address) -> str:
    """An address as people write it: the path, or host:port."""
    if isinstance(address, tuple):
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)


def read_token(path: Path) -> str:
    """The token in ``path`` (its first line, stripped); ValueError when it is empty."""
    token = Path(path).read_text().strip().splitlines()
    if not token or not token[0].strip():
        raise ValueError(f"{path} holds no token")
    return token[0].strip()


def connect(address: Address, timeout_s: float | None = 30.0) -> socket.socket:
    """A connected socket to ``address``. Raises NotListening when nobody listens there, naming it."""
    if isinstance(address, tuple):
        try:
            return socket.create_connection(address, timeout=timeout_s)
        except ConnectionRefusedError:
            raise NotListening(f"nothing listens on {describe(address)} (connection refused)") from None
    path = Path(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise NotListening(f"no pdtui is listening on {path} (no socket there)") from None
    except ConnectionRefusedError:
        sock.close()
        raise NotListening(f"no pdtui is listening on {path} (a stale socket: its pdtui is gone)") from None
    except PermissionError as e:
        sock.close()
        raise PermissionError(f"cannot connect to {path}: {e.strerror} (not your pdtui?)") from None
    except BaseException:
        sock.close()
        raise
    return sock


def socket_dir() -> Path:
    return state_dir() / "ctl"


def default_socket_path(proxy_port: int) -> Path:
    """Where the pdtui whose proxy listens on ``proxy_port`` serves its control socket."""
    return socket_dir() / f"{proxy_port}.sock"


def probe(path: Path, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """Who answers on ``path``: None if nobody listens (no file, or a stale one); else the
    status answer of the pdtui there ({} when something listens but gives no status)."""
    try:
        return request(path, {"verb": "status"}, timeout_s=timeout_s)
    except NotListening:
        return None
    except (OSError, ValueError):
        return {}


def request(address: Address, req: dict[str, Any], *, timeout_s: float | None = 30.0,
            on_progress: Callable[[dict[str, Any]], None] | None = None, token: str | None = None) -> dict[str, Any]:
    """Send one request, return the answer (progress lines go to ``on_progress``). Raises
    NotListening when nobody listens on ``address``, naming it. ``token``: for a TCP listener."""
    sock = connect(address, timeout_s)
    where = describe(address)
    try:
        sock.sendall((json.dumps(req if token is None else {**req, "token": token}) + "\n").encode())
        buf = b""
        with sock.makefile("rb") as f:
            while True:
                line = f.readline()
                if not line:
                    raise ConnectionError(f"the pdtui on {where} closed the connection without an answer"
                                          + (f" ({buf[-200:]!r})" if buf else ""))
                obj = json.loads(line)
                if isinstance(obj, dict) and "progress" in obj and "ok" not in obj:
                    if on_progress is not None:
                        on_progress(obj)
                    continue
                return obj
    finally:
        sock.close()


__all__ = ["MAX_SOCKET_PATH", "Address", "NotListening", "connect", "default_socket_path", "describe", "parse_hostport",
           "probe", "read_token", "request", "socket_dir"]
