"""Issue 24 on real engines: one prefill and two decodes, attached as `pdtui attach --prefill P
--decode D1,D2` attaches them (the package's hand-started P; its D2, a 64-block pool, as D1; its D,
2,048 blocks, as D2: the shape of `launch/1p2d-small.toml`, with a smaller first pool), D chosen by
headroom, migration via P (the default). Last but one of the package: it may kill its D2 for good.

- The warm-up reached every (P, D): D2's first real request pays no handshake.
- A paired request's trace says why its D was chosen (the headroom policy, its figures), and each
  D's headroom is reported from its own metrics.
- Migration: `pdtui drill --scenario migrate` over the same engines, as a user runs it (a process
  of its own, the user's kill scripts, the D's logs followed): a greedy stream's D killed with
  SIGKILL from outside once the proxy counts it in flight and the client has the first token (D
  read the KV before it); the client's stream ends
  clean with as many tokens as the unbroken run, the same ones (or differing only after the seam,
  at a near-tie of the reference), the trace records the migration via P with a second
  transfer of its own (the prompt and the tokens sent: its blocks by the formula), the killed D's
  "KV read" line saw the first transfer's bytes and the new D's NIXL counters one more pull of
  exactly the second's; the seam is printed beside the pair's TTFT. The set's D (D2 here) is
  restarted if it was the one killed (test_d_2p1d.py needs it); its D2 (D1 here) is left down.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from pdtui.core import config as config_mod
from pdtui.core import topology
from pdtui.core.events import HeadroomReported, RequestTraced
from tests.e2e.attached.conftest import HandSet
from tests.e2e.conftest import RuntimeThread, _ports_taken
from tests.e2e.handset import pdtui

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def npmd(hand: HandSet) -> Iterator[RuntimeThread]:
    topo = topology.attached([hand.p.url], [hand.d2.url, hand.d.url], model_name="tiny", block_size=128,
                             model=config_mod.model_path(hand.cfg), max_model_len=4096,
                             proxy_port=hand.cfg.proxy_port + 2, decode_reports_cached=True,
                             switches={"decode_choice": "headroom"})
    assert not _ports_taken(topo.cfg), f"the proxy's port {topo.cfg.proxy_port} is taken"
    rt = RuntimeThread(topo.cfg, topo)
    try:
        t0 = time.monotonic()
        elapsed = rt.call(rt.rt.start(), 600)
        assert rt.rt.broken is None, rt.rt.broken
        print(f"\n[e2e] 1P2D ready in {elapsed:.1f} s (warm-ups through P to D1 and to D2; wall"
              f" {time.monotonic() - t0:.1f} s)")
        yield rt
    finally:
        rt.close()


def test_1p2d_warms_both_decodes_says_why_each_d_and_the_migrate_drill_passes(npmd: RuntimeThread,
                                                                                   hand: HandSet) -> None:
    cfg = npmd.cfg
    warm = [e for e in npmd.of(RequestTraced) if e.warmup]
    assert sorted(e.decode for e in warm if e.outcome == "pair") == ["D1", "D2"], [(e.decode, e.outcome) for e in warm]
    deadline = time.monotonic() + 10
    while {e.instance for e in npmd.of(HeadroomReported)} < {"D1", "D2"}:
        assert time.monotonic() < deadline, "no headroom reported for each D"
        time.sleep(0.2)

    rid = f"e2e-npmd-why-{uuid.uuid4().hex[:6]}"
    r = httpx.post(f"{cfg.proxy_url}/v1/completions", json={"model": cfg.model_name, "prompt": "why this D",
                                                            "max_tokens": 4}, headers={"X-Request-Id": rid}, timeout=60)
    assert r.status_code == 200, r.text
    t = npmd.wait_for(RequestTraced, request_id=rid)
    assert t.outcome == "pair" and (t.decode_reason or "").startswith("headroom"), t

    port = hand.cfg.proxy_port + 11
    run = pdtui("drill", "--headless", "--scenario", "migrate", "--decode-choice", "headroom",
                "--prefill", hand.p.url, "--decode", f"{hand.d2.url},{hand.d.url}", "--decode-reports-cached",
                "--proxy-port", str(port), "--log", f"P={hand.p.log}", "--log", f"D1={hand.d2.log}",
                "--log", f"D2={hand.d.log}", "--kill", f"D1=sh {hand.d2.kill_script}",
                "--kill", f"D2=sh {hand.d.kill_script}", "--restart", f"D2=sh {hand.d.start_script}", timeout=600)
    print(f"\n[e2e] pdtui drill --scenario migrate (P, D1 = the set's D2, D2 = its D):\n{run.stdout[-4000:]}")
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    for expected in ("as many tokens as the unbroken run", "its tokens are the unbroken run's",
                     "the trace: a migration from D", "the first transfer:",
                     "the second transfer:"):
        assert f"ok   {expected}" in run.stdout, expected
    line = next(x for x in run.stdout.splitlines() if x.startswith("stream "))
    assert "migrated D" in line and "by prefill (ok)" in line and "seam " in line, line
    httpx.get(f"{hand.d.url}/health", timeout=5).raise_for_status()  # test_d_2p1d.py's D: up
