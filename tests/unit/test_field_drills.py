"""The field drills' parts that need no engine (issue 27): the correctness witness's verdict, its
event through the dashboard's state, the topology a field drill runs on, the CLI's scenario names.
The drills themselves run on real engines: tests/e2e/attached/test_b_field.py."""

from __future__ import annotations

import asyncio

import httpx

from pdtui.app.state import DashState
from pdtui.core import config as config_mod
from pdtui.core import known_answer, topology
from pdtui.core.events import AnswerChecked, RequestTraced, from_dict


def test_the_verdict_is_the_tokens_not_the_status():
    ok = known_answer.compare("a", 200, [1, 2, 3], [1, 2, 3])
    assert ok.ok and ok.detail == "equal: 3 of 3 tokens"
    wrong = known_answer.compare("b", 200, [1, 9, 3], [1, 2, 3])
    assert not wrong.ok and wrong.detail == "differs from token 1: expected 2, got 9; 2 of 3 in place (HTTP 200: the fail-open)"
    short = known_answer.compare("c", 200, [1, 2], [1, 2, 3])
    assert not short.ok and "2 tokens instead of 3" in short.detail
    failed = known_answer.compare("d", 500, None, [1, 2, 3], "status 500: boom")
    assert not failed.ok and failed.detail == "status 500: boom"


def test_a_wrong_answer_turns_its_row_red_whatever_its_status():
    st = DashState()
    st.apply(RequestTraced(request_id="r1", endpoint="/v1/completions", stream=False, outcome="pair", status=200))
    verdict = known_answer.compare("r1", 200, [5, 6], [5, 7])
    ev = from_dict(verdict.event().to_dict())  # recorded and replayed alike
    assert isinstance(ev, AnswerChecked) and ev.got == [5, 6]
    st.apply(ev)
    st.apply(known_answer.compare("r2", 200, [1], [1]).event())
    snap = st.snapshot()
    assert snap.wrong_answers == {"r1": "wrong answer (200): differs from token 1: expected 7, got 6; 1 of 2 in place"
                                        " (HTTP 200: the fail-open)"}
    assert snap.counts["wrong_answer"] == 1 and snap.counts["answer_checked"] == 2
    assert snap.request("r1").outcome == "pair"  # the trace is what the proxy saw; the witness says more


def test_check_sends_the_same_greedy_body_through_the_proxy():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        import json

        seen.append((str(request.url), json.loads(request.content), request.headers.get("x-pdtui-drill")))
        return httpx.Response(200, json={"choices": [{"token_ids": [4, 5, 6]}]})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            ref = await known_answer.reference(client, "http://p", "m", [1, 2], 3)
            v = await known_answer.check(client, "http://proxy", "m", [1, 2], ref, request_id="w",
                                         headers={"X-Pdtui-Drill": "tamper=shift"})
        return ref, v

    ref, v = asyncio.run(go())
    assert ref.tokens == [4, 5, 6] and v.ok
    (u1, b1, h1), (u2, b2, h2) = seen
    assert u1 == "http://p/v1/completions" and u2 == "http://proxy/v1/completions" and b1 == b2
    assert b1["temperature"] == 0 and b1["return_token_ids"] is True and b1["max_tokens"] == 3
    assert (h1, h2) == (None, "tamper=shift")


