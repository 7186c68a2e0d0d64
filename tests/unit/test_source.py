"""The written contract (pdtui.core.source.Source): the live Runtime, the Replay, the RemoteSource,
the functional tests' fake and the benchmarks' BenchRuntime each have every member it names (their controls every member of
Controls), and the app and Control probe nothing."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from pdtui.core import config as config_mod
from pdtui.core import source, topology
from pdtui.core.remote import RemoteSource
from pdtui.core.replay import Replay
from pdtui.core.runtime import Runtime
from scripts.bench.bench_refresh import BenchRuntime
from tests.functional.fake_runtime import FakeRuntime

ROOT = Path(__file__).resolve().parents[2]
RECORDING = ROOT / "tests" / "fixtures" / "recordings" / "cpu-pair-short.jsonl"


def _members(proto: type) -> set[str]:
    return {n for n in vars(proto) if not n.startswith("_")}


@pytest.fixture(scope="module")
def live() -> Runtime:
    return Runtime(topology.pair(config_mod.shift_ports(config_mod.load_profile("cpu"), 44000)), serve_control=False)


def test_every_source_has_every_member_of_the_protocol(live: Runtime) -> None:
    for src in (live, Replay(RECORDING, speed=0), FakeRuntime(), RemoteSource(Path("/nonexistent.sock")),
                BenchRuntime()):  # scripts/bench's, under the dashboard in the refresh and tail benchmarks
        missing = [m for m in _members(source.Source) if not hasattr(src, m)]
        assert not missing, f"{type(src).__name__} lacks {missing}"
        lacks = [m for m in _members(source.Controls) if not hasattr(src.control, m)]
        assert not lacks, f"{type(src).__name__}'s control lacks {lacks}"
        for name, inst in src.instances.items():
            lacks = [m for m in _members(source.InstanceView) if not hasattr(inst, m)]
            assert not lacks, f"{type(src).__name__}'s instance {name} lacks {lacks}"
        assert isinstance(src.run, source.RunInfo)
        assert inspect.signature(src.kill).parameters.get("reason") is not None


def test_a_replay_carries_the_live_run_kv_geometry(tmp_path: Path, live: Runtime) -> None:
    """The geometry travels in RuntimeStarted: a replay shows the same freight formula."""
    from pdtui.core.events import RuntimeStarted

    rec = tmp_path / "run.jsonl"
    live.emit(RuntimeStarted(profile="cpu", model="tiny", model_shape="tiny", connector="NixlConnector", device="cpu",
                             proxy_url=live.run.proxy_url, vllm_version=None,
                             kv_bytes_per_token=live.geometry.bytes_per_token, block_size=128,
                             kv_load_failure_policy="fail", instances=[],
                             kv_geometry=__import__("dataclasses").asdict(live.geometry)))
    rec.write_text(live.history[-1].to_json() + "\n")
    assert Replay(rec, speed=0).geometry == live.geometry


def test_the_app_and_control_never_probe_the_runtime() -> None:
    """0 getattr/hasattr in app/ and core/control.py on the runtime, its instances or its config."""
    files = [*sorted((ROOT / "pdtui" / "app").rglob("*.py")), ROOT / "pdtui" / "core" / "control.py"]
    found = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
                target = ast.unparse(node.args[0]) if node.args else ""
                if f.name != "gpu.py" and ("runtime" in target or "inst" in target or "cfg" in target
                                           or "rt" == target or "control" in target):
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found
