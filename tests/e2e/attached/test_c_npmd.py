"""Issue 24 on real engines: one prefill and two decodes, attached as `pdtui attach --prefill P
--decode D1,D2` attaches them (the package's hand-started P; its D2, a 64-block pool, as D1; its D,
2,048 blocks, as D2: the shape of `launch/1p2d-small.toml`, with a smaller first pool), D chosen by headroom, migration via P
(the default). Last of the package: it kills a D for good.

- The warm-up reached every (P, D): D2's first real request pays no handshake.
- Each paired request's trace says why its D was chosen (the headroom policy, its figures), and each
  D's headroom is reported from its own metrics.
- Migration: a greedy stream (temperature 0, ignore_eos) goes to D1; D1 is killed with SIGKILL from
  outside once the client has its first chunk (of 3,600: D is mid-stream; after 20 chunks, in one
  CI run, D had already sent all 400 of a shorter answer); the client's stream ends clean with exactly the text
  an unbroken run of the same request gives (no token repeated or skipped), its trace records the
  migration D1 -> D2 via P with a second transfer of its own (the prompt and the tokens sent: its
  blocks by the formula), which D2's own NIXL counters saw as one more pull of exactly those bytes,
  and the seam (the gap at the client) is printed beside the pair's TTFT.
"""

from __future__ import annotations

import math
import subprocess
import threading
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
from tests.e2e.handset import HandStarted

pytestmark = pytest.mark.e2e
BYTES = "vllm:nixl_bytes_transferred_sum"
COUNT = "vllm:nixl_bytes_transferred_count"


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


def _stream(url: str, body: dict, rid: str, got: dict, started: threading.Event) -> None:
    """A streamed completion: the text and the arrival time of each chunk; how it ended."""
    import json

    got.update(text="", times=[], end=None)
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"X-Request-Id": rid},
                          timeout=httpx.Timeout(120.0, connect=5.0)) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    got["end"] = "done"
                    break
                ev = json.loads(line[6:])
                if "error" in ev:
                    got["end"] = f"error: {ev['error']}"
                    break
                got["text"] += ev["choices"][0]["text"]
                got["times"].append(time.monotonic())
                started.set()  # the first token is out: D is mid-stream (3,600 to go)
    except httpx.HTTPError as e:
        got["end"] = f"transport {type(e).__name__}"
    finally:
        started.set()


def test_1p2d_warms_both_decodes_says_why_each_d_and_migrates_a_stream_whose_d_dies(npmd: RuntimeThread,
                                                                                   hand: HandSet) -> None:
    cfg = npmd.cfg
    engines: dict[str, HandStarted] = {"D1": hand.d2, "D2": hand.d}
    warm = [e for e in npmd.of(RequestTraced) if e.warmup]
    assert sorted(e.decode for e in warm if e.outcome == "pair") == ["D1", "D2"], [(e.decode, e.outcome) for e in warm]
    deadline = time.monotonic() + 10
    while {e.instance for e in npmd.of(HeadroomReported)} < {"D1", "D2"}:
        assert time.monotonic() < deadline, "no headroom reported for each D"
        time.sleep(0.2)

    prompt = (uuid.uuid4().hex + " the quick brown fox jumps over the lazy dog" * 10)[:300]
    body = {"model": cfg.model_name, "prompt": prompt, "max_tokens": 3600, "temperature": 0, "ignore_eos": True,
            "stream": True}
    # the unbroken run
    ref: dict = {}
    ref_id = f"e2e-npmd-ref-{uuid.uuid4().hex[:6]}"
    _stream(cfg.proxy_url, body, ref_id, ref, threading.Event())
    assert ref["end"] == "done" and len(ref["times"]) > 20, ref["end"]
    traces = [npmd.wait_for(RequestTraced, request_id=ref_id)]
    assert traces[-1].outcome == "pair" and (traces[-1].decode_reason or "").startswith("headroom"), traces[-1]

    # the same request; its D killed from outside while D is decoding it
    before = npmd.metrics("D2" if traces[-1].decode == "D1" else "D1")
    rid = f"e2e-npmd-mig-{uuid.uuid4().hex[:6]}"
    got: dict = {}
    started = threading.Event()
    client = threading.Thread(target=_stream, args=(cfg.proxy_url, body, rid, got, started), daemon=True)
    client.start()
    victim = traces[-1].decode  # nothing else in flight: the D the unbroken run had (the trace says why)
    # the kill as soon as D runs the request (its own gauge), not when the client has read a chunk: in
    # CI at cc0b914 the client's first chunk came after D had sent all 3,600 tokens (a starved reader)
    deadline = time.monotonic() + 120
    while not npmd.metrics(victim).get("vllm:num_requests_running"):
        assert time.monotonic() < deadline and got.get("end") is None, f"D never ran it: {got.get('end')}"
        time.sleep(0.05)
    subprocess.run(["sh", str(engines[victim].kill_script)], check=True, timeout=10)  # the user's kill -9
    client.join(120)
    assert not client.is_alive(), "the client hangs after its D died"
    assert got["end"] == "done", got["end"]
    t = npmd.wait_for(RequestTraced, request_id=rid)
    assert t.migrations, f"no migration: {victim} had sent the whole answer before the kill ({t.chunks} chunks)"
    assert got["text"] == ref["text"], (len(got["text"]), len(ref["text"]))  # no token repeated or skipped
    assert t.outcome == "pair" and t.migrated, t.migrations
    m = t.migrations[0]
    other = "D2" if victim == "D1" else "D1"
    assert (m["from"], m["to"], m["result"], m["path"]) == (victim, other, "ok", "prefill"), m
    # a second transfer of its own (prompt + tokens sent, from P to the new D), not zero
    assert m["blocks"] == math.ceil((300 + m["tokens"]) / cfg.block_size), m
    assert m["kv_bytes"] == m["blocks"] * cfg.block_size * 1024, m
    after = npmd.metrics(other)
    assert after[BYTES] - before[BYTES] == m["kv_bytes"], f"{other}'s NIXL byte counter disagrees"
    assert after[COUNT] - before[COUNT] == 1, f"{other} pulled {after[COUNT] - before[COUNT]} times"
    seam = m["seam_ms"]
    print(f"\n[e2e] 1P2D: {victim} killed after {m['tokens']} tokens; the stream went on on {other} via P"
          f" ({m['blocks']} blocks, {m['kv_bytes']:,} B); seam {seam:.0f} ms against the pair's TTFT"
          f" {traces[-1].ttft_ms:.0f} ms ({seam / traces[-1].ttft_ms:.2f}x); text equal to the unbroken run's"
          f" ({len(got['text'])} chars)")
