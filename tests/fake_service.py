"""A real `pdtui up` over fake engines (tests/child_scripts/fake_server.py, not vLLM), for the
tests that drive it as a user would: a profile on free ports, the environment that puts fake
engines under any pdtui process started from it (tests/child_scripts/fake_engines), `pdtui ctl`,
and waiting for the pair."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pdtui.core.control import request
from tests.fakes import free_port
from tests.waiting import poll

ROOT = Path(__file__).resolve().parents[1]
FAKE_ENGINES = ROOT / "tests" / "child_scripts" / "fake_engines"


def fake_profile(folder: Path, *, ready_timeout_s: float | None = None) -> Path:
    """The cpu profile on free ports, no warm-up, a short stop grace (fake engines ignore nothing)."""
    text = (ROOT / "launch" / "cpu.toml").read_text()
    for old in ("8000", "8100", "8200", "5600", "5700"):
        text = text.replace(f"= {old}", f"= {free_port()}")
    extra = "\nwarmup = false\nstop_grace_s = 2.0" + (f"\nready_timeout_s = {ready_timeout_s}" if ready_timeout_s else "")
    text = text.replace("[pair]", "[pair]" + extra, 1)
    path = folder / "fake.toml"
    path.write_text(text)
    return path


def env_for(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PDTUI_HOME": str(home), "PYTHONPATH": str(ROOT), **extra}


def fake_env(home: Path, mode: str = "pd", **extra: str) -> dict[str, str]:
    """Any `python -m pdtui` started with it launches fake_server.py MODE for each engine."""
    return env_for(home, PYTHONPATH=f"{ROOT}{os.pathsep}{FAKE_ENGINES}", PDTUI_FAKE_ENGINES=mode, **extra)


def ctl(home: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdtui", "ctl", *args], capture_output=True, text=True,
                          timeout=timeout, env=env_for(home), cwd=ROOT, check=False)


def wait_ready(home: Path, sock: Path, proc: subprocess.Popen[Any] | None, timeout: float = 40,
               ready: bool = True) -> dict[str, Any]:
    def status() -> dict[str, Any] | None:
        if proc is not None:
            assert proc.poll() is None, proc.communicate()
        if sock.exists():
            with contextlib.suppress(OSError, ValueError):
                st = request(sock, {"verb": "status"}, timeout_s=5)
                if st.get("pair_ready_s") is not None or (not ready and all(i["pid"] for i in st["instances"])):
                    return st
        return None

    found = poll(status, timeout, 0.1)
    if found is None:
        raise AssertionError("the fake pair did not get ready")
    return found


def alive(pid: int) -> bool:
    """A process that is there and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 20) -> list[int]:
    """The pids still alive after ``timeout`` (none, normally)."""
    poll(lambda: not any(alive(p) for p in pids), timeout, 0.1)
    return [p for p in pids if alive(p)]
