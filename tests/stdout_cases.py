"""The four stdout cases of issue 22 for a child process (/dev/null, closed, a pipe nobody reads, a
terminal that hangs up), a FAKE P and D to serve through (tests/child_scripts/fake_server.py, not
vLLM), and a client of many streams that times every chunk's wait. For tests/unit/test_stdout_cases.py
and results/2026-12-07-stdout."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from tests.fake_service import ROOT
from tests.fakes import free_port

FAKE_SERVER = ROOT / "tests" / "child_scripts" / "fake_server.py"
CASES = ["devnull", "closed", "full_pipe", "tty_gone"]


class Stdout:
    """One stdout case for a child process: what Popen gets, what the test does to it after."""

    def __init__(self, case: str, pipe_size: int = 4096) -> None:
        self.case = case
        self.arg: Any = None
        self.read_fd: int | None = None
        self.master: int | None = None
        self.preexec: Callable[[], None] | None = None
        if case == "devnull":
            self.arg = subprocess.DEVNULL
        elif case == "closed":  # `>&-`: fd 1 not open at all when the program starts
            self.preexec = lambda: os.close(1)
        elif case == "full_pipe":  # a reader that never reads: the pipe (4 KiB here, 64 KiB by default) fills
            r, w = os.pipe()
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, pipe_size)
            os.set_blocking(r, False)
            self.read_fd, self.arg = r, w
        elif case == "tty_gone":  # a terminal whose other side closes (SSH drop): EIO on write
            self.master, self.arg = pty.openpty()
            os.set_blocking(self.master, False)
        else:
            raise ValueError(case)

    def spawned(self) -> None:
        """The child has its copy: close ours (a pipe's writer, a terminal's slave)."""
        if isinstance(self.arg, int) and self.arg >= 0:
            os.close(self.arg)
            self.arg = None

    def hang_up(self) -> None:
        """The terminal's other side goes away (the pty's master closed, as sshd does)."""
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.read(self.master, 1 << 20)
            os.close(self.master)
            self.master = None

    def read_all(self, for_s: float) -> list[bytes]:
        """Full pipe: read it now, for ``for_s`` seconds (the child drains what waited), as lines."""
        assert self.read_fd is not None
        data = b""
        deadline = time.monotonic() + for_s
        while time.monotonic() < deadline:
            try:
                chunk = os.read(self.read_fd, 1 << 20)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            if not chunk:
                break
            data += chunk
        return data.splitlines(keepends=True)

    def close(self) -> None:
        self.spawned()
        self.hang_up()
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None


async def _stream_many(url: str, n: int, concurrency: int = 10, max_tokens: int = 8) -> tuple[int, float]:
    """``n`` streamed completions, ``concurrency`` at a time: how many ended with [DONE], and the
    longest wait for a chunk (from the request to the first, then between chunks), in seconds."""
    sem = asyncio.Semaphore(concurrency)
    worst, ok = 0.0, 0
    async with httpx.AsyncClient(base_url=url, timeout=20) as client:

        async def one(k: int) -> None:
            nonlocal worst, ok
            async with sem:
                body, t = b"", time.monotonic()
                async with client.stream("POST", "/v1/completions", json={
                        "model": "m", "prompt": f"stdout case {k}", "max_tokens": max_tokens, "stream": True}) as r:
                    async for chunk in r.aiter_raw():
                        now = time.monotonic()
                        worst, t = max(worst, now - t), now
                        body += chunk
                ok += r.status_code == 200 and body.rstrip().endswith(b"data: [DONE]")

        await asyncio.gather(*(one(k) for k in range(n)))
    return ok, worst


def stream_many(url: str, n: int) -> tuple[int, float]:
    return asyncio.run(asyncio.wait_for(_stream_many(url, n), 120))




@contextlib.contextmanager
def fake_pd(itl_s: float = 0.01) -> Iterator[tuple[str, str]]:
    """A fake P and a fake D (fake_server.py pd: P legs answer kv_transfer_params, D legs stream)."""
    procs, urls = [], []
    env = {**os.environ, "PDTUI_FAKE_ITL_S": str(itl_s)}
    try:
        for _ in range(2):
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, str(FAKE_SERVER), str(port), "pd"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.05)
        yield urls[0], urls[1]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def controlling_terminal(ignore_hup: bool) -> Callable[[], None]:
    """In the child: a session of its own whose controlling terminal is its stdout (the pty's
    slave), so the master's close sends it SIGHUP, as a dropped SSH session does."""
    def setup() -> None:
        os.setsid()
        fcntl.ioctl(1, termios.TIOCSCTTY, 0)
        # as the user's shell sets it: ignored under nohup, else the default (the test itself may
        # run under nohup, a CI script's, and would hand its SIG_IGN on)
        signal.signal(signal.SIGHUP, signal.SIG_IGN if ignore_hup else signal.SIG_DFL)
    return setup
