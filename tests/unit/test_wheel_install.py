"""pdtui installed from a wheel (not editable) finds its launch profiles from any folder.

The wheel is built from a copy of the repo's package files (``pip wheel --no-deps``, with this
venv's setuptools: no network), installed with ``--no-deps --target`` into a temporary folder, and
run from another temporary folder with only that folder on PYTHONPATH (this venv gives the
dependencies). About 10 s on 2 cores.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(argv, **kw):
    out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=240, **kw)
    assert out.returncode == 0, f"{argv} exited {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def test_wheel_install_runs_pdtui_config_from_another_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "pdtui", src / "pdtui", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "launch", src / "launch", ignore=ignore)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
          str(src)])
    (wheel,) = wheels.glob("pdtui-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    profiles = sorted(n for n in names if n.startswith("pdtui/profiles/"))
    assert profiles == sorted(f"pdtui/profiles/{p.name}" for p in (ROOT / "launch").glob("*.toml")), profiles
    assert "pdtui/app/pdtui.tcss" in names and "pdtui/engine/nixl_quiet.py" in names

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PDTUI_HOME": str(tmp_path / "home")}
    env = {k: v for k, v in env.items() if not k.startswith("PDTUI_") or k == "PDTUI_HOME"}

    where = _run([sys.executable, "-c", "import pdtui; print(pdtui.__file__)"], cwd=elsewhere, env=env)
    assert Path(where.stdout.strip()).resolve() == (site / "pdtui" / "__init__.py").resolve()

    out = _run([sys.executable, "-m", "pdtui", "config", "--profile", "cpu", "--json"], cwd=elsewhere, env=env)
    assert json.loads(out.stdout)["config"]["profile"] == "cpu"
    assert "pdtui.engine.vllm_entry" in out.stdout and str(site) in out.stdout  # the engines run this copy
