"""What an engine pdtui did not start says about itself: over HTTP, and in its log when given.

``read(url)`` asks one engine (``GET /health``, ``/v1/models``, ``/version``, ``/metrics``, and
``/server_info`` when vLLM's development routes are on) and, given its log file, reads the lines of
its current run that state its configuration. ``compare(facts)`` names what a prefill and a decode
side must agree on and do not, with both values; ``role_problems`` what makes an engine unfit for
its side. Standard HTTP only (httpx, synchronous: preflight runs before any loop); nothing here
imports vLLM.

What vLLM 0.32.0 exposes, read in its source (``site-packages/vllm``):

- ``/v1/models``: the served name (``id``), the model it loaded (``root``), ``max_model_len``.
- ``/version``: its version, one of the NIXL compatibility hash's factors.
- ``/metrics``: ``vllm:cache_config_info``, an info gauge whose labels are the CacheConfig's fields
  (``block_size``, ``cache_dtype``, ``kv_cache_layout``, ...; ``v1/metrics/loggers.py
  log_metrics_info``). The kv-transfer config is not a metric; its traces are: the connector's own
  families (``vllm:nixl_*``, registered on every engine whose ``kv_connector`` is NixlConnector,
  whatever its role: ``nixl/stats.py NixlPromMetrics``), and ``vllm:num_requests_kv_fetch_by_stage``,
  registered only when ``kv_transfer_config.is_kv_consumer`` (``kv_consumer`` or ``kv_both``,
  ``loggers.py``). So from metrics alone: NIXL or not, and consumer or not; a ``kv_producer`` is an
  engine with NIXL's families and without the gauge. ``kv_both`` and ``kv_consumer`` look the same.
  The gauge is new: vLLM 0.22.1 has none on either side (tests/fixtures), so its absence says
  nothing below 0.32.
- ``/server_info?config_format=json``: the whole VllmConfig, ``kv_transfer_config.kv_role``
  included, but only with ``VLLM_SERVER_DEV_MODE=1`` (``entrypoints/serve/__init__.py``: vLLM warns
  it is not for production); otherwise 404.
- The log (``--log NAME=FILE``): the API server's ``non-default args: {...}`` line at each start
  holds the ``KVTransferConfig(..., kv_role='kv_producer', ...)`` as given, and the engine's
  ``Initializing a V1 LLM engine ... dtype=torch.bfloat16`` line its dtype (both vLLM 0.22.1 and
  0.32.0; the last start in the file counts).

Not readable from outside without the log or the development routes: the model's dtype, the
attention backend and the rest of NIXL's compatibility hash (``nixl/metadata.py
compute_nixl_compatibility_hash``); D checks that hash at its first handshake with P, and a
mismatch shows as ``compat✗`` in D's pane (``NIXL compatibility check failed``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pdtui.core import connectors

KV_FETCH_GAUGE = "vllm:num_requests_kv_fetch_by_stage"
"""Registered by vLLM (0.32 on) only on a kv consumer: D's tell on /metrics."""
GAUGE_SINCE = (0, 32)
"""The first vLLM (major, minor) whose /metrics is read for the kv consumer gauge (checked in 0.32.0)."""
PRODUCERS = ("kv_producer", "kv_both")
CONSUMERS = ("kv_consumer", "kv_both")
LOG_TAIL_READ = 32 << 20
"""Bytes read from the end of a log for its current run's configuration lines (and where
pdtui.core.attached starts following it)."""
RUN_START = b"non-default args:"
"""The API server's line at each start of ``vllm serve`` (vLLM 0.22.1 and 0.32.0)."""


