"""`pdtui soak`: the pair under steady mixed load for minutes or hours, with a report every N minutes
(issue 27: the long-uptime failure, 3.2 days and 92,724 transfers before every D worker hit
NIXL_ERR_REMOTE_DISCONNECT, starts as something that grows).

Load: ``streams`` clients at once, each sending one request after another through the proxy:
prompts of 64 to ``max_prompt`` token ids (a fifth of them repeating one of a few prompts, so the
prefix caches are used too), 8 to 96 tokens, streamed or not in turn, seeded. Each request ends
clean (HTTP 200, the whole answer: ``[DONE]`` for a stream, a choice for the rest) or is lost,
with why. Each report, per interval and so far:

- requests: sent, clean, lost; failures by kind (the client's words: status, error event,
  transport, an unfinished stream; and the proxy's traces: outcome error, fallback, recompute,
  P's blocks released for a D leg never sent);
- transfers: paired traces, KV bytes offered by P;
- each engine (and the proxy): RSS and open fds summed over its process tree (API server, engine
  core, workers), processes; an engine given by URL is found by the process listening on its
  port on this machine (``listener_pid``), and left out when it is elsewhere;
- each engine's KV pool from its /metrics: blocks in use, free blocks; P's blocks held for reads
  at the report (in flight) and, at the end once the load stopped, after a settle (nothing may be
  held then).

``verdict()`` says whether anything grew without bound: after a warm-up (the first report), the
last report's RSS and fds against the first's within ``tolerance`` (5%: the issue's one-hour goal),
no lost request, and no block held once the load stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from pdtui.core import sse_client
from pdtui.core.events import RequestTraced
from pdtui.core.scrape import parse_metrics

REPORT_VERSION = 1
FD_SLACK = 4
"""Open fds may grow this many over the first report however few there are (a proxy's 60 move by a
few with its keep-alive connections): 5% of a small count is less than one connection."""


def tree_usage(root: int) -> tuple[int, int, int]:
    """RSS bytes, open fds and live processes of ``root`` and every process under it (an engine's
    API server, its engine core and workers), read from /proc; a process gone meanwhile is skipped."""
    parent: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    parent[int(entry.name)] = int(fields[1])
            except (OSError, ValueError, IndexError):
                continue
    if root not in parent:
        return 0, 0, 0
    tree, frontier = {root}, [root]
    while frontier:
        kids = [pid for pid, ppid in parent.items() if ppid in frontier and pid not in tree]
        tree.update(kids)
        frontier = kids
    rss = fds = procs = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                rss += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            procs += 1
        except OSError:
            continue
    return rss, fds, procs


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this machine (/proc/net/tcp{,6}, then the process
    holding that socket), for engines pdtui did not start; None when none is found (another
    machine, another user's process)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                        inodes.add(f"socket:[{cols[9]}]")
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not inodes:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) in inodes:
                    return int(entry.name)
        except OSError:
            continue
    return None


@dataclass
class Report:
    t_s: float
    """Seconds since the load started."""
    sent: int
    clean: int
    lost: int
    lost_why: dict[str, int]
    traced: dict[str, int]
    """The proxy's traces so far: outcome counts, "recompute", "kv_release:<result>"."""
    transfers: int
    kv_bytes: int
    processes: dict[str, dict[str, float]]
    """name -> rss_mib, fds, procs (the engines pdtui started, and "proxy")."""
    pools: dict[str, dict[str, float]]
    """name -> blocks_used, blocks_free, blocks_total (its /metrics)."""

    def line(self) -> str:
        procs = "  ".join(f"{n} {v['rss_mib']:.0f} MiB {v['fds']:.0f} fds" for n, v in self.processes.items())
        pools = "  ".join(f"{n} {v['blocks_used']:.0f}/{v['blocks_total']:.0f} blk" for n, v in self.pools.items())
        lost = f" lost {self.lost} ({', '.join(f'{k} {v}' for k, v in self.lost_why.items())})" if self.lost else " lost 0"
        return (f"[soak] {self.t_s / 60:6.1f} min  sent {self.sent} clean {self.clean}{lost}  transfers {self.transfers}"
                f" ({self.kv_bytes / 2**20:.0f} MiB)  traced {dict(self.traced)}  |  {procs}  |  {pools}")


