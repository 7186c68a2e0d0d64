"""Start, watch, stop, kill and restart one vLLM instance.

Each instance runs in its own session (its own process group), so a signal reaches the API
server, its engine core and its workers together. Ready means ``/health`` answers 200; start-up
fails at once, with the log tail, when the child exits first. Stopping is SIGTERM to the group,
a grace period, then SIGKILL to the group (a decode instance sometimes hangs on SIGTERM).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import functools
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from pdtui.core import death as death_words
from pdtui.core import logparse
from pdtui.core.config import LaunchSpec
from pdtui.core.events import Event, InstanceStateChanged

LOG_TAIL_LINES = 400

CONSEQUENT = (" with signal SIGTERM", " with signal SIGINT", " with signal SIGHUP")
"""Deaths that follow another's: vLLM terminates an engine core whose worker died."""


def first_cause(causes: list[tuple[int, str, str]]) -> tuple[int, str, str]:
    """Of the engine processes found dead at one look, (pid, title, cause), the one that died
    first as far as the causes tell: a crash or a kill before a termination that follows it (CI at
    a6d6c50: a worker's SIGILL was reported as its engine core's SIGTERM, the engine core listed
    first and both dead by the look)."""
    return next((c for c in causes if not c[2].startswith(CONSEQUENT)), causes[0])


class StartupFailed(RuntimeError):
    """An instance died or never became ready; the message carries the log tail."""


class WarmupFailed(StartupFailed):
    """Every instance answered /health, then one died during the warm-up request: the start
    failed, and the message names the instance and how it died."""


class PortInUse(RuntimeError):
    pass


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise PortInUse with a clear message when something listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUse(
                f"{what}: port {port} on {host} is already in use ({e.strerror}). Another pdtui or"
                f" vLLM still running? See who holds it: ss -ltnp 'sport = :{port}'. Or pick other"
                f" ports: a profile, or --port-offset N."
            ) from None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: if pdtui is SIGKILLed, so is the child
    except OSError:
        pass


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


RUN_TAG = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
"""This pdtui's mark: every process it launches carries ``PDTUI_TAG=RUN_TAG:<instance>#<serial>:<n>`` in its
environment, and so does every process those start (the environment is inherited), even one
that left the process group. The reaper (``pdtui.core.reaper``) kills them all when pdtui ends,
however it ends (``kill -9`` of pdtui included)."""
TAG_VAR = "PDTUI_TAG"
_SERIALS = itertools.count(1)
"""Each Instance's number in this pdtui, in its processes' tag (RUN_TAG:<name>#<n>:<generation>)."""
WATCH_INTERVAL_S = 0.25
"""How often a running instance's processes are checked: a death is seen within this (plus a
scan), far inside the 2 s the dashboard promises."""
_ENGINE_TITLE = re.compile(r"\b\w+::(EngineCore\w*|Worker\w*|DPCoordinator\w*)")
"""vLLM's own process titles (``VLLM::EngineCore``, ``VLLM::Worker_TP0``; set_process_title)."""


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of a process, None if it is gone."""
    fields = death_words.stat_fields(pid)
    if fields is None:
        return None
    return fields[0].decode(), int(fields[1]), int(fields[3])


def is_alive(pid: int) -> bool:
    """Running, and not on its way out: a zombie, or a process the kernel is tearing down
    (PF_EXITING in /proc/<pid>/stat's flags), is dead. A killed process with a large or
    NIXL-registered KV pool can take seconds to release its memory before it is a zombie."""
    fields = death_words.stat_fields(pid)
    return fields is not None and fields[0] not in (b"Z", b"X") and not int(fields[6]) & PF_EXITING


PF_EXITING = 0x4


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _other_pids() -> list[int]:
    """Every process id in /proc but this process's own."""
    me = os.getpid()
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and int(e.name) != me]


