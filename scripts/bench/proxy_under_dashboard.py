"""Does the dashboard perturb the proxy? `pdtui proxy` under the dashboard, for the transparency bench.

A benchmark helper, not a test. It serves `pdtui proxy` (a ProxyProcess, exactly as the Runtime
starts it) over one decode URL, and hands the proxy's events to either

- nothing but a plain consumer (``--view headless``: what `pdtui up --headless` does), or
- the real dashboard (``--view dashboard``: ``make_app`` as the CLI makes it, freeze_gc on,
  headless Textual at ``--size``, on the Latency tab so the histograms redraw), over
  bench_refresh.BenchRuntime (no engines) which gets every RequestTraced the proxy emits, plus
  ``--extra-rate`` events per second of the recorded mix (metrics, logs, connector lines, requests;
  scripts/bench/bench_refresh.py's mix) so the dashboard
  is as busy as under a real pair.

Run it as arms of the transparency bench, which measures the streams' gaps at the client:

    python -m pdtui.bench.transparency --rates 6400,12800 --arms direct \\
      --arm 'headless={python} scripts/bench/proxy_under_dashboard.py --decode {decode} --port {port} --view headless' \\
      --arm 'dashboard={python} scripts/bench/proxy_under_dashboard.py --decode {decode} --port {port} --view dashboard'

(from the repo root, PYTHONPATH=.). The proxy's CPU column then includes the dashboard's (all
descendants are counted); the figure that matters is the gap p99 against the headless arm.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pdtui.core.events import Event, RequestTraced
from pdtui.core.proxy import ProxyProcess, ProxySettings


async def main(args: argparse.Namespace) -> int:
    if args.ui_cpu is not None:
        os.sched_setaffinity(0, {args.ui_cpu})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    seen = {"requests": 0, "events": 0}

    if args.view == "headless":
        def on_event(ev: Event) -> None:
            seen["events"] += 1
            seen["requests"] += isinstance(ev, RequestTraced)
            ev.to_json()  # what --headless does with each event

        proc = ProxyProcess([], [("D", args.decode)], host="127.0.0.1", port=args.port, settings=ProxySettings(),
                            on_event=on_event, cpus=[args.proxy_cpu] if args.proxy_cpu is not None else None)
        await proc.start()
        proc.set_up("D", True)
        while not stop.is_set():
            if args.burn_ms:  # a busy consumer, without Textual: the loop held args.burn_ms at a time
                t_end = time.perf_counter() + args.burn_ms / 1000
                while time.perf_counter() < t_end:
                    pass
                # then idle so that the loop is busy --burn-duty of the time (1: never idle)
                idle = args.burn_ms / 1000 * (1 - args.burn_duty) / args.burn_duty
                await asyncio.sleep(idle)
            else:
                await asyncio.sleep(0.1)
        await proc.stop()
        print(f"headless: {seen}", file=sys.stderr)
        return 0

    from scripts.bench.bench_refresh import RECORDING, BenchRuntime, fresh, load_mix, started, state

    if args.view == "fold":
        # the dashboard's state folding every event (pdtui.app.state), a snapshot 20 times a second,
        # and no Textual: what the dashboard computes, without painting
        from pdtui.app.state import DashState

        folded = DashState()

        def on_fold(ev: Event) -> None:
            seen["events"] += 1
            seen["requests"] += isinstance(ev, RequestTraced)
            folded.apply(ev)

        proc = ProxyProcess([], [("D", args.decode)], host="127.0.0.1", port=args.port, settings=ProxySettings(),
                            on_event=on_fold, cpus=[args.proxy_cpu] if args.proxy_cpu is not None else None)
        t0 = time.time()
        for ev in (started(t0), state("P", "ready", t0), state("D", "ready", t0)):
            folded.apply(ev)
        await proc.start()
        proc.set_up("D", True)
        mix = [ev for ev in load_mix(RECORDING) if not isinstance(ev, RequestTraced)]
        i, t_next, t_snap = 0, time.perf_counter(), 0.0
        while not stop.is_set():
            now = time.perf_counter()
            while args.extra_rate > 0 and t_next <= now:
                folded.apply(fresh(mix[i % len(mix)], i, time.time()))
                i += 1
                t_next += 1 / args.extra_rate
            if now - t_snap >= 0.05:
                folded.snapshot()
                t_snap = now
            await asyncio.sleep(0.01)
        await proc.stop()
        print(f"fold: {seen}, extra events {i}", file=sys.stderr)
        return 0

    from pdtui.app import app as app_mod
    from pdtui.app.app import make_app

    if args.refresh_ms is not None:  # the views' refresh interval (the app's REFRESH_INTERVAL_S, 50 ms)
        app_mod.REFRESH_INTERVAL_S = args.refresh_ms / 1000
    fake = BenchRuntime()
    app = make_app(fake, freeze_gc=True)

    def on_event(ev: Event) -> None:
        seen["events"] += 1
        if isinstance(ev, RequestTraced):
            seen["requests"] += 1
            fake.emit(ev)

    # the proxy on its own CPU as in the other views: without cpus= it inherits this process's
    # affinity (--ui-cpu), and the dashboard and the proxy then share one core (the 2026-11-30
    # runs did so: results/2026-12-07-dashboard-tail)
    proc = ProxyProcess([], [("D", args.decode)], host="127.0.0.1", port=args.port, settings=ProxySettings(),
                        on_event=on_event, cpus=[args.proxy_cpu] if args.proxy_cpu is not None else None)
    width, height = (int(x) for x in args.size.split("x"))
    async with app.run_test(size=(width, height)) as pilot:
        t0 = time.time()
        fake.emit(started(t0), state("P", "ready", t0), state("D", "ready", t0))
        await pilot.press("h")  # the Latency tab: histograms
        await proc.start()
        proc.set_up("D", True)
        if args.nice:
            os.nice(args.nice)
        if args.idle:  # every thread of this process (Textual's too) in SCHED_IDLE: runs only on idle CPU
            for tid in os.listdir("/proc/self/task"):
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
        mix = [ev for ev in load_mix(RECORDING) if not isinstance(ev, RequestTraced)]
        i, t_next = 0, time.perf_counter()
        while not stop.is_set():
            if args.extra_rate > 0:
                now = time.perf_counter()
                while t_next <= now:
                    fake.emit(fresh(mix[i % len(mix)], i, time.time()))
                    i += 1
                    t_next += 1 / args.extra_rate
                await asyncio.sleep(max(0.0, min(0.05, t_next - time.perf_counter())))
            else:
                await asyncio.sleep(0.1)
        await proc.stop()
        await pilot.pause()
    print(f"dashboard: {seen}, extra events {i}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decode", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--view", choices=("headless", "fold", "dashboard"), default="dashboard",
                   help="headless: a plain consumer; fold: the dashboard's state without Textual; dashboard: it all")
    p.add_argument("--size", default="160x48")
    p.add_argument("--extra-rate", type=float, default=200.0, help="recorded events per second besides the traces")
    p.add_argument("--nice", type=int, default=0, help="renice the dashboard's process by N once the proxy runs")
    p.add_argument("--refresh-ms", type=float, default=None,
                   help="the dashboard's shortest interval between two refreshes (default: the app's, 50 ms)")
    p.add_argument("--idle", action="store_true",
                   help="put the dashboard's process in SCHED_IDLE once the proxy runs (it gets only CPU no one else wants)")
    p.add_argument("--burn-ms", type=float, default=0.0,
                   help="headless: hold the consumer's loop busy this long, then idle as long (a stand-in for draws)")
    p.add_argument("--burn-duty", type=float, default=0.5,
                   help="--burn-ms: the share of time the loop is held (default 0.5; 1: a core kept busy)")
    p.add_argument("--proxy-cpu", type=int, default=None, help="pin the proxy process to this CPU")
    p.add_argument("--ui-cpu", type=int, default=None, help="pin this process (the dashboard or consumer) to this CPU")
    sys.exit(asyncio.run(main(p.parse_args())))
