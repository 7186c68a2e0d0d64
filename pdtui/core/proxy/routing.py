"""Which D takes a request, and which P: named policies, and each D's headroom in KV blocks.

The policies (``ProxySettings.decode_choice``, ``DECODE_CHOICES``):

- ``least-loaded``: the D with the fewest requests in flight through this proxy (ties: list order);
- ``round-robin``: the next D that is up, in list order, whatever its load;
- ``headroom``: among the D's with room for this request's KV (headroom >= need, in blocks,
  below), the least loaded; when none has room, the one with the most (the request waits or
  preempts there). While every D has room it picks as least-loaded does.

Headroom, per D (docs/proxy.md, "Choosing D")::

    free      = D's free KV blocks at its latest scrape: (num_gpu_blocks - 1) x (1 - kv_cache_usage_perc)
    promised  = what the requests in flight to D will still take that the scrape does not show
    headroom  = free - promised
    need      = the blocks this request holds at its end: P's blocks + its decode growth

``free`` is vLLM's own arithmetic read backwards: ``BlockPool.get_usage()`` is ``1 - free /
(num_gpu_blocks - 1)`` (one block is vLLM's null block), and its free blocks include the prefix
cache's evictable ones, which an admission may take. The Runtime scrapes each D once a second and
tells the proxy (``Capacity``: ``{"capacity": {"D": {...}}}`` on its stdin).

The double counting, and the choice made: a request D has admitted holds its prompt's blocks, and
the scrape counts them; one the scrape predates does not show there. The proxy cannot see D's
admission, but it sees D's tokens: a token that reached the proxy before the scrape was asked for
was made before it (D allocates the blocks of a remote prefill before it pulls them, and a first
token follows the pull). So, per request in flight to D:

- D's first token for it came before the scrape: the scrape counts what it held then, at least its
  prompt and the tokens the proxy had by the scrape's time, less one (``Demand.held``; the chunks
  are dated from the latest one's wall clock back through their gaps, ``Progress.itl_ms``; the
  newest token's KV is written at D's next step). It still owes the rest up to its end,
  ``need - held``. Both sides err toward a fuller D: D is ahead of the proxy, an event may carry
  several tokens, and a token that came after the scrape is not counted (CI at 96a75db: counted
  from the chunks the proxy had when the scrape's figures reached it, up to a second later, the
  held blocks came out one too many at a block's edge, and a full D took a fifth stream and
  preempted);
- otherwise: it owes its whole ``need`` (its blocks may be in the scrape already: counted twice, so
  D looks fuller than it is, never emptier; that lasts from D's admission to its first token, the
  KV pull).

A request that migrated to another D (pdtui.core.proxy.migrate) is promised to it anew: its
prompt there is the prompt and the tokens sent, and only the tokens made there count as held.

A request that ended is released at once, while the scrape still counts its blocks until the next
one (up to a second): D looks fuller than it is then too. The errors go one way, toward sending
a request elsewhere, never toward over-filling D.

The growth (``max_tokens``, or with none, a chat request's room up to ``max_model_len``) is
promised because that is what makes vLLM preempt: it admits a request on its prompt's blocks
alone and preempts a running one when the next token needs a block and none is free. A request
that stops early (EOS) is released when it ends.

A D whose scrape is older than ``STALE_S`` is still counted from it, less what is promised: for
the requests sent through this proxy that errs toward a fuller D too (the blocks freed since do
not show; the ones taken since are promised), and the reason gives the scrape's age. (Until CI at
ddc6418 such a D was taken as having room and ranked by load: on 2 cores the drill's own process,
busy reading 30 streams, scraped D1 4 s late, and D1, full, took 8 more streams and preempted 3
times; results/2026-12-07-headroom/README.md.) A D with no scrape yet is taken as having room:
ranked by load with those that have, and the reason says so.

P is chosen by load (requests in flight through this proxy), then queue (its
``vllm:num_requests_waiting``, when its scrape is fresh).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pdtui.core.events import ONLY_D
from pdtui.core.kvmath import blocks_for_tokens
from pdtui.core.proxy.fields import COMPLETIONS_DEFAULT_MAX_TOKENS, as_int

DECODE_CHOICES = ("least-loaded", "round-robin", "headroom")
"""The named policies for D (``ProxySettings.decode_choice``)."""
STALE_S = 3.0
"""A scrape older than this: P's queue there is not counted; D's room is, the reason naming its age."""


class Upstreamish(Protocol):
    """What the routing reads of an upstream (pdtui.core.proxy.contract.Upstream)."""

    name: str
    inflight: int

    def is_up(self) -> bool: ...


class Progress(Protocol):
    """What the routing reads of a request in flight (pdtui.core.proxy.trace.Trace)."""

    chunks: int
    """Token-carrying events relayed so far (every D of the request)."""
    itl_ms: list[float]
    """The gap before each event after the first (``chunks - 1`` of them)."""
    last_chunk_at: float | None
    """Wall clock of the latest event."""


@dataclass(frozen=True)
class Capacity:
    """One instance's KV pool and queue at a scrape, as the Runtime tells the proxy."""

    t: float
    """Wall-clock time (Unix seconds) the scrape was asked for: what it shows is no older."""
    total_blocks: int | None = None
    """vllm:cache_config_info's num_gpu_blocks (the CPU backend reports it too)."""
    used_perc: float | None = None
    """vllm:kv_cache_usage_perc, 0 to 1."""
    waiting: int | None = None
    """vllm:num_requests_waiting."""

    @property
    def free_blocks(self) -> int | None:
        """Free blocks, evictable prefix-cache blocks included (vLLM's BlockPool.get_usage read back)."""
        if self.total_blocks is None or self.used_perc is None:
            return None
        return max(0, round((self.total_blocks - 1) * (1.0 - self.used_perc)))

    @staticmethod
    def of(raw: Any) -> Capacity | None:
        """From a stdin message's entry (``{"t": ..., "total_blocks": ..., ...}``); None if unreadable."""
        if not isinstance(raw, dict) or not isinstance(raw.get("t"), (int, float)):
            return None

        def num(key: str, kind: type) -> Any:
            v = raw.get(key)
            return kind(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        return Capacity(t=float(raw["t"]), total_blocks=num("total_blocks", int), used_perc=num("used_perc", float),
                        waiting=num("waiting", int))

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.t, "total_blocks": self.total_blocks, "used_perc": self.used_perc, "waiting": self.waiting}


