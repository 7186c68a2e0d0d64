"""AttachedInstance: an engine pdtui did not start, watched by URL and driven by the user's commands.

It has the surface the Runtime, Control and the dashboard use of a launched
:class:`pdtui.core.supervisor.Instance`, and emits the same events, so the proxy is told up and
down and the panes work as they do for a launched one:

- **State** from polling ``/health`` every 0.5 s: ``ready`` while it answers 200; ``exited`` when the
  connection is refused (nothing listens on the port any more), ``unreachable`` for any other
  failure (an HTTP status, 503 being vLLM's dead engine; a timeout or a broken read twice in a
  row), the cause in words in the event's detail. An engine that answers again after it was
  down is taken for a new process (``starting`` then ``ready``: the panes forget its handshakes).
- **Log** (``--log NAME=FILE``): the file is followed as it grows, every line through the one log
  path (``pdtui.core.logparse.LogFeed``, as the supervisor's pipe), from the start of the engine's
  current run (its last ``non-default args`` line: pdtui.core.engine_facts.run_start). From there, not
  from the end: an engine is attached after it started, and its registration and connector lines
  are in the file already; from its very start, a long-lived file would replay old processes'
  lines. What came before attach is digested, not replayed (pdtui.core.logparse.LogFeed.digest).
  A rotated file (a new inode at the path) is read to its end, then the new one from its start;
  a truncated one (copytruncate) from its start.
- **Kill and restart** run the user's shell commands (``--kill D='ssh host systemctl stop ...'``),
  bounded by ``command_timeout_s``, their output in a Notice, their exit status checked. A kill
  then waits (bounded by ``stop_grace_s``) for /health to stop answering; a restart for it to answer
  again (bounded by ``ready_timeout_s``). Without a command the operation is refused with a
  ControlError saying how to give one.
- **Stop** (pdtui closing) only stops watching: the engine is not pdtui's to stop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pdtui.core import engine_facts, logparse
from pdtui.core.control import ControlError
from pdtui.core.events import Event, InstanceStateChanged, Notice
from pdtui.core.supervisor import LOG_TAIL_LINES, TAG_VAR, StartupFailed
from pdtui.core.topology import Attach, Member

HEALTH_INTERVAL_S = 0.5
HEALTH_TIMEOUT_S = 2.0
TIMEOUTS_FOR_DOWN = 2
"""Consecutive /health timeouts or broken reads before an engine is called unreachable (one slow
answer, or a poll in flight when it died, is not the whole story)."""
FOLLOW_INTERVAL_S = 0.25
READ_CHUNK = 1 << 20
OUTPUT_KEPT = 2000
"""Characters of a command's output kept for its Notice (the end of it)."""
DOWN_STATES = ("exited", "unreachable", "stopped")


@dataclass(frozen=True)
class CommandResult:
    command: str
    code: int | None
    """The shell's exit status; None when it was killed at the timeout."""
    output: str
    """Its stdout and stderr together, the last OUTPUT_KEPT characters."""
    seconds: float

    @property
    def ok(self) -> bool:
        return self.code == 0

    def words(self) -> str:
        how = f"timed out after {self.seconds:.0f} s (killed)" if self.code is None else f"exited with {self.code}"
        out = self.output.strip()
        return f"`{self.command}` {how} in {self.seconds:.1f} s" + (f"; output: {out}" if out else "; no output")


async def run_command(command: str, timeout_s: float, env: dict[str, str] | None = None) -> CommandResult:
    """``/bin/sh -c command`` (the user's command is a shell line: ``ssh host ...``, ``kubectl ...``),
    in a session of its own, its output to a file (a pipe would hold the wait while anything it
    started in the background keeps it open). At ``timeout_s`` its whole group is killed. Its
    environment: pdtui's without this pdtui's process tag (the reaper must not take an engine a
    restart command starts), plus ``env``."""
    base = {k: v for k, v in os.environ.items() if k != TAG_VAR}
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True, env={**base, **(env or {})})
        try:
            code: int | None = await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)
            code = None
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return CommandResult(command, code, text[-OUTPUT_KEPT:], time.monotonic() - t0)


