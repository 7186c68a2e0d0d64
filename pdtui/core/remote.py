"""RemoteSource: a pdtui service running in another process, as a :class:`pdtui.core.source.Source`.

``pdtui attach`` opens the dashboard on it; ``pdtui up --detach`` (or any ``pdtui up``) is the
service. It reads the control socket's ``subscribe`` stream (pdtui.core.control's docstring has
the lines) and forwards the operations to the same socket::

    remote = RemoteSource(default_socket_path(8000))   # or ("127.0.0.1", 8799), token=...
    await remote.connect()          # the header: run, instances, geometry; RemoteRefused, NotListening
    events = remote.subscribe()     # before start(), to see the history too
    await remote.start()            # the history (its events reach the subscribers), then live events
    await remote.control.kill("D")  # the service's Control does it (refused when read_only)
    await remote.aclose()           # hang up: the service and its other viewers run on

What the viewer does when the stream breaks: the service said it dropped this viewer (it fell
``backlog`` events behind) or the connection was lost without the stream's last line: a notice,
then it reconnects (for up to ``reconnect_s``) and takes the new history from where it was (the
header's ``seq``), saying how many events it missed if the history no longer reaches back that
far. If it cannot reconnect, a notice says so and the stream ends; the dashboard stays on what it
saw. The run closed (``down`` from anyone): the stream ends and ``on_down`` handlers run (the
dashboard exits).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdtui.core.control import ControlError
from pdtui.core.ctl_client import Address, NotListening, describe, request
from pdtui.core.events import (
    Event,
    EventHub,
    InstanceStateChanged,
    Notice,
    PairBroken,
    PairReady,
    RuntimeStarted,
    RuntimeStopped,
    from_dict,
)
from pdtui.core.kvmath import KvGeometry
from pdtui.core.source import RunInfo

LINE_LIMIT = 16 << 20
"""The longest line read (a trace with every gap of a long stream is some 30 KB)."""
SOURCE = "pdtui attach"
"""How this viewer names itself in the notices its kills and restarts leave."""


class RemoteRefused(ConnectionError):
    """The service answered, and refused (``code``: forbidden for a wrong or missing token, closed
    when it is shutting down)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class RemoteInstance:
    """An instance of the service, as its header and the InstanceStateChanged events say (InstanceView)."""

    name: str
    role: str
    url: str = ""
    state: str = "unknown"
    pid: int | None = None
    log_path: Path | None = None
    ready_timeout_s: float = 600.0
    stop_grace_s: float = 10.0

    @property
    def ready(self) -> bool:
        return self.state == "ready"