def test_a_field_drill_s_topology_turns_the_drill_faults_on_and_the_context_drill_shortens_d():
    from pdtui import cli

    cfg = config_mod.load_profile("cpu")
    plain = topology.pair(cfg)
    assert plain.proxy is not None and plain.proxy.settings.drill is False
    topo = cli._field_topology(cfg, "context")
    assert topo.proxy is not None and topo.proxy.settings.drill is True
    argv = {m.name: m.launch.argv for m in topo.members if m.launch is not None}
    at = argv["D"].index("--max-model-len")
    assert argv["D"][at + 1] == str(cfg.max_model_len // 4)  # past validate(), on purpose
    assert argv["P"][argv["P"].index("--max-model-len") + 1] == str(cfg.max_model_len)
    assert argv["D"].count("--max-model-len") == 1
    stranded = cli._field_topology(cfg, "stranded")
    assert [m.launch.argv for m in stranded.members] == [m.launch.argv for m in plain.members]
    hs = {m.name: m.launch.argv for m in cli._field_topology(cfg, "handshake").members}
    assert hs["D"][hs["D"].index("--dtype") + 1] == "float32" and hs["P"][hs["P"].index("--dtype") + 1] == "auto"


def test_the_cli_names_every_field_scenario():
    from pdtui import cli
    from pdtui.app import drill_field

    assert cli.FIELD_SCENARIOS == drill_field.SCENARIOS == tuple(drill_field.RUNNERS)


# ----- the long-uptime watchdog (pdtui.core.pairwatch) ---------------------------------------------

# vLLM 0.32's line for a failed read (nixl/base_worker.py _log_failure), as D logs it when P's
# agent is gone: the shape of tests/e2e/test_pair.py's kill-P-before-the-pull failure.
DISCONNECT = ("(EngineCore pid=7) ERROR 12-07 14:02:11 [base_worker.py:1261] NIXL transfer failure:"
              " transfer_failed | Context: {'failure_type': 'transfer_failed', 'request_id': 'r{i}',"
              " 'engine_id': 'd-engine', 'error': 'NIXL_ERR_REMOTE_DISCONNECT'}")


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _failures(n: int, clock: FakeClock, watch, step: float = 10.0) -> list:
    import collections

    from pdtui.core.logparse import LogFeed

    notices: list = []

    def emit(ev) -> None:  # as the Runtime's emit: every event through the watch, at its time
        if (notice := watch.feed(ev)) is not None:
            notices.append(notice)
    feed = LogFeed("D", emit, collections.deque(maxlen=10), lambda why: None)
    for i in range(n):
        clock.t += step
        feed.feed(DISCONNECT.replace("{i}", str(i)))
    return notices


def test_a_d_stuck_in_remote_disconnect_is_said_once_with_the_restart_order():
    from pdtui.core.events import InstanceStateChanged
    from pdtui.core.pairwatch import DisconnectWatch

    clock = FakeClock()
    watch = DisconnectWatch({"P": "prefill", "D": "decode"}, threshold=3, window_s=60, clock=clock)
    assert _failures(2, clock, watch) == []
    (notice,) = _failures(3, clock, watch)  # the third within the window: once, not on the 4th and 5th
    assert notice.level == "error" and notice.instance == "D"
    assert "NIXL_ERR_REMOTE_DISCONNECT" in notice.text and "none worked" in notice.text
    assert notice.text.index("`pdtui ctl restart P`") < notice.text.index("`pdtui ctl restart D`")
    # a read that works ends the episode; so does a restart of P
    watch.feed(RequestTraced(request_id="ok", endpoint="/v1/completions", stream=False, outcome="pair", status=200,
                             decode="D"))
    assert len(_failures(3, clock, watch)) == 1
    watch.feed(InstanceStateChanged(instance="P", role="prefill", state="starting"))
    assert len(_failures(3, clock, watch)) == 1
    # failures spread wider than the window are no episode; a P's failures are not D's
    assert _failures(6, clock, DisconnectWatch({"D": "decode"}, threshold=3, window_s=15, clock=clock)) == []
    assert _failures(3, clock, DisconnectWatch({"D": "prefill"}, clock=clock)) == []


# ----- the soak's verdict (pdtui.bench.soak; the soak itself: tests/e2e) -------------------------------

def _report(t: float, rss: float, fds: float, lost: int = 0):
    from pdtui.bench.soak import Report

    return Report(t_s=t, sent=100, clean=100 - lost, lost=lost, lost_why={"status 502": lost} if lost else {},
                  traced={"pair": 100}, transfers=100, kv_bytes=2**20, pools={},
                  processes={"D": {"rss_mib": rss, "fds": fds, "procs": 3}})


def test_the_soak_verdict_holds_flat_figures_and_names_what_grew():
    from pdtui.bench.soak import SoakResult

    flat = SoakResult(1, 0.5, [_report(30, 1000, 80), _report(60, 1040, 82)], settled={"P": 0.0, "D": 0.0})
    assert all(held for _, _, held in flat.verdict())
    grew = SoakResult(1, 0.5, [_report(30, 1000, 80), _report(60, 1100, 80, lost=2)], settled={"P": 6.0})
    bad = {e: o for e, o, held in grew.verdict() if not held}
    assert bad == {"no request lost": "2 of 100: {'status 502': 2}",
                   "D rss flat within 5% after the warm-up": "1000 -> 1100 MiB (+10.0%)",
                   "P holds no KV block once the load stopped": "6 blocks"}
    assert not SoakResult(1, 1, [_report(60, 1, 1)]).verdict()[0][2]  # one report: no verdict
    assert '"held": false' in grew.to_json()


def test_tree_usage_sums_a_process_and_its_children():
    import os
    import subprocess
    import sys

    from pdtui.bench.soak import tree_usage

    alone = tree_usage(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import time

        time.sleep(0.5)
        rss, fds, procs = tree_usage(os.getpid())
        assert procs == alone[2] + 1 and rss > alone[0] and fds >= 3
    finally:
        child.kill()
        child.wait()
    assert tree_usage(2**22 + 12345) == (0, 0, 0)  # no such process


def test_listener_pid_finds_the_process_behind_a_port():
    import os
    import socket

    from pdtui.bench.soak import listener_pid

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert listener_pid(sock.getsockname()[1]) == os.getpid()
    assert listener_pid(1) is None


def test_a_flat_known_answer_says_the_witness_is_blind():
    flat = known_answer.Reference([1], [5, 6, 7], "u", (-8.3178, -8.3178, -8.3178))  # ln 1/4096: dummy weights
    assert flat.flat
    assert not known_answer.Reference([1], [5, 6, 7], "u", (-0.2, -3.1, -1.7)).flat


def test_synthetic_weights_are_what_vllm_loads_for_qwen2(tmp_path):
    from safetensors.numpy import load_file

    from pdtui.core import model

    model.synth("tiny", tmp_path, weights=True)
    got = load_file(str(tmp_path / "model.safetensors"))
    shape = model.SHAPES["tiny"]
    assert {k: v.shape for k, v in got.items()} == model.weight_shapes(shape)
    assert "lm_head.weight" not in got  # tied to the embeddings (config: tie_word_embeddings)
    assert got["model.norm.weight"].min() == 1.0 and got["model.layers.1.self_attn.k_proj.bias"].max() == 0.0
    again = tmp_path / "again"
    model.synth("tiny", again, weights=True)  # seeded: the same bytes
    assert (again / "model.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()
