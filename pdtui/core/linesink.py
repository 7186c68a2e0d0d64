"""Lines to stdout or stderr that never block the event loop and never raise (issue 22).

`pdtui proxy` prints its events on stdout, `pdtui up --headless` the Runtime's. Whoever reads them (a
terminal, a pipe, a file, nobody) must never hold the data path up, nor end it:

- **a regular file or /dev/null** (``> file``, nohup, a service manager): written directly; a write
  there never waits on a reader.
- **a pipe, a terminal or a socket**: written without blocking, through a file description of the
  sink's own (the fd reopened through ``/proc/self/fd``; a socket is sent ``MSG_DONTWAIT``), so
  ``O_NONBLOCK`` reaches neither the shell's terminal nor a stderr that shares the pipe (``2>&1``).
  What the reader has not taken yet waits in a buffer of at most ``limit`` bytes
  (``$PDTUI_EVENT_BUFFER_BYTES``, default 16 MiB); past it, whole lines are dropped and counted
  (``dropped_full``), never half a line. When the reader has caught up, ``gap_line(n)`` (the
  owner's words, a Notice) goes out first, so the reader knows n lines are missing.
- **closed at start** (``>&-``: Python's ``sys.stdout`` is None), or **gone since** (EPIPE: the
  reader exited; EIO: the terminal hung up; EBADF): every line from then on is dropped and counted
  (``dropped_gone``).

``on_change(text)`` hears each change in words (full, read again, gone): the owners log it on
stderr. A sink is written from its event loop's thread (it arms ``loop.add_writer`` to drain).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import IO, Any

BUFFER_VAR = "PDTUI_EVENT_BUFFER_BYTES"
DEFAULT_BUFFER = 16 * 2**20
"""Bytes a reader may fall behind before lines are dropped: thousands of events (a trace is 1-30 kB)."""
CHUNK = 2**18
"""Bytes joined into one write when draining the buffer."""


def buffer_limit() -> int:
    """``$PDTUI_EVENT_BUFFER_BYTES`` if it is a whole number of bytes (at least 1), else 16 MiB."""
    raw = os.environ.get(BUFFER_VAR, "").strip()
    try:
        return max(1, int(raw)) if raw else DEFAULT_BUFFER
    except ValueError:
        return DEFAULT_BUFFER


def _fileno(stream: IO[Any] | None) -> int | None:
    if stream is None:
        return None
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError):
        return None


class LineSink:
    """Whole lines to one file descriptor (module docstring). ``written``: lines handed to the
    reader or waiting for it; ``dropped_full``: lines dropped because the reader was too far
    behind (or had not taken them at ``aclose``); ``dropped_gone``: lines dropped because the
    output was closed or had gone (``gone`` says why: ``closed``, ``EPIPE``, ``EIO``...)."""

    def __init__(self, stream: IO[Any] | None, *, name: str = "stdout", limit: int | None = None,
                 gap_line: Callable[[int], bytes] | None = None,
                 on_change: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.limit = buffer_limit() if limit is None else limit
        self.gap_line = gap_line
        self.on_change = on_change
        self.written = 0
        self.dropped_full = 0
        self.dropped_gone = 0
        self.gone: str | None = None
        """Why nothing more can be written, or None while it can."""
        self.kind = "closed"
        """What the output is: file, null (a character device such as /dev/null), pipe, tty, socket, closed."""
        self._buf: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._head_cut = False  # the first buffered item is the rest of a line partly written
        self._unreported = 0  # lines dropped (full) since the reader was last told
        self._full_since: float | None = None
        self._fd = -1
        self._owned = False
        self._sock: socket.socket | None = None
        self._direct = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._armed = False
        self._open(_fileno(stream))

    # ----- opening --------------------------------------------------------------------------

    def _open(self, fd: int | None) -> None:
        if fd is None:
            self.gone = "closed"
            return
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            self.gone = "closed"
            return
        if stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not os.isatty(fd)):
            self.kind = "file" if stat.S_ISREG(mode) else "null"
            self._fd, self._direct = fd, True  # never waits on a reader
            return
        if stat.S_ISSOCK(mode):
            self.kind = "socket"
            self._sock = socket.socket(fileno=os.dup(fd))  # MSG_DONTWAIT per send: its flags untouched
            self._fd, self._owned = self._sock.fileno(), True
            return
        self.kind = "tty" if os.isatty(fd) else "pipe"
        flags = os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
        try:  # a description of our own: O_NONBLOCK stays off the shell's terminal and a shared stderr
            self._fd = os.open(f"/proc/self/fd/{fd}", flags)
        except OSError:
            try:
                self._fd = os.dup(fd)
                os.set_blocking(self._fd, False)
            except OSError:
                self.gone = "closed"
                return
        self._owned = True

    # ----- writing --------------------------------------------------------------------------

    def write(self, line: bytes) -> bool:
        """Hand one whole line (``\\n`` included) to the reader, or drop it and count it; never
        blocks, never raises. True if it went out or waits in the buffer."""
        if self.gone is not None:
            self.dropped_gone += 1
            return False
        if self._direct:
            return self._write_direct(line)
        if self._buf:
            if self._buffered + len(line) > self.limit:
                self._drop_full()
                return False
            self._buf.append(line)
            self._buffered += len(line)
            self.written += 1
            return True
        n = self._send(line)
        if n < 0:
            self.dropped_gone += 1
            return False
        self.written += 1
        if n < len(line):  # the rest waits; an empty buffer takes any line, however long
            self._buf.append(line[n:])
            self._buffered += len(line) - n
            self._head_cut = n > 0
            self._arm()
        return True

    def _write_direct(self, line: bytes) -> bool:
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            self._lose(e)
            self.dropped_gone += 1
            return False
        self.written += 1
        return True

    def _send(self, data: bytes) -> int:
        """Bytes written; 0 if the reader is full; -1 if the output is gone (then ``gone`` is set)."""
        try:
            if self._sock is not None:
                return self._sock.send(data, socket.MSG_DONTWAIT)
            return os.write(self._fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            self._lose(e)
            return -1

    def _drop_full(self) -> None:
        self.dropped_full += 1
        self._unreported += 1
        if self._full_since is None:
            self._full_since = time.monotonic()
            self._say(f"{self.name} is not being read ({self._buffered:,} B wait): lines are dropped,"
                      " and counted, until the reader catches up")

    def _arm(self) -> None:
        if self._armed:
            return
        try:
            self._loop = asyncio.get_running_loop()
            self._loop.add_writer(self._fd, self._drain)
        except (RuntimeError, OSError, ValueError) as e:  # no loop, or the fd cannot be polled
            self._lose(e if isinstance(e, OSError) else OSError(errno.EINVAL, str(e)))
            return
        self._armed = True

    def _disarm(self) -> None:
        if self._armed and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._fd)
        self._armed = False

    def _drain(self) -> None:
        """The reader can take more: write what waits, in chunks of up to CHUNK bytes."""
        while self._buf:
            chunk, size = [], 0
            for item in self._buf:
                chunk.append(item)
                size += len(item)
                if size >= CHUNK:
                    break
            n = self._send(chunk[0] if len(chunk) == 1 else b"".join(chunk))
            if n <= 0:  # full again (stay armed), or gone (_lose disarmed)
                return
            self._buffered -= n
            while self._buf and n >= len(self._buf[0]):
                n -= len(self._buf.popleft())
                self._head_cut = False
            if n:
                self._buf[0] = self._buf[0][n:]
                self._head_cut = True
                return
        self._disarm()
        if self._unreported:
            missed, self._unreported = self._unreported, 0
            since = time.monotonic() - (self._full_since or time.monotonic())
            self._full_since = None
            self._say(f"{self.name} is read again: {missed:,} lines were dropped in the {since:.1f} s it was not")
            if self.gap_line is not None:
                self.write(self.gap_line(missed))

    def _lose(self, e: OSError) -> None:
        """The output is gone: drop what waits (lines not begun), write nothing more."""
        self.gone = errno.errorcode.get(e.errno or 0, str(e))
        self._disarm()
        self._discard("gone")
        self._say(f"{self.name} is gone ({self.gone}): lines are dropped, and counted, from now on")

    def _discard(self, why: str) -> None:
        lost = len(self._buf) - (1 if self._head_cut else 0)
        self._buf.clear()
        self._buffered, self._head_cut = 0, False
        if lost > 0:
            self.written -= lost
            if why == "gone":
                self.dropped_gone += lost
            else:
                self.dropped_full += lost

    def _say(self, text: str) -> None:
        if self.on_change is not None:
            with contextlib.suppress(Exception):
                self.on_change(text)

    # ----- the rest -------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_gone

    @property
    def buffered(self) -> int:
        """Bytes waiting for the reader."""
        return self._buffered

    def counts(self) -> dict[str, Any]:
        """For `pdtui ctl status` and the final words: what the output is and what reached it."""
        return {"output": self.kind, "gone": self.gone, "written": self.written, "dropped_full": self.dropped_full,
                "dropped_gone": self.dropped_gone, "buffered_bytes": self._buffered}

    def summary(self) -> str:
        """``N lines dropped (M: not read, K: gone (EIO))``, or '' when none was."""
        if not self.dropped:
            return ""
        parts = ([f"{self.dropped_full:,} while it was not read"] if self.dropped_full else []) + (
            [f"{self.dropped_gone:,} once it was {'closed' if self.gone == 'closed' else f'gone ({self.gone})'}"]
            if self.dropped_gone else [])
        return f"{self.dropped:,} lines were not written to {self.name} ({', '.join(parts)})"

    async def aclose(self, timeout_s: float = 1.0) -> None:
        """Give the reader up to ``timeout_s`` to take what waits, then drop the rest (counted as
        not read) and close the sink's own descriptor."""
        deadline = time.monotonic() + timeout_s
        while self._buf and self.gone is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._disarm()
        self._discard("full")
        if self._owned:
            with contextlib.suppress(OSError):
                if self._sock is not None:
                    self._sock.close()
                else:
                    os.close(self._fd)
            self._owned = False
        self.gone = self.gone or "closed"  # nothing more is written


def hold_closed_std_fds() -> None:
    """A program started with stdout or stderr closed (``>&-``, ``2>&-``): put /dev/null on that
    descriptor, so that the first file or socket the program opens does not become its "stdout"
    (a stray write would land in it). ``sys.stdout`` stays None (the events' LineSink says "closed"
    and counts them); ``sys.stderr`` becomes /dev/null, since ``print(file=None)`` writes to stdout."""
    import sys

    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        if stream is not None:
            continue
        try:
            os.fstat(fd)
            continue  # already taken by something opened at start-up: leave it
        except OSError:
            pass
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)  # inheritable: the children get /dev/null there too
                os.close(null)
            else:
                os.set_inheritable(fd, True)
    if sys.stderr is None:
        with contextlib.suppress(OSError):
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process


__all__ = ["BUFFER_VAR", "DEFAULT_BUFFER", "LineSink", "buffer_limit", "hold_closed_std_fds"]
