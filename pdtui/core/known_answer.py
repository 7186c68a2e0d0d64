"""The correctness witness: a greedy request whose answer is known, sent through the pair and
compared token for token (issue 27, the fail-open of vLLM #52234: D given stale or wrong
``kv_transfer_params`` answered 200 with another prompt's answer, or garbage, with its failure
counter at 0). A status says nothing here: only the tokens do.

The known answer is P's own (``reference``): the prompt computed by P alone, no
kv_transfer_params, greedy (temperature 0, ignore_eos), token ids returned. P and D serve the same
weights (pdtui's config renders both from one source, and `pdtui attach` checks the model), so the
pair must give the same ids; with dummy weights too (both engines seed them alike: tests/e2e's
greedy checks). ``check`` sends the same body through the proxy and says where the ids part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from pdtui.core.events import AnswerChecked


@dataclass(frozen=True)
class Reference:
    prompt: list[int]
    tokens: list[int]
    url: str
    """Where the answer came from (P's URL: the prompt computed there alone)."""
    logprobs: tuple[float, ...] = ()
    """Each token's logprob in the known answer."""

    @property
    def flat(self) -> bool:
        """Every token had the same logprob: the model's answer does not depend on its context (vLLM's
        dummy weights give each of the vocabulary's ids ln 1/vocab), so no wrong KV can change it
        and the witness is blind (``pdtui model synth --weights`` writes weights that are not)."""
        return len(self.logprobs) > 1 and max(self.logprobs) - min(self.logprobs) < 1e-4


def body(model: str, prompt: Sequence[int], max_tokens: int) -> dict[str, Any]:
    """The witness's request: greedy, a fixed length, its token ids and logprobs returned, not streamed."""
    return {"model": model, "prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "logprobs": 1, "stream": False}


def token_ids(data: Any) -> list[int] | None:
    try:
        ids = data["choices"][0]["token_ids"]
    except (KeyError, IndexError, TypeError):
        return None
    return ids if isinstance(ids, list) and all(isinstance(i, int) for i in ids) else None


async def reference(client: httpx.AsyncClient, url: str, model: str, prompt: Sequence[int], max_tokens: int) -> Reference:
    """The known answer: ``prompt`` computed by the engine at ``url`` alone. Raises
    httpx.HTTPStatusError or ValueError when it gives none."""
    r = await client.post(f"{url.rstrip('/')}/v1/completions", json=body(model, prompt, max_tokens))
    r.raise_for_status()
    data = r.json()
    ids = token_ids(data)
    if ids is None or len(ids) != max_tokens:
        raise ValueError(f"{url} gave no {max_tokens} token ids for the witness: {r.text[:200]}")
    try:
        lps = tuple(float(x) for x in data["choices"][0]["logprobs"]["token_logprobs"])
    except (KeyError, IndexError, TypeError, ValueError):
        lps = ()
    return Reference(list(prompt), ids, url, lps)


@dataclass(frozen=True)
class Verdict:
    request_id: str
    status: int | None
    ok: bool
    """The pair's ids equal the known answer's, every one."""
    detail: str
    got: list[int]
    expected: list[int]

    def event(self) -> AnswerChecked:
        return AnswerChecked(request_id=self.request_id, ok=self.ok, status=self.status, detail=self.detail,
                             expected=self.expected, got=self.got)


def compare(request_id: str, status: int | None, got: list[int] | None, expected: list[int],
            error: str | None = None) -> Verdict:
    """The verdict on one answer: ok only with every id in place."""
    if got is None:
        why = error or f"no token ids in the answer (status {status})"
        return Verdict(request_id, status, False, why, [], expected)
    if got == expected:
        return Verdict(request_id, status, True, f"equal: {len(got)} of {len(expected)} tokens", got, expected)
    at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
    same = sum(1 for a, b in zip(got, expected, strict=False) if a == b)
    first = (f"token {at}: expected {expected[at]}, got {got[at]}" if at < min(len(got), len(expected))
             else f"{len(got)} tokens instead of {len(expected)}")
    return Verdict(request_id, status, False, f"differs from {first}; {same} of {len(expected)} in place"
                   f"{' (HTTP 200: the fail-open)' if status == 200 else ''}", got, expected)


async def check(client: httpx.AsyncClient, proxy_url: str, model: str, prompt: Sequence[int], ref: Reference, *,
                request_id: str, headers: Mapping[str, str] | None = None) -> Verdict:
    """The witness through the pair (``proxy_url``), compared with ``ref``."""
    try:
        r = await client.post(f"{proxy_url.rstrip('/')}/v1/completions", json=body(model, prompt, len(ref.tokens)),
                              headers={"X-Request-Id": request_id, **(headers or {})})
    except httpx.HTTPError as e:
        return compare(request_id, None, None, ref.tokens, f"{type(e).__name__}: {e}")
    try:
        data = r.json()
    except ValueError:
        data = None
    got = token_ids(data)
    error = None if got is not None else f"status {r.status_code}: {r.text[:160]}"
    return compare(request_id, r.status_code, got, ref.tokens, error)