@dataclass(frozen=True)
class Demand:
    """The KV blocks a request takes on D: its prompt's (P's blocks), then one more each
    ``block_size`` tokens it makes, up to ``max_tokens`` per sequence (``n`` of them share the prompt)."""

    prompt_tokens: int
    prompt_blocks: int
    max_tokens: int
    """0 when not known (no growth counted)."""
    block_size: int
    n: int = 1

    def held(self, generated: int) -> int:
        """Blocks held once each sequence has made ``generated`` tokens."""
        made = min(max(0, generated), self.max_tokens)
        grown = blocks_for_tokens(self.prompt_tokens + made, self.block_size) - \
            blocks_for_tokens(self.prompt_tokens, self.block_size)
        return self.prompt_blocks + self.n * grown

    @property
    def blocks(self) -> int:
        """Blocks held at its end (every sequence at max_tokens): what it needs free."""
        return self.held(self.max_tokens)


def demand_of(prompt_tokens: int | None, blocks: int | None, body: dict[str, Any], block_size: int,
              max_model_len: int | None = None) -> Demand:
    """A request's demand from P's answer (its usage's prompt_tokens, its block ids) and D's body
    (max_tokens as vLLM reads it: completions default to 16; chat with none may grow to
    ``max_model_len``, unknown without it; n)."""
    if blocks is None:
        blocks = blocks_for_tokens(prompt_tokens, block_size) if prompt_tokens else 0
    tokens = prompt_tokens if prompt_tokens else blocks * block_size
    chat = "messages" in body
    asked = as_int(body.get("max_completion_tokens")) if chat else None
    if asked is None:
        asked = as_int(body.get("max_tokens"))
    if asked is None and not chat:
        asked = COMPLETIONS_DEFAULT_MAX_TOKENS
    if asked is None:
        asked = max(0, max_model_len - tokens) if max_model_len else 0
    n = as_int(body.get("n")) or 1
    return Demand(prompt_tokens=tokens, prompt_blocks=blocks, max_tokens=max(0, asked), block_size=block_size,
                  n=max(1, n))


