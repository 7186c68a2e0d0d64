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

What takes the normal path instead (``skip_reason``, counted in ``pdtui_switch_skipped_total``):
anything where D continuing from the token would not give the single instance's output token for
token (stop strings spanning the seam, output-count penalties, min_tokens, structured output,
logprobs, echo, n > 1, batches of prompts, continuous usage), max_tokens = 1 (P would pin its KV
blocks for nobody), chat (vLLM's chat endpoint takes no token ids: D cannot be handed the token
without rewriting every chunk), and, after P answered, a prompt whose length is a multiple of the
block size: prompt + 1 token then needs one more block on D than P sent, and vLLM 0.32.0's NIXL
worker asserts ``num_decode_blocks <= len(prefill_group)`` (``_apply_prefix_caching``). That check
needs the engines' block size: when P's blocks are not ceil(prompt / block_size) (a wrong
``--block-size``, or a model with several KV cache groups) the request takes the normal path too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

COMPLETIONS = "/v1/completions"


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def tokenize_once_skip(endpoint: str, body: dict[str, Any]) -> str | None:
    """Why D cannot be given the prompt as ids, or None when it can."""
    if endpoint != COMPLETIONS:
        return "chat"
    if not isinstance(body.get("prompt"), str):
        return "prompt_not_text"
    if body.get("echo"):
        return "echo"
    return None


def first_token_skip(endpoint: str, body: dict[str, Any]) -> str | None:
    """Why this request takes the normal path under first_token_from_p (before P), or None."""
    if endpoint != COMPLETIONS:
        return "chat"
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
    if any(body.get(k) for k in ("response_format", "structured_outputs", "guided_json", "guided_regex",
                                 "guided_choice", "guided_grammar")):
        return "structured_output"
    if body.get("max_tokens") == 1:
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


def crosses_block(p: PAnswer, block_size: int) -> bool:
    """prompt + 1 token needs a block more than the prompt: D would allocate more than P sent."""
    return len(p.prompt_ids) % block_size == 0


def decode_body(body: dict[str, Any], kv_params: dict[str, Any], p: PAnswer) -> dict[str, Any]:
    """D's body: the client's, from prompt ids + P's token, one token fewer to make."""
    d = dict(body)
    d["kv_transfer_params"] = kv_params
    d["prompt"] = [*p.prompt_ids, p.token_id]
    if isinstance(body.get("max_tokens"), int):
        d["max_tokens"] = body["max_tokens"] - 1
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
