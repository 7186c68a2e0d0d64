"""The headroom drill (``pdtui drill --scenario headroom``): fill one D's KV pool nearly full, then
send more, and check from the proxy's traces where the new requests went.

Run it on a pair with several D and the headroom choice (``--profile 1p2d-small``: its first D
holds 127 blocks, the other 2,047, and it sets ``decode_choice = "headroom"``). Steps (each waits,
bounded, then saves an SVG with ``--shots``):

1. ``ready``  every instance ready and the warm-up done; two D or more;
2. ``room``   every D's headroom known (the proxy's HeadroomReported: a scrape reached it); the
              target is the D with the fewest blocks;
3. ``fill``   long streams through the proxy (``prompt_tokens`` + ``max_tokens``, ignore_eos), one
              every ``interval_s`` (0.2), until the target's room, as the proxy counts it, is less
              than one stream's need (the proxy promises a request's blocks the moment it sends
              it, so the streams sent before spread over the D's by load, the target taking its
              share). How many that takes depends on how fast the target's streams end: 6 to 62
              in five runs on 2 cores (results/2026-12-07-headroom/README.md); at 0.5 s it once
              took 50 streams and 132 s (CI at 6c985ac);
4. ``probe``  ``probes`` more streams of the same shape, sent once the target is full;
5. ``verdict`` every stream ended, the checks, expected beside observed (``checks``): every
              stream answered in full (pair), every probe on another D than the target (or on
              it only where the proxy counted room there again: streams there end while the
              probes go out; the probe's reason gives the figures), the target preempted nothing
              (its ``vllm:num_preemptions``), the probes' reasons say headroom.

Under round-robin or least-loaded (``--decode-choice``) the probes go to the full D too, and it
preempts or fails them: the drill then fails, saying so (what the choice by headroom buys).

Nothing here talks to an engine: the streams go through the proxy, as a client's would, and what
is checked is what the dashboard shows (its snapshot: traces, headroom, metrics).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pdtui.app import loadgen
from pdtui.app.drill import Check, DrillFailed, DrillResult, Steps, all_ready, raise_unheld
from pdtui.app.state import Snapshot
from pdtui.core import sse_client
from pdtui.core.events import HeadroomReported, RequestTraced
from pdtui.core.kvmath import blocks_for_tokens

PREEMPTIONS = "vllm:num_preemptions"


@dataclass
class Stream:
    """One long stream of the drill, as its client saw it."""

    request_id: str
    phase: str
    """fill | probe"""
    rec: sse_client.SseStream = field(default_factory=sse_client.SseStream)
    task: asyncio.Task[Any] | None = None


def room_at_dispatch(t: RequestTraced) -> int | None:
    """The room, in blocks, the proxy counted on the D it chose for ``t`` (its reason under the
    headroom choice: "headroom: D1 49-20=29 >= 16 needed, ..."); None when the reason gives none
    (another choice, or the room was not known)."""
    m = re.match(rf"headroom: {re.escape(t.decode or '')} -?\d+--?\d+=(-?\d+) >= ", t.decode_reason or "")
    return int(m.group(1)) if m else None


def checks(target: str, streams: list[Stream], traces: dict[str, RequestTraced],
           preempted: int | None, need: int = 0) -> list[Check]:
    """The verdict, from the proxy's traces of the drill's streams (``traces``: by request id) and
    the target's preemptions over the drill (None: its metrics did not say). ``need``: one
    stream's blocks."""
    out: list[Check] = []
    missing = [s.request_id for s in streams if s.request_id not in traces]
    done = [traces[s.request_id] for s in streams if s.request_id in traces]
    bad = [t for t in done if t.outcome != "pair"]
    words = f"{len(done) - len(bad)} of {len(streams)} paired"
    if bad:
        words += "; " + ", ".join(f"{t.request_id} {t.outcome} {t.status}: {(t.error or t.fallback_reason or '')[:80]}"
                                  for t in bad[:3])
    if missing:
        words += f"; no trace of {len(missing)}: {', '.join(missing[:3])}"
    out.append(Check("every stream answered in full (outcome pair, no error)", words, not bad and not missing))
    probes = [traces[s.request_id] for s in streams if s.phase == "probe" and s.request_id in traces]
    where: dict[str, int] = {}
    for t in probes:
        where[t.decode or "-"] = where.get(t.decode or "-", 0) + 1
    n_probes = sum(1 for s in streams if s.phase == "probe")
    # a probe may still land on the target if a stream there ended and the proxy counted room for
    # it again by the time P answered: its reason says so, with the figures; any other probe there
    # went without room (round-robin, least-loaded: they do not look)
    on_target = [t for t in probes if t.decode == target]
    roomless = [t for t in on_target if (r := room_at_dispatch(t)) is None or r < need]
    words = ", ".join(f"{d} {n}" for d, n in sorted(where.items())) or "none traced"
    if on_target:
        words += "; on " + target + ": " + "; ".join(
            f"without room ({(t.decode_reason or 'no reason')[:60]})" if t in roomless
            else f"room again ({room_at_dispatch(t)} >= {need})" for t in on_target)
    out.append(Check(f"the {n_probes} streams sent once {target} was full go elsewhere, or to it only with room"
                     " counted again", words, bool(probes) and len(probes) == n_probes and not roomless))
    fills: dict[str, int] = {}
    for s in streams:
        fill = traces.get(s.request_id)
        if s.phase == "fill" and fill is not None:
            fills[fill.decode or "-"] = fills.get(fill.decode or "-", 0) + 1
    out.append(Check(f"{target} took its share of the fill, up to its room",
                     ", ".join(f"{d} {n}" for d, n in sorted(fills.items())) or "none traced", target in fills))
    out.append(Check(f"{target} preempts nothing (vllm:num_preemptions)",
                     "not reported" if preempted is None else f"+{preempted}", preempted == 0))
    reason = next((t.decode_reason for t in probes if t.decode_reason), None)
    out.append(Check("a probe's reason names the choice by headroom", reason or "no reason",
                     bool(reason and reason.startswith("headroom"))))
    return out