class RemoteControl:
    """The operations, forwarded to the service's control socket (pdtui.core.source.Controls):
    the dashboard's keys call it as they call a Control. Each request runs in a thread (the
    client is blocking), its progress lines passed back to the loop."""

    def __init__(self, source: RemoteSource) -> None:
        self.source = source
        self._down_handlers: list[Callable[[], Any]] = []

    @property
    def read_only(self) -> bool:
        return self.source.read_only

    async def _ask(self, req: dict[str, Any], *, timeout_s: float | None, source: str | None = None,
                   progress: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
        src = self.source
        if src.closed:
            raise ControlError(f"the service at {src.where} has stopped" if src.ended == "closed"
                               else "this viewer has hung up", "closed")
        loop = asyncio.get_running_loop()

        def on_progress(obj: dict[str, Any]) -> None:  # in the request's thread
            if progress is not None:
                loop.call_soon_threadsafe(_call_quietly, progress, obj)

        req = {**req, "source": source or SOURCE}
        if src.read_only:
            req["read_only"] = True  # the service refuses the controls itself (code forbidden)
        try:
            answer = await asyncio.to_thread(request, src.address, req, timeout_s=timeout_s,
                                             on_progress=on_progress, token=src.token)
        except NotListening as e:
            raise ControlError(str(e), "closed") from None
        except (OSError, ValueError) as e:
            raise ControlError(f"the service at {src.where}: {e}", "failed") from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            got = answer if isinstance(answer, dict) else {}
            raise ControlError(str(got.get("error") or f"unexpected answer {answer!r}"), str(got.get("code") or "failed"))
        return answer

    async def status(self) -> dict[str, Any]:
        return await self._ask({"verb": "status"}, timeout_s=15.0)

    async def kill(self, which: str, *, source: str | None = None) -> dict[str, Any]:
        return await self._ask({"verb": "kill", "instance": which}, timeout_s=60.0, source=source)

    async def restart(self, which: str, *, source: str | None = None, timeout_s: float | None = None,
                      progress: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
        req: dict[str, Any] = {"verb": "restart", "instance": which}
        if timeout_s is not None:
            req["timeout_s"] = timeout_s
        inst = self.source.instances.get(which)
        bound = timeout_s if timeout_s is not None else (
            (inst.ready_timeout_s + inst.stop_grace_s if inst else self.source.run.ready_timeout_s) + 15)
        return await self._ask(req, timeout_s=bound + 30, source=source, progress=progress)

    async def down(self, *, source: str | None = None, notify: bool = True) -> dict[str, Any]:
        """Stop the service (everything it runs). The ``on_down`` handlers run when its stream
        says the run closed, whoever asked (``notify`` is the local Control's concern)."""
        return await self._ask({"verb": "down"}, timeout_s=180.0, source=source)

    def on_down(self, handler: Callable[[], Any]) -> None:
        """Call ``handler`` once the service's run has closed (its stream's last line)."""
        self._down_handlers.append(handler)

    def notify_down(self) -> None:
        handlers, self._down_handlers = self._down_handlers, []
        for handler in handlers:
            _call_quietly(handler)


def _call_quietly(fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(Exception):
        fn(*args)


class RemoteSource:
    """A service's run seen through its control socket (module docstring). ``address``: the Unix
    socket's path, or (host, port) of a ``--listen`` with its ``token``."""

    def __init__(self, address: Address, *, token: str | None = None, read_only: bool = False,
                 reconnect_s: float = 10.0, timeout_s: float = 10.0, history_max: int = 20000) -> None:
        self.address = address
        self.where = describe(address)
        self.token = token
        self.read_only = read_only
        self.reconnect_s = reconnect_s
        self.timeout_s = timeout_s
        self.run = RunInfo(profile="?", model_name="?", proxy_url="", block_size=0)
        self.instances: dict[str, RemoteInstance] = {}
        self.geometry: KvGeometry | None = None
        self.history: collections.deque[Event] = collections.deque(maxlen=history_max)
        self.hub = EventHub()
        self.replay = False
        self.remote = True
        self.closed = False
        self.broken: str | None = None
        self.log_dir: Path | None = None
        self.t_start: float | None = None
        self.service_pid: int | None = None
        self.ended: str | None = None
        """Why the stream ended: closed (the run stopped), lost (no reconnection), left (aclose)."""
        self.end_reason: str | None = None
        self.reconnects = 0
        self.missed = 0
        """Events the service sent while this viewer was away and no longer had in its history."""
        self.control = RemoteControl(self)
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._seq: int | None = None
        self._follower: asyncio.Task[None] | None = None
        self._stopped: str | None = None

    # ----- Source -----------------------------------------------------------------------------
    def subscribe(self) -> AsyncIterator[Event]:
        return self.hub.subscribe()

    def emit(self, event: Event) -> None:
        """An event of this viewer's own (its notices): shown here, not sent to the service."""
        self._take(event, None)

    async def connect(self) -> dict[str, Any]:
        """Open the stream and read its header (run, instances, geometry): what the dashboard
        needs before it draws. Raises NotListening, RemoteRefused, or OSError/TimeoutError."""
        reader, writer, header = await self._open()
        self._apply_header(header)
        self._conn = (reader, writer, header)
        return header

    async def start(self) -> float:
        """Read the history (each event to the subscribers), then follow the live events in the
        background; 0.0 (the service was started elsewhere)."""
        if self._conn is None:
            await self.connect()
        assert self._conn is not None
        reader, writer, header = self._conn
        self._conn = None
        try:
            await self._take_history(reader, header)
        except BaseException:
            writer.close()
            raise
        self._follower = asyncio.create_task(self._follow(reader, writer), name="remote-events")
        return 0.0

    async def aclose(self, reason: str = "closed") -> None:
        """Hang up. The service, and every other viewer, runs on."""
        if self.closed and self._follower is None:
            return
        self.closed = True
        self.ended = self.ended or "left"
        if self._follower is not None and self._follower is not asyncio.current_task():
            self._follower.cancel()
            with contextlib.suppress(BaseException):
                await self._follower
        self._follower = None
        for writer in (self._writer, self._conn[1] if self._conn else None):
            if writer is not None:
                writer.close()
        self._conn = None
        self.hub.close()

    async def kill(self, name: str, reason: str = "killed") -> int | None:
        answer = await self.control.kill(name)
        code = answer.get("exit_code")
        return code if isinstance(code, int) else None

    async def restart(self, name: str) -> float:
        return float((await self.control.restart(name))["ready_s"])

    async def stop_instance(self, name: str) -> int | None:
        raise ControlError("the control socket has no verb that stops one instance: kill or restart it", "unknown_verb")

    # ----- the stream -------------------------------------------------------------------------
    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
        try:
            if isinstance(self.address, tuple):
                host, port = self.address
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, limit=LINE_LIMIT), self.timeout_s)
            else:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(self.address), limit=LINE_LIMIT), self.timeout_s)
        except FileNotFoundError:
            raise NotListening(f"no pdtui is listening on {self.where} (no socket there)") from None
        except ConnectionRefusedError:
            raise NotListening(f"no pdtui is listening on {self.where} (connection refused)") from None
        try:
            req: dict[str, Any] = {"verb": "subscribe", "source": SOURCE, "read_only": self.read_only}
            if self.token is not None:
                req["token"] = self.token
            writer.write((json.dumps(req) + "\n").encode())
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), self.timeout_s)
            if not line:
                raise ConnectionError(f"the pdtui on {self.where} closed the connection without an answer")
            header = json.loads(line)
            if not isinstance(header, dict) or not header.get("ok"):
                got = header if isinstance(header, dict) else {}
                raise RemoteRefused(f"the pdtui on {self.where} refused: {got.get('error') or header!r}",
                                    str(got.get("code") or "failed"))
        except BaseException:
            writer.close()
            raise
        self.service_pid = header.get("pid")
        return reader, writer, header

    def _apply_header(self, header: dict[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(RunInfo)}
        self.run = RunInfo(**{k: v for k, v in (header.get("run") or {}).items() if k in names})
        for spec in header.get("instances") or []:
            inst = self.instances.get(spec["name"])
            if inst is None:
                inst = self.instances[spec["name"]] = RemoteInstance(spec["name"], spec.get("role", "?"))
            inst.url = spec.get("url") or ""
            inst.state = spec.get("state") or "unknown"
            inst.pid = spec.get("pid")
            inst.log_path = Path(spec["log"]) if spec.get("log") else None
            inst.ready_timeout_s = float(spec.get("ready_timeout_s") or inst.ready_timeout_s)
            inst.stop_grace_s = float(spec.get("stop_grace_s") or inst.stop_grace_s)
        geometry = header.get("geometry")
        self.geometry = KvGeometry(**geometry) if geometry else None
        self.broken = header.get("broken")
        self.log_dir = Path(header["log_dir"]) if header.get("log_dir") else None
        age = header.get("t_start_age_s")
        self.t_start = time.monotonic() - float(age) if age is not None else None

    async def _take_history(self, reader: asyncio.StreamReader, header: dict[str, Any]) -> None:
        for i in range(int(header.get("preamble") or 0)):  # how things stand: the first time only
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise ConnectionError(f"the stream from {self.where} ended in its preamble")
            if not self.reconnects:
                self._take(from_dict(json.loads(line)), None)
        count, first = int(header.get("history") or 0), header.get("seq")
        if first is not None and self._seq is not None and first > self._seq + 1:
            missed = first - self._seq - 1
            self.missed += missed
            self._notice("warning", f"{missed} events of the service's were missed while this viewer was away"
                         " (its history no longer reaches back that far)")
        for i in range(count):
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise ConnectionError(f"the stream from {self.where} ended in its history ({i} of {count} events)")
            seq = first + i if first is not None else None
            if first is None and self.reconnects:
                continue  # no numbers to tell the events seen from the others: live ones only
            self._take(from_dict(json.loads(line)), seq)
        if first is not None:
            self._seq = max(self._seq or 0, first + count - 1)

    def _take(self, ev: Event, seq: int | None) -> None:
        if seq is not None:
            if self._seq is not None and seq <= self._seq:
                return  # seen before a reconnection
            self._seq = seq
        self.history.append(ev)
        if isinstance(ev, InstanceStateChanged) and (inst := self.instances.get(ev.instance)) is not None:
            inst.state = ev.state
            if ev.pid is not None:
                inst.pid = ev.pid
        elif isinstance(ev, PairBroken):
            self.broken = ev.reason
        elif isinstance(ev, PairReady):
            self.broken = None
        elif isinstance(ev, RuntimeStarted) and ev.run_dir:
            self.log_dir = Path(ev.run_dir)
        elif isinstance(ev, RuntimeStopped):
            self._stopped = ev.reason
        self.hub.publish(ev)

    def _notice(self, level: str, text: str) -> None:
        self.emit(Notice(level=level, text=f"pdtui attach: {text}"))

    async def _live(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        """The live events until the stream's last line (returned), or None when it broke off."""
        while True:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                return None
            obj = json.loads(line)
            if isinstance(obj, dict) and "event" not in obj:
                return obj
            self._take(from_dict(obj), self._seq + 1 if self._seq is not None else None)

    async def _follow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            self._writer = writer
            try:
                last = await self._live(reader)
                why = "the stream broke off" if last is None else str(last.get("error") or last.get("end"))
            except (OSError, ValueError, KeyError, TypeError) as e:
                last, why = None, f"{type(e).__name__}: {e}"
            finally:
                writer.close()
                self._writer = None
            if (last is not None and last.get("end") == "closed") or self._stopped is not None:
                reason = (last or {}).get("reason") or self._stopped or "closed"
                self._finish("closed", f"the service at {self.where} stopped ({reason})")
                self.control.notify_down()
                return
            overflow = last is not None and last.get("end") == "overflow"
            self._notice("warning", f"{why}; reconnecting" if overflow else
                         f"lost the connection to the service at {self.where} ({why}); reconnecting"
                         f" (for up to {self.reconnect_s:g} s)")
            got = await self._reconnect()
            if got is None:
                return
            reader, writer = got

    async def _reconnect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        deadline = time.monotonic() + self.reconnect_s
        error = "no attempt"
        while True:
            try:
                reader, writer, header = await self._open()
                self._apply_header(header)
                self.reconnects += 1
                await self._take_history(reader, header)
                self._notice("info", f"reconnected to the service at {self.where}")
                return reader, writer
            except RemoteRefused as e:
                if e.code == "closed":
                    self._finish("closed", f"the service at {self.where} is shutting down")
                    self.control.notify_down()
                    return None
                error = str(e)
            except (OSError, ValueError, TimeoutError) as e:
                error = str(e) or type(e).__name__
            if time.monotonic() > deadline:
                self._notice("error", f"lost the service at {self.where}: {error}. The dashboard shows what it saw"
                             " until then; q quits (the service, if it runs, runs on)")
                self._finish("lost", error)
                return None
            await asyncio.sleep(0.5)

    def _finish(self, how: str, reason: str) -> None:
        self.ended, self.end_reason = how, reason
        if how == "closed":
            self.closed = True
        self.hub.close()


__all__ = ["RemoteControl", "RemoteInstance", "RemoteRefused", "RemoteSource"]
