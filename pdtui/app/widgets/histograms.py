from __future__ import annotations

import time
from collections.abc import Sequence

from textual.timer import Timer
from textual_plotext import PlotextPlot

from pdtui.app.state import percentile

COLORS = {"pair": "green", "fallback": "orange", "error": "red"}
MARKS = ((50, "blue"), (90, "magenta"), (99, "red"))
REPLOT_INTERVAL_S = 0.25
"""Shortest time between two replots (4 Hz): plotext redraws the whole figure, and a histogram of
the last thousand samples does not need to follow every request."""


class LatencyHistogram(PlotextPlot):
    """A histogram of (ms, outcome) samples; pair and fallback in their own colours, p50/p90/p99 marked.

    ``update()`` keeps the newest samples; the figure is redrawn at most every ``REPLOT_INTERVAL_S``,
    a deferred redraw on the grid of that interval shifted by ``phase`` seconds: plotext takes about
    25 ms of CPU to draw one at 80x31, so two histograms given different phases are not drawn in the
    same repaint.
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
        self.samples: tuple[tuple[float, str], ...] = ()
        self._last_replot = float("-inf")
        self._replot_pending: Timer | None = None

    def on_mount(self) -> None:
        self.replot()

    def update(self, samples: Sequence[tuple[float, str]]) -> None:
        samples = tuple(samples)
        if samples == self.samples:
            return
        self.samples = samples
        if self._replot_pending is not None:
            return
        now = time.monotonic()
        due = self._last_replot + REPLOT_INTERVAL_S
        if due <= now:
            self.replot()
            return
        due += (self.phase - due) % REPLOT_INTERVAL_S
        self._replot_pending = self.set_timer(due - now, self.replot, name="replot")

    def marks(self) -> dict[int, float | None]:
        values = [v for v, _ in self.samples]
        return {q: percentile(values, q) for q, _ in MARKS}

    def replot(self) -> None:
        self._replot_pending = None
        self._last_replot = time.monotonic()
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        values = [v for v, _ in self.samples]
        if not values:
            plt.title(f"{self.title}: no samples yet")
            self.refresh()
            return
        for outcome in ("pair", "fallback"):
            vs = [v for v, o in self.samples if o == outcome]
            if vs:
                plt.hist(vs, bins=self.bins, label=f"{outcome} {len(vs)}", color=COLORS[outcome])
        # the axis from 0: plotext pads the range of the bins on both sides, which went below 0
        plt.xlim(0, max(values) * 1.05 or 1.0)
        marks = self.marks()
        for q, color in MARKS:
            v = marks[q]
            if v is not None:
                plt.vline(v, color)
        plt.title(f"{self.title} ms  " + "  ".join(f"p{q} {marks[q]:.0f}" for q, _ in MARKS))
        self.refresh()
