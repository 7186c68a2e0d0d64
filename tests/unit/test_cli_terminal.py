"""The dashboard needs a terminal on stdin and stderr (Textual draws on stderr): redirected, pdtui
says so on stdout and exits 2 before anything starts, instead of a blank screen."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdtui", *args], check=False, cwd=ROOT, text=True,
                          timeout=60, env={**os.environ, "PDTUI_HOME": "/nonexistent-pdtui-home"}, **kw)


def test_up_with_stderr_and_stdin_redirected_says_so_and_starts_nothing() -> None:
    # after the preflight (which needs no terminal: its refusals come first), on ports nobody holds
    # ports 24000-24200, 21600-21700: under Linux's ephemeral range (32768-60999), where any outgoing
    # connection on a busy box can hold a port for a moment (a CI run failed so at offset 41000)
    out = run(["up", "--port-offset", "16000"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE)
    assert out.returncode == 2
    assert "stdin and stderr are not a terminal" in out.stdout and "pdtui up --headless" in out.stdout
    assert "logs in" not in out.stderr  # no Runtime was made: nothing started


def test_only_stderr_redirected_is_named() -> None:
    leader, follower = pty.openpty()
    try:
        out = run(["replay", "examples/gpu-drill.jsonl.xz"], stdin=follower, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
    finally:
        os.close(leader)
        os.close(follower)
    assert out.returncode == 2
    assert "and stderr is not a terminal (redirected?)" in out.stdout
    assert "stdin" not in out.stdout.split(", and ")[1]


def test_drill_headless_needs_no_terminal_check() -> None:
    # --headless passes the check (and stops at the config: an unknown profile, exit 2 with its words)
    out = run(["drill", "--headless", "--profile", "no-such-profile"], stdin=subprocess.DEVNULL,
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert out.returncode == 2 and "not a terminal" not in out.stdout
