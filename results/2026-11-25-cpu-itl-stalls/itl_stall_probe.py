#!/usr/bin/env python3
"""Where do the client's long inter-token gaps come from: the engine, or after it?

Launches the bench's single instance (config.render_single, cpu profile, ports shifted by
``--port-offset``), sends ``--requests`` follow-shaped requests (``--prompt-len`` tokens,
``--max-tokens``, streamed, one at a time) with the bench's own client (workload.stream_completion),
and compares the gaps the client saw with vLLM's own ``vllm:inter_token_latency_seconds``
histogram over the same requests (scraped before and after). vLLM computes that histogram from the
engine core's output timestamps, before the API server and the client: a stall the client sees
but the histogram does not happened after the engine (API server, socket, client). Everything it
starts is killed by process group in a ``finally``.

    .venv/bin/python results/2026-11-25-cpu-itl-stalls/itl_stall_probe.py --port-offset 33000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx

from pdtui.bench.workload import Clock, Sample, make_prompt, stream_completion
from pdtui.core import config as config_mod

HIST = "vllm:inter_token_latency_seconds"


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    """(cores_probe.wait_health, copied when the two probes moved into results/.)"""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"instance exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError("not ready")


def server_itl(url: str) -> dict[float, float]:
    """Cumulative bucket counts of vLLM's ITL histogram: {upper bound s: count}."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(HIST + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


async def client(url: str, model: str, n: int, prompt_len: int, max_tokens: int) -> list[Sample]:
    clock, out = Clock(), []
    async with httpx.AsyncClient(timeout=300) as c:
        for i in range(-1, n):
            s = Sample(arm="probe", workload="follow", request_id=f"probe-{i}", prompt_tokens=prompt_len,
                       max_tokens=max_tokens, t_send=0.0)
            await stream_completion(c, url, model, make_prompt(11, "itl-probe", i, prompt_len), s, clock)
            if i >= 0:
                out.append(s)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port-offset", type=int, default=33000)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=2031)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), args.port_offset)
    spec = config_mod.render_single(cfg)
    proc = subprocess.Popen(spec.argv, env={**os.environ, **spec.env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_health(spec.url, proc)
        before = server_itl(spec.url)
        samples = asyncio.run(client(spec.url, cfg.model_name, args.requests, args.prompt_len, args.max_tokens))
        after = server_itl(spec.url)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    total = delta[float("inf")]
    gaps = sorted((g for s in samples for g in s.itl_ms), reverse=True)
    for ms in (25, 50, 100):
        le = ms / 1000
        srv = total - delta.get(le, float("nan"))
        cli = sum(g > ms for g in gaps)
        print(f"gaps over {ms} ms: client {cli} of {len(gaps)}; vLLM's ITL histogram {srv:.0f} of {total:.0f}")
    print(f"client's largest gaps (ms): {[round(g, 1) for g in gaps[:8]]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
