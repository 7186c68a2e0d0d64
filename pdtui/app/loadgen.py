"""The built-in load generator: OpenAI requests with httpx to the proxy (no Textual here).

Each scenario returns (ok, errors). A stream that ends with an SSE error event, or without
``[DONE]``, counts as an error: that is what a killed D looks like to a client.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

_seq = itertools.count(1)

WORDS = ["prefill", "decode", "cache", "block", "transfer", "token", "layer", "head", "pull", "push", "engine",
         "proxy", "stream", "latency", "nixl", "memory", "pool", "queue", "batch"]


def prompt_of(tokens_hint: int, salt: int) -> str:
    """A unique prompt of roughly ``tokens_hint`` tokens (unique so prefix caching does not hide the pull)."""
    words = [WORDS[(salt * 7 + i * 3) % len(WORDS)] for i in range(max(1, tokens_hint))]
    return f"[{salt}] " + " ".join(words)


@dataclass
class Result:
    ok: int = 0
    errors: int = 0

    def add(self, good: bool) -> None:
        if good:
            self.ok += 1
        else:
            self.errors += 1


async def one_request(client: httpx.AsyncClient, base_url: str, model: str, *, prompt_tokens: int = 200,
                      max_tokens: int = 32, stream: bool = True) -> bool:
    body = {"model": model, "prompt": prompt_of(prompt_tokens, next(_seq)), "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream}
    try:
        if not stream:
            r = await client.post(f"{base_url}/v1/completions", json=body)
            return r.status_code == 200
        async with client.stream("POST", f"{base_url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return False
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                elif '"error"' in data and "error" in json.loads(data):
                    return False
            return done
    except (httpx.HTTPError, ValueError):
        return False


Scenario = Callable[[httpx.AsyncClient, str, str], Awaitable[Result]]


async def single(client: httpx.AsyncClient, base_url: str, model: str) -> Result:
    res = Result()
    res.add(await one_request(client, base_url, model, prompt_tokens=300, max_tokens=32))
    return res


async def steady_streams(client: httpx.AsyncClient, base_url: str, model: str, *, streams: int = 4,
                         rounds: int = 3) -> Result:
    res = Result()

    async def worker() -> None:
        for _ in range(rounds):
            res.add(await one_request(client, base_url, model, prompt_tokens=100, max_tokens=128))

    await asyncio.gather(*(worker() for _ in range(streams)))
    return res


async def big_prompts(client: httpx.AsyncClient, base_url: str, model: str, *, count: int = 4) -> Result:
    res = Result()
    for _ in range(count):
        res.add(await one_request(client, base_url, model, prompt_tokens=3000, max_tokens=8))
    return res


async def interference(client: httpx.AsyncClient, base_url: str, model: str) -> Result:
    """Steady decode streams while big prompts arrive: does D's ITL suffer from the pulls?"""
    a, b = await asyncio.gather(steady_streams(client, base_url, model, streams=3, rounds=2),
                                big_prompts(client, base_url, model, count=3))
    return Result(a.ok + b.ok, a.errors + b.errors)


SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "single": ("one request (300-token prompt, 32 tokens streamed)", single),
    "steady": ("steady decode streams (4 x 3 requests, 128 tokens each)", steady_streams),
    "big": ("big prompts (4 x 3000 tokens, 8 tokens each)", big_prompts),
    "mix": ("interference mix (decode streams + big prompts at once)", interference),
}


async def run(name: str, base_url: str, model: str, *, timeout_s: float = 300.0,
              transport: httpx.AsyncBaseTransport | None = None) -> Result:
    _, scenario = SCENARIOS[name]
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0), transport=transport) as client:
        return await scenario(client, base_url, model)
