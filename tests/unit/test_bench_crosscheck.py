"""The `vllm bench serve` cross-check on synthetic data: no engines, no vllm. The dicts below have
the shape of `vllm bench serve --save-detailed` result files (seconds, perf_counter times)."""

import pytest

from pdtui.bench import report
from pdtui.bench.runners import interference_plan
from pdtui.bench.workload import InterferenceSpec, Sample


def _sample(wl, rid, t_send, chunk_t, empty_t=()):
    chunk_t = list(chunk_t)
    return Sample(arm="single", workload=wl, request_id=rid, prompt_tokens=64, max_tokens=8, t_send=t_send,
                  ttft_ms=(chunk_t[0] - t_send) * 1000, itl_ms=report.window_gaps(chunk_t, None),
                  chunk_t=chunk_t, empty_t=list(empty_t), status=200)


def test_the_two_itl_definitions():
    s = _sample("follow", "r", 0.9, [1.0, 1.01, 1.03], empty_t=[1.02])
    assert report.gaps_ms(s) == pytest.approx([10.0, 20.0])  # pdtui: chunks with text
    assert report.gaps_ms(s, every_chunk=True) == pytest.approx([10.0, 10.0, 10.0])  # vllm bench serve
    assert report.ttft_ms(s) == report.ttft_ms(s, every_chunk=True) == pytest.approx(100.0)
    s.empty_t = [0.95]  # an empty first chunk: vllm bench serve's TTFT is earlier
    assert report.ttft_ms(s, every_chunk=True) == pytest.approx(50.0)


def test_agree_uses_the_stated_tolerance_and_refuses_a_p99_of_few_samples():
    assert report.tolerance_text("TTFT p50") == "max(15%, 25 ms)"
    assert report.agree("TTFT p50", 320.0, 300.0, 3, 3) == "agree"  # within 45 ms (15 %)
    assert report.agree("TTFT p50", 360.0, 300.0, 3, 3) == "disagree"
    assert report.agree("TTFT p50", 40.0, 20.0, 3, 3) == "agree"  # within the 25 ms floor
    assert report.agree("ITL p50", 4.5, 3.6, 900, 900) == "agree"  # 1 ms floor
    assert report.agree("ITL p99", 85.0, 11.0, 93, 93) == "n/a (n<100)"
    assert report.agree("ITL p99", 85.0, 11.0, 1000, 1000) == "disagree"
    assert report.agree("ITL p50", None, 3.0, 0, 9) == "n/a"


def _follow_detailed(ttfts, itls):
    return {"completed": len(ttfts), "failed": 0, "ttfts": ttfts, "itls": itls, "errors": [""] * len(ttfts),
            "median_ttft_ms": 1.0, "p99_ttft_ms": 1.0, "median_itl_ms": 1.0, "p99_itl_ms": 1.0}


def test_vllm_bench_follow_pools_every_gap_like_ours():
    c = report.vllm_bench_follow(_follow_detailed([0.30, 0.32, 0.31], [[0.004] * 9 + [0.081], [0.004] * 10,
                                                                       [0.004] * 10]))
    assert c["ttft_ms"]["p50"] == pytest.approx(310.0) and c["itl_ms"]["n"] == 30
    assert c["itl_ms"]["p50"] == pytest.approx(4.0)
    assert c["stalls"] == {"over_ms": 50.0, "n": 1, "largest_ms": [81.0], "burst_under_ms": 0.5, "burst_share": 0.0}


def test_vllm_bench_interference_applies_our_window_rule_to_their_times():
    # two streams from t=100 s, a chunk every 10 ms; big prompts sent at 102 and 104 s (duration 3 s:
    # the window is [102, max(105, last big done = 104.5)] = [102, 105])
    streams = {"completed": 2, "failed": 0, "start_times": [100.0, 100.0], "ttfts": [0.05, 0.05],
               "itls": [[0.01] * 800, [0.01] * 300]}
    bigs = {"completed": 2, "failed": 0, "start_times": [102.0, 104.0], "ttfts": [0.3, 0.4],
            "latencies": [0.35, 0.5], "errors": ["", ""]}
    c = report.vllm_bench_interference(streams, bigs, duration_s=3.0, n_streams=2)
    assert c["window_s"] == pytest.approx(3.0) and c["big_ok"] == 2
    assert c["big_ttft_ms"]["p50"] == pytest.approx(350.0)
    # stream 0 runs to 108.05: 300 gaps inside; stream 1 ends at 103.05: 105 gaps inside
    assert c["stream_itl_ms"]["n"] == pytest.approx(405, abs=2)
    assert c["window_covered"] == 1.0 and c["streams_warm_s"] == pytest.approx(1.95)
    streams["itls"] = [[0.01] * 400, [0.01] * 300]  # both streams end by 104.05: the window is not covered
    assert report.vllm_bench_interference(streams, bigs, 3.0, 2)["window_covered"] == pytest.approx(2.05 / 3)
    bigs["errors"] = ["boom", "boom"]
    assert "error" in report.vllm_bench_interference(streams, bigs, 3.0, 2)


