"""A pair whose D dies on its first paired decode, as on an AMX Xeon that never asked for the tile
state (issue 20): `pdtui drill` stops within 5 s of the death, naming D and SIGILL in one line, and
leaves nothing behind. The crash is real: D's worker raises SIGILL on itself at the first call of
vLLM's CPU attention kernel (pdtui.engine.faults, PDTUI_FAULT on D only), faulthandler reports it.

Runs its own pair (one start, about a minute on 2 cores): the shared pair must stay healthy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdtui.core import config as config_mod
from pdtui.core.supervisor import tagged_processes
from tests.e2e.conftest import PORT_OFFSET, _ports_free

pytestmark = pytest.mark.e2e
FAULT = "SIGILL@vllm._custom_ops:cpu_attention_with_kv_cache"
OFFSET = PORT_OFFSET + 500


def test_drill_stops_within_5s_of_d_dying_in_the_warm_up_and_names_the_cause(tmp_path: Path) -> None:
    src = (Path(__file__).resolve().parents[2] / "launch" / "cpu.toml").read_text()
    profile = tmp_path / "cpu-d-sigill.toml"
    # D's table is the second [[instance]]: its core line is followed by the fault
    assert src.count("cpu_core = 1\n") == 1
    profile.write_text(src.replace("cpu_core = 1\n", f'cpu_core = 1\nenv = {{ PDTUI_FAULT = "{FAULT}" }}\n'))
    record = tmp_path / "run.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDTUI_")}
    t0 = time.time()
    drill = subprocess.Popen([sys.executable, "-m", "pdtui", "drill", "--headless", "--profile", str(profile),
                              "--port-offset", str(OFFSET), "--record", str(record), "--ready-timeout", "300"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        text, _ = drill.communicate(timeout=420)
    finally:
        if drill.poll() is None:
            drill.kill()
            drill.communicate()
    t_end = time.time()
    print(f"\n[e2e] drill with D's fault: rc {drill.returncode} after {t_end - t0:.1f} s\n{text[-1500:]}")
    assert drill.returncode != 0
    events = [json.loads(line) for line in record.read_text().splitlines()]
    exited = [e for e in events if e["event"] == "instance_state" and e["instance"] == "D" and e["state"] == "exited"]
    assert exited, "D's death was not recorded"
    death = exited[0]
    assert "SIGILL (illegal instruction" in death["detail"] and "VLLM::Worker" in death["detail"], death["detail"]
    assert not [e for e in events if e["event"] == "pair_ready"], "a pair whose D died was called ready"
    # one line that names D and the cause
    line = next((ln for ln in text.splitlines() if "died during the warm-up request" in ln), None)
    assert line is not None and "D (decode)" in line and "SIGILL" in line, text[-2000:]
    after = t_end - death["t"]
    print(f"[e2e] D's death seen at +{death['t'] - t0:.1f} s; the drill exited {after:.2f} s after it")
    assert after < 5.0, f"the drill ended {after:.1f} s after D's death"
    cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), OFFSET)
    deadline = time.monotonic() + 10
    while not _ports_free(cfg) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ports_free(cfg), "the failed start left a port held"
    log = (Path(json.loads(record.read_text().splitlines()[0])["run_dir"]) / "D.log").read_text()
    assert "Fatal Python error: Illegal instruction" in log and "===== pdtui: D DIED:" in log
    assert not tagged_processes(f"{drill.pid}-"), "a process the drill started is still alive"
