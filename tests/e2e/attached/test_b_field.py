"""Issue 27's drills from the field on real engines: the package's hand-started P and D
(tests/e2e/attached/conftest.py), each drill run as a user runs it, `pdtui drill --headless
--scenario NAME --prefill URL --decode URL`, a process of its own; its table of expected beside
observed printed, its exit code asserted (0: every row held).

- stranded: through pdtui's proxy a client that leaves while D's dispatch is held (the drill's
  fault) gets P's blocks released through D at once; as a router without the defence (P's leg by
  hand, no D leg) P holds them for its KV lease (the set's 10 s, `--kv-lease 10`; vLLM's default
  30 s) and counts one expiry;
- fail-open: D given reused, shifted, out-of-range and foreign-engine kv_transfer_params by the
  proxy's drill faults; the correctness witness (P's own greedy answer, compared token for token)
  passes the clean requests before and after, and none of the tampered ones, whatever D answered.
  On this set's dummy weights (every token's logprob ln 1/4096, whatever the prompt) no answer can
  show a wrong KV: the drill must then say it is blind and fail, which is asserted instead;
- context: P and DC (a quarter of P's max_model_len), past preflight's refusal on purpose;
- handshake: P and DX (float32 against P's bfloat16), likewise;
- restart-order: D killed and restarted through the user's scripts while P stays up;
- soak: 30 s of mixed load, nothing lost, nothing growing, nothing held after.

After the bench and before the headroom drill and 1P2D (test_c kills a D for good): P and D must be
whole after each (restart-order brings D back). About 1 min 40 s here: stranded ~17 s (10 of them P's
lease), fail-open ~4 s, context and handshake a few seconds each, restart-order ~30 s (D's start),
the soak ~40 s.
"""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.attached.conftest import HandSet
from tests.e2e.handset import KV_LEASE_S, HandStarted, pdtui

pytestmark = pytest.mark.e2e


def _drill(hand: HandSet, scenario: str, port: int, d: HandStarted | None = None, *extra: str) -> str:
    d = d or hand.d
    run = pdtui("drill", "--headless", "--scenario", scenario, "--prefill", hand.p.url, "--decode", d.url,
                "--proxy-port", str(port), "--log", f"P={hand.p.log}", "--log", f"D={d.log}", *extra, timeout=400)
    print(f"\n[e2e] pdtui drill --scenario {scenario} (P and {d.name}):\n{run.stdout[-3000:]}")
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    for e in (hand.p, d):  # the user's engines: left running, whole
        httpx.get(f"{e.url}/health", timeout=5).raise_for_status()
    return run.stdout + run.stderr  # the table, and the steps


def test_b_kv_stranded_on_p_is_released_through_d_and_held_for_the_lease_without(hand: HandSet) -> None:
    out = _drill(hand, "stranded", hand.cfg.proxy_port + 5, None, "--kv-lease", str(KV_LEASE_S))
    assert "ok   pdtui's proxy: the D leg never sent (the client left), P's blocks released through D" in out
    assert "ok   a router without the defence" in out and "vllm:nixl_num_kv_expired_reqs +1" in out
    assert f"until its KV lease ends (~{KV_LEASE_S} s)" in out


def test_b_context_asymmetry_ends_each_request_with_one_clear_error_never_a_hang(hand: HandSet) -> None:
    """P (4,096 tokens) and DC (1,024), past pdtui's refusal on purpose: a prompt DC refuses is one
    4xx, whole or streamed; the edge too; one both take is served; P holds nothing after."""
    out = _drill(hand, "context", hand.cfg.proxy_port + 8, hand.dc)
    assert "P max_model_len 4096, D max_model_len 1024" in out
    assert "ok   over: a prompt D (1024) refuses but the other (4096) takes" in out
    assert "ok   over-stream:" in out and "ok   edge:" in out
    assert "ok   fits: a prompt both sides take (960) is served" in out


