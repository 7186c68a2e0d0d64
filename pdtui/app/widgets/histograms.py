from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence

from rich.text import Text
from textual.app import RenderResult
from textual.timer import Timer
from textual_plotext import PlotextPlot

from pdtui.app.state import WINDOW_S
from pdtui.core.stats import percentile  # the one definition (vllm bench serve's)

COLORS = {"pair": "green", "fallback": "orange", "error": "red", "witness": "yellow"}
RECENT_COLOR = "cyan"
Samples = tuple[tuple[float, str], ...]
"""(ms, outcome) pairs, oldest first."""
DrawKey = tuple[Samples, Samples, int, int, str]
"""What a figure is drawn from: the samples, the recent ones, the width, the height, the theme."""
MARKS = ((50, "blue"), (90, "magenta"), (99, "red"))
REPLOT_INTERVAL_S = 1.0
"""Shortest time between two replots (1 Hz; it was 4 Hz): plotext redraws the whole figure (about
25 ms of CPU at 80x31, holding the GIL even in a thread), and a histogram of the last thousand
samples, or of the last 30 s, does not need to follow every request."""


class LatencyHistogram(PlotextPlot):
    """A histogram of (ms, outcome) samples since the start (or the last clear), pair and fallback in
    their own colours, next to the same of the last ``WINDOW_S`` seconds (cyan), so a change of load
    shows at once; p50/p90/p99 marked (since the start) and written for both.

    ``update()`` keeps the newest samples; the figure is redrawn at most every ``REPLOT_INTERVAL_S``,
    a deferred redraw on the grid of that interval shifted by ``phase`` seconds, and only while the
    widget is on the screen (a hidden tab draws once it is shown). plotext takes about 25 ms of CPU
    to draw one at 80x31, and it drew on the UI loop inside ``render()``: the refresh latency's tail
    (docs/dashboard.md). The drawing is now done in a thread worker; ``render()`` returns the last
    drawing. The thread holds the GIL while it runs Python, but gives it up every switch interval
    (5 ms), so the loop is delayed by slices, not by the whole draw.
    """

    DEFAULT_CSS = """
    LatencyHistogram { height: 1fr; min-height: 8; }
    """

    def __init__(self, title: str, *, bins: int = 20, phase: float = 0.0, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.title = title
        self.bins = bins
        self.phase = phase
        self.samples: Samples = ()
        self.recent: Samples = ()
        self._last_replot = float("-inf")
        self._replot_pending: Timer | None = None
        self._drawn: Text = Text("")
        self._drawn_key: DrawKey | None = None
        self._lock = threading.Lock()
        self.draws = 0
        """Figures drawn (tests and the benchmark read it)."""
        self.empty_text = "no samples yet"
        """The title with no samples (observe only: why there are none)."""

    def on_mount(self) -> None:
        super().on_mount()
        self.replot()

    def on_resize(self) -> None:
        self.replot()

    def update(self, samples: Sequence[tuple[float, str]], recent: Sequence[tuple[float, str]] = ()) -> None:
        samples, recent = tuple(samples), tuple(recent)
        if samples == self.samples and recent == self.recent:
            return
        self.samples, self.recent = samples, recent
        if self._replot_pending is not None:
            return
        now = time.monotonic()
        due = self._last_replot + REPLOT_INTERVAL_S
        if due <= now:
            self.replot()
            return
        due += (self.phase - due) % REPLOT_INTERVAL_S
        self._replot_pending = self.set_timer(due - now, self.replot, name="replot")

    def relabel(self, title: str, empty_text: str) -> None:
        """A new title and words for no samples (observe only: witness samples, or why there are
        none); drawn again."""
        if (title, empty_text) == (self.title, self.empty_text):
            return
        self.title, self.empty_text = title, empty_text
        self._drawn_key = None
        self.replot()

    def marks(self, samples: Sequence[tuple[float, str]] | None = None) -> dict[int, float | None]:
        values = [v for v, _ in (self.samples if samples is None else samples)]
        return {q: percentile(values, q) for q, _ in MARKS}

    def title_text(self, samples: Sequence[tuple[float, str]] | None = None,
                   recent_samples: Sequence[tuple[float, str]] | None = None, width: int = 80) -> str:
        samples = self.samples if samples is None else samples
        recent_samples = self.recent if recent_samples is None else recent_samples
        if not samples:
            return f"{self.title}: {self.empty_text}"
        marks = self.marks(samples)
        recent = self.marks(recent_samples)
        last = f"{recent[50]:.0f}/{recent[99]:.0f}" if recent_samples else "none"
        if width < 60:  # plotext leaves out a title wider than the plot
            return f"{self.title} p50 {marks[50]:.0f} p99 {marks[99]:.0f} | {WINDOW_S:.0f}s {last}"
        return (f"{self.title} ms all " + " ".join(f"p{q} {marks[q]:.0f}" for q, _ in MARKS)
                + f" | last {WINDOW_S:.0f}s p50/p99 {last}")

    def replot(self) -> None:
        """Draw the figure in a thread, if the widget is on the screen and something changed."""
        self._replot_pending = None
        width, height = self.size
        if not width or not height or not self.is_mounted:  # a hidden tab: drawn once it is shown
            return
        key: DrawKey = (self.samples, self.recent, width, height, self.app.theme)
        if key == self._drawn_key:
            return
        self._last_replot = time.monotonic()
        self.run_worker(lambda: self._draw(key), thread=True, group=f"plot-{self.id}", exit_on_error=False,
                        description=f"draw the {self.title} histogram")

    def _draw(self, key: DrawKey) -> None:
        samples, recent, width, height, theme = key
        with self._lock:
            plt = self.plt
            plt.clear_data()
            plt.clear_figure()
            plt.plotsize(width, height)
            plt._set_size(width, height)  # as PlotextPlot.render() does (textual-plotext issue 5)
            plt.theme(self._get_plotext_theme_name(theme))
            values = [v for v, _ in samples]
            if values:
                for outcome in ("pair", "fallback", "witness"):
                    vs = [v for v, o in samples if o == outcome]
                    if vs:
                        plt.hist(vs, bins=self.bins, label=f"{outcome} {len(vs)}", color=COLORS[outcome])
                rv = [v for v, _ in recent]
                if rv:
                    plt.hist(rv, bins=self.bins, label=f"last {WINDOW_S:.0f}s {len(rv)}", color=RECENT_COLOR)
                # the axis from 0: plotext pads the range of the bins on both sides, which went below 0
                plt.xlim(0, max(values) * 1.05 or 1.0)
                marks = self.marks(samples)
                for q, color in MARKS:
                    v = marks[q]
                    if v is not None:
                        plt.vline(v, color)
            plt.title(self.title_text(samples, recent, width))
            drawn = Text.from_ansi(plt.build())
            self.draws += 1
        with contextlib.suppress(RuntimeError):  # the app closed meanwhile
            self.app.call_from_thread(self._drawn_now, key, drawn)

    def _drawn_now(self, key: DrawKey, drawn: Text) -> None:
        self._drawn, self._drawn_key = drawn, key
        self.refresh()

    def render(self) -> RenderResult:
        return self._drawn
