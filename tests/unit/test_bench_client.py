"""The bench's streaming client and its client process, against a fake streaming server
(tests/fakes.py): TTFT and gaps per token chunk, errors kept, the subprocess hand-back."""

import asyncio

import httpx
import pytest

from pdtui.bench import report
from pdtui.bench.runners import ArmResult, BenchOptions, Reporter, run_client
from pdtui.bench.workload import Clock, FollowSpec, Sample, stream_completion
from pdtui.core.config import PairConfig
from tests.fakes import FakeVllm, free_port, serving


def _sample(rid="r1"):
    return Sample(arm="x", workload="follow", request_id=rid, prompt_tokens=10, max_tokens=5, t_send=0.0)


async def _one(d: FakeVllm) -> Sample:
    async with serving(d), httpx.AsyncClient(timeout=10) as client:
        return await stream_completion(client, d.url, "fake", "hello", _sample(), Clock())


def test_ttft_and_gaps_per_token_chunk():
    d = FakeVllm("decode", port=free_port(), tokens=5, delay_s=0.03)
    s = asyncio.run(_one(d))
    assert s.ok and s.status == 200 and s.chunks == 5 and len(s.itl_ms) == 4
    assert all(g > 15 for g in s.itl_ms)  # 30 ms apart at the server
    assert s.ttft_ms is not None and s.t_end is not None and s.t_end >= s.chunk_t[-1]
    req = d.requests[0]
    assert req["stream"] is True and req["ignore_eos"] is True and req["max_tokens"] == 5
    assert d.headers[0]["x-request-id"] == "r1"


def test_empty_text_chunks_are_kept_apart_for_vllm_bench_serves_definition():
    d = FakeVllm("decode", port=free_port(), tokens=5, delay_s=0.02, empty_at=(0, 3))
    s = asyncio.run(_one(d))
    assert s.ok and s.chunks == 3 and len(s.empty_t) == 2 and len(s.itl_ms) == 2
    # pdtui: TTFT at the first chunk with text (index 1); vllm bench serve: at the first chunk
    assert s.ttft_ms == pytest.approx(report.ttft_ms(s)) and report.ttft_ms(s, every_chunk=True) < s.ttft_ms - 10
    assert len(report.gaps_ms(s, every_chunk=True)) == 4 and max(s.itl_ms) > 30  # the gap over index 3


def test_http_error_and_a_dying_stream_are_kept_as_errors():
    s = asyncio.run(_one(FakeVllm("decode", port=free_port(), status=500)))
    assert s.status == 500 and "fake decode says 500" in s.error and not s.ok
    s = asyncio.run(_one(FakeVllm("decode", port=free_port(), tokens=5, die_after=2, delay_s=0.01)))
    assert s.chunks == 2 and s.error and not s.ok


class _Seen(Reporter):
    def __init__(self):
        self.progress_calls = []

    def progress(self, arm, what, done, total):
        self.progress_calls.append((arm, what, done, total))


def test_the_client_process_hands_back_its_samples():
    async def go():
        d = FakeVllm("decode", port=free_port(), tokens=4, delay_s=0.005)
        arm = ArmResult("single")
        seen = _Seen()
        opts = BenchOptions(workloads=("follow",), follow=FollowSpec(requests=2, prompt_len=50, max_tokens=4))
        async with serving(d):
            await run_client(arm, d.url, PairConfig(model="fake"), opts, seen)
        return arm, seen, d

    arm, seen, d = asyncio.run(go())
    assert [s.request_id for s in arm.samples] == ["bench-single-follow-w0", "bench-single-follow-0",
                                                   "bench-single-follow-1"]
    assert [s.warmup for s in arm.samples] == [True, False, False]
    assert all(s.ok and s.chunks == 4 and s.prompt_tokens == 50 for s in arm.samples)
    assert all(len(r["prompt"]) == 50 for r in d.requests)
    assert set(arm.windows) == {"follow"} and arm.windows["follow"][1] >= arm.windows["follow"][0]
    assert seen.progress_calls[-1] == ("single", "follow", 3, 3)
    assert len(arm.pgids) == 1  # the client process, for the leftover checks


def test_one_client_warm_up_per_instance_and_the_same_measured_prompts_in_every_arm():
    async def go(warmups):
        d = FakeVllm("decode", port=free_port(), tokens=2, delay_s=0.001)
        arm = ArmResult("two-single")
        opts = BenchOptions(workloads=("follow",), follow=FollowSpec(requests=2, prompt_len=50, max_tokens=2))
        async with serving(d):
            await run_client(arm, d.url, PairConfig(model="fake"), opts, Reporter(), warmups=warmups)
        return arm, [r["prompt"] for r in d.requests]

    _, prompts1 = asyncio.run(go(1))
    two, prompts2 = asyncio.run(go(2))
    assert [s.request_id for s in two.samples] == ["bench-two-single-follow-w0", "bench-two-single-follow-w1",
                                                   "bench-two-single-follow-0", "bench-two-single-follow-1"]
    assert [s.warmup for s in two.samples] == [True, True, False, False]
    assert prompts2[0] == prompts1[0] and prompts2[2:] == prompts1[1:]  # measured prompts: the same
    assert len(set(prompts2)) == 4 and all(len(p) == 50 for p in prompts2)


def test_each_instance_is_warmed_up_straight_at_its_own_url():
    from types import SimpleNamespace

    from pdtui.bench.runners import WARMUP_MAX_TOKENS, warm_instances

    async def go():
        s1, s2 = FakeVllm("decode", port=free_port(), tokens=2), FakeVllm("decode", port=free_port(), status=500)
        arm = ArmResult("two-single")
        opts = BenchOptions(follow=FollowSpec(prompt_len=60))
        insts = [SimpleNamespace(name="S1", url=s1.url), SimpleNamespace(name="S2", url=s2.url)]
        async with serving(s1), serving(s2):
            await warm_instances(arm, PairConfig(model="fake"), opts, insts, Reporter())
        return arm, s1, s2

    arm, s1, s2 = asyncio.run(go())
    assert [(w["instance"], w["via"], w["status"]) for w in arm.warmup] == [("S1", "direct", 200), ("S2", "direct", 500)]
    assert arm.warmup[0]["error"] is None and arm.warmup[0]["ms"] > 0 and "says 500" in arm.warmup[1]["error"]
    for d, name in ((s1, "S1"), (s2, "S2")):
        (req,) = d.requests
        assert len(req["prompt"]) == 60 and req["max_tokens"] == WARMUP_MAX_TOKENS and not req.get("stream")
        assert d.headers[0]["x-request-id"] == f"bench-two-single-warmup-{name}"
    assert s1.requests[0]["prompt"] != s2.requests[0]["prompt"]  # prompts of their own: no prefix-cache hits
    assert arm.notices == [f"warning: the warm-up request to S2 failed: {arm.warmup[1]['error']}"]
