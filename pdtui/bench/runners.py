"""The arms, one after another on the same hardware and the same seeded prompts.

- ``single``: one colocated vLLM instance (``config.render_single``: P's port and core/GPU,
  chunked prefill, no connector), supervised by ``supervisor.Instance``; the client talks to it
  straight;
- ``single-proxied``: the same instance, measured through pdtui's proxy process with no prefill
  instance (every request is relayed as it is): ``single`` through the same path as the pair, so
  the pair's toll and purchase compare like with like, and single-proxied vs single is the proxy's
  own cost;
- ``pair``: the ``Runtime`` (P + D + proxy process); every client sample is joined with the
  proxy's ``RequestTraced`` by X-Request-Id and with D's measured read of its KV (the "kv_read"
  ConnectorEvent: pdtui.core.logparse.KvRead), and D's ``vllm:nixl_bytes_transferred`` is scraped
  before and after the load to check the traces' bytes;
- ``two-single``: two colocated instances on P's and D's port and core/GPU behind the proxy
  process, round-robin (``proxied_settings``);
- with ``--cross-check``, ``vllm bench serve`` against each arm in each workload's shape
  (``cross_check``), compared in report.py.

The proxy always runs as a process of its own (``pdtui.core.proxy.ProxyProcess``): it never
shares an event loop with the bench's own work (this module's loop, which starts and watches the
engines, reads the client's output and collects the traces). The load client is a process of its
own too (``run_client``).

Warm-up: before the client measures anything, every engine of the single-instance arms has
served one request of the big prompts' shape straight at its own URL (``warm_instances``), and the
client's follow workload begins with one warm-up request per instance behind the arm's
round-robin (``run_client(warmups=...)``), so each instance has also served one through the arm's
path.
The pair is warmed by its Runtime (one P/D request through the proxy) and the client's warm-up.

Whatever happens (an error, Ctrl-C = task cancellation), each arm stops what it started in a
``finally`` and the ``BenchResult`` keeps every sample measured so far.

Engines someone else started (``pdtui bench --prefill URL --decode URL [--single URL]``,
``AttachedEngines``): each arm is the same kind of topology with attached members
(pdtui.core.topology.attached, as `pdtui attach` builds it; ``attached_single``), run by the same
``run_topology``: nothing is launched or pinned, and at the end of an arm pdtui stops its proxy and
stops watching them, no more. Nothing is restarted between arms, so the engines keep their prefix
caches: the prompts of such an arm carry its name and a nonce of the run (``ArmResult.prompt_salt``),
so that no arm, and no later run, finds its prompts cached (launched arms start with empty caches
and share the seed's prompts).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import itertools
import json
import math
import os
import platform
import secrets
import signal
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pdtui.bench import report, workload
from pdtui.bench.report import bytes_check
from pdtui.bench.workload import Clock, FillSpec, FollowSpec, InterferenceSpec, Sample
from pdtui.core import config as config_mod
from pdtui.core import connectors, kvmath, scrape, topology
from pdtui.core.config import PairConfig
from pdtui.core.events import (
    ConnectorEvent,
    EngineSpan,
    Event,
    InstanceStateChanged,
    Notice,
    PairBroken,
    PairReady,
    RequestTraced,
)
from pdtui.core.logparse import KvRead
from pdtui.core.proxy import DECODE_CHOICES, ProxyProcess
from pdtui.core.runtime import Runtime, proxy_sees_up  # noqa: F401 - proxy_sees_up: scripts and tests
from pdtui.core.source import InstanceView
from pdtui.core.supervisor import StartupFailed
from pdtui.core.topology import Topology, proxied_settings

ARMS = ("single", "single-proxied", "pair")
"""The default: the pair, and the single instance both straight and through the same proxy."""
SWITCH_ARMS: dict[str, dict[str, bool]] = {
    "pair-tokenize-once": {"tokenize_once": True},
    "pair-first-token": {"first_token_from_p": True},
    "pair-both": {"tokenize_once": True, "first_token_from_p": True},
}
"""The pair with the proxy's TTFT switches on (pdtui.core.proxy.firsttoken), each a pair of its own
started through the same Runtime and proxy process as ``pair``: the toll per switch in one run."""
ROUTING_ARMS: dict[str, dict[str, str]] = {
    f"pair-{choice}": {"decode_choice": choice} for choice in DECODE_CHOICES}
"""The pair under each of the proxy's choices of D (pdtui.core.proxy.routing): pair-least-loaded,
pair-round-robin, pair-headroom. They compare with several D (the 1p2d profiles) at a load that
fills a pool (the fill workload): the report counts failed requests and D's preemptions per arm."""
ARM_SWITCHES: dict[str, Mapping[str, object]] = {**SWITCH_ARMS, **ROUTING_ARMS}
"""The proxy settings each pair arm sets (ProxySettings fields): the switch arms' and the routing arms'."""
ALL_ARMS = (*topology.ARMS, *SWITCH_ARMS, *ROUTING_ARMS)
"""Every arm: a topology of pdtui.core.topology.ARMS (a new arm is a builder there), a switch arm
or a routing arm."""
WORKLOADS = tuple(workload.WORKLOADS)
DEFAULT_WORKLOADS = workload.DEFAULT_WORKLOADS
"""What runs without --workloads: follow and interference (fill is asked for by name)."""


PAIR_ARMS = ("pair", *SWITCH_ARMS, *ROUTING_ARMS)
"""The arms that are a P/D pair behind the proxy (the pair, with or without switches, under each choice of D)."""
LINK_ARM = "pair~"
"""``pair~<link>``: the pair over an emulated link (pdtui.core.link; `pdtui bench --links`), e.g.
pair~1gbit, pair~loopback (the pair as `pdtui up` runs it, no namespaces). (``pair@KEY`` is the
pair over another KV connector.)"""


def link_arm(link: str) -> str:
    return f"{LINK_ARM}{link}"


def arm_link(arm: str) -> str | None:
    """The link of a ``pair~<link>`` arm, else None."""
    return arm[len(LINK_ARM):] if arm.startswith(LINK_ARM) else None


