#!/usr/bin/env python3
"""The connector zoo by hand: one real P/D pair per KV connector on the tiny CPU model, each leg
sent by this script (P first with the connector's params, then D with P's answer's params, as
pdtui's proxy does), and everything each connector leaves as evidence collected around it.

Variants (``--variant``):

  pull           NixlConnector (pull: D reads P's blocks), through pdtui.engine.nixl_quiet
  push           NixlPushConnector (P writes into D's blocks), the same module
  storage        ExampleConnector: P saves each prompt's KV as safetensors files under a shared
                 folder (one per prompt hash, one file per layer), D loads them; no params carried
  multi          MultiConnector [NixlConnector, ExampleConnector]: NIXL carries, storage keeps a copy
  multi-storage  MultiConnector [ExampleConnector, NixlConnector]: D loads from the folder first
  lmcache        LMCacheConnectorV1 on both (kv_both), a shared store: LMCache's own server
                 (``python -m lmcache.v1.server``) as the remote backend, no local tier; needs
                 ``--python`` of a venv with lmcache installed (a scratch copy: README)

For each request it prints: P's leg (ms, the kv_transfer_params P returned), D's leg (ms, D's
usage: prompt_tokens and prompt_tokens_details.cached_tokens, the figure pdtui's silent-recompute
check reads), the change of every connector-related series on P's and D's /metrics, the log lines
of the connector on both, and (storage) the files written and their bytes.

``--drill kill-p``: after the warm-up, P is killed (SIGKILL to its group) once it answered and
before D is sent its leg: what D does then, per connector, is the lesson.

Everything it starts runs in its own session and is killed by process group in a ``finally``.

    timeout 900 flock /tmp/pdtui-engines.lock .venv/bin/python results/2026-12-07-zoo/zoo_probe.py --variant push
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pdtui.bench.workload import make_prompt
from pdtui.core import config as config_mod

HERE = Path(__file__).resolve().parent
NIXL_P = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
          "remote_block_ids": None, "remote_host": None, "remote_port": None}
INTERESTING = re.compile(r"nixl|connector|prompt_tokens_by_source|prefix_cache|external|kv_transfer|offload", re.IGNORECASE)
LOG_WORDS = re.compile(r"NIXL|Nixl|nixl|KV|connector|Connector|External Cache|Inject|storage|push|PUSH|pdtui:|"
                       r"Traceback|Error|error|WARNING", re.DOTALL)


def kv_configs(variant: str, role: str, storage: str) -> dict[str, Any]:
    kv_role = {"prefill": "kv_producer", "decode": "kv_consumer"}[role]
    nixl = {"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": "cpu",
            "kv_connector_module_path": "pdtui.engine.nixl_quiet"}
    example = {"kv_connector": "ExampleConnector", "kv_role": kv_role,
               "kv_connector_extra_config": {"shared_storage_path": storage}}
    if variant == "pull":
        out = nixl
    elif variant == "push":
        out = {**nixl, "kv_connector": "NixlPushConnector"}
    elif variant == "storage":
        out = example
    elif variant == "lmcache":  # a shared store: both save to and look up in one LMCache server
        out = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    elif variant in ("multi", "multi-storage"):
        children = [nixl, example] if variant == "multi" else [example, nixl]
        out = {"kv_connector": "MultiConnector", "kv_role": kv_role, "kv_buffer_device": "cpu",
               "kv_connector_extra_config": {"connectors": children}}
    else:
        raise SystemExit(f"unknown variant {variant}")
    return {**out, "kv_load_failure_policy": ARGS.policy}


def post(url: str, body: dict, timeout: float) -> tuple[float, int, dict]:
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-Request-Id": body.pop("_rid")})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, data = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        status, data = e.code, {"error": e.read().decode(errors="replace")[:600]}
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        status, data = 0, {"error": repr(e)}
    return (time.perf_counter() - t) * 1000, status, data


def wait_health(url: str, proc: subprocess.Popen, log: Path, timeout: float = 400) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"{url}: exited with {proc.returncode}:\n" + "\n".join(tail))
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready in {timeout} s")


def metrics(url: str) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not INTERESTING.search(line):
            continue
        name, _, value = line.rpartition(" ")
        name = re.sub(r'(engine|model_name)="[^"]*",?', "", name).replace(",}", "}").replace("{}", "")
        if "_bucket" in name or "_created" in name:
            continue
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(b[k] - a.get(k, 0.0), 6) for k in sorted(b) if b[k] != a.get(k, 0.0)}


def new_lines(log: Path, start: int) -> tuple[list[str], int]:
    text = log.read_text(errors="replace")
    lines = [ln for ln in text[start:].splitlines() if LOG_WORDS.search(ln) and "GET /metrics" not in ln
             and "GET /health" not in ln]
    return lines, len(text)


def files_of(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    cfg = config_mod.load_profile("cpu")
    cfg.proxy_port = ARGS.port_base
    for inst, (port, side) in zip(cfg.instances, ((ARGS.port_base + 100, ARGS.port_base + 600),
                                                  (ARGS.port_base + 200, ARGS.port_base + 700)), strict=True):
        inst.port, inst.side_channel_port = port, side
    specs = config_mod.render(cfg, python=ARGS.python)
    out_dir = HERE / "runs" / f"{ARGS.variant}{'-' + ARGS.drill if ARGS.drill else ''}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    storage = Path(tempfile.mkdtemp(prefix="pdtui-zoo-kv-"))
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    report: dict[str, Any] = {"variant": ARGS.variant, "drill": ARGS.drill, "storage": str(storage), "requests": []}
    try:
        lm_env: dict[str, str] = {}
        if ARGS.variant == "lmcache":
            lm_port = ARGS.port_base + 800
            slog = out_dir / "lmcache-server.log"
            logs_server = slog.open("w")
            procs.append(subprocess.Popen([ARGS.python or sys.executable, "-m", "lmcache.v1.server", "127.0.0.1",
                                           str(lm_port), "cpu"], stdout=logs_server, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
            lm_env = {"LMCACHE_CHUNK_SIZE": "128", "LMCACHE_LOCAL_CPU": "False", "LMCACHE_MAX_LOCAL_CPU_SIZE": "1",
                      "LMCACHE_REMOTE_URL": f"lm://127.0.0.1:{lm_port}", "LMCACHE_REMOTE_SERDE": "naive"}
            report["lmcache_env"] = lm_env
            time.sleep(3)
        for sp in specs:
            argv = list(sp.argv)
            i = argv.index("--kv-transfer-config")
            kv = kv_configs(ARGS.variant, sp.role, str(storage))
            argv[i + 1] = json.dumps(kv, separators=(",", ":"))
            report[f"kv_transfer_config_{sp.name}"] = kv
            report[f"env_{sp.name}"] = sp.env
            log = out_dir / f"{sp.name}.log"
            logs.append(log)
            procs.append(subprocess.Popen(argv, env={**os.environ, **sp.env, **lm_env}, stdout=log.open("w"),
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
        engines = procs[-len(specs):]
        report["ready_s"] = [round(wait_health(sp.url, pr, lg), 1) for sp, pr, lg in zip(specs, engines, logs, strict=True)]
        print(f"[{ARGS.variant}] ready in {report['ready_s']} s", flush=True)
        p_url, d_url = specs[0].url, specs[1].url
        offsets = [0, 0]
        nixl_params = ARGS.variant in ("pull", "push", "multi", "multi-storage")

        def one(tag: str, n_tokens: int, kill_p: bool = False) -> dict[str, Any]:
            prompt = make_prompt(11, f"zoo-{ARGS.variant}-{time.time_ns()}", tag, n_tokens)
            rid = f"zoo-{ARGS.variant}-{tag}-{os.getpid()}"
            body: dict[str, Any] = {"model": cfg.model_name, "prompt": prompt, "max_tokens": 1, "stream": False,
                                    "temperature": 0.0, "_rid": rid}
            if nixl_params:
                body["kv_transfer_params"] = dict(NIXL_P)
            mp0, md0 = metrics(p_url), metrics(d_url)
            f0 = files_of(storage)
            p_ms, p_status, p_data = post(p_url, body, 120)
            params = dict(p_data.get("kv_transfer_params") or {})
            if kill_p:
                os.killpg(engines[0].pid, signal.SIGKILL)
                engines[0].wait(30)
                time.sleep(1.0)
            d_body: dict[str, Any] = {"model": cfg.model_name, "prompt": prompt, "max_tokens": 8, "stream": False,
                                      "temperature": 0.0, "_rid": rid}
            if params:
                d_body["kv_transfer_params"] = {k: v for k, v in params.items() if k != "remote_prefill_cached_tokens"}
            d_ms, d_status, d_data = post(d_url, d_body, ARGS.d_timeout)
            time.sleep(1.5)  # the engines' stats reach /metrics a moment after the answer
            mp1, md1 = metrics(p_url) if not kill_p else {}, metrics(d_url)
            f1 = files_of(storage)
            lines = []
            for k, lg in enumerate(logs):
                got, offsets[k] = new_lines(lg, offsets[k])
                lines.append(got)
            usage = d_data.get("usage") or {}
            rec = {
                "tag": tag, "prompt_tokens": n_tokens, "request_id": rid,
                "p": {"ms": round(p_ms, 1), "status": p_status, "kv_transfer_params": params,
                      "usage": p_data.get("usage"), "error": p_data.get("error")},
                "d": {"ms": round(d_ms, 1), "status": d_status, "usage": usage, "error": d_data.get("error"),
                      "text": (d_data.get("choices") or [{}])[0].get("text")},
                "d_cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                "d_computed": (usage.get("prompt_tokens", 0) - ((usage.get("prompt_tokens_details") or {})
                                                               .get("cached_tokens") or 0)) if usage else None,
                "metrics_P": delta(mp0, mp1) if mp1 else "P dead",
                "metrics_D": delta(md0, md1),
                "files_new": {k: v for k, v in f1.items() if k not in f0},
                "files_new_bytes": sum(v for k, v in f1.items() if k not in f0),
                "log_P": lines[0][-40:], "log_D": lines[1][-40:],
            }
            report["requests"].append(rec)
            print(json.dumps({k: rec[k] for k in ("tag", "prompt_tokens", "d_cached_tokens", "d_computed",
                                                   "files_new_bytes")} | {"p_ms": rec["p"]["ms"],
                              "d_ms": rec["d"]["ms"], "d_status": d_status}), flush=True)
            return rec

        one("warmup", 300)
        for k, n in enumerate(ARGS.lengths):
            one(f"r{k}", n, kill_p=(ARGS.drill == "kill-p" and k == len(ARGS.lengths) - 1))
        report["files_final"] = files_of(storage)
    finally:
        for pr in procs:
            if pr.poll() is None:
                try:
                    os.killpg(pr.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for pr in procs:
            try:
                pr.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(pr.pid, signal.SIGKILL)
                pr.wait(10)
        shutil.rmtree(storage, ignore_errors=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"[{ARGS.variant}] wrote {out_dir / 'report.json'}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--drill", choices=["kill-p"], default=None)
    ap.add_argument("--policy", choices=["fail", "recompute"], default="recompute")
    ap.add_argument("--port-base", type=int, default=27000)
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[700, 641])
    ap.add_argument("--d-timeout", type=float, default=120)
    ap.add_argument("--python", default=None, help="the engines' python (lmcache: a venv with lmcache)")
    ARGS = ap.parse_args()
    main()
