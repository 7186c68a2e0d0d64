"""The notice line's words: one line of a notice, the essential first, and the notices kept whole
for the notices screen (`n`). Plain Python: the app decides what to show, these decide how."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