def test_b_handshake_of_a_pair_whose_kv_differs_is_broken_with_the_reason_never_a_hang(hand: HandSet) -> None:
    """P (bfloat16) and DX (float32): their KV bytes per token differ. pdtui's preflight names the
    difference and the drill goes on on purpose: the warm-up calls the pair BROKEN, each request ends
    within the bound, DX's log says why (NIXL's compatibility hash)."""
    out = _drill(hand, "handshake", hand.cfg.proxy_port + 9, hand.dx)
    assert "ok   the warm-up does not call the pair ready" in out
    assert "ok   each request ends with one outcome" in out and "ok   D's log says why" in out


def test_b_d_restarted_while_p_stays_up_pairs_again_within_the_bound(hand: HandSet) -> None:
    """vLLM #49238's order: D killed and restarted (the user's scripts) while P stays up; the next
    requests pair, each within the bound."""
    d = hand.d
    out = _drill(hand, "restart-order", hand.cfg.proxy_port + 10, d,
                 "--kill", f"D=sh {d.kill_script}", "--restart", f"D=sh {d.start_script}")
    assert "ok   every request after D's restart (P up throughout) ends within" in out
    assert "ok   ... and pairs:" in out


def test_b_fail_open_is_caught_by_the_correctness_witness_or_said_blind(hand: HandSet) -> None:
    """With weights whose answers depend on the prompt (`pdtui model synth --weights`), every tampered
    request fails the witness and the clean ones pass. The set serves the tiny model with vLLM's
    dummy weights, whose every token has logprob ln 1/4096 whatever the prompt: then the drill must
    not call itself green but say it is blind (exit 1, the reason), which is asserted instead."""
    run = pdtui("drill", "--headless", "--scenario", "fail-open", "--prefill", hand.p.url, "--decode", hand.d.url,
                "--proxy-port", str(hand.cfg.proxy_port + 6), "--log", f"P={hand.p.log}", "--log", f"D={hand.d.log}",
                timeout=400)
    print(f"\n[e2e] pdtui drill --scenario fail-open:\n{run.stdout[-3000:]}")
    for e in (hand.p, hand.d):
        httpx.get(f"{e.url}/health", timeout=5).raise_for_status()
    if "--load-format dummy" in " ".join(hand.p.argv) or "dummy" in hand.p.argv:
        assert run.returncode == 1, run.stdout[-2000:]
        assert "NOT  the model's answers depend on the prompt" in run.stdout and "dummy weights" in run.stdout
        return
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    for kind in ("reuse", "shift", "out_of_range", "foreign_engine"):
        assert f"ok   {kind}: the witness is red" in run.stdout, kind
    assert "ok   clean: the pair's answer equals the known one" in run.stdout
    assert "ok   clean-after: the pair's answer equals the known one" in run.stdout


def test_b_a_short_soak_loses_nothing_and_grows_nothing(hand: HandSet, tmp_path) -> None:
    """`pdtui soak` over P and D for 30 s, a report every 7.5 s (the note's one-hour run:
    results/2026-12-07-field): no request lost, RSS and fds flat within 5% of the first report,
    no KV block held once the load stopped."""
    import json

    out = tmp_path / "soak.json"
    run = pdtui("soak", "--minutes", "0.5", "--every", "0.125", "--streams", "2", "--max-prompt", "600",
                "--prefill", hand.p.url, "--decode", hand.d.url, "--proxy-port", str(hand.cfg.proxy_port + 7),
                "--out", str(out), timeout=300)
    print(f"\n[e2e] pdtui soak:\n{run.stdout[-3000:]}")
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    data = json.loads(out.read_text())
    assert len(data["reports"]) == 4 and all(v["held"] for v in data["verdict"])
    last = data["reports"][-1]
    assert last["sent"] > 10 and last["lost"] == 0 and last["transfers"] > 0
    assert {"P", "D", "proxy"} <= set(last["processes"]), last["processes"]  # the engines found by their ports
