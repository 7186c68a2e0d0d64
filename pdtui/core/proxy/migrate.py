"""Migration: a stream whose D died goes on on another D (issue 24; docs/proxy.md, "Migration").

When the D of a paired stream breaks after its first token (its connection drops, pdtui saw its
process exit, or it fell silent) and another D is up, the proxy continues the stream there instead
of ending it with the error event:

1. **The tokens sent, as ids.** A stream that can go on elsewhere is sent to D with
   ``return_token_ids`` (``arm``); vLLM 0.32.0 then writes the prompt's ids on its first event
   (``prompt_token_ids``) and each event's new ids (``token_ids``), as lists where it otherwise
   writes ``null``. ``Tracker`` reads them off every whole event in bytes (a ``find`` and a slice,
   no JSON) and, when the client did not ask for them, writes ``null`` back: the client gets what
   it would have got. Text would not do: the text of the tokens, tokenized again, can be other ids.
2. **The continuation.** A /v1/completions request whose prompt is D's prompt ids plus every id
   sent, ``max_tokens`` less the tokens sent (``min_tokens`` too), the rest of D's body as it was
   (sampling, seed, ``ignore_eos``, stream options); chat goes through /v1/completions from the
   rendered prompt's ids, as the TTFT switches do (``firsttoken.chat_decode_body``). By
   ``ProxySettings.migrate``: ``via-prefill`` sends it to a P first (its one-token leg, as for any
   request) and the new D gets P's ``kv_transfer_params``: a second transfer; ``on-decode``: the new
   D computes it. Under via-prefill, no P up or no connection to one goes to the new D as on-decode
   (as the fallback policy does before dispatch); a P that answers an error ends the migration.
3. **One stream for the client.** The new D's events go on after the old one's: the same
   ``id``/``created``/``model`` (the old D's, written over the new D's), no second role chunk, no
   prompt ids, no ``[DONE]`` between; chat is written back as chat (``firsttoken.ChatStream``). The
   usage event counts the original prompt and every token generated: the tokens sent move from the
   new D's prompt to the completion (its total is unchanged). The byte scan and the usage check go
   on as they were (the seam is a gap in the trace's ITL).

When not: D's error event (its own answer: vLLM reporting), a break before D's first token, after
its last (a finish reason seen), past ``migrate_max`` migrations, no other D up, or a request that
cannot go on token for token (``skip_reason``): the error event of today, the reason added to it.
One D configured, or ``migrate = "off"``: nothing here runs (no ids asked, no filter).

Every death seen with migration on and two D is in the trace (``RequestTraced.migrations``) and in
``pdtui_migrations_total{result}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pdtui.core.proxy import fields, firsttoken, routing
from pdtui.core.proxy.relay import ChunkFilter, Relay, WholeEvents
from pdtui.core.proxy.sse import error_body
from pdtui.core.proxy.trace import Trace

if TYPE_CHECKING:
    from pdtui.core.proxy import httpio
    from pdtui.core.proxy.contract import Proxy, Upstream
    from pdtui.core.proxy.httpio import Response
    from pdtui.core.proxy.relay import Stitch

RESULTS = ("ok", "failed", "no_decode", "limit", "ineligible")
"""How a death under a stream ended (``pdtui_migrations_total{result}``, RequestTraced.migrations):
ok (the new D sent its first token), failed (the attempt did not get there), no_decode (no other D
up), limit (migrate_max reached), ineligible (the request cannot go on token for token)."""

_IDS = b'"token_ids":['
_PROMPT_IDS = b'"prompt_token_ids":['
_FINISH = b'"finish_reason":"'
"""An event that ends its choice (vLLM writes compact JSON: ``"finish_reason":null`` on the others)."""
_FINAL_USAGE = (b'"choices":[]', b'"choices": []')
_JSTR = rb'"(?:[^"\\]|\\.)*"'
_HEAD = re.compile(rb'\{"id":(' + _JSTR + rb'),"object":"([a-z_.]+)","created":(\d+),"model":(' + _JSTR + rb')')
"""An event's head as vLLM 0.32.0 writes it (compact, these keys first)."""
_STRUCTURED = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
               "guided_grammar")


