"""The core must not import the UI (STYLE.md: a clean core with no UI, a thin app)."""

import subprocess
import sys


def test_core_imports_no_textual():
    code = (
        "import sys\n"
        "import pdtui.core.runtime, pdtui.core.proxy, pdtui.core.supervisor, pdtui.core.config, pdtui.cli\n"
        "import pdtui.bench.workload, pdtui.bench.runners, pdtui.bench.report, pdtui.bench.command\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'textual_plotext', 'plotext'))\n"
        "assert not bad, bad\n"
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
