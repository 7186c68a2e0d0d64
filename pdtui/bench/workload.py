"""Seeded prompts, the samples the streaming client (pdtui.core.sse_client) fills, and the workloads
(follow and interference by default; fill, for the choice of D).

Every arm is measured here, on the client side, identically: the time from sending a request to
its first token-carrying SSE chunk (TTFT), and every gap between token-carrying chunks (ITL, per
chunk). A chunk whose text is empty (vLLM sends one for a token that decodes to no text yet, e.g.
the first byte of a multi-byte character, or a special token) is not counted as a token chunk but
its arrival is kept (``Sample.empty_t``): ``vllm bench serve`` counts every chunk with choices,
and report.py computes its definition from both lists (docs/bench.md, "ITL: two definitions").
Nothing here knows which arm it is talking to.

Prompts: with the byte-level synthetic tokenizer one ASCII character is one token, so a prompt of
N characters is N tokens. Every prompt starts with its own tag (seed, workload, index), so no two
share a first block and prefix caching can't help; the same seed gives both arms the same prompts.
An arm over engines that kept their prefix caches from an earlier arm or run (attached by URL)
adds its salt to the tag (``LoadTarget.salt``: the arm and the run's nonce), so its prompts are new
to them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import string
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pdtui.core import sse_client

ALPHABET = string.ascii_lowercase + "      "


def make_prompt(seed: int, workload: str, index: int, length: int, salt: str = "") -> str:
    """``length`` ASCII characters (= tokens with the byte-level tokenizer), unique per (workload,
    index), and per ``salt`` when one is given (without one: the seed's prompts, the same in every arm)."""
    tag = f"{seed}:{salt}:{workload}:{index}" if salt else f"{seed}:{workload}:{index}"
    head = f"[{tag}] "
    rng = random.Random(tag)
    body = "".join(rng.choice(ALPHABET) for _ in range(max(0, length - len(head))))
    return (head + body)[:length]


@dataclass
class Sample:
    """One request as the client saw it. Times are seconds on the bench's clock (monotonic)."""

    arm: str
    workload: str
    """follow | stream (a steady decode stream of interference) | big (a big prompt of interference) |
    fill (a long stream of the fill workload)"""
    request_id: str
    prompt_tokens: int
    max_tokens: int
    t_send: float
    warmup: bool = False
    """Warm-up requests are kept in the raw data and left out of every statistic."""
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    chunk_t: list[float] = field(default_factory=list)
    """Arrival time of every token-carrying chunk (for windowing the steady streams)."""
    empty_t: list[float] = field(default_factory=list)
    """Arrival time of every chunk with choices but empty text (not in chunk_t, TTFT or itl_ms)."""
    t_end: float | None = None
    status: int | None = None
    error: str | None = None
    cancelled: bool = False
    """Stopped by the bench (a steady stream at the end of its window, or Ctrl-C)."""
    trace: dict[str, Any] | None = None
    """Pair arm: the proxy's RequestTraced for this X-Request-Id (toll split, blocks, bytes)."""

    @property
    def chunks(self) -> int:
        return len(self.chunk_t)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.ttft_ms is not None


class Clock:
    """The bench's clock: seconds since the bench began (monotonic); injectable for tests."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self.zero = now()

    def __call__(self) -> float:
        return self._now() - self.zero


async def stream_completion(client: httpx.AsyncClient, base_url: str, model: str, prompt: str,
                            sample: Sample, clock: Clock) -> Sample:
    """POST a streamed completion with the core's SSE client (pdtui.core.sse_client) and time every
    token-carrying chunk into ``sample`` as they come (its ``chunk_t`` and ``empty_t`` are the
    client's lists), so a cancelled request keeps what was measured. The answer is read up to
    ``[DONE]``; an error event, a status other than 200 or a transport failure is ``sample.error``."""
    body = {"model": model, "prompt": prompt, "max_tokens": sample.max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.0}
    rec = sse_client.SseStream(chunk_t=sample.chunk_t, empty_t=sample.empty_t)
    try:
        await sse_client.stream(client, f"{base_url}/v1/completions", body, rec,
                                headers={"X-Request-Id": sample.request_id}, clock=clock, stop_at_done=True)
    finally:
        sample.t_send = rec.t_send if rec.t_send is not None else sample.t_send
        sample.status = rec.status
        if rec.status is not None and rec.status != 200:
            sample.error = rec.body
        elif rec.error_event is not None:
            sample.error = json.dumps(rec.error_event)[:500]
        elif rec.transport_error is not None:
            sample.error = rec.transport_error
        sample.ttft_ms = rec.ttft_ms
        sample.itl_ms = rec.itl_ms
        sample.cancelled = rec.cancelled
        sample.t_end = rec.t_end
    return sample


@dataclass
class LoadTarget:
    """Where and how to send: the arm's URL, the model name, the samples list to append to."""

    arm: str
    base_url: str
    model: str
    client: httpx.AsyncClient
    clock: Clock
    samples: list[Sample]
    windows: dict[str, list[float]]
    """workload -> [t0, t1]: the measured window (warm-up excluded)."""
    on_progress: Callable[[str, float, float], None] = lambda what, done, total: None
    salt: str = ""
    """In every prompt's tag (make_prompt): "" but for an arm over engines that kept their caches."""

    def new_sample(self, workload: str, index: int | str, prompt_tokens: int, max_tokens: int,
                   warmup: bool = False) -> Sample:
        s = Sample(arm=self.arm, workload=workload, request_id=f"bench-{self.arm}-{workload}-{index}",
                   prompt_tokens=prompt_tokens, max_tokens=max_tokens, t_send=self.clock(), warmup=warmup)
        self.samples.append(s)
        return s

    async def send(self, sample: Sample, prompt: str) -> Sample:
        return await stream_completion(self.client, self.base_url, self.model, prompt, sample, self.clock)


BIG_PROMPT_LEN = 2031
"""Tokens of a big prompt (follow and interference): about 2k, as in DESIGN.md's reference run."""


@dataclass
class FollowSpec:
    """One big prompt at a time. These defaults are `pdtui bench`'s (--quick overrides some)."""

    requests: int = 8
    prompt_len: int = BIG_PROMPT_LEN
    max_tokens: int = 64
    warmup: int = 1
    """Warm-up requests before the measured ones (excluded). The bench sends at least one per
    instance behind a round-robin proxy (two-single: 2), so each has served one through the arm's
    path before measurement."""


@dataclass
class InterferenceSpec:
    """N steady decode streams while big prompts arrive at a fixed rate."""

    streams: int = 4
    duration_s: float = 30.0
    rate: float = 0.5
    """Big prompts per second, at fixed intervals."""
    prompt_len: int = BIG_PROMPT_LEN
    big_max_tokens: int = 16
    stream_prompt_len: int = 64
    stream_max_tokens: int = 1024
    """A stream that finishes is restarted at once; its new TTFT is not counted as a gap."""
    warmup_s: float = 2.0
    """After every stream has its first token: this long before the window opens."""


@dataclass
class FillSpec:
    """Long streams started one after another and each held to its end (ignore_eos), so that their
    KV, which grows as they decode, fills a decode instance's pool: the routing arms' load
    (pair-headroom, pair-least-loaded, pair-round-robin). The defaults fit the 1p2d-small profile
    (launch/1p2d-small.toml): its first D holds 127 usable blocks of 128 tokens, each stream ends
    at 2,000 tokens = 16 blocks, 20 streams = 320 blocks: more than half of them do not fit that D,
    all of them fit the two. A router blind to the pools sends about half to the small D, which then
    preempts (vllm:num_preemptions) or fails them; one that counts blocks sends it 7."""

    requests: int = 20
    prompt_len: int = 1000
    max_tokens: int = 1000
    interval_s: float = 0.25
    """Between two starts: the proxy's promises count a request the moment it is sent to D, so
    this only spreads the prefills."""


def follow_prompt(seed: int, i: int, warmup: int, length: int, salt: str = "") -> str:
    """The i-th follow request's prompt (warm-ups first). Measured request j gets index j + 1 (index
    0 is the first warm-up's), whatever the number of warm-ups: every arm gets the same measured
    prompts, also the two-single arm, which warms up once per instance; further warm-ups get
    prompts of their own."""
    if i < warmup:
        return (make_prompt(seed, "follow", 0, length, salt) if i == 0
                else make_prompt(seed, "follow-warmup", i, length, salt))
    return make_prompt(seed, "follow", i - warmup + 1, length, salt)


async def run_follow(t: LoadTarget, spec: FollowSpec, seed: int) -> None:
    """One request at a time: each big prompt's TTFT (and toll split) and its ITL, alone."""
    total = spec.warmup + spec.requests
    for i in range(total):
        warm = i < spec.warmup
        index = f"w{i}" if warm else i - spec.warmup
        prompt = follow_prompt(seed, i, spec.warmup, spec.prompt_len, t.salt)
        s = t.new_sample("follow", index, spec.prompt_len, spec.max_tokens, warmup=warm)
        if i == spec.warmup:
            t.windows["follow"] = [t.clock(), t.clock()]
        await t.send(s, prompt)
        if not warm:
            t.windows["follow"][1] = t.clock()
        t.on_progress("follow", i + 1, total)


async def run_interference(t: LoadTarget, spec: InterferenceSpec, seed: int) -> None:
    """N steady decode streams; big prompts arrive every 1/rate s during the window; the window
    closes at duration_s or when the last big prompt is done, whichever is later."""
    stop = asyncio.Event()
    first_token = [asyncio.Event() for _ in range(spec.streams)]

    async def stream_loop(k: int) -> None:
        n = 0
        while not stop.is_set():
            prompt = make_prompt(seed, f"stream{k}", n, spec.stream_prompt_len, t.salt)
            s = t.new_sample("stream", f"{k}.{n}", spec.stream_prompt_len, spec.stream_max_tokens)
            await t.send(s, prompt)
            if s.ttft_ms is not None:
                first_token[k].set()
            if s.error is not None:
                await asyncio.sleep(0.5)
            n += 1

    async def watch_first(k: int) -> None:
        # set as soon as a chunk arrives, not when the (long) request ends
        while not first_token[k].is_set():
            if any(s.chunk_t for s in t.samples if s.request_id.startswith(f"bench-{t.arm}-stream-{k}.")):
                first_token[k].set()
                return
            await asyncio.sleep(0.05)

    streams = [asyncio.create_task(stream_loop(k), name=f"stream-{k}") for k in range(spec.streams)]
    bigs: list[asyncio.Task[Sample]] = []
    try:
        await asyncio.wait_for(asyncio.gather(*(watch_first(k) for k in range(spec.streams))), 600)
        await asyncio.sleep(spec.warmup_s)
        t0 = t.clock()
        t.windows["interference"] = [t0, t0]
        n_big = max(1, int(spec.duration_s * spec.rate)) if spec.rate > 0 else 0
        for i in range(n_big):
            due = t0 + i / spec.rate
            await asyncio.sleep(max(0.0, due - t.clock()))
            s = t.new_sample("big", i, spec.prompt_len, spec.big_max_tokens)
            bigs.append(asyncio.create_task(t.send(s, make_prompt(seed, "big", i, spec.prompt_len, t.salt))))
            t.on_progress("interference", t.clock() - t0, spec.duration_s)
        while t.clock() < t0 + spec.duration_s:
            await asyncio.sleep(min(0.5, t0 + spec.duration_s - t.clock()))
            t.on_progress("interference", min(t.clock() - t0, spec.duration_s), spec.duration_s)
        if bigs:
            await asyncio.wait(bigs, timeout=300)
        t.windows["interference"][1] = t.clock()
    finally:
        t.windows.setdefault("interference", [t.clock(), t.clock()])
        if t.windows["interference"][1] <= t.windows["interference"][0]:
            t.windows["interference"][1] = t.clock()
        stop.set()
        for task in streams + bigs:
            task.cancel()
        for task in streams + bigs:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def run_fill(t: LoadTarget, spec: FillSpec, seed: int) -> None:
    """``spec.requests`` long streams, one started every ``interval_s``, all held to their end: the
    KV of a pool fills (FillSpec). Every one counts: a failure, an error event or a cut is the
    sample's error (report.routing_summary counts them per arm, with D's preemptions)."""
    t.windows["fill"] = [t.clock(), t.clock()]
    tasks: list[asyncio.Task[Sample]] = []
    done = 0

    def finished(_: asyncio.Task[Sample]) -> None:
        nonlocal done
        done += 1
        t.on_progress("fill", done, spec.requests)

    try:
        for i in range(spec.requests):
            if i:
                await asyncio.sleep(spec.interval_s)
            s = t.new_sample("fill", i, spec.prompt_len, spec.max_tokens)
            task = asyncio.create_task(t.send(s, make_prompt(seed, "fill", i, spec.prompt_len, t.salt)))
            task.add_done_callback(finished)
            tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        t.windows["fill"][1] = t.clock()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


WORKLOADS: dict[str, tuple[type, Callable[[LoadTarget, Any, int], Awaitable[None]]]] = {
    "follow": (FollowSpec, run_follow),
    "interference": (InterferenceSpec, run_interference),
    "fill": (FillSpec, run_fill),
}
"""Workload name -> (its spec, its runner), in the order `pdtui bench` runs them."""
DEFAULT_WORKLOADS = ("follow", "interference")
"""What `pdtui bench` runs without --workloads (fill: the routing arms' load, asked for by name)."""


# ----- the load generator as its own process ------------------------------------------------------
# `python -m pdtui.bench.workload SPEC.json` runs the workloads of one arm and writes JSON lines to
# stdout: {"progress": [what, done, total]} as it goes, then {"result": {"samples": [...],
# "windows": {...}}}, also after SIGTERM/SIGINT (with what was measured). The bench runs the client
# in a process of its own so that its timing never shares an event loop (or a GIL) with the
# embedded proxy of the arm it measures: both arms are measured by the same, separate client.


async def run_spec(spec: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    samples: list[Sample] = []
    windows: dict[str, list[float]] = {}
    clock = Clock()
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: main.cancel() if main else None)
    cancelled = False
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0),
                                     limits=httpx.Limits(max_connections=256, max_keepalive_connections=64)) as client:
            target = LoadTarget(spec["arm"], spec["base_url"], spec["model"], client, clock, samples, windows,
                                on_progress=lambda what, d, t: emit({"progress": [what, d, t]}),
                                salt=spec.get("salt") or "")
            for wl in spec["workloads"]:
                emit({"phase": f"{wl}: running"})
                spec_cls, run = WORKLOADS[wl]
                await run(target, spec_cls(**spec[wl]), spec["seed"])
    except asyncio.CancelledError:
        cancelled = True
    import dataclasses

    return {"samples": [dataclasses.asdict(s) for s in samples], "windows": windows, "cancelled": cancelled}


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    result = asyncio.run(run_spec(spec, emit))
    emit({"result": result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
