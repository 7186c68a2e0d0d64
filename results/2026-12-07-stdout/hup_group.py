"""With SIGHUP ignored at start (as nohup leaves it), does the data path outlive a hung-up terminal?
Over FAKE engines: `pdtui up --headless`, then `pdtui proxy` alone, each on a pseudo-terminal that
is its controlling terminal; the terminal hangs up (headless: then its process group gets SIGHUP,
what a shell sends its jobs); then 20 streamed requests.

usage (repo root): PYTHONPATH=. python results/2026-12-07-stdout/hup_group.py SRC   (SRC: a folder holding pdtui/)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdtui.core import config as config_mod
from pdtui.core.control import request
from tests.fake_service import FAKE_ENGINES, ROOT, fake_profile, wait_ready
from tests.fakes import free_port
from tests.stdout_cases import Stdout, controlling_terminal, fake_pd, stream_many


def proxy(src: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="pdtui-", dir="/tmp"))
    out, port, log = Stdout("tty_gone"), free_port(), tmp / "err"
    with fake_pd() as (p_url, d_url), log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pdtui", "proxy", "--prefill", p_url, "--decode", d_url,
                                 "--port", str(port)], cwd=src, env={**os.environ, "PYTHONPATH": src},
                                stdin=subprocess.DEVNULL, stdout=out.arg, stderr=err,
                                preexec_fn=controlling_terminal(True))  # noqa: PLW1509
        out.spawned()
        try:
            while "listening on" not in log.read_text():
                time.sleep(0.05)
            out.hang_up()
            time.sleep(1)
            alive = proc.poll() is None
            served = stream_many(f"http://127.0.0.1:{port}", 20)[0] if alive else 0
            print(f"{src}: pdtui proxy: after the hang-up: alive {alive} (exit {proc.returncode}), {served}/20 served;"
                  f" its last stderr line: {log.read_text().strip().splitlines()[-1][:90]}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(15)
            out.close()
            shutil.rmtree(tmp, ignore_errors=True)


def headless(src: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="pdtui-", dir="/tmp"))
    out = Stdout("tty_gone")
    profile = fake_profile(tmp)
    port = config_mod.load_profile(profile).proxy_port
    home = tmp / "h"
    sock = home / "state" / "ctl" / f"{port}.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(ROOT), str(FAKE_ENGINES)]), "PDTUI_HOME": str(home),
           "PDTUI_FAKE_ENGINES": "pd", "PDTUI_FAKE_ITL_S": "0.01"}
    with (tmp / "err").open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pdtui", "up", "--headless", "--profile", str(profile)],
                                cwd=src, stdin=subprocess.DEVNULL, stdout=out.arg, stderr=err, env=env,
                                preexec_fn=controlling_terminal(True))  # noqa: PLW1509
    out.spawned()
    try:
        wait_ready(home, sock, proc)
        out.hang_up()
        os.killpg(proc.pid, signal.SIGHUP)
        time.sleep(1)
        ok, worst = stream_many(f"http://127.0.0.1:{port}", 20)
        print(f"{src}: pdtui up --headless: after the hang-up and SIGHUP to the group: {ok}/20 streams served (longest wait {worst:.3f} s),"
              f" headless alive {proc.poll() is None}")
    finally:
        with contextlib.suppress(OSError, ValueError):
            request(sock, {"verb": "down"}, timeout_s=30)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    headless(sys.argv[1])
    proxy(sys.argv[1])
