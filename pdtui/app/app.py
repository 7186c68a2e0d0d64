"""PdtuiApp: the dashboard over a Runtime (live) or a Replay (a recording).

The app is a subscriber: one worker folds ``runtime.subscribe()`` into ``DashState`` and posts a
coalesced ``EventsFolded``; at most every ``REFRESH_INTERVAL_S`` the app takes one snapshot and
hands it to the widgets. Nothing from the engines is imported here; the kill and restart keys
call the runtime's ``Control`` (pdtui.core.control: the same methods ``pdtui ctl`` reaches through
the control socket; over ``pdtui attach``, a RemoteControl that forwards them to that socket), the
load keys the load generator. A read-only viewer (``pdtui attach --read-only``) has no kill or
restart keys: hidden, and a press of one is refused with a notice.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import httpx
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Static, TabbedContent, TabPane, Tabs
from textual.worker import Worker, WorkerState, get_current_worker

from pdtui.app import engine_config, gpu, loadgen
from pdtui.app.messages import EventsFolded, LoadFinished, RequestSelected, StreamEnded
from pdtui.app.notices import NOTICES, ShownNotice, file_line, one_line
from pdtui.app.state import PROXY_NEEDED, DashState, Header, Snapshot
from pdtui.app.widgets import InstancePane, LatencyHistogram, PairHeader, RequestDetail, TransfersTable
from pdtui.app.widgets.histograms import REPLOT_INTERVAL_S
from pdtui.app.widgets.notices import NoticesScreen
from pdtui.core.control import ControlError
from pdtui.core.events import Notice
from pdtui.core.paths import state_dir
from pdtui.core.source import Controls, Source
from pdtui.core.supervisor import PortInUse, StartupFailed

CONFIG_WAITING = "The engines' own configuration shows here once each is ready (not in a replay)."
FOOTER_PALETTE_MIN = 92
"""Columns from which the footer also shows the command palette's key (^p): below, it needs the
room for the dashboard's own keys (Ctrl-P opens the palette all the same)."""
GPU_INTERVAL_S = 1.0
REPLAY_DISABLED = "This is a replay: kill, restart and load are disabled."
READ_ONLY_REFUSED = ("This viewer is read-only (pdtui attach --read-only): {verb} is refused. Attach without"
                     " --read-only, or use `pdtui ctl {verb} NAME`, to act on the service.")
REFRESH_INTERVAL_S = 0.05
"""Shortest time between two refreshes of the views (20 Hz). Events fold into the state as they
come; the views follow at most this often, so a burst costs one refresh per interval, not one per
event (scripts/bench/bench_refresh.py, docs/dashboard.md)."""
FEW_CPUS_REFRESH_S = 0.5
"""The interval where pdtui has fewer than 4 CPUs: on the 2-core box, the proxy's gap p99 under the
open dashboard over the same run headless was 1.22x and 1.52x at 6,400 and 12,800 chunks/s at 20 Hz
(renice +19 or SCHED_IDLE did not help: 1.18-1.46x), 1.06x and 1.01x at 200 ms, 1.04x and 1.00x at
500 ms (results/2026-12-07-dashboard-2core)."""


def refresh_interval_s(env: Mapping[str, str] | None = None, cpus: int | None = None) -> float:
    """The live dashboard's refresh interval: ``PDTUI_REFRESH_MS`` if set (10 to 5000), else 50 ms
    with 4 CPUs or more for this process, FEW_CPUS_REFRESH_S with fewer. Raises ValueError, in
    words, for a bad ``PDTUI_REFRESH_MS``."""
    env = os.environ if env is None else env
    given = env.get("PDTUI_REFRESH_MS")
    if given:
        try:
            ms = float(given)
        except ValueError:
            ms = -1.0
        if not 10 <= ms <= 5000:
            raise ValueError(f"PDTUI_REFRESH_MS={given!r}: milliseconds between two refreshes, 10 to 5000")
        return ms / 1000
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    return REFRESH_INTERVAL_S if cpus >= 4 else FEW_CPUS_REFRESH_S


