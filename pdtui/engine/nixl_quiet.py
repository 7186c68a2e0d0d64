"""NixlConnector with a NIXL/UCX progress thread that sleeps instead of spinning.

Loaded INSIDE the vLLM processes through ``kv_transfer_config.kv_connector_module_path``
(``pdtui.engine.nixl_quiet``); pdtui's own process never imports it (it imports vLLM).

Why: NIXL's UCX backend starts a progress thread per agent. nixl's Python API hard-codes
``nixlAgentConfig.pthrDelay = 0`` (nixl_cu13/_api.py), and the UCX plugin then loops on
``poll(fds, n, 0)``: one core per instance at 100 %, even idle. On a 2-core machine that doubles
start-up and halves decode speed. Setting ``pthrDelay`` makes the thread block in poll() on UCX's
event descriptors (it still wakes at once on traffic; the delay is only the fallback timeout).
Turning the thread off instead (``enable_prog_thread=False``) hangs the first transfer: an idle
P never progresses UCX, so D's pull never completes. Measured in docs/ucx-busy-poll.md.

It re-exports vLLM's own ``NixlConnector`` class, so every check on the connector's name and
type still holds. The delay comes from ``PDTUI_NIXL_PROG_DELAY_US`` (the names: ``NIXL.tuning_env``) (default 1000). This leans on
nixl internals (the ``nixlBind`` binding the agent is built with): if they move, it logs a
warning and leaves NIXL as it is.

It also logs, on D, one line per request whose KV it read (``_log_reads``): the measured read
time and bytes that pdtui joins to the request's row (docs/freight.md); in push mode
(``NixlPushConnector``, also re-exported here) the line is P's, per request whose KV it wrote into
D's blocks. Off with ``PDTUI_NIXL_READ_LOG=0``.
"""

from __future__ import annotations

import importlib
import os
import types
from typing import Any

from vllm.logger import init_logger

from pdtui.core.connectors import NIXL

try:  # vLLM >= 0.3x: a package, with the push mode beside the pull (NixlConnector = NixlPullConnector)
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import (  # noqa: F401
        NixlConnector,
        NixlPullConnector,
        NixlPushConnector,
    )
except ImportError:  # vLLM 0.2x: one module, pull only
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl_connector import NixlConnector  # noqa: F401

log = init_logger("vllm.pdtui.nixl_quiet")  # under "vllm" so that it prints in vLLM's log format
_DONE = "_pdtui_quiet_progress"


def _patch(delay_us: int) -> None:
    api: Any = None  # nixl's untyped binding module
    for name in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            api = importlib.import_module(name)
            break
        except ImportError:
            continue
    if api is None or getattr(api, _DONE, False):
        return
    real = getattr(api, "nixlBind", None)
    if real is None or not hasattr(real, "nixlAgent"):
        log.warning("pdtui: nixl has no nixlBind.nixlAgent; progress thread left as it is")
        return
    proxy = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})

    def agent(name: str, cfg: Any, _orig: Any = real.nixlAgent) -> Any:
        cfg.pthrDelay = delay_us
        return _orig(name, cfg)

    proxy.nixlAgent = agent
    api.nixlBind = proxy
    setattr(api, _DONE, True)
    log.info("pdtui: NIXL progress thread delay set to %d us (no busy-poll)", delay_us)


def _ucx_params(params: dict[str, str]) -> None:
    """Add UCX backend init parameters (e.g. ucx_error_handling_mode=none) to every UCX backend.

    Why: NIXL's UCX backend defaults to ucx_error_handling_mode=peer, and UCX then only uses
    transports with a peer failure handler; on one host that leaves tcp/lo for everything, so
    GPU-to-GPU KV reads run as "software emulation" over TCP (~330 MB/s on an H100). With
    "none", UCX can pick cuda_ipc for the reads (see docs/gpu-transport.md).
    """
    for name in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            api = importlib.import_module(name)
        except ImportError:
            continue
        agent_cls = getattr(api, "nixl_agent", None)
        if agent_cls is None or getattr(agent_cls, "_pdtui_ucx_params", None) is not None:
            continue
        real = agent_cls.create_backend

        def create_backend(self: Any, backend: str, initParams: dict[str, str] | None = None,
                           _real: Any = real) -> Any:
            init = dict(initParams or {})
            if backend == "UCX":
                init.update(params)
            return _real(self, backend, init)

        agent_cls.create_backend = create_backend
        agent_cls._pdtui_ucx_params = params
    log.info("pdtui: NIXL UCX backend params %s", params)


def _keep_affinity() -> None:
    """Undo NixlConnector's re-pinning of the model thread on CPU.

    Why: on a CPU device, vLLM's NIXL worker calls ``os.sched_setaffinity(0, [last core of each
    NUMA node])`` in its __init__ ("reserve different cores for start_load_kv() from
    model_forward()", nixl/base_worker.py). Thread 0 is the calling thread: the worker's main
    thread, the one that runs the model. On a 2-core machine that moves the model thread of BOTH
    P and D to core 1, whatever VLLM_CPU_OMP_THREADS_BIND says, and core 0 idles (P's prefill and
    D's decode then time-share one core; docs/bench.md measures it). This puts the thread back on
    the cores it had before that __init__ (its OMP core), so each instance computes on its own.
    """
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker

    cls = base_worker.NixlBaseConnectorWorker
    if getattr(cls, "_pdtui_keep_affinity", False):
        return
    real_init = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        before = os.sched_getaffinity(0)
        real_init(self, *args, **kwargs)
        after = os.sched_getaffinity(0)
        if after != before:
            os.sched_setaffinity(0, before)
            log.info("pdtui: NixlConnector pinned the model thread to cores %s; put back on %s",
                     sorted(after), sorted(before))

    cls.__init__ = __init__
    cls._pdtui_keep_affinity = True


