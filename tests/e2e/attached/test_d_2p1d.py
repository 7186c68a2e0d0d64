"""Issue 24 on real engines: two prefills and one decode, attached as `pdtui attach --prefill P1,P2
--decode D` attaches them (the package's hand-started P and P2, and its D), P chosen by load.

- The warm-up reached every (P, D): each P paired once before the pair was called ready.
- Concurrent requests spread over both P (the proxy orders the P's by requests in flight, then
  queue), every one paired.
- P2 killed with SIGKILL from outside (the user's kill script): requests sent at once and after
  pdtui saw P2 exit all pair through P1: none falls back to D colocated, none fails. A request
  that found P2's port closed before pdtui knew says so (prefill_branch next_p: never sent to P2).
  pdtui names P2's end in words.
Runs after 1P2D (test_c_npmd.py, which kills the D2 of the set for good): D here is the set's D.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pdtui.core import config as config_mod
from pdtui.core import topology
from pdtui.core.events import InstanceStateChanged, RequestTraced
from tests.e2e.attached.conftest import HandSet
from tests.e2e.conftest import RuntimeThread, _ports_taken

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def twop(hand: HandSet) -> Iterator[RuntimeThread]:
    topo = topology.attached([hand.p.url, hand.p2.url], [hand.d.url], model_name="tiny", block_size=128,
                             model=config_mod.model_path(hand.cfg), max_model_len=4096,
                             proxy_port=hand.cfg.proxy_port + 4, decode_reports_cached=True)
    assert not _ports_taken(topo.cfg), f"the proxy's port {topo.cfg.proxy_port} is taken"
    rt = RuntimeThread(topo.cfg, topo)
    try:
        elapsed = rt.call(rt.rt.start(), 600)
        assert rt.rt.broken is None, rt.rt.broken
        print(f"\n[e2e] 2P1D ready in {elapsed:.1f} s (warm-ups through P1 and P2 to D)")
        yield rt
    finally:
        rt.close()


def _complete(url: str, model: str, rid: str, words: int = 8, start: threading.Barrier | None = None) -> int:
    body = {"model": model, "prompt": f"{rid} the quick brown fox jumps over the lazy dog " * words, "max_tokens": 4}
    with httpx.Client(timeout=60) as client:
        if start is not None:
            start.wait(30)  # every client ready, then all at once
        return client.post(f"{url}/v1/completions", json=body, headers={"X-Request-Id": rid}).status_code


def test_2p1d_spreads_prefills_by_load_and_keeps_pairing_through_p1_when_p2_is_killed(twop: RuntimeThread,
                                                                                     hand: HandSet) -> None:
    cfg = twop.cfg
    warm = [e for e in twop.of(RequestTraced) if e.warmup]
    assert sorted(e.prefill for e in warm if e.outcome == "pair") == ["P1", "P2"], [(e.prefill, e.outcome) for e in warm]

    tag = uuid.uuid4().hex[:6]
    ids = [f"e2e-2p-{tag}-{i}" for i in range(6)]
    # at once, and long enough prompts (about 1,850 tokens: the tiny model spells them out) that the P legs overlap: six short ones
    # sent by threads as they start can each end before the next arrives, and then P1, idle each
    # time, takes all six, as it should (a run at 974f477: P1 6, P2 0)
    start = threading.Barrier(6)
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda rid: _complete(cfg.proxy_url, cfg.model_name, rid, 40, start), ids))
    assert codes == [200] * 6
    spread = [twop.wait_for(RequestTraced, request_id=rid) for rid in ids]
    assert all(t.outcome == "pair" for t in spread), [(t.prefill, t.outcome, t.prefill_branch) for t in spread]
    by_p = {p: sum(1 for t in spread if t.prefill == p) for p in ("P1", "P2")}
    assert by_p["P1"] and by_p["P2"], f"six concurrent requests, P's by load: {by_p}"

    t_kill = time.monotonic()
    subprocess.run(["sh", str(hand.p2.kill_script)], check=True, timeout=10)  # the user's kill -9
    after = [f"e2e-2p-{tag}-k{i}" for i in range(3)]
    assert [_complete(cfg.proxy_url, cfg.model_name, rid) for rid in after] == [200] * 3
    gone = twop.wait_for(InstanceStateChanged, timeout=10, instance="P2", state="exited")
    seen_s = time.monotonic() - t_kill
    later = [f"e2e-2p-{tag}-l{i}" for i in range(3)]
    assert [_complete(cfg.proxy_url, cfg.model_name, rid) for rid in later] == [200] * 3
    traces = [twop.wait_for(RequestTraced, request_id=rid) for rid in after + later]
    rows = [(t.request_id[-3:], t.outcome, t.prefill, t.prefill_branch) for t in traces]
    assert all(t.outcome == "pair" and t.prefill == "P1" for t in traces), rows
    assert all(t.prefill_branch in (None, "next_p") for t in traces), rows
    assert gone.detail, "P2's end is not said in words"
    print(f"\n[e2e] 2P1D: spread {by_p}; P2 killed, seen exited after {seen_s:.2f} s ({gone.detail!r});"
          f" the 6 requests after it: {rows}")