class LogFollower:
    """Follows one log file as it grows, into a LogFeed (see the module's docstring)."""

    def __init__(self, path: Path, feed: logparse.LogFeed, note: Callable[[str, str], None], *,
                 interval_s: float = FOLLOW_INTERVAL_S) -> None:
        self.path = path
        self.feed = feed
        self._note = note
        self.interval_s = interval_s
        self.lines = 0
        """Lines fed so far, the digested ones included (tests read it)."""

    async def run(self) -> None:
        fh: Any = None
        pos, ino, partial = 0, None, b""
        first, waited = True, False
        try:
            while True:
                if fh is None:
                    try:
                        fh = self.path.open("rb")
                    except OSError as e:
                        if not waited:
                            waited = True
                            self._note("warning", f"log {self.path}: {e.strerror or e}; waiting for it to appear")
                        await asyncio.sleep(self.interval_s)
                        continue
                    st = os.fstat(fh.fileno())
                    ino = st.st_ino
                    pos, partial = 0, b""
                    if first:
                        first = False
                        pos = await self._catch_up(st.st_size)
                    fh.seek(pos)
                chunk = fh.read(READ_CHUNK)
                if chunk:
                    pos += len(chunk)
                    lines = (partial + chunk).split(b"\n")
                    partial = lines.pop()
                    for raw in lines:
                        self._feed(raw)
                    if len(chunk) == READ_CHUNK:
                        await asyncio.sleep(0)  # more is there: let the loop breathe, then read on
                        continue
                else:
                    try:
                        now: os.stat_result | None = os.stat(self.path)
                    except OSError:
                        now = None
                    if now is None or now.st_ino != ino:  # rotated or removed: the old one is read to its end
                        if partial:
                            self._feed(partial)
                        fh.close()
                        fh = None
                        self._note("info", f"log {self.path} was replaced (rotated): following the new file"
                                   " from its start")
                        continue
                    if now.st_size < pos:  # truncated in place (copytruncate)
                        self._note("info", f"log {self.path} was truncated: following it from its start")
                        fh.seek(0)
                        pos, partial = 0, b""
                await asyncio.sleep(self.interval_s)
        finally:
            if fh is not None:
                fh.close()

    def _feed(self, raw: bytes) -> None:
        self.lines += 1
        self.feed.feed(raw.decode("utf-8", "replace").rstrip("\r"))

    async def _catch_up(self, size: int) -> int:
        """Digest what the file holds of the engine's current run (in a thread: it may be MiBs);
        returns where following starts."""
        start = await asyncio.to_thread(engine_facts.run_start, self.path)
        if start is None:
            if size:
                self._note("warning", f"log {self.path}: no `non-default args` line of a vLLM start in its last"
                           f" {engine_facts.LOG_TAIL_READ >> 20} MiB, so pdtui follows it from its end: the engine's"
                           " start-up milestones (registration, pool) are not seen")
            return size

        def read() -> tuple[int, logparse.Digest, int]:
            with self.path.open("rb") as f:
                f.seek(start)
                data = f.read(size - start)
            cut = data.rfind(b"\n") + 1  # a partial last line is read again by the follower
            lines = data[:cut].decode("utf-8", "replace").split("\n")[:-1]
            return len(lines), self.feed.digest(line.rstrip("\r") for line in lines), cut

        n, digest, cut = await asyncio.to_thread(read)
        self.lines += n
        self.feed.replay(digest)
        return start + cut