def _log_reads() -> None:
    """Log one line per request whose KV this worker read: NIXL's own telemetry of each read.

    vLLM's ``_pop_done_transfers`` (nixl/base_worker.py) polls D's outstanding reads each engine
    step; for each one done it takes ``nixl_wrapper.get_xfer_telemetry(handle)`` (startTime,
    postDuration, xferDuration in microseconds, totalBytes, descCount) and hands it to
    ``xfer_stats.record_transfer``, which becomes the ``vllm:nixl_xfer_time_seconds`` histogram:
    the request id is lost there. This wraps ``_pop_done_transfers`` for D's reads (the
    ``_recving_transfers`` dict, keyed by request id), notes which request each handle belongs to,
    catches the telemetry vLLM asks for, and once a request has no read outstanding logs
    ``NIXL.read_log``: its handles, bytes and descriptors summed, the read time from the first
    handle's start to the last one's end (one handle: its xferDuration, post included, to the poll
    that saw it done, the figure vLLM's histogram gets), the post times summed. A request with a
    failed read logs nothing (vLLM logs the failure). Nothing is read or posted that vLLM does not
    read itself: the cost is a dict and a list per poll with reads outstanding, and the line.
    """
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker

    cls = base_worker.NixlBaseConnectorWorker
    if getattr(cls, "_pdtui_log_reads", False):
        return
    real_pop = cls._pop_done_transfers
    read_fmt, write_fmt = NIXL.read_log, NIXL.write_log

    def _watch(self: Any) -> types.SimpleNamespace:
        """Once per worker: its NIXL wrapper's get_xfer_telemetry notes each answer against the
        request of the handle, while _pop_done_transfers below has said whose handles they are."""
        state = types.SimpleNamespace(owner={}, reads={})
        wrapper = self.nixl_wrapper
        real_tel = wrapper.get_xfer_telemetry

        def get_xfer_telemetry(handle: Any) -> Any:
            res = real_tel(handle)
            rid = state.owner.get(id(handle))
            if rid is not None and res is not None:
                state.reads.setdefault(rid, []).append(res)
            return res

        wrapper.get_xfer_telemetry = get_xfer_telemetry  # this agent only
        self._pdtui_reads = state
        return state

    def _pop_done_transfers(self: Any, transfers: dict[str, list[Any]], _real: Any = real_pop) -> Any:
        if not transfers:
            return _real(self, transfers)
        if transfers is getattr(self, "_recving_transfers", None):
            fmt = read_fmt
        elif transfers is getattr(self, "_sending_transfers", None):  # push mode: P's writes into D's blocks
            fmt = write_fmt
        else:
            return _real(self, transfers)
        state = getattr(self, "_pdtui_reads", None) or _watch(self)
        state.owner = {id(h): rid for rid, handles in transfers.items() for h in handles}
        try:
            done, failed = _real(self, transfers)
        finally:
            state.owner = {}
        reads = state.reads
        for rid in failed:
            reads.pop(rid, None)
        for rid in done:
            tels = reads.pop(rid, None)
            if tels and rid not in failed:
                start = min(t.startTime for t in tels)
                end = max(t.startTime + t.xferDuration for t in tels)
                log.info(fmt, rid, getattr(self, "tp_rank", 0), len(tels), sum(t.totalBytes for t in tels),
                         sum(t.descCount for t in tels), (end - start) / 1e3,
                         sum(t.postDuration for t in tels) / 1e3)
        if len(reads) > 4096:  # reads vLLM dropped without a done or a failure (an abort): forget them
            reads.clear()
        return done, failed

    cls._pop_done_transfers = _pop_done_transfers
    cls._pdtui_log_reads = True
    log.info("pdtui: logging each KV read's (pull) or write's (push) NIXL telemetry per request")


_ENV = NIXL.tuning_env  # the variables pdtui.core.config sets (pdtui/core/connectors.py)
try:
    if os.environ.get(_ENV["keep_affinity"]) == "1":
        _keep_affinity()
    if os.environ.get(_ENV["progress_delay_us"]):
        _patch(int(os.environ[_ENV["progress_delay_us"]]))
    if os.environ.get(_ENV["ucx_error_handling_mode"]):
        _ucx_params({"ucx_error_handling_mode": os.environ[_ENV["ucx_error_handling_mode"]]})
    if os.environ.get(_ENV["read_log"]) != "0":
        _log_reads()
except Exception as e:  # noqa: BLE001 - never break the connector over an optimisation
    log.warning("pdtui: could not tune NIXL: %s", e)
