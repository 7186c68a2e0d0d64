"""The AMX tile-state request every engine process makes (pdtui.engine.amx), and where it is made.

This machine may have no AMX: the CPUs are given as /proc/cpuinfo text and the syscall is a fake
that records its arguments (named as such). What a real AMX CPU does with and without the request
is in results/2026-12-07-amx/ (a probe run on the device machine's Xeon).
"""

from __future__ import annotations

import io
import subprocess
import sys

from pdtui.core import cpu
from pdtui.engine import amx

SAPPHIRE = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
            "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n")
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n"


class FakeSyscall:
    """A fake arch_prctl: records each call, answers rc (and errno)."""

    def __init__(self, rc: int = 0, err: int = 0) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.rc, self.err = rc, err

    def __call__(self, nr: int, code: int, arg: int) -> int:
        self.calls.append((nr, code, arg))
        return self.rc

    def errno(self) -> int:
        return self.err


def test_amx_cpu_asks_for_xtiledata_and_says_so() -> None:
    fake, out = FakeSyscall(), io.StringIO()
    got = amx.request(cpuinfo=SAPPHIRE, syscall=fake, errno=fake.errno, machine="x86_64", env={}, out=out)
    assert got == "granted"
    assert fake.calls == [(158, 0x1023, 18)]  # arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    assert out.getvalue().startswith(amx.MARK + " granted")


def test_no_amx_asks_nothing_and_prints_nothing() -> None:
    fake, out = FakeSyscall(), io.StringIO()
    assert amx.request(cpuinfo=EPYC, syscall=fake, machine="x86_64", env={}, out=out) == "no-amx"
    assert amx.request(cpuinfo=SAPPHIRE, syscall=fake, machine="aarch64", env={}, out=out) == "no-amx"
    assert fake.calls == [] and out.getvalue() == ""


def test_a_refusal_is_printed_with_its_errno_and_the_way_around() -> None:
    fake, out = FakeSyscall(rc=-1, err=22), io.StringIO()
    got = amx.request(cpuinfo=SAPPHIRE, syscall=fake, errno=fake.errno, machine="x86_64", env={}, out=out)
    assert got == "refused: Invalid argument"
    assert "SIGILL" in out.getvalue() and "PDTUI_DTYPE=float16" in out.getvalue()


def test_the_request_can_be_turned_off_to_reproduce_the_crash() -> None:
    fake, out = FakeSyscall(), io.StringIO()
    got = amx.request(cpuinfo=SAPPHIRE, syscall=fake, machine="x86_64", env={amx.ENV_OFF: "0"}, out=out)
    assert got == "skipped" and fake.calls == [] and "not requested" in out.getvalue()


def test_this_machine_real_request_matches_its_cpu() -> None:
    """The real syscall on this machine: granted where the CPU has AMX tiles, nothing asked elsewhere."""
    out = io.StringIO()
    got = amx.request(env={}, out=out)
    assert got == ("granted" if cpu.read().amx else "no-amx"), out.getvalue()


def _entry_calls_request(run_name: str) -> str:
    code = ("import pdtui.engine.amx as a, runpy\n"
            "calls = []\n"
            "a.request = lambda: calls.append(1) or 'fake'\n"
            "import sys; sys.argv = ['vllm_entry']\n"
            f"runpy.run_module('pdtui.engine.vllm_entry', run_name={run_name!r})\n"
            "print('calls', len(calls))\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr


def test_every_engine_process_makes_the_request_at_import() -> None:
    """The API server runs vllm_entry as __main__; spawn/forkserver children (EngineCore, workers)
    re-import it as __mp_main__: both make the request before importing vLLM. A plain import
    (pdtui's own process, tests) does not."""
    assert "calls 1" in _entry_calls_request("__mp_main__")
    assert "calls 0" in _entry_calls_request("pdtui_plain_import")


def test_engines_start_with_faulthandler_on() -> None:
    from pdtui.core import config

    cfg = config.load_profile("cpu")
    for spec in config.render(cfg):
        assert spec.env.get("PYTHONFAULTHANDLER") == "1", spec.name


def test_cpu_features_and_attention_path() -> None:
    xeon, epyc = cpu.read(SAPPHIRE, arch="x86_64"), cpu.read(EPYC, arch="x86_64")
    assert xeon.model.startswith("Intel") and xeon.amx and xeon.avx512 and xeon.bf16
    assert not epyc.amx and not epyc.avx512 and not epyc.bf16
    assert cpu.attention_path(xeon, "bfloat16", 128).startswith("amx")
    assert cpu.attention_path(xeon, "float16", 128).startswith("vec (AVX-512")
    assert cpu.attention_path(epyc, "bfloat16", 128).startswith("vec (AVX2")
    assert cpu.attention_path(xeon, "bfloat16", 16).startswith("vec16")
    assert cpu.attention_path(xeon, "bfloat16", 128, head_size=80).startswith("vec16")
    assert "AMX yes (amx_tile, amx_bf16, amx_int8)" in xeon.features()


def test_the_core_names_the_same_switch_as_the_engine_side() -> None:
    # preflight (the core) may not import pdtui.engine: it keeps its own copy of the name
    assert cpu.AMX_REQUEST_ENV == amx.ENV_OFF == "PDTUI_AMX_REQUEST"
