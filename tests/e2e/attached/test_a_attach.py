"""Issue 23 on real engines: a pair pdtui did not start, watched by viewers of a pdtui service, and
the failure drill run on it through the user's own kill and restart commands.

P and D are the package's hand-started set (tests/e2e/attached/conftest.py, tests/e2e/handset.py):
started as a user does, with `vllm serve` and a NixlConnector kv_transfer_config (the README's "A
pair you started yourself" lines), each in a session of its own, logging to a file; the user's kill
and restart commands are shell scripts of the test's (kill -9 of the engine's session; start it
again and append to its log). Then:

1. the sides swapped (P's URL given as the decode) are refused before any request, the role named;
2. `pdtui attach --headless --prefill URL --decode URL` (a process: the service) with the logs and
   the commands: preflight passes, the warm-up pairs;
3. a request through pdtui's proxy: D's own counters say the prompt came by KV transfer and D
   computed none of it (the bench over these engines: test_b_bench.py);
4. two viewers of the service (`pdtui attach` without URLs: RemoteSource), the dashboard under Pilot
   one of them. It attaches after the request: the history brings the row, with its blocks and the
   bytes from the formula; the other viewer saw the same trace; a read-only request to kill is
   refused; that viewer leaves and the rest goes on;
5. the failure drill (pdtui.app.drill, the dashboard's own keys) over the viewer: kill D during a
   witness stream (the user's script), which ends with an error event, restart D (the script), kill
   P: the request falls back to D, restart P, steady streams through the restored pair with no
   silent recompute; then the load key 3 (four 3,000-token prompts by the model's tokenizer, paired);
6. `pdtui ctl down` ends the service and leaves the engines running (pdtui did not start them);
   the package's fixture stops them at the end: nothing of them is left, no port held.

This is also the drill's one real-pair run in CI: the keys, the control path (here through the
service's socket) and the panes are the same for a pair pdtui launched (tests/e2e/test_pair.py
kills those from outside; test_start_fault.py runs `pdtui drill` on a launched pair).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from pdtui.core import config as config_mod
from pdtui.core import kvmath
from pdtui.core.ctl_client import default_socket_path, request
from pdtui.core.events import RequestTraced
from pdtui.core.scrape import parse_metrics
from tests.e2e.attached.conftest import HandSet
from tests.e2e.handset import ROOT, pdtui
from tests.waiting import wait_port_free

pytestmark = pytest.mark.e2e
EXT = 'vllm:prompt_tokens_by_source{source="external_kv_transfer"}'
LOCAL = 'vllm:prompt_tokens_by_source{source="local_compute"}'


def test_a_pair_started_by_hand_is_checked_watched_by_two_viewers_and_drilled_by_the_users_commands(
        hand: HandSet, tmp_path: Path) -> None:
    cfg, p, d = hand.cfg, hand.p, hand.d
    service: subprocess.Popen[str] | None = None
    try:
        # 1. the sides swapped: refused before anything is sent, the role named
        swapped = pdtui("attach", "--headless", "--prefill", d.url, "--decode", p.url,
                        "--proxy-port", str(cfg.proxy_port), "--log", f"P={d.log}", "--log", f"D={p.log}")
        assert swapped.returncode == 2, swapped.stderr[-2000:]
        assert "role" in swapped.stderr and "kv_consumer" in swapped.stderr, swapped.stderr[-2000:]

        # 2. attached, with the logs and the user's commands
        err_path = tmp_path / "service.err"
        with open(err_path, "w") as err:
            service = subprocess.Popen(
                [sys.executable, "-m", "pdtui", "attach", "--headless", "--prefill", p.url, "--decode", d.url,
                 "--proxy-port", str(cfg.proxy_port), "--log", f"P={p.log}", "--log", f"D={d.log}",
                 "--decode-reports-cached", "--ready-timeout", "300",
                 "--kill", f"P=sh {p.kill_script}", "--restart", f"P=sh {p.start_script}",
                 "--kill", f"D=sh {d.kill_script}", "--restart", f"D=sh {d.start_script}"],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
                text=True)
        deadline = time.monotonic() + 180
        while "pair ready" not in err_path.read_text():
            assert service.poll() is None, err_path.read_text()[-3000:]
            assert time.monotonic() < deadline, err_path.read_text()[-3000:]
            time.sleep(0.2)

        # 3. one request through pdtui's proxy: D's counters say it came by KV transfer
        before = parse_metrics(httpx.get(f"{d.url}/metrics", timeout=10).text)
        rid = f"e2e-attach-{uuid.uuid4().hex[:6]}"
        prompt = (uuid.uuid4().hex + " the quick brown fox jumps over the lazy dog" * 20)[:700]
        r = httpx.post(f"{cfg.proxy_url}/v1/completions", headers={"X-Request-Id": rid}, timeout=120,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 8, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text[:500]
        after = parse_metrics(httpx.get(f"{d.url}/metrics", timeout=10).text)
        assert after[EXT] - before[EXT] == 700 and after[LOCAL] - before[LOCAL] == 0

        asyncio.run(_viewers_and_drill(default_socket_path(cfg.proxy_port), cfg, rid, tmp_path))

        # 6. down: the service ends; the engines it did not start run on (the package's fixture
        # stops them, and checks that nothing of them is left)
        down = pdtui("ctl", "down", "--proxy-port", str(cfg.proxy_port), "--json")
        assert down.returncode == 0, down.stderr
        assert service.wait(timeout=60) == 0, err_path.read_text()[-2000:]
        service = None
        for e in (p, d):
            httpx.get(f"{e.url}/health", timeout=5).raise_for_status()
    finally:
        if service is not None and service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait(10)
    assert wait_port_free(cfg.proxy_port), "the service's proxy port is still held"


async def _viewers_and_drill(sock: Path, cfg: config_mod.PairConfig, rid: str, shots: Path) -> None:
    from pdtui.app import drill
    from pdtui.app.app import make_app
    from pdtui.app.messages import LoadFinished
    from pdtui.app.widgets import RequestDetail
    from pdtui.core.remote import RemoteSource

    # 4. two viewers; the dashboard attaches after the request: the history brings its row
    viewer = RemoteSource(sock)
    await viewer.connect()
    reader = RemoteSource(sock, read_only=True)
    await reader.connect()
    await reader.start()
    app = make_app(viewer, screenshot_dir=shots)
    seen: list[object] = []
    async with app.run_test(size=(160, 48), message_hook=seen.append) as pilot:
        deadline = time.monotonic() + 30
        while app.snapshot.request(rid) is None:
            assert time.monotonic() < deadline, "the late viewer's table lacks the request"
            await pilot.pause(0.1)
        row = app.snapshot.request(rid)
        geo = viewer.geometry
        assert row is not None and row.outcome == "pair", row
        assert geo is not None and geo.bytes_per_token == 1024
        assert row.blocks == math.ceil(700 / cfg.block_size)
        assert row.kv_bytes == kvmath.shipped_bytes(row.blocks, cfg.block_size, geo)
        assert (row.d_computed_tokens, row.recomputed) == (0, False)
        same = [e for e in reader.history if isinstance(e, RequestTraced) and e.request_id == rid]
        assert same and same[-1].kv_bytes == row.kv_bytes  # the other viewer saw the same trace
        refused = await asyncio.to_thread(request, sock, {"verb": "kill", "instance": "D", "read_only": True},
                                          timeout_s=10)
        assert refused.get("code") == "forbidden", refused
        await reader.aclose()  # one viewer leaves: the service and the dashboard go on

        # 5. the drill over the viewer, through the user's commands
        res = await drill.run(pilot, shots=shots, ready_timeout_s=300, step_timeout_s=180, witness_tokens=3000)
        print("\n" + res.table())
        assert res.ok, res.failed
        assert [s.name for s in res.steps] == ["ready", "load", "kill-d", "restart-d", "kill-p", "restart-p",
                                               "latency"]
        kill_d = res.steps[2].detail
        m = re.search(r"errors (\d+) -> (\d+)", kill_d)
        assert m and int(m[2]) > int(m[1]), kill_d
        assert "fell back to D colocated (prefill_down" in res.steps[4].detail, res.steps[4].detail
        assert re.search(r"no silent recompute in [1-9]\d* paired requests", res.steps[6].detail)
        d_view = app.snapshot.instance("D")
        assert d_view is not None and d_view.state == "ready"

        # the load key 3: 4 prompts of 3,000 tokens by the model's tokenizer, all paired
        await pilot.press("t")
        await pilot.press("3")
        for _ in range(1200):  # bounded: 4 sequential requests on 2 shared cores
            if any(isinstance(m, LoadFinished) and m.name == "big" for m in seen):
                break
            await pilot.pause(0.25)
        done = [m for m in seen if isinstance(m, LoadFinished) and m.name == "big"]
        assert done, "load key 3 did not finish within 300 s"
        assert (done[0].ok, done[0].errors, done[0].detail) == (4, 0, "prompts 3,000 tokens"), done[0]
        for _ in range(40):
            if app.snapshot.requests and app.snapshot.requests[-1].prompt_tokens == 3000:
                break
            await pilot.pause(0.25)
        last = app.snapshot.requests[-1]
        assert (last.outcome, last.prompt_tokens, last.completion_tokens) == ("pair", 3000, 8)
        assert (last.d_computed_tokens, last.recomputed) == (0, False)
        await pilot.pause(0.3)
        assert "completion None" not in str(app.query_one(RequestDetail).render())
        await pilot.press("q")  # this viewer leaves; the service runs on until `down`
    await viewer.aclose()
    print(f"[e2e] attached pair: {rid} paired, {row.blocks} blocks, {row.kv_bytes:,} B; the drill through the"
          " user's kill and restart scripts passed")