@dataclass
class SoakResult:
    minutes: float
    every_min: float
    reports: list[Report] = field(default_factory=list)
    settled: dict[str, float] = field(default_factory=dict)
    """Blocks each engine holds once the load stopped and a few seconds passed."""
    tolerance: float = 0.05

    def verdict(self) -> list[tuple[str, str, bool]]:
        """(expected, observed, held) rows: nothing grows without bound after the first report."""
        rows: list[tuple[str, str, bool]] = []
        if len(self.reports) < 2:
            return [("two reports or more (a warm-up, then the rest)", f"{len(self.reports)}", False)]
        first, last = self.reports[0], self.reports[-1]
        rows.append(("no request lost", f"{last.lost} of {last.sent}" + (f": {last.lost_why}" if last.lost else ""),
                     last.lost == 0 and last.sent > 0))
        for name, now in last.processes.items():
            then = first.processes.get(name)
            if then is None:
                continue
            for key, unit, slack in (("rss_mib", "MiB", 0.0), ("fds", "fds", FD_SLACK)):
                grew = (now[key] - then[key]) / then[key] if then[key] else 0.0
                rows.append((f"{name} {key.split('_')[0]} flat within {self.tolerance:.0%} after the warm-up",
                             f"{then[key]:.0f} -> {now[key]:.0f} {unit} ({grew:+.1%})",
                             grew <= self.tolerance or now[key] - then[key] <= slack))
        for name, held in self.settled.items():
            rows.append((f"{name} holds no KV block once the load stopped", f"{held:.0f} blocks", held < 0.5))
        return rows

    def to_json(self) -> str:
        return json.dumps({"version": REPORT_VERSION, "minutes": self.minutes, "every_min": self.every_min,
                           "reports": [asdict(r) for r in self.reports], "settled": self.settled,
                           "verdict": [{"expected": e, "observed": o, "held": h} for e, o, h in self.verdict()]},
                          indent=1)


