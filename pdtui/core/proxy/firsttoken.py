"""The proxy's two TTFT switches, as pure functions over bodies and bytes (``pdtui.core.proxy`` does
the I/O). docs/proxy.md, "The TTFT toll", explains them and what each buys.

- ``tokenize_once``: P is asked for its token ids (vLLM's ``return_token_ids``); D gets the
  /v1/completions prompt as those ids and does not tokenize it again.
- ``first_token_from_p``: P samples the first token anyway (max_tokens=1). The proxy sends it to the
  client the moment P answers; D continues from ``prompt ids + [that token]`` with
  ``max_tokens - 1`` and P's ``kv_transfer_params``. D loads the prompt's KV over NIXL and, as for
  any full remote hit, computes only the last token's (vLLM's scheduler: ``num_computed_tokens ==
  num_tokens`` -> ``num_tokens - 1``), which is the new token. The client sees one stream: P's id
  (vLLM names a completion ``cmpl-<X-Request-Id>``, and both legs get the same X-Request-Id), the
  token counts of one request in ``usage``, D's finish reason, ``max_tokens`` respected.

Chat (/v1/chat/completions): P gets the chat request (it renders the template) and answers with
the rendered prompt's ids. vLLM's chat endpoint takes no token ids, so D gets a /v1/completions
request from those ids (plus P's token), and the proxy writes D's answer back in the chat format
(``ChatStream``, ``chat_json``): P's id, the role chunk first, one chat chunk per D event. That
rewrites every chunk (in bytes for the usual token event, JSON for the rare ones), so it is only
on this path.

What takes the normal path instead (``skip_reason``, counted in ``pdtui_switch_skipped_total``):
anything where D continuing from the token would not give the single instance's output token for
token (stop strings spanning the seam, output-count penalties, min_tokens, structured output,
logprobs, echo, n > 1, batches of prompts, continuous usage), max_tokens = 1 (P would pin its KV
blocks for nobody), what a chat answer from ids cannot reproduce (``chat_skip``: tools, an unset
max_tokens, multimodal parts, a reasoning or tool parser on the server, ...), and, after P
answered, a prompt whose length is a multiple of the block size: prompt + 1 token then needs one more block on D than P sent, and vLLM 0.32.0's NIXL
worker asserts ``num_decode_blocks <= len(prefill_group)`` (``_apply_prefix_caching``). That check
needs the engines' block size: when P's blocks are not ceil(prompt / block_size) (a wrong
``--block-size``, or a model with several KV cache groups) the request takes the normal path too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pdtui.core.proxy.fields import COMPLETIONS_DEFAULT_MAX_TOKENS, as_int

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


_STRUCTURED = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
               "guided_grammar")


def _max_tokens(body: dict[str, Any]) -> int | None:
    """The request's max_tokens as vLLM reads it (chat: max_completion_tokens first; "4" is 4)."""
    m = as_int(body.get("max_completion_tokens"))
    return m if m is not None else as_int(body.get("max_tokens"))


def chat_skip(body: dict[str, Any]) -> str | None:
    """Why a chat request cannot be answered from D's /v1/completions answer to the rendered
    prompt's ids (either switch), or None when it can. Checked in vLLM 0.32.0's
    ``entrypoints/openai/chat_completion/serving.py`` against ``completion/serving.py``."""
    if body.get("tools") or body.get("functions") or body.get("tool_choice") not in (None, "none"):
        return "tools"  # a tool parser reads the output: not D's completions answer
    if any(body.get(k) for k in _STRUCTURED):
        return "structured_output"
    if body.get("logprobs") or body.get("top_logprobs") or body.get("prompt_logprobs") is not None:
        return "logprobs"  # chat's format (bytes, top_logprobs lists) is not completions'; not translated
    if (body.get("n") or 1) != 1 or body.get("use_beam_search"):
        return "n"
    if body.get("echo"):
        return "echo"
    if body.get("return_prompt_text"):
        return "prompt_text"
    if _max_tokens(body) is None:
        return "max_tokens_unset"  # chat's default is max_model_len - prompt; completions' is 16
    if (body.get("stream_options") or {}).get("continuous_usage_stats"):
        return "continuous_usage"
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return "chat_messages"
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(not isinstance(c, dict) or c.get("type") != "text" for c in content):
            return "multimodal"  # D would get the placeholders' ids without the media
    return None