@dataclass
class Promise:
    """A request in flight to D, as D's headroom counts it."""

    decode: str
    demand: Demand
    progress: Progress
    t_sent: float
    """Wall clock when it was sent to D."""
    first_chunk: int = 0
    """``progress.chunks`` when it was sent: the events before came from another D (a migration)."""
    held: int | None = None
    """Blocks D's latest scrape counts for it (D's first token for it came before that scrape); None: not in it."""

    def made_by(self, t: float) -> int:
        """Tokens of this D's that reached the proxy by wall clock ``t`` (events, dated back from the
        latest through their gaps)."""
        p = self.progress
        k, at = p.chunks, p.last_chunk_at
        if at is None or k <= self.first_chunk:
            return 0
        itl = p.itl_ms
        while k > self.first_chunk and at > t:  # event k (1-based) came after t: step back to k - 1
            if not 0 <= k - 2 < len(itl):
                return 0  # the first event, or gaps out of step with the count: none is dated before t
            at -= itl[k - 2] / 1000  # the gap before event k
            k -= 1
        return k - self.first_chunk

    def observe(self, t_scrape: float) -> None:
        """D was scraped at ``t_scrape``: does that scrape count this request's blocks, and how many?"""
        made = self.made_by(t_scrape)
        if made >= 1 and self.t_sent <= t_scrape:
            self.held = self.demand.held((made - 1) // self.demand.n)

    @property
    def owed(self) -> int:
        """Blocks it will still take that D's latest scrape does not show."""
        if self.held is None:
            return self.demand.blocks
        return max(0, self.demand.blocks - self.held)


@dataclass(frozen=True)
class Headroom:
    """One D's room for new requests, in blocks, as the proxy counts it now."""

    name: str
    total_blocks: int
    free_blocks: int
    promised_blocks: int
    requests: int
    """Requests in flight to it (their promises)."""
    age_s: float
    """How old the scrape is."""

    @property
    def blocks(self) -> int:
        return self.free_blocks - self.promised_blocks

    def text(self) -> str:
        return f"{self.free_blocks}-{self.promised_blocks}={self.blocks}"


@dataclass
class Router:
    """The choices of D and P, and the promises of blocks to each D (one per request in flight)."""

    policy: str = "least-loaded"
    stale_s: float = STALE_S
    clock: Callable[[], float] = time.time
    capacity: dict[str, Capacity] = field(default_factory=dict)
    """The latest scrape of each instance, by name."""
    promises: dict[object, Promise] = field(default_factory=dict)
    """Requests in flight to a D, by their key (the proxy's Trace object)."""
    on_change: Callable[[str], None] | None = None
    """Called with a D's name when its promises change (a request sent to it, or ended): the
    proxy process reports that D's headroom at once, not only at the next scrape (a busy engine's
    /metrics can take seconds; the headroom drill stops its fill on the count)."""
    _next: int = 0

    def __post_init__(self) -> None:
        if self.policy not in DECODE_CHOICES:
            raise ValueError(f"decode_choice {self.policy!r}: one of {', '.join(DECODE_CHOICES)}")

    # ----- what the Runtime tells --------------------------------------------------------------
    def set_capacity(self, name: str, cap: Capacity) -> None:
        """A new scrape of ``name``: the promises to it are measured against it."""
        old = self.capacity.get(name)
        if old is not None and old.t > cap.t:
            return  # an older scrape overtaken on the way
        self.capacity[name] = cap
        for p in self.promises.values():
            if p.decode == name:
                p.observe(cap.t)

    # ----- promises -----------------------------------------------------------------------------
    def promise(self, key: object, decode: str, demand: Demand, progress: Progress) -> None:
        """A request sent to ``decode``; one per key (a second moves it: the request went to another D)."""
        old = self.promises.get(key)
        self.promises[key] = Promise(decode, demand, progress, self.clock(), first_chunk=progress.chunks)
        if self.on_change is not None:
            if old is not None and old.decode != decode:
                self.on_change(old.decode)
            self.on_change(decode)

    def release(self, key: object) -> None:
        """The request ended (served, failed or cut off): D frees its blocks."""
        gone = self.promises.pop(key, None)
        if gone is not None and self.on_change is not None:
            self.on_change(gone.decode)

    def promised(self, name: str) -> tuple[int, int]:
        """(blocks owed to ``name`` that its latest scrape does not show, requests in flight to it)."""
        mine = [p for p in self.promises.values() if p.decode == name]
        return sum(p.owed for p in mine), len(mine)

    def headroom(self, name: str) -> Headroom | None:
        """``name``'s headroom now; None without a scrape that reported its pool."""
        cap = self.capacity.get(name)
        if cap is None or cap.free_blocks is None or cap.total_blocks is None:
            return None
        owed, n = self.promised(name)
        return Headroom(name, cap.total_blocks, cap.free_blocks, owed, n, max(0.0, self.clock() - cap.t))

    # ----- choices ------------------------------------------------------------------------------
    def order_prefills(self, ups: Sequence[Upstreamish]) -> list[Any]:
        """The P's that are up, best first: fewest in flight, then the shortest queue (a fresh scrape's)."""
        def queue(u: Upstreamish) -> int:
            cap = self.capacity.get(u.name)
            if cap is None or cap.waiting is None or self.clock() - cap.t > self.stale_s:
                return 0
            return cap.waiting

        return sorted((u for u in ups if u.is_up()), key=lambda u: (u.inflight, queue(u)))

    def pick_decode(self, ups: Sequence[Upstreamish], demand: Demand | None = None) -> tuple[Any, str]:
        """The D for a request of ``demand`` by the policy, and why in a few words; (None, why) if none is up."""
        live = [u for u in ups if u.is_up()]
        if not live:
            return None, "no D up"
        if self.policy == "round-robin":
            return self._round_robin(ups)
        if len(ups) == 1:
            return live[0], ONLY_D
        if len(live) == 1:
            return live[0], f"only {live[0].name} up"
        if self.policy == "headroom":
            return self._by_headroom(live, demand)
        best = min(live, key=lambda u: u.inflight)
        others = "; ".join(f"{u.name} {u.inflight}" for u in live if u is not best)
        return best, f"least-loaded: {best.name} {best.inflight} in flight; {others}"

    def _round_robin(self, ups: Sequence[Upstreamish]) -> tuple[Any, str]:
        n, start = len(ups), self._next
        for k in range(n):
            up = ups[(start + k) % n]
            if up.is_up():
                self._next = (start + k + 1) % n
                if n == 1:
                    return up, ONLY_D
                skipped = [ups[(start + j) % n].name for j in range(k)]
                return up, f"round-robin: {up.name} in turn" + (f" ({', '.join(skipped)} down)" if skipped else "")
        return None, "no D up"

    def _by_headroom(self, live: list[Any], demand: Demand | None) -> tuple[Any, str]:
        """The D's with room for ``demand`` (headroom >= its blocks, however old the scrape), and
        those whose room is not known (no scrape yet: least-loaded for them), by load; only when
        none is left, the one with the most headroom (the request will wait or preempt there)."""
        need = demand.blocks if demand is not None else 0
        rows: list[tuple[tuple[int, int, int], Any, Headroom | None]] = []
        for i, u in enumerate(live):
            h = self.headroom(u.name)
            known = h is not None
            if not known or (h is not None and h.blocks >= need):
                key = (0, u.inflight, i)
            else:
                assert h is not None
                key = (1, -h.blocks, u.inflight * len(live) + i)
            rows.append((key, u, h if known else None))
        rows.sort(key=lambda r: r[0])
        (key, best, h), rest = rows[0], rows[1:]
        if key[0] == 1:
            assert h is not None
            head = f"headroom: none has {need} free; {best.name} the most, {h.text()}{self._old(h)}"
        elif h is not None:
            head = f"headroom: {best.name} {h.text()} >= {need} needed, {best.inflight} in flight{self._old(h)}"
        else:
            head = (f"headroom: {best.name} {self._unknown(self.headroom(best.name))}, by load"
                    f" ({best.inflight} in flight)")
        parts = [head]
        for (tier, *_), u, hr in rest:
            if hr is None:
                parts.append(f"{u.name} {self._unknown(self.headroom(u.name))}, {u.inflight} in flight")
            elif tier == 0:
                parts.append(f"{u.name} {hr.text()}, {u.inflight} in flight{self._old(hr)}")
            else:
                parts.append(f"{u.name} {hr.text()} < {need}{self._old(hr)}")
        return best, "; ".join(parts)

    def _old(self, h: Headroom) -> str:
        """The scrape's age, when it is over ``stale_s``: the figures are that old (fuller than now)."""
        return f" (scrape {h.age_s:.0f}s old)" if h.age_s > self.stale_s else ""

    @staticmethod
    def _unknown(h: Headroom | None) -> str:
        return "no scrape" if h is None else f"scrape {h.age_s:.0f}s old"


__all__ = ["DECODE_CHOICES", "ONLY_D", "STALE_S", "Capacity", "Demand", "Headroom", "Promise", "Router",
           "demand_of"]