def _sigkill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def engine_processes(root: int) -> dict[int, str]:
    """vLLM's engine-core and worker processes under ``root`` (any depth), by their titles."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid in _other_pids():
        st = proc_stat(pid)
        if st is not None:
            children[st[1]].append(pid)
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        m = _ENGINE_TITLE.search(_cmdline(pid))
        if m and is_alive(pid):
            found[pid] = m.group(0)
    return found


def tagged_processes(prefix: str, *, exact: bool = False) -> list[int]:
    """Every live process whose environment has ``PDTUI_TAG`` starting with ``prefix`` (``exact``:
    equal to it)."""
    want = f"{TAG_VAR}={prefix}".encode()
    out = []
    for pid in _other_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if any(var == want if exact else var.startswith(want) for var in env.split(b"\0")) and is_alive(pid):
            out.append(pid)
    return out


def kill_family(tag_prefix: str, groups: Iterable[int] = (), pids: Iterable[int] = (),
                timeout_s: float = 5.0, *, exact: bool = False) -> None:
    """SIGKILL, until none is left (bounded): ``pids``, the process groups ``groups``, every
    process in the sessions ``groups`` lead (children that left the group keep the session), and
    every process tagged ``tag_prefix``. Both views are needed: vLLM's engine core and workers
    rename themselves (setproctitle), which on Linux overwrites what /proc/<pid>/environ shows."""
    groups = set(groups)
    _sigkill(pids)
    deadline = time.monotonic() + timeout_s
    while True:
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)
        left = session_processes(groups) + tagged_processes(tag_prefix, exact=exact)
        if not left or time.monotonic() > deadline:
            return
        _sigkill(left)
        time.sleep(0.05)


_reaper: subprocess.Popen[bytes] | None = None


def ensure_reaper() -> None:
    """Start this pdtui's reaper once: a small process in its own session that holds the read end
    of a pipe whose write end only pdtui holds. When pdtui ends, however it ends, the pipe closes
    and the reaper kills every process tagged with RUN_TAG."""
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return
    _reaper = subprocess.Popen([sys.executable, "-m", "pdtui.core.reaper", RUN_TAG], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, TAG_VAR: ""})


def scratch_prefix(run_tag: str = RUN_TAG) -> str:
    """The name every scratch folder of this pdtui's instances starts with (in the temp folder)."""
    return f"pdtui-{run_tag}-"


def make_scratch(name: str, generation: int, run_tag: str = RUN_TAG) -> Path:
    """A folder of its own for one start of an instance, in the temp folder: vLLM puts its ZeroMQ
    sockets (``VLLM_RPC_BASE_PATH``, one per engine link) and gloo's rendezvous file
    (``TMPDIR``) there. vLLM removes them only on a clean exit; an engine killed by a signal left
    them in /tmp for good (over a thousand after a day of drills). pdtui removes the folder when
    the instance ends, however it ends, and the reaper removes those of a pdtui that died."""
    return Path(tempfile.mkdtemp(prefix=f"{scratch_prefix(run_tag)}{name}-{generation}-"))


def remove_scratch(run_tag: str = RUN_TAG) -> list[str]:
    """Remove every scratch folder of ``run_tag``'s instances; returns what was removed."""
    gone = []
    for p in Path(tempfile.gettempdir()).glob(f"{scratch_prefix(run_tag)}*"):
        shutil.rmtree(p, ignore_errors=True)
        gone.append(str(p))
    return gone


