"""The connector zoo on real engines (issue 25): the CPU pair over NIXL push, the example storage
connector and MultiConnector (NIXL + storage), each started once (NIXL pull is test_pair.py's pair).

Per connector: a request through pdtui's proxy answers with D computing none of the prompt that the
connector carried (D's own usage, as the silent-recompute check reads it: 0 for NIXL, the tail below
one block for storage, which keeps whole blocks less the last token), the freight in the trace is
the connector's own count (D's vllm:nixl_bytes_transferred for pull, P's and P's "KV write" line for
push, D's external_kv_transfer tokens and the folder's files for storage), and the dashboard's state
shows registration and the transfer. Then the kill-P drill, with each connector's expected outcome
(docs/connectors.md): storage and MultiConnector answer from the folder, push hangs.

Tiny prompts; each pair costs its start-up (~35-50 s on 2 cores) and a few seconds of requests."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdtui.core import config as config_mod
from pdtui.core import connectors, kvmath
from pdtui.core.events import ConnectorEvent, PairReady, RequestTraced
from tests.e2e.conftest import PORT_OFFSET, RuntimeThread, _ports_taken

EXT = 'vllm:prompt_tokens_by_source{source="external_kv_transfer"}'
LOCAL = 'vllm:prompt_tokens_by_source{source="local_compute"}'
PROMPT = 642
"""Tokens per request: 5 whole blocks of 128 and 2 more (storage keeps (642 - 1) // 128 = 5 blocks: D
computes 2; NIXL ships 6 blocks: D computes none)."""
ZOO = ("nixl-push", "storage", "multi")


def unique_prompt(n_chars: int) -> str:
    head = uuid.uuid4().hex
    body = " the quick brown fox jumps over the lazy dog"
    return (head + body * (n_chars // len(body) + 1))[:n_chars]


@pytest.fixture(scope="module", params=ZOO)
def zoo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeThread]:
    key = request.param
    cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), PORT_OFFSET)
    config_mod.apply_overrides(cfg, {"connector": key, "kv_load_failure_policy": "recompute",
                                     "kv_storage_path": str(tmp_path_factory.mktemp(f"kv-{key}"))})
    taken = _ports_taken(cfg)
    assert not taken, f"e2e ports {taken} (offset {PORT_OFFSET}) are taken: is another test run going?"
    rt = RuntimeThread(cfg)
    try:
        t0 = time.monotonic()
        elapsed = rt.call(rt.rt.start(), 600)
        assert rt.rt.broken is None, f"the {key} pair came up broken: {rt.rt.broken}"
        print(f"\n[e2e] {key} pair ready in {elapsed:.1f} s (wall {time.monotonic() - t0:.1f} s)")
        yield rt
    finally:
        rt.close()


def _entry(zoo: RuntimeThread) -> connectors.Connector:
    conn = connectors.known(zoo.cfg.connector)
    assert conn is not None
    return conn


def _rise(zoo: RuntimeThread, name: str, key: str, before: dict[str, float], want: float, timeout: float = 10) -> float:
    """The rise of one series of ``name``'s /metrics since ``before``, waited for until it reaches
    ``want`` (the engine publishes its stats a moment after the answer), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        got = zoo.metrics(name).get(key, 0.0) - before.get(key, 0.0)
        if got >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def _files(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in folder.rglob("*.safetensors")}


