"""Issue 24's headroom drill on real engines: `pdtui drill --scenario headroom` over the package's
hand-started 1P2D (P, then D2 with a 64-block pool and D with 2,048), run as a user runs it, a
process of its own, through the CLI's drill over engines given by URL (--prefill/--decode).

The drill (pdtui.app.drill_headroom) fills the smaller D with long streams (1,000 + 1,000 tokens,
16 blocks each) until the proxy's count of its room is under one stream's need, sends four more,
and checks from the dashboard's own snapshot: every stream paired and answered in full, every
probe on the other D, the full D preempted nothing (its vllm:num_preemptions), a probe's reason
names headroom. Its table (expected, observed) is printed; the exit code says whether all held.
The engines are the user's: the drill starts none and leaves them running; its proxy is gone
when it exits."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.e2e.attached.conftest import HandSet
from tests.e2e.handset import pdtui
from tests.waiting import wait_port_free

pytestmark = pytest.mark.e2e


def test_headroom_drill_over_hand_started_1p2d_sends_every_probe_past_the_full_d(hand: HandSet,
                                                                                 tmp_path: Path) -> None:
    port = hand.cfg.proxy_port + 3
    run = pdtui("drill", "--headless", "--scenario", "headroom", "--decode-choice", "headroom",
                "--prefill", hand.p.url, "--decode", f"{hand.d2.url},{hand.d.url}", "--decode-reports-cached",
                "--proxy-port", str(port), "--log-dir", str(tmp_path / "run"), timeout=600)
    print("\n" + run.stdout + "\n" + run.stderr[-3000:])
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    table = run.stdout
    assert "target D1" in run.stderr  # D1: the first --decode, the hand set's D2 (64 blocks)
    for expected in ("every stream answered in full", "go elsewhere, or to it only with room", "preempts nothing",
                     "a probe's reason names the choice by headroom"):
        line = next(ln for ln in table.splitlines() if expected in ln)
        assert line.startswith("ok "), line
    # the engines are the user's: left running; the drill's proxy is gone with it
    for e in (hand.p, hand.d, hand.d2):
        httpx.get(f"{e.url}/health", timeout=5).raise_for_status()
    assert wait_port_free(port), "the drill's proxy port is still held"