def split_arm(arm: str) -> tuple[str, str | None]:
    """``pair@nixl-push`` -> ("pair", "nixl-push"): a pair arm over another KV connector (a key or vLLM
    name of pdtui.core.connectors); any other arm -> (arm, None)."""
    base, at, conn = arm.partition("@")
    return (base, conn) if at else (arm, None)


def arm_problem(arm: str) -> str | None:
    """Why ``arm`` is no arm (None: it is one): a known arm, a pair arm ``@`` a known connector, or
    the pair ``~`` a link (``--links`` makes them)."""
    link = arm_link(arm)
    if link is not None:
        return None if link else f"{arm}: no link after {LINK_ARM}"
    base, conn = split_arm(arm)
    if base not in ALL_ARMS:
        return f"unknown arm {arm!r}"
    if conn is not None:
        if base not in PAIR_ARMS:
            return f"{arm}: only a pair arm runs over a connector (pair@KEY)"
        if connectors.known(conn) is None:
            return f"{arm}: unknown connector {conn!r} (known: {', '.join(connectors.CONNECTORS)})"
    return None


def attached_refusal(arm: str, *, pair: bool, single: bool) -> str | None:
    """Why ``arm`` cannot run over engines given by URL (``pair``: --prefill and --decode given;
    ``single``: --single given), or None."""
    if split_arm(arm)[1] is not None:
        return (f"the {arm} arm launches a pair over its own connector: over engines given by URL the connector"
                " is the one they run")
    if arm_link(arm) is not None:
        return (f"the {arm} arm runs the pair over a link pdtui makes, in namespaces of its own: not over engines"
                " given by URL")
    if arm in PAIR_ARMS:
        return None if pair else f"the {arm} arm needs a pair: --prefill URL and --decode URL"
    if arm in ("single", "single-proxied"):
        return None if single else (
            f"the {arm} arm needs --single URL: a colocated vLLM you started with no KV connector (the same"
            " model and settings as the pair); pdtui launches no engine beside engines given by URL")
    if arm in ALL_ARMS:
        return (f"the {arm} arm needs two colocated instances on the pair's cores, which pdtui starts itself:"
                " not over engines given by URL")
    return f"unknown arm {arm!r}; arms: {', '.join(ALL_ARMS)}"


@dataclass(frozen=True)
class AttachedEngines:
    """Engines someone else started, given to `pdtui bench` by URL and checked first
    (pdtui.core.preflight.preflight_attached): a P/D pair (``prefills``, ``decodes``) and/or one
    colocated vLLM with no KV connector (``single``). Every arm is a topology over them
    (``topology``): the pair arms as `pdtui attach` builds its pair, the arm's switches added;
    single and single-proxied over ``single``. What the engines report of themselves
    (``model_name`` ... ``vllm_version``) is taken as `pdtui attach` takes it."""

    model_name: str
    block_size: int
    prefills: tuple[str, ...] = ()
    decodes: tuple[str, ...] = ()
    single: str | None = None
    model: str | None = None
    """What they loaded (/v1/models root): the KV geometry, when it is a folder here."""
    max_model_len: int | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    vllm_version: str | None = None
    """As they report it (/version), in words."""
    host: str = "127.0.0.1"
    proxy_port: int = 8000
    switches: Mapping[str, object] = field(default_factory=dict)
    """The proxy's switches given (ProxySettings fields); the switch arms add theirs."""
    decode_reports_cached: bool = False
    """D runs with --enable-prompt-tokens-details: the silent-recompute check (as `pdtui attach`'s flag)."""
    traces_port: int | None = None
    engines: tuple[dict[str, Any], ...] = ()
    """Each engine as the report names it: name, role, url, vllm (the version it reports)."""

    def refuses(self, arm: str) -> str | None:
        """Why ``arm`` cannot run over these engines, or None."""
        return attached_refusal(arm, pair=bool(self.prefills and self.decodes), single=self.single is not None)

    def default_arms(self) -> tuple[str, ...]:
        """The default arms (ARMS) that can run over these engines."""
        return tuple(a for a in ARMS if self.refuses(a) is None)

    def topology(self, arm: str) -> Topology:
        """The arm's topology over these engines (every member attached, ``launch=None``)."""
        if (why := self.refuses(arm)) is not None:
            raise ValueError(why)
        facts: dict[str, Any] = {
            "model_name": self.model_name, "block_size": self.block_size, "model": self.model,
            "max_model_len": self.max_model_len, "dtype": self.dtype, "kv_cache_dtype": self.kv_cache_dtype,
            "host": self.host, "proxy_port": self.proxy_port, "vllm_version": self.vllm_version}
        if arm in PAIR_ARMS:
            return topology.attached(self.prefills, self.decodes, name=arm,
                                     switches={**self.switches, **ARM_SWITCHES.get(arm, {})},
                                     decode_reports_cached=self.decode_reports_cached,
                                     traces_port=self.traces_port, **facts)
        assert self.single is not None
        return topology.attached_single(self.single, proxied=arm == "single-proxied", name=arm, **facts)

    def environment(self) -> dict[str, Any]:
        """What the report says of engines pdtui did not start."""
        return {
            "vllm": self.vllm_version, "device": None, "engines": [dict(e) for e in self.engines],
            "attached": ("engines attached by URL (listed under engines, with the vLLM version each reports):"
                         " pdtui did not start them, pin their cores or stop them; cpu, gpu and platform here are"
                         " this machine's, where the load client and pdtui's proxy ran"),
            "prefix_caches": ("kept across arms: nothing was restarted between arms, so each arm's prompts carry"
                              " its name and this run's nonce (prompt_salt) and none was cached before"),
        }


@dataclass
class BenchOptions:
    arms: tuple[str, ...] = ARMS
    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    follow: FollowSpec = field(default_factory=FollowSpec)
    interference: InterferenceSpec = field(default_factory=InterferenceSpec)
    fill: FillSpec = field(default_factory=FillSpec)
    seed: int = 0
    cross_check: bool = False
    """After the workloads, run `vllm bench serve` against the arm's URL in each workload's shape."""
    out_dir: Path | None = None
    """Where `vllm bench serve` writes its result files (and its trace of the big prompts)."""
    engines: AttachedEngines | None = None
    """Engines someone else started (--prefill/--decode/--single): every arm over them, none launched."""


