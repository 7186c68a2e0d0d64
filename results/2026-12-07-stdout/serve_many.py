"""Issue 22's goal, measured: `pdtui proxy > /dev/null` and `pdtui up --headless > /dev/null` (and,
with --cases, stdout closed, a pipe nobody reads (64 KiB, Linux's default), a terminal that hung up) each serve N streamed
requests through FAKE engines (tests/child_scripts/fake_server.py pd: not vLLM; 8 tokens, one per
10 ms), 10 at a time, timed; then what each says of its events where it counts them (the proxy's
/metrics, headless's `pdtui ctl status`), whether it is alive, and how it stops.

usage (repo root): PYTHONPATH=. python results/2026-12-07-stdout/serve_many.py [--n 1000]
    [--cases devnull,closed,full_pipe,tty_gone] [--programs proxy,headless] [--src DIR] [--buffer BYTES]

--src: the pdtui package to run (a folder holding pdtui/, e.g. `git archive` of an older commit),
default this checkout; the fakes and this client are always this checkout's. --buffer: the
children's $PDTUI_EVENT_BUFFER_BYTES (default: unset, 16 MiB).
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
from pathlib import Path
from typing import Any

import httpx

from pdtui.core import config as config_mod
from pdtui.core.control import request
from tests.fake_service import FAKE_ENGINES, ROOT, fake_profile
from tests.fakes import free_port
from tests.stdout_cases import Stdout, _stream_many, fake_pd


def _env(src: Path, buffer: int | None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT), str(FAKE_ENGINES)]), **extra}
    if buffer is not None:
        env["PDTUI_EVENT_BUFFER_BYTES"] = str(buffer)
    return env


def _serve(url: str, n: int) -> tuple[int, float, float]:
    import asyncio

    t0 = time.monotonic()
    ok, worst = asyncio.run(asyncio.wait_for(_stream_many(url, n), 600))
    return ok, time.monotonic() - t0, worst


def _metric(text: str, name: str) -> str:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return str(int(float(m.group(1)))) if m else "-"


def _last_line(path: Path) -> str:
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1][:160] if lines else ""


def run_proxy(case: str, n: int, src: Path, buffer: int | None, tmp: Path) -> dict[str, Any]:
    out, err = Stdout(case, pipe_size=65536), tmp / f"proxy-{case}.err"
    port = free_port()
    row: dict[str, Any] = {"program": "pdtui proxy", "stdout": case}
    with fake_pd() as (p_url, d_url), err.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pdtui", "proxy", "--prefill", p_url, "--decode", d_url,
                                 "--port", str(port)], stdin=subprocess.DEVNULL, stdout=out.arg, stderr=f,
                                env=_env(src, buffer), cwd=src, preexec_fn=out.preexec,  # noqa: PLW1509
                                start_new_session=True)  # cwd: `python -m` puts it first on sys.path
        out.spawned()
        try:
            deadline = time.monotonic() + 30
            while "listening on" not in err.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    row["served"] = f"none: exited {proc.returncode} at start ({_last_line(err)})"
                    return row
                time.sleep(0.05)
            out.hang_up()
            ok, secs, worst = _serve(f"http://127.0.0.1:{port}", n)
            row.update(served=f"{ok}/{n}", seconds=f"{secs:.1f}", per_s=f"{ok / secs:.0f}", worst_wait_s=f"{worst:.3f}",
                       alive=proc.poll() is None)
            if row["alive"]:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                written, full, gone = (_metric(text, name) for name in (
                    "pdtui_events_written_total", 'pdtui_events_dropped_total{reason="full"}',
                    'pdtui_events_dropped_total{reason="gone"}'))
                row["events"] = f"written {written}, dropped full {full}, gone {gone} (/metrics)"
                proc.send_signal(signal.SIGTERM)
            row["stop"] = f"exit {proc.wait(15)}"
            row["last_stderr"] = _last_line(err)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
    return row


def run_headless(case: str, n: int, src: Path, buffer: int | None, tmp: Path) -> dict[str, Any]:
    out, err = Stdout(case, pipe_size=65536), tmp / f"up-{case}.err"
    home = tmp / f"h-{case}"
    profile = fake_profile(tmp)
    port = config_mod.load_profile(profile).proxy_port
    sock = home / "state" / "ctl" / f"{port}.sock"
    row: dict[str, Any] = {"program": "pdtui up --headless", "stdout": case}
    env = _env(src, buffer, PDTUI_HOME=str(home), PDTUI_FAKE_ENGINES="pd", PDTUI_FAKE_ITL_S="0.01")
    with err.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pdtui", "up", "--headless", "--profile", str(profile),
                                 "--log-dir", str(tmp / f"logs-{case}")], stdin=subprocess.DEVNULL, stdout=out.arg,
                                stderr=f, env=env, cwd=src, preexec_fn=out.preexec,  # noqa: PLW1509
                                start_new_session=True)
    out.spawned()
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                row["served"] = f"none: exited {proc.returncode} at start ({_last_line(err)})"
                return row
            try:
                if request(sock, {"verb": "status"}, timeout_s=5).get("pair_ready_s") is not None:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        out.hang_up()
        ok, secs, worst = _serve(f"http://127.0.0.1:{port}", n)
        row.update(served=f"{ok}/{n}", seconds=f"{secs:.1f}", per_s=f"{ok / secs:.0f}", worst_wait_s=f"{worst:.3f}",
                   alive=proc.poll() is None)
        t0 = time.monotonic()
        try:
            st = request(sock, {"verb": "status"}, timeout_s=5)
            counts = st.get("stdout")
            row["events"] = ("(no count: this pdtui keeps none)" if counts is None else
                             f"written {counts['written']}, dropped full {counts['dropped_full']}, gone"
                             f" {counts['dropped_gone']} ({counts['output']}, {counts['gone'] or 'open'}; ctl status)")
            row["ctl_status_s"] = f"{time.monotonic() - t0:.2f}"
            request(sock, {"verb": "down"}, timeout_s=60)
            row["stop"] = f"exit {proc.wait(30)} (ctl down)"
        except (OSError, ValueError) as e:
            row["ctl_status_s"] = f"no answer in 5 s ({type(e).__name__})"
            proc.send_signal(signal.SIGTERM)
            try:
                row["stop"] = f"exit {proc.wait(30)} (SIGTERM)"
            except subprocess.TimeoutExpired:
                row["stop"] = "no exit 30 s after SIGTERM (killed)"
        row["last_stderr"] = _last_line(err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--cases", default="devnull")
    ap.add_argument("--programs", default="proxy,headless")
    ap.add_argument("--src", type=Path, default=ROOT)
    ap.add_argument("--buffer", type=int, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pdtui-", dir="/tmp"))
    rows = []
    try:
        for program in args.programs.split(","):
            for case in args.cases.split(","):
                run = run_proxy if program == "proxy" else run_headless
                row = run(case, args.n, args.src.resolve(), args.buffer, tmp)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = ["program", "stdout", "served", "seconds", "per_s", "worst_wait_s", "alive", "ctl_status_s", "events", "stop"]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
