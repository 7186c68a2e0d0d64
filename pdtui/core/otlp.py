"""An OTLP/HTTP trace receiver: the engines' own per-request spans, joined to the proxy's traces.

vLLM exports one span per finished request ("llm_request", ``vllm/v1/engine/output_processor.py``
``do_tracing``) when it runs with ``--otlp-traces-endpoint``. pdtui starts each engine with
``http://HOST:PORT/v1/traces/<instance>`` and ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf``
(config field ``traces_port``), so the path names the instance. The body is an
``ExportTraceServiceRequest``, decoded with the opentelemetry-proto package (protobuf, or its JSON
mapping), never by hand. Each "llm_request" span becomes an ``EngineSpan`` event.

What a span measures (vLLM's RequestStateStats, engine-side clocks), and what pdtui infers:

- ``arrival``: the span's start, when the API server handed the request to the engine client
  (after the HTTP body was parsed and the prompt tokenized);
- ``queue_ms``: scheduled - queued (in the engine core's waiting queue). On D a request that pulls
  its KV waits in WAITING_FOR_REMOTE_KVS before it is scheduled to compute, so the KV read is in
  here or in ``prefill_ms``, not a span of its own;
- ``prefill_ms``: first token - scheduled (the first step: on P the prefill, on D the last
  token's recompute and whatever of the KV wait followed scheduling);
- ``ttft_ms``: first token - arrival; ``decode_ms``: last token - first token.
- Inferred, not measured: the time before ``arrival`` inside the engine's API server (HTTP,
  JSON, tokenization) = the proxy's leg time - the engine's e2e, less the response's way back.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import socket
from collections.abc import Callable
from typing import Any

from pdtui.core.events import EngineSpan
from pdtui.core.proxy import httpio

SPAN_NAME = "llm_request"
PATH = "/v1/traces"
MAX_BODY = 16 * 2**20
_ATTR = {
    "gen_ai.latency.time_to_first_token": "ttft_ms",
    "gen_ai.latency.time_in_queue": "queue_ms",
    "gen_ai.latency.time_in_model_prefill": "prefill_ms",
    "gen_ai.latency.time_in_model_decode": "decode_ms",
    "gen_ai.latency.e2e": "e2e_ms",
}


def endpoint(host: str, port: int, instance: str) -> str:
    """The --otlp-traces-endpoint an instance is started with."""
    return f"http://{host}:{port}{PATH}/{instance}"


def proxy_request_id(engine_id: str) -> str:
    """The proxy's X-Request-Id behind vLLM's request id: completions are named
    ``cmpl-<X-Request-Id>-<prompt index>``, chat ``chatcmpl-<X-Request-Id>``."""
    if engine_id.startswith("cmpl-"):
        return re.sub(r"-\d+$", "", engine_id[5:])
    if engine_id.startswith("chatcmpl-"):
        return engine_id[9:]
    return engine_id


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("string_value", "int_value", "double_value", "bool_value") else None


def spans_of(body: bytes, ctype: str, instance: str) -> list[EngineSpan]:
    """The "llm_request" spans of one export request. Raises ValueError on a body that does not decode."""
    from google.protobuf import json_format
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    msg = ExportTraceServiceRequest()
    try:
        if "json" in ctype:
            json_format.Parse(body, msg)
        else:
            msg.ParseFromString(body)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError) as e:
        raise ValueError(f"not an OTLP ExportTraceServiceRequest: {e}") from None
    out: list[EngineSpan] = []
    for rs in msg.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                if span.name != SPAN_NAME:
                    continue
                attrs = {a.key: _value(a.value) for a in span.attributes}
                engine_id = str(attrs.get("gen_ai.request.id") or "")
                times = {name: attrs[key] * 1000.0 for key, name in _ATTR.items()
                         if isinstance(attrs.get(key), (int, float))}
                out.append(EngineSpan(
                    instance=instance, request_id=proxy_request_id(engine_id), engine_request_id=engine_id,
                    arrival_s=span.start_time_unix_nano / 1e9, end_s=span.end_time_unix_nano / 1e9,
                    prompt_tokens=attrs.get("gen_ai.usage.prompt_tokens"),
                    completion_tokens=attrs.get("gen_ai.usage.completion_tokens"), **times))
    return out


class OtlpReceiver:
    """POST /v1/traces/<instance> (protobuf or JSON, gzip or not) -> ``on_span`` per span."""

    def __init__(self, host: str, port: int, on_span: Callable[[EngineSpan], None],
                 on_error: Callable[[str], None] | None = None) -> None:
        self.host, self.port = host, port
        self.on_span = on_span
        self.on_error = on_error or (lambda text: None)
        self.received = 0
        self._server: httpio.Server | None = None

    async def start(self) -> None:
        from pdtui.core.supervisor import check_port_free

        check_port_free(self.host, self.port, "OTLP trace receiver (traces_port)")
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(64)
        sock.setblocking(False)
        self._server = await httpio.serve(self._handle, sock, max_body=MAX_BODY,
                                          on_error=lambda e: self.on_error(f"OTLP receiver: {e!r}"))

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None

    async def _handle(self, req: httpio.Request, resp: httpio.Response) -> None:
        if req.method != "POST" or not (req.path == PATH or req.path.startswith(PATH + "/")):
            resp.send(404, b'{"error": "POST /v1/traces/<instance>"}', b"application/json")
            return
        if req.body_too_large:
            resp.send(413, b'{"error": "body too large"}', b"application/json")
            return
        instance = req.path[len(PATH):].strip("/") or "?"
        body = req.body
        try:
            if req.headers.get("content-encoding", "") == "gzip":
                body = gzip.decompress(body)
            spans = spans_of(body, req.headers.get("content-type", ""), instance)
        except (ValueError, OSError, EOFError) as e:
            self.on_error(f"OTLP receiver: {instance}: {e}")
            resp.send(400, b'{"error": "not an OTLP trace export"}', b"application/json")
            return
        for span in spans:
            self.received += 1
            self.on_span(span)
        resp.send(200, b"", b"application/x-protobuf")  # an empty ExportTraceServiceResponse


async def _main() -> None:  # pragma: no cover - by hand: python -m pdtui.core.otlp PORT
    import sys

    receiver = OtlpReceiver("127.0.0.1", int(sys.argv[1]), lambda s: print(s.to_json(), flush=True))
    await receiver.start()
    await asyncio.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    asyncio.run(_main())
