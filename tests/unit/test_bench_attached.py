"""`pdtui bench` over engines pdtui did not start (issue 23: --prefill URL --decode URL [--single URL]):
each arm a topology of attached members run by the same run_topology, the checks and refusals
before anything is sent, and nothing of the engines stopped.

The engines are FAKES (tests/child_scripts/fake_vllm.py: child processes with vLLM 0.32's routes,
D's vllm:nixl_bytes_transferred counting what P offered); the test is about pdtui's wiring, not
about vLLM. No real engine here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdtui import cli
from pdtui.bench import report, workload
from pdtui.bench.runners import AttachedEngines, _launch, salted_seed
from pdtui.core import kvmath
from pdtui.core import model as model_mod
from tests.fakes import FakeVllmEngine as Engine
from tests.fakes import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def engines() -> Iterator[Callable[..., Engine]]:
    made: list[Engine] = []

    def make(role: str, *args: str) -> Engine:
        e = Engine(role, *args)
        made.append(e)
        return e

    yield make
    for e in made:
        e.kill()


def started(*es: Engine) -> list[Engine]:
    for e in es:
        e.start()
    return [e.wait() for e in es]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie is gone but for its parent's wait
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


# ----- the arms as topologies ------------------------------------------------------------------------


def test_every_arm_over_attached_engines_is_a_topology_of_attached_members() -> None:
    e = AttachedEngines(model_name="tiny", block_size=128, prefills=("http://p:1",), decodes=("http://d:1/",),
                        single="http://s:1", proxy_port=9100, switches={"tokenize_once": False},
                        vllm_version="vLLM 0.32.0 (the engines')")
    pair = e.topology("pair")
    assert pair.name == "pair" and pair.all_attached and [m.launch for m in pair.members] == [None, None]
    assert pair.proxy is not None and pair.proxy.prefills == ("P",) and pair.proxy.decodes == ("D",)
    assert pair.url == "http://127.0.0.1:9100" and pair.warmup and pair.member("D").url == "http://d:1"
    both = e.topology("pair-both").proxy
    assert both is not None and both.settings.tokenize_once and both.settings.first_token_from_p
    assert not pair.proxy.settings.tokenize_once  # the given switch; the arm's own win on its arm only
    single, proxied = e.topology("single"), e.topology("single-proxied")
    assert single.proxy is None and single.url == "http://s:1" and single.all_attached
    assert [(m.name, m.role) for m in single.members] == [("S", "single")] and not single.warmup
    assert proxied.proxy is not None and proxied.proxy.prefills == () and proxied.proxy.decodes == ("S",)
    assert proxied.proxy.settings.decode_choice == "round-robin"
    assert _launch(pair) == [{"name": n, "role": r, "url": u, "attached": True, "vllm": "vLLM 0.32.0 (the engines')"}
                             for n, r, u in (("P", "prefill", "http://p:1"), ("D", "decode", "http://d:1"))]
    assert e.default_arms() == ("single", "single-proxied", "pair")
    only_pair = AttachedEngines(model_name="tiny", block_size=128, prefills=("http://p:1",), decodes=("http://d:1",))
    assert only_pair.default_arms() == ("pair",) and "needs --single URL" in (only_pair.refuses("single") or "")
    assert "pdtui starts itself" in (e.refuses("two-single") or "")
    with pytest.raises(ValueError, match="needs --single URL"):
        only_pair.topology("single-proxied")


def test_arms_over_engines_that_keep_their_caches_get_prompts_of_their_own() -> None:
    plain = workload.make_prompt(0, "follow", 1, 300)
    assert plain.startswith("[0:follow:1] ")  # launched arms: the seed's prompts, as before
    a, b = (workload.make_prompt(0, "follow", 1, 300, salt) for salt in ("pair.ab12", "single.ab12"))
    assert len({plain, a, b}) == 3 and len(a) == len(b) == 300 and a.startswith("[0:pair.ab12:follow:1] ")
    assert workload.make_prompt(0, "follow", 1, 300, "pair.ab12") == a  # the same run, the same salt: the same
    assert workload.follow_prompt(0, 0, 1, 50, "pair.x") != workload.follow_prompt(0, 0, 1, 50)
    assert salted_seed(7, "") == 7 and len({salted_seed(7, f"{arm}.ab12") for arm in ("pair", "single")}) == 2


def test_the_report_says_the_engines_were_attached_and_kept_their_caches() -> None:
    arms = {"pair": {"launch": [{"name": "P", "role": "prefill", "url": "http://p:1", "attached": True,
                                 "vllm": "vLLM 0.32.0 (the engines')"},
                                {"name": "D", "role": "decode", "url": "http://d:1", "attached": True,
                                 "vllm": "vLLM 0.32.0 (the engines')"}]}}
    text = report.placement(arms) or ""
    assert "engines attached by URL (pair: P http://p:1, D http://d:1; vLLM 0.32.0 (the engines'))" in text
    assert "pdtui did not start them, place them or stop them" in text and "kept their prefix caches" in text
    assert "VLLM_CPU_OMP_THREADS_BIND" not in text


# ----- the bench, end to end over fake engines -----------------------------------------------------------


def test_a_bench_over_an_attached_pair_and_single_measures_through_the_proxy_and_leaves_them_running(
        engines: Callable[..., Engine], tmp_path: Path) -> None:
    """`python -m pdtui bench --prefill --decode --single` as a user runs it: the arms single,
    single-proxied and pair over the fakes; the pair's samples joined with the proxy's traces, its
    KV bytes checked against D's counter; no prompt sent twice to an engine across arms; nothing of
    pdtui's left, every engine still serving."""
    root = model_mod.synth("tiny", tmp_path / "tiny")
    per_block = kvmath.geometry_from_dir(root, "auto").bytes_per_token * 128
    common = ("--root", str(root), "--tokens", "4")
    p, d, s = started(engines("prefill", *common), engines("decode", *common, "--kv-bytes-per-block", str(per_block)),
                      engines("single", *common))
    home = tempfile.mkdtemp(prefix="pdtui-", dir="/tmp")
    out = tmp_path / "out"
    env = {**os.environ, "PDTUI_HOME": home, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pdtui", "bench", "--prefill", p.url, "--decode", d.url, "--single", s.url,
           "--workloads", "follow", "--requests", "2", "--prompt-len", "200", "--max-tokens", "4",
           "--proxy-port", str(free_port()), "--out", str(out), "--no-plots"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    finally:
        subprocess.run(["rm", "-rf", home], check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    data = report.read_json(out / "bench.json.gz")
    assert list(data["arms"]) == ["single", "single-proxied", "pair"]  # the default: every arm they can run
    assert all(a["error"] is None for a in data["arms"].values())
    pair = data["arms"]["pair"]
    measured = [x for x in pair["samples"] if not x["warmup"]]
    assert len(measured) == 2 and all(x["status"] == 200 and x["chunks"] == 4 for x in measured)
    assert all(x["trace"]["outcome"] == "pair" and (x["trace"]["prefill"], x["trace"]["decode"]) == ("P", "D")
               for x in pair["samples"])
    kb = pair["kv_bytes"]  # the client's warm-up and the 2 measured: 1 block each, as D counted them
    assert kb["match"] and kb["formula_ok"] and kb["requests"] == 3 and kb["d_metric_delta"] == 3 * per_block
    assert pair["warmup"] == [{"instance": "P+D", "via": "proxy (the Runtime's warm-up)", "outcome": "pair"}]
    assert [(w["instance"], w["status"]) for w in data["arms"]["single"]["warmup"]] == [("S", 200)]
    assert all(x["trace"] is None for x in data["arms"]["single"]["samples"])  # straight at S: no proxy
    assert all(x["trace"]["decode"] == "S" for x in data["arms"]["single-proxied"]["samples"])
    for name, arm in data["arms"].items():
        assert arm["prompt_salt"] == f"{name}.{arm['prompt_salt'].split('.')[1]}"
        assert all(m["attached"] and m["vllm"] == "vLLM 0.32.0 (the engines')" for m in arm["launch"])
        assert len(arm["pgids"]) == 1  # the load client's group alone: no engine of pdtui's
    assert len({a["prompt_salt"] for a in data["arms"].values()}) == 3
    assert "engines attached by URL" in data["placement"] and "kept their prefix caches" in data["placement"]
    assert "pdtui did not start them" in done.stdout
    assert [(e["name"], e["role"], e["vllm"]) for e in data["environment"]["engines"]] == [
        ("P", "prefill", "0.32.0"), ("D", "decode", "0.32.0"), ("S", "single", "0.32.0")]
    # pdtui's processes are gone; the engines are not pdtui's to stop
    ours = [x for a in data["arms"].values() for x in (*a["pgids"], *a["pids"])]
    assert ours and not [x for x in ours if _alive(x)], "the bench left a process of its own behind"
    seen: dict[str, list[dict[str, Any]]] = {}
    for e in (p, d, s):
        assert e.proc is not None and e.proc.poll() is None
        assert httpx.get(f"{e.url}/health", timeout=5).status_code == 200
        seen[e.role] = httpx.get(f"{e.url}/fake/requests", timeout=5).json()
    # S served both single arms one after the other, its cache kept: no prompt twice (each arm: the
    # straight warm-up, the client's warm-up, 2 measured)
    prompts = [r["prompt"] for r in seen["single"]]
    assert len(prompts) == 8 and len(set(prompts)) == 8, prompts
    assert all(r["kv"] for r in seen["decode"]) and len(seen["decode"]) == 4  # the Runtime's warm-up + 3
    assert len({r["prompt"] for r in seen["prefill"]}) == 4


# ----- what is refused, and before what ---------------------------------------------------------------


@pytest.mark.parametrize(("argv", "said"), [
    (["--prefill", "http://127.0.0.1:1"], "needs both sides of the pair: --prefill URL and --decode URL"),
    (["--decode", "http://127.0.0.1:1"], "needs both sides of the pair"),
    (["--prefill", "localhost:8100", "--decode", "http://127.0.0.1:1"], "--prefill 'localhost:8100': not an engine's URL"),
    (["--single", "http://127.0.0.1:1/v1"], "--single 'http://127.0.0.1:1/v1': not an engine's URL"),
    (["--single", "http://127.0.0.1:1,http://127.0.0.1:2"], "--single http://127.0.0.1:1,http://127.0.0.1:2: one URL"),
    # the arms are checked before anything is asked of the engines (these URLs answer nothing)
    (["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", "--arms", "single,pair"],
     "the single arm needs --single URL"),
    (["--single", "http://127.0.0.1:1", "--arms", "pair"], "the pair arm needs a pair: --prefill URL and --decode URL"),
    (["--single", "http://127.0.0.1:1", "--arms", "pair-first-token"], "the pair-first-token arm needs a pair"),
    (["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", "--single", "http://127.0.0.1:3",
      "--arms", "two-single"], "the two-single arm needs two colocated instances"),
    (["--profile", "cpu", "--single", "http://127.0.0.1:1"], "--profile is for the engines pdtui launches"),
    (["--model", "tiny", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"],
     "--model is for the engines pdtui launches"),
    (["--model-name", "tiny"], "--model-name is for engines given by URL"),
    (["--decode-reports-cached", "--quick"], "--decode-reports-cached is for engines given by URL"),
])
def test_bad_bench_input_over_engines_is_a_clear_message_and_exit_2(argv: list[str], said: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", *argv]) == 2
    assert said in capsys.readouterr().err


def test_an_unreachable_engine_is_refused_before_launch(capsys: pytest.CaptureFixture[str]) -> None:
    gone = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["bench", "--single", gone, "--proxy-port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "refused before launch" in err and f"S (single) at {gone} does not answer /health" in err


def test_a_single_with_a_connector_or_other_settings_than_the_pair_is_refused_naming_the_field(
        engines: Callable[..., Engine], capsys: pytest.CaptureFixture[str]) -> None:
    p, d, s = started(engines("prefill"), engines("decode"), engines("single", "--kv-role", "kv_both",
                                                                      "--block-size", "64"))
    argv = ["bench", "--prefill", p.url, "--decode", d.url, "--single", s.url, "--proxy-port", str(free_port())]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and f"S (single) at {s.url} has a kv-transfer config (NixlConnector" in err
    assert "the engines disagree on block_size" in err and "P '128', S '64'" in err
    assert "The single arm is the pair's baseline" in err
    assert all(e.proc is not None and e.proc.poll() is None for e in (p, d, s))
    assert httpx.get(f"{s.url}/fake/requests", timeout=5).json() == []  # nothing was sent to it
