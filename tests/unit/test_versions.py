"""`pdtui --version`: pdtui's version and the engines', from their metadata."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

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
