"""The migration drill (``pdtui drill --scenario migrate``): a decode instance killed from outside
after its KV transfer, mid-stream, and the client's stream going on on another D (issue 24;
docs/proxy.md, "Migration"; docs/drills.md).

Run it on a pair with two D or more (``--profile 1p2d-small``, or ``--prefill URL --decode URL,URL``
with ``--kill NAME=CMD`` for each D) and migration on (``--migrate via-prefill``, the default, or
``on-decode``). Steps (each waits, bounded, then saves an SVG with ``--shots``):

1. ``ready``     every instance ready and the warm-up done; two D or more;
2. ``reference`` the unbroken run: a greedy stream (temperature 0, ``ignore_eos``) of a prompt of
                 ``prompt_tokens`` ids and ``max_tokens`` tokens, through the proxy; then
                 ``ttft_samples`` short requests of the same prompt length, for the pair's TTFT;
3. ``transfer``  the same stream again; the D that runs it is the one the proxy counts a request in
                 flight to (``pdtui_inflight``) once the client has its first event (D reads the KV
                 before its first token), or the one whose own log says it read the stream's KV,
                 whichever is seen first: its transfer done;
4. ``kill``      that D killed from outside (SIGKILL for an instance pdtui started, the user's
                 ``--kill`` command for one it attached), while it is still decoding;
5. ``stream``    the client's stream ends; the checks (expected beside observed):

   - the stream ends with ``[DONE]``, no error event: one stream for the client;
   - its text equals the unbroken run's (greedy: no token repeated or skipped);
   - the proxy's trace records the migration: from the killed D to another, ``ok``, by the path
     the setting names (``prefill``: a second transfer of its own, the prompt and the tokens sent,
     its blocks by the formula; ``decode``: the new D computes them);
   - both transfers are what the D's own counters saw: the killed D pulled the first transfer's
     bytes, the new D one more pull of exactly the second's (via P; a connector whose bytes the
     engines do not count says so instead of passing);

   and the seam, as a figure (not a check: a timing): the gap at the proxy between the killed D's
   last token and the new D's first, its parts (P's leg, the new D's first token), beside the
   pair's TTFT (the median of the short requests);
6. ``restart``   the killed D restarted (pdtui's own, or through ``--restart``), and one request
                 through the pair again; over engines by URL without ``--restart`` it is left down
                 and the step says so.

The client is the drill's own, as a second terminal's would be. It reads the proxy's /metrics and
the D's own (before and after) itself: the dashboard's scrape comes once a second, and the kill
must land while D still decodes (on 2 cores a 3,000-token stream lasts 6-8 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdtui.app.drill import DrillFailed, DrillResult, all_ready, raise_unheld
from pdtui.app.drill_field import FieldDrill
from pdtui.app.state import Snapshot
from pdtui.core import connectors, sse_client
from pdtui.core.control import ControlError
from pdtui.core.events import ConnectorEvent

TRIES = 2
"""Cut streams at most: a second only when D had made every token before the kill reached it (and it
can be restarted)."""
MIGRATE_MODES = {"via-prefill": "prefill", "on-decode": "decode"}
"""The proxy's ``migrate`` setting -> the path its trace records."""


def inflight(text: str) -> dict[str, float]:
    """The proxy's /metrics body: ``pdtui_inflight`` by instance."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.labels.get("instance", ""): float(sample.value) for family in text_string_to_metric_families(text)
            if family.name == "pdtui_inflight" for sample in family.samples}


NEAR_TIE = 0.05
"""Nats between the reference's two likeliest tokens under which a different token on the new D is
the engines' numerics, not a repeat or a skip: the new D reads KV that P computed in one prefill
pass where the old D wrote it a token at a time, and bfloat16 logits carry about three digits."""


def answer(choices: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """A stream's token ids (``return_token_ids``) and, where its logprobs were asked for, each
    token's margin: its top logprob less the next (``logprobs`` 2 or more); inf where not known."""
    ids: list[int] = []
    margins: list[float] = []
    for c in choices:
        got = c.get("token_ids") or []
        ids += [int(t) for t in got]
        top = (c.get("logprobs") or {}).get("top_logprobs") or []
        for entry in top:
            vals = sorted((float(v) for v in (entry or {}).values()), reverse=True)
            margins.append(vals[0] - vals[1] if len(vals) >= 2 else math.inf)
        margins += [math.inf] * (len(ids) - len(margins))
    return ids, margins


