"""The built-in load generator: OpenAI requests with httpx to the proxy (no Textual here).

Each scenario returns a ``Result``: ok, errors, and the prompt sizes actually sent. Streams go
through the core's SSE client (pdtui.core.sse_client); one that ends with an SSE error event, or
without ``[DONE]``, counts as an error: that is what a killed D looks like to a client.

Prompts are cut to their size by the model's own tokenizer (pdtui.core.prompts) and never longer
than max_model_len less the tokens asked for: a words-based estimate was 6x off on the generated
model (a "3000-token" prompt was 18,954 tokens, and P answered 400).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from pdtui.core import sse_client
from pdtui.core.prompts import EngineTokenizer, TokenCounter, filler, prompt_budget

_seq = itertools.count(1)


def prompt_of(tokens_hint: int, salt: int) -> str:
    """A unique prompt of about ``tokens_hint`` words (for the drill's witness: its size does not matter)."""
    return filler(salt, tokens_hint)


class Sizer(Protocol):
    name: str

    async def prompt(self, tokens: int, salt: int) -> tuple[str, int]: ...


class LocalSizer:
    """A TokenCounter on this machine (the generated model, a local folder, the hub's cache)."""

    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter
        self.name = counter.name

    async def prompt(self, tokens: int, salt: int) -> tuple[str, int]:
        return self.counter.prompt(tokens, salt)


@dataclass
class Load:
    """What a scenario needs: the proxy, the model, the prompt sizer and the length limit."""

    client: httpx.AsyncClient
    base_url: str
    model: str
    sizer: Sizer | None = None
    max_model_len: int | None = None

    async def prompt(self, tokens: int, max_tokens: int) -> tuple[str, int | None]:
        """A unique prompt of ``tokens`` tokens, cut to fit max_model_len; (text, tokens sent or
        None when no tokenizer is known: then the words count stands in, marked ~ in the label)."""
        salt = next(_seq)
        if self.max_model_len:
            tokens = min(tokens, prompt_budget(self.max_model_len, max_tokens))
        if self.sizer is None:
            return filler(salt, tokens), None
        return await self.sizer.prompt(tokens, salt)


@dataclass
class Result:
    ok: int = 0
    errors: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    """The size of every prompt sent, by the model's tokenizer."""
    first_error: str = ""

    def add(self, good: bool, tokens: int | None = None, error: str = "") -> None:
        if good:
            self.ok += 1
        else:
            self.errors += 1
            self.first_error = self.first_error or error
        if tokens is not None:
            self.prompt_tokens.append(tokens)

    def merge(self, other: Result) -> Result:
        return Result(self.ok + other.ok, self.errors + other.errors, self.prompt_tokens + other.prompt_tokens,
                      self.first_error or other.first_error)

    def sizes(self) -> str:
        """The prompt sizes sent, for the notice: "1,024 tokens" or "100-3,000 tokens"."""
        if not self.prompt_tokens:
            return "prompt sizes unknown (no tokenizer)"
        lo, hi = min(self.prompt_tokens), max(self.prompt_tokens)
        return f"prompts {lo:,} tokens" if lo == hi else f"prompts {lo:,}-{hi:,} tokens"


async def one_request(load: Load, res: Result, *, prompt_tokens: int = 200, max_tokens: int = 32,
                      stream: bool = True) -> None:
    try:
        prompt, sent = await load.prompt(prompt_tokens, max_tokens)
    except (httpx.HTTPError, KeyError, ValueError) as e:  # the engine's /tokenize: down, or not vLLM
        res.add(False, None, f"sizing the prompt: {type(e).__name__}: {e}")
        return
    body: dict[str, Any] = {"model": load.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                            "stream": stream}
    if stream:  # the last chunk carries the usage: the proxy's trace gets completion_tokens from it
        body["stream_options"] = {"include_usage": True}
    url = f"{load.base_url}/v1/completions"
    if not stream:
        try:
            r = await load.client.post(url, json=body)
        except (httpx.HTTPError, ValueError) as e:
            res.add(False, sent, f"{type(e).__name__}: {e}")
            return
        res.add(r.status_code == 200, sent, f"HTTP {r.status_code}: {r.text[:200]}")
        return
    rec = await sse_client.stream(load.client, url, body)
    if rec.transport_error is not None:
        res.add(False, sent, rec.transport_error)
    elif rec.status != 200:
        res.add(False, sent, f"HTTP {rec.status}: {rec.body[:200]}")
    elif rec.error_event is not None:
        res.add(False, sent, str(rec.error_event)[:200])
    else:
        res.add(rec.done, sent, "" if rec.done else "stream ended without [DONE]")


Scenario = Callable[[Load], Awaitable[Result]]

SINGLE_TOKENS = 1024
STEADY_TOKENS = 640
"""What the "100-token" prompts of the steady streams were in fact on the tiny model (about 650): the
same load as before, now labelled with its size. The drill's witness stream must outlive the
steady streams' prefills until D is killed; shorter prompts let it finish first."""
BIG_TOKENS = 3000


async def single(load: Load) -> Result:
    res = Result()
    await one_request(load, res, prompt_tokens=SINGLE_TOKENS, max_tokens=32)
    return res


async def steady_streams(load: Load, *, streams: int = 4, rounds: int = 3) -> Result:
    res = Result()

    async def worker() -> None:
        for _ in range(rounds):
            await one_request(load, res, prompt_tokens=STEADY_TOKENS, max_tokens=128)

    await asyncio.gather(*(worker() for _ in range(streams)))
    return res


async def big_prompts(load: Load, *, count: int = 4) -> Result:
    res = Result()
    for _ in range(count):
        await one_request(load, res, prompt_tokens=BIG_TOKENS, max_tokens=8)
    return res


async def interference(load: Load) -> Result:
    """Steady decode streams while big prompts arrive: does D's ITL suffer from the pulls?"""
    a, b = await asyncio.gather(steady_streams(load, streams=3, rounds=2), big_prompts(load, count=3))
    return a.merge(b)


SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "single": (f"one request ({SINGLE_TOKENS:,}-token prompt, 32 tokens streamed)", single),
    "steady": (f"steady decode streams (4 x 3 requests, {STEADY_TOKENS}-token prompts, 128 tokens each)",
               steady_streams),
    "big": (f"big prompts (4 x {BIG_TOKENS:,} tokens, cut to fit max_model_len, 8 tokens each)", big_prompts),
    "mix": ("interference mix (3 decode streams + 3 big prompts at once)", interference),
}


def local_sizer(model: str) -> LocalSizer | None:
    counter = TokenCounter.for_model(model)
    return LocalSizer(counter) if counter is not None else None


async def run(name: str, base_url: str, model: str, *, timeout_s: float = 300.0,
              transport: httpx.AsyncBaseTransport | None = None, sizer: Sizer | None = None,
              max_model_len: int | None = None, engine_url: str | None = None) -> Result:
    """Run one scenario. ``sizer`` counts the prompts (LocalSizer); without one, ``engine_url``
    (a vLLM instance) tokenizes them; without either, prompts are sized by words and unlabelled."""
    _, scenario = SCENARIOS[name]
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0), transport=transport) as client:
        if sizer is None and engine_url:
            sizer = EngineTokenizer(client, engine_url, model)
        return await scenario(Load(client, base_url, model, sizer, max_model_len))
