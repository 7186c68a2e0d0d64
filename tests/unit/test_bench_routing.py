"""The bench's routing arms (pair-headroom, pair-least-loaded, pair-round-robin), the fill
workload and the report's count of failures and preemptions per arm; the 1p2d-small profile they
run on. Fakes only: a fake streaming server (tests/fakes.py), samples made by hand."""

from __future__ import annotations

import argparse
import asyncio

import httpx

from pdtui.bench import command, report, runners, workload
from pdtui.bench.runners import ALL_ARMS, PAIR_ARMS, ROUTING_ARMS, AttachedEngines, arm_topology
from pdtui.bench.workload import Clock, FillSpec, LoadTarget, Sample, run_fill
from pdtui.core import config as config_mod
from pdtui.core import topology
from pdtui.core.proxy import DECODE_CHOICES
from tests.fakes import FakeVllm, free_port, serving


def test_a_routing_arm_per_choice_of_d_each_a_pair_arm():
    assert set(ROUTING_ARMS) == {"pair-headroom", "pair-least-loaded", "pair-round-robin"}
    assert {v["decode_choice"] for v in ROUTING_ARMS.values()} == set(DECODE_CHOICES)
    assert set(ROUTING_ARMS) <= set(ALL_ARMS) and set(ROUTING_ARMS) <= set(PAIR_ARMS)
    assert set(ROUTING_ARMS) <= set(report.PROXIED) and set(report.ROUTING_ARMS) == set(ROUTING_ARMS)
    assert runners.attached_refusal("pair-headroom", pair=True, single=False) is None
    assert "needs a pair" in (runners.attached_refusal("pair-headroom", pair=False, single=True) or "")


