"""Control of a running pdtui: status, kill, restart, down, subscribe. One class for every way in.

``Control(runtime)`` holds the logic; the dashboard's keys (k/K, r/R), ``pdtui drill`` (which
presses those keys) and the control socket (``pdtui ctl``, ``pdtui attach``) all call the same
methods::

    control = runtime.control                 # a Runtime makes its own; Control(rt) for any other
    await control.status()                    # {"ok": true, "instances": [...], "proxy_url": ...}
    await control.kill("D")                   # SIGKILL D's process group, as the k key does
    await control.restart("D")                # stop, start, wait until /health answers (bounded)
    await control.down()                      # stop everything; the pdtui that serves it exits

Every answer is a JSON-able dict with ``ok``; a refusal raises ``ControlError`` (its ``code``:
``unknown_verb``, ``unknown_instance``, ``bad_request``, ``busy``, ``closed``, ``failed``,
``forbidden``, ``unavailable``: an attached instance without the user's --kill/--restart command).

The socket (``ControlServer``): a Unix socket at ``state_dir()/ctl/<proxy port>.sock`` (the proxy
port names a pdtui on this box), in a folder of mode 0700, the socket itself 0600, and every
connection's peer checked to be this user (SO_PEERCRED): nobody else on the box can kill your
engines. One JSON request line in (``{"verb": "kill", "instance": "D"}``), one JSON answer line
out; a restart sends progress lines (``{"progress": ...}``) before its answer. A stale socket
left by a pdtui that died is replaced once nothing answers on it; a live one is refused
(``ControlInUse``: another pdtui owns this proxy port). ``request()`` is the client side
(``pdtui.core.ctl_client``, light to import: `pdtui ctl` runs on a box whose cores the engines take).

A request line may also carry ``"read_only": true`` (a viewer that asked for no controls:
``kill``, ``restart`` and ``down`` are then refused, ``code: forbidden``) and ``"source": "pdtui
attach"`` (a short name shown in the notice a kill or restart leaves; default ``pdtui ctl``).

``subscribe`` (``pdtui attach``: the dashboard of a running service) streams instead of answering
once. First one header line::

    {"ok": true, "verb": "subscribe", "pid": ..., "run": {RunInfo's fields},
     "instances": [{"name", "role", "url", "state", "pid", "ready", "log", "ready_timeout_s",
                    "stop_grace_s"}, ...],
     "geometry": {KvGeometry's fields} | null, "broken": str | null, "log_dir": str | null,
     "t_start_age_s": float | null, "read_only": bool, "preamble": K, "history": N,
     "seq": S | null, "backlog": B}

then K preamble events: those that say how things stand but have left the bounded history (the
run's RuntimeStarted, ProxyStarted, the last PairReady or PairBroken, each instance's last start,
its state and its connector milestones since; none while the history still holds them), then the
N events of the Runtime's ``history`` (bounded), one ``Event.to_json()`` line each
(``pdtui.core.events.from_json`` reads them), then every event from then on, as it comes. The
history is copied in the same step of the loop as the subscription is made, so no event falls
between the two and none comes twice. ``seq`` numbers the first history event (the events this
Control has observed, counted from 1; the live ones follow on), so a viewer that reconnects skips
what it already has and can tell what it missed; null when the source does not feed ``observe``.
Lines that are not events have no ``"event"`` key; the last one says why the stream ends:
``{"ok": true, "verb": "subscribe", "end": "closed", "reason": ...}`` when the run closed, or
``{"ok": false, "verb": "subscribe", "end": "overflow", "code": "overflow", "error": ...}`` when
the viewer fell more than ``backlog`` events behind: each subscriber has a bounded backlog of its
own, and a slow one is dropped, never waited for (the Runtime's ``emit`` never blocks on a
viewer). A viewer that hangs up ends its stream; nothing else changes.

``ControlTcpServer`` serves the same protocol on TCP (``pdtui up --listen HOST:PORT``): the first
line of every connection carries ``"token"``, compared in constant time; a missing or wrong one is
answered ``{"ok": false, "code": "forbidden", ...}`` and the connection closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdtui.core.ctl_client import MAX_SOCKET_PATH, NotListening, default_socket_path, probe, request, socket_dir
from pdtui.core.events import (
    ConnectorEvent,
    Event,
    InstanceStateChanged,
    Notice,
    PairBroken,
    PairReady,
    ProxyStarted,
    RuntimeStarted,
    RuntimeStopped,
)
from pdtui.core.supervisor import PortInUse

if TYPE_CHECKING:
    from pdtui.core.source import Source

VERBS = ("status", "kill", "restart", "down", "subscribe")
CONTROLS = ("kill", "restart", "down")
"""The verbs a read-only connection may not use."""
STREAM_BACKLOG = 10_000
"""Events a subscriber may fall behind before the server drops it (some 50 s at 200 events/s)."""


class ControlError(Exception):
    """A request refused or failed; ``code`` says which kind, the message says what to do."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code

    def answer(self) -> dict[str, Any]:
        return {"ok": False, "code": self.code, "error": str(self)}


