from pdtui.core import events


def test_every_event_round_trips_through_json():
    samples = [
        events.InstanceStateChanged(instance="D", role="decode", state="exited", pid=7, exit_code=-9),
        events.ConnectorEvent(instance="D", what="compat_ok", text="NIXL compatibility check passed", fields={"hash": "ab"}),
        events.RequestTraced(request_id="r1", endpoint="/v1/completions", stream=True, outcome="pair", status=200,
                             itl_ms=[1.5, 2.0], blocks=4, kv_bytes=524288),
        events.MetricsSampled(instance="P", values={"vllm:kv_cache_usage_perc": 0.25}),
        events.RequestTraced(request_id="r2", endpoint="/v1/completions", stream=True, outcome="pair", status=200,
                             decode="D2", decode_reason="headroom: D2 412-24=388 >= 6 needed, 0 in flight; D1 4-0=4 < 6"),
        events.HeadroomReported(instance="D2", total_blocks=2048, free_blocks=412, promised_blocks=24, requests=3,
                                scrape_t=1.5),
        events.Notice(level="warning", text="KV pools differ"),
        events.RuntimeStopped(reason="signal"),
    ]
    for ev in samples:
        back = events.from_json(ev.to_json())
        assert back == ev
        assert type(back) is type(ev)


def test_unknown_kind_is_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown event kind"):
        events.from_dict({"event": "nope"})


def test_a_request_is_one_record_and_its_outcome_only_a_documented_value():
    import dataclasses

    import pytest

    from pdtui.core.events import OUTCOMES, RequestTraced
    from pdtui.core.proxy.trace import Trace

    with pytest.raises(ValueError, match="one of pair, fallback, error"):
        RequestTraced(request_id="r", endpoint="/v1/completions", stream=True, outcome="ok", status=200)
    # the proxy's working record has RequestTraced's fields, not a copy kept by hand
    trace = Trace("r", "/v1/completions", True)
    trace.chunks, trace.itl_ms = 2, [1.23456]
    event = trace.freeze()
    names = {f.name for f in dataclasses.fields(RequestTraced)} - {"t", "total_ms"}
    assert names <= set(Trace.__slots__)
    assert event.outcome == "error" and event.outcome in OUTCOMES and event.chunks == 2 and event.itl_ms == [1.235]
    trace.paired = True
    assert trace.served() == "pair"
