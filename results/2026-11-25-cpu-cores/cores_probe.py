#!/usr/bin/env python3
"""Why is P's ``max_tokens=1`` leg slower than the single instance's whole TTFT on CPU?

Launches one vLLM instance at a time from the cpu profile (ports shifted by ``--port-offset``),
sends it ``--requests`` unique prompts of ``--prompt-len`` tokens, one at a time, each
``max_tokens=1`` and not streamed (exactly the proxy's P leg), after one warm-up, and prints the
request time per variant. While the requests run it samples, per thread of the instance's
processes, CPU time and the cores it may run on (``/proc/PID/task/TID``), so that what shares
the model's core is visible. Variants (``--variants``, comma-separated, in order):

  single       config.render_single: the bench's single arm (OMP threads on P's core 0)
  single-2     the same, VLLM_CPU_OMP_THREADS_BIND=0-1 (two OMP threads, both cores)
  p            P as the pair launches it (kv_producer, NixlConnector, pdtui.engine.nixl_quiet);
               the request carries kv_transfer_params do_remote_decode like the proxy's (D is
               not running: P keeps the blocks for a pull that never comes, which costs nothing
               here)
  p-plain      the same P, the request without kv_transfer_params (connector loaded, not used)
  p-spin       P with vLLM's stock NixlConnector (no nixl_quiet: the progress thread busy-polls)
  pd           P and D, both as the pair launches them; each request goes to P (timed, as above),
               then with P's kv_transfer_params to D (max_tokens=16, not streamed: D pulls the KV
               and P frees it), like the proxy but without pdtui's process in between
  pd-scrape    the same, while both /metrics are scraped every second (what pdtui's Runtime does)

``--vllm-pinning`` drops PDTUI_NIXL_KEEP_AFFINITY from P's and D's environment: vLLM's NIXL worker
then moves their model threads to the machine's last core (as before pdtui.engine.nixl_quiet undid it).

Everything it starts runs in its own session and is killed by process group in a ``finally``.

    .venv/bin/python results/2026-11-25-cpu-cores/cores_probe.py --port-offset 33000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pdtui.bench.workload import make_prompt
from pdtui.core import config as config_mod

CLK_TCK = os.sysconf("SC_CLK_TCK")


def spec_for(cfg: config_mod.PairConfig, variant: str) -> config_mod.LaunchSpec:
    if variant.startswith("single"):
        spec = config_mod.render_single(cfg)
        if variant == "single-2":
            spec.env["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"
        return spec
    p = config_mod.render(cfg)[0]
    assert p.role == "prefill"
    if variant == "p-spin":
        argv = list(p.argv)
        i = argv.index("--kv-transfer-config")
        kv = json.loads(argv[i + 1])
        kv.pop("kv_connector_module_path", None)
        argv[i + 1] = json.dumps(kv, separators=(",", ":"))
        env = {k: v for k, v in p.env.items() if not k.startswith("PDTUI_NIXL")}
        return config_mod.LaunchSpec(p.name, p.role, argv, env, p.url)
    return p


def post(url: str, body: dict, timeout: float = 300) -> tuple[float, dict]:
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = json.loads(r.read())
    return (time.perf_counter() - t) * 1000, data


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 300) -> float:
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


def threads_of_group(pgid: int) -> dict[tuple[int, int], dict]:
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                base = f"/proc/{pid}/task/{tid}"
                stat = Path(f"{base}/stat").read_text()
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                rest = stat[stat.rindex(")") + 2:].split()
                cpu_s = (int(rest[11]) + int(rest[12])) / CLK_TCK
                allowed = next(line.split(":", 1)[1].strip() for line in Path(f"{base}/status").read_text().splitlines()
                               if line.startswith("Cpus_allowed_list"))
                pcomm = Path(f"/proc/{pid}/comm").read_text().strip()
                out[(int(pid), int(tid))] = {"proc": pcomm, "thread": comm, "cpu_s": cpu_s, "cores": allowed,
                                             "last_core": int(rest[36])}
        except (OSError, ProcessLookupError, StopIteration, ValueError, IndexError):
            continue
    return out


KV_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
             "remote_block_ids": None, "remote_host": None, "remote_port": None}


def scrape_loop(urls: list[str], stop: threading.Event) -> None:
    while not stop.wait(1.0):
        for u in urls:
            try:
                with urllib.request.urlopen(f"{u}/metrics", timeout=5) as r:
                    r.read()
            except (urllib.error.URLError, OSError):
                pass


def run_variant(cfg: config_mod.PairConfig, variant: str, n: int, prompt_len: int, log_dir: Path,
                vllm_pinning: bool = False) -> dict:
    paired = variant.startswith("pd")
    specs = config_mod.render(cfg)[:2] if paired else [spec_for(cfg, variant)]
    if vllm_pinning:
        specs = [dataclasses.replace(s, env={k: v for k, v in s.env.items() if k != "PDTUI_NIXL_KEEP_AFFINITY"})
                 for s in specs]
    spec = specs[0]
    procs = []
    stop = threading.Event()
    try:
        for sp in specs:
            log = open(log_dir / f"{variant}-{sp.name}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(sp.argv, env={**os.environ, **sp.env}, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True))
        ready = max(wait_health(sp.url, pr) for sp, pr in zip(specs, procs, strict=True))
        body = {"model": cfg.model_name, "max_tokens": 1, "stream": False, "temperature": 0.0}
        if variant in ("p", "p-spin") or paired:
            body["kv_transfer_params"] = dict(KV_PARAMS)

        def one(i: int | str) -> tuple[float, float | None]:
            prompt = make_prompt(7, f"probe-{variant}", i, prompt_len)
            ms, data = post(spec.url, {**body, "prompt": prompt})
            assert data["usage"]["prompt_tokens"] == prompt_len, data["usage"]
            if not paired:
                return ms, None
            d_ms, _ = post(specs[1].url, {**body, "prompt": prompt, "max_tokens": 16,
                                          "kv_transfer_params": data["kv_transfer_params"]})
            return ms, d_ms

        one("w")  # warm-up (for the pair: the NIXL handshake)
        if variant == "pd-scrape":
            threading.Thread(target=scrape_loop, args=([s.url for s in specs], stop), daemon=True).start()
        time.sleep(2)
        groups = [pr.pid for pr in procs]
        before = {k: v for g in groups for k, v in threads_of_group(g).items()}
        t0 = time.monotonic()
        times, d_times = [], []
        for i in range(n):
            ms, d_ms = one(i)
            times.append(ms)
            if d_ms is not None:
                d_times.append(d_ms)
        wall = time.monotonic() - t0
        after = {k: v for g in groups for k, v in threads_of_group(g).items()}
        busy = []
        for key, a in after.items():
            b = before.get(key, {"cpu_s": 0.0})
            d = a["cpu_s"] - b["cpu_s"]
            if d >= 0.01 * wall:
                busy.append({**a, "tid": key[1], "cpu_pct": round(100 * d / wall, 1)})
        busy.sort(key=lambda x: -x["cpu_pct"])
        out = {"variant": variant, "ready_s": round(ready, 1), "ms": [round(x, 1) for x in times],
               "median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1),
               "omp_bind": "|".join(s.env.get("VLLM_CPU_OMP_THREADS_BIND", "-") for s in specs),
               "busy_threads": busy[:10]}
        if d_times:
            out["d_leg_median_ms"] = round(statistics.median(d_times), 1)
        return out
    finally:
        stop.set()
        for pr in procs:
            try:
                os.killpg(pr.pid, signal.SIGTERM)
                pr.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(pr.pid, signal.SIGKILL)
                pr.wait()
            except ProcessLookupError:
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port-offset", type=int, default=33000)
    ap.add_argument("--variants", default="single,p,p-plain,single-2")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=2031)
    ap.add_argument("--vllm-pinning", action="store_true",
                    help="leave vLLM's NIXL re-pinning of the model thread in place (P and D variants)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), args.port_offset)
    log_dir = Path(tempfile.mkdtemp(prefix="cores-probe-"))
    results = []
    for v in args.variants.split(","):
        r = run_variant(cfg, v, args.requests, args.prompt_len, log_dir, args.vllm_pinning)
        results.append(r)
        print(f"{v:10s} bind={r['omp_bind']}: max_tokens=1 request median {r['median_ms']} ms,"
              f" min {r['min_ms']} ms, all {r['ms']} (ready {r['ready_s']} s)"
              + (f"; D leg (16 tokens) median {r['d_leg_median_ms']} ms" if "d_leg_median_ms" in r else ""),
              flush=True)
        for t in r["busy_threads"]:
            print(f"    {t['proc'][:16]:16s} {t['thread'][:16]:16s} tid {t['tid']:>7} cores {t['cores']:5s}"
                  f" last {t['last_core']} cpu {t['cpu_pct']:5.1f}%", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"logs: {log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
