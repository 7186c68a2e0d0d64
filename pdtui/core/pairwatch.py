"""The long-uptime watchdog (issue 27): a pair whose D keeps failing its KV reads with
``NIXL_ERR_REMOTE_DISCONNECT`` and does not heal itself.

The field report (a backport's issue): after 3.2 days and 92,724 transfers every D worker hit
NIXL_ERR_REMOTE_DISCONNECT, and both engines had to be restarted. vLLM logs each failure on D
("NIXL transfer failure: ... | Context: {...}", connectors.NIXL's ``transfer_failure`` milestone)
and counts it (``vllm:nixl_num_failed_transfers``); nothing restarts anything. ``DisconnectWatch``
is fed every event the Runtime emits and says once, in a Notice, when a D has failed ``threshold``
reads with REMOTE_DISCONNECT within ``window_s`` and no paired request through it succeeded since
(a restart of it, or a read that works, ends the episode), with the restart in the right order:

1. P first: a D that is restarted while P stays up meets P's stale UCX state (vLLM #49238: "UCX
   ... Endpoint timeout", P released the lease after 30 s and the request hung);
2. then D: it drops its own broken endpoints, and its first pull handshakes with the new P.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pdtui.core.events import ConnectorEvent, Event, InstanceStateChanged, Notice, RequestTraced

MARK = "REMOTE_DISCONNECT"


@dataclass
class DisconnectWatch:
    roles: Mapping[str, str]
    """Instance name -> prefill | decode | single (the Runtime's instances)."""
    threshold: int = 3
    window_s: float = 300.0
    clock: Callable[[], float] = time.monotonic
    _fails: dict[str, collections.deque[float]] = field(default_factory=dict)
    _raised: set[str] = field(default_factory=set)

    def feed(self, ev: Event) -> Notice | None:
        """The Notice to emit when ``ev`` makes a D's episode reach the threshold, else None."""
        if isinstance(ev, ConnectorEvent) and ev.what == "transfer_failure" and MARK in ev.text:
            if self.roles.get(ev.instance) != "decode":
                return None
            now = self.clock()
            fails = self._fails.setdefault(ev.instance, collections.deque())
            fails.append(now)
            while fails and now - fails[0] > self.window_s:
                fails.popleft()
            if len(fails) >= self.threshold and ev.instance not in self._raised:
                self._raised.add(ev.instance)
                return Notice(level="error", instance=ev.instance, text=self.words(ev.instance, len(fails)))
        elif isinstance(ev, RequestTraced) and ev.outcome == "pair" and not ev.recomputed and ev.decode:
            self._clear(ev.decode)  # a read that worked
        elif isinstance(ev, InstanceStateChanged) and ev.state in ("starting", "ready"):
            if self.roles.get(ev.instance) == "decode":
                self._clear(ev.instance)
            elif self.roles.get(ev.instance) == "prefill":  # a new P: every D's reads start over
                for d in list(self._fails):
                    self._clear(d)
        return None

    def _clear(self, name: str) -> None:
        self._fails.pop(name, None)
        self._raised.discard(name)

    def words(self, d: str, n: int) -> str:
        ps = [name for name, role in self.roles.items() if role == "prefill"]
        order = ", then ".join(f"`pdtui ctl restart {p}`" for p in ps) or "P"
        return (f"{d} stuck: {n} KV reads failed with NIXL_ERR_{MARK} in {self.window_s:.0f} s and none worked"
                f" since; the pair does not heal itself (field report: every D worker after 3.2 days). Restart"
                f" in this order: {order}, then `pdtui ctl restart {d}` (P first: a D restarted while P stays"
                f" up meets P's stale endpoints, vLLM #49238)")
