"""The notice line's words: one line of a notice, the essential first, and the notices kept whole
for the notices screen (`n`). Plain Python: the app decides what to show, these decide how."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

NOTICES = 50
"""Notices kept whole for the notices screen (the newest first)."""
_CLAUSE_END = re.compile(r";\s|\.\s+(?=[A-Z`])")
"""Where a notice's first clause ends: "; ", or a sentence's end (". " before a capital or a
backtick; not "0.5 s", not "D.log")."""


@dataclass(frozen=True)
class ShownNotice:
    """A notice as the notice line showed it, and whole."""

    t: float
    level: str
    """info | warning | error"""
    text: str
    """The whole notice."""
    line: str
    """What the notice line showed."""


def headline(text: str) -> str:
    """The first clause: who, what and why ("D (decode) died: its VLLM::Worker (pid 1234) died:
    SIGILL ..."); what follows (what to do, where the log is, its last lines) waits for `n`.
    The whole text when it has one clause."""
    m = _CLAUSE_END.search(text)
    return text[:m.start()].rstrip() if m and m.start() > 0 else text


def one_line(text: str, width: int) -> str:
    """The text, if it fits ``width`` columns, else its first clause (which the line cuts with
    an ellipsis if it is still too long)."""
    return text if len(text) <= width else headline(text)


def short_path(path: Path, room: int) -> str:
    """A path in at most ``room`` characters where it can be: ~ for the home folder, then its
    leading folders dropped for "…/" (the last part stays whole, however long)."""
    try:
        shown = "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        shown = str(path)
    parts = path.parts
    keep = len(parts) - 1
    while len(shown) > room and keep >= 1:
        shown = "…/" + "/".join(parts[-keep:])
        keep -= 1
    return shown


def file_line(prefix: str, path: Path, width: int) -> str:
    """``prefix`` and a file's path in ``width`` columns where it can be: the whole path (~ for
    home), else the file's name "in" its folder, shortened from the left."""
    whole = prefix + short_path(path, 10**6)
    if len(whole) <= width:
        return whole
    head = f"{prefix}{path.name} in "
    return head + short_path(path.parent, max(1, width - len(head)))
