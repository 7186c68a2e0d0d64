"""The proxy as a process of its own: ``pdtui proxy`` (``serve``) and its handle (``ProxyProcess``).

The proxy never shares an event loop with the dashboard, the bench's client or the Runtime's own
work: a plotext draw (~25 ms), a garbage collection or a burst of events there would hold every
stream relayed through it (measured, docs/proxy.md). So ``pdtui up`` and ``pdtui bench`` start
``pdtui proxy`` as a child process and talk to it through pipes:

- its command line carries the settings, whole, as ``--settings JSON`` (``ProxySettings.to_json``):
  nothing here names a setting, so a new one needs no change in this module;
- its stdout carries the events (``RequestTraced``, ``ProxyStarted``, ``Notice``) as JSON lines,
  written without ever blocking the relay (an asyncio pipe transport buffers them);
- in ``--managed`` mode its stdin carries the up/down state of each upstream, as the Runtime
  knows it (``{"up": {"D": false}}``), extra ``/health`` info, and each instance's KV pool and
  queue at every scrape (``{"capacity": {"D": {"t": ..., "total_blocks": 2048, "used_perc": 0.1,
  "waiting": 0}}}``: the choice of D by headroom and of P by queue, pdtui.core.proxy.routing), to
  which it answers with a ``HeadroomReported`` event per D; when stdin closes (pdtui ended, however
  it ended) the proxy exits. Without ``--managed`` it polls each upstream's ``/health`` (and, with
  ``--decode-choice headroom``, its ``/metrics``).

Run alone, over engines pdtui did not start::

    pdtui proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from pdtui.core.events import Event, HeadroomReported, Notice, ProxyStarted, RequestTraced, from_json
from pdtui.core.linesink import LineSink
from pdtui.core.proxy.contract import Proxy, Upstream
from pdtui.core.proxy.routing import Capacity
from pdtui.core.proxy.server import ProxyServer
from pdtui.core.proxy.settings import ProxyOptionError, ProxySettings, add_flags, from_flags

STDOUT_LINE_LIMIT = 2**26
"""A trace carries every inter-token gap: 64 MiB fits any stream."""


def parse_upstreams(values: list[str], role: str) -> list[tuple[str, str]]:
    """``URL`` or ``NAME=URL`` each; unnamed ones are P, P2, ... / D, D2, ..."""
    letter = "P" if role == "prefill" else "D"
    out: list[tuple[str, str]] = []
    for i, value in enumerate(values):
        name, _, url = value.rpartition("=") if "=" in value.split("://")[0] else ("", "", value)
        name = name or (letter if i == 0 else f"{letter}{i + 1}")
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ProxyOptionError(f"--{role} {value!r}: expected http://HOST:PORT or NAME=http://HOST:PORT")
        if any(n == name for n, _ in out):
            raise ProxyOptionError(f"--{role}: the name {name!r} is used twice")
        out.append((name, url.rstrip("/")))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", action="append", default=[], metavar="[NAME=]URL",
                   help="a prefill instance (kv_producer), e.g. http://127.0.0.1:8100; repeat for several."
                   " None: every request goes to a decode instance as it is (no P/D)")
    p.add_argument("--decode", action="append", default=[], metavar="[NAME=]URL",
                   help="a decode instance (kv_consumer); repeat for several (at least one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--record", type=Path, default=None, help="also write every event to this JSONL file")
    add_flags(p)  # one per ProxySettings field with a flag: pdtui.core.proxy.settings
    p.add_argument("--health-interval", type=float, default=1.0,
                   help="seconds between /health polls of each upstream (default 1; not with --managed)")
    p.add_argument("--managed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--settings", default=None, metavar="JSON", help=argparse.SUPPRESS)  # ProxyProcess: all of them


def settings_from(args: argparse.Namespace) -> ProxySettings:
    """``--settings`` (ProxyProcess hands the settings whole), else the settings' own flags."""
    if args.health_interval <= 0:
        raise ProxyOptionError("--health-interval must be positive")
    return ProxySettings.from_json(args.settings) if args.settings else from_flags(args)


