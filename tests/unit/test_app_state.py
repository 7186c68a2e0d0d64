"""The dashboard's view model and load generator: plain Python, no Textual."""

from __future__ import annotations

import asyncio
import json

import httpx

from pdtui.app import loadgen
from pdtui.app.state import LOG_LINES, DashState, percentile, timeline
from pdtui.cli import build_parser
from pdtui.core.events import InstanceStateChanged, LogLine, MetricsSampled, RequestTraced


def req(rid: str, outcome: str = "pair", **kw) -> RequestTraced:  # noqa: ANN003
    base = dict(request_id=rid, endpoint="/v1/completions", stream=True, outcome=outcome, status=200,
                prefill="P", decode="D", prefill_ms=100.0, hop_ms=1.0, decode_ttft_ms=50.0, ttft_ms=151.0,
                itl_ms=[10.0, 20.0], total_ms=200.0, blocks=2, kv_bytes=262144)
    base.update(kw)
    return RequestTraced(**base)


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(map(float, range(1, 101))), 99) == 99.0


def test_fold_requests_counts_and_windows() -> None:
    s = DashState()
    s.apply(req("w", warmup=True))
    s.apply(req("a"))
    s.apply(req("b", outcome="fallback", prefill=None))
    s.apply(req("c", outcome="error", ttft_ms=None, itl_ms=[5.0]))
    snap = s.snapshot()
    assert [r.request_id for r in snap.requests] == ["a", "b", "c"]
    assert snap.counts == {"pair": 1, "fallback": 1, "error": 1}
    assert snap.ttft == ((151.0, "pair"), (151.0, "fallback"))
    assert len(snap.itl) == 5
    d = snap.instance("D")
    assert d is not None and (d.pairs, d.fallbacks, d.errors) == (1, 1, 1)
    s.clear_latency()
    assert s.snapshot().ttft == () and s.snapshot().requests  # the table is kept


def test_instances_logs_bounded_and_metrics() -> None:
    s = DashState()
    s.apply(InstanceStateChanged(instance="D", role="decode", state="starting", t=10.0))
    for i in range(LOG_LINES + 50):
        s.apply(LogLine(instance="D", line=f"line {i}"))
    s.apply(MetricsSampled(instance="D", values={"vllm:kv_cache_usage_perc": 0.5, "cache_config:num_gpu_blocks": 100}))
    d = s.snapshot().instance("D")
    assert d is not None and len(d.log) == LOG_LINES and d.log[-1] == f"line {LOG_LINES + 49}"
    assert d.started_t == 10.0 and d.free_blocks == 50
    s.apply(InstanceStateChanged(instance="D", role="decode", state="exited", exit_code=-9, detail="killed"))
    assert s.snapshot().instance("D").bad  # type: ignore[union-attr]


def test_timeline_legs() -> None:
    legs = timeline(req("a"))
    assert [n for n, _, _ in legs] == ["P prefill (+1 token)", "proxy hop", "D first token incl. KV pull",
                                      "D decode stream"]
    assert legs[-1][2] == 200.0


def test_loadgen_counts_stream_errors() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        if len(seen) % 2:
            text = 'data: {"choices":[{"text":"x"}]}\n\ndata: [DONE]\n\n'
        else:
            text = 'data: {"choices":[{"text":"x"}]}\n\ndata: {"error": {"message": "D died", "code": 502}}\n\n'
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    res = asyncio.run(loadgen.run("steady", "http://proxy", "tiny", transport=httpx.MockTransport(handler)))
    assert res.ok + res.errors == 12 and res.errors == 6
    assert all(b["model"] == "tiny" and b["stream"] for b in seen)
    assert len({b["prompt"] for b in seen}) == 12  # unique prompts: prefix caching hides no pull


def test_cli_no_args_is_the_dashboard_and_replay_parses() -> None:
    p = build_parser()
    args = p.parse_args(["up"])
    assert args.command == "up" and not args.headless
    r = p.parse_args(["replay", "x.jsonl", "--speed", "10"])
    assert r.command == "replay" and r.speed == 10.0