@dataclass
class Facts:
    """One engine's own words on itself; None where it did not say."""

    name: str
    role: str
    """The side pdtui was told it is: prefill | decode | single (the bench's colocated baseline)."""
    url: str
    health: str | None = None
    """Why it is not usable, in words (connection refused, timeout, HTTP 503); None: /health 200."""
    served: tuple[str, ...] = ()
    """/v1/models ids: the names clients send as ``model``."""
    model: str | None = None
    """/v1/models root: the model the engine loaded (a folder or a Hugging Face id)."""
    max_model_len: int | None = None
    version: str | None = None
    cache: dict[str, str] = field(default_factory=dict)
    """vllm:cache_config_info's labels (block_size, cache_dtype, ...)."""
    connector_metrics: bool | None = None
    """The connector's own families (vllm:nixl_*) on /metrics; None: /metrics not read."""
    consumer_gauge: bool | None = None
    kv_role: str | None = None
    kv_connector: str | None = None
    dtype: str | None = None
    role_from: str | None = None
    """Where kv_role came from: "/server_info", "its log", "/metrics" (consumer or not), or None."""
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.role}) at {self.url}"

    @property
    def block_size(self) -> int | None:
        v = self.cache.get("block_size")
        return int(v) if v and v.isdigit() else None

    def version_at_least(self, want: tuple[int, int]) -> bool | None:
        if not self.version:
            return None
        m = re.match(r"(\d+)\.(\d+)", self.version)
        return None if m is None else (int(m[1]), int(m[2])) >= want


def refused(e: BaseException) -> bool:
    """The connection was refused: nothing listens on that port (httpx says "All connection
    attempts failed"; the ConnectionRefusedError is down its chain of causes)."""
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def cause(e: BaseException | None = None, status: int | None = None) -> str:
    """Why an engine did not answer, in words."""
    if status is not None:
        return f"HTTP {status}"
    if isinstance(e, httpx.ConnectError):
        return "connection refused (nothing listens there)" if refused(e) else f"cannot connect: {e}"
    if isinstance(e, httpx.TimeoutException):
        return f"timeout ({type(e).__name__})"
    return f"{type(e).__name__}: {e}" if e is not None else "no answer"


def read(name: str, role: str, url: str, *, log: Path | None = None, timeout_s: float = 5.0,
         transport: httpx.BaseTransport | None = None) -> Facts:
    """Everything ``url`` and its log say about the engine (see the module's docstring)."""
    f = Facts(name, role, url.rstrip("/"))
    base = f.url
    with httpx.Client(timeout=timeout_s, transport=transport) as client:
        try:
            r = client.get(f"{base}/health")
            if r.status_code != 200:
                f.health = cause(status=r.status_code)
        except httpx.HTTPError as e:
            f.health = cause(e)
        if f.health is not None:
            return f
        _models(f, _get(client, f"{base}/v1/models"))
        version = _get(client, f"{base}/version")
        if isinstance(version, dict) and version.get("version"):
            f.version = str(version["version"])
        try:
            r = client.get(f"{base}/metrics")
            if r.status_code == 200:
                _metrics(f, r.text)
        except (httpx.HTTPError, ValueError):
            pass
        info = _get(client, f"{base}/server_info", params={"config_format": "json"})
        if isinstance(info, dict) and isinstance(info.get("vllm_config"), dict):
            _server_info(f, info["vllm_config"])
    if log is not None:
        _log(f, log)
    if f.kv_role is None and f.connector_metrics:
        _role_from_metrics(f)
    return f


def _get(client: httpx.Client, url: str, **kw: Any) -> Any:
    try:
        r = client.get(url, **kw)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _models(f: Facts, data: Any) -> None:
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return
    f.served = tuple(str(m.get("id")) for m in models if isinstance(m, dict) and m.get("id"))
    first = next((m for m in models if isinstance(m, dict)), {})
    if first.get("root") is not None:
        f.model = str(first["root"])
    if isinstance(first.get("max_model_len"), int):
        f.max_model_len = first["max_model_len"]