class AttachedInstance:
    """One engine pdtui did not start (see the module's docstring)."""

    pid: int | None = None
    """Not known: the engine may be on another machine."""
    exit_code: int | None = None

    def __init__(self, member: Member, emit: Callable[[Event], None], *, ready_timeout_s: float = 600.0,
                 stop_grace_s: float = 10.0, interval_s: float = HEALTH_INTERVAL_S,
                 health_timeout_s: float = HEALTH_TIMEOUT_S, transport: httpx.AsyncBaseTransport | None = None) -> None:
        attach = member.attach or Attach()
        self.member = member
        self.name = member.name
        self.role = member.role
        self.url = member.url
        self._emit = emit
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self.interval_s = interval_s
        self.health_timeout_s = health_timeout_s
        self.command_timeout_s = attach.command_timeout_s
        self.kill_command = attach.kill
        self.restart_command = attach.restart
        self.log_path: Path | None = attach.log
        """The engine's log as the user gave it (followed), or None: metrics alone."""
        self.log_tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.state = "stopped"
        self.death: str | None = None
        """Why it went away when nobody asked (it stopped answering, or a FATAL log line), or None."""
        self.last_cause: str | None = None
        """Why the last /health poll failed, None when it answered."""
        self.members: dict[int, str] = {}
        """No processes are seen from here (a launched Instance's engine processes)."""
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self._expected_exit: str | None = None
        self._exited = asyncio.Event()
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._hold = False
        """A restart command is running: the old process answering is not "ready again"."""
        self._transport = transport
        self._poller: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self.follower: LogFollower | None = None
        self._feed = logparse.LogFeed(self.name, emit, self.log_tail, self._fatal)

    # ----- what the Runtime reads ---------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Answering, or being attached (not down, not failed)."""
        return self.state not in (*DOWN_STATES, "failed")

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def kill_means(self) -> str:
        return f"running `{self.kill_command}`" if self.kill_command else "no --kill command"

    @property
    def after_death(self) -> str:
        if self.restart_command:
            return (f"pdtui did not start it; r/R or `pdtui ctl restart {self.name}` runs `{self.restart_command}`,"
                    " and pdtui sees it when /health answers again")
        return (f"pdtui did not start it and cannot restart it (no --restart {self.name}=CMD); pdtui sees it when"
                " /health answers again")

    def refuses(self, verb: str) -> str | None:
        """Why ``verb`` (kill, restart) cannot be done from pdtui, or None."""
        if verb == "kill" and not self.kill_command:
            return (f"{self.name} is attached (pdtui did not start it); give --kill {self.name}='...' (a command"
                    " that kills it, e.g. ssh HOST systemctl stop ...) to kill it from pdtui")
        if verb == "restart" and not self.restart_command:
            return (f"{self.name} is attached (pdtui did not start it); give --restart {self.name}='...' (e.g."
                    " ssh HOST systemctl restart ..., kubectl delete pod ...) to restart it from pdtui")
        return None

    def check_ports(self) -> None:
        """Nothing to check: the engine's ports are its own, and taken."""

    def tail(self, n: int = 40) -> str:
        return "\n".join(list(self.log_tail)[-n:])

    def _set_state(self, state: str, detail: str = "", **kw: Any) -> None:
        self.state = state
        elapsed = time.monotonic() - self.started_at if self.started_at else None
        self._emit(InstanceStateChanged(instance=self.name, role=self.role, state=state, pid=None, detail=detail,
                                        elapsed_s=round(elapsed, 3) if elapsed is not None else None, **kw))

    def _notice(self, level: str, text: str) -> None:
        self._emit(Notice(level=level, instance=self.name, text=f"{self.name}: {text}"))

    # ----- watching -----------------------------------------------------------------------
    def _starting(self, detail: str) -> None:
        self._exited = asyncio.Event()
        self._ready = asyncio.Event()
        self.death = None
        self._expected_exit = None
        self._set_state("starting", detail)

    async def spawn(self) -> None:
        """Start watching (nothing is launched): poll /health, follow the log."""
        self.started_at = time.monotonic()
        self._starting(f"attached: polling {self.url}/health")
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name=f"{self.name}-health")
        if self.log_path is not None and (self._follower is None or self._follower.done()):
            self.follower = LogFollower(self.log_path, self._feed, self._notice)
            self._follower = asyncio.create_task(self.follower.run(), name=f"{self.name}-follow")

    async def _poll(self) -> None:
        """Poll, decide, sleep. A refusal (nothing listens) or an HTTP status decides at once; a
        timeout or a broken read (a poll in flight when the engine died, a network blip) only on
        the second in a row, asked again at once on a new connection."""
        doubts = 0
        async with httpx.AsyncClient(timeout=self.health_timeout_s, transport=self._transport,
                                     limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while True:
                why, refused = None, False
                try:
                    r = await client.get(f"{self.url}/health")
                    if r.status_code != 200:
                        why = engine_facts.cause(status=r.status_code)
                except httpx.HTTPError as e:
                    why, refused = engine_facts.cause(e), engine_facts.refused(e)
                    if not refused and doubts + 1 < TIMEOUTS_FOR_DOWN:
                        doubts += 1
                        await asyncio.sleep(0.05)
                        continue
                doubts = 0
                if why is None:
                    self._answering()
                else:
                    self._silent(why, refused)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval_s)

    def _answering(self) -> None:
        self.last_cause = None
        if self._hold or self.state in ("ready", "failed"):
            return
        if self.state in DOWN_STATES:  # back after it was down: a new process, as far as pdtui can tell
            self.started_at = time.monotonic()
            self._starting("answering /health again")
        assert self.started_at is not None
        self.ready_at = time.monotonic()
        took = self.ready_at - self.started_at
        self._set_state("ready", f"/health 200 after {took:.1f} s (attached)")
        self._ready.set()

    def _silent(self, why: str, refused: bool) -> None:
        self.last_cause = why
        if self.state not in ("ready", "failed", "stopping"):
            return  # starting: wait_ready says why at its bound
        state = "exited" if refused else "unreachable"
        if self._expected_exit is not None:
            detail = f"{self._expected_exit} ({why})"
        else:
            if self.death is None:
                self.death = f"it stopped answering {self.url}/health: {why}"
            detail = f"exited unexpectedly: {self.death}"
        self._set_state(state, detail)
        self._exited.set()

    def _fatal(self, cause: str) -> None:
        """A FATAL milestone in its log (logparse.FATAL): it may answer /health, it cannot serve as
        half of a pair. pdtui cannot end it: it is called failed (the proxy sends it nothing) until
        it goes down and comes back, or is restarted."""
        if self.state not in ("ready", "starting") or self._expected_exit is not None:
            return
        self.death = f"its {cause}"
        self._set_state("failed", f"exited unexpectedly: {self.death} (its log); it still answers /health but"
                         " cannot serve as half of a pair")
        self._exited.set()

    async def wait_ready(self, client: httpx.AsyncClient | None = None) -> float:
        assert self.started_at is not None
        left = self.started_at + self.ready_timeout_s - time.monotonic()
        try:
            await asyncio.wait_for(self._ready.wait(), max(0.0, left))
        except TimeoutError:
            raise StartupFailed(f"{self.name} ({self.role}, attached) did not answer {self.url}/health within"
                                f" {self.ready_timeout_s:.0f} s: {self.last_cause or 'no answer'}") from None
        assert self.ready_at is not None
        return self.ready_at - self.started_at

    async def start(self, client: httpx.AsyncClient | None = None) -> float:
        await self.spawn()
        return await self.wait_ready(client)

    async def wait_exit(self, timeout: float | None = None) -> int | None:
        await asyncio.wait_for(self._exited.wait(), timeout)
        return None

    # ----- the user's commands ------------------------------------------------------------
    async def _command(self, verb: str, command: str) -> CommandResult:
        res = await run_command(command, self.command_timeout_s,
                                env={"PDTUI_INSTANCE": self.name, "PDTUI_ROLE": self.role, "PDTUI_URL": self.url})
        self._notice("info" if res.ok else "error", f"{verb} command {res.words()}")
        if not res.ok:
            raise ControlError(f"{verb} {self.name}: the command {res.words()}", "failed")
        return res

    async def kill(self, reason: str = "killed") -> int | None:
        """Run the kill command, then wait (bounded by stop_grace_s) until /health stops answering."""
        if (why := self.refuses("kill")) is not None:
            raise ControlError(why, "unavailable")
        assert self.kill_command is not None
        if self.state in DOWN_STATES:
            return None
        self._expected_exit = reason
        try:
            await self._command("kill", self.kill_command)
        except ControlError:
            self._expected_exit = None
            raise
        self._wake.set()  # look now, not at the next tick
        if self.state == "starting":  # it never answered since pdtui looked: nothing to see go
            return None
        try:
            await asyncio.wait_for(self._exited.wait(), self.stop_grace_s)
        except TimeoutError:
            self._expected_exit = None
            self._notice("warning", f"the kill command succeeded but {self.url}/health still answers after"
                         f" {self.stop_grace_s:g} s")
        return None

    async def restart(self, client: httpx.AsyncClient | None = None) -> float:
        """Run the restart command, then wait (bounded by ready_timeout_s) until /health answers.
        The command should return once the old engine is gone (systemctl restart, kubectl delete
        pod do): an old process still answering after it returned would be taken for the new one."""
        if (why := self.refuses("restart")) is not None:
            raise ControlError(why, "unavailable")
        assert self.restart_command is not None
        t0 = time.monotonic()
        self._expected_exit = "restarting"
        self._hold = True
        if self.state not in DOWN_STATES:
            self._set_state("stopping", f"running `{self.restart_command}`")
        try:
            res = await self._command("restart", self.restart_command)
        except ControlError:
            self._expected_exit = None
            if self.state == "stopping":  # the old one is still there: as it was
                self._set_state("ready", "the restart command failed; it still answers /health")
            raise
        finally:
            self._hold = False
        self.started_at = t0
        self._starting(f"restart command done in {res.seconds:.1f} s; waiting for {self.url}/health")
        self._wake.set()
        return await self.wait_ready(client)

    async def stop(self, grace_s: float | None = None, reason: str = "stopped") -> int | None:
        """Stop watching it; the engine is not pdtui's to stop."""
        for task in (self._poller, self._follower):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._poller = self._follower = None
        self._feed.close()
        if self.state != "stopped":
            self._set_state("stopped", f"detached ({reason}): pdtui stopped watching; the engine runs on")
        return None
