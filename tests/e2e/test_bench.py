"""`pdtui bench` end to end on the CPU: both arms, both workloads, tiny counts.

Its own ports (offset 32000, not the pair fixture's 31000), its own engines, stopped before
test_pair.py starts its pair. Structure and consistency are asserted; timings are printed, never
asserted. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import asyncio
import math
import os

import pytest

from pdtui.bench import report
from pdtui.bench.runners import BenchOptions, BenchResult, run_bench
from pdtui.bench.workload import FollowSpec, InterferenceSpec
from pdtui.core import config as config_mod
from tests.e2e.conftest import _ports_free
from tests.e2e.test_zz_no_leftovers import processes_in_groups

pytestmark = pytest.mark.e2e

OFFSET = int(os.environ.get("PDTUI_E2E_BENCH_PORT_OFFSET", "32000"))
CROSS_CHECK = os.environ.get("PDTUI_E2E_BENCH_CROSS_CHECK") == "1"
"""Also run the `vllm bench serve` cross-check (about 1 more minute per arm): off in CI."""
PROMPT = 300


def test_bench_both_arms_tiny_cpu(tmp_path):
    cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), OFFSET)
    assert _ports_free(cfg), f"bench e2e ports (offset {OFFSET}) are taken"
    opts = BenchOptions(
        follow=FollowSpec(requests=2, prompt_len=PROMPT, max_tokens=16),
        interference=InterferenceSpec(streams=2, duration_s=5.0, rate=0.4, prompt_len=PROMPT, big_max_tokens=8,
                                      stream_max_tokens=256, warmup_s=1.0),
        cross_check=CROSS_CHECK, out_dir=tmp_path,
    )
    result = BenchResult()
    try:
        asyncio.run(run_bench(cfg, opts, result))
    finally:
        groups = {g for arm in result.arms.values() for g in arm.pgids}
        assert groups and processes_in_groups(groups) == [], "bench left engine processes behind"
        assert _ports_free(cfg), "a bench port is still held"

    data = report.to_json(result)
    assert report.read_json(report.write_json(data, tmp_path / "bench.json.gz"))["arms"].keys() == data["arms"].keys()
    summaries = {a: d["summary"] for a, d in data["arms"].items()}
    print("\n" + report.table(summaries))

    assert list(data["arms"]) == ["single", "pair"]
    assert "single: S on 0; pair: P on 0, D on 1" in data["placement"]
    assert data["environment"]["vllm"] and data["environment"]["kv_geometry"]["kv_bytes_per_token"] == 1024
    n_big = int(5.0 * 0.4)
    for name, arm in data["arms"].items():
        assert arm["error"] is None, arm["error"]
        assert arm["ready_s"] > 0
        s = arm["summary"]
        assert (s["follow"]["requests"], s["follow"]["ok"]) == (2, 2), name
        assert (s["interference"]["big_requests"], s["interference"]["big_ok"]) == (n_big, n_big), name
        assert s["interference"]["window_s"] >= 5.0
        assert s["interference"]["stream_itl_ms"]["n"] > 10 and s["failed"] == []
        warm = [x for x in arm["samples"] if x["warmup"]]
        assert len(warm) == 1 and warm[0]["workload"] == "follow"
        for x in arm["samples"]:
            if x["workload"] in ("follow", "big") and not x["warmup"]:
                assert x["prompt_tokens"] == PROMPT and x["ttft_ms"] > 0
                assert len(x["itl_ms"]) == x["chunks"] - 1 and 1 <= x["chunks"] <= x["max_tokens"]
        assert {x["workload"] for x in arm["samples"]} == {"follow", "stream", "big"}
        assert len({x["request_id"] for x in arm["samples"]}) == len(arm["samples"])

    # single: no proxy, no traces
    assert all(x["trace"] is None for x in data["arms"]["single"]["samples"])
    # pair: every request joined with its trace; the freight formula; D's byte counter agrees
    pair = data["arms"]["pair"]
    for x in pair["samples"]:
        t = x["trace"]
        if t is None and x["cancelled"] and x["status"] is None and x["workload"] == "stream":
            # a stream restarted as the window closed and hung up on before any answer (10 ms once):
            # the proxy may never have read the request, so there may be no trace
            continue
        assert t is not None, x["request_id"]
        if x["cancelled"] and t["blocks"] is None:
            # the client hung up (end of the window) before P answered: nothing was shipped
            assert t["status"] == 499 and t["decode"] is None, t
            continue
        assert t["blocks"] == math.ceil(x["prompt_tokens"] / cfg.block_size), t
        assert t["kv_bytes"] == t["blocks"] * cfg.block_size * 1024
        if not x["cancelled"]:
            assert t["outcome"] == "pair" and t["chunks"] == x["chunks"], x["request_id"]
            assert t["prompt_tokens"] == x["prompt_tokens"]
    for x in pair["samples"]:
        if x["workload"] == "follow" and not x["warmup"]:
            t = x["trace"]
            assert t["prefill_ms"] > 0 and t["hop_ms"] >= 0 and t["decode_ttft_ms"] > 0
    kb = pair["kv_bytes"]
    shipped = [x for x in pair["samples"] if x["trace"] and x["trace"]["kv_bytes"] is not None]
    assert kb["formula_ok"] and kb["requests"] == len(shipped) >= len(pair["samples"]) - 2
    # equal, except for streams hung up on between P's answer and D's first token (pulled or not)
    certain = kb["trace_kv_bytes"] - kb["uncertain_kv_bytes"]
    assert certain <= kb["d_metric_delta"] <= kb["trace_kv_bytes"] and kb["match"], kb
    assert kb["uncertain_kv_bytes"] <= 2 * cfg.block_size * 1024 * 2, kb  # at most the 2 streams in flight
    v = data["verdict"]
    assert v["toll"] is not None and v["purchase"] is not None
    print(f"[e2e bench] KV bytes: traces {kb['trace_kv_bytes']:,} B = D's metric delta; toll {v['toll']:.2f}x,"
          f" purchase {v['purchase']:.2f}x")
    pngs = report.plots(data, tmp_path)
    assert all(p.stat().st_size > 0 for p in pngs)
    if CROSS_CHECK:
        for name, arm in data["arms"].items():
            c = arm["cross_check"]
            assert c["follow"]["returncode"] == 0 and c["follow"]["theirs"]["completed"] == 2, (name, c["follow"])
            t = c["interference"].get("theirs") or {}
            assert "error" not in c["interference"] and t["big_ok"] == n_big, (name, c["interference"])
            assert t["stream_itl_ms"]["n"] > 10 and t["window_covered"] > 0.9 and t["streams_warm_s"] > 0, t
            rows = report.cross_check_rows(arm["summary"], c)
            assert len(rows) == 8 and all(r["verdict"] in ("agree", "disagree", "n/a (n<100)") for r in rows), rows