def same_tokens(ref: list[int], margins: list[float], cut: list[int], sent: int) -> tuple[str, bool]:
    """The migrated stream's tokens against the unbroken run's: equal; or equal up to a token after
    the seam (``sent``: the tokens the old D had sent) where the reference's top two were within
    ``NEAR_TIE`` (the engines' numerics); anything else does not hold. Says when the reference is a
    near-tie nearly everywhere (dummy weights): then only the count and the tokens before the seam
    are checked."""
    if not ref:
        return "the unbroken run gave no token ids (a vLLM without return_token_ids?)", False
    k = next((i for i, (a, b) in enumerate(zip(ref, cut, strict=False)) if a != b), None)
    ties = sum(1 for x in margins if x < NEAR_TIE)
    blind = ties >= len(margins) * 0.9
    note = (f"; {ties} of the reference's {len(margins)} tokens are near-ties (dummy weights?): after the seam"
            " only their count is checked, a model with weights checks their order") if blind else ""
    if k is None:
        return f"equal, token for token ({len(cut)} tokens){note}", True
    if k < sent:
        return f"differs at token {k}, before the seam at {sent}: the old D's own tokens", False
    margin = margins[k] if k < len(margins) else math.inf
    if margin < NEAR_TIE:
        return (f"equal up to token {k} ({k - sent} after the seam at {sent}), then a near-tie in the reference"
                f" (its top two {margin:.2g} nats apart): the engines' numerics{note}"), True
    return (f"differs at token {k} ({k - sent} after the seam at {sent}) where the reference's top two were"
            f" {margin:.2g} nats apart: not a near-tie"), False


def _down(name: str) -> Callable[[Snapshot], bool]:
    """Whether ``name``'s pane shows it down (any state but ready)."""
    return lambda s: (v := s.instance(name)) is not None and v.state != "ready"


def seam_words(m: dict[str, Any], pair_ttft_ms: float | None) -> str:
    """The seam and its parts, beside the pair's TTFT, in a few words (the trace's migration entry)."""
    seam = m.get("seam_ms")
    if seam is None:
        return "no seam measured (the new D sent no token)"
    parts = []
    if m.get("prefill_ms") is not None:
        parts.append(f"P's leg {m['prefill_ms']:.0f}")
    if m.get("decode_ttft_ms") is not None:
        parts.append(f"{m.get('to', 'the new D')}'s first token {m['decode_ttft_ms']:.0f}")
    known = (m.get("prefill_ms") or 0.0) + (m.get("decode_ttft_ms") or 0.0)
    parts.append(f"the rest {seam - known:.0f}")
    words = f"seam {seam:.0f} ms ({', '.join(parts)} ms)"
    if pair_ttft_ms:
        words += f"; the pair's TTFT {pair_ttft_ms:.0f} ms (median): {seam / pair_ttft_ms:.2f}x"
    return words


