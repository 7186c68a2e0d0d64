"""The Runtime: owns the instances, the proxy and the scrapers; emits one stream of typed events.

    rt = Runtime(topology.pair(cfg))  # or any Topology: a bench arm, NpMd, engines attached by URL
    events = rt.subscribe()          # before start(), to see everything
    await rt.start()                 # instances ready, proxy up, pair warmed up
    ...                              # rt.kill("D"), rt.restart("D"), ...
    await rt.aclose()                # everything stopped, nothing left behind

The dashboard, ``--headless``, the recorder and the benchmark are all subscribers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import IO, Any

import httpx

from pdtui.core import config as config_mod
from pdtui.core import connectors, scrape, witness
from pdtui.core import link as link_mod
from pdtui.core.attached import AttachedInstance
from pdtui.core.config import PairConfig
from pdtui.core.control import Control, ControlError, ControlServer, default_socket_path
from pdtui.core.events import (
    ConnectorEvent,
    Event,
    EventHub,
    InstanceStateChanged,
    LinkShaped,
    MetricsSampled,
    Notice,
    PairBroken,
    PairReady,
    RequestTraced,
    RuntimeStarted,
    RuntimeStopped,
)
from pdtui.core.otlp import OtlpReceiver
from pdtui.core.pairwatch import DisconnectWatch
from pdtui.core.paths import state_dir  # runtime.state_dir(): the runs/ and ctl/ folders live there
from pdtui.core.proxy import WARMUP_HEADER, ProxyProcess
from pdtui.core.source import RunInfo
from pdtui.core.supervisor import Instance, StartupFailed, WarmupFailed, check_port_free, ensure_reaper
from pdtui.core.topology import Attach, Member, Topology
from pdtui.core.versions import installed_vllm

WARMUP_PROMPT = "pdtui warm-up: the first request of a pair pays the NIXL handshake. " * 2


class Runtime:
    """Starts and watches one :class:`pdtui.core.topology.Topology` (the pair of a profile, a
    bench arm, engines attached by URL); implements :class:`pdtui.core.source.Source`. A launched
    member is a supervisor :class:`Instance`, an attached one an :class:`AttachedInstance` (same
    surface, same events); the rest (proxy, scrapers, control) does not tell them apart."""

    def __init__(self, topology: Topology, *, log_dir: Path | None = None, control_socket: Path | None = None,
                 serve_control: bool = True) -> None:
        cfg = topology.cfg
        self.topology = topology
        self.cfg = cfg
        self.specs = [m.launch for m in topology.members if m.launch is not None]
        if self.specs:  # the config rendered their command lines: it must hold as a pair
            config_mod.validate(cfg)
        self.geometry = topology.geometry
        found = installed_vllm()
        self.vllm_version = topology.vllm_version or (f"{found[0]} {found[1]}" if found else None)
        self.log_dir = log_dir or default_run_dir(cfg)
        """Engine logs (one file per instance, across restarts) and the proxy's: what a crash leaves."""
        self.link: link_mod.Link | None = link_mod.Link(topology.link) if topology.link is not None else None
        """The emulated link between P and D (pdtui.core.link): made by start() before the engines, which
        run in its namespaces; removed by aclose() after them. None: loopback."""
        self.instances: dict[str, Instance | AttachedInstance] = {}
        for m in topology.members:
            if m.launch is None:
                self.instances[m.name] = AttachedInstance(m, self.emit, ready_timeout_s=cfg.ready_timeout_s,
                                                          stop_grace_s=cfg.stop_grace_s)
                continue
            linked = self.link is not None  # its ports are in a namespace of its own, new with the run
            self.instances[m.name] = Instance(
                m.launch, self.emit, ready_timeout_s=cfg.ready_timeout_s, stop_grace_s=cfg.stop_grace_s,
                host=cfg.host, port=None if linked else m.port,
                side_channel_port=None if linked else m.side_channel_port, log_dir=self.log_dir,
            )
        # The proxy runs as a process of its own (pdtui proxy --managed): the dashboard's loop never
        # holds a stream back. It learns the instances' states from emit(), and its events come back
        # through emit() too.
        self.otlp: OtlpReceiver | None = None
        """The engines' per-request spans (cfg.traces_port): EngineSpan events, joined by request id."""
        plan = topology.proxy
        self.proxy: ProxyProcess | None = None if plan is None else ProxyProcess(
            [(n, self.instances[n].url) for n in plan.prefills],
            [(n, self.instances[n].url) for n in plan.decodes],
            host=plan.host, port=plan.port, settings=plan.settings,
            on_event=self.emit, log_path=self.log_dir / "proxy.log",
        )
        self.url = topology.url
        """Where clients send requests: the proxy's URL, or the one instance's without a proxy."""
        self.history: collections.deque[Event] = collections.deque(maxlen=20000)
        self.latest_metrics: dict[str, dict[str, float]] = {}
        self.disconnects = DisconnectWatch({m.name: m.role for m in topology.members})
        """A D stuck in NIXL_ERR_REMOTE_DISCONNECT: a Notice with the restart order (pdtui.core.pairwatch)."""
        self.hub = EventHub()
        self._tasks: list[asyncio.Task[Any]] = []
        self._closed = False
        self._pool_warned = False
        self._tcp_warned = False
        self._warmup_error: str | None = None
        self._broken: str | None = None
        self._transport_seen = False
        """UCX printed which transport reads the KV (its table): no guessing from throughput then."""
        self.t_start: float | None = None
        self.replay = False
        self.remote = False
        self.run = RunInfo(profile=cfg.profile_name, model_name=cfg.model_name, proxy_url=self.url,
                           block_size=cfg.block_size, model=topology.model,
                           max_model_len=cfg.max_model_len, ready_timeout_s=cfg.ready_timeout_s)
        """What a watcher needs of the config (pdtui.core.source.Source)."""
        self.control = Control(self)
        """status/kill/restart/down: what the dashboard's keys and `pdtui ctl` call (pdtui.core.control)."""
        self.control_socket: Path | None = (control_socket or default_socket_path(cfg.proxy_port)) if serve_control else None
        """Where start() serves ``self.control`` (``pdtui ctl``); removed by aclose()."""
        self._control_server: ControlServer | None = None

    # ----- events -------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        self.history.append(event)
        self.control.observe(event)
        if isinstance(event, InstanceStateChanged) and event.instance in self.instances and self.proxy is not None:
            self.proxy.set_up(event.instance, self.instances[event.instance].ready)
            self.proxy.set_info({"states": {n: i.state for n, i in self.instances.items()}})
        if isinstance(event, ConnectorEvent) and event.what in ("ucx_transport", "kv_read_transport"):
            self._check_transport(event)
        if isinstance(event, ConnectorEvent) and event.what == "kv_metrics":
            self._infer_transport(event)
        if isinstance(event, MetricsSampled):
            self.latest_metrics[event.instance] = event.values
        self.hub.publish(event)
        if (notice := self.disconnects.feed(event)) is not None:  # a pair stuck in REMOTE_DISCONNECT
            self.emit(notice)

    def subscribe(self) -> AsyncGenerator[Event, None]:
        """An async iterator over every event from now on; it ends when the Runtime closes."""
        return self.hub.subscribe()

    def record_to(self, stream: IO[str]) -> None:
        """Write every event as one JSON line (the replay source)."""
        events = self.subscribe()

        async def pump() -> None:
            async for ev in events:
                stream.write(ev.to_json() + "\n")
                stream.flush()

        self._tasks.append(asyncio.create_task(pump(), name="recorder"))

    # ----- lifecycle ----------------------------------------------------------------------
    def check_ports(self) -> None:
        if self.topology.proxy is not None:
            check_port_free(self.topology.proxy.host, self.topology.proxy.port, "proxy")
        for inst in self.instances.values():
            inst.check_ports()

    async def start(self) -> float:
        """Start everything; return the seconds until the pair was ready (warm-up included)."""
        self.t_start = time.monotonic()
        self.emit(
            RuntimeStarted(
                profile=self.cfg.profile_name, model=self.cfg.model_name, model_shape=self.cfg.synthetic_shape,
                connector=self.cfg.connector if self.topology.connector else "none", device=self.cfg.device,
                proxy_url=self.url,
                vllm_version=self.vllm_version,
                kv_bytes_per_token=self.geometry.bytes_per_token if self.geometry else None,
                block_size=self.cfg.block_size, kv_load_failure_policy=self.cfg.kv_load_failure_policy,
                instances=[_described(m) for m in self.topology.members],
                run_dir=str(self.log_dir),
                kv_geometry=dataclasses.asdict(self.geometry) if self.geometry else None,
                observe=self.topology.observe, router=self.topology.router,
                link=link_info(self.topology.link) if self.topology.link is not None else None,
            )
        )
        self.check_ports()
        if self.control_socket is not None:  # ControlInUse (a PortInUse) if another pdtui answers there
            try:
                self._control_server = await ControlServer(self.control, self.control_socket).start()
            except OSError as e:  # a folder that is not ours, a path too long: run on, without `pdtui ctl`
                self.emit(Notice(level="warning", text=f"no control socket (pdtui ctl will not reach this pdtui): {e}"))
        if self.link is not None:
            ensure_reaper()  # a pdtui killed with SIGKILL: its reaper removes the link (link.clean_stale)
            try:
                await asyncio.to_thread(self.link.up)
            except link_mod.LinkError as e:  # said as any failed start is (the CLI, the dashboard)
                await self.aclose(reason="start-up failed")
                raise StartupFailed(f"the link between P and D could not be made: {e}") from None
            except BaseException:
                await self.aclose(reason="start-up failed")
                raise
            self.emit(Notice(level="info", text=f"link up: P and D in namespaces {', '.join(self.link.plan.namespaces)},"
                             f" joined by {self.link.plan.prefill.link_dev}/{self.link.plan.decode.link_dev} at"
                             f" {self.link.spec.describe()}"))
        if self.proxy is not None:
            await self.proxy.start()  # emits ProxyStarted
        if self.cfg.traces_port is not None:
            self.otlp = OtlpReceiver(self.cfg.host, self.cfg.traces_port, self.emit,
                                     on_error=lambda text: self.emit(Notice(level="warning", text=text)))
            await self.otlp.start()
        try:
            for inst in self.instances.values():
                await inst.spawn()
                self._tasks.append(asyncio.create_task(self._scrape(inst), name=f"{inst.name}-scrape"))
                self._tasks.append(asyncio.create_task(self._watch(inst), name=f"{inst.name}-watch"))
            await asyncio.gather(*(inst.wait_ready() for inst in self.instances.values()))
            if self.topology.router is not None:  # observe: witness requests through the user's router
                self._tasks.append(asyncio.create_task(
                    witness.run(self.topology.router, self.cfg.model_name, self.emit), name="witness"))
            await self._proxy_sees_up()
            warm = self.topology.warmup and self.topology.proxy is not None and bool(self.topology.proxy.prefills)
            outcome, broken = await self._warmup_or_death() if warm else (None, None)
        except BaseException:
            await self.aclose(reason="start-up failed")
            raise
        elapsed = time.monotonic() - self.t_start
        self._broken = broken  # kept: the PairBroken event leaves the bounded history in a long run
        if broken is not None:
            self.emit(PairBroken(elapsed_s=round(elapsed, 3), reason=broken, warmup_outcome=outcome))
        else:
            self.emit(PairReady(elapsed_s=round(elapsed, 3), warmup_outcome=outcome))
        return elapsed

    async def _proxy_sees_up(self, timeout_s: float = 10.0) -> None:
        """Wait until the proxy's /health lists every instance as up (their states reach it through
        a pipe): no request, the warm-up's or a client's, is sent before it can reach them all."""
        plan = self.topology.proxy
        if plan is None:
            return
        try:
            await proxy_sees_up(plan.url, list(plan.decodes), timeout_s, prefills=list(plan.prefills))
        except TimeoutError as e:
            raise StartupFailed(str(e)) from None

    @property
    def closed(self) -> bool:
        """aclose() has begun."""
        return self._closed

    @property
    def broken(self) -> str | None:
        """Why the pair is up but not working (the warm-up's outcome), or None."""
        return self._broken

    def _dead(self) -> Instance | AttachedInstance | None:
        return next((i for i in self.instances.values() if i.death is not None or not i.alive), None)

    async def _warmup_or_death(self) -> tuple[str | None, str | None]:
        """The warm-up request, raced against the instances' deaths: (its outcome, why the pair is
        broken or None). An instance that dies during it (seen within the watcher's 0.25 s) fails
        the start at once with its cause (WarmupFailed), whatever the request is still doing; one
        that dies just after a failed answer is waited for a moment (bounded), so the cause named
        is the death, not the error it caused."""
        warm = asyncio.create_task(self.warmup(), name="warm-up")
        try:
            while not warm.done():
                if (dead := self._dead()) is not None:
                    raise WarmupFailed(self._death_words(dead, "during the warm-up request"))
                await asyncio.wait({warm}, timeout=0.1)
            outcome = warm.result()
            if outcome != "pair":
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    if (dead := self._dead()) is not None:
                        raise WarmupFailed(self._death_words(dead, "during the warm-up request"))
                    await asyncio.sleep(0.1)
        finally:
            if not warm.done():
                warm.cancel()
                with contextlib.suppress(BaseException):
                    await warm
        if outcome == "pair":
            return outcome, None
        why = self._warmup_error or f"it ended as {outcome}"
        return outcome, (f"the warm-up request through the pair failed: {why}; the KV transfer path is"
                         f" not working (logs: {self.log_dir})")

    def _death_words(self, inst: Instance | AttachedInstance, when: str) -> str:
        # the death's cause (signal, crash site) is settled a moment after the exit is seen
        return (f"{inst.name} ({inst.role}) died {when}: {inst.death or 'its API server exited'}."
                f" Log: {inst.log_path}")

    async def warmup(self, timeout_s: float = 180.0) -> str | None:
        """One P/D request through the proxy for every (P, D) of the topology, one after another, so
        that no client's request (nor a migration to another D) pays a NIXL handshake, nor the first
        use of logprobs: vLLM 0.32.0's sampler computes logprob ranks in a ``torch.compile``d
        function, whose first call has torch's inductor probe the CPU's vector ISA and build C++
        (py-spy: ``torch/_inductor/cpu_vec_isa.py _probe_load`` running the compiler), measured 19.6 s
        on P's first logprobs request with a cold cache, 2-3 s with a warm one
        (results/2026-12-07-amx/README.md). Both legs carry ``logprobs``, so P and D pay it here.
        Returns "pair" when every one went through the pair, else the first other outcome."""
        plan = self.topology.proxy
        pairs = [(p, d) for p in plan.prefills for d in plan.decodes] if plan is not None else []
        if len(pairs) <= 1:
            return await self._warm_one(None, timeout_s)
        for p, d in pairs:
            outcome = await self._warm_one((p, d), timeout_s)
            if outcome != "pair":
                return outcome
        return "pair"

    async def _warm_one(self, target: tuple[str, str] | None, timeout_s: float) -> str | None:
        body = {"model": self.cfg.model_name, "prompt": WARMUP_PROMPT, "max_tokens": 2, "ignore_eos": True,
                "logprobs": 1}
        rid = f"pdtui-warmup-{target[0]}-{target[1]}-{uuid.uuid4().hex[:8]}" if target else f"pdtui-warmup-{uuid.uuid4().hex[:8]}"
        header = f"P={target[0]},D={target[1]}" if target else "1"
        got: list[RequestTraced] = []
        events = self.subscribe()

        async def send() -> None:
            async with httpx.AsyncClient(timeout=timeout_s) as client:
                await client.post(f"{self.url}/v1/completions", json=body,
                                  headers={WARMUP_HEADER: header, "X-Request-Id": rid})

        async def wait_trace() -> None:
            async for ev in events:
                if isinstance(ev, RequestTraced) and ev.warmup and ev.request_id == rid:
                    got.append(ev)
                    return

        self._warmup_error = None
        which = f" ({target[0]} to {target[1]})" if target else ""
        try:
            await asyncio.wait_for(asyncio.gather(send(), wait_trace()), timeout_s)
        except (TimeoutError, httpx.HTTPError) as e:
            self._warmup_error = f"{type(e).__name__}: {e}{which}"
            self.emit(Notice(level="warning", text=f"warm-up request failed: {self._warmup_error}"))
            return None
        finally:
            await events.aclose()
        trace = got[0]
        if trace.outcome != "pair":
            self._warmup_error = f"it ended as {trace.outcome}{which}: {trace.fallback_reason or trace.error}"
            self.emit(Notice(level="warning", text=f"warm-up request {self._warmup_error};"
                             " the KV transfer path is not working"))
        return trace.outcome

    async def _watch(self, inst: Instance | AttachedInstance) -> None:
        """Report an instance that dies on its own."""
        while not self._closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await inst.wait_exit(timeout=None)
            if self._closed:
                return
            if inst._expected_exit is None:
                tail = " | ".join(line.strip()[-160:] for line in list(inst.log_tail)[-3:])
                self.emit(Notice(level="error", instance=inst.name,
                                 text=f"{inst.name} ({inst.role}) died: {inst.death}; {inst.after_death}."
                                 f" Log: {inst.log_path}." + (f" Last lines: {tail}" if tail else "")))
            # wait for a restart to re-arm
            while not self._closed and not inst.alive:
                await asyncio.sleep(0.5)

    async def _scrape(self, inst: Instance | AttachedInstance) -> None:
        """Poll, post, sleep, re-arm: never more than one scrape in flight per instance."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(3.0)) as client:
            while not self._closed:
                if inst.ready:
                    try:
                        t_asked = time.time()  # what the scrape shows is no older: the proxy's headroom
                        r = await client.get(f"{inst.url}/metrics")
                        if r.status_code == 200:
                            values = scrape.parse_metrics(r.text)
                            self.emit(MetricsSampled(instance=inst.name, values=values))
                            if self.proxy is not None:  # the choice of D by headroom, of P by queue
                                self.proxy.set_capacity({inst.name: {"t": t_asked, **scrape.capacity(values)}})
                            self._check_pools()
                    except (httpx.HTTPError, ValueError):
                        pass
                await asyncio.sleep(self.cfg.scrape_interval_s)

    def _check_transport(self, event: ConnectorEvent) -> None:
        """Warn once when KV reads on one host go over TCP (measured: ~330 MB/s on an H100)."""
        if event.what == "kv_read_transport" or (event.fields.get("scope") == "intra-node" and event.fields.get("rma")):
            self._transport_seen = True  # UCX's own table: trust it over a throughput guess
        if self._tcp_warned or not event.fields.get("over_tcp") or event.fields.get("scope") != "intra-node":
            return
        self._tcp_warned = True
        words = connectors.NIXL.transport_words["same_host_tcp"]  # pdtui/core/connectors.py
        self.emit(Notice(level="warning", instance=event.instance, text=words.format(
            transport=event.fields.get("rma") or event.fields.get("transport"))))

    def _infer_transport(self, event: ConnectorEvent) -> None:
        """Without UCX's info lines: GPU-to-GPU reads on one host under 2 GB/s are not CUDA IPC.
        NIXL's "Throughput" averages bytes over whole transfer times, handshakes and small reads
        included: on two H200s it read 496 MB/s while UCX's table said zero-copy cuda_ipc, so a
        table, when one was printed, wins."""
        mbps = event.fields.get("Throughput (MB/s)")
        if self._tcp_warned or self._transport_seen or self.cfg.device != "cuda" or not isinstance(mbps, (int, float)) or not mbps:
            return
        if mbps < (connectors.NIXL.slow_reads_below_mbps or 0):
            self._tcp_warned = True
            self.emit(Notice(level="warning", instance=event.instance,
                             text=connectors.NIXL.transport_words["slow_reads"].format(mbps=mbps)))

    def _check_pools(self) -> None:
        if self._pool_warned:
            return
        sizes = {n: scrape.kv_pool_tokens(v) for n, v in self.latest_metrics.items()}
        if len(sizes) < len(self.instances) or None in sizes.values():
            return
        self._pool_warned = True
        pinned = bool(self.cfg.instances) and all(i.kv_cache_memory_bytes for i in self.cfg.instances)
        if len(set(sizes.values())) > 1 and not pinned:  # pinned apart on purpose (1p2d-small): no warning
            desc = ", ".join(f"{n} {s:,} tokens" for n, s in sizes.items())
            self.emit(Notice(level="warning", text=f"KV pools differ: {desc}. Pin them with"
                             " kv_cache_memory_bytes in the profile."))

    # ----- drills -------------------------------------------------------------------------
    def instance(self, name: str) -> Instance | AttachedInstance:
        if name not in self.instances:
            raise KeyError(f"no instance {name!r}; have {', '.join(self.instances)}")
        return self.instances[name]

    def _refused(self, inst: Instance | AttachedInstance, verb: str) -> None:
        """An attached instance without the user's command for ``verb``: a ControlError saying so."""
        why = inst.refuses(verb)
        if why is not None:
            raise ControlError(why, "unavailable")

    async def kill(self, name: str, reason: str = "killed by pdtui (drill)") -> int | None:
        inst = self.instance(name)
        self._refused(inst, "kill")
        self.emit(Notice(level="warning", instance=name, text=f"killing {name} ({inst.role}): {inst.kill_means}"))
        return await inst.kill(reason=reason)

    async def stop_instance(self, name: str) -> int | None:
        return await self.instance(name).stop(reason="stopped by pdtui")

    async def restart(self, name: str) -> float:
        inst = self.instance(name)
        self._refused(inst, "restart")
        self.emit(Notice(level="info", instance=name, text=f"restarting {name} ({inst.role})"))
        return await inst.restart()

    async def reshape_link(self, spec: link_mod.LinkSpec) -> None:
        """Another rate, delay or loss on the running link, in place (its qdiscs replaced; the engines
        and their NIXL connections stay): the bench's --links runs one pair over every link."""
        if self.link is None:
            raise RuntimeError("no emulated link in this run (start it with --link)")
        await asyncio.to_thread(self.link.reshape, spec)
        self.emit(LinkShaped(link=link_info(self.link.plan, spec)))

    async def aclose(self, reason: str = "closed") -> None:
        if self._closed:
            return
        self._closed = True
        if self._control_server is not None:
            self._control_server.close()
        for t in self._tasks:
            if t.get_name() != "recorder":
                t.cancel()
        if self.proxy is not None:
            await self.proxy.stop()
        await asyncio.gather(*(i.stop(reason="stopped by pdtui") for i in self.instances.values()),
                             return_exceptions=True)
        if self.otlp is not None:  # after the engines: their last spans are flushed at exit
            await self.otlp.stop()
        if self.link is not None:  # after the engines: nothing holds its namespaces any more
            try:
                await asyncio.to_thread(self.link.down)
            except link_mod.LinkError as e:
                self.emit(Notice(level="error", text=str(e)))
        self.emit(RuntimeStopped(reason=reason))
        self.hub.close()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, timeout=5)


