from __future__ import annotations

from collections.abc import Sequence

from textual_plotext import PlotextPlot

from pdtui.app.state import percentile

COLORS = {"pair": "green", "fallback": "orange", "error": "red"}
MARKS = ((50, "blue"), (90, "magenta"), (99, "red"))


class LatencyHistogram(PlotextPlot):
    """A histogram of (ms, outcome) samples; pair and fallback in their own colours, p50/p90/p99 marked."""

    DEFAULT_CSS = """
    LatencyHistogram { height: 1fr; min-height: 8; }
    """

    def __init__(self, title: str, *, bins: int = 20, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.title = title
        self.bins = bins
        self.samples: tuple[tuple[float, str], ...] = ()

    def on_mount(self) -> None:
        self.replot()

    def update(self, samples: Sequence[tuple[float, str]]) -> None:
        samples = tuple(samples)
        if samples == self.samples:
            return
        self.samples = samples
        self.replot()

    def marks(self) -> dict[int, float | None]:
        values = [v for v, _ in self.samples]
        return {q: percentile(values, q) for q, _ in MARKS}

    def replot(self) -> None:
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
        marks = self.marks()
        for q, color in MARKS:
            v = marks[q]
            if v is not None:
                plt.vline(v, color)
        plt.title(f"{self.title} ms  " + "  ".join(f"p{q} {marks[q]:.0f}" for q, _ in MARKS))
        self.refresh()
