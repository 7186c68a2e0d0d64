from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from pdtui.app.notices import ShownNotice

LEVEL_STYLE = {"info": "dim", "warning": "yellow", "error": "bold red"}


class NoticesScreen(ModalScreen[None]):
    """The last notices whole, newest first, wrapped: what the one-line notice leaves out (the
    cause in full, what to do, where the log is, its last lines). `n` or Esc closes it; the
    arrows and page keys scroll it."""

    DEFAULT_CSS = """
    NoticesScreen { align: center middle; }
    NoticesScreen > VerticalScroll {
        width: 100%; height: 1fr; border: round $primary; background: $surface; padding: 0 1;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
        Binding("n", "close", "Close", show=False),
    ]

    def __init__(self, notices: Sequence[ShownNotice], *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.notices = tuple(notices)

    def compose(self) -> ComposeResult:
        scroll = VerticalScroll(id="notices-scroll")
        scroll.border_title = "Notices, the newest first (n or Esc closes)"
        with scroll:
            yield Static(self.render_notices(), id="notices-text")
        yield Footer()

    def render_notices(self) -> Text:
        if not self.notices:
            return Text("No notice yet.", style="dim")
        t = Text()
        for n, notice in enumerate(reversed(self.notices)):
            if n:
                t.append("\n\n")
            t.append(f"{time.strftime('%H:%M:%S', time.localtime(notice.t))} {notice.level} ",
                     style=LEVEL_STYLE.get(notice.level, ""))
            t.append(notice.text)
        return t

    def action_close(self) -> None:
        self.dismiss(None)
