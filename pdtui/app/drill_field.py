"""The drills from the field (issue 27, docs/drills.md): the failures P/D users report upstream, each
run on the live pair with what should be seen beside what was (``Check`` rows), and every request
ended within a bound the drill states.

``pdtui drill --scenario NAME`` runs one (over a pair pdtui launches, or engines given by URL):

- ``stranded``  (llm-d #1138) KV stranded on P: P answers, D is never sent the request. First as a
                router without the defence does it (P's leg sent by hand, no D leg): P's blocks stay
                until its KV lease ends (vLLM 0.32: 30 s); then through pdtui's proxy, the client
                leaving while D's dispatch is held (the drill's fault): the proxy releases P's
                blocks through D at once (``RequestTraced.kv_release``).
- ``fail-open`` (vLLM #52234) D given stale, shifted, out-of-range or foreign kv_transfer_params
                (the proxy's drill faults, ``X-Pdtui-Drill: tamper=...``): what D answers, and the
                correctness witness (pdtui.core.known_answer: a greedy request whose answer P gave
                alone, compared token for token) red whenever the tokens differ, whatever the status.
- ``context``   (InferenceX #2293) context-length asymmetry: a prompt the shorter side refuses, sent
                through the pair: one clear HTTP error within the bound, never a hang.
- ``restart-order`` (vLLM #49238) D killed and restarted while P stays up, then requests through the
                pair: each ends within the bound and pairs.
- ``handshake`` (the lab's first failure mode) P and D whose KV-shaped settings differ (a launched
                pair: D's --dtype changed past the config's refusal, on purpose): the warm-up is
                called broken with its reason, every request ends within the bound, D's log says why.

Each step waits, bounded, then saves an SVG with ``--shots``. The drill reads P's and D's /metrics
itself (the blocks P holds need a finer clock than the dashboard's scrape) and sends its requests
as a client would, through the proxy; the ``stranded`` drill's "before" leg goes to P directly,
as a router that has no defence does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from pdtui.app.drill import DrillFailed, DrillResult, Steps, all_ready, raise_unheld
from pdtui.core import connectors, known_answer
from pdtui.core.events import RequestTraced
from pdtui.core.proxy import PREFILL_KV_PARAMS, drillhooks
from pdtui.core.scrape import parse_metrics

SCENARIOS = ("stranded", "fail-open", "context", "restart-order", "handshake")
USAGE = "vllm:kv_cache_usage_perc"
EXPIRED = connectors.NIXL.counters["expired"]
AFTER_EXPIRY = connectors.NIXL.stale_read_metric or ""
FAILED = connectors.NIXL.counters["failed_transfers"]
LEASE_S = 30.0
"""vLLM 0.32's default ``kv_lease_duration`` (the connector's extra config; nixl/base_scheduler.py)."""
REQUEST_BOUND_S = 60.0
"""The most any request of these drills may take: past it, the drill says it hung."""


class FieldDrill(Steps):
    """What every field scenario shares: the drill's steps (pdtui.app.drill.Steps), a client, the
    engines' /metrics, prompts of this run."""

    def __init__(self, pilot: Any, shots: Path | None, prefix: str, log: Callable[[str], None]) -> None:
        super().__init__(pilot, shots=shots, prefix=prefix, log=log)
        self.nonce = f"{time.time_ns():x}"[-8:]
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_BOUND_S, connect=5.0))

    async def ready(self) -> tuple[str, str]:
        await self.until("every instance ready and the warm-up done", all_ready, 600, starting=True)
        p, d = self.app.instance_for("prefill"), self.app.instance_for("decode")
        if p is None or d is None:
            raise DrillFailed("this drill needs a prefill and a decode instance")
        await self.done("ready", f"pair ready in {self.snap().header.ready_s:.1f} s; P {p}, D {d}")
        return p, d

    def url(self, name: str) -> str:
        return str(self.app.runtime.instances[name].url)

    @property
    def proxy(self) -> str:
        return str(self.app.runtime.run.proxy_url)

    @property
    def model(self) -> str:
        return str(self.app.runtime.run.model_name)

    async def metrics(self, name: str) -> dict[str, float]:
        r = await self.client.get(f"{self.url(name)}/metrics", timeout=10)
        return parse_metrics(r.text)

    async def blocks_held(self, name: str) -> float:
        """The instance's KV blocks in use, from its /metrics (usage x pool)."""
        m = await self.metrics(name)
        return m.get(USAGE, 0.0) * m.get("cache_config:num_gpu_blocks", 0.0)

    async def traced(self, request_id: str, timeout: float = 15) -> RequestTraced:
        await self.until(f"the proxy's trace of {request_id}", lambda s: s.request(request_id) is not None, timeout)
        row = self.snap().request(request_id)
        assert row is not None
        return row

    def prompt_ids(self, n: int, salt: int) -> list[int]:
        """A prompt of exactly ``n`` token ids, of this run and ``salt`` alone (no prefix-cache hit
        across drills or runs); ids in the tiny model's vocabulary and any real one's."""
        seed = int(self.nonce, 16) ^ (salt * 2654435761)
        return [3 + (seed + i * 7919) % 251 for i in range(n)]

    async def aclose(self) -> None:
        await self.client.aclose()


