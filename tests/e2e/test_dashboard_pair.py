"""The dashboard over the real CPU pair, driven by Pilot through its own keys (pdtui.app.drill):
kill D during a stream, D's pane shows the exit and the errored request is counted, restart D,
kill P and see the fallback, restart P and see the pair again; then the load key 3 on the same
pair: four 3,000-token prompts (by the model's tokenizer) all through the pair, with usage."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pdtui.app import drill
from pdtui.app.app import make_app
from pdtui.app.messages import LoadFinished
from pdtui.app.widgets import InstancePane, RequestDetail
from pdtui.core import config as config_mod
from pdtui.core import topology
from pdtui.core.events import InstanceStateChanged
from pdtui.core.runtime import Runtime
from tests.e2e.conftest import STARTED_GROUPS, _ports_free

pytestmark = pytest.mark.anyio
PORT_OFFSET = int(os.environ.get("PDTUI_E2E_DASH_PORT_OFFSET", "24000"))  # under 32768: conftest.py


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_drill_on_the_real_pair(tmp_path: Path) -> None:
    cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), PORT_OFFSET)
    assert _ports_free(cfg), f"ports at offset {PORT_OFFSET} are taken"
    rt = Runtime(topology.pair(cfg))
    pids: set[int] = set()
    events = rt.subscribe()
    app = make_app(rt, screenshot_dir=tmp_path)

    async def collect() -> None:
        async for ev in events:
            if isinstance(ev, InstanceStateChanged) and ev.state == "starting" and ev.pid:
                pids.add(ev.pid)

    import asyncio

    collector = asyncio.create_task(collect())
    lines: list[str] = []
    seen: list[object] = []
    try:
        async with app.run_test(size=(160, 48), message_hook=seen.append) as pilot:
            res = await drill.run(pilot, shots=tmp_path, ready_timeout_s=240, step_timeout_s=180,
                                  witness_tokens=3000, log=lines.append)
            print("\n" + res.table())
            assert res.ok, res.failed
            assert [s.name for s in res.steps] == ["ready", "load", "kill-d", "restart-d", "kill-p", "restart-p",
                                                   "latency"]
            # what the kill of D left on screen, read back from the steps' own observations
            kill_d = res.steps[2].detail
            assert "D exited" in kill_d and "SIGKILL" in kill_d
            m = re.search(r"errors (\d+) -> (\d+)", kill_d)
            assert m and int(m[2]) > int(m[1])
            assert "fell back to D colocated (prefill_down" in res.steps[4].detail
            assert re.search(r"no silent recompute in [1-9]\d* paired requests", res.steps[6].detail)
            # the live widgets at the end: both panes ready again, D's counters kept, a pair row selected
            d_pane = app.query_one("#pane-D", InstancePane)
            assert d_pane.view.state == "ready" and d_pane.view.errors >= 1 and d_pane.view.fallbacks >= 1
            assert app.snapshot.counts["error"] >= 1 and app.snapshot.counts["fallback"] >= 1
            detail = app.query_one(RequestDetail)
            assert detail.request is not None and detail.request.outcome == "pair"
            assert "MiB" in detail.formula()
            shots = sorted(p.name for p in tmp_path.glob("*.svg"))
            assert shots == [f"{i:02d}-{s.name}.svg" for i, s in enumerate(res.steps, 1)]
            assert "EXITED" in (tmp_path / "03-kill-d.svg").read_text().upper()
            # the load key 3 on the same pair: 4 prompts of 3,000 tokens by the tiny model's tokenizer
            # (a words estimate made them 18,954 tokens, over max_model_len 4096: P answered 400)
            await pilot.press("t")
            await pilot.press("3")
            for _ in range(1200):  # bounded: 4 sequential requests on 2 shared cores
                if any(isinstance(m, LoadFinished) and m.name == "big" for m in seen):
                    break
                await pilot.pause(0.25)
            done = [m for m in seen if isinstance(m, LoadFinished) and m.name == "big"]  # the drill's are others
            assert done, "load key 3 did not finish within 300 s"
            assert (done[0].name, done[0].ok, done[0].errors, done[0].detail) == ("big", 4, 0, "prompts 3,000 tokens"), \
                done[0]
            for _ in range(40):
                if app.snapshot.requests and app.snapshot.requests[-1].prompt_tokens == 3000:
                    break
                await pilot.pause(0.25)
            last = app.snapshot.requests[-1]
            assert (last.outcome, last.prompt_tokens, last.completion_tokens) == ("pair", 3000, 8)
            assert (last.d_computed_tokens, last.recomputed) == (0, False)  # D pulled the whole prompt
            await pilot.pause(0.3)
            assert "completion None" not in str(app.query_one(RequestDetail).render())
    finally:
        await rt.aclose(reason="test over")
        collector.cancel()
        STARTED_GROUPS.update(pids)
    assert len(pids) >= 4  # P, D, the restarted D and the restarted P, each in its own group
