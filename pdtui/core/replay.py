"""Replay: a recording (``pdtui up --record FILE``) played as a :class:`pdtui.core.source.Source`.

The dashboard cannot tell it from a live Runtime except by ``replay = True``: events arrive in
file order, spaced as they were recorded divided by ``speed``. Controls (kill, restart, load)
raise ``ReplayControlsDisabled``. The KV geometry comes from the recording (RuntimeStarted's
bytes per token), so a replay shows the same freight formula as the live run did.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pdtui.core.control import Control
from pdtui.core.events import Event, EventHub, InstanceStateChanged, RuntimeStarted, from_json
from pdtui.core.kvmath import KvGeometry
from pdtui.core.source import RunInfo

_END = object()


class ReplayControlsDisabled(RuntimeError):
    pass


class BadRecording(ValueError):
    pass


def read_recording(path: Path) -> list[Event]:
    """The events of a recording: plain JSONL, or compressed as .xz or .gz (how the committed
    examples are kept). A line that is not an event is named with its number."""
    import gzip
    import lzma

    openers: dict[str, Callable[..., IO[str]]] = {".xz": lzma.open, ".gz": gzip.open}
    opener = openers.get(path.suffix, open)
    events: list[Event] = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    events.append(from_json(line))
                except (ValueError, KeyError, TypeError) as e:
                    raise BadRecording(f"{path}:{n}: not a pdtui event ({type(e).__name__}: {e})") from None
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise BadRecording(f"{path}: cannot read it: {e}") from None
    if not events:
        raise BadRecording(f"{path}: no events in it (make one with `pdtui up --record FILE`)")
    return events


@dataclass
class ReplayInstance:
    """An instance of the recorded run: its name, role and URL from RuntimeStarted, its state as
    the replayed events move it (InstanceView)."""

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


@dataclass
class Replay:
    path: Path
    speed: float = 1.0
    """1 = real time; 10 = ten times faster; 0 or less = as fast as possible."""
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
    max_gap_s: float | None = None
    """Cap on one wait between events (after dividing by speed); None = no cap."""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.events: list[Event] = read_recording(self.path)
        self.run = RunInfo(profile="?", model_name="?", proxy_url="", block_size=0)
        self.instances: dict[str, ReplayInstance] = {}
        self.geometry: KvGeometry | None = None
        self.history: list[Event] = []
        self.finished = asyncio.Event()
        self.hub = EventHub()
        self.replay = True
        self.remote = False
        self.closed = False
        self.broken: str | None = None
        self.log_dir: Path | None = None
        self.t_start: float | None = None
        self.control = Control(self)
        for ev in self.events:
            if isinstance(ev, RuntimeStarted):
                self.run = RunInfo(profile=ev.profile, model_name=ev.model, proxy_url=ev.proxy_url,
                                   block_size=ev.block_size)
                for spec in ev.instances:
                    self.instances[spec["name"]] = ReplayInstance(spec["name"], spec.get("role", "?"), spec.get("url", ""))
                if ev.kv_geometry:
                    self.geometry = KvGeometry(**ev.kv_geometry)
                break

    def emit(self, event: Event) -> None:
        self._emit(event)

    def subscribe(self) -> AsyncIterator[Event]:
        return self.hub.subscribe()

    def _emit(self, item: Any) -> None:
        if isinstance(item, Event):
            self.history.append(item)
            if isinstance(item, InstanceStateChanged) and item.instance in self.instances:
                self.instances[item.instance].state = item.state
        if item is _END:
            self.hub.close()
        else:
            self.hub.publish(item)

    async def start(self) -> float:
        """Play the recording; return its recorded duration in seconds."""
        import time

        self.t_start = time.monotonic()
        prev: float | None = None
        for ev in self.events:
            if self.closed:
                break
            if prev is not None and self.speed > 0:
                gap = max(0.0, ev.t - prev) / self.speed
                if self.max_gap_s is not None:
                    gap = min(gap, self.max_gap_s)
                if gap > 0:
                    await self.sleep(gap)
            prev = ev.t if prev is None else max(prev, ev.t)
            self._emit(ev)
        self.finished.set()
        self._emit(_END)
        if not self.events:
            return 0.0
        return self.events[-1].t - self.events[0].t

    async def kill(self, name: str, reason: str = "killed") -> int | None:
        raise ReplayControlsDisabled("this is a replay: kill is disabled")

    async def restart(self, name: str) -> float:
        raise ReplayControlsDisabled("this is a replay: restart is disabled")

    async def stop_instance(self, name: str) -> int | None:
        raise ReplayControlsDisabled("this is a replay: stop is disabled")

    async def aclose(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        self._emit(_END)