def need_blocks(prompt_tokens: int, max_tokens: int, block_size: int) -> int:
    """One stream's blocks at its end, as the proxy's headroom counts them (routing.Demand)."""
    return blocks_for_tokens(prompt_tokens + max_tokens, block_size)


async def _send(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, s: Stream) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    await sse_client.stream(client, f"{url}/v1/completions", body, s.rec, headers={"X-Request-Id": s.request_id},
                            stop_at_done=True)


async def run(pilot: Any, *, shots: Path | None = None, prefix: str = "", ready_timeout_s: float = 300.0,
              step_timeout_s: float = 300.0, prompt_tokens: int = 1000, max_tokens: int = 1000,
              interval_s: float = 0.2, probes: int = 4, max_fill: int = 64,
              log: Callable[[str], None] = lambda s: None) -> DrillResult:
    """Drive the headroom drill on ``pilot.app`` (a PdtuiApp over a live Runtime). Never raises for
    a failed step: the result says which failed and why, and carries the checks (expected, observed)."""
    st = Steps(pilot, shots=shots, prefix=prefix, log=log)
    app, res = st.app, st.res
    snap, until, done = st.snap, st.until, st.done
    streams: list[Stream] = []
    nonce = f"{time.time_ns():x}"[-8:]

    def report(s: Snapshot, name: str) -> HeadroomReported | None:
        v = s.instance(name)
        return None if v is None else v.headroom

    def room(s: Snapshot, name: str) -> int | None:
        h = report(s, name)
        return None if h is None else h.headroom

    # a long connect timeout: on 2 cores this process, reading 30 streams beside the dashboard, can
    # stall for seconds (a drill run: one stream's connect timed out at 5 s; the proxy was fine)
    client = httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=30.0))
    try:
        await until("every instance ready and the warm-up done", all_ready, ready_timeout_s, starting=True)
        decodes = [i.name for i in snap().instances if i.role == "decode"]
        if len(decodes) < 2:
            raise DrillFailed(f"the headroom drill needs two decode instances or more, this pair has {decodes}"
                              " (--profile 1p2d-small)")
        await done("ready", f"ready in {snap().header.ready_s:.1f} s; decode instances {', '.join(decodes)}")

        await until("every D's headroom from the proxy", lambda s: all(room(s, d) is not None for d in decodes),
                    30)
        totals = {d: h.total_blocks for d in decodes if (h := report(snap(), d)) is not None}
        target = min(totals, key=lambda d: totals[d])
        block_size = snap().header.block_size or 16
        need = need_blocks(prompt_tokens, max_tokens, block_size)
        tv = snap().instance(target)
        pre_before = tv.metrics.get(PREEMPTIONS) if tv is not None else None
        await done("room", "; ".join(f"{d} room {room(snap(), d)} of {totals[d]:,} blocks" for d in totals)
                   + f"; target {target}; a stream needs {need} blocks")

        run = app.runtime.run
        found = await asyncio.to_thread(loadgen.local_sizer, run.model or run.model_name)
        if found is None:
            raise DrillFailed(f"no tokenizer for {run.model or run.model_name} here: the drill sizes its prompts"
                              " by it (a stream's need in blocks)")
        sizer: loadgen.LocalSizer = found

        async def start(phase: str, i: int) -> None:
            prompt, _ = await sizer.prompt(prompt_tokens, hash((nonce, phase, i)) & 0xFFFFFFF)
            s = Stream(f"drill-headroom-{nonce}-{phase}-{i}", phase)
            s.task = asyncio.create_task(_send(client, run.proxy_url, run.model_name, prompt, max_tokens, s))
            streams.append(s)

        for i in range(max_fill):
            r = room(snap(), target)
            if r is not None and r < need:
                break
            await start("fill", i)
            await pilot.pause(interval_s)
        else:
            raise DrillFailed(f"{target}'s room stayed at {room(snap(), target)} blocks after {max_fill} streams"
                              f" of {need} blocks: the choice of D is not headroom, or its pool is too big")
        # the proxy's count, as its last report said it: a scrape comes each second
        await done("fill", f"{len(streams)} streams of {prompt_tokens}+{max_tokens} tokens; {target} room"
                   f" {room(snap(), target)} < {need} blocks")

        for i in range(probes):  # at once: the target's streams end and free room as time goes by
            await start("probe", i)
            await pilot.pause(0.05)
        await done("probe", f"{probes} more streams sent while {target} is full")

        if not await st.poll(lambda: all(s.task is None or s.task.done() for s in streams), step_timeout_s, 0.5):
            raise DrillFailed(f"the streams did not end within {step_timeout_s:.0f} s")
        ids = {s.request_id for s in streams}
        try:
            await until("every stream traced", lambda s: ids <= {r.request_id for r in s.requests}, 15)
        except DrillFailed:
            seen = {r.request_id for r in snap().requests}
            lost = [s for s in streams if s.request_id not in seen]
            raise DrillFailed(f"{len(lost)} of {len(streams)} streams have no trace from the proxy within 15 s of"
                              " their end; the client saw: " + "; ".join(
                                  f"{s.request_id.rsplit('-', 2)[-2]}-{s.request_id.rsplit('-', 1)[-1]}"
                                  f" {s.rec.outcome()}" for s in lost[:6])) from None
        traces = {r.request_id: r for r in snap().requests if r.request_id in ids}
        v = snap().instance(target)
        pre_after = v.metrics.get(PREEMPTIONS) if v else None
        preempted = None if pre_before is None or pre_after is None else int(pre_after - pre_before)
        res.checks = checks(target, streams, traces, preempted, need)
        held = sum(c.held for c in res.checks)
        await done("verdict", f"{held} of {len(res.checks)} checks held")
        raise_unheld(res.checks)
    except DrillFailed as e:
        st.fail(e)
    finally:
        for s in streams:
            if s.task is not None and not s.task.done():
                s.task.cancel()
        await asyncio.gather(*(s.task for s in streams if s.task is not None), return_exceptions=True)
        await client.aclose()
    return res
