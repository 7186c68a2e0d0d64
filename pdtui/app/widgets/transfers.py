from __future__ import annotations

from collections.abc import Sequence

from textual.widgets import DataTable

from pdtui.app.state import REQUESTS, fmt_num, itl_stats, mib, transfer_ms
from pdtui.core.events import RequestTraced

OUTCOME_STYLE = {"pair": "green", "fallback": "yellow", "error": "bold red"}
COLUMNS = ("id", "prompt", "blk", "MiB", "P ms", "xfer ms", "D TTFT", "ITL p50", "ITL max", "outcome")


class TransfersTable(DataTable):
    """Recent requests, newest last; a highlighted row is the one the detail pane shows.

    "xfer ms" is D's first token including the KV pull (the proxy's decode_ttft_ms); "D TTFT" is the
    client-facing TTFT (P leg + hop + D leg).
    """

    DEFAULT_CSS = """
    TransfersTable { height: 1fr; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=True)
        self._shown: list[str] = []

    def on_mount(self) -> None:
        self.add_columns(*COLUMNS)

    @staticmethod
    def row_of(r: RequestTraced) -> tuple[str, ...]:
        p50, mx = itl_stats(r)
        from rich.text import Text

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
        )  # type: ignore[return-value]

    def update(self, requests: Sequence[RequestTraced]) -> None:
        """Add the requests not shown yet; drop the oldest beyond the bound."""
        shown = set(self._shown)
        follow = self.row_count == 0 or self.cursor_row >= self.row_count - 1
        for r in requests:
            if r.request_id in shown:
                continue
            self.add_row(*self.row_of(r), key=r.request_id)
            self._shown.append(r.request_id)
        while len(self._shown) > REQUESTS:
            self.remove_row(self._shown.pop(0))
        if follow and self.row_count:
            self.move_cursor(row=self.row_count - 1)

    def clear_rows(self) -> None:
        self.clear()
        self._shown.clear()
