"""How long `pdtui up` takes to a ready pair: N runs of `pdtui up --headless`, each timed from the
start of the command to its pair_ready event (both /health answers and the warm-up request), plus
the Runtime's own elapsed_s (from the engines' launch). Prints one line per run and the median.

    flock /tmp/pdtui-engines.lock .venv/bin/python scripts/bench/ready_time.py --runs 3 --profile cpu

Each run stops the pair (SIGTERM, as Ctrl-C) and waits for pdtui to exit before the next one, and
runs on ports of its own (--port-offset, then +1000 per run), all under 32768: with offset 35000,
once, D's NIXL side-channel port was in use at start ("ZMQError: Address already in use") and D
never became ready (results/2026-11-30-cpu-install-and-ready). Start engines only under the shared lock on a shared box.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time


def one_run(profile: str, port_offset: int, timeout_s: float) -> tuple[float, float]:
    argv = [sys.executable, "-m", "pdtui", "up", "--headless", "--profile", profile, "--port-offset", str(port_offset)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        deadline = t0 + timeout_s
        for line in proc.stdout:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no pair_ready within {timeout_s} s")
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "pair_ready":
                return time.monotonic() - t0, float(event["elapsed_s"])
            if event.get("event") == "instance_state" and event.get("state") == "failed":
                raise RuntimeError(f"an instance failed: {line.strip()}")
        raise RuntimeError(f"pdtui up exited with {proc.wait()} before pair_ready")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", default="cpu")
    # every port under 32768, out of Linux's ephemeral range (results/2026-11-30-cpu-install-and-ready)
    ap.add_argument("--port-offset", type=int, default=20000)
    ap.add_argument("--timeout-s", type=float, default=300.0)
    args = ap.parse_args()
    walls, own = [], []
    for i in range(args.runs):
        wall, elapsed = one_run(args.profile, args.port_offset + 1000 * i, args.timeout_s)
        walls.append(wall)
        own.append(elapsed)
        print(f"run {i + 1}: pair_ready {wall:.1f} s after `pdtui up --headless` (Runtime elapsed_s {elapsed:.1f})",
              flush=True)
    print(f"median of {args.runs}: {statistics.median(walls):.1f} s (elapsed_s {statistics.median(own):.1f});"
          f" range {min(walls):.1f}-{max(walls):.1f} s; {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
