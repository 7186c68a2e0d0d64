from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from pdtui.app.state import freight_tokens, itl_stats, timeline
from pdtui.core.events import RequestTraced
from pdtui.core.kvmath import KvGeometry

BAR = 24


def freight_formula(req: RequestTraced, geometry: KvGeometry | None, block_size: int,
                    bytes_per_token: int | None) -> str:
    """The freight formula with this request's numbers (whole blocks: NIXL ships blocks)."""
    tokens = freight_tokens(req, block_size)
    if tokens is None:
        return "no KV shipped (P did not offer blocks)"
    prefix = f"{req.blocks} blocks x {block_size} tokens = {tokens} tokens; " if req.blocks is not None else ""
    if geometry is not None:
        return prefix + geometry.formula(tokens)
    if bytes_per_token:
        total = bytes_per_token * tokens
        return prefix + f"{bytes_per_token:,} B/token x {tokens} tokens = {total:,} B = {total / 2**20:.2f} MiB"
    return prefix + "KV geometry unknown"


class RequestDetail(Static):
    """The selected request's timeline (P leg, hop, D's first token incl. the pull, decode) and its freight."""

    MIN_LINES = 8
    """A paired request's detail fits in 8 lines: the pane keeps at least that height, so moving
    from row to row (or following the newest) does not make the table above jump."""
    DEFAULT_CSS = """
    RequestDetail { height: auto; min-height: 9; max-height: 45%; border-top: solid $primary; padding: 0 1; }
    """

    request: reactive[RequestTraced | None] = reactive(None)
    """The request shown. The table's cursor follows the newest request, so this changes with
    nearly every refresh: the screen is laid out again only when the pane's height changes (more
    than MIN_LINES lines)."""

    def __init__(self, *, geometry: KvGeometry | None = None, block_size: int = 0, bytes_per_token: int | None = None,
                 id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.geometry = geometry
        self.block_size = block_size
        self.bytes_per_token = bytes_per_token
        self._lines = 0

    def watch_request(self) -> None:
        width = self.content_region.width or self.app.size.width
        lines = max(self.MIN_LINES, len(self.render().wrap(self.app.console, max(1, width))))
        self.refresh(layout=lines != self._lines)
        self._lines = lines

    def formula(self) -> str:
        if self.request is None:
            return ""
        return freight_formula(self.request, self.geometry, self.block_size, self.bytes_per_token)

    def render(self) -> Text:
        r = self.request
        if r is None:
            return Text("select a request (arrows / enter) to see its timeline and KV freight", style="dim")
        t = Text(overflow="fold")
        t.append(f"{r.request_id} ", style="bold")
        t.append(f"{r.endpoint} {'stream' if r.stream else 'non-stream'} {r.outcome} {r.status} "
                 f"{r.prefill or '-'}→{r.decode or '-'}  prompt {r.prompt_tokens} completion {r.completion_tokens}")
        legs = timeline(r)
        end = max((e for _, _, e in legs), default=0.0) or 1.0
        for name, start, stop in legs:
            a = int(start / end * BAR)
            b = max(a + 1, int(stop / end * BAR))
            t.append(f"\n{name[:28]:<28} ")
            t.append(" " * a + "█" * (b - a) + " " * (BAR - b), style="cyan")
            t.append(f" {start:,.0f}–{stop:,.0f} ms")
        p50, mx = itl_stats(r)
        if p50 is not None:
            t.append(f"\nITL p50 {p50:.1f} ms, max {mx:.1f} ms over {len(r.itl_ms)} gaps ({r.chunks} chunks)")
        t.append("\nfreight: ", style="bold")
        t.append(self.formula())
        if r.prefill_branch:
            style = "yellow" if r.prefill_branch.startswith(("fallback", "retry", "decode")) else "red"
            t.append(f"\nP leg: {r.prefill_branch} ({r.prefill_attempts} P request(s))", style=style)
        if r.fallback_reason:
            t.append(f"\nfallback: {r.fallback_reason}", style="yellow")
        if r.error:
            t.append(f"\nerror: {r.error[:300]}", style="red")
        return t
