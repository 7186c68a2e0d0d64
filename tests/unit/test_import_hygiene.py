"""The import contract (STYLE.md: a clean core with no UI, a thin app), checked two ways.

Statically, over every module's source (imports inside functions included):
- ``pdtui.core`` never imports textual, rich, plotext, the app (``pdtui.app``), vLLM, NIXL, torch
  or the engine side (``pdtui.engine``);
- ``pdtui.engine`` (code that runs INSIDE the vLLM processes) imports only the standard library,
  vLLM, NIXL, itself and the few stdlib-only core modules in ``ENGINE_MAY_IMPORT``;
- nothing outside ``pdtui.engine`` imports it (the core names its modules as strings).
And at run time: importing the core, the CLI and the bench loads neither textual nor plotext nor vLLM
(not rich: httpx imports it for its own command line when it is installed).

The maintained benchmarks (scripts/bench/) import nothing from tests/ and use no private name of
pdtui, imported or read off a module (two proxy benchmarks excepted, for the proxy's modules only,
until the proxy package gives what they time public names).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pdtui

PKG = Path(pdtui.__file__).resolve().parent
CORE_NEVER = ("textual", "textual_plotext", "plotext", "rich", "pdtui.app", "pdtui.engine", "vllm", "nixl",
              "nixl_cu12", "nixl_cu13", "torch")
ENGINE_MAY_IMPORT = ("pdtui.core.versions", "pdtui.core.connectors")
ENGINE_THIRD_PARTY = ("vllm", "nixl", "nixl_cu12", "nixl_cu13")


def _module_name(path: Path) -> str:
    if not path.is_relative_to(PKG.parent):
        return path.stem
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import statement in the file, relative ones resolved."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pdtui.core import config` imports pdtui.core.config; `from pdtui.core.versions import
            # installed_vllm` is seen as pdtui.core.versions.installed_vllm, under pdtui.core.versions
            out += [(node.lineno, f"{mod}.{a.name}" if mod.startswith("pdtui") else mod) for a in node.names]
    return out


def _under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _violations(folder: str, ok) -> list[str]:
    bad = []
    for path in sorted((PKG / folder).rglob("*.py") if folder else PKG.rglob("*.py")):
        for line, mod in imports_of(path):
            if not ok(path, mod):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {mod}")
    return bad


def test_core_imports_no_ui_no_app_no_vllm_no_engine():
    bad = _violations("core", lambda path, mod: not _under(mod, CORE_NEVER))
    assert not bad, "the core must stay UI-free and vLLM-free:\n" + "\n".join(bad)


def test_engine_side_imports_only_stdlib_vllm_nixl():
    def ok(path, mod):
        top = mod.split(".")[0]
        return (top in sys.stdlib_module_names or top in ENGINE_THIRD_PARTY or _under(mod, ("pdtui.engine",))
                or _under(mod, ENGINE_MAY_IMPORT) or mod == "__future__")
    bad = _violations("engine", ok)
    assert not bad, "engine-side modules run inside vLLM; keep them apart from the core:\n" + "\n".join(bad)


def test_core_modules_the_engine_may_import_are_stdlib_only():
    for name in ENGINE_MAY_IMPORT:
        path = PKG.parent / (name.replace(".", "/") + ".py")
        bad = [mod for _, mod in imports_of(path) if mod.split(".")[0] not in sys.stdlib_module_names
               and mod != "__future__"]
        assert not bad, f"{name} is imported inside vLLM's processes: standard library only, not {bad}"


def test_nothing_outside_the_engine_side_imports_it():
    def ok(path, mod):
        return path.is_relative_to(PKG / "engine") or not _under(mod, ("pdtui.engine",))
    bad = _violations("", ok)
    assert not bad, "pdtui's own process must not import pdtui.engine (it imports vLLM):\n" + "\n".join(bad)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    # the static checks above are only as good as imports_of(): a lazy import must be seen
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from textual.app import App\n    import vllm.config\n    return App\n")
    assert [m for _, m in imports_of(probe)] == ["textual.app", "vllm.config"]


def test_core_imports_no_textual():
    code = (
        "import sys\n"
        "import pdtui.core.runtime, pdtui.core.proxy, pdtui.core.supervisor, pdtui.core.config, pdtui.cli\n"
        "import pdtui.core.preflight, pdtui.core.control\n"
        "import pdtui.bench.workload, pdtui.bench.runners, pdtui.bench.report\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'textual_plotext', 'plotext'))\n"
        "assert not bad, bad\n"
        "assert not [m for m in sys.modules if m.startswith(('pdtui.app', 'pdtui.engine'))]\n"
        "import pdtui.bench.command\n"
        "assert 'vllm' not in sys.modules, 'the core must not import vllm (it runs in the children)'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_never_imports_textual_even_when_plotting(tmp_path):
    code = (
        "import sys\n"
        "from pdtui.bench import report\n"
        "report.terminal_histograms({'arms': {}})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'textual_plotext'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----- the maintained benchmarks (scripts/bench/) ------------------------------------------------
BENCH_SCRIPTS = PKG.parent / "scripts" / "bench"
PROXY_PRIVATE_FOR_NOW = {"usage_check_cost.py", "chat_relay_cost.py"}
"""They time the proxy's own relay classes, which have no public names yet; the proxy package
(issue 21, its owner) gives them some. Until then they may name private names of the proxy's
modules (PROXY_MODULES), and nothing else private."""
PROXY_MODULES = ("pdtui.core.proxy",)  # the package: its modules are pdtui.core.proxy.*


def _private(name: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


def bench_script_violations(path: Path) -> list[str]:
    """What in a maintained benchmark reaches into tests/ or into pdtui's private names: imports, and
    attributes read off a pdtui module it imported (``proxy._SseScan``)."""
    tree = ast.parse(path.read_text(), str(path))
    allowed = PROXY_MODULES if path.name in PROXY_PRIVATE_FOR_NOW else ()
    modules: dict[str, str] = {}  # local name -> the pdtui module it is bound to
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname or "." not in a.name:
                    modules[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                modules[a.asname or a.name] = f"{node.module}.{a.name}"
    for line, mod in imports_of(path):
        if _under(mod, ("tests",)):
            bad.append(f"{path.name}:{line} imports {mod} (a benchmark is not a test: nothing from tests/)")
        elif _under(mod, ("pdtui",)) and _private(mod) and not _under(mod.rpartition(".")[0], allowed):
            bad.append(f"{path.name}:{line} imports the private {mod}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr)
                and _under(modules.get(node.value.id, ""), ("pdtui",))
                and not _under(modules[node.value.id], allowed)):
            bad.append(f"{path.name}:{node.lineno} reads the private {modules[node.value.id]}.{node.attr}")
    return bad


def test_maintained_benchmarks_import_nothing_from_tests_and_no_private_names_of_pdtui():
    scripts = sorted(BENCH_SCRIPTS.glob("*.py"))
    assert len(scripts) >= 5, f"the maintained benchmarks are in {BENCH_SCRIPTS}"
    bad = [v for path in scripts for v in bench_script_violations(path)]
    assert not bad, "scripts/bench/ is maintained: public pdtui names only, nothing from tests/:\n" + "\n".join(bad)
    assert PROXY_PRIVATE_FOR_NOW <= {p.name for p in scripts}


def test_the_benchmark_check_sees_tests_private_imports_and_private_attributes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from tests.fakes import FakeVllm\nfrom pdtui.core.events import _Secret\n"
                     "from pdtui.core import events\nevents._hub\nfrom pdtui.core import proxy\nproxy._SseScan\n")
    assert [v.split(" ", 1)[1] for v in bench_script_violations(probe)] == [
        "imports tests.fakes (a benchmark is not a test: nothing from tests/)",
        "imports the private pdtui.core.events._Secret", "reads the private pdtui.core.events._hub",
        "reads the private pdtui.core.proxy._SseScan"]
    allowed = tmp_path / "usage_check_cost.py"
    allowed.write_text("from pdtui.core import proxy\nproxy._SseScan\nfrom pdtui.core.proxy import _Trace\n"
                       "from pdtui.core import events\nevents._hub\n")
    assert [v.split(" ", 1)[1] for v in bench_script_violations(allowed)] == ["reads the private pdtui.core.events._hub"]
