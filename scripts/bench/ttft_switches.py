#!/usr/bin/env python3
"""The TTFT switches A/B on ONE pair: the same engines behind five proxies, requests interleaved.

The bench's switch arms (pdtui bench --arms pair,pair-tokenize-once,pair-first-token) start a pair
per arm, so on a shared machine the arms' P legs drift apart by more than the switches move (the
CPU runs in results/2026-11-30-cpu-ttft-toll). Here one pair serves every variant: the pair's own proxy (no
switch) and three more proxy processes over the same P and D (tokenize_once, first_token_from_p,
both), and a fifth, `single`, with P as its only instance and no prefill leg (the single-proxied arm's
proxy, `runners.arm_proxy`): P's engine serving the whole request through the same proxy code, so the
toll (pair TTFT / single TTFT) is measured on the same GPU, the same engine and the same path, round
by round (P is a kv_producer; a request with no kv_transfer_params is a plain request to it). Each
round sends one follow request (a unique prompt of --prompt-len tokens, streamed,
max_tokens --max-tokens, ignore_eos) through each proxy in turn, rotating the order each round.
Printed per variant, p50 over the rounds (ms): the client's TTFT, its toll against `single`, the P leg, the hop, D's leg,
TTFT less the P leg (what the pair adds beyond P), the second-token gap, the proxy's own TTFT, the
proxy process's CPU time per request (user + system, from /proc; with ``--max-tokens`` large this is
mostly the per-chunk relay), and the engines' spans when --traces-port is set. ``--chat``: the same
through /v1/chat/completions (one user message of --prompt-len characters; the template adds its
own tokens).

    flock /tmp/pdtui-engines.lock .venv/bin/python scripts/bench/ttft_switches.py --port-offset 23000 --rounds 12
    scripts/bench/ttft_switches.py --profile two-gpu --model qwen2.5-0.5b --rounds 50 --prompt-len 2031   # the H200s
    ... --variants single,none,first_token --json out.json     # a subset; every row and p50 to a file

Everything it starts stops in a ``finally`` (the Runtime's aclose, each proxy's stop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pdtui.bench.runners import arm_proxy
from pdtui.bench.workload import make_prompt
from pdtui.core import config as config_mod
from pdtui.core import topology
from pdtui.core.events import EngineSpan, Event, RequestTraced
from pdtui.core.proxy import ProxyProcess, ProxySettings
from pdtui.core.runtime import Runtime

VARIANTS = {"single": None, "none": {}, "tokenize_once": {"tokenize_once": True},
            "first_token": {"first_token_from_p": True}, "both": {"tokenize_once": True, "first_token_from_p": True}}
"""Variant -> the proxy's switches; ``none`` is the pair's own proxy; ``single`` (None) is P alone."""


async def one(client: httpx.AsyncClient, url: str, body: dict, rid: str) -> tuple[float | None, float | None]:
    """Client TTFT and second-token gap (ms) of one streamed completion (or chat completion)."""
    t0 = time.perf_counter()
    times: list[float] = []
    chat = "messages" in body
    path, key = ("/v1/chat/completions", '"content":"') if chat else ("/v1/completions", '"text":"')
    async with client.stream("POST", f"{url}{path}", json=body, headers={"X-Request-Id": rid}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            line = line.replace('": "', '":"')
            if line.startswith("data: {") and key in line and key + '"' not in line:
                times.append(time.perf_counter())
    ttft = (times[0] - t0) * 1000 if times else None
    gap = (times[1] - times[0]) * 1000 if len(times) > 1 else None
    return ttft, gap


def cpu_s(pid: int | None) -> float:
    """A process's user + system CPU time (s), from /proc/PID/stat."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p50(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    return f"{statistics.median(xs):.1f}" if xs else "-"