def _summary(ttfts, gaps):
    samples = [_sample("follow", f"bench-single-follow-{k}", 0.0, [t / 1000 + g / 1000 * j for j in range(4)])
               for k, (t, g) in enumerate(zip(ttfts, gaps, strict=True))]
    return report.summarize_arm(samples, {})


def test_the_table_marks_each_row_and_footnotes_a_disagreement():
    s = _summary([300.0, 310.0, 320.0], [4.0, 4.0, 4.0])
    s["cross_check"] = {"follow": {"returncode": 0, "theirs": report.vllm_bench_follow(
        _follow_detailed([0.20, 0.21, 0.22], [[0.004] * 3] * 3))}}
    rows = report.cross_check_rows(s, s["cross_check"])
    assert [(r["metric"], r["verdict"]) for r in rows] == [
        ("TTFT p50", "disagree"), ("TTFT p99", "n/a (n<100)"), ("ITL p50", "agree"), ("ITL p99", "n/a (n<100)")]
    text = "\n".join(report.cross_check_table({"single": s}))
    assert "| single | follow | TTFT p50 | 310.0 (310.0) | 210.0 | 3 / 3 | max(15%, 25 ms) | DISAGREE [1] |" in text
    assert "[1] single follow TTFT p50: per request, ours [300.0, 310.0, 320.0] ms, theirs [200.0, 210.0, 220.0]" in text
    # an ITL disagreement: the stalls and the bursts on each side
    s["cross_check"]["follow"]["theirs"] = report.vllm_bench_follow(
        _follow_detailed([0.30, 0.31, 0.32], [[0.0001, 0.0001, 0.09]] * 3))
    text = "\n".join(report.cross_check_table({"single": s}))
    assert "| single | follow | ITL p50 | 4.0 (4.0) | 0.1 | 9 / 9 | max(15%, 1 ms) | DISAGREE [1] |" in text
    assert ("[1] single follow ITL p50: ours 0 of 9 gaps over 50 ms [], 0% under 0.5 ms;"
            " theirs 3 of 9 gaps over 50 ms [90.0, 90.0, 90.0], 67% under 0.5 ms.") in text
    s["cross_check"]["follow"] = {"returncode": 2, "error": "Traceback\nValueError: bad"}
    assert "failed (rc 2)" in "\n".join(report.cross_check_table({"single": s}))


def test_interference_plan_outlasts_the_big_prompts_with_unique_prompts():
    spec = InterferenceSpec(streams=2, duration_s=10.0, rate=0.3, prompt_len=2031, stream_max_tokens=512,
                            warmup_s=2.0)
    # our streams made a token every 10 ms each inside a 12 s window
    samples = [_sample("stream", f"bench-single-stream-{k}.0", 0.0, [0.1 + 0.01 * j for j in range(1201)])
               for k in range(2)]
    plan = interference_plan(spec, samples, [0.1, 12.1], startup_s=10.0)
    # first big after the streams' start-up (1.25 x 10 + 3 s) + 2 s warm-up + 0.1 s first token = 17.6 s;
    # 100 tokens/s x (17.6 + 12 + 2 s) x 1.6 = 5056 tokens: 10 requests of 512 per stream
    assert plan["first_big_after_s"] == pytest.approx(17.6) and plan["stream_tokens_needed"] == 5056
    assert plan["stream_requests"] == 2 * 10 and plan["big_prompts"] == 3
    trace = plan["big_trace"]
    assert [t["timestamp"] for t in trace] == pytest.approx([17.6, 17.6 + 1 / 0.3, 17.6 + 2 / 0.3])
    assert interference_plan(spec, samples, [0.1, 12.1])["first_big_after_s"] == pytest.approx(32.1)  # 30 s
    assert all(t["input_length"] == 2031 and len(t["hash_ids"]) == 127 for t in trace)
    ids = [i for t in trace for i in t["hash_ids"]]
    assert len(ids) == len(set(ids))