def tokenize_once_skip(endpoint: str, body: dict[str, Any]) -> str | None:
    """Why D cannot be given the prompt as ids, or None when it can."""
    if endpoint == CHAT:
        return chat_skip(body)
    if not isinstance(body.get("prompt"), str):
        return "prompt_not_text"
    if body.get("echo"):
        return "echo"
    return None


def first_token_skip(endpoint: str, body: dict[str, Any]) -> str | None:
    """Why this request takes the normal path under first_token_from_p (before P), or None."""
    if endpoint == CHAT:
        if (why := chat_skip(body)) is not None:
            return why
    else:
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) or _is_ids(prompt)):
            return "prompt_batch"
        if (body.get("n") or 1) != 1 or (body.get("best_of") or 1) != 1:
            return "n"
        if body.get("echo"):
            return "echo"
        if body.get("logprobs") is not None or body.get("prompt_logprobs") is not None:
            return "logprobs"
    if body.get("stop") or body.get("bad_words"):
        return "stop_strings"
    if body.get("min_tokens"):
        return "min_tokens"
    if body.get("frequency_penalty") or body.get("presence_penalty"):
        return "penalties"
    if any(body.get(k) for k in _STRUCTURED):
        return "structured_output"
    if (_max_tokens(body) if endpoint == CHAT else as_int(body.get("max_tokens"))) == 1:
        return "max_tokens_1"
    if (body.get("stream_options") or {}).get("continuous_usage_stats"):
        return "continuous_usage"
    return None


@dataclass
class PAnswer:
    """What the first-token path needs from P's answer (``return_token_ids``)."""

    id: str
    created: int
    model: str
    text: str
    token_id: int
    prompt_ids: list[int]
    finish_reason: str | None
    stop_reason: Any
    role: str = "assistant"
    """Chat: the message's role (vLLM's ``--response-role``, or the last message's without a
    generation prompt)."""
    raw: dict[str, Any] | None = None
    """Chat: P's whole answer, the template of a non-streamed one (its fields and their order)."""

    @property
    def finished(self) -> bool:
        """P's one token ended the request (EOS or a stop token): no D leg."""
        return self.finish_reason == "stop"


def p_answer(data: Any) -> PAnswer | None:
    """P's answer as a PAnswer, or None when it has no token ids (a vLLM without return_token_ids)."""
    try:
        choice = data["choices"][0]
        ids, tokens = choice.get("prompt_token_ids"), choice.get("token_ids")
        if not _is_ids(ids) or not _is_ids(tokens) or len(tokens) != 1:
            return None
        return PAnswer(id=str(data.get("id", "")), created=int(data.get("created") or 0),
                       model=str(data.get("model", "")), text=choice.get("text") or "", token_id=tokens[0],
                       prompt_ids=ids, finish_reason=choice.get("finish_reason"),
                       stop_reason=choice.get("stop_reason"))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None


def chat_p_answer(data: Any) -> PAnswer | None:
    """P's chat answer (``return_token_ids``) as a PAnswer, or None when it has no token ids."""
    try:
        choice = data["choices"][0]
        message = choice["message"]
        ids, tokens = data.get("prompt_token_ids"), choice.get("token_ids")
        if not _is_ids(ids) or not _is_ids(tokens) or len(tokens) != 1:
            return None
        return PAnswer(id=str(data.get("id", "")), created=int(data.get("created") or 0),
                       model=str(data.get("model", "")), text=message.get("content") or "", token_id=tokens[0],
                       prompt_ids=ids, finish_reason=choice.get("finish_reason"),
                       stop_reason=choice.get("stop_reason"), role=str(message.get("role") or "assistant"),
                       raw=data)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None


def chat_parser_seen(p: PAnswer) -> str | None:
    """"chat_parser" when P's answer shows a reasoning or tool parser at work on the server (a
    reasoning field, tool calls, or usage's completion_tokens_details, which vLLM fills only with a
    reasoning parser): the chat answer is then not D's text. None otherwise."""
    raw = p.raw or {}
    message = raw["choices"][0]["message"]
    if message.get("reasoning") or message.get("reasoning_content") or message.get("tool_calls"):
        return "chat_parser"
    if (raw.get("usage") or {}).get("completion_tokens_details") is not None:
        return "chat_parser"
    return None


def crosses_block(p: PAnswer, block_size: int) -> bool:
    """prompt + 1 token needs a block more than the prompt: D would allocate more than P sent."""
    return len(p.prompt_ids) % block_size == 0


