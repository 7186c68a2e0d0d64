"""Probe: the CPU pair over an emulated link (pdtui.core.link), one pair start, the link reshaped live.

    flock /tmp/pdtui-engines.lock timeout 900 .venv/bin/python results/2026-12-07-link/probe_pair.py \
        --links 1gbit,unshaped,10gbit,25gbit,2.5gbit --tokens 3000 --n 4

For each link: N requests of a unique prompt of --tokens tokens (max_tokens 4, streamed), through
pdtui's proxy; per request the trace's KV bytes and TTFT, and D's measured KV read (NIXL's
xferDuration, the "pdtui: KV read" line) against the formula bytes / rate + RTT. "unshaped" is the
same veth without a qdisc. Prints one line per request and a summary per link; --json writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from pdtui.core import config as config_mod
from pdtui.core import link as link_mod
from pdtui.core import topology
from pdtui.core.events import ConnectorEvent, RequestTraced
from pdtui.core.prompts import TokenCounter
from pdtui.core.runtime import Runtime


async def main(args: argparse.Namespace) -> int:
    cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), args.port_offset)
    first = args.links.split(",")[0]
    cfg.link = first if first != "unshaped" else "1gbit"
    rt = Runtime(topology.pair(cfg))
    traces: dict[str, RequestTraced] = {}
    reads: dict[str, dict[str, Any]] = {}
    stream = rt.subscribe()

    async def pump() -> None:
        async for ev in stream:
            if isinstance(ev, RequestTraced):
                traces[ev.request_id] = ev
            elif isinstance(ev, ConnectorEvent) and ev.what == "kv_read":
                reads[ev.fields["request_id"]] = ev.fields

    task = asyncio.create_task(pump())
    counter = TokenCounter.for_model(rt.topology.model)
    assert counter is not None
    rows: list[dict[str, Any]] = []
    try:
        t0 = time.monotonic()
        await rt.start()
        print(f"pair up over the link in {time.monotonic() - t0:.1f} s: {rt.link.plan.namespaces if rt.link else None}")
        assert rt.link is not None
        salt = int(time.time()) % 100000
        async with httpx.AsyncClient(timeout=120) as client:
            for name in args.links.split(","):
                spec = link_mod.LinkSpec("unshaped", None) if name == "unshaped" else link_mod.LinkSpec.parse(name)
                if name != first or name == "unshaped":
                    rt.link.reshape(spec)
                print(f"\n== link {name}: {spec.describe() if spec.emulated else 'veth, no qdisc'}"
                      f" qdisc: {next(iter(rt.link.qdiscs().values()))[:60]}")
                for i in range(args.n):
                    salt += 1
                    prompt, ntok = counter.prompt(args.tokens, salt)
                    rid = f"probe-{name}-{i}-{salt}"
                    body = {"model": cfg.model_name, "prompt": prompt, "max_tokens": 4, "stream": True,
                            "ignore_eos": True}
                    t = time.perf_counter()
                    ttft = None
                    async with client.stream("POST", f"{rt.url}/v1/completions", json=body,
                                             headers={"X-Request-Id": rid}) as r:
                        async for chunk in r.aiter_bytes():
                            if ttft is None and b'"text"' in chunk:
                                ttft = (time.perf_counter() - t) * 1e3
                    for _ in range(100):
                        if rid in traces and rid in reads:
                            break
                        await asyncio.sleep(0.05)
                    tr, rd = traces.get(rid), reads.get(rid)
                    row: dict[str, Any] = {"link": name, "rate_bps": spec.rate_bps, "tokens": ntok,
                                           "client_ttft_ms": ttft, "ttft_ms": tr.ttft_ms if tr else None,
                                           "prefill_ms": tr.prefill_ms if tr else None,
                                           "decode_ttft_ms": tr.decode_ttft_ms if tr else None,
                                           "kv_bytes": tr.kv_bytes if tr else None,
                                           "read_ms": rd["xfer_ms"] if rd else None,
                                           "read_bytes": rd["bytes"] if rd else None,
                                           "post_ms": rd["post_ms"] if rd else None}
                    if rd and spec.emulated:
                        row["formula_ms"] = spec.transfer_s(rd["bytes"]) * 1e3
                        row["ratio"] = rd["xfer_ms"] / row["formula_ms"]
                    if rd:
                        row["gbit_s"] = rd["bytes"] * 8 / (rd["xfer_ms"] / 1e3) / 1e9
                    rows.append(row)
                    print("  " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                          if k not in ("rate_bps",)))
                got = [r for r in rows if r["link"] == name and r.get("read_ms")]
                if got:
                    med = statistics.median(r["read_ms"] for r in got)
                    f = got[0].get("formula_ms")
                    print(f"  median read {med:.2f} ms" + (f", formula {f:.2f} ms, ratio {med / f:.3f}" if f else "")
                          + f", median TTFT {statistics.median(r['ttft_ms'] for r in got if r['ttft_ms']):.1f} ms")
    finally:
        await rt.aclose()
        task.cancel()
        left = link_mod.leftovers(rt.topology.link) if rt.topology.link else []
        print(f"\nclosed; link leftovers: {left}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--links", default="1gbit,unshaped,10gbit,25gbit")
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--port-offset", type=int, default=25000)
    ap.add_argument("--json", default=None)
    raise SystemExit(asyncio.run(main(ap.parse_args())))