def skip_reason(path: str, body: dict[str, Any], p_answer: Any = None) -> str | None:
    """Why D's leg (``path``, ``body`` as D gets it) cannot be continued on another D token for
    token, or None when it can. ``p_answer``: P's parsed answer (chat: a parser at work shows there)."""
    if path == firsttoken.CHAT:
        if (why := firsttoken.chat_skip(body)) is not None:
            return why  # tools, logprobs, n, echo, an unset max_tokens, multimodal parts, ...
        if _parser_seen(p_answer):
            return "chat_parser"  # a reasoning or tool parser shapes the stream (and asks for more chunks)
    else:
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) or firsttoken._is_ids(prompt)):
            return "prompt_batch"
        if (fields.as_int(body.get("n")) or 1) != 1 or (fields.as_int(body.get("best_of")) or 1) != 1 \
                or body.get("use_beam_search"):
            return "n"
        if fields.flag(body.get("echo")):
            return "echo"
        if body.get("logprobs") is not None or body.get("prompt_logprobs") is not None:
            return "logprobs"  # text offsets would start again at the seam
        if (body.get("stream_options") or {}).get("continuous_usage_stats"):
            return "continuous_usage"
    if body.get("stop") or body.get("bad_words"):
        return "stop_strings"  # text held back for a stop string, and a match across the seam, would be lost
    if body.get("frequency_penalty") or body.get("presence_penalty"):
        return "penalties"  # they count output tokens: after the seam those are prompt
    if any(body.get(k) for k in _STRUCTURED):
        return "structured_output"  # the grammar's state would start again
    return None


def _parser_seen(p_answer: Any) -> bool:
    """P's chat answer shows a reasoning or tool parser (``firsttoken.chat_parser_seen``'s test)."""
    try:
        message = p_answer["choices"][0]["message"]
        return bool(message.get("reasoning") or message.get("reasoning_content") or message.get("tool_calls")
                    or (p_answer.get("usage") or {}).get("completion_tokens_details") is not None)
    except (KeyError, IndexError, TypeError, AttributeError):
        return False


def arm(proxy: Proxy, trace: Trace, body: dict[str, Any], path: str,
        stitch: Stitch | None) -> tuple[Migration | None, dict[str, Any]]:
    """D's first leg: a Migration when a death of D could be migrated (two D or more, migration on,
    a paired stream) and D's body, with ``return_token_ids`` when the request can go on elsewhere.
    A request that cannot gets a Migration all the same (no tracking): its death is recorded as
    ineligible, with why, and the stream ends as it does today."""
    s = proxy.settings
    if s.migrate == "off" or len(proxy.decodes) < 2 or not trace.stream or not trace.paired:
        return None, body
    why = skip_reason(path, body, trace.p_answer)
    want_ids = fields.flag(body.get("return_token_ids"))
    m = Migration(proxy, trace, body, path, stitch, want_ids, skip=why)
    if why is None:
        body = {**body, "return_token_ids": True}
    return m, body


