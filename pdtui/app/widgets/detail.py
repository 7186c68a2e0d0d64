from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from pdtui.app.gpu import LinkRate
from pdtui.app.state import fmt_ms, fmt_num, fmt_rate, freight_tokens, itl_stats, timeline
from pdtui.core.events import ONLY_D, EngineSpan, RequestTraced
from pdtui.core.kvmath import KvGeometry
from pdtui.core.logparse import KvRead

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


def migration_text(m: dict[str, object]) -> str:
    """One migration in words: who died when, where the stream went, the second transfer, the seam."""
    t = f"migration {m.get('result')}: {m.get('from')} died after {m.get('tokens')} tokens"
    if m.get("to") is not None:
        via = f"via {m.get('prefill')}" if m.get("path") == "prefill" else "computed on it"
        t += f" -> {m.get('to')} ({via}"
        if m.get("blocks") is not None:
            kv = m.get("kv_bytes")
            mib = f" {kv / 2**20:.2f} MiB" if isinstance(kv, int) else ""
            t += f", 2nd transfer {m.get('blocks')} blocks{mib}, P {_ms(m.get('prefill_ms'))} ms"
        t += f"; its first token {_ms(m.get('decode_ttft_ms'))} ms, seam {_ms(m.get('seam_ms'))} ms)"
    if m.get("error"):
        t += f": {m.get('error')}"
    return t


def _ms(v: object) -> str:
    return fmt_num(float(v) if isinstance(v, int | float) else None)