def decode_body(body: dict[str, Any], kv_params: dict[str, Any], p: PAnswer) -> dict[str, Any]:
    """D's body: the client's, from prompt ids + P's token, one token fewer to make."""
    d = dict(body)
    d["kv_transfer_params"] = kv_params
    d["prompt"] = [*p.prompt_ids, p.token_id]
    m = as_int(body.get("max_tokens"))  # null or absent: vLLM's 16
    d["max_tokens"] = (COMPLETIONS_DEFAULT_MAX_TOKENS if m is None else m) - 1
    return d


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _choice(p: PAnswer, want_ids: bool, finish: bool) -> dict[str, Any]:
    return {"index": 0, "text": p.text, "logprobs": None,
            "finish_reason": p.finish_reason if finish else None,
            "stop_reason": p.stop_reason if finish else None,
            "prompt_token_ids": p.prompt_ids if want_ids else None,
            "token_ids": [p.token_id] if want_ids else None}


def first_event(p: PAnswer, want_ids: bool, finish: bool = False) -> bytes:
    """The SSE event of P's token, as vLLM would stream it (its id, created and model)."""
    obj = {"id": p.id, "object": "text_completion", "created": p.created, "model": p.model,
           "choices": [_choice(p, want_ids, finish)]}
    return b"data: " + _dumps(obj) + b"\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def p_only_stream(p: PAnswer, want_ids: bool, include_usage: bool) -> bytes:
    """The whole stream when P's token finished the request."""
    out = first_event(p, want_ids, finish=True)
    if include_usage:
        out += b"data: " + _dumps({"id": p.id, "object": "text_completion", "created": p.created, "model": p.model,
                                   "choices": [], "usage": _usage(len(p.prompt_ids), 1)}) + b"\n\n"
    return out + b"data: [DONE]\n\n"


def p_only_json(p: PAnswer, want_ids: bool) -> bytes:
    """The non-streamed answer when P's token finished the request."""
    return _dumps({"id": p.id, "object": "text_completion", "created": p.created, "model": p.model,
                   "choices": [_choice(p, want_ids, finish=True)], "usage": _usage(len(p.prompt_ids), 1)})


def merge_json(p: PAnswer, content: bytes, want_ids: bool) -> bytes:
    """D's non-streamed answer with P's token in front: text, token ids, prompt ids, usage."""
    obj = json.loads(content)
    choice = obj["choices"][0]
    choice["text"] = p.text + (choice.get("text") or "")
    if want_ids:
        choice["token_ids"] = [p.token_id, *(choice.get("token_ids") or [])]
        choice["prompt_token_ids"] = p.prompt_ids
    usage = obj.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        obj["usage"] = {**usage, **_usage(len(p.prompt_ids), usage["completion_tokens"] + 1)}
    return _dumps(obj)


_PROMPT_IDS = re.compile(rb'"prompt_token_ids": ?\[[^\]]*\]')
_USAGE_PROMPT = re.compile(rb'("usage": ?\{[^}]*?"prompt_tokens": ?)(\d+)')
_USAGE_COMPLETION = re.compile(rb'("usage": ?\{[^}]*?"completion_tokens": ?)(\d+)')


def drop_prompt_ids(data: bytes) -> bytes:
    """D's first event repeats prompt_token_ids (its prompt: the client's + P's token); P's event
    already carried the client's."""
    return _PROMPT_IDS.sub(b'"prompt_token_ids":null', data, count=1)


def fix_usage(data: bytes) -> bytes:
    """D's usage event counts P's token in the prompt: move it to the completion (total unchanged)."""
    data = _USAGE_PROMPT.sub(lambda m: m.group(1) + str(int(m.group(2)) - 1).encode(), data)
    return _USAGE_COMPLETION.sub(lambda m: m.group(1) + str(int(m.group(2)) + 1).encode(), data)


# ----- chat: D's /v1/completions answer written as vLLM's chat endpoint writes it -----------------
# The shapes are vLLM 0.32.0's (chat_completion/serving.py: chunks dumped with exclude_unset, the
# usage chunk with exclude_none too), checked against the CPU engine's own answers.

_CHAT_ONLY = ("messages", "add_generation_prompt", "add_special_tokens", "chat_template", "chat_template_kwargs",
              "continue_final_message", "documents", "media_io_kwargs", "mm_processor_kwargs",
              "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
              "reasoning_effort", "include_reasoning", "logprobs", "top_logprobs", "return_prompt_text")