class Tracker:
    """D's token ids, read off its whole events (``WholeEvents`` before it), and taken out of them
    where the client did not ask for them (``null``, as vLLM writes it then). Per event: a ``find``
    of ``"token_ids":[`` and of its ``]``, the slice kept as D wrote it (parsed only if a
    migration needs it); the prompt's ids once per leg (its first event)."""

    __slots__ = ("finished", "head", "on_ids", "prompt", "prompt_pending", "segs", "strip", "strip_prompt")

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        """The client did not ask for token ids: each event's list becomes null."""
        self.strip_prompt = strip
        """The same for the prompt's (always on a continuation: the client got them, or did not ask)."""
        self.prompt_pending = True
        """This leg's first event, with the prompt's ids, has not come yet."""
        self.prompt: bytes | None = None
        """The first leg's prompt ids as D wrote them (``1,2,3``)."""
        self.head: bytes | None = None
        """The first leg's first event head (``{"id":...,"model":"..."``), the client's id/created/model."""
        self.segs: list[bytes] = []
        """The ids of every token sent, per event, as D wrote them."""
        self.finished = False
        """An event with a finish reason went by: D sent its last token."""
        self.on_ids: Callable[[], None] | None = None
        """Called once, at the next event with ids (a continuation's first token: the seam)."""

    def feed(self, data: bytes) -> bytes:
        if self.prompt_pending and _PROMPT_IDS in data:
            data = self._prompt_ids(data)
        i = data.find(_IDS)
        if i >= 0:
            j = data.find(b"]", i)
            if j > 0 and data.find(_IDS, j) < 0:  # one event with ids: the usual chunk
                if j > i + 13:
                    self.segs.append(data[i + 13:j])
                if self.strip:
                    data = data[:i] + b'"token_ids":null' + data[j + 1:]
            else:
                data = self._many(data, i)
            if self.on_ids is not None:
                hook, self.on_ids = self.on_ids, None
                hook()
        if _FINISH in data:
            self.finished = True
        return data

    def _many(self, data: bytes, i: int) -> bytes:
        """Several events with ids in one chunk (vLLM's API server lagging)."""
        out: list[bytes] = []
        start = 0
        while i >= 0:
            j = data.find(b"]", i)
            if j < 0:
                break
            if j > i + 13:
                self.segs.append(data[i + 13:j])
            if self.strip:
                out.append(data[start:i])
                out.append(b'"token_ids":null')
                start = j + 1
            i = data.find(_IDS, j)
        if not self.strip:
            return data
        out.append(data[start:])
        return b"".join(out)

    def _prompt_ids(self, data: bytes) -> bytes:
        i = data.find(_PROMPT_IDS)
        j = data.find(b"]", i)
        if j < 0:
            return data
        self.prompt_pending = False
        if self.prompt is None:
            self.prompt = data[i + 20:j]
            m = _HEAD.search(data, 0, i)
            self.head = m.group(0) if m is not None else None
        if self.strip_prompt:
            data = data[:i] + b'"prompt_token_ids":null' + data[j + 1:]
        return data

    def ids(self) -> list[int]:
        """Every token id sent, in order."""
        return [int(x) for seg in self.segs for x in seg.split(b",")]

    def prompt_ids(self) -> list[int]:
        return [int(x) for x in self.prompt.split(b",")] if self.prompt else []


class _Failed(Exception):
    """A migration attempt that cannot go on: ``message`` for the client and the trace, ``failed``
    the instance whose answer ended it (None: the old D's death stands)."""

    def __init__(self, message: str, failed: str | None = None) -> None:
        super().__init__(message)
        self.message, self.failed = message, failed


class _ClientLost(Exception):
    pass