@dataclass
class ArmResult:
    arm: str
    url: str = ""
    launch: list[dict[str, Any]] = field(default_factory=list)
    """argv and env of every process of the arm."""
    ready_s: float | None = None
    windows: dict[str, list[float]] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    pgids: list[int] = field(default_factory=list)
    """Process groups started (an instance's pid is its group id): checked gone by the tests."""
    pids: list[int] = field(default_factory=list)
    """Processes started that lead no group of their own: the arm's proxy process (single-proxied's,
    two-single's, the pair's Runtime's: ``ProxyProcess`` starts it in pdtui's group, and it dies
    with pdtui). Checked gone by the tests."""
    warmup: list[dict[str, Any]] = field(default_factory=list)
    """Before the client: each instance's direct warm-up request (instance, url, status, ms,
    error), or the pair's Runtime warm-up (via, outcome)."""
    kv_bytes: dict[str, Any] | None = None
    """Pair: sum of the traces' kv_bytes vs the connector's own count (``freight_count``): D's
    nixl_bytes_transferred delta (pull), P's (push), D's external_kv_transfer tokens x bytes per token
    (storage)."""
    connector: str | None = None
    """Pair arms: the connector's key (pdtui.core.connectors), for the transport table."""
    preemptions: dict[str, int] | None = None
    """Pair: each D's preemptions over the arm's load (vllm:num_preemptions' rise)."""
    notices: list[str] = field(default_factory=list)
    cross_check: dict[str, Any] | None = None
    """`vllm bench serve` against this arm: its TTFT/ITL percentiles beside ours (--cross-check)."""
    error: str | None = None
    t_start: float | None = None
    t_end: float | None = None
    prompt_salt: str = ""
    """In every prompt's tag when the arm's engines keep their prefix caches (attached: the arm's
    name and the run's nonce); "" for launched arms, whose engines start empty: the seed's prompts."""


@dataclass
class BenchResult:
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    interrupted: bool = False
    error: str | None = None
    command: list[str] = field(default_factory=lambda: list(sys.argv))
    flags: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    arms: dict[str, ArmResult] = field(default_factory=dict)
    nonce: str = field(default_factory=lambda: secrets.token_hex(4))
    """This run's, for the prompt salt of arms over attached engines (kept in each arm's prompt_salt)."""


class Reporter:
    """Progress callbacks; the CLI gives a rich one, tests a silent one."""

    def phase(self, arm: str, text: str) -> None: ...
    def progress(self, arm: str, what: str, done: float, total: float) -> None: ...
    def done(self) -> None: ...


def environment(cfg: PairConfig, engines: AttachedEngines | None = None) -> dict[str, Any]:
    from pdtui.core.versions import installed_vllm

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = None
    if config_mod.has_gpu():
        import subprocess

        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
            gpu = subprocess.run(query, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    found = installed_vllm()
    model_arg = config_mod.model_path(cfg)
    geo = None
    with contextlib.suppress(Exception):
        from pdtui.core import kvmath

        g = kvmath.geometry_from_dir(Path(model_arg), cfg.kv_cache_dtype if cfg.kv_cache_dtype != "auto" else cfg.dtype)
        geo = {"layers": g.layers, "kv_heads": g.kv_heads, "head_dim": g.head_dim, "dtype": g.dtype,
               "kv_bytes_per_token": g.bytes_per_token}
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu, "platform": platform.platform(),
        "python": platform.python_version(), "vllm": f"{found[0]} {found[1]}" if found else None,
        "model": cfg.model, "model_path": model_arg, "kv_geometry": geo, "device": cfg.device,
        "block_size": cfg.block_size, "max_model_len": cfg.max_model_len, "profile": cfg.profile_name,
        **(engines.environment() if engines is not None else {}),
    }


async def run_bench(cfg: PairConfig, opts: BenchOptions, result: BenchResult, reporter: Reporter | None = None,
                    clock: Clock | None = None) -> BenchResult:
    """Every requested arm, one after another; fills ``result`` as it goes (so Ctrl-C keeps it)."""
    reporter = reporter or Reporter()
    clock = clock or Clock()
    bad = [a for a in opts.arms if arm_problem(a)] + [w for w in opts.workloads if w not in WORKLOADS]
    if bad:
        raise ValueError(f"unknown arm or workload {', '.join(bad)}: arms are {', '.join(ALL_ARMS)},"
                         f" workloads {', '.join(WORKLOADS)}")
    if opts.engines is not None:
        refused = [why for a in opts.arms if (why := opts.engines.refuses(a)) is not None]
        if refused:
            raise ValueError("; ".join(refused))
    result.config = config_mod.describe(cfg)
    result.environment = environment(cfg, engines=opts.engines)
    failed: list[BaseException] = []
    try:
        for arm in opts.arms:
            retried: str | None = None
            for attempt in (1, 2):
                err: Exception | None = None
                try:
                    await _run_named(arm, cfg, opts, result, reporter, clock)
                except Exception as e:  # noqa: BLE001 - kept in the arm; the other arms still run
                    err = e
                if err is not None and attempt == 1 and transient_start_failure(err):
                    retried = str(err).splitlines()[0]
                    reporter.phase(arm, f"start failed on a port race, starting again: {retried}")
                    continue
                if retried and arm in result.arms:
                    result.arms[arm].notices.append(f"warning: the first start failed ({retried}) and was retried once")
                if err is not None:
                    failed.append(err)
                break
        if failed:  # every arm ran; the run still fails, with the first error
            raise failed[0]
    finally:
        result.finished_at = time.time()
        reporter.done()
    return result