async def proxy_sees_up(url: str, decodes: list[str], timeout_s: float = 10.0, *,
                        prefills: list[str] | None = None) -> None:
    """Wait until the proxy at ``url`` lists every one of ``decodes`` (and ``prefills``) as up in
    its /health. Raises TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                h = (await client.get(f"{url}/health")).json()
                if all((h.get("decode") or {}).get(n) for n in decodes) and \
                        all((h.get("prefill") or {}).get(n) for n in prefills or ()):
                    return
            if time.monotonic() > deadline:
                names = ", ".join([*(prefills or ()), *decodes])
                raise TimeoutError(f"the proxy at {url} did not see {names} up within {timeout_s:.0f} s")
            await asyncio.sleep(0.05)


def _described(m: Member) -> dict[str, Any]:
    """A member as RuntimeStarted lists it: its command line, or (attached) its log and commands."""
    out: dict[str, Any] = {"name": m.name, "role": m.role, "url": m.url}
    if m.launch is not None:
        return {**out, "argv": m.launch.argv, "env": m.launch.env}
    a = m.attach or Attach()
    return {**out, "attached": True, "log": str(a.log) if a.log else None, "kill": a.kill, "restart": a.restart}


def link_info(plan: link_mod.LinkPlan, spec: link_mod.LinkSpec | None = None) -> dict[str, Any]:
    """The link as RuntimeStarted and LinkShaped carry it (the header, the detail's formula, a
    replay); ``spec``: its shape now, if not the plan's."""
    spec = spec or plan.spec
    return {**spec.to_json(), "describe": spec.describe() if spec.emulated else "veth, unshaped",
            "run_id": plan.run_id,
            "namespaces": list(plan.namespaces), "devices": [plan.prefill.link_dev, plan.decode.link_dev],
            "addresses": {"prefill": plan.prefill.link_addr, "decode": plan.decode.link_addr}}


def default_run_dir(cfg: PairConfig) -> Path:
    """A new folder per run: runs/<date>-<time>-<proxy port>."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = state_dir() / "runs" / f"{stamp}-{cfg.proxy_port}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


__all__ = ["Runtime", "StartupFailed", "Topology"]
