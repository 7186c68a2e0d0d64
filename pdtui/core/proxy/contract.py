"""The P/D contract (P then D, the fallback policy, the choice of D) and the request handler, ``Proxy``.

The contract (DESIGN.md section 3, vLLM's ``toy_proxy_server.py``):

1. One id per request, sent to both legs as ``X-Request-Id``.
2. P leg: the body with ``max_tokens=1`` (and ``max_completion_tokens=1`` if present),
   ``stream=false``, no ``stream_options``/``min_tokens``, and ``kv_transfer_params`` as the
   connector wants them (its entry in ``pdtui.core.connectors``: NIXL's ``{"do_remote_decode": true,
   ...}``). Read the body, close it.
3. D leg: the client's body plus P's returned ``kv_transfer_params``, verbatim; D's bytes are
   streamed back with D's status and content type. P's sampled token is discarded. (With
   ``decode_reports_cached``: the exceptions of the silent-recompute check, below.)
4. Failures: no P up, or no connection to P could be made -> D colocated (the plain body),
   counted as a fallback: the only fallback, decided before the request reached a P. P answered
   502/503/504 or broke off after the request was sent -> sent once more (to another P when there
   is one); if that fails too, the error goes to the client. Any other P 5xx, or a 200 without
   ``kv_transfer_params`` -> an error to the client: never a silent prefill on D, which would hurt
   every other stream's ITL (llm-d and Dynamo dropped that fallback). ``ProxySettings.prefill_failure
   = "decode-locally"`` brings the old behaviour back (every P failure -> D colocated). Every branch is
   counted in ``pdtui_prefill_branch_total``. P 4xx -> that error to the client (the input is bad;
   D would say the same). D fails
   before the first byte -> an HTTP error with a JSON body. D dies mid-stream -> a final SSE error
   event, then the end of the body: never ``[DONE]``, never a retry (tokens would repeat), unless
   another D is up and the stream can go on there from the token ids D sent (``migrate``: the
   migration, docs/proxy.md). So does
   an SSE event of D's over 8 MiB without its end (``sse.MAX_EVENT_BYTES``, the most the proxy holds of
   one event), and D's connection is closed. Client disconnects -> D's connection is closed, which
   makes vLLM abort the request.

Every request ends in one ``RequestTraced`` (the ``on_trace`` callback) with its timings.

Silent recompute (``ProxySettings.decode_reports_cached``: D runs with
``--enable-prompt-tokens-details``; docs/architecture.md states the contract): on a paired request
the proxy takes P's prefix-cache hits (the connector's ``cached_param``, NIXL's
``remote_prefill_cached_tokens``) out of the params D gets,
so D's usage reports D's own cached tokens; it records ``d_computed_tokens`` = D's prompt_tokens -
cached_tokens and calls the request ``recomputed`` (an error class, counted in
``pdtui_recompute_total``) when that is more than one block. The client's usage gets P's figure
back, as vLLM would report it. A stream whose client did not ask for usage is sent to D with
``stream_options.include_usage`` and D's usage event is dropped on its way: only the final usage
event is parsed and touched, never a token chunk.

D's streamed bytes go through ``pdtui.core.proxy.relay`` (the data path: no await, no JSON parse
per chunk); the record of each request is ``pdtui.core.proxy.trace.Trace``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdtui.core import connectors, kvmath
from pdtui.core.events import RequestTraced
from pdtui.core.proxy import drillhooks, fields, firsttoken, httpio, migrate, routing
from pdtui.core.proxy.httpio import ConnectFailed, Request, Response, UpstreamError, UpstreamPool
from pdtui.core.proxy.metrics import ProxyMetrics
from pdtui.core.proxy.relay import Relay, Stitch, relay_for
from pdtui.core.proxy.settings import ProxySettings
from pdtui.core.proxy.sse import error_body
from pdtui.core.proxy.trace import Trace
from pdtui.core.proxy.usage import UsageCheck

MAX_BODY_BYTES = 32 * 2**20
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
PREFILL_KV_PARAMS = dict(connectors.NIXL.prefill_kv_params)
"""What P gets with the default connector (``ProxySettings.connector``: its entry's ``prefill_kv_params``)."""
WARMUP_HEADER = "x-pdtui-warmup"
RETRY_STATUSES = (502, 503, 504)
JSON = b"application/json"
SSE = b"text/event-stream; charset=utf-8"
"""vLLM's content type for a stream (what the proxy sends when it writes a stream itself)."""
_UPSTREAM_ERRORS = (OSError, TimeoutError, UpstreamError)
RELEASE_MODEL = "pdtui-release-kv"
"""The model name of a release request: one no engine serves. A D given P's kv_transfer_params
with it refuses the request before its engine sees it (404), and vLLM's serving layer then frees
P's blocks through the connector (0.32: ``_with_kv_transfer_rejection_cleanup`` ->
``notify_kv_transfer_request_rejected``: an aborted request whose ``request_finished`` tells P, over
NIXL, that no read is coming). No KV moves; D's pool is not touched."""
RELEASE_TIMEOUT_S = 5.0
"""The release request's bound (its answer included); past it, P's lease frees the blocks."""


@dataclass
class Upstream:
    """One vLLM instance as the proxy sees it."""

    name: str
    role: str
    url: str
    is_up: Callable[[], bool] = lambda: True
    inflight: int = 0
    pool: UpstreamPool | None = None
    fingerprint: str | None = None
    """D's system_fingerprint as its last usage event said ("": it sends none), None: not seen since
    it came up (UsageCheck stamps it on a dropped usage event's terminal events, n > 1)."""

    def open(self, connect_timeout_s: float) -> None:
        if self.pool is None:
            self.pool = UpstreamPool(self.url, connect_timeout_s=connect_timeout_s)

    async def aclose(self) -> None:
        if self.pool is not None:
            await self.pool.aclose()
            self.pool = None


class ProxyError(Exception):
    def __init__(self, status: int, message: str, type_: str = "proxy_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_


def _rebuild(d_body: dict[str, Any], new: dict[str, Any]) -> None:
    """D's body replaced by ``new`` (a chat request served from /v1/completions), keeping the
    stream_options the usage check gave it (D asked for its usage: ``Proxy._check_usage``)."""
    opts = d_body.get("stream_options")
    d_body.clear()
    d_body.update(new)
    if opts is not None:
        d_body["stream_options"] = opts


class Proxy:
    """The request handler. ``prefills`` and ``decodes`` are live lists (restarts keep their objects)."""

    def __init__(
        self,
        prefills: list[Upstream],
        decodes: list[Upstream],
        settings: ProxySettings | None = None,
        on_trace: Callable[[RequestTraced], None] | None = None,
        health: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.prefills = prefills
        self.decodes = decodes
        self.settings = settings or ProxySettings()
        self.on_trace = on_trace or (lambda t: None)
        self.health_info = health or (dict)
        self.metrics = ProxyMetrics()
        self.metrics.count_inflight(lambda: [(u.name, u.role, u.inflight) for u in self.prefills + self.decodes])
        s = self.settings
        connector = connectors.known(s.connector)
        if connector is None:
            raise ValueError(f"connector {s.connector!r}: one of {connectors.names()}")
        self.connector = connector
        """The KV connector's entry: the names of the kv_transfer_params the proxy sends and reads."""
        self.router = routing.Router(s.decode_choice)
        """The choices of D and P and each D's promised blocks (pdtui.core.proxy.routing); the
        Runtime's scrapes reach it through ``router.set_capacity``."""
        self._relays: set[Relay] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._last_params: dict[str, Any] | None = None
        """The last paired request's params from P (drillhooks' ``reuse`` only; kept with ``drill`` on)."""
        for up in prefills + decodes:
            up.open(s.connect_timeout_s)

    def start(self) -> None:
        """Start the watchdog of silent D streams (in the running loop)."""
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_silence(), name="proxy-watchdog")

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        for relay in list(self._relays):
            relay.broken("the proxy is shutting down", d_failed=False)
        for up in self.prefills + self.decodes:
            await up.aclose()

    def upstream_down(self, name: str) -> None:
        """``name`` is gone (its process died or is stopping): end its streams in flight now."""
        for up in self.prefills + self.decodes:
            if up.name == name:
                up.fingerprint = None  # a restart may serve another configuration
        for relay in list(self._relays):
            if relay.up.name == name:
                relay.broken(f"{name} went down (pdtui saw its process exit)")

    async def _watch_silence(self) -> None:
        limit = self.settings.decode_read_timeout_s
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.perf_counter()
            for relay in list(self._relays):
                if now - relay.last_rx > limit:
                    relay.broken(f"no byte from D for {limit:g} s")

    # ----- routing ------------------------------------------------------------------------
    async def handle(self, req: Request, resp: Response) -> None:
        method, path = req.method, req.path
        try:
            if path in GENERATE_PATHS:
                if method != "POST":
                    raise ProxyError(405, f"{path} takes POST", "invalid_request_error")
                await self._generate(req, resp)
            elif path == "/v1/models" and method == "GET":
                await self._forward_get(resp, "/v1/models")
            elif path == "/health":
                self._health(resp)
            elif path == "/metrics":
                resp.send(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
            else:
                raise ProxyError(404, f"no route {method} {path}; the proxy serves {', '.join(GENERATE_PATHS)},"
                                 " /v1/models, /health and /metrics", "not_found_error")
        except ProxyError as e:
            if not resp.started:
                resp.send(e.status, error_body(e.status, e.message, e.type), JSON)
        except _Relayed as r:
            if not resp.started:
                resp.send(r.status, r.content, r.ctype)

    def _health(self, resp: Response) -> None:
        info = {
            "prefill": {u.name: u.is_up() for u in self.prefills},
            "decode": {u.name: u.is_up() for u in self.decodes},
            **self.health_info(),
        }
        ok = any(u.is_up() for u in self.decodes)
        resp.send(200 if ok else 503, json.dumps(info).encode(), JSON)

    async def _forward_get(self, resp: Response, path: str) -> None:
        for up in self._candidates(self.decodes) + self._candidates(self.prefills):
            assert up.pool is not None
            try:
                conn = await up.pool.request("GET", path, [], head_timeout_s=self.settings.connect_timeout_s)
                content = await asyncio.wait_for(conn.read_all(), self.settings.connect_timeout_s)
            except _UPSTREAM_ERRORS:
                continue
            status, ctype = conn.status, conn.headers.get(b"content-type", JSON)
            up.pool.release(conn)
            resp.send(status, content, ctype)
            return
        raise ProxyError(503, "no instance is up to answer", "service_unavailable")

    # ----- the P/D dance ------------------------------------------------------------------
    @staticmethod
    def _candidates(ups: list[Upstream]) -> list[Upstream]:
        return sorted((u for u in ups if u.is_up()), key=lambda u: u.inflight)

    async def _generate(self, req: Request, resp: Response) -> None:
        rid = req.headers.get("x-request-id") or f"pdtui-{uuid.uuid4().hex[:16]}"
        faults = None
        try:
            body = _parse_body(req)
            try:
                asked = fields.read(body, chat=req.path == firsttoken.CHAT)
                if self.settings.drill and drillhooks.HEADER in req.headers:
                    faults = drillhooks.parse(req.headers[drillhooks.HEADER])
            except (fields.FieldError, drillhooks.DrillHeaderError) as e:
                raise ProxyError(400, str(e), "invalid_request_error") from None
        except ProxyError as e:  # refused at the door, before any engine: traced all the same
            trace = Trace(request_id=rid, endpoint=req.path, stream=False)
            trace.status, trace.error = e.status, e.message
            self._traced(trace)
            raise
        trace = Trace(request_id=rid, endpoint=req.path, stream=asked.stream)
        trace.warmup = WARMUP_HEADER in req.headers
        if faults is not None:
            trace.drill = req.headers[drillhooks.HEADER]
        if trace.warmup:  # "1", or "P=name,D=name": the P and the D this warm-up is for
            trace.warm_target = dict(part.split("=", 1) for part in req.headers[WARMUP_HEADER].split(",")
                                     if "=" in part)
        work = asyncio.ensure_future(self._serve(trace, body, asked, resp, faults))
        lost = asyncio.ensure_future(resp.wait_lost())
        try:
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done() and resp.started:
                await work  # D's answer is being relayed: the relay has seen the loss and ends itself
            elif not work.done():  # the client went away before D's answer began
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                trace.outcome, trace.status = "error", 499
                trace.error = trace.error or "client disconnected before the answer; legs closed"
            else:
                work.result()
        finally:
            lost.cancel()
            if not work.done():
                work.cancel()
            if trace.kv_held is not None:  # P answered and no D was sent its params
                await self._release(trace)
            self._traced(trace)

    async def _release(self, trace: Trace) -> None:
        """P holds ``trace``'s blocks for a D leg that was never sent: ask a D to refuse a request
        carrying P's params (``RELEASE_MODEL``), which frees them now instead of at the end of P's
        KV lease. Bounded (``RELEASE_TIMEOUT_S``); what happened goes to ``trace.kv_release``."""
        params, trace.kv_held = trace.kv_held, None
        blocks = f"{trace.prefill} holds {trace.blocks} blocks until its KV lease ends"
        ups = self._candidates(self.decodes)
        if not ups:
            trace.kv_release = {"result": "no_decode", "why": f"no decode instance up to release through; {blocks}"}
            return
        up = ups[0]
        pool = up.pool
        assert pool is not None
        body = {"model": RELEASE_MODEL, "prompt": "release", "max_tokens": 1, "kv_transfer_params": params}
        t = time.perf_counter()
        conn = None
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                conn = await pool.request("POST", firsttoken.COMPLETIONS,
                                          _json_headers(f"{trace.request_id}-release"), json.dumps(body).encode())
                content = await conn.read_all()
        except (*_UPSTREAM_ERRORS, asyncio.CancelledError) as e:
            if conn is not None:
                pool.busy.discard(conn)
                conn.close()
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            trace.kv_release = {"result": "failed", "via": up.name, "why": f"{why}; {blocks}",
                                "ms": round((time.perf_counter() - t) * 1000, 1)}
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        status = conn.status
        pool.release(conn)
        ms = round((time.perf_counter() - t) * 1000, 1)
        # vLLM frees P's blocks for any refusal of the request (an ErrorResponse); the unknown
        # model's is 404. A 200 would mean D served a model of that name: nothing was freed.
        ok = 400 <= status < 500
        trace.kv_release = {"result": "released" if ok else "failed", "via": up.name, "status": status, "ms": ms,
                            "why": (f"{up.name} refused the release ({status}): {trace.prefill}'s"
                                    f" {trace.blocks} blocks freed through vLLM's rejection path") if ok else
                            f"{up.name} answered {status}: {content[:200].decode('utf-8', 'replace')}; {blocks}"}

    def _traced(self, trace: Trace) -> None:
        self.router.release(trace)  # D frees the request's blocks
        event = trace.freeze()
        self.metrics.observe(event)
        self.on_trace(event)

    async def _serve(self, trace: Trace, body: dict[str, Any], asked: fields.Fields, resp: Response,
                     faults: drillhooks.DrillFaults | None = None) -> None:
        if not any(u.is_up() for u in self.decodes):  # before P prefills and pins blocks for nothing
            trace.status, trace.error = 503, "no decode instance is up"
            raise ProxyError(503, "no decode instance is up; the pair cannot serve", "service_unavailable")
        kv_params = await self._prefill(trace, body)
        trace.kv_held = kv_params or None  # until D is sent them (``_release`` otherwise); a store holds none on P
        d_body = dict(body)
        if kv_params is not None:
            if faults is not None and faults.hold_decode_s:
                await asyncio.sleep(faults.hold_decode_s)  # a drill: the window before D's dispatch, widened
            if self.settings.decode_reports_cached:
                kv_params = self._check_usage(trace, body, asked, d_body, kv_params)
            if self.settings.drill:
                previous, self._last_params = self._last_params, trace.kv_held
                if faults is not None and faults.tamper is not None:  # D never gets P's own: released at the end
                    if self.connector.blocks_param is None:
                        raise ProxyError(400, f"{drillhooks.HEADER}: tamper needs a connector whose params list"
                                         f" P's blocks; {self.connector.key} carries none", "invalid_request_error")
                    kv_params = drillhooks.tampered(faults.tamper, kv_params, previous, self.connector.blocks_param)
                    trace.kv_tampered = True
            if kv_params or self.connector.carries_params:
                d_body["kv_transfer_params"] = kv_params
            trace.paired = True
        t_hop = time.perf_counter()
        stitch = self._switches(trace, body, d_body) if kv_params is not None else None
        if stitch is not None and stitch.first:
            await self._first_token(trace, d_body, resp, t_hop, stitch)
        else:
            await self._decode(trace, d_body, resp, t_hop, stitch)

    def _check_usage(self, trace: Trace, body: dict[str, Any], asked: fields.Fields, d_body: dict[str, Any],
                     kv_params: dict[str, Any]) -> dict[str, Any]:
        """decode_reports_cached, paired: D's params without P's cached tokens (D then reports its
        own), D asked for usage in a stream; returns D's params (the module's docstring)."""
        kv_params = dict(kv_params)
        cached_param = self.connector.cached_param
        p_cached = kv_params.pop(cached_param, None) if cached_param else None
        opts = body.get("stream_options")
        drop = trace.stream and not asked.include_usage
        if drop:  # usage for the proxy only, and no usage in every chunk
            d_body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True,
                                        "continuous_usage_stats": False}
        trace.usage_check = UsageCheck(trace, self.settings.block_size,
                                        p_cached if isinstance(p_cached, int) else None, drop,
                                        single=(fields.as_int(body.get("n")) or 1) == 1)
        return kv_params

    def _switches(self, trace: Trace, body: dict[str, Any], d_body: dict[str, Any]) -> Stitch | None:
        """The TTFT switches (pdtui.core.proxy.firsttoken), once P has paired: D's body rewritten for
        tokenize_once, or a Stitch when first_token_from_p serves this request, or a chat request
        is served from D's /v1/completions (either switch)."""
        s = self.settings
        if not (s.first_token_from_p or s.tokenize_once):
            return None
        chat = trace.endpoint == firsttoken.CHAT
        p = (firsttoken.chat_p_answer if chat else firsttoken.p_answer)(trace.p_answer)
        trace.p_answer = None
        after_p = "no_token_ids" if p is None else firsttoken.chat_parser_seen(p) if chat else None
        want_ids = fields.flag(body.get("return_token_ids"))
        kv_params = d_body["kv_transfer_params"]
        if s.first_token_from_p:
            why = firsttoken.first_token_skip(trace.endpoint, body) or after_p
            if why is None and p is not None and firsttoken.crosses_block(p, s.block_size):
                why = "block_boundary"
            if why is None and p is not None and trace.blocks != kvmath.blocks_for_tokens(len(p.prompt_ids), s.block_size):
                why = "block_size_mismatch"  # P's blocks disagree with block_size: the boundary can't be told
            if why is None and p is not None:
                if chat:
                    _rebuild(d_body, firsttoken.chat_decode_body(body, kv_params, p, first=True))
                else:
                    d_body.update(firsttoken.decode_body(body, kv_params, p))
                return Stitch(p, want_ids=want_ids, chat=chat)
            trace.switch_skipped = why
        if s.tokenize_once:
            why = firsttoken.tokenize_once_skip(trace.endpoint, body) or after_p
            if why is None and p is not None:
                trace.switch = "tokenize_once"
                if chat:
                    _rebuild(d_body, firsttoken.chat_decode_body(body, kv_params, p, first=False))
                    return Stitch(p, want_ids=want_ids, first=False, chat=True)
                d_body["prompt"] = p.prompt_ids
            else:
                trace.switch_skipped = trace.switch_skipped or why
        return None

    async def _first_token(self, trace: Trace, d_body: dict[str, Any], resp: Response, t_hop: float,
                           stitch: Stitch) -> None:
        """first_token_from_p: P's token to the client now; D continues (or P's token ended it)."""
        p = stitch.p
        head = [(b"content-type", SSE), (b"x-request-id", trace.request_id.encode()),
                (b"cache-control", b"no-cache")]
        if p.finished:  # EOS or a stop token at P: no D leg (``_release`` frees P's blocks at the end)
            trace.switch, trace.decode = "first_token_p_only", None
            trace.ttft_ms = (time.perf_counter() - trace.t0) * 1000
            trace.chunks, trace.completion_tokens, trace.status, trace.outcome = 1, 1, 200, trace.served()
            if trace.stream:
                include_usage = fields.flag((d_body.get("stream_options") or {}).get("include_usage"))
                resp.start(200, head)
                only = firsttoken.chat_p_only_stream if stitch.chat else firsttoken.p_only_stream
                resp.finish(only(p, stitch.want_ids, include_usage))
            else:
                answer = firsttoken.chat_p_only_json if stitch.chat else firsttoken.p_only_json
                resp.send(200, answer(p, stitch.want_ids), JSON, [(b"x-request-id", trace.request_id.encode())])
            return
        trace.switch = "first_token"
        if trace.stream:
            resp.start(200, head)
            first = firsttoken.chat_first_events if stitch.chat else firsttoken.first_event
            resp.write(first(p, stitch.want_ids))
            stitch.t_first = now = time.perf_counter()
            trace.ttft_ms, trace.chunks, trace.status = (now - trace.t0) * 1000, 1, 200
        try:
            await self._decode(trace, d_body, resp, t_hop, stitch)
        except (ProxyError, _Relayed) as e:
            if not resp.started:
                raise
            why = e.message if isinstance(e, ProxyError) else e.content[:300].decode("utf-8", "replace")
            trace.outcome, trace.status = "error", 200
            trace.error = f"decode failed after P's token was sent: {why}"
            resp.finish(b"data: " + error_body(502, trace.error, "upstream_error") + b"\n\n")

    async def _prefill(self, trace: Trace, body: dict[str, Any]) -> dict[str, Any] | None:
        """The P leg, with the fallback policy (the module's docstring, point 4). Returns P's
        kv_transfer_params, or None to serve the request on D colocated (a fallback)."""
        p_body = prefill_body(body, self.connector.prefill_kv_params)
        if (self.settings.first_token_from_p or self.settings.tokenize_once) and (
                trace.endpoint == firsttoken.COMPLETIONS or firsttoken.chat_skip(body) is None):
            p_body["return_token_ids"] = True  # the prompt's ids and the token's (pdtui.core.proxy.firsttoken)
        payload = json.dumps(p_body).encode()
        tried: list[str] = []
        unreachable: list[str] = []
        first: _PrefillFailed | None = None
        while True:
            ups = self.router.order_prefills(self.prefills)  # by load, then queue
            if "P" in trace.warm_target:
                ups = [u for u in ups if u.name == trace.warm_target["P"]]
            if not ups:
                after = f" (for the retry, after: {first.message})" if first else ""
                self._fall_back(trace, "fallback_down", f"prefill_down: no prefill instance is up{after}")
                return None
            up = next((u for u in ups if u.name not in tried), ups[0])
            tried.append(up.name)
            trace.prefill = up.name
            trace.prefill_attempts += 1
            try:
                params = await self._prefill_once(trace, up, payload)
            except _PrefillFailed as f:
                if f.kind == "unreachable":
                    # never sent: another P that is up and not tried yet takes it (2P1D with one P
                    # killed, before pdtui saw it go); with none left, D computes it
                    if any(u.name not in tried for u in self.router.order_prefills(self.prefills)):
                        unreachable.append(f"{up.name}: {f.message}")
                        continue
                    self._fall_back(trace, "fallback_unreachable",
                                    f"prefill_unreachable: {'; '.join([*unreachable, f.message])}")
                    return None
                if self.settings.prefill_failure == "decode-locally":
                    self._fall_back(trace, "decode_locally", f.reason)
                    return None
                if f.kind == "retryable" and first is None:
                    first = f
                    continue
                branch = {"retryable": "error_retry_failed", "no_kv": "error_no_kv"}.get(f.kind, "error_5xx")
                trace.prefill_branch = branch
                message = f.message if first is None else f"{f.message} (retried after: {first.message})"
                trace.status, trace.error, trace.failed = f.status, message, up.name
                raise ProxyError(f.status, message, "upstream_error") from None
            if first is not None:
                trace.prefill_branch = "retry_ok"
            elif unreachable:
                trace.prefill_branch = "next_p"
            return params

    def _fall_back(self, trace: Trace, branch: str, reason: str) -> None:
        trace.prefill_branch, trace.fallback_reason = branch, reason

    async def _prefill_once(self, trace: Trace, up: Upstream, payload: bytes) -> dict[str, Any]:
        """One P request. Returns P's kv_transfer_params; raises _PrefillFailed, or _Relayed for a 4xx."""
        assert up.pool is not None
        t = time.perf_counter()
        up.inflight += 1
        conn = None
        try:
            async with asyncio.timeout(self.settings.prefill_timeout_s):
                conn = await up.pool.request("POST", trace.endpoint, _json_headers(trace.request_id), payload)
                content = await conn.read_all()
        except ConnectFailed as e:
            raise _PrefillFailed("unreachable", 502, f"{up.name}: {e}", f"prefill_unreachable: {e}") from None
        except TimeoutError as e:
            if conn is not None:
                conn.close()
            why = f"prefill {up.name} did not answer within {self.settings.prefill_timeout_s:g} s"
            raise _PrefillFailed("retryable", 504, why, f"prefill_unreachable: {why}") from e
        except _UPSTREAM_ERRORS as e:
            if conn is not None:
                conn.close()
            why = f"prefill {up.name} broke off: {type(e).__name__}: {e}"
            raise _PrefillFailed("retryable", 502, why, f"prefill_unreachable: {type(e).__name__}: {e}") from None
        except asyncio.CancelledError:
            if conn is not None:
                conn.close()
            raise
        finally:
            up.inflight -= 1
        status, p_ctype = conn.status, conn.headers.get(b"content-type", JSON)
        up.pool.release(conn)
        trace.prefill_ms = (time.perf_counter() - t) * 1000
        if status >= 500:
            text = content[:200].decode("utf-8", "replace")
            why = f"prefill {up.name} answered {status}: {text}"
            kind = "retryable" if status in RETRY_STATUSES else "fatal"
            raise _PrefillFailed(kind, status, why, f"prefill_5xx: {up.name} answered {status}: {text}")
        if status >= 400:
            # Bad input: D would refuse it the same way. Pass P's answer through.
            trace.status = status
            trace.error = content[:500].decode("utf-8", "replace")
            raise _Relayed(status, content, p_ctype)
        try:
            data = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _PrefillFailed("no_kv", 502, f"prefill {up.name} answered 200 with a body that is not JSON",
                                 "prefill_5xx: prefill answered 200 with a body that is not JSON") from None
        params = data.get("kv_transfer_params") if isinstance(data, dict) else None
        trace.p_answer = data
        usage = (data.get("usage") if isinstance(data, dict) else None) or {}
        trace.prompt_tokens = usage.get("prompt_tokens")
        if not self.connector.carries_params:  # the KV meets D in the connector's store, found by the tokens
            if isinstance(trace.prompt_tokens, int):
                trace.blocks = kvmath.stored_blocks(trace.prompt_tokens, self.settings.block_size)
                if self.settings.geometry is not None:
                    trace.kv_bytes = kvmath.shipped_bytes(trace.blocks, self.settings.block_size, self.settings.geometry)
            return {}
        if not params or not isinstance(params, dict):
            why = (f"prefill {up.name} returned no kv_transfer_params (is it running with a"
                   f" {self.connector.kv_roles['prefill']}"
                   " kv_transfer_config?)")
            raise _PrefillFailed("no_kv", 502, why, f"no_kv_transfer_params: {why}")
        trace.blocks = kvmath.count_blocks(params.get(self.connector.blocks_param or ""))
        if self.settings.geometry is not None:
            trace.kv_bytes = kvmath.shipped_bytes(trace.blocks, self.settings.block_size, self.settings.geometry)
        return params

    def pick_decode(self, trace: Trace | None = None, body: dict[str, Any] | None = None) -> Upstream | None:
        """The decode instance for the next request (``settings.decode_choice``, pdtui.core.proxy.routing);
        None if none is up. With the request's ``trace`` (and D's ``body``), the reason goes into
        its trace and the blocks it will take are promised to that D until the trace ends."""
        s = self.settings
        demand = None if trace is None else routing.demand_of(trace.prompt_tokens, trace.blocks, body or {},
                                                              s.block_size, s.max_model_len)
        up, why = self.router.pick_decode(self.decodes, demand)
        if trace is not None and "D" in trace.warm_target:  # a warm-up for one D: that D or none
            up = next((u for u in self.decodes if u.name == trace.warm_target["D"] and u.is_up()), None)
            why = f"warm-up of {trace.warm_target['D']}"
        if trace is not None:
            trace.decode_reason = why
            if up is not None and demand is not None:
                self.router.promise(trace, up.name, demand, trace)
        return up

    async def _decode(self, trace: Trace, body: dict[str, Any], resp: Response, t_hop: float,
                      stitch: Stitch | None = None) -> None:
        up = self.pick_decode(trace, body)
        if up is None:
            trace.status, trace.error = 503, "no decode instance is up"
            raise ProxyError(503, "no decode instance is up; the pair cannot serve", "service_unavailable")
        trace.decode = up.name
        assert up.pool is not None
        path = firsttoken.COMPLETIONS if stitch is not None and stitch.chat else trace.endpoint
        mig, body = migrate.arm(self, trace, body, path, stitch)  # D's token ids asked for when it can go on elsewhere
        payload = json.dumps(body).encode()
        t_sent = time.perf_counter()
        trace.hop_ms = (t_sent - t_hop) * 1000
        up.inflight += 1
        conn = None
        try:
            try:
                conn = await up.pool.request("POST", path, _json_headers(trace.request_id), payload,
                                             head_timeout_s=self.settings.decode_read_timeout_s,
                                             on_sent=None if trace.kv_tampered else
                                             lambda: setattr(trace, "kv_held", None))
            except _UPSTREAM_ERRORS as e:
                trace.status, trace.failed = 502, up.name
                trace.error = f"decode {up.name} unreachable: {type(e).__name__}: {e}"
                raise ProxyError(502, trace.error, "upstream_error") from None
            await self._relay_decode(trace, up, conn, resp, t_sent, stitch, mig)
        finally:
            up.inflight -= 1
            if conn is not None:
                if conn.complete and not resp.lost:
                    up.pool.release(conn)
                else:
                    up.pool.busy.discard(conn)
                    conn.close()
        if mig is not None and mig.pending is not None:  # D died under the stream: on to another D
            await mig.run(resp)

    async def _read_decode(self, trace: Trace, up: Upstream, conn: httpio.ClientConnection) -> bytes:
        try:
            return await asyncio.wait_for(conn.read_all(), self.settings.decode_read_timeout_s)
        except _UPSTREAM_ERRORS as e:
            trace.status, trace.failed = 502, up.name
            trace.error = f"decode {up.name} failed before answering: {type(e).__name__}: {e}"
            raise ProxyError(502, trace.error, "upstream_error") from None

    async def _relay_decode(self, trace: Trace, up: Upstream, conn: httpio.ClientConnection, resp: Response,
                            t_sent: float, stitch: Stitch | None = None,
                            migration: migrate.Migration | None = None) -> None:
        ctype = conn.headers.get(b"content-type", JSON)
        if conn.status != 200:
            content = await self._read_decode(trace, up, conn)
            trace.status, trace.error = conn.status, content[:500].decode("utf-8", "replace")
            if conn.status >= 500:  # a 4xx is the client's input, refused
                trace.failed = up.name
            if b"json" not in ctype:
                content = error_body(conn.status, f"decode {up.name}: {trace.error}", "upstream_error")
                ctype = JSON
            raise _Relayed(conn.status, content, ctype)
        if not trace.stream:
            content = await self._read_decode(trace, up, conn)
            now = time.perf_counter()
            trace.decode_ttft_ms = (now - t_sent) * 1000
            trace.ttft_ms = (now - trace.t0) * 1000
            if trace.usage_check is not None:  # D's own usage, before P's token is merged in
                content = trace.usage_check.client_json(content)
            if stitch is not None:  # P's token in front of D's answer (first_token_from_p), or chat from D's
                try:
                    content = firsttoken.chat_json(stitch.p, content, stitch.want_ids, stitch.first) if stitch.chat \
                        else firsttoken.merge_json(stitch.p, content, stitch.want_ids)
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    trace.status, trace.failed = 502, up.name
                    trace.error = f"decode {up.name} answered 200 with a body that is not a completion"
                    raise ProxyError(502, trace.error, "upstream_error") from None
            with contextlib.suppress(json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                usage = json.loads(content).get("usage") or {}
                trace.completion_tokens = usage.get("completion_tokens")
                trace.prompt_tokens = trace.prompt_tokens or usage.get("prompt_tokens")
            trace.status, trace.outcome = 200, trace.served()
            resp.send(200, content, ctype, [(b"x-request-id", trace.request_id.encode())])
            return
        relay = relay_for(trace, up, conn, resp, t_sent, stitch, migration)
        self._relays.add(relay)
        try:
            relay.start(ctype)
            await relay.done
        finally:
            self._relays.discard(relay)


def prefill_body(body: dict[str, Any], kv_params: Mapping[str, Any]) -> dict[str, Any]:
    """P's body (the module's docstring, point 2): one token, not streamed, the connector's params."""
    p_body = dict(body)
    p_body["max_tokens"] = 1
    if "max_completion_tokens" in p_body:
        p_body["max_completion_tokens"] = 1
    p_body["stream"] = False
    for k in ("stream_options", "min_tokens"):
        p_body.pop(k, None)
    if kv_params:  # a connector that carries none (storage): P's body has none either
        p_body["kv_transfer_params"] = dict(kv_params)
    else:
        p_body.pop("kv_transfer_params", None)
    return p_body


def _json_headers(request_id: str) -> httpio.Headers:
    return [(b"content-type", JSON), (b"x-request-id", request_id.encode())]


def _parse_body(req: Request) -> dict[str, Any]:
    """The request's JSON object, or a ProxyError with the 4xx that vLLM would answer."""
    if req.body_too_large:
        raise ProxyError(413, f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error")
    media_type = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":  # as vLLM's validate_json_request
        raise ProxyError(415, f"Unsupported Media Type: Only 'application/json' is allowed"
                         f" (got {media_type or 'no content-type'})", "invalid_request_error")
    try:
        body = json.loads(req.body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProxyError(400, f"request body is not valid JSON: {e}", "invalid_request_error") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object", "invalid_request_error")
    return body


class _PrefillFailed(Exception):
    """One P request failed. ``kind``: unreachable (never sent: a fallback is allowed), retryable
    (502/503/504, broke off, timed out), fatal (another 5xx), no_kv (200 without kv_transfer_params).
    ``status`` is what the client gets if it ends the request; ``reason`` is the fallback reason
    under prefill_failure="decode-locally" (the words pdtui used before)."""

    def __init__(self, kind: str, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.kind, self.status, self.message, self.reason = kind, status, message, reason


class _Relayed(Exception):
    """An upstream's non-200 answer, passed through as it is."""

    def __init__(self, status: int, content: bytes, ctype: bytes) -> None:
        self.status, self.content, self.ctype = status, content, ctype

