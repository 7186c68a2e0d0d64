"""Bounded waits for the tests that poll something outside them (a process, a port, a server's
/health, a control socket), and the port check they wait on. Async code polls on its own loop."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(check: Callable[[], T], timeout: float, every: float) -> T:
    """``check()`` every ``every`` seconds until it returns something true or ``timeout`` seconds
    have passed; its last value (true: it held). It is asked once more after the last sleep, so a
    wait that runs out still reports the state at its bound."""
    deadline = time.monotonic() + timeout
    while not (got := check()) and time.monotonic() < deadline:
        time.sleep(every)
    return got


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (SO_REUSEADDR: a socket in TIME_WAIT does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_port_free(port: int, timeout: float = 10) -> bool:
    """Whether ``port`` is free within ``timeout`` seconds (a server the test stopped lets it go)."""
    return poll(lambda: port_free(port), timeout, 0.2)
