"""Item 1, KV stranded on P: P answers, D is never sent the request. How long does P hold the
blocks (its vllm:kv_cache_usage_perc, vllm:nixl_num_kv_expired_reqs), and does a request that D
rejects, carrying P's kv_transfer_params, free them at once (vLLM 0.32's
notify_kv_transfer_request_rejected path, entrypoints/generate/base/serving.py)?

    timeout 900 flock /tmp/pdtui-engines.lock .venv/bin/python results/2026-12-07-field/probe_stranded.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from engines import Engine, d_leg, ids, p_leg, running  # noqa: E402

PROMPT = 700  # 6 blocks of 128


def usage(p: Engine) -> float:
    return p.metrics().get("vllm:kv_cache_usage_perc", float("nan"))


def watch(p: Engine, base: float, limit: float) -> tuple[float | None, list[tuple[float, float]]]:
    """Poll P's usage every 0.5 s until it is back to ``base``; the seconds, and the samples."""
    t0 = time.monotonic()
    samples = []
    while time.monotonic() - t0 < limit:
        u = usage(p)
        samples.append((round(time.monotonic() - t0, 2), u))
        if u <= base + 1e-9:
            return time.monotonic() - t0, samples
        time.sleep(0.5)
    return None, samples


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="pdtui-field-"))
    p = Engine("P", "prefill", 26100, 26101, 0, folder)
    d = Engine("D", "decode", 26200, 26201, 1, folder)
    with running(p, d):
        # warm: one full P/D pair (the handshake)
        r = p_leg(p, ids(PROMPT, 1), "warm-p")
        params = r.json()["kv_transfer_params"]
        t = time.monotonic()
        r2 = d_leg(d, ids(PROMPT, 1), "warm-d", params)
        print(f"[probe] warm-up pair: P {r.status_code}, D {r2.status_code} in {time.monotonic() - t:.2f} s;"
              f" P blocks {params['remote_block_ids']}", flush=True)
        time.sleep(2)
        base = usage(p)
        print(f"[probe] P's usage at rest: {base:.6f}; expired {p.raw_metric('vllm:nixl_num_kv_expired_reqs_total')}")

        # A. P's answer, D never asked
        r = p_leg(p, ids(PROMPT, 2), "stranded-a")
        t_answer = time.monotonic()
        params = r.json()["kv_transfer_params"]
        held = usage(p)
        print(f"[probe] A: P answered {r.status_code}, {sum(len(g) for g in params['remote_block_ids'])} blocks;"
              f" usage {held:.6f} (+{(held - base) * 2048:.1f} blocks of 2048)", flush=True)
        secs, samples = watch(p, base, 120)
        secs = None if secs is None else secs + (time.monotonic() - t_answer - secs - 0)  # from P's answer
        print(f"[probe] A: P released after {secs:.1f} s from its answer; expired counter"
              f" {p.raw_metric('vllm:nixl_num_kv_expired_reqs_total')}", flush=True)
        print("[probe] A samples:", samples[:: max(1, len(samples) // 12)], flush=True)

        # B. P's answer, then a request D rejects (an unknown model name) with P's params
        for how, body_extra in (("unknown-model", {"model": "pdtui-release"}),):
            r = p_leg(p, ids(PROMPT, 3), "stranded-b")
            params = r.json()["kv_transfer_params"]
            held = usage(p)
            t = time.monotonic()
            rel = httpx.post(f"{d.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1,
                                                              "kv_transfer_params": params, **body_extra},
                             headers={"X-Request-Id": "release-b"}, timeout=30)
            t_rel = time.monotonic() - t
            secs, samples = watch(p, base, 60)
            print(f"[probe] B ({how}): held {held:.6f}; D answered {rel.status_code} in {t_rel * 1000:.0f} ms:"
                  f" {rel.text[:160]}; P released {secs if secs is None else round(secs, 2)} s after D's answer;"
                  f" D xfers {d.raw_metric('vllm:nixl_xfer_time_seconds_count')}", flush=True)

        # C. P's answer, D given the real request and the connection closed at once
        r = p_leg(p, ids(PROMPT, 4), "stranded-c")
        params = r.json()["kv_transfer_params"]
        import json
        import socket
        body = json.dumps({"model": "tiny", "prompt": ids(PROMPT, 4), "max_tokens": 64, "stream": True,
                           "kv_transfer_params": params}).encode()
        s = socket.create_connection(("127.0.0.1", d.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\nX-Request-Id: stranded-c\r\n\r\n".encode() + body)
        s.close()
        t = time.monotonic()
        secs, samples = watch(p, base, 60)
        print(f"[probe] C (D sent the request, closed at once): P released {secs if secs is None else round(secs, 2)} s",
              flush=True)
        print(f"[probe] P's expired counter at the end: {p.raw_metric('vllm:nixl_num_kv_expired_reqs_total')}")
    print(f"[probe] logs in {folder}")
    for line in p.log.read_text().splitlines():
        if "expired" in line.lower() or "lease" in line.lower():
            print("  P:", line[-220:])
    for line in d.log.read_text().splitlines():
        if "reject" in line.lower() or "release" in line.lower():
            print("  D:", line[-220:])


if __name__ == "__main__":
    main()
