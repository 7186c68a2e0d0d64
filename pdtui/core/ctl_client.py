"""The client side of the control socket (``pdtui ctl``), and where the sockets are.

Kept apart from ``pdtui.core.control`` and free of heavy imports (no asyncio servers, no httpx):
``pdtui ctl`` is typed while the engines take every core, and each module imported costs it
CPU time it has to wait for. ``pdtui.core.control`` re-exports all of it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdtui.core.paths import state_dir

MAX_SOCKET_PATH = 107
"""sun_path holds 108 bytes with the terminating NUL."""


class NotListening(ConnectionError):
    """No pdtui answers on this socket (the message names it)."""


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


def request(path: Path, req: dict[str, Any], *, timeout_s: float | None = 30.0,
            on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Send one request, return the answer (progress lines go to ``on_progress``). Raises
    NotListening when nobody listens on ``path``, naming it."""
    path = Path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise NotListening(f"no pdtui is listening on {path} (no socket there)") from None
        except ConnectionRefusedError:
            raise NotListening(f"no pdtui is listening on {path} (a stale socket: its pdtui is gone)") from None
        except PermissionError as e:
            raise PermissionError(f"cannot connect to {path}: {e.strerror} (not your pdtui?)") from None
        sock.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        with sock.makefile("rb") as f:
            while True:
                line = f.readline()
                if not line:
                    raise ConnectionError(f"the pdtui on {path} closed the connection without an answer"
                                          + (f" ({buf[-200:]!r})" if buf else ""))
                obj = json.loads(line)
                if isinstance(obj, dict) and "progress" in obj and "ok" not in obj:
                    if on_progress is not None:
                        on_progress(obj)
                    continue
                return obj
    finally:
        sock.close()


__all__ = ["MAX_SOCKET_PATH", "NotListening", "default_socket_path", "probe", "request", "socket_dir"]