def transient_start_failure(e: BaseException) -> bool:
    """An engine that failed to start because a port it picked itself was taken in the meantime
    (torch.distributed's or ZMQ's ``EADDRINUSE``, seen on two H200s: vLLM chooses a free port, binds
    it later, and another process can take it in between). Worth one more start; anything else is not."""
    from pdtui.core.supervisor import StartupFailed

    text = str(e)
    return isinstance(e, StartupFailed) and ("EADDRINUSE" in text or "Address already in use" in text
                                              or "address already in use" in text)


def arm_topology(arm: str, cfg: PairConfig, engines: AttachedEngines | None = None) -> Topology:
    """The topology of a bench arm, from the one config (pdtui.core.topology.ARMS; the switch arms
    and the routing arms are the pair with their ProxySettings switches), or over ``engines`` someone else started."""
    if engines is not None:
        return engines.topology(arm)
    link = arm_link(arm)
    if link is not None:  # the pair over this link (a loopback one: the pair as `pdtui up` runs it)
        linked = dataclasses.replace(cfg, link=link, sources={**cfg.sources, "link": "--links"})
        return topology.pair(linked, name=arm)
    base, conn = split_arm(arm)
    if conn is not None:  # the pair arm over another connector: the same config, its connector changed
        cfg = dataclasses.replace(cfg, instances=[dataclasses.replace(i) for i in cfg.instances],
                                  sources={**cfg.sources, "connector": f"--arms {arm}"})
        config_mod.apply_overrides(cfg, {"connector": conn})
        return topology.pair(cfg, name=arm, switches=ARM_SWITCHES.get(base))
    if arm in ARM_SWITCHES:
        return topology.pair(cfg, name=arm, switches=ARM_SWITCHES[arm])
    if arm in topology.ARMS:
        return topology.ARMS[arm](cfg)
    raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ALL_ARMS)}")


async def _run_named(arm: str, cfg: PairConfig, opts: BenchOptions, result: BenchResult, reporter: Reporter,
                     clock: Clock) -> None:
    await run_topology(arm_topology(arm, cfg, opts.engines), opts, result, reporter, clock)


async def run_client(arm: ArmResult, base_url: str, cfg: PairConfig, opts: BenchOptions,
                     reporter: Reporter, warmups: int = 1) -> None:
    """Run the workloads against ``base_url`` in a client process of its own
    (``python -m pdtui.bench.workload``) and put its samples and windows into ``arm``. The follow
    workload begins with at least ``warmups`` warm-up requests (one per instance behind a
    round-robin proxy). Cancelled (Ctrl-C), it SIGTERMs the client, which still hands back what it
    measured."""
    import dataclasses
    import tempfile

    follow = dataclasses.asdict(opts.follow)
    follow["warmup"] = max(follow["warmup"], warmups)
    spec = {"arm": arm.arm, "base_url": base_url, "model": cfg.model_name, "workloads": list(opts.workloads),
            "seed": opts.seed, "salt": arm.prompt_salt, "follow": follow,
            "interference": dataclasses.asdict(opts.interference), "fill": dataclasses.asdict(opts.fill)}
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="pdtui-bench-", delete=False) as f:
        json.dump(spec, f)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "pdtui.bench.workload", f.name, env=env,
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                start_new_session=True, limit=1 << 30)
    arm.pgids.append(proc.pid)
    result: dict[str, Any] | None = None

    async def read() -> None:
        nonlocal result
        assert proc.stdout is not None
        async for raw in proc.stdout:
            msg = json.loads(raw)
            if "progress" in msg:
                reporter.progress(arm.arm, *msg["progress"])
            elif "phase" in msg:
                reporter.phase(arm.arm, msg["phase"])
            elif "result" in msg:
                result = msg["result"]

    reading = asyncio.create_task(read())
    try:
        await asyncio.shield(reading)
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(reading), 15)
        raise
    finally:
        if proc.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(proc.wait(), 5)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        reading.cancel()
        os.unlink(f.name)
        if result is not None:
            arm.samples.extend(Sample(**x) for x in result["samples"])
            arm.windows.update(result["windows"])
    if result is None:
        raise RuntimeError(f"the load client of the {arm.arm} arm exited with code {proc.returncode} and no result")


STARTED = "Starting main benchmark run"
"""What `vllm bench serve` prints when its measured run begins (after imports, dataset, warm-up)."""


