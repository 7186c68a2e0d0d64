from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.cache import LRUCache
from textual.geometry import Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from pdtui.app.messages import RequestSelected
from pdtui.app.state import REQUESTS, fmt_num, itl_stats, mib, transfer_ms
from pdtui.core.events import RequestTraced

OUTCOME_STYLE = {"pair": "green", "fallback": "yellow", "error": "bold red"}
MIGRATED_STYLE = "bold magenta"
"""The stream went on on another D after its D died (RequestTraced.migrated)."""
RECOMPUTE_STYLE = "bold red"
"""A paired request whose D computed more than one block of the prompt (RequestTraced.recomputed): the whole row."""
COLUMNS = ("id", "prompt", "blk", "MiB", "P ms", "D TTFT", "TTFT", "ITL p50/max", "outcome")


OUTCOME_WIDTH = len("fallback")


def outcome_cell(r: RequestTraced, handshake: bool = False) -> Text:
    """The outcome, then why for an error or a fallback (the status, the proxy's reason); "+hs"
    for the request that paid the NIXL handshake."""
    style = OUTCOME_STYLE.get(r.outcome, "")
    if r.recomputed:  # paired, yet D computed the prompt: an error class of its own
        return Text(f"recompute: D computed {r.d_computed_tokens:,} of {fmt_num(r.prompt_tokens, ',')} prompt tokens",
                    style=RECOMPUTE_STYLE)
    if handshake:
        return Text.assemble((r.outcome, style), (" +hs", "bold magenta"))
    if r.migrated and r.outcome != "error":
        return Text.assemble((r.outcome, style), (f" {migration_words(r)}", MIGRATED_STYLE))
    if r.outcome == "error":
        t = Text(f"error {r.status}", style=style)
        if r.error:
            t.append(f" {r.error[:80]}", style="red")
        return t
    t = Text(r.outcome, style=style)
    if r.outcome == "fallback" and r.fallback_reason:
        t.append(f" {r.fallback_reason}", style="yellow")
    return t


def migration_words(r: RequestTraced) -> str:
    """The path of a migrated stream: "migrated D1→D2 @37 seam 250 ms" (each migration that went on)."""
    legs = [m for m in r.migrations if m.get("result") == "ok"]
    return "migrated " + ", ".join(f"{m['from']}→{m['to']} @{m.get('tokens', '?')} seam {fmt_num(m.get('seam_ms'))} ms"
                                   for m in legs)


def transfers_cell(r: RequestTraced, own: str, key: str, spec: str = ".0f") -> str:
    """A transfer's figure, then each migration's second transfer after a "+" (blocks, or MiB from
    kv_bytes): "2+2"."""
    more = [m.get(key) for m in r.migrations if m.get("result") == "ok" and m.get("path") == "prefill"]
    if not more:
        return own
    div = 2**20 if key == "kv_bytes" else 1
    return "+".join([own, *(fmt_num(v / div if isinstance(v, int | float) else None, spec) for v in more)])


