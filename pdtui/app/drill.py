"""The failure drill, driven through the dashboard's own keys: what a teacher does by hand in class,
done unattended, with a check that each consequence shows where people look.

Steps (each waits, bounded, for its consequence in the dashboard's state, then saves an SVG):

1. ``ready``     both instances ready and the warm-up request through the pair done;
2. ``load``      ``2`` starts steady decode streams;
3. ``kill-d``    a witness stream of our own starts; once it streams, ``k`` kills D mid-stream: D's pane turns red, the witness stream ends with an
                 explicit error (never a clean end), the error counter moves;
4. ``restart-d`` ``r`` restarts D; ``1`` sends one request: it goes through the pair again;
5. ``kill-p``    ``K`` kills P; ``1`` sends one request: it falls back to D colocated;
6. ``restart-p`` ``R`` restarts P; ``1`` again: back to the pair, whose row is selected so the
                 freight formula shows (the teaching overlay);
7. ``latency``   ``2`` again, steady streams through the restored pair; then ``h`` shows the TTFT and
                 ITL histograms. Checked here too: no paired request of the drill was a silent
                 recompute (D computed more than a block of its prompt: RequestTraced.recomputed),
                 and D reported what it computed for the paired requests (else the check is blind).

``pdtui drill --scenario headroom`` runs the other drill, pdtui.app.drill_headroom (the choice of
D by headroom, on a pair with several D).

What every drill shares lives here: ``Steps`` (the bounded waits on the dashboard's state, the steps
with their SVGs, the verdict's rows, a failure's record), ``DrillResult`` and its table.

Used by ``pdtui drill`` (to rehearse before class, to make the screenshots, and on the GPU box) and by
the real-pair Pilot test in tests/e2e. Nothing here talks to an engine except the witness client,
which is what a user's second terminal would be.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pdtui.app.loadgen import prompt_of
from pdtui.app.state import Snapshot
from pdtui.core import sse_client


class DrillFailed(AssertionError):
    """A step's consequence did not show within its time limit."""


@dataclass
class Step:
    name: str
    seconds: float
    detail: str
    screenshot: str | None = None


@dataclass(frozen=True)
class Check:
    """One line of a drill's verdict: what should be seen, what was, and whether it held."""

    expected: str
    observed: str
    held: bool


@dataclass
class DrillResult:
    steps: list[Step] = field(default_factory=list)
    failed: str | None = None
    checks: list[Check] = field(default_factory=list)
    """The verdict's lines, expected beside observed (the headroom drill's)."""

    @property
    def ok(self) -> bool:
        return self.failed is None

    def table(self) -> str:
        lines = [f"{'step':<10} {'s':>7}  what was seen"]
        lines += [f"{s.name:<10} {s.seconds:>7.1f}  {s.detail}" for s in self.steps]
        if self.checks:
            lines += ["", f"{'':<4} {'expected':<64} observed"]
            lines += [f"{'ok' if c.held else 'NOT':<4} {c.expected:<64} {c.observed}" for c in self.checks]
        if self.failed:
            lines.append(f"FAILED: {self.failed}")
        return "\n".join(lines)


def all_ready(s: Snapshot) -> bool:
    """Every instance ready and the pair's warm-up done: what each drill waits for first."""
    return s.header.ready_s is not None and bool(s.instances) and all(i.state == "ready" for i in s.instances)


def raise_unheld(checks: list[Check]) -> None:
    """The drill fails with the checks that did not hold, expected beside observed; none: nothing."""
    failed = [c for c in checks if not c.held]
    if failed:
        raise DrillFailed("; ".join(f"expected {c.expected}, observed {c.observed}" for c in failed))


