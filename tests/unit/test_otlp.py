"""pdtui's OTLP/HTTP trace receiver (pdtui.core.otlp) fed by the real OpenTelemetry SDK and its
OTLP/HTTP exporter, the same packages vLLM exports its request spans with."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from pdtui.core import config as config_mod
from pdtui.core.events import EngineSpan, from_json
from pdtui.core.otlp import OtlpReceiver, endpoint, proxy_request_id
from tests.fakes import free_port


def _export(url: str, spans: list[tuple[str, dict]]) -> bool:
    """Spans named and attributed as given, through the SDK's OTLP/HTTP exporter (protobuf)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider()
    exporter = OTLPSpanExporter(endpoint=url, timeout=5)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("vllm.llm_engine")
    for name, attrs in spans:
        with tracer.start_as_current_span(name, attributes=attrs):
            pass
    provider.shutdown()
    return True


def test_the_sdk_exporter_s_spans_arrive_as_engine_spans_named_by_instance_and_request():
    async def go():
        got: list[EngineSpan] = []
        errors: list[str] = []
        port = free_port()
        rx = OtlpReceiver("127.0.0.1", port, got.append, errors.append)
        await rx.start()
        try:
            attrs = {"gen_ai.request.id": "cmpl-bench-pair-7-0", "gen_ai.latency.time_to_first_token": 0.0191,
                     "gen_ai.latency.time_in_queue": 0.0021, "gen_ai.latency.time_in_model_prefill": 0.0150,
                     "gen_ai.latency.time_in_model_decode": 0.2, "gen_ai.latency.e2e": 0.22,
                     "gen_ai.usage.prompt_tokens": 2032, "gen_ai.usage.completion_tokens": 31}
            await asyncio.to_thread(_export, endpoint("127.0.0.1", port, "D"),
                                    [("llm_request", attrs), ("something_else", {})])
            (s,) = got
            assert (s.instance, s.request_id, s.engine_request_id) == ("D", "bench-pair-7", "cmpl-bench-pair-7-0")
            assert s.ttft_ms == pytest.approx(19.1) and s.queue_ms == pytest.approx(2.1)
            assert s.prefill_ms == pytest.approx(15.0) and s.e2e_ms == pytest.approx(220.0)
            assert (s.prompt_tokens, s.completion_tokens) == (2032, 31) and s.end_s >= s.arrival_s > 0
            assert from_json(s.to_json()) == s  # goes through the proxy's/recorder's JSON lines
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                bad = await client.post("/v1/traces/P", content=b"\xff\x00not protobuf",
                                        headers={"content-type": "application/x-protobuf"})
                assert bad.status_code == 400 and errors and "P" in errors[0]
                assert (await client.get("/v1/traces/P")).status_code == 404
                empty = {"resourceSpans": []}
                ok = await client.post("/v1/traces/P", content=json.dumps(empty), headers={"content-type": "application/json"})
                assert ok.status_code == 200
        finally:
            await rx.stop()

    asyncio.run(asyncio.wait_for(go(), 30))


def test_request_ids_and_the_engine_flags():
    assert proxy_request_id("cmpl-abc-0") == "abc" and proxy_request_id("chatcmpl-x-1") == "x-1"
    assert proxy_request_id("other") == "other"
    cfg = config_mod.load_profile("cpu")
    assert not any("--otlp-traces-endpoint" in s.argv for s in config_mod.render(cfg))
    cfg.traces_port = 8017
    shifted = config_mod.shift_ports(cfg, 100)
    assert shifted.traces_port == 8117
    for spec in config_mod.render(shifted):
        i = spec.argv.index("--otlp-traces-endpoint")
        assert spec.argv[i + 1] == f"http://127.0.0.1:8117/v1/traces/{spec.name}"
        assert spec.env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