class TransfersTable(ScrollView, can_focus=True):
    """Recent requests, newest last; the row under the cursor is the one the detail pane shows.

    Columns are named after the trace's fields they show: "P ms" prefill_ms, "D TTFT" decode_ttft_ms
    (D's first token from the proxy's request to D, KV pull included), "TTFT" ttft_ms (the client's:
    P leg + hop + D leg). The table keeps the ``REQUESTS`` newest requests, as
    the state does; the cursor follows the newest unless moved off it. Once full, the table's size
    no longer changes (a new row drops the oldest), so a new request repaints it without a layout of
    the screen.

    The view follows the newest row while it shows it (``tail``), whether or not the cursor is on
    it: a burst of new rows (a drill's errors) comes on the screen, while the cursor stays on the
    request it was moved to (and the detail with it), even if that row scrolls off the top. Only
    a scroll that takes the newest row off the screen (the arrows or page keys past the top,
    Home, the wheel, the scrollbar) stops it; End, or scrolling back down to the newest row,
    starts it again.

    A line-API widget rather than a DataTable: a request never changes once traced, so its row is
    rendered once, when it arrives, and a repaint only crops and styles cached strips. DataTable
    re-rendered every visible cell through Rich on each added row (its caches are keyed on a counter
    that add_row bumps): 50 ms of CPU per repaint at 160x48, the dashboard's hot spot
    (scripts/bench/bench_refresh.py, docs/dashboard.md).

    Posts ``RequestSelected`` when the cursor lands on another request (keys, mouse, following).
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {"transfers--header", "transfers--even-row", "transfers--cursor"}
    DEFAULT_CSS = """
    TransfersTable {
        height: 1fr;
        background: $surface;
        color: $foreground;
        & > .transfers--header { text-style: bold; background: $panel; color: $foreground; }
        & > .transfers--even-row { background: $surface-lighten-1 50%; }
        &:dark > .transfers--even-row { background: $surface-darken-1 40%; }
        & > .transfers--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
        &:focus {
            background-tint: $foreground 5%;
            & > .transfers--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
        }
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "cursor_to(0)", "First", show=False),
        Binding("end", "cursor_to(-1)", "Newest", show=False),
        Binding("enter", "select", "Show", show=False),
    ]

    cursor_row: reactive[int] = reactive(0)
    """Index of the highlighted row (0 = oldest shown)."""
    tail: bool = True
    """The view follows the newest row (it is on the screen, and new rows scroll it up): off once
    a scroll takes the newest row off the screen, on again once one brings it back."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._keys: list[str] = []
        self._rows: dict[str, tuple[str | Text, ...]] = {}
        self._widths = [cell_len(c) for c in COLUMNS]
        self._plain: dict[str, Strip] = {}
        """request id -> its row, rendered once at the current column widths, unstyled."""
        self._styled: LRUCache[tuple[str, Style, int], Strip] = LRUCache(1024)
        self._selected: str | None = None
        self._wrong: set[str] = set()
        """Rows marked by the correctness witness (mark_wrong)."""
        self._own_scroll = False
        """The table is moving its own view (new rows): not a scroll that says where to look."""

    # ----- data ---------------------------------------------------------------------------
    @property
    def row_count(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> tuple[str, ...]:
        """Request ids shown, oldest first."""
        return tuple(self._keys)

    def get_row(self, key: str) -> tuple[str | Text, ...]:
        return self._rows[key]

    @staticmethod
    def row_of(r: RequestTraced, handshake: bool = False) -> tuple[str | Text, ...]:
        p50, mx = itl_stats(r)
        cells = (
            r.request_id.removeprefix("pdtui-")[:10],
            fmt_num(r.prompt_tokens, ","),
            transfers_cell(r, fmt_num(r.blocks), "blocks"),
            transfers_cell(r, fmt_num(mib(r.kv_bytes), ".2f"), "kv_bytes", ".2f"),
            fmt_num(r.prefill_ms, ".0f"),
            fmt_num(transfer_ms(r), ".0f"),
            fmt_num(r.ttft_ms, ".0f"),
            f"{fmt_num(p50, '.1f')}/{fmt_num(mx, '.1f')}" if p50 is not None else "-",
            outcome_cell(r, handshake),
        )
        if r.recomputed:  # a red row
            return tuple(c if isinstance(c, Text) else Text(c, style=RECOMPUTE_STYLE) for c in cells)
        return cells

    def mark_wrong(self, wrong: Mapping[str, str]) -> None:
        """Rows whose answer the correctness witness found wrong (Snapshot.wrong_answers): red, every
        cell, the outcome cell saying how; a row not shown yet is marked when it comes."""
        changed = False
        for key, words in wrong.items():
            cells = self._rows.get(key)
            if cells is None or key in self._wrong:
                continue
            self._wrong.add(key)
            self._rows[key] = (*(c if isinstance(c, Text) else Text(c, style=RECOMPUTE_STYLE) for c in cells[:-1]),
                               Text(words, style=RECOMPUTE_STYLE))
            self._plain.pop(key, None)
            changed = True
        if changed:
            self._styled.clear()
            self.refresh()

    def update(self, requests: Sequence[RequestTraced], handshakes: Mapping[str, str] | None = None) -> None:
        """Add the requests newer than the newest row (``requests`` is oldest first); past REQUESTS
        rows, drop the oldest. Only what comes after the newest row is new."""
        start = 0
        if self._keys:
            newest = self._keys[-1]
            start = next((i + 1 for i in range(len(requests) - 1, -1, -1) if requests[i].request_id == newest), 0)
        new = requests[start:]
        if not new:
            return
        follow = not self._keys or self.cursor_row >= len(self._keys) - 1
        tail = self.tail
        self._own_scroll = True
        try:
            for r in new:
                cells = self.row_of(r, handshakes is not None and r.request_id in handshakes)
                self._rows[r.request_id] = cells
                self._keys.append(r.request_id)
                self._grow_widths(cells)
            cursor = self.cursor_row
            if len(self._keys) > REQUESTS:
                drop = len(self._keys) - REQUESTS
                for key in self._keys[:drop]:
                    del self._rows[key]
                    self._plain.pop(key, None)
                    self._wrong.discard(key)
                del self._keys[:drop]
                cursor = max(0, cursor - drop)
                # the same requests stay in view (the cursor's among them)
                self.scroll_to(y=max(0, self.scroll_y - drop), animate=False, immediate=True)
            size = Size(self._total_width(), len(self._keys) + 1)
            if size != self.virtual_size:
                self.virtual_size = size
            # a full table keeps its length: following, the cursor's index stays and its request changes
            self.cursor_row = len(self._keys) - 1 if follow else min(cursor, len(self._keys) - 1)
            if tail:
                self._show_newest()
        finally:
            self._own_scroll = False
        if tail:  # again once laid out: a new row can bring a scrollbar that takes a line
            self.call_after_refresh(self._show_newest)
        self._select(self._keys[self.cursor_row])
        self.refresh()

    def _grow_widths(self, cells: tuple[str | Text, ...]) -> None:
        grown = False
        for i, cell in enumerate(cells[:-1]):  # the last (outcome and reason) runs to the edge
            w = cell.cell_len if isinstance(cell, Text) else cell_len(cell)
            if w > self._widths[i]:
                self._widths[i] = w
                grown = True
        if grown:
            self._plain.clear()
            self._styled.clear()

    def _total_width(self) -> int:
        """The columns but the last, and the last as wide as "fallback": a reason after it is cut at
        the screen's edge rather than widening the table (a horizontal scrollbar takes a row)."""
        return sum(w + 2 for w in self._widths[:-1]) + 1 + OUTCOME_WIDTH

    # ----- cursor -------------------------------------------------------------------------
    def validate_cursor_row(self, row: int) -> int:
        return max(0, min(row, len(self._keys) - 1)) if self._keys else 0

    def watch_cursor_row(self, old: int, row: int) -> None:
        if self._keys:
            if not self._own_scroll:  # moved by a key or a click: the view goes to it
                self._scroll_into_view(row)
            self._select(self._keys[row])
        self.refresh()

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        if not self._own_scroll and self._visible_rows() is not None:
            self.tail = self._newest_in_view(new)

    def _visible_rows(self) -> int | None:
        """Rows the view shows (less the header line); None before the table is laid out."""
        height = self.scrollable_content_region.height - 1
        return height if height > 0 else None

    def _newest_in_view(self, top: float) -> bool:
        visible = self._visible_rows()
        return visible is None or len(self._keys) <= int(top) + visible

    def _show_newest(self) -> None:
        """Scroll so that the newest row is the view's last (the table moves its own view)."""
        visible = self._visible_rows()
        if not self.tail or visible is None or self._newest_in_view(self.scroll_y):
            return
        own, self._own_scroll = self._own_scroll, True
        try:
            self.scroll_to(y=len(self._keys) - visible, animate=False, immediate=True)
        finally:
            self._own_scroll = own

    def _scroll_into_view(self, row: int) -> None:
        if row != self.cursor_row:
            return
        visible = max(1, self.scrollable_content_region.height - 1)  # less the header line
        top = int(self.scroll_y)
        if row < top:
            self.scroll_to(y=row, animate=False, immediate=True)
        elif row >= top + visible:
            self.scroll_to(y=row - visible + 1, animate=False, immediate=True)

    def _select(self, key: str, again: bool = False) -> None:
        if key != self._selected or again:
            self._selected = key
            self.post_message(RequestSelected(key))

    def move_cursor(self, *, row: int) -> None:
        self.cursor_row = row

    def action_cursor(self, delta: int) -> None:
        self.cursor_row += delta

    def action_page(self, pages: int) -> None:
        self.cursor_row += pages * max(1, self.scrollable_content_region.height - 1)

    def action_cursor_to(self, row: int) -> None:
        self.cursor_row = row if row >= 0 else len(self._keys) - 1

    def action_select(self) -> None:
        if self._keys:
            self._select(self._keys[self.cursor_row], again=True)

    def on_click(self, event: events.Click) -> None:
        row = int(self.scroll_y) + event.y - 1
        if event.y >= 1 and 0 <= row < len(self._keys):
            self.cursor_row = row
            self.action_select()

    # ----- rendering ----------------------------------------------------------------------
    def _line(self, cells: Sequence[str | Text]) -> Strip:
        text = Text(no_wrap=True, end="")
        for cell, width in zip(cells, self._widths, strict=True):
            text.append(" ")
            text.append_text(cell if isinstance(cell, Text) else Text(cell))
            text.append(" " * max(0, width - (cell.cell_len if isinstance(cell, Text) else cell_len(cell)) + 1))
        return Strip(Segment.simplify(text.render(self.app.console)), text.cell_len)

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        scroll_x, scroll_y = self.scroll_offset
        base = self.rich_style
        if y == 0:
            style = base + self.get_component_rich_style("transfers--header")
            header = self._styled.get(("", style, self._total_width()))
            if header is None:
                header = self._styled[("", style, self._total_width())] = self._line(COLUMNS).apply_style(style)
            return header.crop(scroll_x, scroll_x + width).extend_cell_length(width, style)
        row = scroll_y + y - 1
        if row >= len(self._keys):
            return Strip.blank(width, base)
        key = self._keys[row]
        if row == self.cursor_row:
            style = base + self.get_component_rich_style("transfers--cursor")
        elif row % 2 == 0:
            style = base + self.get_component_rich_style("transfers--even-row")
        else:
            style = base
        cache_key = (key, style, self._total_width())
        strip = self._styled.get(cache_key)
        if strip is None:
            plain = self._plain.get(key)
            if plain is None:
                plain = self._plain[key] = self._line(self._rows[key])
            strip = self._styled[cache_key] = plain.apply_style(style)
        return strip.crop(scroll_x, scroll_x + width).extend_cell_length(width, style)

    def notify_style_update(self) -> None:
        self._styled.clear()
        super().notify_style_update()