"""Chat fields a /v1/completions request has not (or reads otherwise: completions' logprobs is a
count): they only shape the template, which P rendered, or are refused by ``chat_skip``."""

CHUNK = "chat.completion.chunk"


def chat_decode_body(body: dict[str, Any], kv_params: dict[str, Any], p: PAnswer, first: bool) -> dict[str, Any]:
    """D's /v1/completions body for a chat request: the rendered prompt's ids (plus P's token when
    ``first``), the sampling fields the two endpoints share (same names, same defaults in vLLM
    0.32.0), max_tokens as chat reads it (one fewer when ``first``)."""
    d = {k: v for k, v in body.items() if k not in _CHAT_ONLY}
    d["prompt"] = [*p.prompt_ids, p.token_id] if first else list(p.prompt_ids)
    m = _max_tokens(body)
    assert m is not None  # chat_skip refused an unset max_tokens
    d["max_tokens"] = m - (1 if first else 0)
    d["kv_transfer_params"] = kv_params
    return d


def _head(p: PAnswer) -> dict[str, Any]:
    return {"id": p.id, "object": CHUNK, "created": p.created, "model": p.model}


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def chat_role_event(p: PAnswer, want_ids: bool) -> bytes:
    """The chunk vLLM's chat stream opens with: the role, empty content, the prompt's ids if asked."""
    return _sse({**_head(p), "choices": [{"index": 0, "delta": {"role": p.role, "content": ""}, "logprobs": None,
                                         "finish_reason": None}],
                 "prompt_token_ids": p.prompt_ids if want_ids else None, "prompt_text": None})