async def _timed(coro: Awaitable[Any], bound: float) -> tuple[Any, float, str | None]:
    """``coro``'s result, its seconds, and None; or None, the seconds, and why it did not end."""
    t = time.monotonic()
    try:
        return await asyncio.wait_for(coro, bound), time.monotonic() - t, None
    except TimeoutError:
        return None, time.monotonic() - t, f"no answer within {bound:.0f} s"
    except httpx.HTTPError as e:
        return None, time.monotonic() - t, f"{type(e).__name__}: {e}"


def _secs(x: float | None, fmt: str, otherwise: str) -> str:
    return otherwise if x is None else f"after {x:{fmt}} s"


async def _wait_blocks(fd: FieldDrill, name: str, at_most: float, bound: float) -> float | None:
    """Seconds until ``name`` holds ``at_most`` blocks or fewer (polled every 0.25 s); None past ``bound``."""
    t = time.monotonic()
    while time.monotonic() - t < bound:
        if await fd.blocks_held(name) <= at_most + 0.5:
            return time.monotonic() - t
        await fd.pilot.pause(0.25)
    return None


# ----- stranded ---------------------------------------------------------------------------------

async def stranded(fd: FieldDrill, *, prompt_tokens: int = 700, lease_s: float = LEASE_S) -> None:
    p, _ = await fd.ready()
    block_size = fd.snap().header.block_size or 16
    blocks = -(-prompt_tokens // block_size)
    base = await fd.blocks_held(p)

    # after: through pdtui's proxy, the client leaves while D's dispatch is held
    rid = f"drill-stranded-{fd.nonce}-proxy"
    body = {"model": fd.model, "prompt": fd.prompt_ids(prompt_tokens, 1), "max_tokens": 8}
    hold = 5.0
    t_left = time.monotonic()
    with contextlib.suppress(httpx.TimeoutException):  # the client leaves: its own timeout
        await fd.client.post(f"{fd.proxy}/v1/completions", json=body, timeout=httpx.Timeout(2.0, connect=5.0),
                             headers={"X-Request-Id": rid, drillhooks.HEADER: f"hold_decode_s={hold:g}"})
    t_left = time.monotonic() - t_left
    row = await fd.traced(rid)
    freed = await _wait_blocks(fd, p, base, 10)
    rel = row.kv_release or {}
    await fd.done("proxy", f"the client left after {t_left:.1f} s (D's dispatch held {hold:g} s); trace {row.status},"
                  f" kv_release {rel.get('result')} via {rel.get('via')} ({rel.get('status')}, {rel.get('ms')} ms);"
                  f" {p} back to {base:.0f} blocks {_secs(freed, '.2f', 'not within 10 s')}")
    fd.check("pdtui's proxy: the D leg never sent (the client left), P's blocks released through D",
             f"status {row.status}, D leg {'sent' if row.decode else 'not sent'}, kv_release {rel.get('result')}"
             f" via {rel.get('via')}", row.status == 499 and rel.get("result") == "released")
    fd.check(f"... and {p} holds none of them 3 s after the trace",
             f"back to {base:.0f} blocks after {freed:.2f} s" if freed is not None else "still held 10 s after",
             freed is not None and freed <= 3.0)

    # before: a router without the defence; P's leg by hand, and no D leg ever
    m0 = await fd.metrics(p)
    r = await fd.client.post(f"{fd.url(p)}/v1/completions", headers={"X-Request-Id": f"drill-stranded-{fd.nonce}-bare"},
                             json={"model": fd.model, "prompt": fd.prompt_ids(prompt_tokens, 2), "max_tokens": 1,
                                   "stream": False, "kv_transfer_params": dict(PREFILL_KV_PARAMS)})
    t_answer = time.monotonic()
    if r.status_code != 200 or "kv_transfer_params" not in r.json():
        raise DrillFailed(f"{p} did not pair a request by hand: {r.status_code} {r.text[:200]}")
    held = await fd.blocks_held(p) - base
    freed = await _wait_blocks(fd, p, base, lease_s * 2 + 10)
    m1 = await fd.metrics(p)
    expired = m1.get(EXPIRED, 0.0) - m0.get(EXPIRED, 0.0)
    await fd.done("bare", f"{p} answered, no D leg: {held:.0f} blocks held, freed"
                  f" {_secs(freed, '.1f', f'not within {lease_s * 2 + 10:.0f} s')};"
                  f" {EXPIRED} +{expired:.0f}")
    fd.check(f"a router without the defence: {p} holds the {blocks} blocks until its KV lease ends (~{lease_s:.0f} s)",
             f"{held:.0f} blocks held for {freed:.1f} s, {EXPIRED} +{expired:.0f}" if freed is not None
             else f"{held:.0f} blocks still held after {time.monotonic() - t_answer:.0f} s",
             freed is not None and abs(held - blocks) < 0.5 and lease_s * 0.8 <= freed <= lease_s * 1.5 and expired >= 1)


# ----- fail-open --------------------------------------------------------------------------------

async def fail_open(fd: FieldDrill, *, prompt_tokens: int = 300, tokens: int = 16) -> None:
    p, d = await fd.ready()
    base = await fd.blocks_held(p)

    async def case(name: str, salt: int, tamper: str | None, expect_same: bool) -> known_answer.Verdict:
        prompt = fd.prompt_ids(prompt_tokens, salt)
        try:
            ref = await known_answer.reference(fd.client, fd.url(p), fd.model, prompt, tokens)
        except (httpx.HTTPError, ValueError) as e:
            raise DrillFailed(f"{p} gave no known answer to compare with ({type(e).__name__}: {e})") from None
        if ref.flat:
            fd.check("the model's answers depend on the prompt (else a wrong KV cannot show in them)",
                     f"every token's logprob is {ref.logprobs[0]:.4f}: dummy weights", False)
            raise DrillFailed(f"{p} answers with every token at logprob {ref.logprobs[0]:.4f} whatever the prompt"
                              " (vLLM's dummy weights): a wrong KV cannot change such answers, so the witness is"
                              " blind. Run this drill on a model with weights: `pdtui model synth --shape tiny"
                              " --weights --out DIR`, then --model DIR (engines by URL: serve DIR)")
        m0 = {n: await fd.metrics(n) for n in (p, d)}
        rid = f"drill-failopen-{fd.nonce}-{name}"
        headers = {drillhooks.HEADER: f"tamper={tamper}"} if tamper else {}
        verdict, secs, why = await _timed(known_answer.check(fd.client, fd.proxy, fd.model, prompt, ref,
                                                              request_id=rid, headers=headers), REQUEST_BOUND_S)
        if verdict is None:
            verdict = known_answer.Verdict(rid, None, False, f"the request did not end: {why}", [], ref.tokens)
        fd.app.runtime.emit(verdict.event())
        await fd.pilot.pause(1.0)  # D's and P's counters move a moment after the answer
        m1 = {n: await fd.metrics(n) for n in (p, d)}
        failed = m1[d].get(FAILED, 0.0) - m0[d].get(FAILED, 0.0)
        after = m1[p].get(AFTER_EXPIRY, 0.0) - m0[p].get(AFTER_EXPIRY, 0.0)
        await fd.done(name, f"{verdict.status} in {secs:.2f} s: {verdict.detail}; {d} {FAILED} +{failed:.0f},"
                      f" {p} {AFTER_EXPIRY} +{after:.0f}")
        counters = f"{FAILED} +{failed:.0f}, {AFTER_EXPIRY} +{after:.0f}"
        if expect_same:
            fd.check(f"{name}: the pair's answer equals the known one, token for token",
                     f"{verdict.status}: {verdict.detail}", verdict.ok)
        else:
            # D may answer 200 (the fail-open) or an error; either way the witness must not pass it
            fd.check(f"{name}: the witness is red (tokens differ or no answer), whatever the status",
                     f"{verdict.status}: {verdict.detail}; {counters}", not verdict.ok)
        return verdict

    await case("clean", 10, None, True)
    for i, kind in enumerate(drillhooks.TAMPERS):
        await case(kind, 20 + i, kind, False)
        if not all(v.state == "ready" for v in fd.snap().instances):
            bad = [f"{v.name} {v.state}" for v in fd.snap().instances if v.state != "ready"]
            fd.check(f"{kind}: both engines still up after it", ", ".join(bad), False)
            return
    await case("clean-after", 30, None, True)
    freed = await _wait_blocks(fd, p, base, 10)
    fd.check(f"{p} holds no block of the tampered requests (their own released)",
             f"back to {base:.0f} blocks" if freed is not None else f"{await fd.blocks_held(p) - base:.0f} blocks still held",
             freed is not None)


# ----- context ----------------------------------------------------------------------------------

async def _max_model_len(fd: FieldDrill, name: str) -> int | None:
    with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError, TypeError):
        r = await fd.client.get(f"{fd.url(name)}/v1/models", timeout=10)
        return int(r.json()["data"][0]["max_model_len"])
    return None


