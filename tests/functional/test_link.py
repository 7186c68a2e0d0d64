"""The emulated link for real (pdtui.core.link): namespaces, veths and tc on this machine, no engine.
CI runs as root; so must this (the first test says why when it cannot).

- a 1 Gbit/s link carries TCP at 1 Gbit/s, within 20%, each way (tests/child_scripts/link_tput.py:
  a few MB, well under a second);
- a process holding a link killed with SIGKILL: the next reserve() removes what it left, and so does
  `pdtui link clean`; a Runtime killed with SIGKILL: its reaper does, with no next start;
- a Runtime over FAKE engines (tests/child_scripts/fake_vllm.py) in the link's namespaces: the proxy
  reaches them across the unshaped path; SIGTERM, and a start that fails, leave nothing behind;
- after each: no namespace, veth or qdisc of the run is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdtui.core import link
from pdtui.core.link import LinkSpec

CHILD = Path(__file__).resolve().parents[1] / "child_scripts"
OFFSET = int(os.environ.get("PDTUI_E2E_PORT_OFFSET", "21000")) + 300  # the fake pair's proxy port


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state folder of its own: its links/ holds this test's state files only."""
    monkeypatch.setenv("PDTUI_HOME", str(tmp_path))
    return tmp_path


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False).stdout


def nothing_left(p: link.LinkPlan) -> list[str]:
    """Every namespace, veth and qdisc of the run that still exists (the root's view)."""
    left = link.leftovers(p)
    names = [ln for ln in _ip("-br", "link").splitlines() if p.run_id in ln]
    qdiscs = [ln for ln in subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True, timeout=10,
                                          check=False).stdout.splitlines() if p.run_id in ln]
    netns = [ln for ln in _ip("netns", "list").splitlines() if p.run_id in ln]
    return left + names + qdiscs + netns


def test_this_machine_can_make_a_link():
    """Root (or CAP_NET_ADMIN), iproute2, veth and htb: what every other test here needs. On a machine
    without them this is the test that says what is missing."""
    assert link.check(LinkSpec.parse("1gbit")) == []


@pytest.fixture
def gbit(home: Path) -> Iterator[link.Link]:
    k = link.Link(link.reserve(LinkSpec.parse("1gbit")))
    k.up()
    try:
        yield k
    finally:
        k.down()
        assert nothing_left(k.plan) == []


def _throughput(k: link.Link, src: link.Side, dst: link.Side, nbytes: int) -> float:
    """Bits per second of payload from ``src``'s namespace to ``dst``'s across the shaped veth."""
    port = 5201
    recv = subprocess.Popen(["ip", "netns", "exec", dst.netns, sys.executable, str(CHILD / "link_tput.py"), "recv",
                             dst.link_addr, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", src.netns, sys.executable, str(CHILD / "link_tput.py"), "send",
                        dst.link_addr, str(port), str(nbytes)], check=True, timeout=60)
        out, _ = recv.communicate(timeout=60)
    finally:
        recv.kill()
        recv.wait()
    got, seconds = out.split()
    assert int(got) == nbytes
    return nbytes * 8 / float(seconds)


def test_a_1gbit_link_carries_1gbit_each_way(gbit: link.Link):
    qd = gbit.qdiscs()
    assert all("htb 1: root" in text for text in qd.values()), qd
    p = gbit.plan
    for src, dst in ((p.prefill, p.decode), (p.decode, p.prefill)):
        # best of up to 3: on a busy box (the tests beside this one) a Python sender waiting for a
        # core idles the link; none may exceed the rate, and one must come within 20% of it
        got = []
        for _ in range(3):
            got.append(_throughput(gbit, src, dst, 25_000_000))  # 0.2 s at the rate
            if got[-1] >= 0.8e9:
                break
        print(f"\n[link] {src.letter} -> {dst.letter} over {gbit.spec.describe()}:"
              f" {', '.join(f'{b / 1e9:.3f}' for b in got)} Gbit/s of payload")
        assert max(got) <= 1.2e9 and max(got) >= 0.8e9, f"{got} bit/s on a 1 Gbit/s link"
    # the proxy's path is not shaped: from the root namespace to P's HTTP address, no qdisc but the default
    assert "htb" not in _ip("-n", p.prefill.netns, "link", "show", p.prefill.admin_dev)


def test_reshape_changes_the_rate_in_place(gbit: link.Link):
    gbit.reshape(LinkSpec.parse("rate=200mbit"))
    p = gbit.plan
    bps = _throughput(gbit, p.prefill, p.decode, 5_000_000)
    assert bps <= 0.24e9, f"{bps / 1e9:.3f} Gbit/s on a 200 Mbit/s link"
    if bps < 0.16e9:  # a busy box: once more (the cap above is what shaping proves)
        bps = _throughput(gbit, p.prefill, p.decode, 5_000_000)
    assert 0.16e9 <= bps <= 0.24e9, f"{bps / 1e9:.3f} Gbit/s on a 200 Mbit/s link"
    gbit.reshape(LinkSpec.parse("loopback"))
    assert all("htb" not in text for text in gbit.qdiscs().values())