class Steps:
    """What every drill does on ``pilot.app`` (a PdtuiApp): bounded waits on the dashboard's state
    (``until``, polled every ``poll_s``), each step recorded with its seconds and, with ``shots``,
    an SVG (``done``), the verdict's rows (``check``), and a failure's record (``fail``). With
    ``watch_broken``, a wait with ``starting`` also ends at once when the pair came up broken."""

    def __init__(self, pilot: Any, *, shots: Path | None = None, prefix: str = "",
                 log: Callable[[str], None] = lambda s: None, poll_s: float = 0.2, watch_broken: bool = True) -> None:
        self.pilot, self.app, self.shots, self.prefix, self.log = pilot, pilot.app, shots, prefix, log
        self.poll_s, self.watch_broken = poll_s, watch_broken
        self.res = DrillResult()
        self.t0 = self.mark = time.monotonic()

    def snap(self) -> Snapshot:
        return self.app.snapshot

    async def poll(self, pred: Callable[[], bool], timeout: float, every: float) -> bool:
        """Whether ``pred`` came true within ``timeout`` seconds, asked every ``every`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            await self.pilot.pause(every)
        return False

    async def until(self, what: str, pred: Callable[[Snapshot], bool], timeout: float, *, starting: bool = False) -> None:
        """Wait for ``pred``; bounded. ``starting``: a start that failed (an engine died during
        start-up or the warm-up) or a pair that came up broken ends the wait at once, with the cause."""
        def seen() -> bool:
            if not self.app.is_running:
                raise DrillFailed(f"{what}: the dashboard was closed")
            if starting and self.app.start_error:
                raise DrillFailed(f"start-up failed: {self.app.start_error.splitlines()[0]}")
            if starting and self.watch_broken and self.snap().header.broken:
                raise DrillFailed(f"the pair came up broken: {self.snap().header.broken}")
            return pred(self.snap())

        if not await self.poll(seen, timeout, self.poll_s):
            raise DrillFailed(f"{what}: not seen within {timeout:.0f} s")

    async def done(self, name: str, detail: str) -> None:
        """The step ``name`` is over: its seconds, what was seen, and its SVG (with ``shots``)."""
        await self.pilot.pause(0.3)  # let the widgets take the last snapshot
        path = None
        if self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)
            path = self.app.save_screenshot(filename=f"{self.prefix}{len(self.res.steps) + 1:02d}-{name}.svg",
                                            path=str(self.shots))
        now = time.monotonic()
        self.res.steps.append(Step(name, now - self.mark, detail, path))
        self.mark = now
        self.log(f"[drill] {name:<10} {now - self.t0:7.1f} s  {detail}")

    def check(self, expected: str, observed: str, held: bool) -> None:
        """One row of the verdict, logged as it is made."""
        self.res.checks.append(Check(expected, observed, held))
        self.log(f"[drill] {'ok ' if held else 'NOT'} {expected}: {observed}")

    def fail(self, e: DrillFailed) -> None:
        """The drill stopped at ``e``: said in the result and the log, the screen saved as failed.svg."""
        self.res.failed = str(e)
        self.log(f"[drill] FAILED after {time.monotonic() - self.t0:.1f} s: {e}")
        if self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)
            self.app.save_screenshot(filename=f"{self.prefix}failed.svg", path=str(self.shots))


@dataclass
class Witness:
    """One long stream through the proxy, as a client in another terminal would hold it: the core's
    SSE client fills ``rec`` while the stream runs, and the drill reads it meanwhile."""

    rec: sse_client.SseStream = field(default_factory=sse_client.SseStream)
    request_id: str = field(default_factory=lambda: f"drill-witness-{time.time_ns():x}")

    @property
    def chunks(self) -> int:
        """Data events so far, ``[DONE]`` and an error event aside."""
        return self.rec.events

    @property
    def done(self) -> bool:
        return self.rec.done

    def going(self) -> bool:
        """Two chunks or more (D's own tokens are coming: the first may be P's), or an error."""
        return self.chunks >= 2 or self.error is not None

    @property
    def status(self) -> int | None:
        return self.rec.status

    @property
    def error(self) -> str | None:
        """Why the stream did not end clean, once that is known: an error event (its message), a
        status other than 200, a transport failure, or its end without ``[DONE]``."""
        return self.rec.error()


async def witness_stream(base_url: str, model: str, max_tokens: int, w: Witness) -> None:
    body = {"model": model, "prompt": prompt_of(40, int(time.time())), "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0)) as client:
        await sse_client.stream(client, f"{base_url}/v1/completions", body, w.rec,
                                headers={"X-Request-Id": w.request_id})


async def run(pilot: Any, *, shots: Path | None = None, prefix: str = "", ready_timeout_s: float = 300.0,
              step_timeout_s: float = 240.0, witness_tokens: int = 3000,
              log: Callable[[str], None] = lambda s: None) -> DrillResult:
    """Drive the drill on ``pilot.app`` (a PdtuiApp over a live Runtime). Never raises for a failed
    step: the result says which step failed and why; the caller decides the exit code."""
    st = Steps(pilot, shots=shots, prefix=prefix, log=log)
    app, res = st.app, st.res
    snap, until, done = st.snap, st.until, st.done

    def role(r: str) -> str:
        name = app.instance_for(r)
        if name is None:
            raise DrillFailed(f"no {r} instance in this pair")
        return name

    def state_of(name: str) -> str:
        v = snap().instance(name)
        return v.state if v else "unknown"

    def count(outcome: str) -> int:
        return snap().counts.get(outcome, 0)

    async def one_request(outcome: str) -> Any:
        before = count(outcome)
        await pilot.press("1")
        await until(f"one request traced as {outcome}", lambda s: s.counts.get(outcome, 0) > before,
                    step_timeout_s)
        return next(r for r in reversed(snap().requests) if r.outcome == outcome)

    async def restart(key: str, name: str) -> Any:
        """Press the restart key, wait for the instance to come back, and send one request: the pair."""
        await pilot.press(key)
        await until(f"{name} restarting", lambda s: state_of(name) == "starting", 30)
        await until(f"{name} ready again", lambda s: state_of(name) == "ready", ready_timeout_s)
        return await one_request("pair")

    witness_task: asyncio.Task[None] | None = None
    try:
        await until("both instances ready and the warm-up done", all_ready, ready_timeout_s, starting=True)
        p, d = role("prefill"), role("decode")
        await done("ready", f"pair ready in {snap().header.ready_s:.1f} s (warm-up included)")

        cfg = app.runtime.run
        await pilot.press("2")
        await until("steady streams running", lambda s: any(w.group == "load" and not w.is_finished
                                                               for w in app.workers), step_timeout_s)
        await done("load", "steady streams running")

        # The witness starts only now, right before the kill: D must still be generating it when it dies.
        # A client that lags (this one shares the dashboard's loop) can still be reading a stream D has
        # long finished, and a kill then ends nothing (the stream is complete in the sockets' buffers).
        for kill_try in range(2):  # a second try only when D had finished the witness before the kill
            w = Witness()
            for attempt in range(3):
                if attempt:
                    log("[drill] the witness stream ended before the kill; a new one")
                    w = Witness()
                task = witness_task = asyncio.create_task(witness_stream(cfg.proxy_url, cfg.model_name,
                                                                         witness_tokens, w))
                # two chunks: D's own tokens are coming (the first may be P's, under first_token_from_p);
                # kill at once, while D is still generating (a lagging client reads the rest late)
                await st.poll(w.going, step_timeout_s, 0.05)
                if w.chunks < 2:
                    raise DrillFailed(f"the witness stream did not get going: {w.chunks} chunks, error {w.error}")
                if not task.done():
                    break
            if task.done():
                raise DrillFailed(f"the witness stream keeps ending before the kill ({w.chunks} chunks, done={w.done});"
                                  " a longer one: --witness-tokens")
            errors_before = count("error")
            await pilot.press("k")
            await until(f"{d}'s pane shows the exit", lambda s: (v := s.instance(d)) is not None and v.bad,
                        30)
            if not await st.poll(task.done, 60, 0.1):
                raise DrillFailed("the witness stream still hangs 60 s after D was killed")
            if w.done or w.error is None:
                # the proxy's own trace of the witness says whether D's stream was complete before D died
                row = snap().request(w.request_id)
                if row is not None and row.outcome != "error":
                    if kill_try == 0:  # D was fast, or the client slow: restart D and kill it again, once
                        log(f"[drill] D had finished the witness ({w.request_id}, traced as {row.outcome}) before"
                            " the kill reached it; D restarted, a new witness, a second kill")
                        await restart("r", d)
                        continue
                    raise DrillFailed(f"D had finished the witness ({w.request_id}, traced as {row.outcome}) before"
                                      f" the kill reached it, twice; the client was still reading (a longer one:"
                                      f" --witness-tokens)")
                raise DrillFailed(f"the witness stream ended cleanly after D was killed (done={w.done},"
                                  f" traced as {row.outcome if row else 'nothing'})")
            break
        await until("the errored request counted", lambda s: s.counts.get("error", 0) > errors_before, 60)
        dv = snap().instance(d)
        assert dv is not None  # its pane showed the exit (the first wait after `k`)
        await done("kill-d", f"{d} {dv.state} ({dv.detail or dv.exit_code}); witness got {w.chunks} chunks then"
                   f" '{w.error}'; errors {errors_before} -> {count('error')}")

        req = await restart("r", d)
        await done("restart-d", f"{d} ready again; {req.request_id} went through the pair"
                   f" ({req.blocks} blocks, TTFT {req.ttft_ms:.0f} ms)")

        await pilot.press("K")
        await until(f"{p}'s pane shows the exit", lambda s: (v := s.instance(p)) is not None and v.bad, 30)
        req = await one_request("fallback")
        if req.prefill_branch not in ("fallback_down", "fallback_unreachable"):
            raise DrillFailed(f"{req.request_id} fell back by {req.prefill_branch}: only a P that is down or"
                              " cannot be reached may send a request to D colocated")
        _select(app, req.request_id)
        await done("kill-p", f"{p} {state_of(p)}; {req.request_id} fell back to {d} colocated"
                   f" ({req.fallback_reason}), TTFT {req.ttft_ms:.0f} ms")

        req = await restart("R", p)
        _select(app, req.request_id)
        await done("restart-p", f"{p} ready again; {req.request_id} through the pair: {req.blocks} blocks,"
                   f" {(req.kv_bytes or 0) / 2**20:.2f} MiB")

        pairs_before = count("pair")
        await pilot.press("2")
        await until("steady streams through the restored pair finished",
                    lambda s: not any(w.group == "load" and not w.is_finished for w in app.workers), step_timeout_s)
        if count("pair") <= pairs_before:
            raise DrillFailed("the steady streams after the restarts did not go through the pair")
        checked = [r for r in snap().requests if r.outcome == "pair" and r.d_computed_tokens is not None]
        if count("recompute"):
            bad = [f"{r.request_id} ({r.d_computed_tokens} of {r.prompt_tokens})" for r in snap().requests if r.recomputed]
            raise DrillFailed(f"{count('recompute')} paired request(s) had D compute the prompt itself: {', '.join(bad[:5])}")
        if not checked:
            raise DrillFailed("no paired request says how many prompt tokens D computed: the recompute check is blind"
                              " (is D running with --enable-prompt-tokens-details?)")
        await pilot.press("h")
        await done("latency", f"histograms of {len(snap().ttft)} TTFT and {len(snap().itl)} ITL samples"
                   f" (pair {count('pair')}, fallback {count('fallback')}, error {count('error')});"
                   f" no silent recompute in {len(checked)} paired requests")
    except DrillFailed as e:
        st.fail(e)
    finally:
        if witness_task is not None and not witness_task.done():
            witness_task.cancel()
            await asyncio.gather(witness_task, return_exceptions=True)
    return res


def _select(app: Any, request_id: str) -> None:
    """Highlight a request's row in the transfers table, which opens its detail (the formula)."""
    from pdtui.app.widgets import TransfersTable

    table = app.query_one(TransfersTable)
    app.action_show_tab("transfers")
    table.focus()
    table.move_cursor(row=table.keys.index(request_id))