class PdtuiApp(App[int]):
    CSS_PATH = "pdtui.tcss"
    TITLE = "pdtui"
    KILL = Binding.Group("Kill D/P", compact=True)
    RESTART = Binding.Group("Restart D/P", compact=True)
    LOAD = Binding.Group("Load", compact=True)
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("k", "kill('decode')", "Kill D", group=KILL),
        Binding("K", "kill('prefill')", "Kill P", group=KILL),
        Binding("r", "restart('decode')", "Restart D", group=RESTART),
        Binding("R", "restart('prefill')", "Restart P", group=RESTART),
        # a read-only viewer's (check_action): the same keys, hidden, refused with a notice
        Binding("k,K", "refuse('kill')", show=False),
        Binding("r,R", "refuse('restart')", show=False),
        Binding("1", "load('single')", "1 req", group=LOAD),
        Binding("2", "load('steady')", "Streams", group=LOAD),
        Binding("3", "load('big')", "Big", group=LOAD),
        Binding("4", "load('mix')", "Mix", group=LOAD),
        Binding("c", "clear_histograms", "Clear", show=False),
        Binding("s", "screenshot", "Shot"),
        Binding("l", "toggle_logs", "Logs"),
        Binding("n", "notices", "Notices"),
        Binding("t", "show_tab('transfers')", "Transfers", show=False),
        Binding("h", "show_tab('latency')", "Latency", show=False),
        Binding("g", "show_tab('config')", "Config", show=False),
    ]
    AUTO_FOCUS = "#table"
    """The transfers table has the focus from the start: the arrows move its cursor without a Tab."""

    def __init__(self, runtime: Source, *, replay: bool = False, clock: Callable[[], float] = time.time,
                 screenshot_dir: Path | str | None = None, speed: float | None = None,
                 freeze_gc: bool = False, refresh_s: float | None = None) -> None:
        super().__init__()
        self.freeze_gc = freeze_gc
        self.refresh_s = REFRESH_INTERVAL_S if refresh_s is None else refresh_s
        """Shortest time between two refreshes of the views (refresh_interval_s() for the CLI's)."""
        self.runtime = runtime
        self.replay = replay
        self.clock = clock
        self.speed = speed
        self._screenshot_dir = Path(screenshot_dir) if screenshot_dir is not None else None
        """The folder `s` writes into, when given (pdtui drill --shots, tests): screenshot_dir."""
        self.state = DashState()
        self.snapshot: Snapshot = self.state.snapshot()
        self.load_totals = {"ok": 0, "errors": 0}
        self.ended = False
        self.start_error: str | None = None
        """Why the start failed (an engine died during start-up or the warm-up), or None."""
        self._events = runtime.subscribe()
        self.control: Controls = runtime.control
        """kill/restart/down: the same object `pdtui ctl` reaches through the control socket."""
        self.read_only = self.control.read_only
        """No kill or restart keys (pdtui attach --read-only)."""
        self._geometry = runtime.geometry
        self._last_refresh = float("-inf")
        self._refresh_pending: Timer | None = None
        self._notice_shown: Notice | None = None
        self._notice_settled: Notice | None = None
        self.notices: collections.deque[ShownNotice] = collections.deque(maxlen=NOTICES)
        """What the notice line showed, each whole: the notices screen (`n`) lists them."""
        self._load_sizer: tuple[loadgen.Sizer | None] | None = None
        self.engine_configs: dict[str, dict[str, str]] = {}
        """What each ready engine reports of its configuration (pdtui.app.engine_config)."""
        self._probed: dict[str, float | None] = {}
        self.probe_transport: httpx.AsyncBaseTransport | None = None
        self.nvml_module = "pynvml"
        """The NVML module the GPU line reads (tests name a fake one)."""
        self.gpu_views: tuple[gpu.GpuView, ...] = ()
        self.links: dict[tuple[str, str], gpu.LinkRate] = {}
        """The link between each P's GPUs and each D's (NVML, from the GPU thread): (P, D) -> LinkRate."""
        self._link_keys: dict[tuple[str, str], tuple[Any, ...]] = {}
        """For tests: the transport of the configuration probe's client."""
        self._observe_shown: tuple[bool, str | None] = (False, None)
        self._keys_shown: tuple[Any, ...] = ()
        """What the kill/restart/load keys' availability was computed from (refresh_bindings on a change)."""

    # ----- layout -------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield PairHeader(clock=self.clock, replay=self.replay, speed=self.speed, id="header")
        yield Static("", id="gpus")
        with Horizontal(id="instances"):
            for name, inst in self.runtime.instances.items():
                yield InstancePane(name, inst.role, clock=self.clock, id=f"pane-{name}")
        with TabbedContent(id="main", initial="transfers"):
            with TabPane("Transfers", id="transfers"):
                yield Static("", id="proxy-needed")
                yield TransfersTable(id="table")
                yield RequestDetail(geometry=self._geometry, id="detail")
            with TabPane("Latency", id="latency-tab"), Horizontal(id="latency"):
                yield LatencyHistogram("TTFT", id="ttft")
                yield LatencyHistogram("ITL", phase=REPLOT_INTERVAL_S / 2, id="itl")
            with TabPane("Config", id="config-tab"), VerticalScroll(id="config-scroll"):
                yield Static(CONFIG_WAITING, id="config")
        yield Static("", id="notice")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = ("replay" if self.replay else
                          ("attached, read-only" if self.read_only else "attached") if self.runtime.remote else "live")
        self.consume_events()
        self.start_runtime()
        if not self.replay:
            self.control.on_down(lambda: self.exit(0))  # `pdtui ctl down`: the engines are stopped, close
            if not self.runtime.remote:  # attached from elsewhere, this machine's GPUs are not the run's
                self.sample_gpus()
            self.set_interval(1.0, self._tick_startup)
        if self.freeze_gc:
            self.call_after_refresh(self._freeze_gc)

    @staticmethod
    def _freeze_gc() -> None:
        """Move everything alive after the first paint (modules, CSS, the widgets) out of the
        collector's sight: its full passes then scan only what the running dashboard allocates. At
        200 events/s they came every ~2 s and took 60-95 ms each, the refresh-latency tail
        (scripts/bench/bench_refresh.py). For the process that runs one dashboard (the CLI), not for tests
        that start many: frozen objects are never freed."""
        gc.freeze()

    def _tick_startup(self) -> None:
        """Start-up progress counts seconds even when no event arrives."""
        for pane in self.query(InstancePane):
            if pane.view is not None and pane.view.state == "starting":
                pane.refresh()

    def on_resize(self) -> None:
        wide = self.size.width >= 120 and self.size.height >= 40
        self.screen.set_class(wide, "-wide")
        for detail in self.query(RequestDetail):
            detail.wide = wide
        for footer in self.query(Footer):
            footer.show_command_palette = self.size.width >= FOOTER_PALETTE_MIN

    # ----- the event stream ---------------------------------------------------------------
    @work(group="events", description="fold the runtime's events", exit_on_error=False)
    async def consume_events(self) -> None:
        async for ev in self._events:
            self.state.apply(ev)
            self.post_message(EventsFolded(self.state.version))
        self.post_message(StreamEnded(self.replay))

    @work(group="runtime", description="start the pair", exclusive=True, exit_on_error=False)
    async def start_runtime(self) -> None:
        try:
            await self.runtime.start()
        except PortInUse as e:  # another pdtui took the ports meanwhile: never stay open over it
            self.exit(return_code=1, message=f"pdtui: {e}")
        except StartupFailed as e:  # an engine died during start-up or the warm-up: everything
            # was stopped; the dashboard stays open on the cause and the logs (r/R start again)
            self.start_error = str(e)
            first = self.start_error.splitlines()[0]
            self.show_notice(f"start-up failed: {first}", "error")

    @on(EventsFolded)
    def events_folded(self) -> None:
        """Refresh now, or once the interval since the last refresh is over (one timer at a time)."""
        if self._refresh_pending is not None:
            return
        wait = self._last_refresh + self.refresh_s - time.monotonic()
        if wait <= 0:
            self.refresh_views()
        else:
            self._refresh_pending = self.set_timer(wait, self.refresh_views, name="refresh views")

    def refresh_views(self) -> None:
        """One snapshot of the state, handed to the widgets."""
        self._refresh_pending = None
        self._last_refresh = time.monotonic()
        if not self.query(PairHeader):  # shutting down: the widgets are gone
            return
        snap = self.snapshot = self.state.snapshot()
        header = self.query_one(PairHeader)
        header.header = snap.header
        if self.replay:  # the replay's clock; live, the header ticks on its own every second
            header.last_t = snap.last_t
        detail = self.query_one(RequestDetail)
        if snap.header.block_size:
            detail.block_size = snap.header.block_size
            detail.bytes_per_token = snap.header.kv_bytes_per_token
        row = self.query_one("#instances", Horizontal)
        now = snap.last_t if self.replay else None
        if (snap.header.observe, snap.header.router) != self._observe_shown:
            self._show_observe(snap.header)
        if snap.header.observe:
            self._show_witness(snap)
        keys = (snap.header.observe, snap.header.router,
                *((v.name, v.role, v.refuses("kill"), v.refuses("restart")) for v in snap.instances))
        if keys != self._keys_shown:
            self._keys_shown = keys
            self.refresh_bindings()
        for view in snap.instances:
            panes = self.query(f"#pane-{view.name}").results(InstancePane)
            pane = next(panes, None)
            if pane is None:
                pane = InstancePane(view.name, view.role, clock=self.clock, id=f"pane-{view.name}")
                row.mount(pane)
            pane.view = view
            pane.now = now
            pane.observe = snap.header.observe
            if (not self.replay and view.state == "ready" and view.url
                    and self._probed.get(view.name, -1.0) != view.started_t):
                self._probed[view.name] = view.started_t
                self.probe_engine(view.name, view.url)
        self.query_one(TransfersTable).update(snap.requests, snap.handshakes)
        self.query_one(TransfersTable).mark_wrong(snap.wrong_answers)
        self.query_one("#ttft", LatencyHistogram).update(snap.ttft, snap.ttft_recent)
        self.query_one("#itl", LatencyHistogram).update(snap.itl, snap.itl_recent)
        if snap.notices and snap.notices[-1] is not self._notice_shown:
            n = self._notice_shown = snap.notices[-1]
            self.show_notice(n.text, n.level, t=n.t)
        self._settle_notice(snap)

    def _show_observe(self, h: Header) -> None:
        """Observe only (pdtui attach --observe): no proxy in the path, so the per-request panes
        say why they are empty; the histograms show witness requests when there is a router."""
        self._observe_shown = (h.observe, h.router)
        needed = self.query_one("#proxy-needed", Static)
        needed.set_class(h.observe, "-shown")
        self.query_one(TransfersTable).display = not h.observe
        if not h.observe:
            return
        how = (f"witness requests through {h.router} (one every few seconds) give TTFT/ITL from outside: Latency tab"
               if h.router else "--witness URL sends a few small requests through your router for TTFT/ITL from outside")
        needed.update(Text(f"{PROXY_NEEDED}: observe only, the requests go through your router. {how}.",
                           style="bold yellow"))
        detail = self.query_one(RequestDetail)
        detail.placeholder = f"{PROXY_NEEDED} (pdtui attach without --observe puts it there)"
        detail.refresh()
        for hist_id, title in (("#ttft", "TTFT"), ("#itl", "ITL")):
            hist = self.query_one(hist_id, LatencyHistogram)
            if h.router:
                hist.relabel(f"{title} (witness)", f"witness requests through {h.router}: none answered yet")
            else:
                hist.relabel(title, f"{PROXY_NEEDED}; --witness URL for TTFT/ITL from outside")

    def _show_witness(self, snap: Snapshot) -> None:
        h = snap.header
        if not h.router:
            return
        sent, errors = snap.counts.get("witness", 0), snap.counts.get("witness_errors", 0)
        text = Text(f"{PROXY_NEEDED}: observe only, the requests go through your router.\n", style="bold yellow")
        text.append(f"witness requests through {h.router}: {sent} sent, {errors} failed", style="yellow")
        if snap.witness_error:
            text.append(f"; last: {snap.witness_error}", style="red")
        text.append(" (TTFT/ITL from outside: Latency tab)", style="dim")
        self.query_one("#proxy-needed", Static).update(text)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """A read-only viewer's kill and restart bindings are hidden and give way to ``refuse``. The
        kill and restart keys are off (shown greyed) for an attached instance without the user's
        command (its pane says why); the load keys in observe mode without a router."""
        if action in ("kill", "restart") and self.read_only:
            return False
        if action == "refuse":
            return self.read_only
        if action in ("kill", "restart") and parameters:
            name = self.instance_for(str(parameters[0]))
            view = self.snapshot.instance(name) if name is not None else None
            if view is not None and view.refuses(action) is not None:
                return None
        if action == "load" and self.snapshot.header.observe and not self.snapshot.header.router:
            return None
        return True

    def _settle_notice(self, snap: Snapshot) -> None:
        """A notice about an instance ("restarting D", "killing D") that its process has answered
        since, by starting again and being ready, gives way to that: it would otherwise stay on the
        status line after the restart."""
        n = self._notice_shown
        if n is None or not n.instance or n is self._notice_settled:
            return
        v = snap.instance(n.instance)
        if v is not None and v.state == "ready" and v.started_t is not None and v.started_t >= n.t:
            self._notice_settled = n
            took = f" in {v.elapsed_s:.1f}s" if v.elapsed_s is not None else ""
            self.show_notice(f"{v.name} ({v.role}) ready again{took}")

    @work(group="gpus", description="sample the GPUs (NVML)", thread=True, exclusive=True, exit_on_error=False)
    def sample_gpus(self) -> None:
        """Each GPU's memory and NVLink/PCIe traffic once a second, in a thread (NVML calls block).
        No nvidia-ml-py or no driver (a CPU box): returns at once and the line stays hidden."""
        nvml = gpu.open_nvml(self.nvml_module)
        if nvml is None:
            return
        sampler = gpu.GpuSampler(nvml)
        probe = gpu.LinkProbe(nvml)
        worker = get_current_worker()
        try:
            while not worker.is_cancelled:
                views = sampler.sample()
                links = self._probe_links(probe)
                self.call_from_thread(self._show_gpus, views, links)
                time.sleep(GPU_INTERVAL_S)
        except RuntimeError:  # the app closed between two samples
            return

    def _probe_links(self, probe: gpu.LinkProbe) -> dict[tuple[str, str], gpu.LinkRate]:
        """The GPU thread: the link of each (P, D) pair whose GPUs are known or changed, once.
        Launched engines use the GPUs of their CUDA_VISIBLE_DEVICES (the profile's cuda_devices,
        else this pdtui's own), ranks 0..tp-1; attached ones, GPUs pdtui does not know."""
        snap = self.snapshot
        if snap.header.device != "cuda":
            return {}
        ps = [i for i in snap.instances if i.role == "prefill"]
        ds = [i for i in snap.instances if i.role == "decode"]
        links: dict[tuple[str, str], gpu.LinkRate] = {}
        for p in ps:
            for d in ds:
                if p.launch_env is None or d.launch_env is None:
                    links[(p.name, d.name)] = gpu.unknown("an attached engine: pdtui does not know its GPUs")
                    continue
                envs = [dict(p.launch_env), dict(d.launch_env)]
                devs = [gpu.cuda_devices(e.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES")), i.tp)
                        for e, i in zip(envs, (p, d), strict=True)]
                orders = {e.get("CUDA_DEVICE_ORDER", os.environ.get("CUDA_DEVICE_ORDER")) for e in envs}
                order = orders.pop() if len(orders) == 1 else None
                key = (*devs[0], "|", *devs[1], order)
                if self._link_keys.get((p.name, d.name)) != key or (p.name, d.name) not in self.links:
                    links[(p.name, d.name)] = probe.pair(devs[0], devs[1], order)
                    self._link_keys[(p.name, d.name)] = key
                else:
                    links[(p.name, d.name)] = self.links[(p.name, d.name)]
        return links

    def link_for(self, prefill: str | None, decode: str | None) -> gpu.LinkRate | None:
        """The link a request's KV crossed from its P to its D (the detail's KV read line), or None
        when it had no P/D pair."""
        if not prefill or not decode:
            return None
        h = self.snapshot.header
        if h.link is not None:  # pdtui made the link: its rate is what tc was told (pdtui.core.link)
            return gpu.emulated(h.link)
        if h.device == "cpu" and not h.attached:
            return gpu.LOOPBACK
        if (prefill, decode) in self.links:
            return self.links[(prefill, decode)]
        why = ("a replay: the run's GPUs are not here" if self.replay
               else "a viewer: the service's GPUs are not this machine's" if self.runtime.remote
               else "an attached engine: pdtui does not know its GPUs" if h.attached
               else "no NVML here (nvidia-ml-py and a driver)" if not self.gpu_views
               else f"device {h.device}" if h.device != "cuda" else "not probed yet")
        return gpu.unknown(why)

    def _show_gpus(self, views: tuple[gpu.GpuView, ...],
                   links: dict[tuple[str, str], gpu.LinkRate] | None = None) -> None:
        self.gpu_views = views
        if links is not None and links != self.links:
            self.links = links
            for detail in self.query(RequestDetail):  # the request shown gets its link now
                r = detail.request
                if r is not None:
                    detail.link = self.link_for(r.prefill, r.decode)
                    detail.refresh(layout=True)
        line = self.query_one("#gpus", Static)
        line.update(Text("\n".join(gpu.line(g) for g in views), no_wrap=True, overflow="ellipsis"))
        line.set_class(bool(views), "-shown")

    @work(group="probe", description="ask an engine its configuration", exit_on_error=False)
    async def probe_engine(self, name: str, url: str) -> None:
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(5.0), transport=self.probe_transport) as client:
                found = await engine_config.probe(client, url)
        except (httpx.HTTPError, ValueError, AttributeError, KeyError, TypeError):  # gone, or not vLLM: nothing to show
            return
        if found:
            self.engine_configs[name] = found
            self.show_engine_configs()

    def show_engine_configs(self) -> None:
        """P and D side by side in the Config tab; the differences in the header, critical in red."""
        roles = {v.name: v.role for v in self.snapshot.instances}
        names = sorted(self.engine_configs, key=lambda n: (roles.get(n) != "prefill", n))
        configs = {n: self.engine_configs[n] for n in names}
        diffs = engine_config.differences(configs)
        self.query_one(PairHeader).mismatch = engine_config.summary(diffs) if diffs else ""
        table = Table(title="What the engines report (GET /v1/models, vllm:cache_config_info)", expand=False,
                      title_justify="left", box=None, padding=(0, 1))
        table.add_column("key", style="bold")
        for n in names:
            table.add_column(f"{n} ({roles.get(n, '?')})")
        differing = {k for k, _ in diffs}
        keys = sorted(set().union(*configs.values()), key=lambda k: (k not in differing, k))
        for k in keys:
            style = ("bold red" if k in engine_config.CRITICAL else "yellow") if k in differing else ""
            table.add_row(k, *(configs[n].get(k, "-") for n in names), style=style)
        self.query_one("#config", Static).update(table)

    def _notice_width(self) -> int:
        return self.query_one("#notice", Static).content_region.width or max(1, self.size.width - 2)

    def show_notice(self, text: str, level: str = "info", *, line: str | None = None, t: float | None = None) -> None:
        """Show a notice on the notice line: ``line`` if given, else ``text`` if it fits, else its
        first clause (who, what, why: pdtui.app.notices.one_line), cut to the width; keep it
        whole for the notices screen (`n`)."""
        found = self.query("#notice")
        if not found:  # shutting down: the widgets are gone (a load worker can finish after them)
            return
        notice = found.first(Static)
        shown = line if line is not None else one_line(text, self._notice_width())
        self.notices.append(ShownNotice(self.clock() if t is None else t, level, text, shown))
        notice.update(Text(shown, no_wrap=True, overflow="ellipsis"))
        notice.set_class(level == "warning", "-warning")
        notice.set_class(level == "error", "-error")

    @on(StreamEnded)
    def stream_ended(self, message: StreamEnded) -> None:
        self.ended = True
        if message.replay:
            self.show_notice("Replay finished: the recording has ended. q quits.", "warning")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            err = event.worker.error
            text = f"{event.worker.description}: {type(err).__name__}: {err}"
            self.show_notice(text, "error")
            self.notify(text, severity="error", timeout=10)

    # ----- selection ----------------------------------------------------------------------
    @on(RequestSelected)
    def select_request(self, message: RequestSelected) -> None:
        # a selection posted just before the app shuts down arrives when the widgets are gone
        for detail in self.query(RequestDetail):
            detail.handshake = self.snapshot.handshakes.get(message.request_id)
            detail.spans = dict(self.snapshot.spans.get(message.request_id) or {})
            detail.kv_read = self.snapshot.kv_reads.get(message.request_id)
            r = self.snapshot.request(message.request_id)
            detail.link = self.link_for(r.prefill, r.decode) if r is not None else None
            detail.request = r

    # ----- controls -----------------------------------------------------------------------
    def instance_for(self, role_or_name: str) -> str | None:
        names = [i.name for i in self.snapshot.instances] or list(self.runtime.instances)
        if role_or_name in names:
            return role_or_name
        for inst in self.snapshot.instances:
            if inst.role == role_or_name:
                return inst.name
        for name, member in self.runtime.instances.items():
            if member.role == role_or_name:
                return name
        return None

    def _refuse_in_replay(self) -> bool:
        if self.replay:
            self.show_notice(REPLAY_DISABLED, "warning")
            self.notify(REPLAY_DISABLED, severity="warning")
        return self.replay

    def action_refuse(self, verb: str) -> None:
        text = READ_ONLY_REFUSED.format(verb=verb)
        self.show_notice(text, "warning")
        self.notify(text, severity="warning")

    def _control(self, which: str, verb: str) -> None:
        """Run ``control.<verb>(name)`` (kill or restart) in a worker, for an instance named or by role."""
        if self._refuse_in_replay():
            return
        if self.read_only:
            self.action_refuse(verb)
            return
        name = self.instance_for(which)
        if name is None:
            self.notify(f"no {which} instance", severity="warning")
            return
        self.run_worker(self._run_control(verb, name), group="control", description=f"{verb} {name}",
                        exit_on_error=False)

    async def _run_control(self, verb: str, name: str) -> None:
        try:
            answer = await (self.control.restart(name) if verb == "restart" else self.control.kill(name))
            if verb == "restart" and isinstance(answer, dict) and answer.get("ready_s") is not None:
                self.show_notice(f"{name} restarted: ready in {answer['ready_s']:.1f}s")
        except ControlError as e:  # already restarting, shutting down, failed to come back
            self.show_notice(f"{verb} {name}: {e}", "error" if e.code == "failed" else "warning")
            if e.code == "failed":
                self.notify(f"{verb} {name}: {e}"[:400], severity="error", timeout=10)

    def action_kill(self, which: str) -> None:
        self._control(which, "kill")

    def action_restart(self, which: str) -> None:
        self._control(which, "restart")

    def action_load(self, scenario: str) -> None:
        if self._refuse_in_replay():
            return
        desc = loadgen.SCENARIOS[scenario][0]
        self.show_notice(f"load: {desc} ...")
        self.run_load(scenario)

    async def _sizer(self) -> loadgen.Sizer | None:
        """The model's own tokenizer, found once (loading a large one takes a moment: a thread)."""
        if self._load_sizer is None:
            run = self.runtime.run  # no model here (a replay): local_sizer tries the served name
            model = run.model or run.model_name
            self._load_sizer = (await asyncio.to_thread(loadgen.local_sizer, model),)
        return self._load_sizer[0]

    @work(group="load", description="load generator", exit_on_error=False)
    async def run_load(self, scenario: str) -> None:
        run = self.runtime.run
        engines = [i.url for i in self.runtime.instances.values() if i.role == "prefill" and i.url]
        res = await loadgen.run(scenario, run.proxy_url, run.model_name, sizer=await self._sizer(),
                                max_model_len=run.max_model_len,
                                engine_url=engines[0] if engines else None)
        self.post_message(LoadFinished(scenario, res.ok, res.errors, res.sizes(), res.first_error))

    @on(LoadFinished)
    def load_finished(self, message: LoadFinished) -> None:
        self.load_totals["ok"] += message.ok
        self.load_totals["errors"] += message.errors
        level = "error" if message.errors else "info"
        counts = f"load {message.name}: {message.ok} ok, {message.errors} errors"
        why = f"; first error: {message.error}" if message.error else ""
        self.show_notice(f"{counts}, {message.detail} (total {self.load_totals['ok']} ok,"
                         f" {self.load_totals['errors']} errors){why}", level,
                         line=f"{counts}: {message.error}" if message.error else None)

    def action_clear_histograms(self) -> None:
        self.state.clear_latency()
        self.post_message(EventsFolded(self.state.version))

    @property
    def run_dir(self) -> Path | None:
        """This run's folder, with its logs (RuntimeStarted.run_dir); None before the runtime
        said it, and in a replay (the recording's is another run's, maybe on another machine)."""
        run_dir = self.state.header.run_dir
        return Path(run_dir) if run_dir and not self.replay else None

    @property
    def screenshot_dir(self) -> Path:
        """Where `s` writes its SVG: the folder given (pdtui drill --shots), else the run's folder
        (next to the logs), else, in a replay, <state dir>/screenshots. Never the current folder:
        from a checkout, that left SVGs untracked in the repository (issue 20)."""
        return self._screenshot_dir or self.run_dir or default_screenshot_dir()

    def action_screenshot(self, filename: str | None = None, path: str | None = None) -> None:
        """`s`: an SVG of the screen into ``path`` (default: screenshot_dir), named ``filename``
        (default: Textual's, the title and the time)."""
        folder = Path(path) if path else self.screenshot_dir
        try:
            folder.mkdir(parents=True, exist_ok=True)
            saved = Path(self.save_screenshot(filename=filename, path=str(folder))).resolve()
        except OSError as e:
            self.show_notice(f"screenshot not saved: {e}", "error")
            return
        said = "screenshot saved: "
        in_run = self._screenshot_dir is None and self.run_dir is not None
        self.show_notice(f"{said}{saved}", line=f"{said}{saved.name} in the run folder" if in_run
                         else file_line(said, saved, self._notice_width()))
        self.notify(str(saved), title="Screenshot saved", timeout=8)

    def action_toggle_logs(self) -> None:
        row = self.query_one("#instances")
        expanded = not row.has_class("-expanded")
        row.set_class(expanded, "-expanded")
        for pane in self.query(InstancePane):
            pane.expanded = expanded

    def action_notices(self) -> None:
        """The last notices whole, newest first, wrapped (the notice line shows one line)."""
        if not isinstance(self.screen, NoticesScreen):
            self.push_screen(NoticesScreen(self.notices))

    def action_show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = {"transfers": "transfers", "config": "config-tab"}.get(tab, "latency-tab")

    @on(TabbedContent.TabActivated)
    def tab_activated(self, event: TabbedContent.TabActivated) -> None:
        """Each tab gives the focus to what its keys move: the requests table (arrows, End), the
        configuration's scroll, or on the Latency tab (nothing to move) the tab bar, whose
        left/right go to the other tabs. Textual drops the focus of a widget that a tab hides and
        gives it back to nothing: the arrows then did nothing until Tab was pressed (issue 20)."""
        target = {"transfers": "#table", "config-tab": "#config-scroll"}.get(event.pane.id or "")
        if target is None:
            event.tabbed_content.query_one(Tabs).focus()
        else:
            self.query_one(target).focus()

    async def action_quit(self) -> None:
        self.show_notice("leaving: the service runs on (`pdtui ctl down` stops it)" if self.runtime.remote
                         else "stopping the engines and the proxy ...", "warning")
        try:
            await self.runtime.aclose()
        finally:
            self.exit(0)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        names = [(i.name, i.role) for i in self.snapshot.instances] or [
            (n, i.role) for n, i in self.runtime.instances.items()]
        for name, role in names if not self.read_only else ():
            yield SystemCommand(f"Kill {name}", f"SIGKILL {name} ({role}) and watch the consequence",
                                lambda n=name: self.action_kill(n))
            yield SystemCommand(f"Restart {name}", f"Stop and start {name} ({role})",
                                lambda n=name: self.action_restart(n))
        for key, (desc, _) in loadgen.SCENARIOS.items():
            yield SystemCommand(f"Load: {key}", desc, lambda k=key: self.action_load(k))
        yield SystemCommand("Clear histograms", "Forget the TTFT and ITL samples", self.action_clear_histograms)
        yield SystemCommand("Save screenshot", f"SVG into {self.screenshot_dir}/", self.action_screenshot)
        yield SystemCommand("Toggle log tails", "Expand or shrink the instances' log tails", self.action_toggle_logs)
        yield SystemCommand("Notices", "The last notices whole, newest first", self.action_notices)


def default_screenshot_dir() -> Path:
    """<state dir>/screenshots ($PDTUI_HOME/state, else $XDG_STATE_HOME/pdtui, else
    ~/.local/state/pdtui: pdtui.core.paths), next to the run folders: where `s` writes without a
    run folder (a replay)."""
    return state_dir() / "screenshots"


def make_app(runtime: Source, *, replay: bool = False, clock: Callable[[], float] = time.time,
             screenshot_dir: Path | str | None = None, speed: float | None = None,
             freeze_gc: bool = False, refresh_s: float | None = None) -> PdtuiApp:
    """The one factory for the CLI and the tests (the CLI passes ``freeze_gc=True`` and, for a live
    dashboard, ``refresh_s=refresh_interval_s()``; None: REFRESH_INTERVAL_S as it is at the call)."""
    return PdtuiApp(runtime, replay=replay or runtime.replay, clock=clock,
                    screenshot_dir=screenshot_dir, speed=speed, freeze_gc=freeze_gc,
                    refresh_s=REFRESH_INTERVAL_S if refresh_s is None else refresh_s)
