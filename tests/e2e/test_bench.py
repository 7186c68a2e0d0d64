"""`pdtui bench` end to end on the CPU: the default arms (single, single-proxied, pair), both
workloads, tiny counts.

Its own ports (offset 22000, not the pair fixture's 21000; all under 32768, see conftest.py), its own engines, stopped before
test_pair.py starts its pair. Structure and consistency are asserted; timings are printed, never
asserted. About 1.5 minutes on 2 cores (94 s with the three arms, 86 s with two before).
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

import pytest

from pdtui.bench import report
from pdtui.bench.runners import ARMS, BenchOptions, BenchResult, run_bench
from pdtui.bench.workload import FollowSpec, InterferenceSpec
from pdtui.core import config as config_mod
from tests.e2e.conftest import _ports_free
from tests.e2e.test_zz_no_leftovers import processes_in_groups

pytestmark = pytest.mark.e2e

OFFSET = int(os.environ.get("PDTUI_E2E_BENCH_PORT_OFFSET", "22000"))
CROSS_CHECK = os.environ.get("PDTUI_E2E_BENCH_CROSS_CHECK") == "1"
"""Also run the `vllm bench serve` cross-check (about 1 more minute per arm): off in CI."""
PROMPT = 300


def _alive(pid: int) -> str | None:
    """The command line of ``pid`` if it is still a live pdtui proxy process (not a zombie, not a
    new process that got the same pid)."""
    proc = Path(f"/proc/{pid}")
    try:
        stat = (proc / "stat").read_text()
        cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    if stat.rsplit(")", 1)[1].split()[0] == "Z" or "pdtui proxy" not in cmd:
        return None
    return cmd


def test_bench_default_arms_tiny_cpu(tmp_path):
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
        # the proxy processes (single-proxied's, the pair's) share pdtui's group: checked by pid
        pids = [p for arm in result.arms.values() for p in arm.pids]
        assert [_alive(p) for p in pids] == [None] * len(pids), "bench left a proxy process behind"
        assert _ports_free(cfg), "a bench port is still held"

    data = report.to_json(result)
    assert report.read_json(report.write_json(data, tmp_path / "bench.json.gz"))["arms"].keys() == data["arms"].keys()
    summaries = {a: d["summary"] for a, d in data["arms"].items()}
    print("\n" + report.table(summaries))

    assert ARMS == ("single", "single-proxied", "pair") and list(data["arms"]) == list(ARMS)
    assert "single: S on 0; single-proxied: S on 0; pair: P on 0, D on 1" in data["placement"]
    assert [len(data["arms"][a]["pids"]) for a in ARMS] == [0, 1, 1]  # a proxy process for each proxied arm
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

    # every instance served a request before the measurement: straight at its URL, or the pair's
    # warm-up through the proxy
    for name in ("single", "single-proxied"):
        assert [(w["instance"], w["via"], w["status"]) for w in data["arms"][name]["warmup"]] == [("S", "direct", 200)]
    assert [(w["instance"], w["outcome"]) for w in data["arms"]["pair"]["warmup"]] == [("P+D", "pair")]
    # single: no proxy, no traces
    assert all(x["trace"] is None for x in data["arms"]["single"]["samples"])
    # single-proxied: every request relayed to S as it is (no prefill) and joined with its trace
    for x in data["arms"]["single-proxied"]["samples"]:
        t = x["trace"]
        if t is None and x["cancelled"] and x["status"] is None and x["workload"] == "stream":
            continue  # hung up on before the proxy read it (see the pair below)
        assert t is not None, x["request_id"]
        assert t["decode"] == "S" and t["prefill"] is None and t["blocks"] is None, t
        if not x["cancelled"]:
            assert (t["outcome"], t["status"], t["chunks"]) == ("fallback", 200, x["chunks"]), x["request_id"]
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
    # silent recompute: every paired request that ran to its end says what D computed (0), none recomputed
    done = [x["trace"] for x in pair["samples"] if not x["warmup"] and x["trace"] and x["trace"]["outcome"] == "pair"]
    assert done and [t["d_computed_tokens"] for t in done] == [0] * len(done), done
    rc = pair["summary"]["recompute"]
    assert rc["recomputed"] == 0 and rc["checked"] >= len(done), (rc, len(done), len(pair["samples"]))
    v = data["verdict"]
    # each ratio, or "cannot tell" with its reasons (issue 22, item 3: on 2 CPU cores the streams'
    # chunks often come in bunches), never both nor neither
    for key, base in (("toll", ["pair", "single-proxied"]), ("purchase", ["single-proxied", "pair"])):
        assert (v[key] is not None) != bool(v["cannot_tell"][key]), (key, v["text"])
        if v[key] is not None:  # the pair is measured through the proxy: so is the arm it is compared with
            assert v["compares"][key] == base and v["same_path"][key] is True
    assert v["proxy_cost"]["ttft_p50_ms"]["delta"] is not None
    assert any(x.startswith("proxy's own cost (single-proxied - single") for x in v["text"])
    print("[e2e bench] verdict:\n  " + "\n  ".join(v["text"]))
    print(f"[e2e bench] KV bytes: traces {kb['trace_kv_bytes']:,} B = D's metric delta; toll {v['toll']},"
          f" purchase {v['purchase']}")
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
