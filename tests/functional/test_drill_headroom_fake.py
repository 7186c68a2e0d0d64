"""The headroom drill's loop (pdtui.app.drill_headroom.run) on the dashboard over a FakeRuntime
(1P2D), its streams answered by a fake proxy (FakeRoutingProxy) that chooses D with the real
routing (pdtui.core.proxy.routing.Router) over scripted pools and tells the dashboard what the
real one would: HeadroomReported after each choice, a RequestTraced at each end. No engine."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pdtui.app import drill_headroom
from pdtui.app.app import make_app
from pdtui.core import model as model_mod
from pdtui.core.events import HeadroomReported, MetricsSampled, PairReady, RequestTraced
from pdtui.core.proxy.routing import Capacity, Demand, Router
from pdtui.core.source import RunInfo
from tests.fakes import free_port, read_body, serving
from tests.functional.fake_runtime import T0, FakeRuntime, started, state
from tests.functional.test_dashboard import clock

pytestmark = pytest.mark.anyio
MEMBERS = (("P", "prefill"), ("D1", "decode"), ("D2", "decode"))
POOLS = {"D1": 128, "D2": 2048}


@dataclass
class FakeRoutingProxy:
    """Streams a few tokens for each request, held ``hold_s``; D chosen by ``policy`` with the real
    Router over D1 (128 blocks) and D2 (2,048), each request promised ``Demand`` of 1,000 + its
    max_tokens; ``preempt`` counts what a D over its pool would preempt."""

    fake: FakeRuntime
    policy: str = "headroom"
    hold_s: float = 3.0
    port: int = field(default_factory=free_port)
    router: Router = field(init=False)
    preempted: dict[str, int] = field(default_factory=lambda: {"D1": 0, "D2": 0})

    def __post_init__(self) -> None:
        self.router = Router(self.policy)
        for name, total in POOLS.items():
            self.router.set_capacity(name, Capacity(t=1e12, total_blocks=total, used_perc=0.0))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def report(self) -> None:
        for name in POOLS:
            h = self.router.headroom(name)
            assert h is not None
            self.fake.emit(HeadroomReported(instance=name, total_blocks=h.total_blocks, free_blocks=h.free_blocks,
                                            promised_blocks=h.promised_blocks, requests=h.requests, scrape_t=1e12))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        body = json.loads(await read_body(receive))
        rid = dict(scope["headers"])[b"x-request-id"].decode()
        ups = [_Up(n) for n in POOLS]
        for u in ups:
            u.inflight = sum(1 for p in self.router.promises.values() if p.decode == u.name)
        demand = Demand(1000, 8, body["max_tokens"], 128)
        up, why = self.router.pick_decode(ups, demand)
        key = object()
        self.router.promise(key, up.name, demand, _NoProgress())
        h = self.router.headroom(up.name)
        if h is not None and h.blocks < 0:
            self.preempted[up.name] += 1
        self.report()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(3):
            chunk = {"choices": [{"index": 0, "text": f" w{i}"}]}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                        "more_body": True})
            await asyncio.sleep(self.hold_s / 3)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        self.router.release(key)
        self.fake.emit(RequestTraced(request_id=rid, endpoint="/v1/completions", stream=True, outcome="pair",
                                     status=200, prefill="P", decode=up.name, decode_reason=why, chunks=3))


@dataclass
class _Up:
    name: str
    inflight: int = 0

    def is_up(self) -> bool:
        return True


class _NoProgress:
    decode_ttft_ms = None
    chunks = 0


def _preemptions(fake: FakeRuntime, proxy: FakeRoutingProxy) -> None:
    for name, total in POOLS.items():
        fake.emit(MetricsSampled(instance=name, values={"vllm:num_preemptions": float(proxy.preempted[name]),
                                                         "cache_config:num_gpu_blocks": total}))


@pytest.mark.parametrize(("policy", "ok"), [("headroom", True), ("round-robin", False)])
async def test_the_drill_fills_d1_and_checks_where_the_probes_went(policy: str, ok: bool, tmp_path: Path) -> None:
    folder = model_mod.ensure("tiny", tmp_path / "models")
    fake = FakeRuntime(members=MEMBERS)
    proxy = FakeRoutingProxy(fake, policy)
    fake.run = RunInfo("1p2d-small", "tiny", proxy.url, 128, model=str(folder))
    app = make_app(fake, clock=clock)
    async with serving(proxy), app.run_test(size=(160, 48)) as pilot:  # type: ignore[arg-type]
        fake.emit(started(members=MEMBERS))
        for name, _ in MEMBERS:
            fake.emit(state(name, "ready", T0 + 60, pid=1, elapsed_s=59.0))
        fake.emit(PairReady(elapsed_s=60.0))
        _preemptions(fake, proxy)
        proxy.report()

        async def scrape_preemptions() -> None:
            while True:
                await asyncio.sleep(0.2)
                _preemptions(fake, proxy)

        scraper = asyncio.create_task(scrape_preemptions())
        try:
            res = await drill_headroom.run(pilot, interval_s=0.05, probes=4, step_timeout_s=30, ready_timeout_s=10)
        finally:
            scraper.cancel()
    assert [s.name for s in res.steps][:4] == ["ready", "room", "fill", "probe"], res.table()
    table = res.table()
    if ok:
        assert res.ok, table
        assert [c.held for c in res.checks] == [True] * 5
        assert res.checks[1].observed == "D2 4" and res.checks[2].observed.startswith("D1 7,")
    else:  # round-robin: the probes go to the full D1 too, which "preempts"
        assert not res.ok and "D1" in res.checks[1].observed and not res.checks[1].held, table
        assert "expected the 4 streams sent once D1 was full go elsewhere, or to it only with room counted again, observed D1 2, D2 2; on D1: without room (round-robin" in (res.failed or "")