class Load:
    """The soak's clients and what they saw."""

    def __init__(self, url: str, model: str, *, streams: int, max_prompt: int, seed: int, nonce: str) -> None:
        self.url, self.model, self.streams, self.max_prompt = url, model, streams, max_prompt
        self.rng = random.Random(seed)
        self.nonce = nonce
        self.sent = self.clean = 0
        self.lost: Counter[str] = Counter()
        self.shared = [self._ids(self.rng.randint(200, max_prompt), 10_000 + i) for i in range(4)]
        self._n = 0

    def _ids(self, n: int, salt: int) -> list[int]:
        seed = (int(self.nonce, 16) ^ (salt * 2654435761)) & 0xFFFFFFF
        return [3 + (seed + i * 7919) % 251 for i in range(n)]

    def body(self) -> dict[str, Any]:
        self._n += 1
        prompt = (self.rng.choice(self.shared) if self.rng.random() < 0.2
                  else self._ids(self.rng.randint(64, self.max_prompt), self._n))
        return {"model": self.model, "prompt": prompt, "max_tokens": self.rng.randint(8, 96), "ignore_eos": True,
                "stream": self._n % 2 == 0}

    async def one(self, client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        self.sent += 1
        rid = f"soak-{self.nonce}-{self._n}"
        why: str | None
        if body["stream"]:
            rec = sse_client.SseStream()
            await sse_client.stream(client, f"{self.url}/v1/completions", body, rec, headers={"X-Request-Id": rid},
                                    stop_at_done=True)
            why = None if rec.error() is None else (
                f"status {rec.status}" if rec.status not in (None, 200) else
                "error event" if rec.error_event is not None else
                "transport" if rec.transport_error else "unfinished stream")
        else:
            try:
                r = await client.post(f"{self.url}/v1/completions", json=body, headers={"X-Request-Id": rid})
                ok = r.status_code == 200 and bool((r.json().get("choices") or [{}])[0].get("text") is not None)
                why = None if ok else f"status {r.status_code}"
            except (httpx.HTTPError, ValueError) as e:
                why = f"transport {type(e).__name__}"
        if why is None:
            self.clean += 1
        else:
            self.lost[why] += 1

    async def worker(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.one(client, self.body())


async def run(rt: Any, *, minutes: float, every_min: float, streams: int = 3, max_prompt: int = 1500, seed: int = 0,
              settle_s: float = 5.0, out: Path | None = None, say: Callable[[str], None] = print) -> SoakResult:
    """Soak the started Runtime ``rt`` (its proxy) for ``minutes``, a report every ``every_min``."""
    result = SoakResult(minutes, every_min)
    traced: Counter[str] = Counter()
    kv = {"transfers": 0, "bytes": 0}
    events = rt.subscribe()

    async def follow() -> None:
        async for ev in events:
            if isinstance(ev, RequestTraced) and not ev.warmup:
                traced[ev.outcome] += 1
                if ev.recomputed:
                    traced["recompute"] += 1
                if ev.kv_release is not None:
                    traced[f"kv_release:{ev.kv_release.get('result')}"] += 1
                if ev.outcome == "pair":
                    kv["transfers"] += 1
                    kv["bytes"] += ev.kv_bytes or 0

    load = Load(rt.run.proxy_url, rt.run.model_name, streams=streams, max_prompt=max_prompt, seed=seed,
                nonce=f"{time.time_ns():x}"[-8:])
    stop = asyncio.Event()
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=5.0)) as client:
        follower = asyncio.create_task(follow())
        workers = [asyncio.create_task(load.worker(client, stop)) for _ in range(streams)]
        try:
            end = t0 + minutes * 60
            next_at = t0 + every_min * 60
            while True:
                await asyncio.sleep(max(0.0, min(next_at, end) - time.monotonic()))
                rep = await _report(rt, client, load, traced, kv, time.monotonic() - t0)
                result.reports.append(rep)
                say(rep.line())
                if out is not None:
                    out.write_text(result.to_json())
                if time.monotonic() >= end - 1:
                    break
                next_at += every_min * 60
        finally:
            stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*workers, return_exceptions=True), 150)
            for w in workers:
                w.cancel()
        await asyncio.sleep(settle_s)  # P's blocks of the last requests: freed by D's reads
        for name in rt.instances:
            pool = await _pool(client, rt, name)
            if pool:
                result.settled[name] = pool["blocks_used"]
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    if out is not None:
        out.write_text(result.to_json())
    return result


async def _pool(client: httpx.AsyncClient, rt: Any, name: str) -> dict[str, float]:
    try:
        r = await client.get(f"{rt.instances[name].url}/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    m = parse_metrics(r.text)
    total = m.get("cache_config:num_gpu_blocks", 0.0)
    used = m.get("vllm:kv_cache_usage_perc", 0.0) * total
    return {"blocks_used": round(used, 1), "blocks_free": round(total - used, 1), "blocks_total": total}


async def _report(rt: Any, client: httpx.AsyncClient, load: Load, traced: Counter[str], kv: dict[str, int],
                  t_s: float) -> Report:
    processes: dict[str, dict[str, float]] = {}
    roots: dict[str, int | None] = {}
    for name, inst in rt.instances.items():
        roots[name] = inst.pid  # launched: its API server
        if roots[name] is None:  # given by URL: whatever listens on its port here, if anything
            url = urlsplit(inst.url)
            if url.hostname in ("127.0.0.1", "localhost", "::1") and url.port:
                roots[name] = await asyncio.to_thread(listener_pid, url.port)
    roots["proxy"] = rt.proxy.pid if rt.proxy is not None else None
    for name, root in roots.items():
        if root:
            rss, fds, procs = await asyncio.to_thread(tree_usage, root)
            processes[name] = {"rss_mib": round(rss / 2**20, 1), "fds": fds, "procs": procs}
    pools = {name: p for name in rt.instances if (p := await _pool(client, rt, name))}
    return Report(t_s=round(t_s, 1), sent=load.sent, clean=load.clean, lost=sum(load.lost.values()),
                  lost_why=dict(load.lost), traced=dict(traced), transfers=kv["transfers"], kv_bytes=kv["bytes"],
                  processes=processes, pools=pools)
