"""Follow-one-request through a running pdtui proxy: unique big prompts, one at a time, streamed.

Prints per request: TTFT seen by the client, the proxy's toll split (P leg, hop, D first token incl.
the KV pull), blocks and bytes, and D's NIXL counters (bytes, transfer seconds) around it.
Stdlib + httpx only, so it runs on the device machine. Used by proof.sh, beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path

import httpx

from pdtui.core.scrape import parse_metrics


def prompt(n: int) -> str:
    head = uuid.uuid4().hex
    body = " the quick brown fox jumps over the lazy dog"
    return (head + body * (n // len(body) + 1))[:n]


def traces(record: Path) -> dict[str, dict]:
    out = {}
    if record.exists():
        for line in record.read_text().splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ev.get("event") == "request":
                out[ev["request_id"]] = ev
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--proxy", default="http://127.0.0.1:8000")
    ap.add_argument("--d-url", default="http://127.0.0.1:8200")
    ap.add_argument("--p-url", default="http://127.0.0.1:8100")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=2031)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--record", type=Path, required=True)
    ap.add_argument("--metrics-out", default=None)
    args = ap.parse_args()
    model = httpx.get(f"{args.proxy}/v1/models", timeout=30).json()["data"][0]["id"]
    rows = []
    for i in range(args.n):
        before = parse_metrics(httpx.get(f"{args.d_url}/metrics", timeout=10).text)
        rid = f"follow-{i}-{uuid.uuid4().hex[:6]}"
        body = {"model": model, "prompt": prompt(args.prompt_tokens), "max_tokens": args.max_tokens,
                "stream": True, "ignore_eos": True}
        t0 = time.perf_counter()
        first = None
        with httpx.stream("POST", f"{args.proxy}/v1/completions", json=body, timeout=120,
                          headers={"X-Request-Id": rid}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and '"text"' in line and first is None:
                    first = time.perf_counter()
        ttft = (first - t0) * 1000 if first else None
        time.sleep(0.3)
        after = parse_metrics(httpx.get(f"{args.d_url}/metrics", timeout=10).text)
        t = traces(args.record).get(rid, {})
        d_bytes = after.get("vllm:nixl_bytes_transferred_sum", 0) - before.get("vllm:nixl_bytes_transferred_sum", 0)
        d_xfer = after.get("vllm:nixl_xfer_time_seconds_sum", 0) - before.get("vllm:nixl_xfer_time_seconds_sum", 0)
        ext = 'vllm:prompt_tokens_by_source{source="external_kv_transfer"}'
        row = {"id": rid, "client_ttft_ms": ttft, "outcome": t.get("outcome"), "prefill_ms": t.get("prefill_ms"),
               "hop_ms": t.get("hop_ms"), "decode_ttft_ms": t.get("decode_ttft_ms"), "blocks": t.get("blocks"),
               "kv_bytes": t.get("kv_bytes"), "d_nixl_bytes": d_bytes, "d_nixl_xfer_ms": d_xfer * 1000,
               "d_external_tokens": after.get(ext, 0) - before.get(ext, 0),
               "itl_p50_ms": statistics.median(t["itl_ms"]) if t.get("itl_ms") else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    steady = rows[1:] or rows
    def med(k):
        vals = [r[k] for r in steady if r[k] is not None]
        return round(statistics.median(vals), 2) if vals else None
    mib = (med("d_nixl_bytes") or 0) / 2**20
    xfer = med("d_nixl_xfer_ms")
    print(json.dumps({"summary": {k: med(k) for k in ("client_ttft_ms", "prefill_ms", "hop_ms", "decode_ttft_ms",
                                                      "d_nixl_xfer_ms", "d_nixl_bytes", "blocks", "itl_p50_ms")},
                      "ms_per_mib": round(xfer / mib, 3) if xfer and mib else None,
                      "mb_per_s": round(mib * 1.048576 / (xfer / 1000), 1) if xfer and mib else None}))
    if args.metrics_out:
        Path(f"{args.metrics_out}-D.metrics").write_text(httpx.get(f"{args.d_url}/metrics", timeout=10).text)
        Path(f"{args.metrics_out}-P.metrics").write_text(httpx.get(f"{args.p_url}/metrics", timeout=10).text)


if __name__ == "__main__":
    main()