def _chat_choice(index: int, text: str, finish: str | None, stop_reason: Any, ids: list[int] | None) -> dict[str, Any]:
    c: dict[str, Any] = {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
    if finish is not None:
        c["stop_reason"] = stop_reason  # set (so dumped) only on the finishing chunk
    c["token_ids"] = ids
    return c


def chat_first_events(p: PAnswer, want_ids: bool) -> bytes:
    """P's token as the chat stream's first two chunks: the role, then the token."""
    return chat_role_event(p, want_ids) + _sse({**_head(p), "choices": [
        _chat_choice(0, p.text, None, None, [p.token_id] if want_ids else None)]})


def _usage_of(raw: dict[str, Any] | None) -> dict[str, Any]:
    usage = (raw or {}).get("usage")
    return usage if isinstance(usage, dict) else {}


def chat_p_only_stream(p: PAnswer, want_ids: bool, include_usage: bool) -> bytes:
    """The whole chat stream when P's token finished the request."""
    fp = (p.raw or {}).get("system_fingerprint")
    last: dict[str, Any] = {**_head(p), "choices": [
        _chat_choice(0, p.text, p.finish_reason, p.stop_reason, [p.token_id] if want_ids else None)]}
    if not include_usage and fp is not None:
        last["system_fingerprint"] = fp
    out = chat_role_event(p, want_ids) + _sse(last)
    if include_usage:
        usage = {k: v for k, v in _usage_of(p.raw).items() if v is not None} or _usage(len(p.prompt_ids), 1)
        tail: dict[str, Any] = {**_head(p), "choices": [], "usage": usage}
        if fp is not None:
            tail["system_fingerprint"] = fp
        out += _sse(tail)
    return out + b"data: [DONE]\n\n"


def _chat_answer(p: PAnswer, want_ids: bool) -> dict[str, Any]:
    """P's answer as the template of the client's: what only P's leg had (kv_transfer_params) gone,
    the ids only if the client asked."""
    obj = json.loads(_dumps(p.raw))  # a copy
    choice = obj["choices"][0]
    obj["kv_transfer_params"] = None
    if not want_ids:
        choice["token_ids"] = None
        obj["prompt_token_ids"] = None
    return obj


def chat_p_only_json(p: PAnswer, want_ids: bool) -> bytes:
    """The non-streamed chat answer when P's token finished the request: P's own."""
    return _dumps(_chat_answer(p, want_ids))


def chat_json(p: PAnswer, content: bytes, want_ids: bool, first: bool) -> bytes:
    """D's non-streamed /v1/completions answer as the chat answer: P's answer as the template (its
    fields in vLLM's order), D's text (after P's token when ``first``), finish, ids and usage."""
    d = json.loads(content)
    dc = d["choices"][0]
    obj = _chat_answer(p, want_ids)
    choice = obj["choices"][0]
    head = [p.token_id] if first else []
    choice["message"]["content"] = (p.text if first else "") + (dc.get("text") or "")
    choice["finish_reason"] = dc.get("finish_reason") or "stop"
    choice["stop_reason"] = dc.get("stop_reason")
    choice["token_ids"] = [*head, *(dc.get("token_ids") or [])] if want_ids else None
    for k in ("system_fingerprint", "service_tier", "metrics"):
        if k in obj:
            obj[k] = d.get(k)
    usage = d.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        obj["usage"] = {**usage, **_usage(len(p.prompt_ids), usage["completion_tokens"] + len(head))}
    return _dumps(obj)


_JSTR = rb'"(?:[^"\\]|\\.)*"'
_TOKEN_EVENT = re.compile(
    rb'data: \{"id":' + _JSTR + rb',"object":"text_completion","created":\d+,"model":' + _JSTR
    + rb',"choices":\[\{"index":(\d+),"text":(' + _JSTR + rb'),"logprobs":null,"finish_reason":null,'
    rb'"stop_reason":null,"prompt_token_ids":null,"token_ids":(null|\[[0-9,]*\])\}\]\}')
"""The usual event of D's stream, as vLLM 0.32.0 writes it: one token, nothing else set. The fast
path rewrites it in bytes (the token's text kept as vLLM escaped it); any other event is parsed."""


class ChatStream:
    """D's /v1/completions stream (whole SSE events) rewritten into vLLM's chat stream: the role
    chunk before D's first event unless P's token went first (``first``), then per event the chat
    chunk: P's id, created and model; ``delta.content`` for ``text``; ``stop_reason`` only on the
    finishing chunk; no prompt ids (the role chunk carries them); usage with P's token moved from
    prompt to completion when ``first``. [DONE], errors and anything not a completion pass as they are.

    A token event in vLLM's exact layout (``_TOKEN_EVENT``) is rewritten in bytes; the rest (D's
    first event with the prompt's ids, the finishing one, usage) with a JSON parse and dump."""

    __slots__ = ("first", "head", "moved", "p", "prefix", "role_pending", "want_ids")

    def __init__(self, p: PAnswer, want_ids: bool, first: bool) -> None:
        self.p, self.want_ids, self.first = p, want_ids, first
        self.role_pending = not first
        self.moved = 1 if first else 0
        """Tokens of D's prompt that are the client's completion (P's token; a migration's tokens
        already sent, pdtui.core.proxy.migrate): moved from prompt to completion in the usage."""
        self.head = _head(p)
        self.prefix = b"data: " + _dumps({**self.head, "choices": []})[:-3] + b'[{"index":'

    def translate(self, data: bytes) -> bytes:
        """Whole events (``data`` ends with a blank line) in, the chat events out."""
        return b"".join(self.event(ev) for ev in data[:-2].split(b"\n\n"))

    def event(self, ev: bytes) -> bytes:
        m = _TOKEN_EVENT.fullmatch(ev)
        if m is not None:
            role = b""
            if self.role_pending:
                role, self.role_pending = chat_role_event(self.p, self.want_ids), False
            return b"".join((role, self.prefix, m.group(1), b',"delta":{"content":', m.group(2),
                             b'},"logprobs":null,"finish_reason":null,"token_ids":',
                             m.group(3) if self.want_ids else b"null", b"}]}\n\n"))
        payload = ev[5:].strip() if ev.startswith(b"data:") else b""
        obj = None
        if payload.startswith(b"{"):
            try:
                obj = json.loads(payload)
            except (json.JSONDecodeError, UnicodeDecodeError):
                obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            return ev + b"\n\n"  # [DONE], an error event, a comment: as D sent it
        out = {**self.head}
        for k, v in obj.items():
            if k == "choices":
                out[k] = [self._choice(c) for c in v]
            elif k == "usage" and isinstance(v, dict) and self.moved and isinstance(v.get("prompt_tokens"), int):
                out[k] = {**v, "prompt_tokens": v["prompt_tokens"] - self.moved,
                          "completion_tokens": v.get("completion_tokens", 0) + self.moved}
            elif k not in out:
                out[k] = v
        role = b""
        if self.role_pending:
            role, self.role_pending = chat_role_event(self.p, self.want_ids), False
        return role + _sse(out)

    def _choice(self, c: dict[str, Any]) -> dict[str, Any]:
        return _chat_choice(c.get("index", 0), c.get("text") or "", c.get("finish_reason"), c.get("stop_reason"),
                            c.get("token_ids") if self.want_ids else None)