async def cross_check(cfg: PairConfig, opts: BenchOptions, arm: ArmResult) -> dict[str, Any]:
    """`vllm bench serve` against the arm, after our workloads, in each workload's shape:

    - follow: ``--dataset-name random`` with follow's prompt length, max_tokens and count, one at a
      time (``--max-concurrency 1``);
    - interference: two runs at once (one `vllm bench serve` has one arrival process): the big
      prompts at fixed intervals (``--dataset-name timed_trace``), and, once that run is timing,
      the steady streams (``--dataset-name random``, the streams' prompt length and max_tokens,
      ``--max-concurrency N``: a stream that ends is replaced at once, as ours restart);
      report.py applies our window rule to their per-request times (both use CLOCK_MONOTONIC).

    All with ``--ignore-eos``, ``--temperature 0`` (ours is greedy too), no warm-up (the arm is
    warm: our workloads just ran; vLLM's warm-up sends the first prompt, which then hit the prefix
    cache in the measured run: one TTFT of about 33 ms among 300s once) and ``--save-detailed``: report.vllm_bench_* compute every
    statistic from the raw TTFTs and gaps, exactly as for ours. docs/bench.md, "Cross-check"."""
    out_dir = (opts.out_dir or Path("bench-runs")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {}
    startup_s = None
    seed = salted_seed(opts.seed, arm.prompt_salt)
    if "follow" in opts.workloads:
        f = opts.follow
        res["follow"], data = await vllm_bench_serve(
            cfg, arm.url, out_dir / f"vllm-bench-serve-{arm.arm}-follow.json",
            ["--dataset-name", "random", "--random-input-len", str(f.prompt_len), "--random-output-len",
             str(f.max_tokens), "--random-range-ratio", "0", "--num-prompts", str(f.requests),
             "--max-concurrency", "1", "--request-rate", "inf", "--seed", str(seed)])
        if data is not None:
            res["follow"]["theirs"] = report.vllm_bench_follow(data)
        startup_s = res["follow"].get("startup_s")
    if "interference" in opts.workloads:
        res["interference"] = await _cross_interference(cfg, opts, arm, out_dir, startup_s)
    return res


def salt_number(salt: str) -> int:
    """A number of the arm's prompt salt (0 for none): moves `vllm bench serve`'s seeds and hash ids."""
    return zlib.crc32(salt.encode()) & 0xFFFFF if salt else 0


def salted_seed(seed: int, salt: str) -> int:
    """`vllm bench serve`'s --seed for an arm: ours, or, for an arm whose engines kept their prefix
    caches (a salt), one of its own, so that its random prompts are new to them too (the runs use
    seed, seed + 1 and seed + 2: the arms' seeds are 16 apart at least)."""
    return seed + 16 * salt_number(salt)


async def _cross_interference(cfg: PairConfig, opts: BenchOptions, arm: ArmResult, out_dir: Path,
                              startup_s: float | None) -> dict[str, Any]:
    """The big prompts' run starts first; once it is timing (its trace clock runs from there), the
    streams' run starts, on a machine that is idle but for it, and has ``plan["first_big_after_s"]``
    to import vLLM, begin and warm up before the first big prompt. (Started together, whichever
    began first loaded the machine while the other still imported vLLM: 30 s apart once.)
    report.vllm_bench_interference measures how long the streams really ran first."""
    sp = opts.interference
    seed = salted_seed(opts.seed, arm.prompt_salt)
    plan = interference_plan(sp, arm.samples, arm.windows.get("interference"), startup_s,
                             first_hash_id=1 + 10**7 * salt_number(arm.prompt_salt))
    trace = out_dir / f"vllm-bench-serve-{arm.arm}-interference-big.trace.jsonl"
    trace.write_text("".join(json.dumps(x) + "\n" for x in plan.pop("big_trace")))
    timing = asyncio.Event()
    bigs_task = asyncio.create_task(vllm_bench_serve(
        cfg, arm.url, out_dir / f"vllm-bench-serve-{arm.arm}-interference-big.json",
        ["--dataset-name", "timed_trace", "--dataset-path", str(trace), "--num-prompts", str(plan["big_prompts"]),
         "--seed", str(seed + 2)], on_started=timing.set))
    try:
        waiter = asyncio.create_task(timing.wait())
        await asyncio.wait([bigs_task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        streams_res: dict[str, Any] = {"error": "not run: the big prompts' run ended before it began timing"}
        streams = None
        if timing.is_set():
            streams_res, streams = await vllm_bench_serve(
                cfg, arm.url, out_dir / f"vllm-bench-serve-{arm.arm}-interference-streams.json",
                ["--dataset-name", "random", "--random-input-len", str(sp.stream_prompt_len),
                 "--random-output-len", str(sp.stream_max_tokens), "--random-range-ratio", "0",
                 "--num-prompts", str(plan["stream_requests"]), "--max-concurrency", str(sp.streams),
                 "--request-rate", "inf", "--seed", str(seed + 1)])
        bigs_res, bigs = await bigs_task
    finally:
        if not bigs_task.done():
            bigs_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await bigs_task
    out: dict[str, Any] = {"plan": plan, "streams": streams_res, "big": bigs_res}
    if streams is not None and bigs is not None:
        out["theirs"] = report.vllm_bench_interference(streams, bigs, sp.duration_s, sp.streams)
    else:
        out["error"] = bigs_res.get("error") or streams_res.get("error")
    return out


STREAMS_STARTUP_S = 30.0
"""The streams' run's start-up if follow's cross-check did not measure one (13 s on an idle CPU)."""
STREAMS_MARGIN = 1.6
"""Their streams may decode faster than ours did (2x once): plan this many times our rate's need."""


def interference_plan(spec: InterferenceSpec, samples: list[Sample], window: list[float] | None,
                      startup_s: float | None = None, first_hash_id: int = 1) -> dict[str, Any]:
    """The big prompts as a timed trace, the first at lead = the streams' start-up (1.25 x
    ``startup_s``, follow's cross-check run's, + 3 s) + ``--warmup-s`` + our streams' first-token
    time, then every 1/rate s (unique prompts so prefix caching can't help, as with ours); and how
    many stream requests their streams' run needs to outlast them: our streams' token rate under
    interference x (lead + our window + 2 s) x STREAMS_MARGIN. ``first_hash_id``: where the trace's
    hash ids (its prompts' blocks) begin; an arm over engines that kept their caches starts its own."""
    ours = [s for s in samples if s.workload == "stream" and s.chunk_t]
    first_s = max((s.ttft_ms or 0.0 for s in ours if s.request_id.endswith(".0")), default=1000.0) / 1000.0
    boot = 1.25 * startup_s + 3.0 if startup_s else STREAMS_STARTUP_S
    lead = boot + spec.warmup_s + first_s
    need_s = lead + spec.duration_s + 2.0
    per_stream = spec.stream_max_tokens
    if ours and window and window[1] > window[0]:
        need_s = lead + (window[1] - window[0]) + 2.0
        rate = len(report.window_itl(samples, window)) / spec.streams / (window[1] - window[0])  # tokens/s
        per_stream = math.ceil(rate * need_s * STREAMS_MARGIN)
    n_req = spec.streams * max(1, math.ceil(per_stream / spec.stream_max_tokens))
    n_big = max(1, int(spec.duration_s * spec.rate)) if spec.rate > 0 else 0
    chunk = 16  # vllm bench serve's --timed-trace-chunk-hash-size: one hash id per 16 prompt tokens
    ids = itertools.count(first_hash_id)
    big_trace = [{"timestamp": round(lead + i / spec.rate, 6), "input_length": spec.prompt_len,
                  "output_length": spec.big_max_tokens,
                  "hash_ids": [next(ids) for _ in range(math.ceil(spec.prompt_len / chunk))]} for i in range(n_big)]
    return {"stream_requests": n_req, "stream_tokens_needed": per_stream, "expected_s": round(need_s, 1),
            "big_prompts": n_big, "first_big_after_s": round(lead, 3), "big_trace": big_trace}


async def vllm_bench_serve(cfg: PairConfig, base_url: str, result: Path, dataset: list[str],
                           on_started: Callable[[], None] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run `vllm bench serve` (python -m pdtui.engine.vllm_entry bench serve, in its own session)
    against ``base_url``; its detailed result file is gzipped beside bench.json.gz. Returns
    (argv, return code, start-up seconds, the file or the output's tail) and the parsed result
    (None if it failed). ``on_started`` is called when it begins timing (STARTED)."""
    argv = [sys.executable, "-m", "pdtui.engine.vllm_entry", "bench", "serve", "--backend", "vllm",
            "--base-url", base_url, "--endpoint", "/v1/completions", "--model", cfg.model_name,
            "--tokenizer", config_mod.model_path(cfg), *dataset, "--ignore-eos", "--temperature", "0",
            "--num-warmups", "0",
            "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99", "--disable-tqdm",
            "--save-result", "--save-detailed", "--result-dir", str(result.parent),
            "--result-filename", result.name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                start_new_session=True, limit=1 << 20)
    res: dict[str, Any] = {"argv": argv, "returncode": None, "startup_s": None}
    tail: list[str] = []

    async def read() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail[:] = [*tail[-60:], line]
            if STARTED in line and res["startup_s"] is None:
                res["startup_s"] = round(time.monotonic() - t0, 2)
                if on_started is not None:
                    on_started()
        await proc.wait()

    try:
        await asyncio.wait_for(read(), timeout=900)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    res["returncode"] = proc.returncode
    if proc.returncode != 0 or not result.exists():
        res["error"] = "\n".join(tail)[-2000:]
        return res, None
    raw = result.read_bytes()
    gz = result.with_name(result.name + ".gz")
    gz.write_bytes(gzip.compress(raw))
    result.unlink()
    res["result_file"] = str(gz)
    return res, json.loads(raw)


async def _run_arm(arm: ArmResult, cfg: PairConfig, opts: BenchOptions, reporter: Reporter, clock: Clock, *,
                   start: Callable[[], Awaitable[float]], stop: Callable[[], Awaitable[Any]],
                   settle: Callable[[], Awaitable[None]] | None = None, warmups: int = 1) -> ArmResult:
    """One arm's life, the same for every arm: ``start`` (returns the seconds to ready, the
    instances warmed up), the workloads against ``arm.url`` in the client process (``warmups``
    follow warm-ups at least), ``settle`` (join traces, check bytes), the cross-check; an error is
    kept in ``arm.error`` and raised; whatever happens (Ctrl-C included) ``settle`` and ``stop``
    run and the samples measured so far stay in ``arm``."""
    try:
        arm.ready_s = await start()
        await run_client(arm, arm.url, cfg, opts, reporter, warmups=warmups)
        if settle is not None:
            await settle()
        if opts.cross_check:
            reporter.phase(arm.arm, "cross-check: vllm bench serve")
            arm.cross_check = await cross_check(cfg, opts, arm)
    except Exception as e:
        arm.error = f"{type(e).__name__}: {e}"
        raise
    finally:
        if settle is not None:
            await settle()
        reporter.phase(arm.arm, "stopping")
        await stop()
        arm.t_end = clock()
    return arm


def _launch(topo: Topology) -> list[dict[str, Any]]:
    """Each member as the report names it: the argv and env pdtui started it with, or, attached,
    its URL and the vLLM it reports (pdtui started nothing there)."""
    return [{"name": m.name, "role": m.role, "argv": m.launch.argv, "env": m.launch.env} if m.launch is not None
            else {"name": m.name, "role": m.role, "url": m.url, "attached": True, "vllm": topo.vllm_version}
            for m in topo.members]


WARMUP_MAX_TOKENS = 4


async def warm_instances(arm: ArmResult, cfg: PairConfig, opts: BenchOptions, insts: Sequence[InstanceView],
                         reporter: Reporter) -> None:
    """One request straight to each instance's own URL (not through the proxy), one after another,
    in the big prompts' shape (``--prompt-len`` tokens, a prompt of its own, a few tokens out), so
    that every engine of the arm has served a request before the client measures anything (a
    round-robin proxy alone would leave the second instance's first request to the measurement:
    768 ms once, in two-single). Recorded in ``arm.warmup``; a failure is kept there, not raised
    (the measured requests will show it)."""
    prompt_len = opts.follow.prompt_len if "follow" in opts.workloads else opts.interference.prompt_len
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0)) as client:
        for inst in insts:
            reporter.phase(arm.arm, f"warming up {inst.name} at {inst.url}")
            prompt = workload.make_prompt(opts.seed, f"warmup-{inst.name}", 0, prompt_len, arm.prompt_salt)
            body = {"model": cfg.model_name, "prompt": prompt,
                    "max_tokens": WARMUP_MAX_TOKENS, "ignore_eos": True, "temperature": 0.0}
            rec: dict[str, Any] = {"instance": inst.name, "url": inst.url, "via": "direct", "status": None,
                                   "ms": None, "error": None}
            t0 = time.monotonic()
            try:
                r = await client.post(f"{inst.url}/v1/completions", json=body,
                                      headers={"X-Request-Id": f"bench-{arm.arm}-warmup-{inst.name}"})
                rec["status"] = r.status_code
                if r.status_code != 200:
                    rec["error"] = r.text[:300]
            except httpx.HTTPError as e:
                rec["error"] = f"{type(e).__name__}: {e}"
            rec["ms"] = round((time.monotonic() - t0) * 1000.0, 1)
            arm.warmup.append(rec)
            if rec["error"]:
                arm.notices.append(f"warning: the warm-up request to {inst.name} failed: {rec['error']}")


def arm_proxy(host: str, port: int, instances: list[tuple[str, str]], block_size: int,
              on_event: Callable[[Event], None]) -> ProxyProcess:
    """A proxy process as single-proxied's: ``instances`` (name, url) as its decode instances, no
    prefill instance, ``proxied_settings`` (scripts that put one beside a running pair use it)."""
    return ProxyProcess([], instances, host=host, port=port, settings=proxied_settings(block_size),
                        on_event=on_event)


def follow_states(proxy: ProxyProcess, then: Callable[[Event], None]) -> Callable[[Event], None]:
    """An Instance's event callback: tells ``proxy`` that the instance is up when it becomes
    ready and down on any other state, then hands the event on to ``then``."""

    def on_event(ev: Event) -> None:
        if isinstance(ev, InstanceStateChanged):
            proxy.set_up(ev.instance, ev.state == "ready")
        then(ev)

    return on_event


async def _scrape_each_d(rt: Runtime, roles: tuple[str, ...] = ("decode",)) -> dict[str, dict[str, float]]:
    """A fresh scrape of every decode instance (every instance of ``roles``), by name."""
    out: dict[str, dict[str, float]] = {}
    async with httpx.AsyncClient(timeout=10) as client:
        for inst in rt.instances.values():
            if inst.role in roles:
                out[inst.name] = scrape.parse_metrics((await client.get(f"{inst.url}/metrics")).text)
    return out


EXTERNAL_TOKENS = 'vllm:prompt_tokens_by_source{source="external_kv_transfer"}'


def freight_count(conn: connectors.Connector | None, scrapes: Mapping[str, Mapping[str, float]],
                  roles: Mapping[str, str], bytes_per_token: int | None) -> float | None:
    """The KV bytes the connector itself counted, summed over the instances that count them: D's
    vllm:nixl_bytes_transferred (pull, MultiConnector's NIXL), P's (push: P writes), or D's prompt
    tokens loaded from outside (vllm:prompt_tokens_by_source external_kv_transfer) x bytes per token
    for a connector with no byte counter (storage). None: nothing to read."""
    conn = conn or connectors.NIXL
    side = conn.freight_on or "decode"
    mine = {n: v for n, v in scrapes.items() if roles.get(n) == side}
    if conn.bytes_metric:
        total = summed(mine).get(f"{conn.bytes_metric}_sum")
        return total if total is not None else 0.0 if mine else None
    tokens = summed(mine).get(EXTERNAL_TOKENS)
    return None if tokens is None or not bytes_per_token else tokens * bytes_per_token


def summed(each: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Instances' scrapes summed, series by series."""
    total: dict[str, float] = {}
    for values in each.values():
        for k, v in values.items():
            total[k] = total.get(k, 0.0) + v
    return total


async def _scrape_d(rt: Runtime) -> dict[str, float]:
    """A fresh scrape of every decode instance, summed."""
    return summed(await _scrape_each_d(rt))


PREEMPTIONS = "vllm:num_preemptions"


def preemptions(before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]]) -> dict[str, int]:
    """Each D's preemptions between two scrapes (vllm:num_preemptions' rise; a D missing from either: none)."""
    return {name: int(after[name].get(PREEMPTIONS, 0.0) - before[name].get(PREEMPTIONS, 0.0))
            for name in before if name in after}


NIXL_BYTES = f"{connectors.NIXL.bytes_metric}_sum"  # a histogram: _sum is the bytes


async def run_topology(topo: Topology, opts: BenchOptions, result: BenchResult, reporter: Reporter,
                       clock: Clock) -> ArmResult:
    """One arm: its topology started through a Runtime (the instances, and the proxy if it has
    one), warmed up (the pair: the Runtime's request through P and D; colocated instances: one
    request straight to each, ``warm_instances``), measured at ``topo.url``; the proxy's traces
    joined with the client's samples; the pair's KV bytes checked against D's counter. Attached
    members (``launch=None``) go the same way: the Runtime watches them instead of starting them,
    they lead no process group of ours (``pgids``: none), and closing it stops pdtui's proxy and
    leaves them running, caches and all (so the arm's prompts are salted)."""
    name, cfg = topo.name, topo.cfg
    paired = topo.proxy is not None and bool(topo.proxy.prefills)
    rt = Runtime(topo)
    arm = result.arms[name] = ArmResult(name, url=rt.url, t_start=clock(),
                                        prompt_salt=f"{name}.{result.nonce}" if topo.all_attached else "")
    arm.launch = _launch(topo)
    traces: dict[str, RequestTraced] = {}
    spans: dict[str, dict[str, EngineSpan]] = {}
    """Request id -> instance -> its engine span (cfg.traces_port: pdtui.core.otlp)."""
    reads: dict[str, KvRead] = {}
    """Request id -> D's measured read of its KV (pdtui.engine.nixl_quiet's line)."""
    events = rt.subscribe()

    async def collect() -> None:
        async for ev in events:
            if isinstance(ev, RequestTraced) and not ev.warmup:
                traces[ev.request_id] = ev
            elif isinstance(ev, EngineSpan):
                spans.setdefault(ev.request_id, {})[ev.instance] = ev
            elif isinstance(ev, ConnectorEvent) and ev.what == "kv_read":
                add_read(reads, KvRead.of(ev.fields))
            elif isinstance(ev, InstanceStateChanged):
                if ev.state == "starting" and ev.pid:
                    arm.pgids.append(ev.pid)
                reporter.phase(name, f"{ev.instance} {ev.state} {ev.detail}".strip())
            elif isinstance(ev, PairReady) and paired:
                arm.warmup.append({"instance": "+".join(rt.instances), "via": "proxy (the Runtime's warm-up)",
                                   "outcome": ev.warmup_outcome})
                reporter.phase(name, f"pair ready in {ev.elapsed_s:.1f} s (warm-up {ev.warmup_outcome})")
            elif isinstance(ev, PairBroken):
                arm.warmup.append({"instance": "+".join(rt.instances), "via": "proxy (the Runtime's warm-up)",
                                   "outcome": ev.warmup_outcome})
                reporter.phase(name, f"pair BROKEN after {ev.elapsed_s:.1f} s: {ev.reason}")
            elif isinstance(ev, Notice):
                arm.notices.append(f"{ev.level}: {ev.text}")

    collector = asyncio.create_task(collect(), name="bench-collect")
    before: dict[str, dict[str, float]] | None = None
    """Each D's scrape before the load (the pair: KV bytes and preemptions are their rise)."""

    async def start() -> float:
        nonlocal before
        try:
            ready = await rt.start()  # WarmupFailed (a StartupFailed) at once if an engine died
        finally:
            if rt.proxy is not None and rt.proxy.pid:
                arm.pids.append(rt.proxy.pid)
        if rt.broken is not None:  # no measurement of a pair whose KV path does not work
            raise StartupFailed(f"the pair came up broken: {rt.broken}")
        if paired:
            before = await _scrape_each_d(rt, ("prefill", "decode"))
        else:
            await warm_instances(arm, cfg, opts, list(rt.instances.values()), reporter)
        return ready

    async def settle() -> None:
        """Join the traces and check the KV bytes of our requests, once, before any cross-check
        (whose prompts would add to D's byte counter)."""
        nonlocal before
        reporter.phase(name, "joining traces")
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await _wait_traces(arm.samples, traces, timeout_s=10 if paired else 5)
        _join(arm.samples, traces)
        if paired:  # D logs a read before its first token, but through another pipe than the trace's
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await _wait_reads(arm.samples, reads, timeout_s=2)
            _join_reads(arm.samples, reads)
        if cfg.traces_port is not None and paired:  # the engines export their spans every 200 ms
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await _wait_spans(arm.samples, spans, timeout_s=5)
            _join_spans(arm.samples, spans)
        if before is not None:
            after = None
            with contextlib.suppress(Exception, asyncio.CancelledError):
                after = await _scrape_each_d(rt, ("prefill", "decode"))
            ours = {s.request_id for s in arm.samples}
            roles = {n: i.role for n, i in rt.instances.items()}
            bpt = rt.geometry.bytes_per_token if rt.geometry else None
            conn = topo.connector
            arm.connector = conn.key if conn else None
            stored = conn is not None and not conn.carries_params
            arm.kv_bytes = bytes_check(
                [_trace_dict(t) for rid, t in traces.items() if rid in ours], freight_count(conn, before, roles, bpt),
                freight_count(conn, after, roles, bpt) if after else None, bpt, cfg.block_size,
                blocks_of=(lambda n: kvmath.stored_blocks(n, cfg.block_size)) if stored else None)
            if after:
                decodes = {n for n, r in roles.items() if r == "decode"}
                arm.preemptions = preemptions({n: v for n, v in before.items() if n in decodes},
                                              {n: v for n, v in after.items() if n in decodes})
            before = None

    async def stop() -> None:
        await rt.aclose(reason="bench arm done")
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await collector

    return await _run_arm(arm, cfg, opts, reporter, clock, start=start, stop=stop,
                          settle=settle if topo.proxy is not None else None,
                          warmups=1 if paired or topo.proxy is None else len(rt.instances))


async def _wait_spans(samples: list[Sample], spans: dict[str, dict[str, EngineSpan]], timeout_s: float) -> None:
    want = {s.request_id for s in samples if s.trace and s.trace.get("outcome") == "pair"}
    deadline = time.monotonic() + timeout_s
    while not all(len(spans.get(r, {})) >= 2 for r in want) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


def _join_spans(samples: list[Sample], spans: dict[str, dict[str, EngineSpan]]) -> None:
    """Each sample's trace gets ``engine``: instance -> its span's times (ms) and counts."""
    keys = ("ttft_ms", "queue_ms", "prefill_ms", "decode_ms", "e2e_ms", "prompt_tokens", "completion_tokens")
    for s in samples:
        if s.trace is not None and s.request_id in spans:
            s.trace["engine"] = {inst: {k: getattr(sp, k) for k in keys} for inst, sp in spans[s.request_id].items()}


def add_read(reads: dict[str, KvRead], read: KvRead) -> None:
    """Keep D's read of a request; a second line for it is another of D's workers (TP > 1): merged."""
    have = reads.get(read.request_id)
    reads[read.request_id] = have.merged(read) if have and have.engine_request_id == read.engine_request_id else read


async def _wait_reads(samples: list[Sample], reads: dict[str, KvRead], timeout_s: float) -> None:
    want = {s.request_id for s in samples if s.trace and s.trace.get("outcome") == "pair"}
    deadline = time.monotonic() + timeout_s
    while not want <= set(reads) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


def _join_reads(samples: list[Sample], reads: dict[str, KvRead]) -> None:
    """Each sample's trace gets ``kv_read``: D's read of its KV as NIXL measured it (ms, bytes,
    descriptors, transfers, post ms, achieved GB/s, D's ranks); none for a request D read nothing for."""
    for s in samples:
        r = reads.get(s.request_id)
        if s.trace is not None and r is not None:
            s.trace["kv_read"] = {"ms": r.ms, "bytes": r.bytes, "descs": r.descs, "handles": r.handles,
                                  "post_ms": r.post_ms, "gbps": r.gbps, "ranks": r.ranks, "op": r.op}


async def _wait_traces(samples: list[Sample], traces: dict[str, RequestTraced], timeout_s: float) -> None:
    want = {s.request_id for s in samples}
    deadline = time.monotonic() + timeout_s
    while not want <= set(traces) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


def _trace_dict(t: RequestTraced) -> dict[str, Any]:
    return {k: getattr(t, k) for k in ("outcome", "status", "prefill", "decode", "prompt_tokens", "chunks",
                                       "prefill_ms", "hop_ms", "decode_ttft_ms", "ttft_ms", "total_ms",
                                       "blocks", "kv_bytes", "fallback_reason", "error", "switch",
                                       "switch_skipped", "d_computed_tokens", "recomputed", "decode_reason")}


def _join(samples: list[Sample], traces: dict[str, RequestTraced]) -> None:
    for s in samples:
        t = traces.get(s.request_id)
        if t is not None:
            s.trace = _trace_dict(t)