def _post(zoo: RuntimeThread, rid: str, prompt: str, timeout: float = 120, stream: bool = True) -> dict:
    out: dict = {}
    try:
        r = httpx.post(f"{zoo.cfg.proxy_url}/v1/completions", headers={"X-Request-Id": rid}, timeout=timeout,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 4, "stream": stream,
                             "temperature": 0.0})
        out["status"] = r.status_code
        out["events"] = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def test_the_pair_answers_with_d_computing_none_of_what_the_connector_carried_and_the_freight_is_its_own_count(zoo):
    conn = _entry(zoo)
    assert zoo.wait_for(PairReady).warmup_outcome == "pair"
    bpt = zoo.rt.geometry.bytes_per_token if zoo.rt.geometry else 0
    assert bpt == 1024  # the tiny model: 2 layers x 2 KV heads x 64 x 2 x 2 bytes
    folder = Path(config_mod.storage_path(zoo.cfg))
    before = {n: zoo.metrics(n) for n in ("P", "D")}
    files_before = _files(folder)
    rid = f"e2e-zoo-{conn.key}-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    got = _post(zoo, rid, unique_prompt(PROMPT))
    ms = (time.monotonic() - t0) * 1000
    assert got.get("status") == 200 and got["events"][-1] == "[DONE]", got
    t = zoo.wait_for(RequestTraced, timeout=30, request_id=rid)
    assert (t.outcome, t.prompt_tokens) == ("pair", PROMPT), t
    stored = conn.key == "storage"
    blocks = kvmath.stored_blocks(PROMPT, 128) if stored else kvmath.blocks_for_tokens(PROMPT, 128)
    assert t.blocks == blocks and t.kv_bytes == blocks * 128 * bpt, t
    # D computed none of what the connector carried: NIXL all of it, storage all but the tail
    tail = PROMPT - blocks * 128 if stored else 0
    assert t.d_computed_tokens == tail and not t.recomputed, t
    # the freight is the connector's own count
    if conn.freight_on is None:  # storage: D's loaded tokens, and the files P wrote
        assert _rise(zoo, "D", EXT, before["D"], blocks * 128) * bpt == t.kv_bytes
        new = {p: n for p, n in _files(folder).items() if p not in files_before}
        assert len(new) == 2, new  # one file per layer, in the prompt's folder
        assert all(0 < n - t.kv_bytes // 2 < 512 for n in new.values()), (new, t.kv_bytes)  # tensor + header
    else:
        side = "P" if conn.freight_on == "prefill" else "D"
        got_bytes = _rise(zoo, side, f"{conn.bytes_metric}_sum", before[side], t.kv_bytes)
        assert got_bytes == t.kv_bytes, (side, got_bytes, t.kv_bytes)
        op = "write" if side == "P" else "read"
        deadline = time.monotonic() + 10
        while not (lines := [e for e in zoo.of(ConnectorEvent, instance=side, what="kv_read")
                             if e.fields.get("request_id") == rid]):
            assert time.monotonic() < deadline, f"no pdtui KV {op} line of {rid} on {side}"
            time.sleep(0.2)
        assert lines[0].fields["op"] == op and lines[0].fields["bytes"] == t.kv_bytes
        assert _rise(zoo, "D", EXT, before["D"], PROMPT) == PROMPT
    if conn.key == "multi":  # and the storage child kept a copy in the folder
        assert len([p for p in _files(folder) if p not in files_before]) == 2
    # the dashboard's state: registration on both, the transfer where the connector shows it
    from pdtui.app.state import DashState
    from pdtui.app.widgets.instance_pane import InstancePane

    s = DashState()
    for ev in list(zoo.events):
        s.apply(ev)
    snap = s.snapshot()
    views = {n: snap.instance(n) for n in ("P", "D")}
    assert all(v is not None and "registered" in dict(v.milestones) for v in views.values()), views
    d, p = views["D"], views["P"]
    assert d is not None and p is not None
    if stored:
        text = InstancePane.no_figure_text(d, wide=True)
        assert text is not None and "no per-request figure" in text.plain and "storage_load" in dict(d.milestones)
    else:
        seen = p if conn.freight_on == "prefill" else d
        assert seen.nixl is not None and seen.nixl.reads >= 1
        assert snap.kv_reads[rid].bytes == t.kv_bytes
    print(f"\n[e2e] {conn.key}: {PROMPT} tokens in {ms:.0f} ms, D computed {t.d_computed_tokens}, freight"
          f" {t.kv_bytes:,} B = the connector's own count")


def _successes(zoo: RuntimeThread, name: str) -> float:
    return sum(v for k, v in zoo.metrics(name).items() if k.startswith("vllm:request_success"))


def test_kill_p_between_its_answer_and_d_s_load_has_each_connectors_outcome(zoo):
    """D stopped (SIGSTOP), the request through the proxy, P answers, P killed (SIGKILL to its
    group), D goes on: storage and MultiConnector answer from the folder (D computes the tail only;
    MultiConnector after its NIXL pull failed); push hangs: D's registration to the dead P fails and
    the request waits for a write that never comes (no recompute)."""
    conn = _entry(zoo)
    before = zoo.metrics("D")
    rid = f"e2e-zoo-kill-{conn.key}-{uuid.uuid4().hex[:6]}"
    out: dict = {}
    hang_s = 15.0  # the checks below come within a second or two of D going on; the client gives up after
    call = threading.Thread(target=lambda: out.update(_post(zoo, rid, unique_prompt(PROMPT),
                                                            timeout=hang_s if conn.key == "nixl-push" else 120)))
    d_group = zoo.rt.instances["D"].pid
    p_done = _successes(zoo, "P")
    os.killpg(d_group, signal.SIGSTOP)
    try:
        call.start()
        deadline = time.monotonic() + 60
        while _successes(zoo, "P") <= p_done:
            assert time.monotonic() < deadline, "P did not answer within 60 s"
            time.sleep(0.05)
        time.sleep(0.5)
        zoo.call(zoo.rt.kill("P"), 30)
    finally:
        os.killpg(d_group, signal.SIGCONT)
    blocks = kvmath.stored_blocks(PROMPT, 128)
    if conn.key == "nixl-push":  # checked while the client still waits (its hang-up would abort D's request)
        failed = conn.counters["failed_notifications"]
        assert _rise(zoo, "D", failed, before, 1) >= 1, failed
        # D's log line reaches pdtui through the log follower, a moment after the counter (CI: not yet
        # there when the counter had risen)
        deadline = time.monotonic() + 5
        while not any("push_reg_notif_failed" in e.text
                      for e in zoo.of(ConnectorEvent, instance="D", what="transfer_failure")):
            assert time.monotonic() < deadline, "D's push_reg_notif_failed line was not seen within 5 s"
            time.sleep(0.1)
        waiting = zoo.metrics("D").get('vllm:num_requests_kv_fetch_by_stage{stage="in_progress"}')
        assert waiting == 1.0 and call.is_alive(), (waiting, out)  # waiting for P's write, no recompute
        call.join(hang_s + 10)
        assert "error" in out and "Timeout" in out["error"], out  # no answer at all: D waits
    else:
        call.join(150)
        assert out.get("status") == 200 and out["events"][-1] == "[DONE]", out
        t = zoo.wait_for(RequestTraced, timeout=30, request_id=rid)
        assert t.outcome == "pair" and t.d_computed_tokens == PROMPT - blocks * 128 and not t.recomputed, t
        assert _rise(zoo, "D", EXT, before, blocks * 128) == blocks * 128  # from the folder, P long gone
        if conn.key == "multi":  # NIXL's pull failed first: the storage child answered the retry
            assert any(rid in e.text for e in zoo.of(ConnectorEvent, instance="D", what="transfer_failure"))
    print(f"\n[e2e] kill P before D's load, {conn.key}: {out.get('status') or out.get('error')}")
