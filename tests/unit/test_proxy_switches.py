"""The TTFT switches (first_token_from_p, tokenize_once: pdtui.core.proxy.firsttoken) against a fake
engine that counts tokens (FakeTokenVllm), on 127.0.0.1. The same switches against real vLLM,
greedy, token for token: tests/e2e/test_pair.py::test_ttft_switches_give_the_single_instance_output_token_for_token."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from pdtui.core.proxy import Proxy, ProxyServer, ProxySettings, Upstream, firsttoken
from tests.fakes import AbortConnection, FakeAsgiVllm, _json, free_port, proxy_stack, serving

FIRST = 7
"""The fake model's first token after a text prompt; each next token is the last one + 1."""
PROMPT_IDS = list(range(FIRST - 40, FIRST))
"""The fake's ids of any text prompt of 40 tokens: the model is "the last id + 1"."""


FP = "vllm-fake-0"
"""The fake's system_fingerprint."""


def lax_bool(v: Any) -> bool:
    """A bool field as vLLM's pydantic model reads it (lax mode): "false", "off", "0" are False."""
    if isinstance(v, str):
        return v.strip().lower() in ("1", "on", "t", "true", "y", "yes")
    return bool(v)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


async def traced(traces: list[Any]) -> Any:
    """The first trace: with no D leg (P's token ended it) it comes once P's blocks are released
    through D, a moment after the client has the answer."""
    for _ in range(100):
        if traces:
            return traces[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no trace within 5 s")


@dataclass
class FakeTokenVllm(FakeAsgiVllm):
    """A fake vLLM whose "model" is arithmetic: the next token is the last id + 1, and a text prompt
    (or a chat's messages, "rendered") is ``prompt_len`` ids ending in 6 (so the answer is 7, 8, 9,
    ...). Honours max_tokens (chat: max_completion_tokens first), return_token_ids,
    stream_options.include_usage, and names its answer cmpl-<X-Request-Id> (chat:
    chatcmpl-<X-Request-Id>) as vLLM does. Its JSON has vLLM 0.32.0's fields in vLLM's order (the
    chat ones as captured from the CPU engine: the role chunk, stop_reason only on the finishing
    chunk, system_fingerprint on the last). P mode (``kv_transfer_params`` with do_remote_decode)
    adds kv_transfer_params; its finish reason is ``p_finish`` (stop: EOS). ``split``: every SSE
    event in two writes; ``die_after``: the connection drops after that many token events."""

    role: str
    prompt_len: int = 40
    p_finish: str = "length"
    split: bool = False
    die_after: int | None = None
    blocks: int | None = None
    """P mode: blocks offered (default: the prompt in blocks of 16, as the stack's block_size)."""
    p_reasoning: str | None = None
    """P mode, chat: the message's reasoning (as with a reasoning parser on the server)."""
    computed: int | None = None
    """D mode, set: its usage has prompt_tokens_details, cached_tokens = its prompt less this many
    (vLLM with --enable-prompt-tokens-details)."""
    requests: list[dict[str, Any]] = field(default_factory=list)
    releases: list[dict[str, Any]] = field(default_factory=list)
    """The proxy's release requests (tests.fakes.refused_release), answered 404."""
    port: int = field(default_factory=free_port)

    async def __call__(self, scope, receive, send):
        if (req := await self.take(scope, receive, send)) is None:
            return
        rid = dict(scope["headers"]).get(b"x-request-id", b"x").decode()
        if scope["path"] == "/v1/chat/completions":
            await self._chat(req, rid, send)
            return
        prompt = req.get("prompt", "(chat)")
        by_ids = isinstance(prompt, list) and all(isinstance(i, int) for i in prompt)
        ids = list(prompt) if by_ids else list(range(FIRST - self.prompt_len, FIRST))
        start = ids[-1] + 1
        n = int(req.get("max_tokens") or 16)  # "4" is 4, as vLLM's pydantic model reads it
        out = list(range(start, start + n))
        want = bool(req.get("return_token_ids"))
        head = {"id": f"cmpl-{rid}", "object": "text_completion", "created": 5, "model": "m"}
        usage = _usage(len(ids), n)
        if self.computed is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": len(ids) - self.computed}
        if (req.get("kv_transfer_params") or {}).get("do_remote_decode"):
            await _json(send, 200, {**head, "choices": [
                {"index": 0, "text": f" t{out[0]}", "logprobs": None, "finish_reason": self.p_finish,
                 "stop_reason": None, "prompt_token_ids": ids if want else None,
                 "token_ids": out[:1] if want else None}],
                "usage": usage, "kv_transfer_params": {
                    "do_remote_prefill": True, "do_remote_decode": False,
                    "remote_block_ids": [list(range(self.blocks if self.blocks is not None else -(-len(ids) // 16)))],
                    "remote_engine_id": "fake-p", "remote_host": "127.0.0.1", "remote_port": 1}})
            return
        if not lax_bool(req.get("stream")):
            await _json(send, 200, {**head, "choices": [
                {"index": 0, "text": "".join(f" t{t}" for t in out), "logprobs": None, "finish_reason": "length",
                 "stop_reason": None, "prompt_token_ids": ids if want else None, "token_ids": out if want else None}],
                "system_fingerprint": FP, "usage": {**usage, "prompt_tokens_details": usage.get("prompt_tokens_details"),
                                                    "completion_tokens_details": None}})
            return
        events = []
        include_usage = lax_bool((req.get("stream_options") or {}).get("include_usage"))
        for i, t in enumerate(out):
            events.append({**head, "choices": [
                {"index": 0, "text": f" t{t}", "logprobs": None, "finish_reason": "length" if i == n - 1 else None,
                 "stop_reason": None, "prompt_token_ids": ids if want and i == 0 else None,
                 "token_ids": [t] if want else None}]})
        if not include_usage:
            events[-1]["system_fingerprint"] = FP
        else:
            events.append({**head, "choices": [], "usage": usage, "system_fingerprint": FP})
        await self._stream(send, events)

    async def _stream(self, send, events: list[dict[str, Any]]) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        for i, ev in enumerate(events):
            if self.die_after is not None and i == self.die_after:
                raise AbortConnection("fake decode dies mid-stream")
            data = f"data: {json.dumps(ev, separators=(',', ':'))}\n\n".encode()
            for part in (data[:len(data) // 2], data[len(data) // 2:]) if self.split else (data,):
                await send({"type": "http.response.body", "body": part, "more_body": True})
                await asyncio.sleep(0.001)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _chat(self, req: dict[str, Any], rid: str, send) -> None:
        """vLLM's chat endpoint over the same arithmetic model: the messages render to
        ``prompt_len`` ids ending in 6."""
        ids = list(range(FIRST - self.prompt_len, FIRST))
        n = int(req.get("max_completion_tokens") or req.get("max_tokens") or 16)
        out = list(range(FIRST, FIRST + n))
        want = bool(req.get("return_token_ids"))
        p_mode = bool((req.get("kv_transfer_params") or {}).get("do_remote_decode"))
        finish = self.p_finish if p_mode else "length"
        head = {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": 5, "model": "m"}
        if not lax_bool(req.get("stream")):
            message = {"role": "assistant", "content": "".join(f" t{t}" for t in out), "refusal": None,
                       "annotations": None, "audio": None, "function_call": None,
                       "reasoning": self.p_reasoning if p_mode else None}
            kv = {"do_remote_prefill": True, "do_remote_decode": False,
                  "remote_block_ids": [list(range(self.blocks if self.blocks is not None else -(-len(ids) // 16)))],
                  "remote_engine_id": "fake-p", "remote_host": "127.0.0.1", "remote_port": 1} if p_mode else None
            await _json(send, 200, {**head, "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish, "stop_reason": None,
                 "token_ids": out if want else None, "routed_experts": None}],
                "service_tier": None, "system_fingerprint": FP,
                "usage": {**_usage(len(ids), n), "prompt_tokens_details": None, "completion_tokens_details": None},
                "prompt_logprobs": None, "prompt_token_ids": ids if want else None, "prompt_text": None,
                "kv_transfer_params": kv, "ec_transfer_params": None, "metrics": None})
            return
        chunk = {**head, "object": "chat.completion.chunk"}
        events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None}],
                   "prompt_token_ids": ids if want else None, "prompt_text": None}]
        include_usage = lax_bool((req.get("stream_options") or {}).get("include_usage"))
        for i, t in enumerate(out):
            c: dict[str, Any] = {"index": 0, "delta": {"content": f" t{t}"}, "logprobs": None,
                                 "finish_reason": "length" if i == n - 1 else None}
            if i == n - 1:
                c["stop_reason"] = None
            c["token_ids"] = [t] if want else None
            events.append({**chunk, "choices": [c]})
        if not include_usage:
            events[-1]["system_fingerprint"] = FP
        else:
            events.append({**chunk, "choices": [], "usage": _usage(len(ids), n), "system_fingerprint": FP})
        await self._stream(send, events)


def stack(p: FakeTokenVllm, d: FakeTokenVllm, **switches: bool):
    return proxy_stack(p, d, **switches)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def parse(r: httpx.Response, stream: bool) -> dict[str, Any]:
    """The client's view: ids, text, token ids, prompt ids, finish, usage, [DONE]."""
    if not stream:
        obj = r.json()
        c = obj["choices"][0]
        return {"ids": [obj["id"]], "text": c["text"], "tokens": c.get("token_ids"), "prompt_ids": c.get("prompt_token_ids"),
                "finish": c["finish_reason"], "usage": obj["usage"], "done": None, "errors": []}
    out: dict[str, Any] = {"ids": [], "text": "", "tokens": [], "prompt_ids": [], "finish": None, "usage": None,
                           "done": False, "errors": []}
    for line in r.text.split("\n"):
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            out["done"] = True
            continue
        obj = json.loads(line[6:])
        if "error" in obj:
            out["errors"].append(obj["error"]["message"])
            continue
        out["ids"].append(obj["id"])
        out["usage"] = obj.get("usage") or out["usage"]
        for c in obj["choices"]:
            out["text"] += c["text"]
            out["tokens"] += c.get("token_ids") or []
            out["prompt_ids"] += c.get("prompt_token_ids") or []
            out["finish"] = c.get("finish_reason") or out["finish"]
    return out


def body(stream: bool, **kw: Any) -> dict[str, Any]:
    b = {"model": "m", "prompt": "hello", "max_tokens": 5, "return_token_ids": True, "stream": stream, **kw}
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


def test_first_token_from_p_stitches_one_answer_equal_to_the_single_instance():
    async def go():
        for stream in (False, True):
            for split in (False, True):
                p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode", split=split)
                async with stack(p, d, first_token_from_p=True) as (client, traces):
                    r = await client.post("/v1/completions", json=body(stream), headers={"X-Request-Id": "r1"})
                    got = parse(r, stream)
                    async with httpx.AsyncClient(base_url=d.url) as direct:  # the single instance's answer
                        ref = parse(await direct.post("/v1/completions", json=body(stream),
                                                      headers={"X-Request-Id": "r1"}), stream)
                    assert got["tokens"] == ref["tokens"] == [7, 8, 9, 10, 11], (stream, split, got)
                    assert got["text"] == ref["text"] == " t7 t8 t9 t10 t11"
                    assert set(got["ids"]) == {"cmpl-r1"} and got["finish"] == "length"
                    assert got["prompt_ids"] == ref["prompt_ids"] == PROMPT_IDS  # once, the client's
                    assert got["usage"] == ref["usage"]
                    assert {k: got["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == \
                        {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45}
                    assert got["done"] is ref["done"]
                    # the legs: P asked for ids; D from prompt ids + P's token, one token fewer
                    assert p.requests[0]["return_token_ids"] is True and p.requests[0]["max_tokens"] == 1
                    db = d.requests[0]
                    assert db["prompt"] == [*PROMPT_IDS, 7] and db["max_tokens"] == 4
                    assert db["kv_transfer_params"]["remote_block_ids"] == [[0, 1, 2]]  # 40 tokens, blocks of 16
                    (t,) = traces
                    assert (t.outcome, t.switch, t.switch_skipped) == ("pair", "first_token", None)
                    assert t.completion_tokens == 5 and t.prompt_tokens == 40
                    if stream:  # P's token is the first; D's first token is a gap (the seam)
                        assert t.chunks == 5 and len(t.itl_ms) == 4 and t.ttft_ms < t.prefill_ms + t.decode_ttft_ms + 5
                        assert t.decode_ttft_ms is not None

    run(go())


@pytest.mark.parametrize("computed", [0, 41])
def test_first_token_from_p_reads_what_d_computed_of_its_own_prompt(computed):
    """D's prompt is P's 40 ids plus P's token, 41: the check reads D's usage before P's token moves
    to the completion; a client that did not ask for usage sees none, one that did sees 40 + 5."""
    async def go():
        for stream in (False, True):
            for asked in ((False, True) if stream else (True,)):
                p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode", split=True, computed=computed)
                async with stack(p, d, first_token_from_p=True, decode_reports_cached=True) as (client, traces):
                    b = body(stream)
                    if not asked:
                        del b["stream_options"]
                    got = parse(await client.post("/v1/completions", json=b, headers={"X-Request-Id": "r1"}), stream)
                    assert got["tokens"] == [7, 8, 9, 10, 11] and got["done"] is (True if stream else None)
                    want = {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45,
                            "prompt_tokens_details": {"cached_tokens": 41 - computed}}
                    usage = got["usage"] and {k: v for k, v in got["usage"].items() if v is not None}
                    assert usage == (want if asked else None), (stream, asked, got["usage"])
                    assert d.requests[0]["prompt"] == [*PROMPT_IDS, 7]
                    (t,) = traces
                    assert (t.switch, t.d_computed_tokens, t.recomputed) == ("first_token", computed, computed > 16)

    run(go())


def test_without_asking_for_ids_the_stitched_stream_has_none():
    async def go():
        p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode")
        async with stack(p, d, first_token_from_p=True) as (client, _):
            b = body(True)
            del b["return_token_ids"]
            got = parse(await client.post("/v1/completions", json=b), True)
            assert got["text"] == " t7 t8 t9 t10 t11" and got["tokens"] == [] and got["prompt_ids"] == []
            assert "return_token_ids" not in d.requests[0] and got["usage"]["completion_tokens"] == 5

    run(go())


def test_eos_at_p_ends_the_request_there_with_no_decode_leg():
    async def go():
        for stream in (False, True):
            p, d = FakeTokenVllm("prefill", p_finish="stop"), FakeTokenVllm("decode")
            async with stack(p, d, first_token_from_p=True) as (client, traces):
                got = parse(await client.post("/v1/completions", json=body(stream), headers={"X-Request-Id": "e"}),
                            stream)
                assert got["tokens"] == [7] and got["text"] == " t7" and got["finish"] == "stop"
                assert got["usage"] == {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41}
                assert set(got["ids"]) == {"cmpl-e"} and d.requests == []
                assert got["done"] is (True if stream else None)
                assert (await traced(traces)).switch == "first_token_p_only" and traces[0].decode is None
                # no D leg, so P would hold the blocks until its KV lease ends: released through D
                (rel,) = d.releases
                assert rel["kv_transfer_params"]["remote_engine_id"] == "fake-p"
                assert traces[0].kv_release is not None and traces[0].kv_release["result"] == "released"

    run(go())


def test_what_cannot_be_served_token_for_token_takes_the_normal_path_counted():
    async def go():
        cases = {  # body changes -> the reason
            "logprobs": {"logprobs": 1}, "n": {"n": 2}, "echo": {"echo": True}, "stop_strings": {"stop": ["x"]},
            "max_tokens_1": {"max_tokens": 1}, "penalties": {"frequency_penalty": 0.5},
            "prompt_batch": {"prompt": ["a", "b"]}, "block_size_mismatch": {},
        }
        for reason, change in cases.items():  # block_size_mismatch: P's blocks are not ceil(40 / 16)
            p = FakeTokenVllm("prefill", blocks=5 if reason == "block_size_mismatch" else None)
            d = FakeTokenVllm("decode")
            async with stack(p, d, first_token_from_p=True) as (client, traces):
                b = {**body(False), **change}
                r = await client.post("/v1/completions", json=b)
                assert r.status_code == 200, (reason, r.text)
                db = d.requests[0]
                assert db["prompt"] == b["prompt"] and db.get("max_tokens") == b["max_tokens"], reason
                assert (traces[0].switch, traces[0].switch_skipped) == (None, reason)
                metrics = (await client.get("/metrics")).text
                assert f'pdtui_switch_skipped_total{{reason="{reason}"}} 1.0' in metrics

    run(go())


def test_a_prompt_of_a_multiple_of_the_block_size_takes_the_normal_path():
    """prompt + 1 token would need a block more on D than P sent (block_size 16, 32 tokens)."""
    async def go():
        p, d = FakeTokenVllm("prefill", prompt_len=32), FakeTokenVllm("decode", prompt_len=32)
        async with stack(p, d, first_token_from_p=True, tokenize_once=True) as (client, traces):
            got = parse(await client.post("/v1/completions", json=body(True)), True)
            assert got["tokens"] == [7, 8, 9, 10, 11]
            # normal path, but tokenize_once still applies: D gets the prompt as P's ids
            assert d.requests[0]["prompt"] == list(range(FIRST - 32, FIRST)) and d.requests[0]["max_tokens"] == 5
            assert (traces[0].switch, traces[0].switch_skipped) == ("tokenize_once", "block_boundary")

    run(go())


def test_tokenize_once_gives_d_the_prompt_as_ids():
    async def go():
        p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode")
        async with stack(p, d, tokenize_once=True) as (client, traces):
            b = body(False)
            del b["return_token_ids"]
            r = await client.post("/v1/completions", json=b)
            assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] is None
            assert p.requests[0]["return_token_ids"] is True
            assert d.requests[0]["prompt"] == PROMPT_IDS and "return_token_ids" not in d.requests[0]
            assert traces[0].switch == "tokenize_once"

    run(go())


def chat_body(stream: bool, want_ids: bool = True, **kw: Any) -> dict[str, Any]:
    b = {"model": "m", "messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}],
         "max_tokens": 5, "temperature": 0.0, "stream": stream, **kw}
    if want_ids:
        b["return_token_ids"] = True
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


def canonical(r: httpx.Response, stream: bool) -> bytes:
    """The answer's bytes, the non-streamed JSON made compact (the key order kept): the fake writes
    json.dumps' spaces, vLLM and the proxy compact JSON."""
    assert r.status_code == 200, r.text
    if stream:
        return r.content
    return json.dumps(json.loads(r.content), separators=(",", ":")).encode()


SWITCHES = {"first_token": {"first_token_from_p": True}, "tokenize_once": {"tokenize_once": True},
            "both": {"first_token_from_p": True, "tokenize_once": True}}


def test_chat_through_either_switch_is_the_single_instance_answer_byte_for_byte():
    """Chat: D answers /v1/completions from P's ids (plus P's token), the proxy writes it as chat.
    The client gets exactly what the single instance's chat endpoint sends (here: the fake's, which
    has vLLM's shapes): the role chunk, one id, stop_reason and the fingerprint where vLLM puts
    them, usage, [DONE]; streamed (events split or not) and not, with token ids and without."""
    async def go():
        for name, switches in SWITCHES.items():
            p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode")
            async with stack(p, d, **switches) as (client, traces), httpx.AsyncClient(base_url=d.url) as direct:
                for stream in (False, True):
                    for want_ids in (True, False):
                        for split in (False, True) if stream else (False,):
                            for usage in (True, False) if stream else (True,):
                                p.requests.clear(), d.requests.clear(), traces.clear()
                                d.split = split
                                b = chat_body(stream, want_ids)
                                if not usage:
                                    del b["stream_options"]
                                what = (name, stream, want_ids, split, usage)
                                got = canonical(await client.post("/v1/chat/completions", json=b,
                                                                  headers={"X-Request-Id": "c1"}), stream)
                                ref = canonical(await direct.post("/v1/chat/completions", json=b,
                                                                  headers={"X-Request-Id": "c1"}), stream)
                                assert got == ref, (what, got, ref)
                                assert b"t7" in got and b"chatcmpl-c1" in got
                                # P rendered the chat; D got /v1/completions from its ids
                                assert p.requests[0]["path"] == "/v1/chat/completions"
                                assert p.requests[0]["return_token_ids"] is True
                                dq = d.requests[0]
                                first = name != "tokenize_once"
                                assert dq["path"] == "/v1/completions" and "messages" not in dq, what
                                assert dq["prompt"] == (PROMPT_IDS + [7] if first else PROMPT_IDS), what
                                assert dq["max_tokens"] == (4 if first else 5) and dq["temperature"] == 0.0
                                assert dq["kv_transfer_params"]["remote_engine_id"] == "fake-p"
                                (t,) = traces
                                assert (t.outcome, t.switch, t.switch_skipped) == \
                                    ("pair", "first_token" if first else "tokenize_once", None), what
                                if usage:  # a stream without its usage event: no count, as on the normal path
                                    assert (t.prompt_tokens, t.completion_tokens) == (40, 5), (what, t)
                                if stream:
                                    assert t.chunks == 5 and len(t.itl_ms) == 4, (what, t)

    run(go())


@pytest.mark.parametrize("computed", [0, 30])
def test_chat_under_either_switch_reads_what_d_computed(computed):
    """decode_reports_cached with chat served from D's /v1/completions: D is asked for its usage
    even when the client was not (the chat body is rebuilt from the client's, and keeps that), the
    trace has D's own N (D's prompt: P's 40 ids, plus P's token under first_token_from_p), and a
    client that did not ask for usage gets no usage event."""
    async def go():
        for name, switches in SWITCHES.items():
            for stream in (False, True):
                for asked in ((False, True) if stream else (True,)):
                    p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode", computed=computed)
                    async with stack(p, d, decode_reports_cached=True, **switches) as (client, traces):
                        b = chat_body(stream)
                        if not asked:
                            del b["stream_options"]
                        r = await client.post("/v1/chat/completions", json=b, headers={"X-Request-Id": "u"})
                        what = (name, stream, asked)
                        assert r.status_code == 200 and b"t7" in r.content, what
                        dq = d.requests[0]
                        assert dq["path"] == "/v1/completions", what
                        if stream:
                            assert dq["stream_options"]["include_usage"] is True, what
                            assert (b'"choices":[]' in r.content) is asked, what
                        (t,) = traces
                        assert (t.d_computed_tokens, t.recomputed) == (computed, computed > 16), (what, t)

    run(go())


def test_chat_max_completion_tokens_is_what_d_is_held_to():
    async def go():
        p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode")
        async with stack(p, d, first_token_from_p=True) as (client, traces):
            b = chat_body(False, max_completion_tokens=3)
            got = canonical(await client.post("/v1/chat/completions", json=b, headers={"X-Request-Id": "m"}), False)
            async with httpx.AsyncClient(base_url=d.url) as direct:
                ref = canonical(await direct.post("/v1/chat/completions", json=b, headers={"X-Request-Id": "m"}), False)
            assert got == ref and d.requests[0]["max_tokens"] == 2 and "max_completion_tokens" not in d.requests[0]
            assert p.requests[0]["max_tokens"] == p.requests[0]["max_completion_tokens"] == 1
            assert traces[0].switch == "first_token" and traces[0].completion_tokens == 3

    run(go())


def test_chat_eos_at_p_is_the_whole_chat_answer():
    async def go():
        for stream in (False, True):
            p, d = FakeTokenVllm("prefill", p_finish="stop"), FakeTokenVllm("decode")
            async with stack(p, d, first_token_from_p=True) as (client, traces):
                r = await client.post("/v1/chat/completions", json=chat_body(stream), headers={"X-Request-Id": "e"})
                assert d.requests == [] and (await traced(traces)).switch == "first_token_p_only"
                assert len(d.releases) == 1  # P's blocks, held for no D leg, released through D
                if not stream:
                    obj = r.json()
                    assert obj["id"] == "chatcmpl-e" and obj["object"] == "chat.completion"
                    assert obj["choices"][0]["message"] == {**obj["choices"][0]["message"], "role": "assistant",
                                                            "content": " t7"}
                    assert (obj["choices"][0]["finish_reason"], obj["choices"][0]["token_ids"]) == ("stop", [7])
                    assert obj["kv_transfer_params"] is None and obj["prompt_token_ids"] == PROMPT_IDS
                    assert obj["usage"]["completion_tokens"] == 1 and obj["usage"]["prompt_tokens"] == 40
                    continue
                events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
                assert r.text.endswith("data: [DONE]\n\n")
                assert [e["object"] for e in events] == ["chat.completion.chunk"] * 3
                assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
                assert events[0]["prompt_token_ids"] == PROMPT_IDS
                assert events[1]["choices"][0] == {"index": 0, "delta": {"content": " t7"}, "logprobs": None,
                                                   "finish_reason": "stop", "stop_reason": None, "token_ids": [7]}
                assert events[2]["usage"] == {"prompt_tokens": 40, "total_tokens": 41, "completion_tokens": 1}
                assert events[2]["system_fingerprint"] == FP and events[2]["choices"] == []

    run(go())


def test_chat_what_cannot_be_answered_from_ids_takes_the_normal_path_counted():
    async def go():
        cases = {  # body changes -> the reason (either switch)
            "tools": {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "logprobs": {"logprobs": True, "top_logprobs": 1}, "n": {"n": 2}, "echo": {"echo": True},
            "structured_output": {"response_format": {"type": "json_object"}},
            "max_tokens_unset": {"max_tokens": None},
            "multimodal": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "chat_parser": {},  # P's answer has a reasoning field: a reasoning parser on the server
        }
        for switches in SWITCHES.values():
            p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode")
            async with stack(p, d, **switches) as (client, traces):
                for reason, change in cases.items():
                    p.requests.clear(), d.requests.clear(), traces.clear()
                    p.p_reasoning = "hmm" if reason == "chat_parser" else None
                    b = {**chat_body(False, want_ids=False), **change}
                    r = await client.post("/v1/chat/completions", json=b)
                    assert r.status_code == 200, (reason, r.text)
                    dq = d.requests[0]
                    assert dq["path"] == "/v1/chat/completions" and dq["messages"] == b["messages"], reason
                    assert "prompt" not in dq and dq.get("max_tokens") == b["max_tokens"], reason
                    assert (traces[0].switch, traces[0].switch_skipped) == (None, reason), (reason, switches)
                    # P is asked for its ids only when the body itself does not rule the switches out
                    assert ("return_token_ids" in p.requests[0]) is (reason == "chat_parser"), reason
                    metrics = (await client.get("/metrics")).text
                    assert f'pdtui_switch_skipped_total{{reason="{reason}"}} 1.0' in metrics

    run(go())


def test_chat_stop_strings_take_tokenize_once_only():
    """A stop string could span P's token and D's first: first_token_from_p stands aside, while
    tokenize_once still serves the chat from ids."""
    async def go():
        p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode")
        async with stack(p, d, first_token_from_p=True, tokenize_once=True) as (client, traces):
            b = chat_body(True, stop=["zz"])
            got = canonical(await client.post("/v1/chat/completions", json=b, headers={"X-Request-Id": "s"}), True)
            async with httpx.AsyncClient(base_url=d.url) as direct:
                ref = canonical(await direct.post("/v1/chat/completions", json=b, headers={"X-Request-Id": "s"}), True)
            assert got == ref
            assert d.requests[0]["prompt"] == PROMPT_IDS and d.requests[0]["stop"] == ["zz"]
            assert (traces[0].switch, traces[0].switch_skipped) == ("tokenize_once", "stop_strings")

    run(go())


def test_chat_decode_dying_mid_stream_ends_with_an_error_event():
    async def go():
        for switches in SWITCHES.values():
            p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode", die_after=2)
            async with stack(p, d, **switches) as (client, traces):
                r = await client.post("/v1/chat/completions", json=chat_body(True))
                events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
                assert "[DONE]" not in r.text and "error" in events[-1], (switches, r.text)
                content = "".join((e.get("choices") or [{}])[0].get("delta", {}).get("content", "") for e in events[:-1])
                first = switches.get("first_token_from_p", False)
                assert content == (" t7 t8 t9" if first else " t7 t8"), (switches, content)
                assert traces[0].outcome == "error"

    run(go())


def test_decode_dying_after_p_token_ends_the_stream_with_an_error_event():
    async def go():
        p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode", die_after=2)
        async with stack(p, d, first_token_from_p=True) as (client, traces):
            got = parse(await client.post("/v1/completions", json=body(True)), True)
            assert got["tokens"] == [7, 8, 9] and got["errors"] and got["done"] is False
            assert traces[0].outcome == "error"

    run(go())


def test_decode_refusing_after_p_token_ends_the_stream_with_an_error_event():
    async def go():
        p = FakeTokenVllm("prefill")
        async with serving(p):  # type: ignore[arg-type]
            dead = free_port()  # nothing listens there
            proxy = Proxy([Upstream("P", "prefill", p.url)], [Upstream("D", "decode", f"http://127.0.0.1:{dead}")],
                          ProxySettings(block_size=16, prefill_timeout_s=5, decode_read_timeout_s=5,
                                        connect_timeout_s=1, first_token_from_p=True))
            server = ProxyServer(proxy, "127.0.0.1", free_port())
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                    r = await client.post("/v1/completions", json=body(True))
                    got = parse(r, True)
                    assert r.status_code == 200 and got["tokens"] == [7] and got["errors"] and not got["done"]
            finally:
                await server.stop()

    run(go())


def test_usage_and_prompt_ids_rewrites_touch_only_their_fields():
    p = firsttoken.PAnswer(id="cmpl-x", created=1, model="m", text=" a", token_id=5, prompt_ids=[1, 2],
                           finish_reason="length", stop_reason=None)
    ev = b'data: {"id":"cmpl-x","choices":[],"usage":{"prompt_tokens":3,"total_tokens":9,"completion_tokens":6}}\n\n'
    assert firsttoken.fix_usage(ev) == ev.replace(b'"prompt_tokens":3', b'"prompt_tokens":2').replace(
        b'"completion_tokens":6', b'"completion_tokens":7')
    first = b'data: {"choices":[{"text":" b","prompt_token_ids":[1,2,5],"token_ids":[6]}]}\n\n'
    assert firsttoken.drop_prompt_ids(first) == first.replace(b"[1,2,5]", b"null")
    merged = json.loads(firsttoken.merge_json(p, json.dumps({"choices": [{"text": " b", "token_ids": [6]}],
                                                                "usage": {"prompt_tokens": 3, "completion_tokens": 1,
                                                                          "total_tokens": 4}}).encode(), True))
    assert merged["choices"][0] == {"text": " a b", "token_ids": [5, 6], "prompt_token_ids": [1, 2]}
    assert merged["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def test_chat_token_events_rewritten_in_bytes_equal_the_json_rewrite():
    """ChatStream's fast path (vLLM's exact token-event layout, rewritten in bytes) and its JSON
    path (any other layout: here the same event with json.dumps' spaces) give the same chunk."""
    p = firsttoken.PAnswer(id="chatcmpl-x", created=5, model="m", text=" a", token_id=1, prompt_ids=[1, 2],
                           finish_reason="length", stop_reason=None)
    for text in (" w1", 'a "quoted" \\ back\nslash', "é ü 猫 🙂", "\u0001\t", ""):
        for want_ids in (True, False):
            obj = {"id": "cmpl-x", "object": "text_completion", "created": 9, "model": "m", "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": None, "stop_reason": None,
                 "prompt_token_ids": None, "token_ids": [42]}]}
            compact = b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
            spaced = b"data: " + json.dumps(obj, ensure_ascii=False).encode()
            assert firsttoken._TOKEN_EVENT.fullmatch(compact) and not firsttoken._TOKEN_EVENT.fullmatch(spaced)
            for first in (True, False):  # not first: the role chunk goes in front of the first event
                fast = firsttoken.ChatStream(p, want_ids, first).event(compact)
                slow = firsttoken.ChatStream(p, want_ids, first).event(spaced)
                assert fast == slow, (text, want_ids, first, fast, slow)
            chunk = json.loads(fast.split(b"\n\n")[-2][6:])
            assert chunk["choices"][0]["delta"] == {"content": text} and chunk["id"] == "chatcmpl-x"


def test_the_timeline_shows_the_first_token_sent_from_p_and_d_leg_after_it():
    from pdtui.app.state import timeline
    from pdtui.app.widgets.detail import RequestDetail
    from pdtui.core.events import RequestTraced

    r = RequestTraced(request_id="r", endpoint="/v1/completions", stream=True, outcome="pair", status=200,
                      prefill_ms=25.0, hop_ms=0.5, decode_ttft_ms=19.0, ttft_ms=25.4, total_ms=80.0,
                      switch="first_token")
    legs = timeline(r)
    assert [name for name, _, _ in legs] == ["P prefill (+1 token)", "first token sent (P's)", "proxy hop",
                                             "D 2nd token incl. KV pull", "D decode stream"]
    assert legs[1][1] == legs[1][2] == 25.4 and legs[2][1] == 25.4
    assert "switch: first_token" in str(RequestDetail.reason(r))
    skipped = RequestTraced(request_id="s", endpoint="/v1/completions", stream=True, outcome="pair", status=200,
                            switch_skipped="block_boundary")
    assert "block_boundary: normal path" in str(RequestDetail.reason(skipped))


def test_the_detail_pane_shows_the_engines_spans_of_the_request():
    from pdtui.app.state import DashState
    from pdtui.app.widgets.detail import RequestDetail
    from pdtui.core.events import EngineSpan

    st = DashState()
    st.apply(EngineSpan(instance="D", request_id="r", engine_request_id="cmpl-r-0", arrival_s=1.0, end_s=2.0,
                        ttft_ms=35.0, queue_ms=16.2, prefill_ms=8.5, e2e_ms=90.0))
    st.apply(EngineSpan(instance="P", request_id="r", engine_request_id="cmpl-r-0", arrival_s=0.9, end_s=1.0,
                        ttft_ms=150.0, queue_ms=0.0, prefill_ms=147.2, e2e_ms=160.0))
    spans = st.snapshot().spans["r"]
    assert set(spans) == {"P", "D"} and spans["D"].queue_ms == 16.2
    detail = RequestDetail()
    detail.spans = dict(spans)
    line = str(detail.engine_line())
    assert line.startswith("engine: D queue 16.2 prefill 8.5 ttft 35.0") and "P queue 0.0 prefill 147.2" in line


def test_first_token_from_p_without_max_tokens_makes_vllms_16_not_17():
    """A completion without max_tokens is 16 tokens in vLLM: with P's token first D must make 15
    (D was sent no max_tokens and made 16 more)."""
    async def go():
        p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode")
        async with stack(p, d, first_token_from_p=True) as (client, traces):
            b = {"model": "m", "prompt": "hello", "return_token_ids": True}
            got = parse(await client.post("/v1/completions", json=b), False)
            assert d.requests[0]["max_tokens"] == 15
            assert got["tokens"] == list(range(FIRST, FIRST + 16))
            assert traces[0].switch == "first_token"

    run(go())