class _EventWriter:
    """The events as JSON lines: to stdout through a LineSink (never blocks the loop, never raises;
    a reader that falls 16 MiB behind loses whole lines, counted, and is told how many when it
    catches up; a stdout that is closed or goes away loses them all, counted), and to --record."""

    def __init__(self, record: IO[str] | None) -> None:
        self.record = record
        self.sink = LineSink(sys.stdout, name="stdout", gap_line=self._gap_line,
                             on_change=lambda text: _log(f"{text} (pdtui_events_dropped_total on /metrics)"))

    @staticmethod
    def _gap_line(n: int) -> bytes:
        text = f"pdtui proxy: {n:,} events were dropped: its stdout was not read (pdtui_events_dropped_total)"
        return (Notice(level="warning", text=text).to_json() + "\n").encode()

    def __call__(self, event: Event) -> None:
        line = event.to_json() + "\n"
        self.sink.write(line.encode())
        if self.record is not None:
            self.record.write(line)

    def counts(self) -> tuple[int, int, int]:
        """Events (written, dropped because stdout was not read, dropped because it was gone)."""
        return self.sink.written, self.sink.dropped_full, self.sink.dropped_gone

    async def aclose(self) -> None:
        if self.record is not None:
            self.record.flush()
        await self.sink.aclose(1.0)


