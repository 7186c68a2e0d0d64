"""How a process died, in words: the signal's name and meaning, the OOM killer's kernel line, the
crash report Python's faulthandler leaves in the log (standard library only).

pdtui starts the API server of each instance, so it has that process's exit status; the engine
core and the workers are vLLM's children, which vLLM reaps. Their status is read from
``/proc/<pid>/stat`` (field 52, ``exit_code``: the wait status, readable while the process is a
zombie or exiting, before its parent reaps it). A crash by signal (SIGILL, SIGSEGV, ...) also
leaves ``Fatal Python error: <what>`` and the stack in the instance's log: the engines run with
``PYTHONFAULTHANDLER=1`` (pdtui.core.config), so the log names the signal even when the status
was reaped first. A SIGKILL is the OOM killer's when the kernel log says so (``/dev/kmsg``,
readable as root on most machines; else the words say it could not be checked).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass

SIGNAL_WORDS = {
    "SIGILL": "illegal instruction: the CPU refused an instruction",
    "SIGKILL": "killed",
    "SIGSEGV": "segmentation fault",
    "SIGABRT": "aborted",
    "SIGBUS": "bus error",
    "SIGFPE": "floating-point exception",
    "SIGTERM": "terminated",
    "SIGINT": "interrupted",
    "SIGHUP": "hung up",
    "SIGPIPE": "broken pipe",
}

FAULTHANDLER = {  # faulthandler's words (Modules/faulthandler.c) -> the signal
    "Segmentation fault": "SIGSEGV",
    "Illegal instruction": "SIGILL",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Floating-point exception": "SIGFPE",
    "Floating point exception": "SIGFPE",
}
_FATAL = re.compile(r"Fatal Python error: (?P<what>[A-Z][A-Za-z -]+?)\s*$")
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')
_VLLM_WORKER = re.compile(r"Worker proc (?P<name>\S+) died unexpectedly \(exit code: (?P<code>-?\d+|None)\)")


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def words(sig: str) -> str:
    """``SIGILL (illegal instruction: the CPU refused an instruction)``."""
    w = SIGNAL_WORDS.get(sig)
    return f"{sig} ({w})" if w else sig


def stat_fields(pid: int) -> list[bytes] | None:
    """``/proc/<pid>/stat`` after the command name, split: [0] the state (field 3), [1] the ppid,
    [3] the session, [6] the flags, [49] the exit code (field 52); None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2:].split()


def wait_status(pid: int) -> int | None:
    """The wait status of a process that is exiting or a zombie (``/proc/<pid>/stat`` field 52),
    None if it is gone (reaped), still running, or the field is not there."""
    fields = stat_fields(pid)
    if fields is None or len(fields) < 50:
        return None
    state, flags, code = fields[0], int(fields[6]), int(fields[49])
    if state in (b"Z", b"X") or (flags & 0x4 and code):  # PF_EXITING
        return code
    return None


def describe_status(status: int) -> str:
    """A wait status in words: ``signal SIGKILL (killed)`` or ``code 1``."""
    sig = status & 0x7F
    if sig:
        return f"signal {words(signal_name(sig))}"
    return f"code {(status >> 8) & 0xFF}"


@dataclass(frozen=True)
class Crash:
    """What the log says about a native crash."""

    signal: str | None
    """SIGILL, SIGSEGV, ... from faulthandler's words; None if only vLLM's line was seen."""
    where: str | None
    """The innermost frame of the crashing thread: ``cpu_attention_with_kv_cache (vllm/_custom_ops.py:1234)``."""
    line: str
    """The log line it was read from."""

    def __str__(self) -> str:
        return (words(self.signal) if self.signal else self.line) + (f" in {self.where}" if self.where else "")


def _short(path: str) -> str:
    for mark in ("/site-packages/", "/dist-packages/", "/pdtui/"):
        if mark in path:
            return ("pdtui/" if mark == "/pdtui/" else "") + path.split(mark, 1)[1]
    return os.path.basename(path)


def crash_report(lines: Iterable[str]) -> Crash | None:
    """The last crash faulthandler printed (``Fatal Python error: Illegal instruction``, then
    ``Current thread ... (most recent call first):`` and its frames, innermost first), or vLLM's
    ``Worker proc X died unexpectedly (exit code: -4)``. None if the lines hold neither."""
    lines = list(lines)
    for i in range(len(lines) - 1, -1, -1):
        m = _FATAL.search(lines[i])
        if m and m.group("what") in FAULTHANDLER:
            # every thread's stack follows; the crashing one is "Current thread ...", innermost first
            after = lines[i + 1:i + 400]
            cur = next((k for k, text in enumerate(after) if text.startswith("Current thread")), None)
            frames = [f for f in (_FRAME.match(text) for text in (after[cur + 1:cur + 40] if cur is not None else []))]
            frames = frames[:frames.index(None)] if None in frames else frames
            where = " < ".join(f"{f.group('func')} ({_short(f.group('file'))}:{f.group('line')})"
                               for f in frames[:2] if f is not None) or None
            return Crash(FAULTHANDLER[m.group("what")], where, lines[i].strip())
    for i in range(len(lines) - 1, -1, -1):
        m = _VLLM_WORKER.search(lines[i])
        if m:
            code = m.group("code")
            sig = signal_name(-int(code)) if code not in ("None",) and int(code) < 0 else None
            return Crash(sig, None, lines[i].strip()[-200:])
    return None


def oom_kill(pid: int, kmsg: str = "/dev/kmsg", max_records: int = 100_000) -> tuple[bool, str | None]:
    """(could the kernel log be read, its OOM-kill line for ``pid`` or None). Reads ``/dev/kmsg``
    without blocking, bounded."""
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False, None
    pat = re.compile(rf"(Killed process {pid} \(|oom-kill:.*\bpid={pid}\b|Out of memory: Kill(ed)? process {pid}\b)")
    found = None
    try:
        for _ in range(max_records):
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == 32:  # EPIPE: a record was overwritten under us; go on
                    continue
                return False, None
            if not rec:
                break
            text = rec.decode(errors="replace")
            if pat.search(text):
                found = text.split(";", 1)[-1].strip()
    finally:
        os.close(fd)
    return True, found


def killed_words(pid: int, kmsg: str = "/dev/kmsg") -> str:
    """A SIGKILL, said as what it was: the OOM killer (with the kernel's line), or not."""
    readable, line = oom_kill(pid, kmsg)
    if line:
        return f"SIGKILL (killed by the OOM killer; kernel: {line})"
    if readable:
        return "SIGKILL (killed: not by the OOM killer, per the kernel log; kill -9 from outside?)"
    return "SIGKILL (killed: by the OOM killer? the kernel log is not readable here)"