def test_the_small_1p2d_profile_builds_a_pair_with_a_fillable_d():
    cfg = config_mod.load_profile("1p2d-small")
    config_mod.validate(cfg)
    d1, d2 = cfg.decodes
    assert (d1.name, d1.kv_cache_memory_bytes) == ("D1", 16 * 2**20)  # 128 blocks of 128 tiny tokens (1 KiB each)
    assert (d2.name, d2.kv_cache_memory_bytes) == ("D2", 256 * 2**20)
    assert cfg.decode_choice == "headroom" and cfg.block_size == 128
    topo = topology.pair(cfg)
    assert topo.proxy is not None and topo.proxy.decodes == ("D1", "D2") and topo.proxy.prefills == ("P",)
    assert topo.proxy.settings.decode_choice == "headroom" and topo.proxy.settings.max_model_len == 4096
    # each routing arm: the same pair under its choice
    for arm, switches in ROUTING_ARMS.items():
        t = arm_topology(arm, cfg)
        assert t.name == arm and t.proxy is not None and t.proxy.settings.decode_choice == switches["decode_choice"]
    # the fill's defaults overfill D1 alone, fit both (workload.FillSpec)
    f = FillSpec()
    need = -(-(f.prompt_len + f.max_tokens) // cfg.block_size)
    assert need * f.requests / 2 > 127 and need * f.requests < 127 + 2047


def test_decode_choice_is_a_switch_of_the_config_and_the_bench_flags():
    cfg = config_mod.load_profile("1p2d")
    assert cfg.decode_choice == "least-loaded"
    assert "decode_choice" in {f.name for f in config_mod.proxy_switches()}
    config_mod.apply_overrides(cfg, {"decode_choice": "round-robin"}, source=lambda n: "--decode-choice")
    assert topology.pair(cfg).proxy.settings.decode_choice == "round-robin"  # type: ignore[union-attr]


def test_over_attached_engines_a_routing_arm_sets_its_choice():
    engines = AttachedEngines(model_name="tiny", block_size=128, prefills=("http://127.0.0.1:1",),
                              decodes=("http://127.0.0.1:2", "http://127.0.0.1:3"))
    t = engines.topology("pair-round-robin")
    assert t.proxy is not None and t.proxy.settings.decode_choice == "round-robin" and t.proxy.decodes == ("D1", "D2")


def test_fill_is_a_workload_asked_for_by_name_with_its_flags():
    assert "fill" in workload.WORKLOADS and "fill" not in workload.DEFAULT_WORKLOADS
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    opts = command.options_from_args(p.parse_args([]))
    assert opts.workloads == ("follow", "interference")
    args = p.parse_args(["--workloads", "fill", "--arms", "pair-round-robin,pair-headroom", "--fill-requests", "6",
                         "--fill-max-tokens", "50", "--fill-interval", "0"])
    opts = command.options_from_args(args)
    assert opts.workloads == ("fill",) and opts.arms == ("pair-round-robin", "pair-headroom")
    assert (opts.fill.requests, opts.fill.max_tokens, opts.fill.interval_s, opts.fill.prompt_len) == (6, 50, 0.0, 1000)


def test_the_fill_workload_holds_every_stream_to_its_end():
    async def go():
        d = FakeVllm("decode", port=free_port(), tokens=6, delay_s=0.01, die_after=None)
        samples: list[Sample] = []
        windows: dict[str, list[float]] = {}
        async with serving(d), httpx.AsyncClient(timeout=10) as client:
            t = LoadTarget("pair-headroom", d.url, "fake", client, Clock(), samples, windows)
            await run_fill(t, FillSpec(requests=4, prompt_len=30, max_tokens=6, interval_s=0.0), seed=1)
        return samples, windows, d

    samples, windows, d = asyncio.run(go())
    assert [s.request_id for s in samples] == [f"bench-pair-headroom-fill-{i}" for i in range(4)]
    assert all(s.ok and s.chunks == 6 and s.workload == "fill" for s in samples)
    assert len({r["prompt"] for r in d.requests}) == 4 and all(len(r["prompt"]) == 30 for r in d.requests)
    assert windows["fill"][1] >= windows["fill"][0]
    summary = report.summarize_arm(samples, windows)
    assert summary["fill"]["requests"] == 4 and summary["fill"]["ok"] == 4


def _sample(i: int, decode: str | None, ok: bool = True, reason: str | None = None) -> Sample:
    s = Sample(arm="a", workload="fill", request_id=f"r{i}", prompt_tokens=1000, max_tokens=1000, t_send=0.0,
               status=200 if ok else 500, ttft_ms=10.0, error=None if ok else "D preempted it too often")
    s.trace = {"decode": decode, "decode_reason": reason, "outcome": "pair" if ok else "error"}
    return s


def test_the_report_counts_failures_preemptions_and_where_requests_went():
    rr = [_sample(i, "D1" if i % 2 else "D2", ok=i != 3) for i in range(6)]
    hr = [_sample(i, "D1" if i < 2 else "D2", reason="headroom: D2 ...") for i in range(6)]
    r = report.routing_summary(rr, {"D1": 5, "D2": 0})
    assert (r["requests"], r["failed"], r["failed_ids"], r["preempted"]) == (6, 1, ["r3"], 5)
    assert r["by_decode"] == {"D1": 3, "D2": 3}
    h = report.routing_summary(hr, {"D1": 0, "D2": 0})
    assert (h["failed"], h["preempted"], h["by_decode"]) == (0, 0, {"D1": 2, "D2": 4})
    assert h["last_reason"] == {"D1": "headroom: D2 ...", "D2": "headroom: D2 ..."}
    assert report.routing_summary(rr)["preempted"] is None  # D's counter not read
    assert report.routing_line(r) == "6 requests, 1 failed; D's preemptions: D1 5, D2 0; requests per D: D1 3, D2 3"
    summaries = {"pair-round-robin": {**report.summarize_arm(rr, {}), "routing": r},
                 "pair-headroom": {**report.summarize_arm(hr, {}), "routing": h}}
    lines = report.routing_table(summaries)
    assert "| pair-round-robin | 6 | 1 | 5 | D1 3, D2 3 | D1 5, D2 0 |" in lines
    assert "| pair-headroom | 6 | 0 | 0 | D1 2, D2 4 | D1 0, D2 0 |" in lines
    assert report.switch_table(summaries) == []  # not TTFT switch arms
    assert "choice of D" in report.table(summaries)


def test_each_d_preemptions_over_the_load():
    before = {"D1": {"vllm:num_preemptions": 2.0}, "D2": {}}
    after = {"D1": {"vllm:num_preemptions": 9.0}, "D2": {"vllm:num_preemptions": 0.0}}
    assert runners.preemptions(before, after) == {"D1": 7, "D2": 0}
    assert runners.summed(after) == {"vllm:num_preemptions": 9.0}
