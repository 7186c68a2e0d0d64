from __future__ import annotations

import time
from collections.abc import Callable

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from pdtui.app.state import Header


def fmt_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class PairHeader(Static):
    """Profile, model and shape, connector, the emulated link, proxy URL, vLLM version, uptime;
    REPLAY when it is one."""

    DEFAULT_CSS = """
    PairHeader { height: 1; background: $primary-background; color: $text; padding: 0 1; }
    PairHeader.-replay { background: $warning-darken-2; }
    """

    header: reactive[Header] = reactive(Header, layout=True)
    """The pair's description, from RuntimeStarted/ProxyStarted/PairReady/RuntimeStopped."""
    mismatch: reactive[str] = reactive("")
    """Where the engines' own reports of their configuration differ (pdtui.app.engine_config)."""
    last_t: reactive[float | None] = reactive(None)
    """Newest event time: a replay's clock."""

    def __init__(self, *, clock: Callable[[], float] = time.time, replay: bool = False, speed: float | None = None,
                 id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.clock = clock
        self.replay = replay
        self.speed = speed
        self.set_class(replay, "-replay")

    def on_mount(self) -> None:
        self.set_interval(1.0, self.refresh)

    def uptime(self) -> float | None:
        h = self.header
        if h.started_t is None:
            return None
        now = self.last_t if self.replay and self.last_t is not None else self.clock()
        return now - h.started_t

    def render(self) -> Text:
        h = self.header
        t = Text(no_wrap=True, overflow="ellipsis")
        if self.replay:
            speed = f" x{self.speed:g}" if self.speed else ""
            t.append(f" REPLAY{speed} ", style="bold reverse")
            t.append(" ")
        t.append("pdtui ", style="bold")
        t.append(f"{h.profile} ", style="bold cyan")
        # what changes first (uptime, ready, stopped), then what describes the pair: one line at 80
        up = self.uptime()
        if up is not None:
            t.append(f"up {fmt_duration(up)} ", style="bold")
        if h.broken is not None:  # up, but the warm-up says the pair does not work
            t.append("BROKEN ", style="bold red")
        elif h.ready_s is not None:
            t.append(f"ready {h.ready_s:.0f}s ", style="green")
        if h.stopped:
            t.append(f"STOPPED ({h.stopped}) ", style="bold red")
        if self.mismatch:
            t.append(f"P≠D {self.mismatch} ", style="bold red")
        shape = f" ({h.model_shape})" if h.model_shape and h.model_shape != h.model else ""
        t.append(f"{h.model}{shape} ")
        t.append(f"{h.connector} ", style="magenta")
        if h.link is not None:  # the emulated link between P and D (pdtui.core.link)
            t.append(f"link {h.link.get('describe', '?')} ", style="bold yellow")
        t.append(f"{h.proxy_url.removeprefix('http://')} ", style="underline")
        t.append(f"{h.vllm_version or 'vLLM ?'}", style="dim")
        return t