class ControlInUse(PortInUse):
    """Another pdtui answers on this control socket: it owns this proxy port."""


class Control:
    """The operations on a running pair, over its :class:`pdtui.core.source.Source` (the live
    Runtime, a replay, the tests' fake)."""

    read_only = False
    """Every operation is allowed here (pdtui.core.source.Controls; a remote viewer's may not be)."""

    def __init__(self, runtime: Source, *, socket_path: Path | None = None) -> None:
        self.runtime = runtime
        self.socket_path = socket_path
        """Set by the ControlServer serving this Control (shown in status)."""
        self.tcp_address: str | None = None
        """Set by a ControlTcpServer serving this Control (host:port, shown in status)."""
        self.seq = 0
        """How many events ``observe`` was fed: the number of the last one (subscribe's ``seq``)."""
        self.extra_status: dict[str, Callable[[], Any]] = {}
        """More of ``status``, from the host: key -> a function of nothing giving a JSON-able value
        (headless `up`: ``stdout``, its events written and dropped, LineSink.counts)."""
        self._streams: set[asyncio.Task[Any]] = set()
        self._standing: dict[tuple[str, ...], tuple[int, Event]] = {}
        self._down_handlers: list[Callable[[], Any]] = []
        self._restarting: dict[str, asyncio.Task[float]] = {}
        self.down_requested = False
        self._observed = False
        self._last_exit: dict[str, dict[str, Any]] = {}
        self._starts: dict[str, int] = {}
        self._pair_ready_s: float | None = None

    def observe(self, ev: Any) -> None:
        """Fed every event by the Runtime (its emit): the last exit of each instance and how many
        times it started, kept for ``status`` however long the run (the history is bounded). A
        runtime that does not feed it is read from its ``history`` instead."""
        self._observed = True
        self.seq += 1
        if isinstance(ev, InstanceStateChanged):
            if ev.state == "exited":
                self._last_exit[ev.instance] = _exit_of(ev)
            elif ev.state == "starting":
                self._starts[ev.instance] = self._starts.get(ev.instance, 0) + 1
        elif isinstance(ev, PairReady):
            self._pair_ready_s = ev.elapsed_s
        self._keep_standing(ev)

    def _keep_standing(self, ev: Event) -> None:
        """The events that say how things stand however old they are: the run's start, the
        proxy's, the pair's ready or broken, each instance's last start, its state and its
        connector milestones since. A viewer that subscribes after they left the bounded history
        gets them first (subscribe's preamble), so its header and panes are not blank."""
        keep = self._standing
        if isinstance(ev, RuntimeStarted):
            keep.clear()
            keep[("run",)] = (self.seq, ev)
        elif isinstance(ev, ProxyStarted):
            keep[("proxy",)] = (self.seq, ev)
        elif isinstance(ev, (PairReady, PairBroken)):
            keep[("pair",)] = (self.seq, ev)
        elif isinstance(ev, InstanceStateChanged):
            if ev.state == "starting":  # a new process: its milestones over again
                for key in [k for k in keep if k[0] == "connector" and k[1] == ev.instance]:
                    del keep[key]
                keep[("start", ev.instance)] = (self.seq, ev)
            keep[("state", ev.instance)] = (self.seq, ev)
        elif isinstance(ev, ConnectorEvent) and ev.what != "kv_read":
            keep[("connector", ev.instance, ev.what)] = (self.seq, ev)

    def standing_before(self, seq: int) -> list[Event]:
        """The standing events (``_keep_standing``) older than event ``seq``, in their order."""
        return [ev for n, ev in sorted({n: ev for n, ev in self._standing.values()}.items()) if n < seq]

    # ----- names ----------------------------------------------------------------------------
    def resolve(self, which: str) -> str:
        """An instance name (``D``), its lower case (``d``) or a role (``decode``: the first one)."""
        instances = self.runtime.instances
        if which in instances:
            return which
        for name in instances:
            if name.lower() == str(which).lower():
                return name
        for name, inst in instances.items():
            if inst.role == which:
                return name
        have = ", ".join(f"{n} ({i.role})" for n, i in instances.items()) or "none"
        raise ControlError(f"no instance {which!r}; this pdtui has {have}", "unknown_instance")

    def _check_open(self) -> None:
        if self.runtime.closed:
            raise ControlError("this pdtui is shutting down", "closed")

    def _note(self, source: str | None, text: str, name: str | None = None) -> None:
        if source:
            self.runtime.emit(Notice(level="info", instance=name, text=f"{source}: {text}"))

    # ----- the operations -------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        rt = self.runtime
        deaths, starts, pair_ready_s = self._last_exit, self._starts, self._pair_ready_s
        if not self._observed:
            deaths, starts = {}, {}
            for ev in reversed(list(rt.history)):
                if isinstance(ev, InstanceStateChanged):
                    if ev.state == "exited" and ev.instance not in deaths:
                        deaths[ev.instance] = _exit_of(ev)
                    elif ev.state == "starting":
                        starts[ev.instance] = starts.get(ev.instance, 0) + 1
                elif isinstance(ev, PairReady) and pair_ready_s is None:
                    pair_ready_s = ev.elapsed_s
        instances = []
        for name, inst in rt.instances.items():
            log_path = inst.log_path
            instances.append({
                "name": name, "role": inst.role, "state": inst.state, "pid": inst.pid, "url": inst.url,
                "ready": inst.ready,
                "restarting": name in self._restarting, "restarts": max(0, starts.get(name, 0) - 1),
                "log": str(log_path) if log_path else None, "last_death": deaths.get(name)})
        t_start, log_dir = rt.t_start, rt.log_dir
        return {
            "ok": True, "verb": "status", "pid": os.getpid(), "profile": rt.run.profile,
            "model": rt.run.model_name, "proxy_url": rt.run.proxy_url,
            "run_dir": str(log_dir) if log_dir else None,
            "uptime_s": round(time.monotonic() - t_start, 1) if t_start is not None else None,
            "pair_ready_s": pair_ready_s, "pair_broken": rt.broken, "closing": rt.closed,
            "socket": str(self.socket_path) if self.socket_path else None, "tcp": self.tcp_address,
            "viewers": len(self._streams), "instances": instances,
            **{key: fn() for key, fn in self.extra_status.items()}}

    async def kill(self, which: str, *, source: str | None = None) -> dict[str, Any]:
        """SIGKILL the instance's process group: the dashboard's k/K."""
        self._check_open()
        name = self.resolve(which)
        inst = self.runtime.instances[name]
        was = inst.state
        self._note(source, f"kill {name}", name)
        # the key keeps the Runtime's own wording; another source is named in the exit it leaves
        code = await (self.runtime.kill(name, reason=f"killed by {source}") if source else self.runtime.kill(name))
        return {"ok": True, "verb": "kill", "instance": name, "role": inst.role, "was": was,
                "exit_code": code, "state": inst.state}

    async def restart(self, which: str, *, source: str | None = None, timeout_s: float | None = None,
                      progress: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
        """Stop the instance (if up), start it, wait until it is ready. Bounded by ``timeout_s``
        (default: the instance's ready timeout plus its stop grace, plus 15 s); at the bound the
        answer is an error but the start goes on (the instance's own ready timeout ends it).
        ``progress`` gets a dict at each state the instance passes (stopping, starting, ...)."""
        self._check_open()
        name = self.resolve(which)
        if name in self._restarting:
            raise ControlError(f"{name} is already restarting", "busy")
        inst = self.runtime.instances[name]
        if timeout_s is None:
            timeout_s = (inst.ready_timeout_s or self.runtime.run.ready_timeout_s) + inst.stop_grace_s + 15
        self._note(source, f"restart {name}", name)
        t0 = time.monotonic()
        was = (inst.state, inst.pid)
        task = asyncio.ensure_future(self.runtime.restart(name))
        self._restarting[name] = task
        task.add_done_callback(lambda t: self._restart_done(name, t))
        await asyncio.sleep(0)  # its first step: a refusal (an attached instance without --restart) ends it here
        seen: tuple[Any, Any] | None = None
        deadline = t0 + timeout_s
        first = True
        while not task.done():
            now, first = (was if first else (inst.state, inst.pid)), False
            if progress is not None and now != seen:
                text = (f"restarting {name} (it was {now[0]})" if seen is None
                        else f"{name} {now[0]}" + (f" (pid {now[1]})" if now[0] == "starting" else ""))
                seen = now
                with contextlib.suppress(Exception):
                    progress({"progress": text,
                              "instance": name, "state": now[0], "pid": now[1],
                              "elapsed_s": round(time.monotonic() - t0, 1)})
            if time.monotonic() > deadline:
                raise ControlError(f"{name} not ready within {timeout_s:g} s (state {now[0]}); its start goes on:"
                                   f" see `pdtui ctl status`", "timeout")
            await asyncio.wait({task}, timeout=0.2)
        try:
            ready_s = task.result()
        except ControlError:  # refused (an attached instance without --restart), or its command failed
            raise
        except Exception as e:  # StartupFailed: the message carries the cause and the log tail
            raise ControlError(f"{name} did not come back: {e}", "failed") from e
        return {"ok": True, "verb": "restart", "instance": name, "role": inst.role,
                "ready_s": round(ready_s, 3), "pid": inst.pid, "state": inst.state,
                "elapsed_s": round(time.monotonic() - t0, 3)}

    def _restart_done(self, name: str, task: asyncio.Task[float]) -> None:
        self._restarting.pop(name, None)
        if not task.cancelled():
            task.exception()  # retrieved: a start that failed after a timed-out answer is not "never retrieved"

    def on_down(self, handler: Callable[[], Any]) -> None:
        """Call ``handler`` once ``down()`` has stopped everything (the pdtui that serves exits)."""
        self._down_handlers.append(handler)

    async def down(self, *, source: str | None = None, notify: bool = True) -> dict[str, Any]:
        """Stop the engines and the proxy, then tell whoever runs this pdtui to exit
        (``notify=False``: the caller calls ``notify_down()`` itself, after answering)."""
        self.down_requested = True
        self._note(source, "down: stopping everything")
        t0 = time.monotonic()
        names = list(self.runtime.instances)
        await self.runtime.aclose(reason=f"{source}: down" if source else "down")
        if notify:
            self.notify_down()
        return {"ok": True, "verb": "down", "pid": os.getpid(), "stopped": names,
                "elapsed_s": round(time.monotonic() - t0, 3)}

    def notify_down(self) -> None:
        handlers, self._down_handlers = self._down_handlers, []
        for handler in handlers:
            with contextlib.suppress(Exception):
                handler()

    async def wait_streams(self, timeout_s: float = 2.0) -> None:
        """Once the run is closed: wait (bounded) until every subscriber has been sent its last
        line, so that a pdtui that exits next does not cut them off before ``end``."""
        if self._streams:
            await asyncio.wait(set(self._streams), timeout=timeout_s)

    # ----- one request, as the socket gets it ------------------------------------------------
    async def handle(self, request: Any, *, source: str | None = "pdtui ctl",
                     progress: Callable[[dict[str, Any]], Any] | None = None, notify: bool = True) -> dict[str, Any]:
        """Answer one request dict (``{"verb": ..., "instance": ...}``); errors become answers.
        The request's own ``source`` (a short name) replaces ``source``; ``read_only`` refuses
        the controls."""
        try:
            if not isinstance(request, dict):
                raise ControlError("a request is a JSON object, e.g. {\"verb\": \"status\"}", "bad_request")
            verb = request.get("verb")
            if verb not in VERBS:
                raise ControlError(f"unknown verb {verb!r}; one of: {', '.join(VERBS)}", "unknown_verb")
            if verb in CONTROLS and request.get("read_only"):
                raise ControlError(f"{verb} refused: this is a read-only viewer (attached with --read-only)",
                                   "forbidden")
            named = request.get("source")
            if isinstance(named, str) and 0 < len(named) <= 40 and named.isprintable():
                source = named
            if verb == "subscribe":
                raise ControlError("subscribe streams events: ask it of the control socket (pdtui attach)",
                                   "bad_request")
            if verb in ("kill", "restart"):
                which = request.get("instance")
                if not isinstance(which, str) or not which:
                    raise ControlError(f"{verb} needs an instance, e.g. {{\"verb\": \"{verb}\", \"instance\": \"D\"}}",
                                       "bad_request")
                if verb == "kill":
                    return await self.kill(which, source=source)
                timeout = request.get("timeout_s")
                if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
                    raise ControlError(f"timeout_s = {timeout!r}: a positive number of seconds", "bad_request")
                return await self.restart(which, source=source, timeout_s=timeout, progress=progress)
            if verb == "down":
                return await self.down(source=source, notify=notify)
            return await self.status()
        except ControlError as e:
            return {**e.answer(), "verb": request.get("verb") if isinstance(request, dict) else None}


def _exit_of(ev: InstanceStateChanged) -> dict[str, Any]:
    return {"t": ev.t, "at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev.t)), "exit_code": ev.exit_code,
            "detail": ev.detail, "unexpected": ev.detail.startswith("exited unexpectedly")}


# ----- the socket ------------------------------------------------------------------------------


def prepare_dir(path: Path) -> None:
    """Make the socket's folder, mode 0700, owned by this user (refuse one that is not)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a plain folder: refusing to put a control socket there")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to you ({os.getuid()}): refusing to"
                              " put a control socket there")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _check_length(path: Path) -> None:
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise OSError(f"control socket path too long for a Unix socket ({len(str(path))} > {MAX_SOCKET_PATH}"
                      f" bytes): {path}; set PDTUI_HOME to a shorter folder")


class _Listener:
    """What the Unix and the TCP listeners share: one request line per connection, answered by
    the Control; ``subscribe`` streams (the module's docstring). A subclass says who may ask
    (``_refusal``)."""

    def __init__(self, control: Control, *, backlog: int = STREAM_BACKLOG) -> None:
        self.control = control
        self.backlog = backlog
        """Events one subscriber may fall behind before it is dropped."""
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def serving(self) -> bool:
        return self._server is not None

    def _refusal(self, writer: asyncio.StreamWriter, req: Any) -> str | None:
        """Why this peer may not ask anything (None: it may)."""
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        after: Callable[[], None] | None = None

        async def send(obj: dict[str, Any]) -> None:
            writer.write((json.dumps(obj, default=str) + "\n").encode())
            await writer.drain()

        def progress(obj: dict[str, Any]) -> None:
            if not writer.is_closing():
                writer.write((json.dumps(obj, default=str) + "\n").encode())

        try:
            bad: Exception | None = None
            req: Any = None
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=10.0)
                req = json.loads(line) if line.strip() else None
            except (TimeoutError, ValueError) as e:
                bad = e
            # read first: the refusal is not lost to a reset
            if (why := self._refusal(writer, req)) is not None:
                await send({"ok": False, "code": "forbidden", "error": why})
                return
            if bad is not None:
                await send({"ok": False, "code": "bad_request", "error": f"expected one JSON line: {bad}"})
                return
            if isinstance(req, dict):
                req.pop("token", None)  # never passed on, never echoed
            if isinstance(req, dict) and req.get("verb") == "subscribe":
                await self._stream(req, reader, writer)
                return
            is_down = isinstance(req, dict) and req.get("verb") == "down"
            answer = await self.control.handle(req, progress=progress, notify=not is_down)
            if is_down and answer.get("ok"):
                after = self.control.notify_down
            await send(answer)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # the loop is closing with this connection open (a viewer's stream): end quietly. Python
            # 3.11's start_unix_server callback calls task.exception() on a cancelled task and logs
            # the CancelledError it raises as "Exception in callback"
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                try:
                    await asyncio.wait_for(writer.wait_closed(), 2.0)
                except TimeoutError:  # a viewer that reads nothing more: drop what is left for it
                    writer.transport.abort()
            if task is not None:
                self._handlers.discard(task)
            if after is not None:  # the answer is out: now the pdtui may exit
                after()

    # ----- subscribe --------------------------------------------------------------------------
    async def _stream(self, req: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The header, the history, then the live events, until the run closes, the viewer hangs
        up or falls ``backlog`` events behind (module docstring)."""
        control, rt = self.control, self.control.runtime
        if rt.closed:
            writer.write((json.dumps({**ControlError("this pdtui is shutting down", "closed").answer(),
                                      "verb": "subscribe"}) + "\n").encode())
            return
        task = asyncio.current_task()
        if task is not None:
            control._streams.add(task)
        # the subscription and the copy of the history in one step of the loop: an event is in
        # one or the other, never in both, never in neither
        events = rt.subscribe()
        history = list(rt.history)
        first_seq = control.seq - len(history) + 1 if control._observed else None
        preamble = control.standing_before(first_seq) if first_seq is not None else []
        t_start = rt.t_start
        header = {
            "ok": True, "verb": "subscribe", "pid": os.getpid(), "run": dataclasses.asdict(rt.run),
            "instances": [{"name": name, "role": inst.role, "url": inst.url, "state": inst.state, "pid": inst.pid,
                           "ready": inst.ready, "log": str(inst.log_path) if inst.log_path else None,
                           "ready_timeout_s": inst.ready_timeout_s, "stop_grace_s": inst.stop_grace_s}
                          for name, inst in rt.instances.items()],
            "geometry": dataclasses.asdict(rt.geometry) if rt.geometry is not None else None,
            "broken": rt.broken, "log_dir": str(rt.log_dir) if rt.log_dir else None,
            "t_start_age_s": round(time.monotonic() - t_start, 3) if t_start is not None else None,
            "read_only": bool(req.get("read_only")), "preamble": len(preamble), "history": len(history),
            "seq": first_seq, "backlog": self.backlog}
        backlog: collections.deque[Event] = collections.deque()
        wake = asyncio.Event()
        end: list[dict[str, Any]] = []
        stopped: list[str] = []

        overflowed = asyncio.Event()

        async def pump() -> None:
            """Moves the events into this viewer's bounded backlog; never waits on the viewer. Past
            the bound it drops them until it is cancelled (which ends the subscription)."""
            try:
                async for ev in events:
                    if overflowed.is_set():
                        continue
                    if len(backlog) >= self.backlog:
                        end.append({"ok": False, "verb": "subscribe", "end": "overflow", "code": "overflow",
                                    "error": f"this viewer fell {self.backlog} events behind: the service dropped"
                                    " it (the service runs on)"})
                        overflowed.set()
                        continue
                    if isinstance(ev, RuntimeStopped):
                        stopped.append(ev.reason)
                    backlog.append(ev)
                    wake.set()
                end.append({"ok": True, "verb": "subscribe", "end": "closed",
                            "reason": stopped[-1] if stopped else "closed"})
            finally:
                wake.set()

        async def write() -> None:
            writer.write((json.dumps(header, default=str) + "\n").encode())
            writer.write("".join(ev.to_json() + "\n" for ev in preamble).encode())
            for i in range(0, len(history), 256):
                writer.write("".join(ev.to_json() + "\n" for ev in history[i:i + 256]).encode())
                await writer.drain()
            while True:
                if backlog:
                    lines = [backlog.popleft().to_json() for _ in range(min(len(backlog), 256))]
                    writer.write(("\n".join(lines) + "\n").encode())
                    await writer.drain()
                    continue
                if end and end[0]["end"] == "closed":
                    return
                wake.clear()
                await wake.wait()

        async def hung_up() -> None:
            while await reader.read(4096):
                pass

        pumping = asyncio.ensure_future(pump())  # first: it is iterating before anything can cancel it
        writing = asyncio.ensure_future(write())
        hangup = asyncio.ensure_future(hung_up())
        dropped = asyncio.ensure_future(overflowed.wait())
        try:
            waiting = {pumping, writing, hangup, dropped}
            while True:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if hangup in done or writing in done or dropped in done:
                    break  # the viewer hung up or broke the connection, all is written (closed), or overflow
                waiting.discard(pumping)  # the run closed: the writer sends what is left
            gone = hangup.done() or (writing.done() and (writing.cancelled() or writing.exception() is not None))
            if end and not gone:
                writing.cancel()  # overflow: what is still queued is dropped (it stays in the history)
                with contextlib.suppress(BaseException):
                    await writing
                writer.write((json.dumps(end[0]) + "\n").encode())
        finally:
            for t in (pumping, writing, hangup, dropped):
                t.cancel()
            for t in (pumping, writing, hangup, dropped):
                with contextlib.suppress(BaseException):
                    await t
            if task is not None:
                control._streams.discard(task)


class ControlServer(_Listener):
    """Serves a Control on a Unix socket in the running loop (see the module's docstring)."""

    def __init__(self, control: Control, path: Path, *, backlog: int = STREAM_BACKLOG) -> None:
        super().__init__(control, backlog=backlog)
        self.path = Path(path)
        self._inode: int | None = None

    async def start(self) -> ControlServer:
        _check_length(self.path)
        prepare_dir(self.path.parent)
        if self.path.exists() or self.path.is_symlink():
            st = os.lstat(self.path)
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"{self.path} exists and is not a socket: refusing to replace it")
            found = await asyncio.to_thread(probe, self.path, 2.0)
            if found is not None:
                who = f"pid {found.get('pid')}, proxy {found.get('proxy_url')}" if found else "it does not say who"
                raise ControlInUse(f"another pdtui answers on the control socket {self.path} ({who}): it owns this"
                                   " proxy port. Stop it (`pdtui ctl down`) or run beside it with --port-offset N.")
            self.path.unlink()  # stale: a pdtui that died without removing it
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=1 << 16)
        os.chmod(self.path, 0o600)
        self._inode = os.stat(self.path).st_ino
        self.control.socket_path = self.path
        return self

    def close(self) -> None:
        """Stop listening and remove the socket file (if it is still ours). Connections being
        answered (a ``down`` in progress, the subscribers until the run closes) finish on their own."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._inode is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    self.path.unlink()
            self._inode = None

    def _refusal(self, writer: asyncio.StreamWriter, req: Any) -> str | None:
        uid = _peer_uid(writer)
        if uid is not None and uid != os.getuid():
            return f"uid {uid} may not control this pdtui"
        return None


class ControlTcpServer(_Listener):
    """Serves a Control on TCP (``pdtui up --listen``): every connection's first line carries
    ``"token"``, compared in constant time; nothing is served without it."""

    def __init__(self, control: Control, host: str, port: int, token: str, *, backlog: int = STREAM_BACKLOG) -> None:
        super().__init__(control, backlog=backlog)
        if len(token) < 16:
            raise ValueError("a token of at least 16 characters")
        self.host, self.port = host, port
        self._digest = hashlib.sha256(token.encode()).digest()

    async def start(self) -> ControlTcpServer:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=1 << 16)
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        self.control.tcp_address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            self.control.tcp_address = None

    def _refusal(self, writer: asyncio.StreamWriter, req: Any) -> str | None:
        token = req.get("token") if isinstance(req, dict) else None
        if not isinstance(token, str) or not token:
            return ("this listener needs a token: the request line carries \"token\" (pdtui attach --connect"
                    " HOST:PORT --token-file FILE)")
        # equal-length digests, compared in constant time: the answer's timing says nothing of the token
        if not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._digest):
            return "wrong token"
        return None


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
    except OSError:
        return None
    return uid


__all__ = ["CONTROLS", "STREAM_BACKLOG", "VERBS", "Control", "ControlError", "ControlInUse", "ControlServer",
           "ControlTcpServer", "NotListening",
           "default_socket_path", "probe", "request", "socket_dir"]
