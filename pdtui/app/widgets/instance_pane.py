from __future__ import annotations

import re
import time
from collections.abc import Callable

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from pdtui.app.state import DOWN, KV_FETCH_STAGES, WINDOW_S, InstanceView, bucket_text, fmt_ms, fmt_num
from pdtui.core import connectors

STARTUP_STEPS = ("nixl_available", "kv_pool", "connector_created", "registered")
STATE_STYLE = {"ready": "bold green", "starting": "bold yellow", "stopping": "yellow", "exited": "bold red",
               "failed": "bold red", "unreachable": "bold red", "unknown": "dim", "stopped": "dim"}


class InstancePane(Static):
    """One engine: state, connector milestones in the engine's words, KV pool, queue, log tail.
    An attached engine (pdtui attach) says so, whether its log is followed or its metrics alone
    are shown, and which of the kill and restart keys work for it (and why not).

    Classes: ``-ready``, ``-starting``, ``-down`` (exited, failed or unreachable: red),
    ``-expanded`` (long log tail).
    """

    DEFAULT_CSS = """
    InstancePane { border: round $primary; height: 100%; width: 1fr; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    InstancePane.-ready { border: round $success; }
    InstancePane.-starting { border: round $warning; }
    InstancePane.-down { border: heavy $error; background: $error 15%; }
    """

    view: reactive[InstanceView | None] = reactive(None)
    """The instance's snapshot. Its size comes from the layout, never from the content, so a new
    snapshot repaints the pane without a layout of the screen."""
    expanded: reactive[bool] = reactive(False, layout=True)
    """Show a long log tail instead of the last lines."""
    now: reactive[float | None] = reactive(None)
    """Clock for the start-up progress (event time in a replay)."""
    observe: reactive[bool] = reactive(False)
    """Observe only (no proxy in the path): no per-request counts, the engine's queue by stage instead."""

    TAIL = 2
    TAIL_EXPANDED = 40
    COMPACT_BELOW = 32
    """Content columns under which the pane shows its short lines (2P2D at 80 columns: 16 each)."""

    def __init__(self, name: str, role: str = "?", *, clock: Callable[[], float] = time.time,
                 id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.instance_name = name
        self.clock = clock
        self.view = InstanceView(name=name, role=role)

    def watch_view(self, view: InstanceView | None) -> None:
        if view is None:
            return
        self.border_title = f"{view.name} ({view.role}{', attached' if view.attached else ''})"
        self.border_subtitle = view.url.removeprefix("http://")
        self.set_class(view.state == "ready", "-ready")
        self.set_class(view.state in ("starting", "stopping"), "-starting")
        self.set_class(view.state in DOWN, "-down")

    def watch_expanded(self, expanded: bool) -> None:
        self.set_class(expanded, "-expanded")

    def state_line(self, v: InstanceView) -> Text:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(v.state.upper() if v.state in DOWN else v.state, style=STATE_STYLE.get(v.state, ""))
        if v.state == "starting":
            done = sum(1 for s in STARTUP_STEPS if s in dict(v.milestones))
            now = self.now if self.now is not None else self.clock()
            secs = now - v.started_t if v.started_t is not None else 0
            t.append(f" {'▰' * done}{'▱' * (len(STARTUP_STEPS) - done)} {max(0, secs):.0f}s", style="yellow")
        elif v.state == "ready":
            t.append(f" in {v.elapsed_s:.1f}s" if v.elapsed_s is not None else "", style="green")
        elif v.state in DOWN:
            t.append(f" code {v.exit_code}" if v.exit_code is not None else "", style="bold red")
        if v.detail and v.state != "starting":
            t.append(f"  {v.detail}", style="dim")
        return t

    @staticmethod
    def flags(v: InstanceView) -> list[tuple[str, str]]:
        """reg (KV caches registered with NIXL), hs (a NIXL handshake holds with the other side: lit
        on both panes by D's "Transfer plan" line, dark again when either process goes), compat
        (the NIXL compatibility check: D's alone, which asks P for its hash when it handshakes; P
        checks nothing and logs nothing of it, so its pane says ``compat n/a`` rather than a dot
        that would never light)."""
        ms = dict(v.milestones)
        out = [("reg✓", "green") if "registered" in ms else ("reg·", "dim")]
        entry = v.entry
        if entry is not None and not any(c.side_channel for c in connectors.parts(entry)):
            out.append(("hs n/a", "dim"))  # no handshake: the store is the rendezvous (entry.handshake)
            if "storage_load" in ms:
                out.append(("load✓", "green"))
            return out
        if v.handshakes:
            out.append(("hs✓", "green"))
        elif v.handshake_failed:
            out.append(("hs✗", "bold red"))
        else:
            out.append(("hs·", "dim"))
        if v.role == "prefill" and "compat_ok" not in ms and "compat_failed" not in ms:
            out.append(("compat n/a", "dim"))
            return out
        out.append(("compat✓", "green") if "compat_ok" in ms else ("compat·", "dim"))
        if "compat_failed" in ms:
            out.append(("compat✗", "bold red"))
        return out

    @staticmethod
    def attached_text(v: InstanceView) -> Text:
        """An attached engine's keys: why those without the user's command are off (first: it is
        what a short pane must keep), then the commands the others run. The border says attached."""
        t = Text()
        off = [verb for verb, cmd in (("kill", v.kill_cmd), ("restart", v.restart_cmd)) if not cmd]
        if off:
            keys = "/".join(verb[0] for verb in off)
            t.append(f"{keys} off: no {'/'.join(f'--{verb}' for verb in off)} {v.name}=CMD  ", style="yellow")
        for key, cmd in (("k", v.kill_cmd), ("r", v.restart_cmd)):
            if cmd:
                t.append(f"{key}: {cmd}  ", style="cyan")
        return t

    @staticmethod
    def queue_text(v: InstanceView) -> str:
        """D's waiting requests by the stage of their KV pull (vLLM 0.32's gauge), when it reports them."""
        stages = v.kv_fetch
        if stages is None:
            return ""
        return "  kv " + " ".join(f"{label} {n}" for (_, label), n in zip(KV_FETCH_STAGES, stages, strict=True))

    @staticmethod
    def connector_words(v: InstanceView) -> str:
        """The newest thing worth reading, in the engine's words: a failure, else the handshake
        (prefixed with the peer), else the latest start-up milestone."""
        ms = dict(v.milestones)
        for k in ("compat_failed", "transfer_failure", "engine_error"):
            if k in ms:
                return ms[k]
        if v.handshake_failed:
            return v.handshake_failed
        if v.handshakes:
            peer, words = v.handshakes[-1]
            return f"with {peer}: {words}"
        return next((ms[k] for k in ("compat_ok", "registered", "connector_created", "nixl_available") if k in ms), "")

    @staticmethod
    def nixl_text(v: InstanceView, wide: bool = False, width: int | None = None) -> Text | None:
        """NIXL's figures, failures first: failed transfers/notifications (D), labelled by what the
        engines' vLLM counts in them (``connectors.nixl_counter_meaning``: ``read✗ F`` up to
        0.22.1, ``xport✗ F`` from 0.32.0, ``fail? F`` for a version between or unknown; the
        notifications after it when any failed), KV expired before it was read (P counts those), then the KV read time p50/p99 in ms, measured per request
        (D's "pdtui: KV read" lines), since the start and over the last WINDOW_S s. An engine that
        logs no reads (NixlConnector not loaded through pdtui.engine.nixl_quiet) gets what vLLM's
        histogram can say: the buckets its p50/p99 fall in, as bounds, and its exact mean. ``wide``
        adds how they were measured, and the mean where ``width`` leaves room. None before the
        engine reports any."""
        n = v.nixl
        if n is None:
            return None
        t = Text()
        if n.failed or n.failed_notifications or v.role == "decode":  # labelled by what this vLLM counts
            label = n.meaning.label(n.failed, n.failed_notifications)
            t.append(f"{label} ", style="bold red" if n.failed or n.failed_notifications else "")
        if n.expired or v.role == "prefill":
            t.append(f"expired {n.expired} ", style="bold red" if n.expired else "")
        if n.reads:
            label = "xfer p50/p99 " if wide else "xfer "
            t.append(f"{label}{fmt_ms(n.p50_ms)}/{fmt_ms(n.p99_ms)}ms ")
            t.append(f"{WINDOW_S:.0f}s {fmt_ms(n.recent_p50_ms)}/{fmt_ms(n.recent_p99_ms)}", style="cyan")
            if wide:
                of = f"{n.kept} of {n.reads}" if n.kept < n.reads else f"{n.reads}"
                t.append(f" (measured, {of} transfers)", style="dim")
                mean = f" mean {fmt_ms(n.mean_ms)}ms"
                if width is None or len(t.plain) + len(mean) <= width:
                    t.append(mean, style="dim")
        elif n.transfers:
            bounds = f"p50 {bucket_text(n.hist_p50)} p99 {bucket_text(n.hist_p99)} " if n.hist_p50 else ""
            t.append(f"xfer {bounds}mean {fmt_ms(n.hist_mean_ms)}ms")
            if wide:
                t.append(f" (vLLM's histogram, not measured per request: {n.transfers} transfers)", style="dim")
        return t

    @staticmethod
    def no_figure_text(v: InstanceView, wide: bool = False) -> Text | None:
        """A connector with no per-request figure (storage): D's pane says so, never a zero, with what
        the engine does count: the prompt tokens whose KV it loaded (vllm:prompt_tokens_by_source
        external_kv_transfer), in tokens and, by the formula's bytes per token, nothing more."""
        entry = v.entry
        if entry is None or entry.freight_on is not None or v.role != "decode":
            return None
        t = Text()
        t.append("freight: no per-request figure", style="yellow")
        ext = v.external_tokens
        t.append(f"  loaded {int(ext):,} tok" if ext is not None else "  loaded - tok")
        if wide and entry.no_figure:
            t.append(f" ({entry.no_figure})", style="dim")
        return t

    @staticmethod
    def headroom_text(v: InstanceView, short: bool = False, room: int | None = None) -> Text | None:
        """A decode instance's headroom as the proxy counts it: free blocks at its latest scrape
        less those promised to requests in flight, of the pool's blocks (pdtui.core.proxy.routing),
        and how it is made when ``room`` columns leave space; None until the proxy has said."""
        h = v.headroom
        if h is None:
            return None
        t = Text()
        low = h.headroom < max(1, h.total_blocks // 10)
        t.append(f"room {h.headroom:,}" if short else f"room {h.headroom:,}/{h.total_blocks:,} blk",
                 style="bold red" if low else "bold")
        how = f" ({h.free_blocks:,} free - {h.promised_blocks:,} promised)"
        if not short and (room is None or len(t.plain) + len(how) <= room):
            t.append(how, style="dim")
        return t

    def render_compact(self, v: InstanceView) -> Text:
        """A narrow pane (several P or D side by side at 80 columns): the same things, in short:
        state; pairs, fallbacks, errors, running, waiting; KV use and room (or free blocks); the
        connector's flags; NIXL's figures; the log tail."""
        out = Text(no_wrap=True, overflow="ellipsis")
        out.append_text(self.state_line(v))
        out.append("\n")
        if self.observe:
            out.append(f"run {fmt_num(v.running)} wait {fmt_num(v.waiting)}")
        else:
            out.append(f"p{v.pairs}", style="bold green")
            out.append(f" f{v.fallbacks}", style="bold yellow" if v.fallbacks else "")
            out.append(f" e{v.errors}", style="bold red" if v.errors else "")
            out.append(f" r{fmt_num(v.running)} w{fmt_num(v.waiting)}")
        out.append("\nKV ")
        usage = v.kv_usage
        out.append(f"{usage * 100:.0f}%" if usage is not None else "-",
                   style="bold red" if usage and usage > 0.9 else "bold")
        room = self.headroom_text(v, short=True)
        if room is not None:
            out.append(" ")
            out.append_text(room)
        elif v.free_blocks is not None:
            out.append(f" free {v.free_blocks:,}")
        out.append("\n")
        for label, style in self.flags(v):
            out.append(label + " ", style=style)
        used = 4
        nixl = self.nixl_text(v)
        if nixl is not None:
            out.append("\n")
            out.append_text(nixl)
            used += 1
        room_lines = max(self.TAIL, self.content_size.height - used)
        for line in v.log[-(max(room_lines, self.TAIL_EXPANDED) if self.expanded else room_lines):]:
            out.append("\n" + short_log(line), style="dim")
        return out

    def render(self) -> Text:
        """Most important first, so a short pane (80x24: five lines) loses only the log tail: the
        state, the request counters, the KV pool and queue, the connector, then the log. A narrow
        pane (several of each role at 80 columns) shows the same in short (``render_compact``)."""
        v = self.view
        assert v is not None
        if 0 < self.content_size.width < self.COMPACT_BELOW:
            return self.render_compact(v)
        out = Text(no_wrap=True, overflow="ellipsis")
        out.append_text(self.state_line(v))
        if self.observe:  # nothing goes through pdtui: the engine's own queue
            out.append(f"\nrun {fmt_num(v.running)} wait {fmt_num(v.waiting)}{self.queue_text(v)}")
        else:
            out.append("\npair ")
            out.append(f"{v.pairs}", style="bold green")
            out.append(" fb ")
            out.append(f"{v.fallbacks}", style="bold yellow" if v.fallbacks else "")
            out.append(" err ")
            out.append(f"{v.errors}", style="bold red" if v.errors else "")
            if v.retries:
                out.append(f" retry {v.retries}", style="yellow")
            if v.recomputes:
                out.append(f" recompute {v.recomputes}", style="bold red")
            out.append(f"  run {fmt_num(v.running)} wait {fmt_num(v.waiting)}")
        out.append("\nKV use ")
        usage = v.kv_usage
        out.append(f"{usage * 100:.1f}%" if usage is not None else "-",
                   style="bold red" if usage and usage > 0.9 else "bold")
        width = self.content_size.width
        left = width - len(out.plain.rsplit("\n", 1)[-1]) - 1 if width else None
        headroom = self.headroom_text(v, room=left)
        if headroom is not None:  # a D the proxy counts for: its room first, the pool in tokens where it fits
            out.append(" ")
            out.append_text(headroom)
            pool = v.pool_tokens
            if pool and (not width or len(out.plain.rsplit("\n", 1)[-1]) + len(f" pool {pool:,} tok") <= width):
                out.append(f" pool {pool:,} tok", style="dim")
        else:
            pool = v.pool_tokens
            out.append(f" of {pool:,} tok" if pool else " of ? tok")
            if v.free_blocks is not None:
                out.append(f" free {v.free_blocks:,}/{v.pool_blocks:,} blk")
        if v.kv_pulled_bytes:
            verb = "pushed" if v.role == "prefill" and v.freight_here else "pulled"  # push: P counts what it wrote
            out.append(f" {verb} {v.kv_pulled_bytes / 2**20:.2f} MiB")
        out.append("\n")
        if v.attached and not v.log_file:  # no log: no milestones, handshakes or compatibility to show
            out.append("metrics only ", style="yellow")
            out.append("(no --log: connector lines unseen)", style="dim")
        else:
            for label, style in self.flags(v):
                out.append(label + " ", style=style)
            out.append(self.connector_words(v), style="italic dim")
        used = 4
        nixl = self.nixl_text(v, wide=self.content_size.width >= 60, width=self.content_size.width)
        if nixl is None:
            nixl = self.no_figure_text(v, wide=self.content_size.width >= 60)
        if nixl is not None:  # before the log: at 80x24 it takes the log's one line
            out.append("\n")
            out.append_text(nixl)
            used += 1
        if v.attached:
            out.append("\n")
            out.append_text(self.attached_text(v))
            used += 1
        room = max(self.TAIL, self.content_size.height - used)
        tail = v.log[-(max(room, self.TAIL_EXPANDED) if self.expanded else room):]
        for line in tail:
            out.append("\n" + short_log(line), style="dim")
        return out


VLLM_PREFIX = re.compile(r"^\((?:\w+) pid=\d+\) (DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d (\d\d:\d\d:\d\d)"
                         r"(?:\.\d+)? \[[^\]]*\] ?")


def short_log(line: str) -> str:
    """A vLLM log line without its 50-character prefix ("(APIServer pid=2670) INFO 11-25 04:40:55
    [api_utils.py:286] "): the time, W or E for a warning or an error, then the message."""
    line = line.rstrip("\r")
    m = VLLM_PREFIX.match(line)
    if m is None:
        return line
    level = "" if m[1] in ("INFO", "DEBUG") else m[1][0] + " "
    return f"{m[2]} {level}{line[m.end():]}"