async def context(fd: FieldDrill, *, bound_s: float = REQUEST_BOUND_S) -> None:
    await fd.ready()
    ps = [v.name for v in fd.snap().instances if v.role == "prefill"]
    ds = [v.name for v in fd.snap().instances if v.role == "decode"]
    lens = {n: await _max_model_len(fd, n) for n in ps + ds}
    await fd.done("lengths", ", ".join(f"{n} max_model_len {v}" for n, v in lens.items()))
    p_len = min((v for n, v in lens.items() if n in ps and v), default=None)
    d_len = min((v for n, v in lens.items() if n in ds and v), default=None)
    if p_len is None or d_len is None:
        raise DrillFailed(f"the engines' max_model_len could not be read from /v1/models: {lens}")
    if p_len == d_len:
        raise DrillFailed(f"P and D both take {p_len} tokens: nothing to drill (launched: `pdtui drill --scenario"
                          " context` gives D a quarter; by URL: engines with different --max-model-len)")
    short, long_ = min(p_len, d_len), max(p_len, d_len)
    who = "D" if d_len < p_len else "P"
    base = {n: await fd.blocks_held(n) for n in ps}
    cases = [("over", short + (long_ - short) // 2, 8, False), ("over-stream", short + (long_ - short) // 2, 8, True),
             ("edge", short, 4, False), ("fits", short - 64, 8, True)]
    for i, (name, n, max_tokens, stream) in enumerate(cases):
        rid = f"drill-context-{fd.nonce}-{name}"
        body = {"model": fd.model, "prompt": fd.prompt_ids(n, 40 + i), "max_tokens": max_tokens, "stream": stream}
        got, secs, why = await _timed(fd.client.post(f"{fd.proxy}/v1/completions", json=body,
                                                      headers={"X-Request-Id": rid}), bound_s)
        status = got.status_code if got is not None else None
        text = (got.text[:160].replace("\n", " ") if got is not None else why) or ""
        row = await fd.traced(rid) if got is not None else None
        await fd.done(name, f"prompt {n} + max_tokens {max_tokens} ({'stream' if stream else 'whole'}): {status} in"
                      f" {secs:.2f} s, traced {row.outcome if row else '-'} {row.status if row else ''}: {text}")
        fits = n + 1 <= short  # P's leg needs one token of room, D's at least one
        if fits:
            fd.check(f"{name}: a prompt both sides take ({n}) is served within {bound_s:.0f} s",
                     f"{status} in {secs:.2f} s", status == 200)
        else:
            fd.check(f"{name}: a prompt {who} ({short}) refuses but the other ({long_}) takes: one clear HTTP error"
                     f" (4xx, JSON) within {bound_s:.0f} s, never a hang",
                     f"{status} in {secs:.2f} s: {text[:90]}",
                     status is not None and 400 <= status < 500 and got is not None and "error" in got.text)
    freed = {n: await _wait_blocks(fd, n, base[n], 10) for n in ps}
    fd.check("no P holds blocks for a request D refused (vLLM's rejection path frees them)",
             ", ".join(f"{n} {f'back to {base[n]:.0f}' if v is not None else 'still holds more'}" for n, v in freed.items()),
             all(v is not None for v in freed.values()))


# ----- restart in the wrong order -----------------------------------------------------------------

async def _pair_requests(fd: FieldDrill, name: str, n: int, bound_s: float, salt: int) -> list[tuple[Any, float, str]]:
    """``n`` small requests through the pair, one after another: (trace or None, seconds, words)."""
    out = []
    for i in range(n):
        rid = f"drill-{name}-{fd.nonce}-{i}"
        body = {"model": fd.model, "prompt": fd.prompt_ids(200, salt + i), "max_tokens": 8}
        got, secs, why = await _timed(fd.client.post(f"{fd.proxy}/v1/completions", json=body,
                                                      headers={"X-Request-Id": rid}), bound_s)
        row = await fd.traced(rid) if got is not None else None
        words = why or f"{got.status_code} {row.outcome if row else '-'}"
        if row is not None and row.error:
            words += f": {row.error[:90]}"
        out.append((row, secs, words))
    return out


async def restart_order(fd: FieldDrill, *, bound_s: float = REQUEST_BOUND_S) -> None:
    """vLLM #49238: D restarted while P stays up ("UCX ... Endpoint timeout", the request hung)."""
    p, d = await fd.ready()
    before = await _pair_requests(fd, "restart-before", 2, bound_s, 50)
    await fd.done("before", "; ".join(f"{w} in {s:.2f} s" for _, s, w in before))
    control = fd.app.control
    await control.kill(d, source="drill")
    await fd.until(f"{d} down", lambda s: (v := s.instance(d)) is not None and v.state != "ready", 60)
    t = time.monotonic()
    await control.restart(d, source="drill")
    await fd.until(f"{d} ready again", lambda s: (v := s.instance(d)) is not None and v.state == "ready", 600)
    await fd.done("restart-d", f"{d} killed and restarted while {p} stayed up ({time.monotonic() - t:.1f} s)")
    after = await _pair_requests(fd, "restart-after", 3, bound_s, 60)
    await fd.done("after", "; ".join(f"{w} in {s:.2f} s" for _, s, w in after))
    fd.check(f"every request after {d}'s restart (P up throughout) ends within {bound_s:.0f} s",
             ", ".join(f"{s:.2f} s" for _, s, _ in after), all(r is not None and s < bound_s for r, s, _ in after))
    fd.check(f"... and pairs: {d}'s first pull handshakes with {p} again (the report: UCX endpoint timeout,"
             " the request hung)", "; ".join(w for _, _, w in after),
             all(r is not None and r.outcome == "pair" for r, _, _ in after))


# ----- the handshake that never completes ---------------------------------------------------------------

async def handshake(fd: FieldDrill, *, bound_s: float = REQUEST_BOUND_S) -> None:
    """P and D whose KV-shaped settings differ (a launched pair: D's --dtype changed past the
    config's refusal, on purpose): what the warm-up and a request do."""
    await fd.until("the pair up and its warm-up over (ready or broken)",
                   lambda s: bool(s.instances) and all(i.state == "ready" for i in s.instances)
                   and (s.header.ready_s is not None or s.header.broken is not None), 900)
    broken = fd.snap().header.broken
    p, d = fd.app.instance_for("prefill"), fd.app.instance_for("decode")
    if p is None or d is None:
        raise DrillFailed("this drill needs a prefill and a decode instance")
    await fd.done("warm-up", f"pair {'BROKEN: ' + broken if broken else 'ready (the handshake completed)'}")
    fd.check("the warm-up does not call the pair ready: pdtui says it is broken, and why",
             broken or "called ready", broken is not None)
    rows = await _pair_requests(fd, "handshake", 2, bound_s, 70)
    await fd.done("requests", "; ".join(f"{w} in {s:.2f} s" for _, s, w in rows))
    fd.check(f"each request ends with one outcome within {bound_s:.0f} s, never a hang",
             "; ".join(f"{w} in {s:.2f} s" for _, s, w in rows), all(r is not None for r, _, _ in rows))
    dv = fd.snap().instance(d)
    said = dict(dv.milestones) if dv is not None else {}
    words = said.get("compat_failed") or said.get("transfer_failure") or "nothing"
    fd.check(f"{d}'s log says why (NIXL's compatibility check or a failed handshake)", words[:160],
             "compat_failed" in said or "transfer_failure" in said)


RUNNERS: dict[str, Callable[..., Awaitable[None]]] = {
    "stranded": stranded, "fail-open": fail_open, "context": context, "restart-order": restart_order,
    "handshake": handshake}


async def run(pilot: Any, scenario: str, *, shots: Path | None = None, prefix: str = "",
              log: Callable[[str], None] = lambda s: None, **options: Any) -> DrillResult:
    """Drive the field scenario ``scenario`` on ``pilot.app`` (a PdtuiApp over a live Runtime). Never
    raises for a failed step: the result says which step failed and carries the checks."""
    fd = FieldDrill(pilot, shots, prefix, log)
    try:
        await RUNNERS[scenario](fd, **options)
        raise_unheld(fd.res.checks)
    except DrillFailed as e:
        fd.fail(e)
    finally:
        await fd.aclose()
    return fd.res
