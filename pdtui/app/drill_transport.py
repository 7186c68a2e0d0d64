"""The transport drill (``pdtui drill --scenario kill-p-load``): kill P after it answered and before
D has the KV, on whatever connector the pair runs, and set what is seen beside what that connector
should do (``Connector.kill_p``, docs/connectors.md). The outcomes differ by transport, and that
difference is the lesson: NIXL pull's read fails (D recomputes the prompt or fails the request, by
``kv_load_failure_policy``), a storage connector's KV outlives P in the folder, MultiConnector
(NIXL + storage) loads the copy after its pull failed, NIXL push leaves D waiting for a write that
never comes.

Steps (each bounded; with ``--shots`` an SVG each):

1. ``ready``    every instance ready and the warm-up done (a launched pair: D's process group is
                paused and resumed with SIGSTOP/SIGCONT, what a second terminal's ``kill -STOP``
                does; engines pdtui did not start are refused);
2. ``pause-d``  D's group stopped, so D cannot load anything yet;
3. ``prefill``  one stream of ``prompt_tokens`` through the proxy; P answers (P's successes rise in
                its scrape): the proxy has sent D its leg;
4. ``kill-p``   ``K`` kills P; its pane turns red;
5. ``resume-d`` D's group continued; the stream is read until it ends or ``hang_s`` passes;
6. ``verdict``  the checks, expected beside observed, for this connector; then ``R`` restarts P (and
                ``r`` restarts D after a hang: its request holds blocks until vLLM's timeout).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from pdtui.app.drill import Check, DrillFailed, DrillResult, Steps, all_ready, raise_unheld
from pdtui.app.state import Snapshot
from pdtui.core import connectors, kvmath, sse_client
from pdtui.core.events import RequestTraced

EXT = 'vllm:prompt_tokens_by_source{source="external_kv_transfer"}'
SUCCESS = "vllm:request_success"


def _successes(s: Snapshot, name: str) -> float:
    v = s.instance(name)
    return 0.0 if v is None else sum(x for k, x in v.metrics.items() if k.startswith(SUCCESS))


def rec_error(rec: sse_client.SseStream) -> str | None:
    """How the stream failed, in words (an HTTP status, an SSE error event, the transport), or None."""
    if rec.transport_error:
        return rec.transport_error
    if rec.error_event is not None:
        return f"error event {rec.error_event}"
    if rec.status is not None and rec.status != 200:
        return f"HTTP {rec.status}"
    return None


def _from_store(conn: connectors.Connector, policy: str) -> bool:
    """Whether D answers from the folder when P is gone: storage always; MultiConnector when its
    failed NIXL pull is retried (``recompute``: D looks the prompt up again and the storage child has
    it; under ``fail`` the request fails with the pull)."""
    return not conn.carries_params or (bool(conn.children) and policy == "recompute")


def expected(conn: connectors.Connector, policy: str) -> str:
    """What this connector should do when P dies before D has the KV, in the drill's words."""
    if conn.key == "nixl-push":
        return "no answer: D waits for P's write (push_reg_notif_failed), no recompute"
    if _from_store(conn, policy):
        return "200: D loads the stored copy and computes the tail only (< 1 block)"
    return ("200: D's pull fails and D recomputes the whole prompt (the silent recompute, counted)"
            if policy == "recompute" else "an error: D's pull fails and the request fails")


def checks(conn: connectors.Connector, policy: str, rec: sse_client.SseStream, hung: bool,
           trace: RequestTraced | None, prompt_tokens: int, block_size: int, loaded: float | None,
           failed_d: float | None) -> list[Check]:
    """The drill's verdict for ``conn``: expected beside observed."""
    want = expected(conn, policy)
    if conn.key == "nixl-push":
        seen = "no answer" if hung else f"the stream ended: {rec_error(rec) or 'clean'}"
        return [Check(want, seen, hung),
                Check("D counts the failed registration (failed notifications rose)", f"rose by {failed_d}",
                      bool(failed_d))]
    computed = None if trace is None else trace.d_computed_tokens
    if _from_store(conn, policy):
        stored = kvmath.stored_blocks(prompt_tokens, block_size) * block_size
        ok = not hung and rec_error(rec) is None and rec.done and computed is not None and computed <= block_size
        return [Check(want, f"{'no answer' if hung else rec_error(rec) or 'a clean answer'}; D computed {computed}"
                      f" of {prompt_tokens}", ok),
                Check(f"D loaded {stored} tokens from outside (external_kv_transfer)", f"{loaded}", loaded == stored)]
    if policy == "recompute":
        ok = rec.done and rec_error(rec) is None and computed == prompt_tokens
        return [Check(want, f"{rec_error(rec) or 'a clean answer'}; D computed {computed} of {prompt_tokens}", ok)]
    return [Check(want, rec_error(rec) or "a clean answer", rec_error(rec) is not None)]