def _metrics(f: Facts, text: str) -> None:
    """cache_config_info's labels, and the traces of the kv-transfer config."""
    conn = list(connectors.CONNECTORS.values())
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        if family.name == "vllm:cache_config_info" and family.samples:
            f.cache = {k.lstrip("_"): v for k, v in family.samples[0].labels.items()
                       if k not in ("engine", "model_name")}
    f.consumer_gauge = KV_FETCH_GAUGE in families
    found = [c for c in conn if any(m in families for m in c.metrics)]
    f.connector_metrics = bool(found)
    if found and f.kv_connector is None:
        f.kv_connector = found[0].name


def _server_info(f: Facts, cfg: dict[str, Any]) -> None:
    kv = cfg.get("kv_transfer_config")
    if isinstance(kv, dict):
        f.kv_role = kv.get("kv_role")
        f.kv_connector = kv.get("kv_connector") or f.kv_connector
        f.role_from = "/server_info"
    elif "kv_transfer_config" in cfg:  # None: no kv-transfer config at all
        f.kv_role, f.role_from = "none", "/server_info"
    model = cfg.get("model_config")
    if isinstance(model, dict) and model.get("dtype"):
        f.dtype = str(model["dtype"]).removeprefix("torch.")


_KV_ROLE = re.compile(r"kv_role='(\w+)'")
_KV_CONNECTOR = re.compile(r"KVTransferConfig\(kv_connector='(\w+)'")
_DTYPE = re.compile(r"Initializing a V1 LLM engine .*?\bdtype=torch\.(\w+)")