async def serve(args: argparse.Namespace) -> int:
    """``pdtui proxy``: serve until SIGINT/SIGTERM (or, with --managed, until stdin closes)."""
    settings = settings_from(args)
    prefills = parse_upstreams(args.prefill, "prefill")
    decodes = parse_upstreams(args.decode, "decode")
    if not decodes:
        raise ProxyOptionError("at least one --decode URL is needed")
    global _STDERR
    _STDERR = LineSink(sys.stderr, name="stderr", limit=2**20)  # its log, never blocking either
    record = args.record.open("a") if args.record else None
    emit = _EventWriter(record)
    if emit.sink.gone == "closed":
        _log("stdout is closed: events are dropped, and counted (pdtui_events_dropped_total on /metrics)")
    up: dict[str, bool] = {}
    info: dict[str, Any] = {}

    def is_up(name: str) -> Callable[[], bool]:
        return lambda: up.get(name, False)

    ups_p = [Upstream(n, "prefill", u, is_up=is_up(n)) for n, u in prefills]
    ups_d = [Upstream(n, "decode", u, is_up=is_up(n)) for n, u in decodes]

    def on_trace(ev: Event) -> None:
        emit(ev)
        if isinstance(ev, RequestTraced) and (ev.outcome != "pair" or ev.recomputed):
            _log(_trace_words(ev))

    proxy = Proxy(ups_p, ups_d, settings, on_trace=on_trace, health=lambda: dict(info))
    proxy.metrics.count_events(emit.counts)
    proxy.router.on_change = lambda name: report_headroom(proxy, name, emit)
    server = ProxyServer(proxy, args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    why_stop: list[str] = []

    def on_signal(name: str) -> None:
        why_stop.append(name)
        stop.set()

    # SIGHUP (the terminal went away) stops `pdtui proxy` as it stops `pdtui up --headless`, unless
    # it was ignored when the proxy started (nohup, `trap '' HUP`): then it stays ignored. Managed,
    # it is ignored: pdtui says when the proxy ends (stdin closes, SIGTERM). (No terminal's SIGHUP
    # reaches that one anyway: ProxyProcess starts it in a session of its own.)
    if args.managed:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    hangup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    for sig in (signal.SIGINT, signal.SIGTERM, *hangup):
        loop.add_signal_handler(sig, on_signal, sig.name)
    tasks: list[asyncio.Task[Any]] = []
    if args.managed:  # standalone: stderr is the user's terminal, whose first line says where it listens
        _log(f"starting (pid {os.getpid()}, managed by pdtui pid {os.getppid()});"
             f" prefill {', '.join(f'{n} {u}' for n, u in prefills) or 'none'}; decode {', '.join(f'{n} {u}' for n, u in decodes)};"
             f" settings {settings.to_json()}")

    def on_down(name: str) -> None:
        _log(f"{name} is down: its streams in flight are ended with an error event")
        proxy.upstream_down(name)

    def on_capacity(caps: dict[str, Any]) -> None:
        told_about(proxy, caps, emit)

    try:
        if args.managed:
            tasks.append(asyncio.create_task(_read_control(up, info, stop, on_down, on_capacity)))
        else:
            await _poll_health(ups_p + ups_d, up, emit, once=True)
            tasks.append(asyncio.create_task(_poll_health(ups_p + ups_d, up, emit, interval_s=args.health_interval)))
            if settings.decode_choice == "headroom":
                tasks.append(asyncio.create_task(_poll_metrics(ups_p + ups_d, up, on_capacity, args.health_interval)))
        await server.start()
        # Everything alive now lives as long as the process: out of the collector's sight, so a
        # full collection stays short (the legacy proxy stalled every stream 18-38 ms per gen-2
        # collection, about every 10 s at 6.4k chunks/s).
        gc.collect()
        gc.freeze()
        url = f"http://{args.host}:{args.port}"
        emit(ProxyStarted(url=url))
        if args.managed:
            _log(f"listening on {url}")
        if not args.managed:
            names = ", ".join(f"{u.name} {'up' if up.get(u.name) else 'DOWN'}" for u in ups_p + ups_d)
            _say(f"pdtui proxy: listening on {url}; {names} (Ctrl-C stops)")
        await stop.wait()
        _log(f"stopping: {why_stop[0] if why_stop else 'stdin closed (pdtui ended or asked)' if args.managed else 'asked'}")
    except BaseException as e:
        _log(f"failed: {type(e).__name__}: {e}")
        raise
    finally:
        for t in tasks:
            t.cancel()
        await server.stop()
        await emit.aclose()
        if record is not None:
            record.close()
        written, full, gone = emit.counts()
        if full or gone:
            _log(f"{emit.sink.summary().replace('lines', 'events')}; {written:,} written")
        err, _STDERR = _STDERR, None
        if err is not None:
            await err.aclose(0.5)
    return 0


_STDERR: LineSink | None = None
"""The proxy's stderr while it serves: its log lines never block the relay (a full pipe, a `2>&1`
shared with a stdout nobody reads), nor raise (a terminal gone)."""


def _say(text: str) -> None:
    """One line on stderr, through _STDERR while the proxy serves."""
    if _STDERR is not None:
        _STDERR.write((text + "\n").encode(errors="replace"))
        return
    with contextlib.suppress(OSError, ValueError, AttributeError):
        print(text, file=sys.stderr, flush=True)


def _log(text: str) -> None:
    """One line of the proxy's own log: its stderr, which the Runtime keeps as proxy.log in the run
    folder (ProxyProcess.log_path). Rare lines only (start, upstreams, stop, each request that did
    not pair): nothing per chunk, nothing per successful request."""
    _say(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pdtui proxy: {text}")


def _trace_words(t: RequestTraced) -> str:
    legs = f" (P {t.prefill or '-'}, D {t.decode or '-'})"
    if t.outcome == "pair":
        return (f"request {t.request_id}: paired{legs} but D computed {t.d_computed_tokens} of"
                f" {t.prompt_tokens} prompt tokens itself (silent recompute)")
    why = t.error if t.outcome == "error" else (t.fallback_reason or t.prefill_branch)
    return f"request {t.request_id}: {t.outcome}, HTTP {t.status}{legs}: {why}"


def told_about(proxy: Proxy, caps: dict[str, Any], emit: Callable[[Event], None]) -> None:
    """New scrapes (``{name: {"t": ..., "total_blocks": ..., ...}}``): into the proxy's routing,
    and each D's headroom out as an event (the dashboard's panes show it)."""
    decodes = {u.name for u in proxy.decodes}
    for name, raw in caps.items():
        cap = Capacity.of(raw)
        if cap is None:
            continue
        proxy.router.set_capacity(str(name), cap)
        if name in decodes:
            report_headroom(proxy, str(name), emit)


def report_headroom(proxy: Proxy, name: str, emit: Callable[[Event], None]) -> None:
    """D ``name``'s headroom as the proxy counts it now, as an event: at each scrape, and each time
    a request is sent to it or ends (``Router.on_change``); nothing before its first scrape."""
    h = proxy.router.headroom(name)
    cap = proxy.router.capacity.get(name)
    if h is not None and cap is not None:
        emit(HeadroomReported(instance=h.name, total_blocks=h.total_blocks, free_blocks=h.free_blocks,
                              promised_blocks=h.promised_blocks, requests=h.requests, scrape_t=cap.t))


async def _read_control(up: dict[str, bool], info: dict[str, Any], stop: asyncio.Event,
                        on_down: Callable[[str], None],
                        on_capacity: Callable[[dict[str, Any]], None] = lambda caps: None) -> None:
    """--managed: lines of JSON on stdin ({"up": {...}, "info": {...}, "capacity": {...}}); EOF
    ends the proxy. An upstream that goes down has its streams in flight ended at once (an SSE error
    event): its processes are gone or going, and their sockets may linger."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            with contextlib.suppress(json.JSONDecodeError, AttributeError, TypeError):
                msg = json.loads(line)
                for name, value in (msg.get("up") or {}).items():
                    was, up[str(name)] = up.get(str(name), False), bool(value)
                    if was and not value:
                        on_down(str(name))
                info.update(msg.get("info") or {})
                if isinstance(caps := msg.get("capacity"), dict):
                    on_capacity(caps)
    finally:
        stop.set()


async def _poll_health(ups: list[Upstream], up: dict[str, bool], emit: Callable[[Event], None],
                       interval_s: float = 1.0, once: bool = False) -> None:
    """Without a Runtime: an upstream is up while its /health answers 200."""
    while True:
        async def probe(u: Upstream) -> tuple[str, bool]:
            assert u.pool is not None
            try:
                conn = await u.pool.request("GET", "/health", [], head_timeout_s=2.0)
                await asyncio.wait_for(conn.read_all(), 2.0)
                ok = conn.status == 200
                u.pool.release(conn)
                return u.name, ok
            except (OSError, TimeoutError, ConnectionError):
                return u.name, False

        for name, ok in await asyncio.gather(*(probe(u) for u in ups)):
            if up.get(name) != ok and (name in up or not ok):
                emit(Notice(level="info" if ok else "warning", instance=name,
                            text=f"{name} is {'up' if ok else 'down'} (its /health)"))
            up[name] = ok
        if once:
            return
        await asyncio.sleep(interval_s)


async def _poll_metrics(ups: list[Upstream], up: dict[str, bool], on_capacity: Callable[[dict[str, Any]], None],
                        interval_s: float = 1.0) -> None:
    """Without a Runtime, with --decode-choice headroom: each upstream's /metrics, as the Runtime
    scrapes it, for the choice of D (and P's queue). Poll, tell, sleep."""
    from pdtui.core import scrape

    while True:
        for u in ups:
            if not up.get(u.name) or u.pool is None:
                continue
            t = time.time()
            try:
                conn = await u.pool.request("GET", "/metrics", [], head_timeout_s=2.0)
                text = await asyncio.wait_for(conn.read_all(), 2.0)
                ok = conn.status == 200
                u.pool.release(conn)
            except (OSError, TimeoutError, ConnectionError):
                continue
            if ok:
                with contextlib.suppress(ValueError):
                    on_capacity({u.name: {"t": t, **scrape.capacity(scrape.parse_metrics(text.decode()))}})
        await asyncio.sleep(interval_s)


def main(args: argparse.Namespace) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        return asyncio.run(serve(args))
    return uvloop.run(serve(args))


# ----- the handle the Runtime and the bench hold ----------------------------------------------


def _child_setup(cpus: list[int] | None) -> Callable[[], None]:
    def setup() -> None:  # between fork and exec
        from pdtui.core.supervisor import _die_with_parent

        _die_with_parent()
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cpus)
    return setup


def cpus_from_env() -> list[int] | None:
    raw = os.environ.get("PDTUI_PROXY_CPUS", "").strip()
    if not raw:
        return None
    try:
        cpus = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ProxyOptionError(f"PDTUI_PROXY_CPUS={raw!r}: expected CPU numbers like 2 or 2,3") from None
    bad = [c for c in cpus if c not in os.sched_getaffinity(0)]
    if bad:
        raise ProxyOptionError(f"PDTUI_PROXY_CPUS={raw!r}: CPU {bad[0]} is not available here"
                               f" (have {sorted(os.sched_getaffinity(0))})")
    return cpus


class ProxyProcess:
    """``pdtui proxy --managed`` as a child: start, feed it the upstreams' states, read its events."""

    def __init__(self, prefills: list[tuple[str, str]], decodes: list[tuple[str, str]], *, host: str, port: int,
                 settings: ProxySettings, on_event: Callable[[Event], None], python: str | None = None,
                 cpus: list[int] | None = None, log_path: Path | None = None) -> None:
        self.prefills, self.decodes = prefills, decodes
        self.host, self.port = host, port
        self.settings = settings
        self.on_event = on_event
        self.python = python or sys.executable
        self.cpus = cpus if cpus is not None else cpus_from_env()
        """CPUs the proxy runs on (default: $PDTUI_PROXY_CPUS, e.g. "2" or "2,3"; else any). On a
        box with cores to spare, give the proxy its own: docs/proxy.md."""
        self.log_path = log_path
        """The proxy's stderr (its own errors), kept for after the fact."""
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=50)
        self._tasks: list[asyncio.Task[Any]] = []
        self._started = asyncio.Event()
        self._stopping = False
        self._state: dict[str, bool] = {}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        """The child's command line: the settings as one JSON argument, whatever they hold."""
        argv = [self.python, "-m", "pdtui", "proxy", "--managed", "--host", self.host, "--port", str(self.port),
                "--settings", self.settings.to_json()]
        for name, url in self.prefills:
            argv += ["--prefill", f"{name}={url}"]
        for name, url in self.decodes:
            argv += ["--decode", f"{name}={url}"]
        return argv

    async def start(self, timeout_s: float = 30.0) -> None:
        from pdtui.core.supervisor import RUN_TAG, TAG_VAR, check_port_free, ensure_reaper

        check_port_free(self.host, self.port, "proxy")
        ensure_reaper()  # the proxy carries this pdtui's tag: nothing it started outlives it
        env = {**os.environ, TAG_VAR: f"{RUN_TAG}:proxy:{self.port}"}
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
            stderr=asyncio.subprocess.PIPE, limit=STDOUT_LINE_LIMIT, preexec_fn=_child_setup(self.cpus))
        self._tasks = [asyncio.create_task(self._pump_events(), name="proxy-events"),
                       asyncio.create_task(self._pump_stderr(), name="proxy-stderr")]
        if self._state:
            self._send({"up": self._state})
        waiter = asyncio.create_task(self._started.wait())
        exited = asyncio.create_task(self.proc.wait())
        try:
            await asyncio.wait({waiter, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            exited.cancel()
        if not self._started.is_set():
            await self.stop()
            await asyncio.sleep(0.05)
            tail = "\n".join(self.stderr_tail) or "(no output)"
            raise RuntimeError(f"the proxy process did not start on {self.url}:\n{tail}")

    def set_up(self, name: str, up: bool) -> None:
        """Tell the proxy whether an upstream takes requests now."""
        if self._state.get(name) == up:
            return
        self._state[name] = up
        self._send({"up": {name: up}})

    def set_capacity(self, caps: dict[str, dict[str, Any]]) -> None:
        """Instances' KV pools and queues at a scrape (``{name: {"t": ..., "total_blocks": ...,
        "used_perc": ..., "waiting": ...}}``: pdtui.core.proxy.routing.Capacity): the choice of D by
        headroom, of P by queue; the proxy answers with a HeadroomReported event per D."""
        self._send({"capacity": caps})

    def set_info(self, info: dict[str, Any]) -> None:
        """Extra fields for the proxy's /health answer."""
        self._send({"info": info})

    def _send(self, msg: dict[str, Any]) -> None:
        if self.proc is None or self.proc.stdin is None or self.proc.stdin.is_closing():
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")

    async def _pump_events(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                event = from_json(line.decode())
            except (ValueError, TypeError) as e:
                self.on_event(Notice(level="warning", text=f"proxy: unreadable event line ({e}): {line[:200]!r}"))
                continue
            if isinstance(event, ProxyStarted):
                self._started.set()
            self.on_event(event)
        code = await self.proc.wait()
        if not self._stopping:
            tail = " | ".join(list(self.stderr_tail)[-3:])
            self.on_event(Notice(level="error", text=f"the proxy process exited with code {code}. {tail}"))

    async def _pump_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        log = None
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log = self.log_path.open("a", buffering=1)
        try:
            while line := await self.proc.stderr.readline():
                text = line.decode(errors="replace").rstrip()
                self.stderr_tail.append(text)
                if log is not None:
                    log.write(text + "\n")
        finally:
            if log is not None:
                log.close()

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM (in-flight streams end with an error event), then SIGKILL after ``grace_s``."""
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 2)
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()


__all__ = ["ProxyProcess", "RequestTraced", "add_arguments", "main", "parse_upstreams", "serve"]
