"""Issue 27's drills from the field on real engines: the package's hand-started P and D
(tests/e2e/attached/conftest.py), each drill run as a user runs it, `pdtui drill --headless
--scenario NAME --prefill URL --decode URL`, a process of its own; its table of expected beside
observed printed, its exit code asserted (0: every row held).

- stranded: through pdtui's proxy a client that leaves while D's dispatch is held (the drill's
  fault) gets P's blocks released through D at once; as a router without the defence (P's leg by
  hand, no D leg) P holds them for its KV lease (vLLM 0.32: 30 s) and counts one expiry;
- fail-open: D given reused, shifted, out-of-range and foreign-engine kv_transfer_params by the
  proxy's drill faults; the correctness witness (P's own greedy answer, compared token for token)
  passes the clean requests before and after, and none of the tampered ones, whatever D answered.
  On this set's dummy weights (every token's logprob ln 1/4096, whatever the prompt) no answer can
  show a wrong KV: the drill must then say it is blind and fail, which is asserted instead;
- soak: a minute of mixed load, nothing lost, nothing growing, nothing held after.

After the bench and before the headroom drill and 1P2D (test_c kills a D for good): these kill
nothing, and P and D must be whole. About 2 min 10 s here: stranded ~45 s (30 of them P's lease),
fail-open ~10 s, the soak ~75 s. The other field drills need engines this set does not have
(context: two max_model_len; handshake: a D of another dtype; restart-order: a D restart, which
test_a's failure drill already makes): results/2026-12-07-field has their runs on launched pairs.
"""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.attached.conftest import HandSet
from tests.e2e.handset import pdtui

pytestmark = pytest.mark.e2e


def _drill(hand: HandSet, scenario: str, port: int) -> str:
    run = pdtui("drill", "--headless", "--scenario", scenario, "--prefill", hand.p.url, "--decode", hand.d.url,
                "--proxy-port", str(port), "--log", f"P={hand.p.log}", "--log", f"D={hand.d.log}", timeout=400)
    print(f"\n[e2e] pdtui drill --scenario {scenario}:\n{run.stdout[-3000:]}")
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    for e in (hand.p, hand.d):  # the user's engines: left running, whole
        httpx.get(f"{e.url}/health", timeout=5).raise_for_status()
    return run.stdout


def test_b_kv_stranded_on_p_is_released_through_d_and_held_for_the_lease_without(hand: HandSet) -> None:
    out = _drill(hand, "stranded", hand.cfg.proxy_port + 5)
    assert "ok   pdtui's proxy: the D leg never sent (the client left), P's blocks released through D" in out
    assert "ok   a router without the defence" in out and "vllm:nixl_num_kv_expired_reqs +1" in out


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