def scratch_env(scratch: Path, env: dict[str, str]) -> dict[str, str]:
    """The engine's environment with its temp files in ``scratch``. Torch's compile cache stays
    where it was (it must outlive the instance: a GPU start reuses it)."""
    user = os.environ.get("USER") or str(os.getuid())
    keep = {"TORCHINDUCTOR_CACHE_DIR": env.get("TORCHINDUCTOR_CACHE_DIR")
            or os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")}
    return {**env, **keep, "TMPDIR": str(scratch), "VLLM_RPC_BASE_PATH": str(scratch)}


def reaper_watch(pgid: int, on: bool = True) -> None:
    """Tell the reaper about a process group (an instance's API server leads its group and its
    session): it kills the group and the session when pdtui ends. The environment tag alone is not
    enough: vLLM's engine core and workers rename themselves (setproctitle), which on Linux
    overwrites what /proc/<pid>/environ shows. ``on=False`` once the group is gone (pids recycle)."""
    if _reaper is None or _reaper.stdin is None or _reaper.poll() is not None:
        return
    with contextlib.suppress(OSError, ValueError):
        _reaper.stdin.write(f"{'+' if on else '-'}{pgid}\n".encode())
        _reaper.stdin.flush()


def session_processes(sids: set[int]) -> list[int]:
    """Live processes whose session id is in ``sids`` (children that left the group keep it)."""
    out = []
    for pid in _other_pids():
        st = proc_stat(pid)
        if st is not None and st[2] in sids and st[0] not in ("Z", "X"):
            out.append(pid)
    return out


class Instance:
    """One supervised vLLM server."""

    def __init__(
        self,
        spec: LaunchSpec,
        emit: Callable[[Event], None],
        *,
        ready_timeout_s: float = 600.0,
        stop_grace_s: float = 10.0,
        side_channel_port: int | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.role = spec.role
        self.url = spec.url
        self._emit = emit
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self.host = host
        self.port = port
        self.side_channel_port = side_channel_port
        self.extra_env = extra_env or {}
        self.state = "stopped"
        self.proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.log_tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._reader: asyncio.Task[None] | None = None
        self._waiter: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()
        self._expected_exit: str | None = None
        self.log_path: Path | None = log_dir / f"{spec.name}.log" if log_dir else None
        """Every line the instance printed, across restarts: the evidence a crash leaves."""
        self._log_file: Any = None
        self.generation = 0
        self.serial = next(_SERIALS)
        self.tag = ""
        self.members: dict[int, str] = {}
        """vLLM's engine-core and worker processes seen under the API server (pid -> title)."""
        self.scratch: Path | None = None
        """This start's temp folder (make_scratch), removed when the instance ends."""
        self.death: str | None = None
        """Which process died first, and how (an exit nobody asked for)."""

    # ----- state --------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.alive

    kill_means = "SIGKILL to its process group"
    """What a kill does, for the Runtime's notice (an attached instance runs the user's command)."""

    @property
    def after_death(self) -> str:
        """What follows its death, for the Runtime's notice."""
        return f"all its processes were killed. Restart it with r/R or `pdtui ctl restart {self.name}`"

    def refuses(self, verb: str) -> str | None:
        """Why ``verb`` (kill, restart) cannot be done: never, for an instance pdtui launched."""
        return None

    def _set_state(self, state: str, detail: str = "", **kw: Any) -> None:
        self.state = state
        elapsed = time.monotonic() - self.started_at if self.started_at else None
        self._emit(
            InstanceStateChanged(
                instance=self.name, role=self.role, state=state, pid=self.pid, detail=detail,
                elapsed_s=round(elapsed, 3) if elapsed is not None else None, **kw,
            )
        )

    def tail(self, n: int = 40) -> str:
        return "\n".join(list(self.log_tail)[-n:])

    def last_error(self) -> str | None:
        """The last exception line of the log (``RuntimeError: ...``), the usual root cause."""
        for line in reversed(self.log_tail):
            parsed = logparse.parse_line(line)
            if parsed and parsed.what == "engine_error" and "root cause above" not in parsed.text:
                return parsed.text
        return None

    def _failure(self, what: str) -> str:
        cause = self.last_error()
        return (f"{self.name} ({self.role}) {what}." + (f"\nCause: {cause}" if cause else "")
                + f"\nLast log lines:\n{self.tail()}")

    # ----- lifecycle ----------------------------------------------------------------------
    def check_ports(self) -> None:
        if self.port:
            check_port_free(self.host, self.port, f"{self.name} ({self.role}) HTTP")
        if self.side_channel_port:
            check_port_free(self.host, self.side_channel_port, f"{self.name} ({self.role}) NIXL side channel")

    async def _wait_ports_free(self, timeout_s: float) -> None:
        """Ports of a process killed a moment ago are released as it is reaped: wait a bounded
        moment before calling them taken."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.check_ports()
                return
            except PortInUse:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def spawn(self) -> None:
        """Launch the process (not waiting for readiness)."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        if self._waiter is not None and not self._waiter.done():
            # the last death's clean-up is still killing and reaping: let it finish first, or its
            # end would be taken for the new process's, and its orphans would still hold the ports
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._waiter), 20)
        await self._wait_ports_free(5.0)
        ensure_reaper()
        self.generation += 1
        # unique to this start of this Instance: two Runtimes in one process (tests, scripts) may
        # both have a "P"; one's clean-up must not take the other's processes (CI: it did)
        self.tag = f"{RUN_TAG}:{self.name}#{self.serial}:{self.generation}"
        self.scratch = make_scratch(self.name, self.generation)
        env = scratch_env(self.scratch, {**os.environ, **self.spec.env, **self.extra_env, TAG_VAR: self.tag})
        self.members = {}
        self.death = None
        self._exited = asyncio.Event()
        self._expected_exit = None
        self.exit_code = None
        self.ready_at = None
        self.log_tail.clear()
        self.started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *self.spec.argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            limit=1 << 20,
        )
        self.pid = self.proc.pid
        reaper_watch(self.pid)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self.log_path.open("a", buffering=1)
            self._log_file.write(f"===== pdtui: {self.name} ({self.role}) started, pid {self.pid},"
                                 f" {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(self.spec.argv)}\n")
        self._set_state("starting", f"pid {self.pid}")
        self._reader = asyncio.create_task(self._read_logs(self.proc), name=f"{self.name}-logs")
        self._waiter = asyncio.create_task(self._watch(self.proc), name=f"{self.name}-watch")

    async def start(self, client: httpx.AsyncClient | None = None) -> float:
        """Launch and wait until /health answers. Returns the ready time in seconds."""
        await self.spawn()
        return await self.wait_ready(client)

    async def wait_ready(self, client: httpx.AsyncClient | None = None) -> float:
        own = client is None
        client = client or httpx.AsyncClient(timeout=httpx.Timeout(2.0))
        assert self.started_at is not None
        deadline = self.started_at + self.ready_timeout_s
        try:
            while True:
                if self._exited.is_set():
                    raise StartupFailed(self._failure(f"exited with code {self.exit_code} during start-up"))
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.get(f"{self.url}/health", timeout=2.0)
                    if r.status_code == 200:
                        break
                if time.monotonic() > deadline:
                    await self.kill(reason="not ready in time")
                    raise StartupFailed(self._failure(
                        f"did not answer {self.url}/health within {self.ready_timeout_s:.0f} s"))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._exited.wait(), timeout=0.5)
        finally:
            if own:
                await client.aclose()
        self.ready_at = time.monotonic()
        elapsed = self.ready_at - self.started_at
        self._set_state("ready", f"/health 200 after {elapsed:.1f} s")
        return elapsed

    async def _read_logs(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        feed = logparse.LogFeed(self.name, self._emit, self.log_tail, self._end_of)
        try:
            while True:
                try:
                    raw = await proc.stdout.readline()
                except ValueError:  # a line over the limit: take what is there
                    raw = await proc.stdout.read(1 << 16)
                if not raw:
                    return
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if self._log_file is not None:
                    with contextlib.suppress(OSError, ValueError):
                        self._log_file.write(line + "\n")
                feed.feed(line)
        finally:
            feed.close()

    def _end_of(self, cause: str) -> None:
        """A part of the engine it cannot serve without died (logparse.FATAL), while the process
        lives on: end the instance, as if that part had been a process (the watcher kills and
        reports it, and a restart brings it back)."""
        if self.death is None and self.alive and self._expected_exit is None:
            self.death = f"its {cause}"

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """Death is seen from the processes, never from the pipes: on Python 3.11 ``proc.wait()``
        returns only once the output pipe closes, and an orphaned EngineCore holds it open (with
        the HTTP and NIXL ports) for as long as it lives. Every WATCH_INTERVAL_S: has the API
        server exited (its return code, set by the child watcher), or has any engine-core/worker
        process seen under it died? The first death ends the instance: every process of it is
        killed (its group, the engine processes seen, anything carrying its tag), and it is
        reported as exited with the signal or code and what died first."""
        pid = proc.pid
        tick = 0
        while proc.returncode is None and self.death is None:
            dead = [(p, t) for p, t in self.members.items() if not is_alive(p)]
            if dead and self._expected_exit is None:
                causes = [(p, t, await self._cause(p, None)) for p, t in dead[:3]]  # bounded: 0.6 s each
                p, t, cause = first_cause(causes)
                self.death = f"its {t} (pid {p}) died{cause}"
                break
            if tick % 4 == 0:  # new engine processes appear during start-up: look once a second
                with contextlib.suppress(OSError):
                    self.members.update(engine_processes(pid))
            tick += 1
            await asyncio.sleep(WATCH_INTERVAL_S)
        if proc.returncode is not None and self.death is None and self._expected_exit is None:
            rc = proc.returncode
            status = (-rc) if rc < 0 else (rc << 8)
            self.death = f"its API server (pid {pid}) exited" + await self._cause(pid, status)
        if self._expected_exit is None:
            # Say so at once: the proxy stops sending to it and ends its streams now, not after
            # the clean-up below (a process with GiBs of KV pool takes a while to be torn down).
            self._set_state("exited", f"exited unexpectedly: {self.death}", exit_code=proc.returncode)
        # Whatever died first, nothing of this instance may outlive it.
        await asyncio.to_thread(functools.partial(kill_family, self.tag, {pid}, list(self.members), 5.0, exact=True))
        if not session_processes({pid}):
            reaper_watch(pid, on=False)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        for _ in range(40):  # the API server's return code arrives from the child watcher
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        if self._reader:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout=1.0)
            self._reader.cancel()
        if self._log_file is not None:
            code = proc.returncode
            if self._expected_exit is not None:
                end = f"stopped as pdtui asked ({self._expected_exit}); the API server exited with " + (
                    death_words.describe_status(-code if code < 0 else code << 8) if code is not None else "an unknown status")
            else:
                end = f"DIED: {self.death}"
            with contextlib.suppress(OSError, ValueError):
                self._log_file.write(f"===== pdtui: {self.name} {end}\n")
                self._log_file.close()
            self._log_file = None
        code = proc.returncode
        self.exit_code = code
        if self._expected_exit is not None:
            how = self._expected_exit
            if code is not None and code < 0:
                how += f" (signal {signal.Signals(-code).name})"
            self._set_state("exited", how, exit_code=code)
        self._exited.set()

    async def _cause(self, pid: int, status: int | None) -> str:
        """How ``pid`` died, in words, for ``self.death``: ``" with signal SIGILL (illegal
        instruction: ...) in cpu_attention_with_kv_cache (vllm/_custom_ops.py:1234)"``. ``status``:
        its wait status when pdtui reaped it (the API server); else read from /proc while it is a
        zombie, before vLLM reaps it (bounded: 0.3 s), and from the crash report in the log."""
        for _ in range(6):
            if status is not None:
                break
            status = death_words.wait_status(pid)
            if status is None:
                await asyncio.sleep(0.05)
        sig = death_words.signal_name(status & 0x7F) if status is not None and status & 0x7F else None
        crash = None
        if sig is None or sig in ("SIGILL", "SIGSEGV", "SIGABRT", "SIGBUS", "SIGFPE"):
            # faulthandler wrote its report before the signal ended the process; the log reader
            # may be a moment behind (bounded)
            for _ in range(6):
                crash = death_words.crash_report(self.log_tail)
                if crash is not None:
                    break
                await asyncio.sleep(0.05)
        if sig == "SIGKILL":
            return " with signal " + await asyncio.to_thread(death_words.killed_words, pid)
        if sig is not None:
            where = f" in {crash.where}" if crash is not None and crash.where and crash.signal == sig else ""
            return f" with signal {death_words.words(sig)}{where}"
        if status is not None:
            return f" with {death_words.describe_status(status)}"
        if crash is not None:
            return f": {crash} (its crash report in the log)"
        return " (its status was reaped by vLLM before pdtui read it; no crash report in the log)"

    async def wait_exit(self, timeout: float | None = None) -> int | None:
        await asyncio.wait_for(self._exited.wait(), timeout)
        return self.exit_code

    async def stop(self, grace_s: float | None = None, reason: str = "stopped") -> int | None:
        """SIGTERM the group, wait the grace period, then SIGKILL the group."""
        if self.death is not None and not self._exited.is_set():  # dying: its clean-up is under way
            await asyncio.wait_for(self._exited.wait(), timeout=20.0)
        if not self.alive or self.pid is None:
            return self.exit_code
        self._expected_exit = reason
        self._set_state("stopping", reason)
        _signal_group(self.pid, signal.SIGTERM)
        grace = self.stop_grace_s if grace_s is None else grace_s
        try:
            await asyncio.wait_for(self._exited.wait(), timeout=grace)
        except TimeoutError:
            _signal_group(self.pid, signal.SIGKILL)
            await asyncio.wait_for(self._exited.wait(), timeout=10.0)
        return self.exit_code

    async def kill(self, reason: str = "killed") -> int | None:
        """SIGKILL the whole group at once (the failure drill)."""
        if self.death is not None and not self._exited.is_set():
            await asyncio.wait_for(self._exited.wait(), timeout=20.0)
        if not self.alive or self.pid is None:
            return self.exit_code
        self._expected_exit = reason
        _signal_group(self.pid, signal.SIGKILL)
        await asyncio.wait_for(self._exited.wait(), timeout=10.0)
        return self.exit_code

    async def restart(self, client: httpx.AsyncClient | None = None) -> float:
        await self.stop(reason="restarting")
        return await self.start(client)
