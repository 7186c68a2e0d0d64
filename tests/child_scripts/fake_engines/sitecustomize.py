"""Fake engines under a real `pdtui` process, for tests (not vLLM): put this folder on PYTHONPATH
and set PDTUI_FAKE_ENGINES to a mode of tests/child_scripts/fake_server.py (ready, pd, crash, ...)
or to ``never`` (a process that never gets ready). Python imports ``sitecustomize`` at start;
this one waits for ``pdtui.core.runtime`` to be imported and then makes its Runtime launch
fake_server.py for each instance instead of vLLM.

Why not `python -c` with the patch inline (tests/unit/test_control.py's FAKE_ENGINES): `pdtui up
--detach` starts its service as `python -m pdtui up --headless ...`, a process the test does not
spawn itself; the environment is what reaches it.
"""

import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path

FAKE_SERVER = Path(__file__).resolve().parents[1] / "fake_server.py"


def _patch(runtime) -> None:
    from pdtui.core.config import LaunchSpec

    mode = os.environ["PDTUI_FAKE_ENGINES"]

    class FakeEngines(runtime.Runtime):
        def __init__(self, cfg, **kw):
            super().__init__(cfg, **kw)
            for name, inst in self.instances.items():
                argv = ([sys.executable, str(FAKE_SERVER), str(inst.port), mode] if mode != "never"
                        else [sys.executable, "-c", "import time; time.sleep(120)"])
                inst.spec = LaunchSpec(name, inst.role, argv, {}, inst.url)

    runtime.Runtime = FakeEngines


class _Loader(importlib.abc.Loader):
    def __init__(self, real) -> None:
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module) -> None:
        self.real.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pdtui.core.runtime":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if os.environ.get("PDTUI_FAKE_ENGINES"):
    sys.meta_path.insert(0, _Finder())