class Migration:
    """One stream's migrations: armed with D's first leg (``arm``), taken at a break of D's
    (``take``, from the relay), run by the decode leg once the broken relay has ended (``run``)."""

    def __init__(self, proxy: Proxy, trace: Trace, body: dict[str, Any], path: str, stitch: Stitch | None,
                 want_ids: bool, skip: str | None = None) -> None:
        self.proxy, self.trace, self.body, self.path, self.stitch = proxy, trace, body, path, stitch
        self.want_ids = want_ids
        self.skip = skip
        """Why this request cannot be continued elsewhere (then no tracker), or None."""
        self.tracker = Tracker(strip=not want_ids) if skip is None else None
        asked = firsttoken._max_tokens(body) if path == firsttoken.CHAT else fields.as_int(body.get("max_tokens"))
        self.max_tokens: int = fields.COMPLETIONS_DEFAULT_MAX_TOKENS if asked is None else asked
        """D's max_tokens (completions' null or absent: vLLM's 16; chat's unset is ineligible)."""
        self.extra = 1 if stitch is not None and stitch.first else 0
        """Tokens of D's prompt that are the client's completion already (P's token, first_token_from_p)."""
        self.dead: list[str] = []
        """The D that died under this stream."""
        self.pending: dict[str, Any] | None = None
        """The entry of the migration to run (set by take)."""
        self.note = ""
        """Why a break was not migrated, for the error event (set by take)."""
        self.scan: Any = None
        self.last_token: float | None = None

    # ----- at the break (the relay's data_received or the proxy's watchdog: no await) ----------
    def take(self, relay: Relay, why: str) -> bool:
        """D broke the stream: True when it goes on elsewhere (D's connection closed, the relay
        done, ``pending`` set); False, with ``note`` set, for the error event of today."""
        trace, s = self.trace, self.proxy.settings
        self.dead.append(relay.up.name)
        t = self.tracker
        sent = len(t.ids()) if t is not None else trace.chunks
        entry: dict[str, Any] = {"from": relay.up.name, "why": why, "tokens": sent, "result": "ineligible"}
        trace.migrations.append(entry)
        ok = sum(1 for m in trace.migrations if m.get("to") is not None)
        if t is None:
            entry["error"] = f"this request cannot go on on another D token for token ({self.skip})"
        elif t.finished:
            entry["error"] = "D had sent its last token"
        elif t.prompt is None and trace.chunks:
            entry["error"] = "D sent no token ids (a vLLM without return_token_ids?)"
        elif not t.segs or t.prompt is None:
            entry["error"] = "D had sent no token yet"
        elif self.max_tokens - sent < 1:
            entry["error"] = "no tokens left to make"
        elif ok >= s.migrate_max:
            entry["result"], entry["error"] = "limit", f"migrate_max ({s.migrate_max}) migrations done"
        elif not self._candidates():
            entry["result"], entry["error"] = "no_decode", "no other decode instance is up"
        else:
            entry["result"] = "failed"  # until the new D's first token
            self.pending = entry
            self.scan, self.last_token = relay.scan, relay.scan.last
            relay.conn.close()  # vLLM aborts the request, if the process still runs
            relay.done.set_result(None)
            return True
        self.note = f"; not continued on another decode instance: {entry['error']}"
        return False

    def _candidates(self) -> list[Upstream]:
        """The D that are up and did not die under this stream, the least busy first."""
        return sorted((u for u in self.proxy.decodes if u.is_up() and u.name not in self.dead),
                      key=lambda u: u.inflight)

    # ----- the new legs (the decode leg's task) -----------------------------------------------------
    async def run(self, resp: Response) -> None:
        """Continue the stream on another D, as often as it breaks and may go on (``take``)."""
        while self.pending is not None:
            entry, self.pending = self.pending, None
            await self._continue(entry, resp)

    async def _continue(self, entry: dict[str, Any], resp: Response) -> None:
        trace, proxy, s = self.trace, self.proxy, self.proxy.settings
        assert self.tracker is not None
        broke = f"decode {entry['from']} broke the stream after {entry['tokens']} tokens: {entry['why']}"
        ups = self._candidates()
        if not ups:  # went down since the break
            entry["result"], entry["error"] = "no_decode", "no other decode instance is up"
            self._fail(resp, f"{broke}; not continued on another decode instance: {entry['error']}", entry["from"])
            return
        ids = self.tracker.ids()
        prompt = self.tracker.prompt_ids() + ids
        body = self._body(prompt, len(ids))
        # the new D by the proxy's choice among those left, and the request's blocks promised to it
        # anew: its prompt there is the prompt and the tokens sent (routing.Promise)
        demand = routing.demand_of(len(prompt), None, body, s.block_size, s.max_model_len)
        up, why = proxy.router.pick_decode(ups, demand) if len(ups) > 1 else (ups[0], "the only other D up")
        if up is None:
            up, why = ups[0], "the least busy"
        entry["to"], entry["reason"] = up.name, why
        proxy.router.promise(trace, up.name, demand, trace)
        up.inflight += 1
        conn: httpio.ClientConnection | None = None
        try:
            try:
                async with asyncio.timeout(s.migrate_timeout_s):
                    conn, t_sent = await _unless_lost(resp, self._open(entry, up, body))
            except TimeoutError:
                raise _Failed(f"no answer within {s.migrate_timeout_s:g} s (migrate_timeout_s)") from None
            self.tracker.prompt_pending = True
            self.tracker.strip_prompt = True
            self.tracker.on_ids = lambda: self._seam(entry, t_sent)
            if trace.usage_check is not None:
                trace.usage_check.counting = False
            filters: list[ChunkFilter] = [self.tracker.feed, _Edit(self, entry, ids).edit]
            chat = self.path == firsttoken.CHAT or (self.stitch is not None and self.stitch.chat)
            if chat:
                cs = firsttoken.ChatStream(self._chat_head(), self.want_ids, first=True)  # no role chunk
                cs.moved = len(ids) + self.extra
                filters.append(cs.translate)
            relay = Relay(trace, up, conn, resp, self.scan, events=WholeEvents(*filters), begun=True)
            relay.migration = self
            proxy._relays.add(relay)
            try:
                relay.start(b"")
                await relay.done
            finally:
                proxy._relays.discard(relay)
        except _Failed as f:
            entry["error"] = f.message
            self._fail(resp, f"{broke}; the migration to {up.name} failed: {f.message}", f.failed or entry["from"])
        except _ClientLost:
            entry["error"] = "the client disconnected during the migration"
            trace.outcome, trace.status = "error", 499
            trace.error = trace.error or f"{broke}; the client disconnected during the migration to {up.name}"
        finally:
            up.inflight -= 1
            if conn is not None and up.pool is not None:
                if conn.complete and not resp.lost:
                    up.pool.release(conn)
                else:
                    up.pool.busy.discard(conn)
                    conn.close()

    async def _open(self, entry: dict[str, Any], up: Upstream,
                    body: dict[str, Any]) -> tuple[httpio.ClientConnection, float]:
        """P's leg (via-prefill) and the new D's request: its connection, once its head is in (200)."""
        from pdtui.core.proxy import contract

        proxy, s = self.proxy, self.proxy.settings
        params = await self._prefill(entry, body) if s.migrate == "via-prefill" else None
        entry["path"] = "prefill" if params is not None else "decode"
        if params is not None:
            if s.decode_reports_cached and proxy.connector.cached_param:
                params = {k: v for k, v in params.items() if k != proxy.connector.cached_param}
            if params or proxy.connector.carries_params:
                body["kv_transfer_params"] = params
        assert up.pool is not None
        t_sent = time.perf_counter()
        try:
            conn = await up.pool.request("POST", firsttoken.COMPLETIONS, contract._json_headers(self.trace.request_id),
                                         json.dumps(body).encode(), head_timeout_s=s.decode_read_timeout_s)
        except contract._UPSTREAM_ERRORS as e:
            raise _Failed(f"decode {up.name} unreachable: {type(e).__name__}: {e}", up.name) from None
        if conn.status != 200:
            status = conn.status
            try:
                content = await asyncio.wait_for(conn.read_all(), s.connect_timeout_s)
            except contract._UPSTREAM_ERRORS:
                content = b""
            finally:
                up.pool.busy.discard(conn)
                conn.close()
            text = content[:300].decode("utf-8", "replace")
            raise _Failed(f"decode {up.name} answered {status}: {text}", up.name if status >= 500 else None)
        return conn, t_sent

    async def _prefill(self, entry: dict[str, Any], body: dict[str, Any]) -> dict[str, Any] | None:
        """P's one-token leg for prompt + tokens sent: P's kv_transfer_params, or None (no P up, or
        no connection to one: the new D computes it, as the fallback policy does before dispatch)."""
        from pdtui.core.proxy import contract

        proxy = self.proxy
        ups = sorted((u for u in proxy.prefills if u.is_up()), key=lambda u: u.inflight)
        if not ups:
            entry["prefill_skipped"] = "no prefill instance is up"
            return None
        up = ups[0]
        entry["prefill"] = up.name
        p_body = contract.prefill_body(body, proxy.connector.prefill_kv_params)
        p_body.pop("return_token_ids", None)
        scratch = Trace(self.trace.request_id, firsttoken.COMPLETIONS, stream=False)
        try:
            params = await proxy._prefill_once(scratch, up, json.dumps(p_body).encode())
        except contract._PrefillFailed as f:
            if f.kind == "unreachable":
                entry["prefill_skipped"] = f.message
                entry["prefill"] = None
                return None
            raise _Failed(f.message, up.name) from None
        except contract._Relayed as r:
            text = r.content[:300].decode("utf-8", "replace")
            raise _Failed(f"prefill {up.name} answered {r.status}: {text}", up.name) from None
        entry["prefill_ms"] = None if scratch.prefill_ms is None else round(scratch.prefill_ms, 3)
        entry["blocks"], entry["kv_bytes"] = scratch.blocks, scratch.kv_bytes
        return params

    def _body(self, prompt: list[int], sent: int) -> dict[str, Any]:
        """The new D's /v1/completions body: prompt = D's prompt ids + the ids sent, what is left
        of max_tokens and min_tokens, the rest of D's body as it was."""
        b = self.body
        if self.path == firsttoken.CHAT:
            p = firsttoken.PAnswer(id="", created=0, model="", text="", token_id=0, prompt_ids=prompt,
                                   finish_reason=None, stop_reason=None)
            d = firsttoken.chat_decode_body(b, {}, p, first=False)
        else:
            d = dict(b)
        for k in ("kv_transfer_params", "truncate_prompt_tokens", "echo", "max_completion_tokens"):
            d.pop(k, None)
        d["prompt"] = prompt
        d["max_tokens"] = self.max_tokens - sent
        if "min_tokens" in d:
            d["min_tokens"] = max(0, (fields.as_int(d["min_tokens"]) or 0) - sent)
        d["stream"] = True
        d["return_token_ids"] = True
        return d

    def _chat_head(self) -> firsttoken.PAnswer:
        """The client's chat id, created and model: P's on a switch's path, else the old D's."""
        if self.stitch is not None and self.stitch.chat:
            return self.stitch.p
        head: dict[str, Any] = {}
        if self.tracker is not None and self.tracker.head is not None:
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                head = json.loads(self.tracker.head + b"}")
        return firsttoken.PAnswer(id=str(head.get("id", "")), created=int(head.get("created") or 0),
                                  model=str(head.get("model", "")), text="", token_id=0, prompt_ids=[],
                                  finish_reason=None, stop_reason=None)

    def _seam(self, entry: dict[str, Any], t_sent: float) -> None:
        """The new D's first token: the stream went on."""
        now = time.perf_counter()
        entry["result"] = "ok"
        entry["decode_ttft_ms"] = round((now - t_sent) * 1000, 3)
        if self.last_token is not None:
            entry["seam_ms"] = round((now - self.last_token) * 1000, 3)

    def _fail(self, resp: Response, message: str, failed: str | None) -> None:
        """The stream ends as a broken one does (Relay.fail): the error event, never [DONE]."""
        trace = self.trace
        trace.outcome, trace.error, trace.failed = "error", message, failed
        resp.finish(b"data: " + error_body(502, message, "upstream_error") + b"\n\n")


