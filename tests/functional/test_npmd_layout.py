"""The dashboard over 2P2D (a scripted FakeRuntime, no engines): four instance panes fit 80x24 in
their short form, each D shows its headroom as the proxy reports it, and a request's detail says
why its D was chosen (RequestTraced.decode_reason)."""

from __future__ import annotations

import pytest

from pdtui.app.app import make_app
from pdtui.app.widgets import InstancePane
from pdtui.core.events import HeadroomReported, MetricsSampled
from tests.functional.fake_runtime import T0, FakeRuntime, request, started, state
from tests.functional.test_dashboard import clock, pair_up, screen_text, settle

pytestmark = pytest.mark.anyio
MEMBERS = (("P1", "prefill"), ("P2", "prefill"), ("D1", "decode"), ("D2", "decode"))
REASON = "headroom: D2 1900-48=1852 >= 16 needed, 1 in flight; D1 15-0=15 < 16"


def two_p_two_d(fake: FakeRuntime) -> None:
    fake.emit(started(members=MEMBERS))
    for i, (name, _) in enumerate(MEMBERS):
        fake.emit(state(name, "starting", T0 + 1 + i, pid=10 + i))
    for i, (name, _) in enumerate(MEMBERS):
        fake.emit(state(name, "ready", T0 + 60 + i, pid=10 + i, elapsed_s=59.0))
    for name, blocks, usage in (("D1", 128, 0.88), ("D2", 2048, 0.07)):
        fake.emit(MetricsSampled(instance=name, t=T0 + 70, values={
            "vllm:kv_cache_usage_perc": usage, "vllm:num_requests_running": 7, "vllm:num_requests_waiting": 0,
            "cache_config:num_gpu_blocks": blocks, "cache_config:block_size": 128}))
    fake.emit(HeadroomReported(instance="D1", total_blocks=128, free_blocks=15, promised_blocks=0, requests=7,
                               scrape_t=T0 + 70, t=T0 + 70.1),
              HeadroomReported(instance="D2", total_blocks=2048, free_blocks=1900, promised_blocks=48, requests=3,
                               scrape_t=T0 + 70, t=T0 + 70.1))
    fake.emit(request("pdtui-aaaa0001", T0 + 71, prefill="P1", decode="D1",
                      decode_reason="headroom: D1 127-0=127 >= 16 needed, 0 in flight; D2 2047-0=2047, 0 in flight"),
              request("pdtui-aaaa0002", T0 + 72, prefill="P2", decode="D2", decode_reason=REASON))


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
async def test_2p2d_fits_and_shows_each_d_headroom_and_why_its_d(size: tuple[int, int]) -> None:
    fake = FakeRuntime(members=MEMBERS)
    app = make_app(fake, clock=clock)
    async with app.run_test(size=size) as pilot:
        two_p_two_d(fake)
        await settle(pilot, app)
        text = screen_text(app)
        lines = text.splitlines()
        assert len(lines) == size[1] and all(len(line) == size[0] for line in lines)
        panes = list(app.query(InstancePane))
        assert [p.instance_name for p in panes] == ["P1", "P2", "D1", "D2"]
        for name in ("P1", "P2", "D1", "D2"):
            assert f"{name} (" in text  # every pane's title
        assert text.count("ready") >= 4
        if size[0] == 80:  # four panes of 20 columns: the short lines
            assert all(0 < p.content_size.width < InstancePane.COMPACT_BELOW for p in panes)
            assert "p1 f0 e0" in text  # each P and D took one paired request
            assert "KV 88% room 15" in text and "KV 7% room 1,852" in text
            assert "D chosen: headroom: D2 1900-48" in text  # the detail, 80x24 (the newest row)
        else:  # four panes of 40: the room and the pool, how it is made where it fits (1P1D: it does)
            assert "KV use 88.0% room 15/128 blk" in text and "KV use 7.0% room 1,852/2,048 blk" in text
            d2 = app.snapshot.instance("D2")
            assert InstancePane.headroom_text(d2).plain == "room 1,852/2,048 blk (1,900 free - 48 promised)"
            assert f"D chosen: {REASON}" in text
        # the table names each request's P and D
        assert "P1" in text and "D2" in text


async def test_a_d_that_restarts_forgets_its_headroom() -> None:
    fake = FakeRuntime(members=MEMBERS)
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(160, 48)) as pilot:
        two_p_two_d(fake)
        await settle(pilot, app)
        assert app.snapshot.instance("D1").headroom.headroom == 15
        fake.emit(state("D1", "exited", T0 + 80, exit_code=-9), state("D1", "starting", T0 + 81, pid=30))
        await settle(pilot, app)
        v = app.snapshot.instance("D1")
        assert v.headroom is None and v.metrics == {}
        assert "room 1,852/2,048" in screen_text(app)  # D2's stays


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
async def test_a_pair_d_shows_its_room_first_then_how_it_is_made_where_it_fits(
        size: tuple[int, int]) -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=size) as pilot:
        pair_up(fake)  # D: 2,048 blocks, a quarter in use
        fake.emit(HeadroomReported(instance="D", total_blocks=2048, free_blocks=1535, promised_blocks=16, requests=1,
                                   scrape_t=T0 + 63, t=T0 + 63.1))
        await settle(pilot, app)
        text = screen_text(app)
        if size[0] == 80:  # two panes of 40: the room, no more
            assert "KV use 25.0% room 1,519/2,048 blk" in text and "promised" not in text
        else:
            assert "KV use 25.0% room 1,519/2,048 blk (1,535 free - 16 promised)" in text