def run_start(path: Path, limit: int = LOG_TAIL_READ) -> int | None:
    """Where the engine's current run begins in its log: the start of the last ``non-default
    args`` line within the last ``limit`` bytes; None if there is none (or no file)."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            start = max(0, size - limit)
            fh.seek(start)
            data = fh.read(size - start)
    except OSError:
        return None
    at = data.rfind(RUN_START)
    if at < 0:
        return None
    line = data.rfind(b"\n", 0, at) + 1
    return start + line


def _log(f: Facts, path: Path) -> None:
    start = run_start(path)
    if start is None:
        f.notes.append(f"{path}: no `non-default args` line of a vLLM start in its last"
                       f" {LOG_TAIL_READ >> 20} MiB; its configuration is not read from it")
        return
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            text = fh.read(LOG_TAIL_READ).decode("utf-8", "replace")
    except OSError:
        return
    first = text.split("\n", 1)[0]
    if f.role_from != "/server_info":
        if (m := _KV_ROLE.search(first)) is not None:
            f.kv_role, f.role_from = m[1], "its log"
        elif "kv_transfer_config" not in first:
            f.kv_role, f.role_from = "none", "its log"
        if (m := _KV_CONNECTOR.search(first)) is not None:
            f.kv_connector = m[1]
    if f.dtype is None and (m := _DTYPE.search(text)) is not None:
        f.dtype = m[1]


def _role_from_metrics(f: Facts) -> None:
    recent = f.version_at_least(GAUGE_SINCE)
    if not recent:
        f.notes.append(f"{f.name}'s kv_role is not readable remotely: vLLM {f.version or '(version unknown)'}"
                       " exposes no role on /metrics (the kv consumer gauge came with 0.32); give its log"
                       f" (--log {f.name}=FILE) or run it with VLLM_SERVER_DEV_MODE=1. The warm-up request"
                       " through the pair checks it")
        return
    f.role_from = "/metrics"
    f.kv_role = "kv_consumer or kv_both" if f.consumer_gauge else "kv_producer"
    if f.consumer_gauge and f.role == "prefill":
        f.notes.append(f"{f.name} reports a kv consumer on /metrics: kv_both can serve as P, kv_consumer cannot,"
                       " and /metrics does not tell them apart; the warm-up request through the pair checks it")


def role_problems(f: Facts) -> list[tuple[str, str]]:
    """(field, text) of what makes this engine unfit for its side, from what it said. A single
    (``pdtui bench --single URL``) is one colocated vLLM: any kv-transfer config is unfit."""
    out: list[tuple[str, str]] = []
    known = connectors.names()
    if f.role == "single":
        if f.kv_role not in (None, "none") or f.connector_metrics:
            what = ", ".join(x for x in (f.kv_connector, f.kv_role) if x) or "a connector"
            how = f.role_from or "/metrics: the connector's families"
            out.append(("kv_role", (f"{f.label} has a kv-transfer config ({what}; {how}): the single arm is one"
                                    " colocated vLLM with no KV connector; start it without --kv-transfer-config")))
        return out
    if f.kv_role == "none" or (f.connector_metrics is False and f.kv_role is None):
        how = f"{f.role_from}" if f.role_from else "/metrics: none of the connector's families"
        want = "kv_producer" if f.role == "prefill" else "kv_consumer"
        out.append(("kv_role", (f"{f.label} has no kv-transfer config ({how}): start it with --kv-transfer-config"
                                f" '{{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"{want}\"}}'")))
        return out
    if f.kv_connector is not None and connectors.known(f.kv_connector) is None:
        out.append(("connector", f"{f.label} runs kv_connector {f.kv_connector!r}: pdtui drives {known} only"))
    role = f.kv_role
    if role is None:
        return out
    if f.role == "prefill":
        if role == "kv_consumer":
            out.append(("kv_role", (f"{f.label} is a kv_consumer ({f.role_from}): a prefill side must produce KV"
                                    " (kv_role kv_producer or kv_both)")))
    elif role == "kv_producer":
        out.append(("kv_role", (f"{f.label} is a kv_producer ({f.role_from}): a decode side must consume KV"
                                " (kv_role kv_consumer or kv_both)")))
    return out


AGREE = (("model", "the model it loaded (/v1/models root)"),
         ("block_size", "KV block size (cache_config_info)"),
         ("cache_dtype", "KV cache dtype (cache_config_info)"),
         ("dtype", "model dtype (its log or /server_info)"),
         ("max_model_len", "max_model_len (/v1/models)"),
         ("version", "vLLM version (/version; part of NIXL's compatibility hash)"),
         ("kv_cache_layout", "KV cache layout (cache_config_info)"),
         ("kv_connector", "the KV connector"))
"""What every engine of a pair must agree on, in the order a refusal names them."""


def value(f: Facts, key: str) -> str | None:
    if key == "model":
        return f.model
    if key == "max_model_len":
        return None if f.max_model_len is None else str(f.max_model_len)
    if key in ("version", "dtype", "kv_connector"):
        v = getattr(f, key)
        return None if v is None else str(v)
    v = f.cache.get(key)
    return None if v in (None, "None", "") else v


def compare(facts: list[Facts], must: str = "P and D must agree on it") -> list[tuple[str, str]]:
    """(field, text) for each field the engines report differently, naming every value. A field an
    engine does not report is not a difference (another vLLM version, no log). ``must``: why they
    must agree, in words."""
    out: list[tuple[str, str]] = []
    for key, what in AGREE:
        have = [(f, v) for f in facts if (v := value(f, key)) is not None]
        if len({v for _, v in have}) > 1:
            vals = ", ".join(f"{f.name} {v!r}" for f, v in have)
            out.append((key, f"the engines disagree on {key}, {what}: {vals}. {must}"))
    served = [set(f.served) for f in facts if f.served]
    if len(served) > 1 and not set.intersection(*served):
        vals = ", ".join(f"{f.name} {', '.join(f.served)}" for f in facts if f.served)
        out.append(("served_model_name", f"the engines serve no model name in common (/v1/models): {vals}"))
    return out


def unread(facts: list[Facts]) -> list[str]:
    """What could not be compared, for the notes: fields no engine or only some reported (a
    single's KV connector is none, by design)."""
    out = []
    for key, what in AGREE:
        missing = [f.name for f in facts if value(f, key) is None and not (key == "kv_connector" and f.role == "single")]
        if missing and key != "kv_cache_layout":
            out.append(f"{key} ({what}) not read from {', '.join(missing)}")
    return out