class _Edit:
    """The new D's events made the client's: the old D's id, created and model on each (completions;
    chat gets P's or the old D's from ChatStream); its usage event read for the trace (what the new
    D computed) and, on completions, the tokens sent moved from the prompt to the completion."""

    __slots__ = ("entry", "head", "migration", "moved")

    def __init__(self, migration: Migration, entry: dict[str, Any], ids: list[int]) -> None:
        self.migration, self.entry = migration, entry
        self.moved = len(ids) + migration.extra
        t = migration.tracker
        chat = migration.path == firsttoken.CHAT or (migration.stitch is not None and migration.stitch.chat)
        self.head = None if chat or t is None else t.head

    def edit(self, data: bytes) -> bytes:
        if self.head is not None:
            head = self.head
            data = _HEAD.sub(lambda m: head, data)
        if b'"usage' in data and (_FINAL_USAGE[0] in data or _FINAL_USAGE[1] in data):
            data = b"".join(self._event(e) for e in data[:-2].split(b"\n\n"))
        return data

    def _event(self, event: bytes) -> bytes:
        payload = event[5:].strip() if event.startswith(b"data:") else b""
        try:
            obj = json.loads(payload) if payload.startswith(b"{") else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        usage = obj.get("usage") if isinstance(obj, dict) and obj.get("choices") == [] else None
        if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
            return event + b"\n\n"
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        self.entry["d_computed_tokens"] = max(0, usage["prompt_tokens"] - (cached if isinstance(cached, int) else 0))
        if self.head is None:  # chat: ChatStream moves the tokens (its ``moved``)
            return event + b"\n\n"
        prompt = usage["prompt_tokens"] - self.moved
        usage["prompt_tokens"] = prompt
        usage["completion_tokens"] = (usage.get("completion_tokens") or 0) + self.moved
        if isinstance(details, dict) and isinstance(cached, int) and cached > prompt:
            details["cached_tokens"] = prompt
        return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def _unless_lost(resp: Response, coro: Coroutine[Any, Any, Any]) -> Any:
    """``coro``'s result, or _ClientLost if the client goes away first (``coro`` cancelled)."""
    work = asyncio.ensure_future(coro)
    lost = asyncio.ensure_future(resp.wait_lost())
    try:
        await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():  # the client went away first (a result that came with it goes on: the relay sees the loss)
        raise _ClientLost
    return work.result()