async def run(pilot: Any, *, migrate: str = "via-prefill", connector: str = "nixl", shots: Path | None = None,
              prefix: str = "", ready_timeout_s: float = 600.0, prompt_tokens: int = 300, max_tokens: int = 3000,
              ttft_samples: int = 5, restart: bool = True,
              log: Callable[[str], None] = lambda s: None) -> DrillResult:
    """Drive the migration drill on ``pilot.app`` (a PdtuiApp over a live Runtime). ``migrate``: the
    proxy's setting; ``connector``: the KV connector's key (for its byte counter). Never raises for
    a failed step: the result says which failed and why, and carries the checks."""
    fd = FieldDrill(pilot, shots, prefix, log)
    conn = connectors.known(connector)
    bytes_metric = conn.bytes_metric if conn is not None else ""
    task: asyncio.Task[Any] | None = None
    watcher: asyncio.Task[Any] | None = None
    down: list[str] = []  # killed by the drill and not restarted yet
    try:
        if migrate not in MIGRATE_MODES:
            raise DrillFailed(f"migration is {migrate!r} in this run: the drill needs --migrate via-prefill or"
                              " on-decode")
        await fd.until("every instance ready and the warm-up done", all_ready, ready_timeout_s, starting=True)
        decodes = [i.name for i in fd.snap().instances if i.role == "decode"]
        if len(decodes) < 2:
            raise DrillFailed(f"the migration drill needs two decode instances or more, this pair has {decodes}"
                              " (--profile 1p2d-small)")
        run_info = fd.app.runtime.run
        room = (run_info.max_model_len or 4096) - prompt_tokens - 1
        tokens = min(max_tokens, room)
        if tokens < 200:
            raise DrillFailed(f"max_model_len {run_info.max_model_len} leaves {room} tokens after a"
                              f" {prompt_tokens}-token prompt: too short a stream to kill mid-way")
        await fd.done("ready", f"ready in {fd.snap().header.ready_s:.1f} s; decode instances {', '.join(decodes)};"
                      f" migration {migrate}")

        prompt = fd.prompt_ids(prompt_tokens, 90)
        body = {"model": fd.model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}
        url = f"{fd.proxy}/v1/completions"

        async def stream(rid: str, rec: sse_client.SseStream, salt: str, **extra: Any) -> None:
            # a cache salt of its own: the cut stream finds none of the reference's blocks in a prefix
            # cache (on P a shorter P leg, on D a smaller pull, or none: nothing for the counters);
            # the token ids, to compare token for token (the proxy passes them when asked)
            await sse_client.stream(fd.client, url, {**body, "cache_salt": f"drill-migrate-{fd.nonce}-{salt}",
                                                     "return_token_ids": True, **extra}, rec,
                                    headers={"X-Request-Id": rid}, stop_at_done=True)

        ref = sse_client.SseStream(choices=[])
        ref_id = f"drill-migrate-{fd.nonce}-ref"
        try:
            await asyncio.wait_for(stream(ref_id, ref, "ref", logprobs=2), 600)  # its top two: near-ties
        except TimeoutError:
            raise DrillFailed("the unbroken run did not end within 600 s") from None
        if not ref.done or ref.error():
            raise DrillFailed(f"the unbroken run did not end clean: {ref.error()}")
        ref_row = await fd.traced(ref_id)
        if ref_row.outcome != "pair":
            raise DrillFailed(f"the unbroken run was not paired: {ref_row.outcome} {ref_row.error or ''}")
        ref_ids, ref_margins = answer(ref.choices or [])
        ttfts = []
        for i in range(ttft_samples):
            rid = f"drill-migrate-{fd.nonce}-ttft-{i}"
            r = await fd.client.post(url, json={"model": fd.model, "prompt": fd.prompt_ids(prompt_tokens, 91 + i),
                                                "max_tokens": 4}, headers={"X-Request-Id": rid})
            row = await fd.traced(rid)
            if r.status_code == 200 and row.outcome == "pair" and row.ttft_ms is not None:
                ttfts.append(row.ttft_ms)
        pair_ttft = statistics.median(ttfts) if ttfts else None
        await fd.done("reference", f"{ref_id} on {ref_row.decode}: {len(ref_ids)} tokens,"
                      f" TTFT {ref_row.ttft_ms:.0f} ms; the pair's TTFT over {len(ttfts)} short requests:"
                      + (f" median {pair_ttft:.0f} ms (min {min(ttfts):.0f}, max {max(ttfts):.0f})" if ttfts else
                         " none paired"))

        control = fd.app.control

        async def bring_back(name: str) -> str | None:
            """Restart ``name``, wait until it is ready: what was seen; None when it cannot be
            restarted from here (an attached engine with no --restart), ``why_down`` saying why."""
            t = time.monotonic()
            try:
                await control.restart(name, source="drill")
            except ControlError as e:
                why_down.append(str(e))
                return None
            await fd.until(f"{name} ready again", lambda s: (v := s.instance(name)) is not None
                           and v.state == "ready", ready_timeout_s)
            return f"{name} ready again in {time.monotonic() - t:.1f} s"

        why_down: list[str] = []
        events = fd.app.runtime.subscribe()
        reads: list[ConnectorEvent] = []  # the D's own "KV read" lines for the cut stream, in order
        rid = ""

        async def watch() -> None:
            async for ev in events:
                if isinstance(ev, ConnectorEvent) and ev.what == "kv_read" and ev.fields.get("request_id") == rid:
                    reads.append(ev)

        watcher = asyncio.create_task(watch())
        logged = [d for d in decodes if fd.app.runtime.instances[d].log_path is not None]
        for attempt in range(TRIES):
            before = {d: await fd.metrics(d) for d in decodes}
            got = sse_client.SseStream(choices=[])
            rid = f"drill-migrate-{fd.nonce}-cut{attempt}"
            reads.clear()
            task = asyncio.create_task(stream(rid, got, f"cut{attempt}"))
            victim, how = await _find_victim(fd, decodes, reads, task, got)
            at_find = got.events
            t_kill = time.monotonic()
            try:  # at once: the step's record (an SVG with --shots) waits until after the kill
                await control.kill(victim, source="drill")
                down.append(victim)
            except ControlError as e:
                raise DrillFailed(f"could not kill {victim}: {e}") from None
            await fd.done("transfer", f"{victim} runs {rid}, its KV pulled ({how}); the client had {at_find}"
                          " events")
            await fd.until(f"{victim} down", _down(victim), 60)
            await fd.done("kill", f"{victim} killed from outside after {got.events} events at the client"
                          f" ({time.monotonic() - t_kill:.1f} s to see it down)")
            if not await fd.poll(task.done, 300, 0.2):
                raise DrillFailed(f"the client's stream still runs 300 s after {victim} was killed")
            row = await fd.traced(rid)
            m: dict[str, Any] = row.migrations[0] if row.migrations else {}
            late = not m or m.get("error") == "D had sent its last token"
            if not late:
                break
            words = (f"{victim} had made every token of {rid} before the kill reached it (the client had"
                     f" {got.events} events at the kill)")
            if attempt + 1 < TRIES and restart and (back := await bring_back(victim)) is not None:
                down.remove(victim)
                log(f"[drill] {words}; {back}; a new stream, a second kill")
                continue
            raise DrillFailed(words + ("; a second try too" if attempt else "") + ": a longer stream (max_model_len),"
                              " or a D log followed (--log NAME=FILE, written unbuffered: PYTHONUNBUFFERED=1)"
                              " finds it sooner")
        cut_ids, _ = answer(got.choices or [])
        others = [d for d in decodes if d != victim]
        after = {d: await fd.metrics(d) for d in others}
        new = m.get("to")
        await fd.done("stream", f"{rid}: {got.outcome()}; traced {row.outcome}; "
                      + (f"migrated {m.get('from')} -> {new} after {m.get('tokens')} tokens by {m.get('path')}"
                         f" ({m.get('result')}); {seam_words(m, pair_ttft)}" if m else "no migration recorded"))

        fd.check("the client's stream ends with [DONE], no error event: one stream",
                 got.outcome(), got.done and got.error() is None)
        fd.check(f"as many tokens as the unbroken run ({len(ref_ids)}): none repeated or skipped at the seam",
                 f"{len(cut_ids)} tokens", bool(ref_ids) and len(cut_ids) == len(ref_ids))
        fd.check("its tokens are the unbroken run's (greedy), or part at a near-tie after the seam",
                 *same_tokens(ref_ids, ref_margins, cut_ids, int(m.get("tokens") or 0)))
        path = MIGRATE_MODES[migrate]
        fd.check(f"the trace: a migration from {victim} to another D, ok, via {path}",
                 (f"{m.get('from')} -> {new}, {m.get('result')}, via {m.get('path')}"
                  + (f" ({m.get('reason')})" if m.get("reason") else "") + (f": {m.get('error')}" if m.get("error") else ""))
                 if m else f"none ({row.outcome} {row.error or ''})",
                 bool(m) and m.get("from") == victim and new in others and m.get("result") == "ok"
                 and m.get("path") == path)
        if bytes_metric or reads:
            if not any(e.instance == victim for e in reads):  # its log's line may come after the stream
                with contextlib.suppress(DrillFailed):
                    await fd.until(f"{victim}'s \"KV read\" line", lambda s: any(e.instance == victim for e in reads),
                                   5 if victim in logged else 0.5)
            mine = [e for e in reads if e.instance == victim]
            first_b = sum(int(e.fields.get("bytes") or 0) for e in mine)
            fd.check(f"the first transfer: {victim}'s own log line saw the trace's bytes",
                     f"trace {row.kv_bytes or 0:,} B, {victim} \"KV read\" {first_b:,} B" if mine else
                     f"{victim}'s read not seen: " + ("its log has no \"KV read\" line for it" if victim in logged
                                                      else f"no log followed (--log {victim}=FILE)"),
                     bool(mine) and row.kv_bytes is not None and first_b == row.kv_bytes)
            if path == "prefill" and new in after:
                pulls = after[new].get(f"{bytes_metric}_count", 0.0) - before[new].get(f"{bytes_metric}_count", 0.0)
                moved = after[new].get(f"{bytes_metric}_sum", 0.0) - before[new].get(f"{bytes_metric}_sum", 0.0)
                tokens_sent = int(m.get("tokens") or 0)
                want_blocks = math.ceil((prompt_tokens + tokens_sent) / run_info.block_size)
                fd.check(f"the second transfer: the prompt and the {tokens_sent} tokens sent ({want_blocks} blocks),"
                         f" one more pull on {new}'s counter of exactly its bytes",
                         f"trace {m.get('blocks')} blocks, {m.get('kv_bytes') or 0:,} B; {new} {pulls:.0f} pull,"
                         f" {moved:,.0f} B", m.get("blocks") == want_blocks and bool(m.get("kv_bytes"))
                         and pulls == 1 and moved == m.get("kv_bytes"))
        else:
            fd.check("both transfers seen on the engines' counters", f"connector {connector} counts no bytes,"
                     " and no D logged its reads", False)

        back = await bring_back(victim) if restart else None
        if back is not None:
            down.remove(victim)
            rid2 = f"drill-migrate-{fd.nonce}-after"
            r = await fd.client.post(url, json={"model": fd.model, "prompt": fd.prompt_ids(64, 99), "max_tokens": 4},
                                     headers={"X-Request-Id": rid2})
            row2 = await fd.traced(rid2)
            await fd.done("restart", f"{back}; {rid2} {r.status_code} {row2.outcome} on {row2.decode}")
        else:
            await fd.done("restart", f"{victim} left down" + (f": {why_down[-1]}" if why_down else ""))
        raise_unheld(fd.res.checks)
    except DrillFailed as e:
        fd.fail(e)
        if down and restart:  # leave the pair as it was found, where it can be
            with contextlib.suppress(Exception):
                await fd.app.control.restart(down[-1], source="drill")
                log(f"[drill] {down[-1]} restarted after the failure")
    finally:
        for running in (task, watcher):
            if running is not None and not running.done():
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
        await fd.aclose()
    return fd.res