class RequestDetail(Static):
    """The selected request's timeline (P leg, hop, D's first token incl. the pull, decode) and its freight."""

    MIN_LINES = 8
    """A paired request's detail fits in 8 lines: the pane keeps at least that height, so moving
    from row to row (or following the newest) does not make the table above jump."""
    DEFAULT_CSS = """
    RequestDetail { height: auto; min-height: 9; max-height: 45%; border-top: solid $primary; padding: 0 1; }
    RequestDetail.-compact { height: 6; min-height: 6; max-height: 6; }
    """

    wide: reactive[bool] = reactive(True)
    """The timeline as bars (a large screen), else five lines with the freight and the reason first."""
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
        self.handshake: str | None = None
        """Why the request shown paid the NIXL handshake (DashState.handshakes), or None."""
        self.spans: dict[str, EngineSpan] = {}
        """The engines' own spans of the request shown (instance -> EngineSpan; traces_port)."""
        self.kv_read: KvRead | None = None
        """D's measured read of the request shown's KV (DashState.kv_reads), or None."""
        self.link: LinkRate | None = None
        """The link between the request's P and D (app.link_for): its nominal rate, shown beside
        the read's achieved one, and how pdtui found it (NVML, loopback, or why it is unknown)."""
        self.placeholder = "select a request (arrows / enter) to see its timeline and KV freight"
        """What it says with no request shown (observe only: why there are none)."""

    def link_words(self, compact: bool = False) -> str:
        """The link's rate beside the achieved one: " of the link's 478 GB/s (NVLink 18 links x
        26.6 GB/s (NVML))", " (loopback: no link rate)", " (link rate unknown: ...)"; compact,
        " of 478" or nothing."""
        link = self.link
        if link is None:
            return ""
        if compact:
            return f" of {fmt_rate(link.gbps)}" if link.gbps is not None else ""
        if link.gbps is None:
            return f" ({link.how})"
        return f" of the link's {fmt_rate(link.gbps)} GB/s ({link.how})"

    def read_text(self, compact: bool = False) -> Text | None:
        """D's read of this request's KV as NIXL measured it: time, bytes, achieved GB/s, beside
        the link's nominal rate where pdtui knows it. Fewer bytes than the freight formula's: D had
        the rest of the prompt's blocks in its own cache."""
        k, r = self.kv_read, self.request
        if k is None or r is None:
            return None
        rate = fmt_rate(k.gbps)
        formula = self.link.formula_s(k.bytes) if self.link is not None else None
        if formula is not None:  # a link pdtui shaped: bits, and the formula beside the measure
            return self._emulated_read(k, formula, compact)
        if k.op == "write":  # push: P wrote it into D's blocks, and P measured it
            verb, who = "write", "P (push)"
        else:
            verb, who = "read", "D"
        if compact:
            return Text(f"KV {verb} {fmt_ms(k.ms)} ms {k.bytes / 2**20:.2f} MiB {rate}{self.link_words(True)} GB/s",
                        style="bold")
        t = Text(f"KV {verb} ", style="bold")
        t.append(f"(measured by NIXL on {who}): {fmt_ms(k.ms)} ms for {k.bytes:,} B ({k.bytes / 2**20:.2f} MiB) = "
                 f"{rate} GB/s{self.link_words()}; {k.descs} descriptors, {k.handles} transfer{'s' if k.handles != 1 else ''}"
                 f"{f' on {k.ranks} ranks' if k.ranks > 1 else ''}, post {fmt_ms(k.post_ms)} ms")
        if r.kv_bytes and k.bytes < r.kv_bytes:
            t.append(f"; of P's {r.kv_bytes:,} B, D had the rest cached", style="dim")
        return t

    def _emulated_read(self, k: KvRead, formula_s: float, compact: bool) -> Text:
        """Over an emulated link: the measured read beside the formula (bytes / rate + RTT), their
        ratio, and the achieved Gbit/s of the link's."""
        link = self.link
        assert link is not None and link.bytes_per_s is not None
        gbit = k.bytes * 8 / (k.ms / 1e3) / 1e9 if k.ms > 0 else None
        of = link.bytes_per_s * 8 / 1e9
        ratio = k.ms / (formula_s * 1e3) if formula_s > 0 else None
        achieved = f"{gbit:.3g}" if gbit is not None else "?"
        if compact:
            return Text(f"KV read {fmt_ms(k.ms)} ms (formula {fmt_ms(formula_s * 1e3)}) {k.bytes / 2**20:.2f} MiB"
                        f" {achieved} of {of:g} Gbit/s", style="bold")
        t = Text("KV read ", style="bold")
        rtt = link.rtt_s or 0.0
        t.append(f"(measured by NIXL on D): {fmt_ms(k.ms)} ms for {k.bytes:,} B ({k.bytes / 2**20:.2f} MiB) ="
                 f" {achieved} Gbit/s of the link's {of:g} Gbit/s ({link.how}); the formula, bytes / rate + RTT:"
                 f" {k.bytes:,} B x 8 / {of:g} Gbit/s + {rtt * 1e3:g} ms = {fmt_ms(formula_s * 1e3)} ms")
        if ratio is not None:
            t.append(f" (measured {ratio:.2f}x)", style="yellow" if abs(ratio - 1) > 0.2 else "green")
        t.append(f"; {k.descs} descriptors, {k.handles} transfer{'s' if k.handles != 1 else ''}"
                 f"{f' on {k.ranks} ranks' if k.ranks > 1 else ''}, post {fmt_ms(k.post_ms)} ms")
        if self.request is not None and self.request.kv_bytes and k.bytes < self.request.kv_bytes:
            t.append(f"; of P's {self.request.kv_bytes:,} B, D had the rest cached", style="dim")
        return t

    def engine_line(self) -> Text | None:
        """Inside the legs, by the engines' clocks: queue and prefill/first step (measured), the
        span's start to first token and its whole (pdtui.core.otlp says what each covers)."""
        if not self.spans:
            return None
        t = Text("engine: ", style="bold")
        for name in sorted(self.spans):
            s = self.spans[name]
            t.append(f"{name} queue {fmt_num(s.queue_ms, '.1f')} prefill {fmt_num(s.prefill_ms, '.1f')}"
                     f" ttft {fmt_num(s.ttft_ms, '.1f')} e2e {fmt_num(s.e2e_ms, '.1f')} ms  ")
        return t

    def watch_wide(self, wide: bool) -> None:
        self.set_class(not wide, "-compact")
        self.refresh(layout=True)

    def watch_request(self) -> None:
        if not self.wide:  # a fixed height: a new request repaints, never lays out the screen
            self.refresh()
            return
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
            return Text(self.placeholder, style="dim")
        return self.render_wide(r) if self.wide else self.render_compact(r)

    @staticmethod
    def reason(r: RequestTraced) -> Text | None:
        """Why it did not simply pair: the P leg's branch (set only then), the fallback, the error."""
        parts: list[Text] = []
        if r.prefill_branch:
            style = "yellow" if r.prefill_branch.startswith(("fallback", "retry", "decode")) else "red"
            parts.append(Text(f"P leg: {r.prefill_branch} ({r.prefill_attempts} P request(s))", style=style))
        if r.fallback_reason:
            parts.append(Text(f"fallback: {r.fallback_reason}", style="yellow"))
        if r.error:
            parts.append(Text(f"error: {r.error[:300]}", style="red"))
        for m in r.migrations:  # D died under the stream (pdtui.core.proxy.migrate)
            parts.append(Text(migration_text(m), style="magenta" if m.get("result") == "ok" else "red"))
        if r.switch or r.switch_skipped:  # the proxy's TTFT switches (pdtui.core.proxy.firsttoken)
            skipped = f" ({r.switch_skipped}: normal path)" if r.switch_skipped else ""
            parts.append(Text(f"switch: {r.switch or 'none'}{skipped}", style="cyan"))
        return Text("; ").join(parts) if parts else None

    @staticmethod
    def decode_text(r: RequestTraced, compact: bool = False) -> Text | None:
        """Why its D took it (RequestTraced.decode_reason: the proxy's policy and what it compared);
        compact (80x24) leaves out "only D", true of every request of a pair with one D."""
        why = r.decode_reason
        if not why or (compact and why == ONLY_D):
            return None
        return Text(f"D chosen: {why}", style="magenta")

    def summary(self, r: RequestTraced) -> Text:
        t = Text()
        t.append(f"{r.request_id.removeprefix('pdtui-')} ", style="bold")
        t.append(f"{r.outcome} {r.status} ", style=OUTCOME_STYLE.get(r.outcome, ""))
        if self.handshake:
            t.append(f"paid the NIXL handshake ({self.handshake}) ", style="bold magenta")
        t.append(f"{r.prefill or '-'}→{r.decode or '-'} prompt {fmt_num(r.prompt_tokens, ',')} "
                 f"completion {fmt_num(r.completion_tokens, ',')} {'stream' if r.stream else 'non-stream'} "
                 f"{r.endpoint}")
        if r.d_computed_tokens is not None:  # paired: what D's own usage says it computed
            t.append(f" D computed {r.d_computed_tokens:,} of {fmt_num(r.prompt_tokens, ',')} prompt tokens",
                     style="bold red" if r.recomputed else "green")
        return t

    def render_compact(self, r: RequestTraced) -> Text:
        """80x24: five lines, the reason and the freight before the timeline."""
        t = Text(overflow="fold")
        t.append_text(self.summary(r))
        why = self.reason(r)
        chosen = self.decode_text(r, compact=True)
        if why is not None or chosen is not None:
            t.append("\n")
            t.append_text(Text("; ").join(x for x in (why, chosen) if x is not None))
        t.append("\nfreight: ", style="bold")
        t.append(self.formula())
        legs = " + ".join(f"{LEG_SHORT.get(name, name)} {stop - start:,.0f}" for name, start, stop in timeline(r))
        p50, mx = itl_stats(r)
        itl = f"; ITL p50 {p50:.1f} max {mx:.1f}" if p50 is not None else ""
        read = self.read_text(compact=True)
        t.append("\n")
        if read is not None:
            t.append_text(read)
            t.append("; ")
        t.append(f"{legs} ms{itl}" if legs else f"no timeline{itl}", style="cyan")
        return t

    def render_wide(self, r: RequestTraced) -> Text:
        t = Text(overflow="fold")
        t.append_text(self.summary(r))
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
        read = self.read_text()
        if read is not None:
            t.append("\n")
            t.append_text(read)
        engine = self.engine_line()
        if engine is not None:
            t.append("\n")
            t.append_text(engine)
        why = self.reason(r)
        if why is not None:
            t.append("\n")
            t.append_text(why)
        chosen = self.decode_text(r)
        if chosen is not None:
            t.append("\n")
            t.append_text(chosen)
        return t


LEG_SHORT = {"P prefill (+1 token)": "P", "proxy hop": "hop", "D first token incl. KV pull": "D 1st tok incl. pull",
             "first token sent (P's)": "1st tok sent", "D 2nd token incl. KV pull": "D 2nd tok incl. pull",
             "D decode stream": "decode"}
OUTCOME_STYLE = {"pair": "green", "fallback": "yellow", "error": "bold red"}
