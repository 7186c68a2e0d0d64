"""What this machine's CPU can do, as vLLM's CPU kernels decide it (standard library only).

vLLM's CPU backend picks its kernels by the CPU: the attention kernel by AMX, AVX-512 and the
dtype (``vllm/v1/attention/backends/cpu_attn.py`` ``_get_attn_isa``, vLLM 0.32.0), the matmuls by
oneDNN at run time. A pass on one machine proves nothing about another (docs/amx.md: the pair
died with SIGILL on AMX Xeons only), so preflight says which path this machine takes, and the
engine side (``pdtui.engine.amx``) asks Linux for the AMX tile state where the CPU has it.

Everything here reads ``/proc/cpuinfo`` (or the text given), so tests can pass any CPU's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

AMX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8")
"""The kernel's names for AMX (``/proc/cpuinfo`` flags); ``amx_tile`` is the one tiles need."""

AMX_REQUEST_ENV = "PDTUI_AMX_REQUEST"
"""``pdtui.engine.amx.ENV_OFF`` (the core does not import the engine side): ``0`` in an engine's
environment skips its AMX tile-state request, to reproduce the SIGILL."""


@dataclass(frozen=True)
class CpuInfo:
    model: str
    """The ``model name`` line (``lscpu``'s Model name), e.g. "AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+"."""
    flags: frozenset[str]
    arch: str = "x86_64"

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def amx(self) -> bool:
        """AMX tiles: what vLLM's ``torch.cpu._is_amx_tile_supported()`` asks."""
        return "amx_tile" in self.flags

    @property
    def bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX512_BF16 or AMX_BF16); without it bf16 is emulated."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    def features(self) -> str:
        """One line: the features that choose vLLM's CPU kernels, present or absent."""
        def yes(b: bool) -> str:
            return "yes" if b else "no"

        return (f"AVX-512 {yes(self.avx512)}, AMX {yes(self.amx)}"
                + (f" ({', '.join(f for f in AMX_FLAGS if f in self.flags)})" if self.amx else "")
                + f", bf16 in hardware {yes(self.bf16)}, AVX2 {yes('avx2' in self.flags)}")


def read(text: str | None = None, arch: str | None = None) -> CpuInfo:
    """This machine's CPU (or the one ``text``, a /proc/cpuinfo, describes)."""
    import platform

    if text is None:
        try:
            text = CPUINFO.read_text(errors="replace")
        except OSError:
            text = ""
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model=model or "unknown", flags=flags, arch=arch or platform.machine())


def attention_path(cpu: CpuInfo, dtype: str, block_size: int, head_size: int | None = None) -> str:
    """The attention kernel vLLM 0.32.0's CPU backend will take (``_get_attn_isa``), and why.

    ``amx`` when the CPU has AMX tiles, the dtype is bf16 and the block size is a multiple of 32;
    else ``vec`` (AVX-512 or AVX2 vectors) for blocks of a multiple of 32; else ``vec16``; a head
    size that is a multiple of 16 but not of 32 always takes ``vec16``. Non-x86 paths (neon,
    vsx, ...) are named by the architecture. Returns e.g. ``"amx (AMX tiles, bf16, block 128)"``.
    """
    if head_size is not None and head_size % 32 != 0 and head_size % 16 == 0:
        return f"vec16 (head size {head_size} is not a multiple of 32)"
    is_bf16 = dtype in ("bfloat16", "bf16")
    if cpu.amx and is_bf16 and block_size % 32 == 0:
        return f"amx (AMX tiles: the CPU has them, dtype bfloat16, block {block_size} a multiple of 32)"
    if cpu.arch in ("aarch64", "arm64"):
        return "neon (Arm)"
    if block_size % 32 == 0:
        why = ("no AMX on this CPU" if not cpu.amx else f"dtype {dtype}, AMX needs bfloat16")
        return f"vec ({'AVX-512' if cpu.avx512 else 'AVX2'} vectors; {why})"
    return f"vec16 (block {block_size} is not a multiple of 32)"