def _holder(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(CHILD / "link_holder.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(CHILD.parents[1])})


def _first_line(proc: subprocess.Popen[str], timeout_s: float = 60) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline and not line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert line, f"the holder said nothing (exit {proc.poll()}): {proc.stderr.read() if proc.stderr else ''}"
    return line.strip()


def _plan(proc: subprocess.Popen[str]) -> link.LinkPlan:
    first = _first_line(proc)
    assert first.startswith("plan "), first
    return link.LinkPlan.from_json(json.loads(first.removeprefix("plan ")))


def test_a_link_whose_holder_was_killed_is_removed_by_the_next_start(home: Path):
    holder = _holder("link", "1gbit")
    p = link.LinkPlan.from_json(json.loads(_first_line(holder)))
    assert len(link.leftovers(p)) == 4  # two namespaces, two root veth ends
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert len(link.leftovers(p)) == 4  # SIGKILL: nothing ran, everything is still there
    nxt = link.reserve(LinkSpec.parse("10gbit"))  # the next start
    try:
        assert nothing_left(p) == []
        assert not (home / "state" / "links" / f"{p.run_id}.json").exists()
    finally:
        link.Link(nxt).down()


def test_pdtui_link_clean_removes_a_killed_holder_s_link(home: Path):
    holder = _holder("link", "1gbit")
    p = link.LinkPlan.from_json(json.loads(_first_line(holder)))
    live = _holder("link", "1gbit")  # a live run's link is left alone
    q = link.LinkPlan.from_json(json.loads(_first_line(live)))
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        r = subprocess.run([sys.executable, "-m", "pdtui", "link", "clean"], capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        assert f"removed run {p.run_id} (pid {holder.pid}, gone): namespace {p.prefill.netns}" in r.stdout
        assert nothing_left(p) == []
        assert len(link.leftovers(q)) == 4
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(10)
        link.clean_stale()
        assert nothing_left(q) == []


def test_a_runtime_over_a_link_serves_through_it_and_sigterm_leaves_nothing(home: Path):
    rt = _holder("runtime", "1gbit", str(OFFSET))
    try:
        p = _plan(rt)
        assert _first_line(rt) == "ready"
        # the proxy (root namespace) reached P and D at their namespace addresses: the warm-up paired
        proxy = f"http://127.0.0.1:{8000 + OFFSET}"
        r = httpx.post(f"{proxy}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200, r.text
        pids = {pid for ns in p.namespaces for pid in link.netns_pids(ns)}
        assert len(pids) == 2, pids  # one fake engine in each namespace
        rt.send_signal(signal.SIGTERM)
        out, err = rt.communicate(timeout=60)
        assert rt.returncode == 0 and "closed" in out, err[-2000:]
        assert nothing_left(p) == []
        assert not list((home / "state" / "links").glob("*.json"))
    finally:
        if rt.poll() is None:
            rt.kill()
            rt.wait()


def test_a_runtime_killed_with_sigkill_leaves_its_link_to_its_reaper(home: Path):
    rt = _holder("runtime", "1gbit", str(OFFSET + 1))
    try:
        p = _plan(rt)
        assert _first_line(rt) == "ready"
        rt.send_signal(signal.SIGKILL)
        rt.wait(10)
        deadline = time.monotonic() + 20
        while nothing_left(p) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert nothing_left(p) == [], "the reaper did not remove the link of its pdtui"
        print(f"\n[link] the reaper removed the link {20 - (deadline - time.monotonic()):.1f} s after the SIGKILL")
    finally:
        if rt.poll() is None:
            rt.kill()
            rt.wait()


def test_a_start_that_fails_removes_the_link(home: Path):
    rt = _holder("fail", "1gbit", str(OFFSET + 2))
    p = _plan(rt)
    out, err = rt.communicate(timeout=90)
    assert rt.returncode == 3, (out, err[-2000:])
    assert "start failed: D (decode) exited with code 3 during start-up" in out
    assert not list((home / "state" / "links").glob("*.json"))
    assert nothing_left(p) == []


def test_without_the_privilege_up_refuses_with_the_reason_and_starts_nothing(tmp_path: Path):
    """Root without CAP_SYS_ADMIN and CAP_NET_ADMIN (setpriv drops them): `pdtui up --link` exits 2
    before anything starts, saying why; no namespace is made."""
    r = subprocess.run(["setpriv", "--bounding-set", "-net_admin,-sys_admin", "--inh-caps", "-net_admin,-sys_admin",
                        sys.executable, "-m", "pdtui", "up", "--headless", "--link", "1gbit", "--port-offset",
                        str(OFFSET + 3)], capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "PDTUI_HOME": str(tmp_path)})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "refused before launch: link = '1gbit' (from --link): cannot create a network namespace" in r.stderr
    assert "the link needs root, with CAP_SYS_ADMIN and CAP_NET_ADMIN" in r.stderr
    probe = re.search(r"ip netns add (pdtui-probe-\S+)`", r.stderr)
    assert probe is not None and probe.group(1) not in _ip("netns", "list")  # other tests run beside: ours only
    assert not (tmp_path / "state" / "links").exists() or not list((tmp_path / "state" / "links").glob("*.json"))