async def main(args: argparse.Namespace) -> int:
    cfg = config_mod.load_profile(args.profile or config_mod.default_profile_name())
    if args.model:
        cfg.model = args.model
    cfg.traces_port = args.traces_port
    cfg = config_mod.shift_ports(cfg, args.port_offset)
    traces: dict[str, RequestTraced] = {}
    spans: dict[str, dict[str, EngineSpan]] = {}

    def on_event(ev: Event) -> None:
        if isinstance(ev, RequestTraced):
            traces[ev.request_id] = ev
        elif isinstance(ev, EngineSpan):
            spans.setdefault(ev.request_id, {})[ev.instance] = ev

    rt = Runtime(topology.pair(cfg))
    events = rt.subscribe()

    async def pump() -> None:
        async for ev in events:
            on_event(ev)

    pumper = asyncio.create_task(pump())
    proxies: dict[str, ProxyProcess] = {}
    urls = {"none": cfg.proxy_url}
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"unknown variant {', '.join(unknown)}: one of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    try:
        ready = await rt.start()
        print(f"pair ready in {ready:.1f} s", flush=True)
        pre = [(n, i.url) for n, i in rt.instances.items() if i.role == "prefill"]
        dec = [(n, i.url) for n, i in rt.instances.items() if i.role == "decode"]
        for k, name in enumerate(v for v in variants if v != "none"):
            port = cfg.proxy_port + 50 + k
            switches = VARIANTS[name]
            if switches is None:  # P alone, as the single-proxied arm's proxy
                p = arm_proxy(cfg.host, port, pre[:1], cfg.block_size, on_event)
                p.set_up(pre[0][0], True)
            else:
                p = ProxyProcess(pre, dec, host=cfg.host, port=port, on_event=on_event,
                                 settings=ProxySettings(block_size=cfg.block_size, **switches))
                for n in rt.instances:
                    p.set_up(n, True)
            proxies[name] = p
            await p.start()
            urls[name] = p.url
        rows: dict[str, list[dict]] = {v: [] for v in variants}
        pids = {v: rt.proxy.pid if v == "none" else proxies[v].pid for v in variants}
        cpu0: dict[str, float] = {}
        async with httpx.AsyncClient(timeout=300) as client:
            for rnd in range(args.rounds + 1):  # round 0 warms every proxy up, not counted
                if rnd == 1:
                    cpu0 = {v: cpu_s(pid) for v, pid in pids.items()}
                order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
                for v in order:
                    rid = f"ab-{v}-{rnd}-{uuid.uuid4().hex[:6]}"
                    text = make_prompt(rnd, f"ab-{v}", rnd, args.prompt_len)
                    body = {"model": cfg.model_name, "max_tokens": args.max_tokens, "stream": True, "ignore_eos": True,
                            "temperature": 0.0}
                    if args.chat:
                        body["messages"] = [{"role": "user", "content": text}]
                    else:
                        body["prompt"] = text
                    ttft, gap = await one(client, urls[v], body, rid)
                    if rnd:
                        rows[v].append({"rid": rid, "ttft": ttft, "gap": gap})
                    await asyncio.sleep(args.pause)
        cpu = {v: (cpu_s(pid) - cpu0[v]) * 1000 / args.rounds for v, pid in pids.items()}
        await asyncio.sleep(1.0)  # the last traces and spans
        print(f"\n{args.rounds} rounds, {'chat, ' if args.chat else ''}prompt {args.prompt_len} tokens,"
              f" {args.max_tokens} out, p50 ms ({cfg.profile_name}, {cfg.model}, block {cfg.block_size})\n")
        base = statistics.median([r["ttft"] for r in rows["single"] if r["ttft"] is not None] or [0]) \
            if "single" in rows else 0
        head = ("| variant | TTFT | toll | P leg | hop | D leg | TTFT - P leg | 2nd-token gap | proxy's TTFT | served |"
                " proxy CPU/req |")
        print(head + (" P queue | P prefill | D queue | D first step |" if args.traces_port else ""))
        print("|---" * (head.count("|") - 1 + (4 if args.traces_port else 0)) + "|")
        for v, rs in rows.items():
            ts = [traces.get(r["rid"]) for r in rs]
            col = {k: [getattr(t, k) for t in ts if t is not None and getattr(t, k) is not None]
                   for k in ("prefill_ms", "hop_ms", "decode_ttft_ms", "ttft_ms")}
            beyond = [r["ttft"] - t.prefill_ms for r, t in zip(rs, ts)
                      if t is not None and r["ttft"] is not None and t.prefill_ms is not None]
            served = {}
            for t in ts:
                key = (t.switch or "none") if t else "?"
                served[key] = served.get(key, 0) + 1
            ttfts = [r["ttft"] for r in rs if r["ttft"] is not None]
            toll = f"{statistics.median(ttfts) / base - 1:+.1%}" if base and ttfts and v != "single" else ""
            line = (f"| {v} | {p50([r['ttft'] for r in rs])} | {toll} | {p50(col['prefill_ms'])} | {p50(col['hop_ms'])}"
                    f" | {p50(col['decode_ttft_ms'])} | {p50(beyond)} | {p50([r['gap'] for r in rs])}"
                    f" | {p50(col['ttft_ms'])} | {', '.join(f'{k} {n}' for k, n in served.items())} | {cpu[v]:.2f} |")
            if args.traces_port:
                sp = [spans.get(r["rid"], {}) for r in rs]
                line += (f" {p50([s['P'].queue_ms for s in sp if 'P' in s])} | {p50([s['P'].prefill_ms for s in sp if 'P' in s])}"
                         f" | {p50([s['D'].queue_ms for s in sp if 'D' in s])} | {p50([s['D'].prefill_ms for s in sp if 'D' in s])} |")
            print(line)
            for r, t in zip(rs, ts):
                if t is not None:
                    r.update(prefill_ms=t.prefill_ms, hop_ms=t.hop_ms, decode_ttft_ms=t.decode_ttft_ms,
                             switch=t.switch, outcome=t.outcome)
                sp = spans.get(r["rid"], {})
                r["engine"] = {inst: {"queue_ms": e.queue_ms, "prefill_ms": e.prefill_ms} for inst, e in sp.items()}
        print("\nthe toll is each variant's TTFT p50 against single's (P alone through the same proxy code),"
              " requests interleaved on the same engines")
        if args.json:
            Path(args.json).write_text(json.dumps({"profile": cfg.profile_name, "model": cfg.model,
                                                   "block_size": cfg.block_size, "prompt_len": args.prompt_len,
                                                   "max_tokens": args.max_tokens, "rounds": args.rounds,
                                                   "chat": args.chat, "proxy_cpu_ms_per_request": cpu,
                                                   "rows": rows}, indent=1))
        return 0
    finally:
        for p in proxies.values():
            await p.stop()
        await rt.aclose(reason="ttft_switches done")
        pumper.cancel()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--port-offset", type=int, default=23000)
    ap.add_argument("--traces-port", type=int, default=None, help="also collect the engines' spans (OTLP)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=2031)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--pause", type=float, default=0.2, help="seconds between requests")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, from {', '.join(VARIANTS)} (default: all); none is the pair's own proxy")
    ap.add_argument("--json", default=None, help="write every request's figures here")
    ap.add_argument("--chat", action="store_true", help="/v1/chat/completions instead of /v1/completions")
    sys.exit(asyncio.run(main(ap.parse_args())))
