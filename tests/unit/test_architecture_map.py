"""docs/architecture.md's module map names every module under pdtui/, each with a line on what it
holds, and names none that is gone: a module added, moved or removed without the map fails here.

The map is the first fenced block after "## Module map". A line whose first word is a folder path
(``pdtui/core/``) names that package (its ``__init__.py``) and makes it the current folder; an
indented line whose first word is a file name (``config.py``) names that file in the current
folder; a line whose first word is a path (``pdtui/cli.py``) names that file. Other lines (their
continuations, launch/, results/, ...) are not read."""

from __future__ import annotations

import re
from pathlib import Path

import pdtui

PKG = Path(pdtui.__file__).resolve().parent
ROOT = PKG.parent
DOC = ROOT / "docs" / "architecture.md"


def map_block(text: str) -> list[str]:
    after = text.split("## Module map", 1)
    assert len(after) == 2, "docs/architecture.md has no '## Module map' section"
    m = re.search(r"^```[^\n]*\n(.*?)^```", after[1], re.DOTALL | re.MULTILINE)
    assert m, "the module map is a fenced block after '## Module map'"
    return m.group(1).splitlines()


def named_in_map(lines: list[str]) -> dict[str, str]:
    """{module path relative to the repository ("pdtui/core/config.py", "pdtui/core/"): its line's text}."""
    named: dict[str, str] = {}
    folder: str | None = None
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        if re.fullmatch(r"pdtui(/\w+)*/", word):
            folder = word
            named[word] = rest.strip()
        elif re.fullmatch(r"pdtui(/\w+)*/\w+\.py", word):
            named[word] = rest.strip()
        elif line.startswith(" ") and re.fullmatch(r"\w+\.py", word) and folder is not None:
            named[folder + word] = rest.strip()
        elif not line.startswith(" ") and not word.startswith("pdtui"):
            folder = None  # launch/, results/, ...: files under them are not pdtui's modules
    return named


def modules_in_tree() -> set[str]:
    """Every module of the package: a file, or a folder for its __init__.py."""
    out = set()
    for path in PKG.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(ROOT).as_posix()
        out.add(rel[: -len("__init__.py")] if path.name == "__init__.py" else rel)
    return out


def test_every_module_under_pdtui_is_in_the_map_and_every_name_in_the_map_is_a_module():
    named = named_in_map(map_block(DOC.read_text()))
    tree = modules_in_tree()
    missing = sorted(tree - set(named))
    gone = sorted(set(named) - tree)
    assert not missing, f"docs/architecture.md's module map does not name: {missing}"
    assert not gone, f"docs/architecture.md's module map names modules that do not exist: {gone}"


def test_each_module_in_the_map_says_what_it_holds():
    named = named_in_map(map_block(DOC.read_text()))
    empty = sorted(name for name, text in named.items() if len(text) < 10)
    assert not empty, f"the module map names these without a line on what they hold: {empty}"


def test_the_reader_of_the_map():
    lines = map_block("x\n## Module map\n\ntext\n```\npdtui/               the package\n"
                      "  cli.py             the CLI\n"
                      "                     its continuation, cli.py named in words\n"
                      "pdtui/core/          the core\n"
                      "  config.py          PairConfig\n"
                      "pdtui/app/widgets/   widgets\n"
                      "  header.py          the header\n"
                      "pdtui/bench/fake.py  a fake, by its path\n"
                      "launch/*.toml        profiles\n"
                      "  cpu.py             not pdtui's\n"
                      "```\nafter\n")
    assert named_in_map(lines) == {
        "pdtui/": "the package", "pdtui/cli.py": "the CLI", "pdtui/core/": "the core",
        "pdtui/core/config.py": "PairConfig", "pdtui/app/widgets/": "widgets",
        "pdtui/app/widgets/header.py": "the header", "pdtui/bench/fake.py": "a fake, by its path"}
    assert "pdtui/core/" in modules_in_tree() and "pdtui/core/config.py" in modules_in_tree()