async def _find_victim(fd: FieldDrill, decodes: list[str], reads: list[ConnectorEvent], task: asyncio.Task[Any],
                       got: sse_client.SseStream) -> tuple[str, str]:
    """The D that runs the cut stream, once its KV is pulled, and how that was seen: the proxy's own
    count of requests in flight to each D (``pdtui_inflight`` on its /metrics: nothing else is in
    flight) once the client has the stream's first event (D reads the KV before its first token);
    or, if it comes first, the D's own "KV read" line for it (its log followed). Not the D's
    /metrics: a D streaming at full speed on 2 cores took up to 7 s to answer it, by which time it
    had made every token (results/2026-12-07-migrate)."""
    deadline = time.monotonic() + 120
    while True:
        if reads:
            e = reads[0]
            return e.instance, f"its log: \"KV read\" {int(e.fields.get('bytes') or 0):,} B"
        if task.done():
            raise DrillFailed(f"the stream ended ({got.outcome()}) before a D was seen running it with its"
                              " KV pulled: a longer stream (max_model_len)")
        if time.monotonic() > deadline:
            raise DrillFailed("no D was seen running the stream with its KV pulled within 120 s")
        if got.events >= 1:
            r = await fd.client.get(f"{fd.proxy}/metrics", timeout=10)
            flying = inflight(r.text)
            busy = [d for d in decodes if flying.get(d, 0.0) >= 1]
            if len(busy) == 1:
                return busy[0], f"the proxy's pdtui_inflight once the client had its first token, {got.events} events"
        await asyncio.sleep(0.02)


__all__ = ["MIGRATE_MODES", "NEAR_TIE", "answer", "inflight", "run", "same_tokens", "seam_words"]
