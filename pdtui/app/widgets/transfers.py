from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.style import Style
from rich.text import Text
from textual.cache import LRUCache
from textual.widgets import DataTable

from pdtui.app.state import REQUESTS, fmt_num, itl_stats, mib, transfer_ms
from pdtui.core.events import RequestTraced

OUTCOME_STYLE = {"pair": "green", "fallback": "yellow", "error": "bold red"}
COLUMNS = ("id", "prompt", "blk", "MiB", "P ms", "xfer ms", "D TTFT", "ITL p50", "ITL max", "outcome")
TRIM = 50
"""Rows dropped at once when the table grows past REQUESTS: every removal renumbers the rows below
it, so dropping the oldest one by one would re-render every visible row for each new request."""


class TransfersTable(DataTable):
    """Recent requests, newest last; a highlighted row is the one the detail pane shows.

    "xfer ms" is D's first token including the KV pull (the proxy's decode_ttft_ms); "D TTFT" is the
    client-facing TTFT (P leg + hop + D leg). The table keeps between ``REQUESTS - TRIM`` and
    ``REQUESTS`` of the newest requests.
    """

    DEFAULT_CSS = """
    TransfersTable { height: 1fr; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        self._cells: LRUCache[tuple[Any, ...], Any] = LRUCache(8192)
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=True)
        self._shown: list[str] = []

    def on_mount(self) -> None:
        self.add_columns(*COLUMNS)

    @staticmethod
    def row_of(r: RequestTraced) -> tuple[str | Text, ...]:
        p50, mx = itl_stats(r)
        return (
            r.request_id.removeprefix("pdtui-")[:10],
            fmt_num(r.prompt_tokens, ","),
            fmt_num(r.blocks),
            fmt_num(mib(r.kv_bytes), ".2f"),
            fmt_num(r.prefill_ms, ".0f"),
            fmt_num(transfer_ms(r), ".0f"),
            fmt_num(r.ttft_ms, ".0f"),
            fmt_num(p50, ".1f"),
            fmt_num(mx, ".1f"),
            Text(r.outcome if r.outcome != "error" else f"error {r.status}", style=OUTCOME_STYLE.get(r.outcome, "")),
        )

    def update(self, requests: Sequence[RequestTraced]) -> None:
        """Add the requests newer than the newest row (``requests`` is oldest first); past REQUESTS
        rows, drop the oldest TRIM at once. Dropped rows are not added again though the state keeps
        them: only what comes after the newest row is new."""
        follow = self.row_count == 0 or self.cursor_row >= self.row_count - 1
        start = 0
        if self._shown:
            newest = self._shown[-1]
            start = next((i + 1 for i in range(len(requests) - 1, -1, -1) if requests[i].request_id == newest), 0)
        for r in requests[start:]:
            self.add_row(*self.row_of(r), key=r.request_id)
            self._shown.append(r.request_id)
        if len(self._shown) > REQUESTS:
            drop, self._shown = self._shown[:len(self._shown) - REQUESTS + TRIM], self._shown[-(REQUESTS - TRIM):]
            for key in drop:
                self.remove_row(key)
        if follow and self.row_count:
            self.move_cursor(row=self.row_count - 1)

    def clear_rows(self) -> None:
        self.clear()
        self._shown.clear()

    # ----- rendering: DataTable's cell cache, kept across add_row --------------------------
    # DataTable keys its cell cache on a counter that every add_row and remove_row bumps, so each
    # new request re-rendered every visible cell through Rich (about 50 ms of CPU per repaint at
    # 160x48: the dashboard's hot spot, scripts/bench_refresh.py). A row here never changes once
    # added, so a rendered cell is a function of the row and column, the row's position (DataTable
    # puts it in the cell's mouse meta), the style (zebra stripe, cursor, hover, focus) and width.

    def _render_cell(self, row_index: int, column_index: int, base_style: Style, width: int,
                     cursor: bool = False, hover: bool = False) -> Any:
        row_key = self._row_locations.get_key(row_index) if row_index >= 0 else None
        key = (row_key, row_index, column_index, base_style, width, cursor, hover, self._show_hover_cursor,
               self._pseudo_class_state)
        lines = self._cells.get(key)
        if lines is None:
            lines = self._cells[key] = super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        return lines

    def _clear_caches(self) -> None:
        super()._clear_caches()
        self._cells.clear()

    def notify_style_update(self) -> None:
        self._cells.clear()
        super().notify_style_update()

    def clear(self, columns: bool = False) -> Any:
        self._cells.clear()
        return super().clear(columns)