async def run(pilot: Any, *, policy: str, shots: Path | None = None, prefix: str = "", ready_timeout_s: float = 300.0,
              prompt_tokens: int = 642, hang_s: float = 15.0, log: Callable[[str], None] = lambda s: None) -> DrillResult:
    """Drive the transport drill on ``pilot.app`` (a PdtuiApp over a live Runtime of one P and one
    D; ``policy``: its kv_load_failure_policy). Never raises for a failed step: the result says
    which failed and why, with the checks. ``prompt_tokens`` counts bytes: the tiny model's
    byte-level tokenizer makes them tokens (another model's tokenizer makes fewer)."""
    # as this drill always waited: every 0.1 s, and no broken-pair check at start-up
    st = Steps(pilot, shots=shots, prefix=prefix, log=log, poll_s=0.1, watch_broken=False)
    app, res = st.app, st.res
    snap, until, done = st.snap, st.until, st.done
    rid = f"drill-kill-p-load-{time.time_ns():x}"
    rec = sse_client.SseStream()
    task: asyncio.Task[Any] | None = None
    paused: int | None = None

    client = httpx.AsyncClient(timeout=httpx.Timeout(hang_s + 120.0, connect=5.0))
    try:
        await until("every instance ready and the warm-up done", all_ready, ready_timeout_s, starting=True)
        s = snap()
        conn = connectors.known(s.header.connector)
        if conn is None:
            raise DrillFailed(f"connector {s.header.connector!r}: not one pdtui knows")
        p = [i for i in s.instances if i.role == "prefill"]
        d = [i for i in s.instances if i.role == "decode"]
        if len(p) != 1 or len(d) != 1 or d[0].pid is None or d[0].attached:
            raise DrillFailed("the kill-p-load drill needs one P and one D that pdtui launched (it pauses D's"
                              " processes with SIGSTOP)")
        run_info = app.runtime.run
        block_size = s.header.block_size or 16
        want = expected(conn, policy)
        await done("ready", f"{conn.key} ({conn.name}); expected: {want}")

        # D's figures before: once two scrapes agree (the warm-up's tokens reach D's /metrics a moment late)
        seen: list[float | None] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (len(seen) < 2 or seen[-1] != seen[-2] or seen[-1] is None):
            await pilot.pause(1.1)  # past the next scrape (scrape_interval_s: 1 s)
            v = snap().instance(d[0].name)
            seen.append(None if v is None else v.metrics.get(EXT))
        d_now = snap().instance(d[0].name)
        before_d = dict(d_now.metrics) if d_now is not None else dict(d[0].metrics)
        failed_key = conn.counters.get("failed_notifications")
        p_before = _successes(snap(), p[0].name)
        paused = d[0].pid
        os.killpg(paused, signal.SIGSTOP)
        await done("pause-d", f"{d[0].name}'s processes stopped (SIGSTOP to group {paused})")

        prompt = (f"[{rid}] " + "the quick brown fox " * (prompt_tokens // 20 + 1))[:prompt_tokens]
        body = {"model": run_info.model_name, "prompt": prompt, "max_tokens": 4, "stream": True, "temperature": 0.0}
        task = asyncio.create_task(sse_client.stream(client, f"{run_info.proxy_url}/v1/completions", body, rec,
                                                     headers={"X-Request-Id": rid}, stop_at_done=True))
        await until(f"{p[0].name} answered its leg", lambda s: _successes(s, p[0].name) > p_before, 60)
        await pilot.pause(0.5)  # the proxy sends D its leg (D's kernel takes the bytes; D reads them later)
        await done("prefill", f"{p[0].name} answered; the proxy sent {d[0].name} its leg")

        await pilot.press("K")
        await until(f"{p[0].name} down", lambda s: (v := s.instance(p[0].name)) is not None
                    and v.state in ("exited", "failed"), 30)
        await done("kill-p", f"{p[0].name} killed before {d[0].name} had the KV")

        os.killpg(paused, signal.SIGCONT)
        paused = None
        try:
            await asyncio.wait_for(asyncio.shield(task), hang_s)
        except TimeoutError:
            pass
        hung = not task.done()
        await done("resume-d", f"no answer within {hang_s:.0f} s" if hung else
                   f"the stream ended: {rec_error(rec) or 'clean'}")

        trace = None
        if not hung:
            await until("the request traced", lambda s: any(r.request_id == rid for r in s.requests), 15)
            trace = next(r for r in snap().requests if r.request_id == rid)
        await pilot.pause(1.5)  # D's next scrape
        after_d = snap().instance(d[0].name)
        after = after_d.metrics if after_d is not None else {}
        loaded = after.get(EXT, 0.0) - before_d.get(EXT, 0.0) if EXT in after else None
        failed_d = (after.get(failed_key, 0.0) - before_d.get(failed_key, 0.0)) if failed_key else None
        res.checks = checks(conn, policy, rec, hung, trace, prompt_tokens, block_size, loaded, failed_d)
        held = sum(c.held for c in res.checks)
        await done("verdict", f"{held} of {len(res.checks)} checks held")
        await pilot.press("R")
        if hung:
            await pilot.press("r")
        raise_unheld(res.checks)
    except DrillFailed as e:
        st.fail(e)
    finally:
        if paused is not None:
            try:
                os.killpg(paused, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
    return res
