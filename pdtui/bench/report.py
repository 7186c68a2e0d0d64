"""Statistics, the table, the JSON file and the plots of a benchmark.

Pure functions over samples (``workload.Sample``) so they are tested without engines:

- ``percentile``: pdtui.core.stats.percentile, the one definition (vllm bench serve's: numpy's linear);
- ``summarize_arm``: TTFT of the follow requests and of the big prompts, the steady streams' ITL
  inside the measured window, the toll split of the pair, D's KV reads as measured per request
  (``kv_reads``: from each request's own read, never from vLLM's histogram buckets);
- ``verdict``: toll = pair TTFT p50 / single TTFT p50 (> 1: the pair is slower to first token);
  purchase = single ITL p99 / pair ITL p99 (> 1: the pair bought smoother decode). "single" is
  ``single-proxied`` when that arm ran: the pair is measured through pdtui's proxy, and so is it;
  with only ``single`` the comparison crosses paths and the text says so. ``proxy_cost``:
  single-proxied vs single, the proxy's own cost. The samples are checked before a ratio is
  stated (``itl_problems``: chunks in bunches, too few gaps, stalls beyond the p99; ``starved``: a
  colocated arm's TTFT a multiple of the other's on the same prompts): where they cannot carry it
  the verdict says "cannot tell" and why, with the ITL that survives bunching beside it (the gaps
  between deliveries, ``window_deliveries``);
- ``table``: the seed's shape, per arm TTFT p50/p99 and ITL p50/p99, then toll and purchase in words.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pdtui.bench.workload import Sample
from pdtui.core.proxy.routing import DECODE_CHOICES
from pdtui.core.stats import percentile  # the one definition (vllm bench serve's)

SCHEMA = "pdtui-bench/1"
PCTS = (50, 90, 99)


def dist(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, p50/p90/p99, max of a list of milliseconds."""
    out: dict[str, Any] = {"n": len(values)}
    out["mean"] = sum(values) / len(values) if values else None
    for p in PCTS:
        out[f"p{p}"] = percentile(values, p)
    out["max"] = max(values) if values else None
    return out


def measured(samples: Iterable[Sample], workload: str) -> list[Sample]:
    return [s for s in samples if s.workload == workload and not s.warmup]


def chunk_times(s: Sample, every_chunk: bool = False) -> list[float]:
    """Arrival times of a request's token chunks: those with text (pdtui's definition), or with
    ``every_chunk`` also those with empty text (``vllm bench serve``'s: every chunk with choices)."""
    return sorted(s.chunk_t + s.empty_t) if every_chunk and s.empty_t else s.chunk_t


def gaps_ms(s: Sample, every_chunk: bool = False) -> list[float]:
    t = chunk_times(s, every_chunk)
    return [(b - a) * 1000.0 for a, b in itertools.pairwise(t)]


def ttft_ms(s: Sample, every_chunk: bool = False) -> float | None:
    t = chunk_times(s, every_chunk)
    return (t[0] - s.t_send) * 1000.0 if t else None


def window_itl(samples: Iterable[Sample], window: Sequence[float] | None, every_chunk: bool = False) -> list[float]:
    """Gaps between consecutive token chunks of the steady streams that lie wholly inside the window
    (a gap begun in the warm-up or ended after the window is left out; a stream's restart is no gap)."""
    out: list[float] = []
    for s in samples:
        if s.workload != "stream" or s.warmup:
            continue
        out += window_gaps(chunk_times(s, every_chunk), window)
    return out


def window_gaps(times: Sequence[float], window: Sequence[float] | None) -> list[float]:
    """Gaps (ms) between consecutive times (s) that lie wholly inside the window."""
    return [(b - a) * 1000.0 for a, b in itertools.pairwise(times)
            if window is None or (window[0] <= a and b <= window[1])]


BUNCH_MS = 0.5
"""Events a stream's client read less than this apart came in one read: a delivery of several. A
decode that spaced its tokens so closely would be over 2,000 tokens/s per stream."""


def bunching(gaps: Sequence[float]) -> dict[str, Any]:
    """How many of a stream's event gaps (ms) are under BUNCH_MS: events the client read together."""
    bunched = sum(1 for g in gaps if g < BUNCH_MS)
    return {"gaps": len(gaps), "bunched": bunched, "share": bunched / len(gaps) if gaps else None,
            "under_ms": BUNCH_MS}


def deliveries(times: Sequence[float]) -> list[float]:
    """The times (s) of a stream's deliveries: its events, those less than BUNCH_MS after the
    previous one merged into that one's delivery (the client read them together)."""
    out: list[float] = []
    last: float | None = None
    for t in times:
        if last is None or (t - last) * 1000.0 >= BUNCH_MS:
            out.append(t)
        last = t
    return out


def window_deliveries(samples: Iterable[Sample], window: Sequence[float] | None) -> list[float]:
    """Gaps (ms) between the steady streams' deliveries (every event with choices, ``deliveries``)
    wholly inside the window: the ITL that survives bunching. It is what the client waited between
    reads that brought tokens; it cannot say whether D or the client's own scheduling made a wait."""
    out: list[float] = []
    for s in samples:
        if s.workload == "stream" and not s.warmup:
            out += window_gaps(deliveries(chunk_times(s, every_chunk=True)), window)
    return out


def tokens_per_event(samples: Iterable[Sample]) -> dict[str, Any]:
    """Tokens per SSE event over the streams that ran to their max_tokens (the bench sends
    ignore_eos: such a stream has exactly max_tokens tokens): above 1, vLLM merged tokens into
    events, which no event says (docs/bench.md, "Per-token times")."""
    done = [s for s in samples if s.ok and not s.cancelled and not s.warmup]
    tokens = sum(s.max_tokens for s in done)
    events = sum(len(s.chunk_t) + len(s.empty_t) for s in done)
    return {"streams": len(done), "tokens": tokens, "events": events, "mean": tokens / events if events else None}


SPLIT_KEYS = ("prefill_ms", "hop_ms", "decode_ttft_ms", "proxy_ms", "client_ms")
"""The client's TTFT in steps that add up to it (``toll_split``)."""


def toll_split(s: Sample) -> dict[str, float | None] | None:
    """Pair arms: the client's TTFT in named steps that add up to it. From the proxy's trace:
    prefill_ms (the P leg: P's queue, prefill and one token, with the loopback both ways), hop_ms
    (the proxy, from P's answer to D's request sent), decode_ttft_ms (D's leg to its first token:
    tokenization, queue, the KV read, the first step). Derived: proxy_ms (the proxy's TTFT less
    those: parsing the body, writing the first token) and client_ms (the client's TTFT less the
    proxy's: the client's loopback and its own reading). With first_token_from_p the first token
    is P's: hop and D's leg come after it, in the second-token gap (``seam_ms``), and count 0 here."""
    if not s.trace:
        return None
    t = s.trace
    out: dict[str, float | None] = {k: t.get(k) for k in ("prefill_ms", "hop_ms", "decode_ttft_ms")}
    if t.get("switch") in ("first_token", "first_token_p_only"):
        out["seam_ms"] = (t.get("hop_ms") or 0.0) + (t.get("decode_ttft_ms") or 0.0)
        out["hop_ms"], out["decode_ttft_ms"] = 0.0, 0.0
    proxy_ttft = t.get("ttft_ms")
    inner = [out[k] for k in ("prefill_ms", "hop_ms", "decode_ttft_ms")]
    out["proxy_ms"] = proxy_ttft - sum(inner) if proxy_ttft is not None and None not in inner else None  # type: ignore[arg-type]
    out["client_ms"] = s.ttft_ms - proxy_ttft if s.ttft_ms is not None and proxy_ttft is not None else None
    return out


ENGINE_KEYS = ("p_outside_ms", "p_engine_other_ms", "p_queue_ms", "p_prefill_ms",
               "d_outside_ms", "d_engine_other_ms", "d_queue_ms", "d_first_step_ms")


def engine_split(s: Sample) -> dict[str, float] | None:
    """With the engines' spans (``traces_port``, pdtui.core.otlp): the P leg and D's leg split by
    the engines' own clocks. Measured: queue (waiting to be scheduled) and prefill / first step
    (scheduled to first token). Inferred: *_engine_other (the engine's time outside those: arrival
    to queued, and the output's way out) and *_outside (the leg as the proxy timed it less the
    engine's span: HTTP both ways, JSON, tokenization before the span begins)."""
    t = s.trace or {}
    eng = t.get("engine") or {}
    p = next((v for k, v in eng.items() if k.startswith("P")), None)
    d = next((v for k, v in eng.items() if k.startswith("D")), None)
    out: dict[str, float] = {}
    if p and None not in (t.get("prefill_ms"), p.get("e2e_ms"), p.get("queue_ms"), p.get("prefill_ms")):
        out["p_outside_ms"] = t["prefill_ms"] - p["e2e_ms"]
        out["p_engine_other_ms"] = p["e2e_ms"] - p["queue_ms"] - p["prefill_ms"]
        out["p_queue_ms"], out["p_prefill_ms"] = p["queue_ms"], p["prefill_ms"]
    if d and None not in (t.get("decode_ttft_ms"), d.get("ttft_ms"), d.get("queue_ms"), d.get("prefill_ms")):
        out["d_outside_ms"] = t["decode_ttft_ms"] - d["ttft_ms"]
        out["d_engine_other_ms"] = d["ttft_ms"] - d["queue_ms"] - d["prefill_ms"]
        out["d_queue_ms"], out["d_first_step_ms"] = d["queue_ms"], d["prefill_ms"]
    return out or None


def second_gap_ms(s: Sample) -> float | None:
    """The gap from the first token chunk to the second, as the client saw it."""
    gaps = gaps_ms(s)
    return gaps[0] if gaps else None


def summarize_arm(samples: Sequence[Sample], windows: dict[str, Sequence[float]]) -> dict[str, Any]:
    follow = [s for s in measured(samples, "follow") if s.ok]
    big = [s for s in measured(samples, "big") if s.ok]
    failed = [s.request_id for s in samples if not s.warmup and not s.ok and not s.cancelled]
    out: dict[str, Any] = {
        "follow": {
            "requests": len(measured(samples, "follow")),
            "ok": len(follow),
            "ttft_ms": dist([s.ttft_ms for s in follow if s.ttft_ms is not None]),
            "itl_ms": dist([g for s in follow for g in s.itl_ms]),
            # vllm bench serve's definition: every chunk with choices, empty text or not
            "ttft_ms_every_chunk": dist([x for s in follow if (x := ttft_ms(s, True)) is not None]),
            "itl_ms_every_chunk": dist([g for s in follow for g in gaps_ms(s, True)]),
            "ttfts_ms": [round(s.ttft_ms, 1) for s in follow if s.ttft_ms is not None],
            "stalls": _stalls([g for s in follow for g in gaps_ms(s, True)]),
        },
        "interference": {
            "window_s": (windows["interference"][1] - windows["interference"][0])
            if "interference" in windows else None,
            "streams_requests": len(measured(samples, "stream")),
            "big_requests": len(measured(samples, "big")),
            "big_ok": len(big),
            "big_ttft_ms": dist([s.ttft_ms for s in big if s.ttft_ms is not None]),
            "big_ttfts_ms": [round(s.ttft_ms, 1) for s in big if s.ttft_ms is not None],
            "stream_itl_ms": dist(window_itl(samples, windows.get("interference"))),
            "big_ttft_ms_every_chunk": dist([x for s in big if (x := ttft_ms(s, True)) is not None]),
            "stream_itl_ms_every_chunk": dist(window_itl(samples, windows.get("interference"), every_chunk=True)),
            "stalls": _stalls(window_itl(samples, windows.get("interference"), every_chunk=True)),
            "stream_bunching": bunching(window_itl(samples, windows.get("interference"), every_chunk=True)),
            "stream_delivery_gap_ms": dist(window_deliveries(samples, windows.get("interference"))),
            "tokens_per_event": tokens_per_event(measured(samples, "stream")),
        },
        "failed": failed,
        "recompute": recompute_count(samples),
    }
    out["follow"]["second_gap_ms"] = dist([x for s in follow if (x := second_gap_ms(s)) is not None])
    splits = [t for s in follow if (t := toll_split(s))]
    if splits:
        out["follow"]["toll_split_ms"] = {
            k: dist([v for x in splits if (v := x.get(k)) is not None]) for k in (*SPLIT_KEYS, "seam_ms")
        }
        switches: dict[str, int] = {}
        for s in follow:
            trace = s.trace or {}
            key = trace.get("switch") or (f"skipped: {trace['switch_skipped']}"
                                          if trace.get("switch_skipped") else "none")
            switches[key] = switches.get(key, 0) + 1
        out["follow"]["switches"] = switches
        ranked = sorted((s for s in follow if s.ttft_ms is not None and s.trace), key=lambda s: s.ttft_ms or 0.0)
        if ranked:  # the median request (the lower one of an even count): its steps add up to its TTFT
            mid = ranked[(len(ranked) - 1) // 2]
            out["follow"]["median_split_ms"] = {"request_id": mid.request_id, "ttft_ms": mid.ttft_ms,
                                                **(toll_split(mid) or {})}
    engine = [e for s in follow if (e := engine_split(s))]
    if engine:
        out["follow"]["engine_split_ms"] = {k: dist([x[k] for x in engine if k in x]) for k in ENGINE_KEYS}
    reads = kv_reads(samples)
    if reads is not None:
        out["kv_read"] = reads
        follow_reads = kv_reads(follow)
        if follow_reads is not None:  # the big prompt alone: the transfer the link table prices
            out["follow"]["kv_read"] = follow_reads
    freight = [float(b) for s in samples if not s.warmup and s.trace and s.trace.get("outcome") == "pair"
               and (b := s.trace.get("kv_bytes")) is not None]
    if freight:
        out["freight_bytes"] = dist(freight)
    fill = fill_summary(samples, windows)
    if fill is not None:
        out["fill"] = fill
    return out


def kv_reads(samples: Sequence[Sample]) -> dict[str, Any] | None:
    """D's read of each request's KV, measured by NIXL per request (``trace["kv_read"]``: the
    "pdtui: KV read" line of pdtui.engine.nixl_quiet, joined by X-Request-Id), over every
    measured request of the arm (follow, streams, big prompts; not the warm-ups): the time (ms),
    the bytes and the achieved GB/s, each a ``dist``. None when no request has one (not a pair, or
    an engine that does not log its reads): the report then says so and shows no transfer time."""
    reads = [r for s in samples if not s.warmup and (r := (s.trace or {}).get("kv_read"))]
    if not reads:
        return None
    return {"n": len(reads), "ms": dist([r["ms"] for r in reads]), "bytes": dist([float(r["bytes"]) for r in reads]),
            "gbps": dist([r["gbps"] for r in reads if r.get("gbps") is not None]),
            "op": "write" if all(r.get("op") == "write" for r in reads) else "read"}


def kv_read_lines(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """One line per arm whose D read KV: the measured per-request read time and rate."""
    lines = []
    for arm, s in summaries.items():
        k = s.get("kv_read")
        if not k:
            continue
        ms, gbps = k["ms"], k["gbps"]
        what = "KV write, measured per request by NIXL on P (push)" if k.get("op") == "write" else \
            "KV read, measured per request by NIXL on D"
        lines.append(f"{arm} {what} ({k['n']} {'writes' if k.get('op') == 'write' else 'reads'}):"
                     f" mean {_ms3(ms['mean'])} ms,"
                     f" p50 {_ms3(ms['p50'])}, p99 {_ms3(ms['p99'])}, max {_ms3(ms['max'])};"
                     f" {k['bytes']['mean'] / 2**20:.2f} MiB mean, {_gbps(gbps['p50'])} GB/s p50")
    return lines


def _ms3(x: float | None) -> str:
    """A read time with the digits it needs (0.31, 5.26, 24.7 ms)."""
    return "-" if x is None else format(x, ".2f" if x < 10 else ".1f")


def _gbps(x: float | None) -> str:
    """GB/s: three significant digits below 1 (a CPU pair's 0.00287), else two decimals."""
    return "-" if x is None else format(x, ".2f" if x >= 1 else ".3g")


def recompute_count(samples: Sequence[Sample]) -> dict[str, Any]:
    """Silent recompute (RequestTraced.recomputed): of the paired requests whose D reported the
    prompt tokens it computed, how many computed more than one block, and which."""
    paired = [s for s in samples if not s.warmup and s.trace and s.trace.get("d_computed_tokens") is not None]
    bad = [s.request_id for s in paired if (s.trace or {}).get("recomputed")]
    return {"checked": len(paired), "recomputed": len(bad), "request_ids": bad,
            "d_computed_tokens": sum((s.trace or {}).get("d_computed_tokens") or 0 for s in paired)}


def routing_summary(samples: Sequence[Sample], preemptions: dict[str, int] | None = None) -> dict[str, Any]:
    """Where the arm's requests went and how they ended, for comparing the choices of D (the
    routing arms, the fill workload): requests (not the warm-ups), the failed ones (not ok, not cut
    by the bench), how many each D took (their traces' decode; "-": no trace or no D), each D's
    preemptions over the load (``preemptions``: vllm:num_preemptions' rise, runners) and the
    reason of the last request each D took (RequestTraced.decode_reason)."""
    reqs = [s for s in samples if not s.warmup]
    failed = [s.request_id for s in reqs if not s.ok and not s.cancelled]
    by_decode: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for s in reqs:
        trace = s.trace or {}
        d = trace.get("decode") or "-"
        by_decode[d] = by_decode.get(d, 0) + 1
        if trace.get("decode_reason"):
            reasons[d] = trace["decode_reason"]
    pre = dict(preemptions or {})
    return {"requests": len(reqs), "failed": len(failed), "failed_ids": failed[:20], "by_decode": by_decode,
            "preemptions": pre, "preempted": sum(pre.values()) if preemptions is not None else None,
            "last_reason": reasons}


def routing_line(r: dict[str, Any]) -> str:
    """One line of routing_summary: the failures, D's preemptions and where the requests went."""
    pre = r.get("preemptions") or {}
    pre_text = ", ".join(f"{d} {n}" for d, n in pre.items()) if pre else "not measured"
    went = ", ".join(f"{d} {n}" for d, n in sorted((r.get("by_decode") or {}).items()))
    return f"{r['requests']} requests, {r['failed']} failed; D's preemptions: {pre_text}; requests per D: {went}"


def routing_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Per pair arm: requests, failed, preempted, per D. Shown when a routing arm or the fill
    workload ran (the comparison of the choices of D); empty otherwise."""
    shown = [a for a, s in summaries.items() if s.get("routing") and (a in ROUTING_ARMS or s.get("fill"))]
    if not shown:
        return []
    lines = ["", "choice of D (failed: not answered in full; preempted: D's vllm:num_preemptions over the load):", "",
             "| arm | requests | failed | preempted | requests per D | preemptions per D |",
             "|---|---:|---:|---:|---|---|"]
    for arm in shown:
        r = summaries[arm]["routing"]
        pre = r.get("preemptions") or {}
        went = ", ".join(f"{d} {n}" for d, n in sorted((r.get("by_decode") or {}).items()))
        lines.append(f"| {arm} | {r['requests']} | {r['failed']} | {'-' if r.get('preempted') is None else r['preempted']}"
                     f" | {went} | {', '.join(f'{d} {n}' for d, n in pre.items()) or '-'} |")
    return lines


def fill_summary(samples: Sequence[Sample], windows: dict[str, Sequence[float]]) -> dict[str, Any] | None:
    """The fill workload's streams: how many, how many ended whole, their TTFT and ITL; None if it did not run."""
    fill = measured(samples, "fill")
    if not fill:
        return None
    ok = [s for s in fill if s.ok]
    w = windows.get("fill")
    return {"requests": len(fill), "ok": len(ok), "window_s": (w[1] - w[0]) if w else None,
            "ttft_ms": dist([s.ttft_ms for s in ok if s.ttft_ms is not None]),
            "itl_ms": dist([g for s in ok for g in s.itl_ms])}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


ROUTING_ARMS = tuple(f"pair-{choice}" for choice in DECODE_CHOICES)
"""The pair under each choice of D (runners.ROUTING_ARMS): compared by routing_table, not by the switch table."""
PROXIED = ("pair", "single-proxied", "two-single", "pair-tokenize-once", "pair-first-token", "pair-both",
           *ROUTING_ARMS)


def proxied(arm: str) -> bool:
    """Whether ``arm`` is measured through pdtui's proxy (``PROXIED``; a pair arm over another
    connector, ``pair@KEY``, as its pair arm)."""
    return arm.partition("@")[0] in PROXIED


def transport_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """The connectors side by side (``pair`` and every ``pair@KEY`` arm, the same seeded prompts):
    follow TTFT p50 and the toll against the single arm, the steady streams' ITL p99 and the
    purchase, the freight per request (the traces' kv_bytes: the connector's own rule), the
    transfer time per request where the connector measures one (NIXL's read on D, its write on P
    for push) or says that it has none, D's computed prompt tokens (the silent-recompute check).
    Empty unless a pair@KEY arm ran."""
    arms = [a for a in summaries if a == "pair" or a.startswith("pair@")]
    if not any("@" in a for a in arms):
        return []
    t_base, i_base = baseline_for(summaries, "ttft"), baseline_for(summaries, "itl99")
    s_ttft = _stat(summaries.get(t_base), "ttft") if t_base else None
    s_itl = _stat(summaries.get(i_base), "itl99") if i_base else None
    lines = ["", (f"transports (the same prompts; toll against {t_base or 'no single arm'}, purchase against"
                  f" {i_base or 'no single arm'}; freight per request p50 / mean, transfer per request p50):"), "",
             "| arm | connector | TTFT p50 ms | toll | ITL p99 ms | purchase | freight | transfer ms | D computed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for arm in arms:
        s = summaries[arm]
        conn = s.get("connector") or (arm.partition("@")[2] or "the profile's")
        ttft, itl = _stat(s, "ttft"), _stat(s, "itl99")
        toll, purchase = _ratio(ttft, s_ttft), _ratio(s_itl, itl)
        fbd = s.get("freight_bytes") or {}
        fb, fmean = fbd.get("p50"), fbd.get("mean")
        k = s.get("kv_read")
        transfer = _ms3(k["ms"]["p50"]) if k else "none per request"
        rc = s.get("recompute") or {}
        computed = (f"{rc.get('d_computed_tokens', 0):,} tok in {rc.get('checked', 0)}"
                    + (f", {rc['recomputed']} recomputed" if rc.get("recomputed") else "")) if rc.get("checked") else "-"
        lines.append(f"| {arm} | {conn} | {_ms(ttft)} | {'-' if toll is None else f'{toll:.2f}x'} | {_ms(itl)}"
                     f" | {_fmt_ratio(purchase)} | {'-' if fb is None else f'{fb / 2**20:.2f} / {(fmean or 0) / 2**20:.2f} MiB'}"
                     f" | {transfer}"
                     f" | {computed} |")
    return lines
"""Arms measured through pdtui's proxy (a process of its own); ``single`` is measured straight at
its engine."""
THROUGH_PROXY = "both through pdtui's proxy"


def _stat(summary: dict[str, Any] | None, which: str) -> float | None:
    """``ttft``: follow TTFT p50; ``itl50``/``itl99``: the steady streams' ITL under interference."""
    if not summary:
        return None
    if which == "ttft":
        return summary["follow"]["ttft_ms"]["p50"]
    return summary["interference"]["stream_itl_ms"]["p50" if which == "itl50" else "p99"]


def baseline_for(summaries: dict[str, dict[str, Any]], which: str) -> str | None:
    """The arm the pair is compared with for one statistic: ``single-proxied`` (the same path as
    the pair: through pdtui's proxy) when it measured it, else ``single`` (straight: the
    comparison crosses paths), else None."""
    for arm in ("single-proxied", "single"):
        if _stat(summaries.get(arm), which) is not None:
            return arm
    return None


def _path_note(base: str) -> str:
    return f"({THROUGH_PROXY})" if base in PROXIED else f"({CROSSES})"


CROSSES = "crosses paths: the pair through pdtui's proxy, single straight to its engine"
CROSSES_NOTE = ("the pair's numbers include the proxy's own cost and single's do not: the arm single-proxied (the"
                " same instance through the same proxy) compares like with like")


def proxy_cost(summaries: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """single-proxied minus single: the same instance, measured by the same client through pdtui's
    proxy and straight; the proxy's own cost. None unless both arms ran."""
    direct, proxied = summaries.get("single"), summaries.get("single-proxied")
    if not direct or not proxied:
        return None
    out: dict[str, Any] = {"compares": ["single-proxied", "single"]}
    for key, which in (("ttft_p50_ms", "ttft"), ("itl_p50_ms", "itl50"), ("itl_p99_ms", "itl99")):
        a, b = _stat(proxied, which), _stat(direct, which)
        out[key] = {"single-proxied": a, "single": b, "delta": None if a is None or b is None else a - b}
    hungry = starved(summaries)  # a starved arm's delta is its starvation, not the proxy's cost
    out["cannot_tell"] = [why for arm in COLOCATED for why in hungry.get(arm, {}).values()]
    for key, phase in (("ttft_p50_ms", "follow"), ("itl_p50_ms", "interference"), ("itl_p99_ms", "interference")):
        if any(phase in hungry.get(arm, {}) for arm in COLOCATED):
            out[key]["delta"] = None
    return out


def proxy_cost_text(cost: dict[str, Any]) -> str:
    def part(label: str, key: str) -> str:
        c = cost[key]
        if c["delta"] is None:
            return f"{label} -"
        delta = 0.0 if abs(c["delta"]) < 0.05 else c["delta"]  # no "-0.0"
        return f"{label} {delta:+.1f} ms ({c['single-proxied']:.1f} vs {c['single']:.1f})"

    why = cost.get("cannot_tell") or []
    return ("proxy's own cost (single-proxied - single: the same instance, measured by the same client through"
            f" pdtui's proxy and straight): {part('TTFT p50', 'ttft_p50_ms')}, {part('ITL p50', 'itl_p50_ms')},"
            f" {part('ITL p99', 'itl_p99_ms')}" + (f"; cannot tell where '-': {'; '.join(why)}" if why else ""))


BUNCHED_SHARE = 0.25
"""A quarter of an arm's stream gaps under BUNCH_MS: its chunk ITL measures the client's reads."""
TAIL_FACTOR = 10.0
"""An ITL max this many times the p99 (and STALL_MS beyond it): the stalls lie past the p99."""
STARVED_FACTOR = 5.0
"""One colocated arm's TTFT p50 this many times the other's on the same prompts: it was starved."""
COLOCATED = ("single", "single-proxied")
"""The same instance measured straight and through the proxy: on the same prompts their TTFTs
differ by the proxy's hop, not by multiples."""
PER_TOKEN_NOTE = ("per-token times are not derivable at the client: an event does not say how many tokens it"
                  " carries (token ids, logprobs or continuous usage would, and each changes the request), and a delivery"
                  " of several after a wait fits a smooth decode read late as well as a stall then a burst"
                  " (docs/bench.md, 'Per-token times')")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def itl_problems(summary: dict[str, Any] | None, arm: str, key: str = "stream_itl_ms") -> list[str]:
    """Why an arm's steady-stream ITL p99 (``key``: per chunk, or ``stream_delivery_gap_ms``) cannot
    carry a verdict: its chunks came in bunches (a p50 under BUNCH_MS, or BUNCHED_SHARE of its gaps
    under it), too few gaps for a p99 (P99_MIN_N), or a max TAIL_FACTOR times the p99 (the stalls
    lie beyond it). Empty: it can. Works on older bench files too (from the dist alone)."""
    if not summary:
        return []
    inter = summary["interference"]
    d = inter.get(key)
    if not d or not d.get("n"):
        return []
    n, p50, p99, mx = d["n"], d.get("p50"), d.get("p99"), d.get("max")
    out = []
    if key == "stream_itl_ms":
        b = inter.get("stream_bunching") or {}
        share = b.get("share")
        if (p50 is not None and p50 < BUNCH_MS) or (share is not None and share >= BUNCHED_SHARE):
            under = f", {share:.0%} of its event gaps under {BUNCH_MS:g} ms" if share is not None else ""
            out.append(f"{arm}'s chunks came in bunches (ITL p50 {_fmt(p50)} ms{under}): a gap is when the"
                       " client read, not when D decoded")
    what = "delivery gaps" if key == "stream_delivery_gap_ms" else "gaps"
    if n < P99_MIN_N:
        out.append(f"{arm} has {n} {what}, too few for a p99 (at least {P99_MIN_N})")
    if p99 is not None and mx is not None and mx > TAIL_FACTOR * p99 and mx - p99 > STALL_MS:
        out.append(f"{arm}'s max {mx:.1f} ms is {mx / p99:.0f}x its p99 {p99:.1f} ms" if p99 >= 1.0 else
                   f"{arm}'s max {mx:.1f} ms against a p99 of {p99:.1f} ms")
        out[-1] += ": its stalls lie beyond the p99, which does not see them"
    return out


def starved(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Colocated arms (COLOCATED: the same instance, straight and through the proxy) whose TTFT
    p50 on the same prompts is STARVED_FACTOR times the other's: arm -> phase ("follow": the follow
    TTFT, "interference": the big prompts' TTFT under the streams) -> why. Such an arm was starved
    (of CPU, or queued behind something), and none of its figures of that phase is a measure of it."""
    out: dict[str, dict[str, str]] = {}
    if not all(summaries.get(a) for a in COLOCATED):
        return out
    for phase, key, words in (("follow", "ttft_ms", "TTFT p50"),
                              ("interference", "big_ttft_ms", "big-prompt TTFT p50 under the streams")):
        a, b = (summaries[arm][phase][key]["p50"] for arm in COLOCATED)
        if not a or not b:
            continue
        for arm, x, other, y in ((COLOCATED[0], a, COLOCATED[1], b), (COLOCATED[1], b, COLOCATED[0], a)):
            if x > STARVED_FACTOR * y:
                out.setdefault(arm, {})[phase] = (f"{arm}'s {words} {x:.1f} ms is {x / y:.0f}x {other}'s {y:.1f} ms"
                                                  " on the same prompts: it was starved")
    return out


def _cannot(label: str, reasons: list[str], numbers: str) -> str:
    return f"{label}: cannot tell ({numbers}; no ratio): " + "; ".join(reasons)


def verdict(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Toll and purchase of the pair against a colocated single instance; None where an arm or a
    statistic is missing, or where the samples cannot carry it (``cannot_tell``: the reasons, and
    the text says "cannot tell" with them instead of a ratio): a starved colocated arm
    (``starved``), chunks in bunches, too few gaps, or stalls beyond the p99 (``itl_problems``).
    The pair is measured through pdtui's proxy, so each ratio compares it with ``single-proxied``
    (the same path) when that arm measured the statistic, else with ``single``, and says which
    (``compares``) and whether both sides took the same path (``same_path``). ``proxy_cost``:
    single-proxied vs single, when both ran. ``purchase_delivery``: the purchase on the gaps
    between deliveries (the ITL that survives bunching, ``window_deliveries``), with its own checks."""
    pair = summaries.get("pair")
    cost = proxy_cost(summaries)
    extra = [proxy_cost_text(cost)] if cost else []
    empty = {"toll": None, "purchase": None}
    if not pair and link_arms(summaries):  # --links: the toll and purchase per link, in the link table
        return {"toll": None, "purchase": None, "purchase_delivery": None, "compares": dict(empty),
                "same_path": dict(empty), "cannot_tell": {"toll": [], "purchase": []}, "proxy_cost": cost,
                "text": ["toll and purchase: per link, in the link table above", *extra]}
    if not pair or not ("single" in summaries or "single-proxied" in summaries):
        return {"toll": None, "purchase": None, "purchase_delivery": None, "compares": dict(empty),
                "same_path": dict(empty), "cannot_tell": {"toll": [], "purchase": []}, "proxy_cost": cost,
                "text": ["toll and purchase need the pair and the single (or single-proxied) arm", *extra]}
    hungry = starved(summaries)
    t_base, i_base = baseline_for(summaries, "ttft"), baseline_for(summaries, "itl99")
    p_ttft, p_itl = _stat(pair, "ttft"), _stat(pair, "itl99")
    s_ttft = _stat(summaries.get(t_base), "ttft") if t_base else None
    s_itl = _stat(summaries.get(i_base), "itl99") if i_base else None
    toll, purchase = _ratio(p_ttft, s_ttft), _ratio(s_itl, p_itl)
    why_toll = [hungry[t_base]["follow"]] if t_base and "follow" in hungry.get(t_base, {}) else []
    why_purchase: list[str] = []
    if i_base:
        why_purchase = itl_problems(summaries.get(i_base), i_base) + itl_problems(pair, "pair")
        if "interference" in hungry.get(i_base, {}):
            why_purchase.append(hungry[i_base]["interference"])
    text = []
    if toll is None or t_base is None:
        text.append("toll: not measured (no follow TTFT in the pair or in a single arm)")
    elif why_toll:
        text.append(_cannot("toll", why_toll, f"pair TTFT p50 {p_ttft:.1f} ms, {t_base} {s_ttft:.1f} ms"))
        toll = None
    else:
        text.append(f"toll: pair TTFT p50 {p_ttft:.1f} ms vs {t_base} {s_ttft:.1f} ms = {toll:.2f}x"
                    f" ({(toll - 1) * 100:+.0f}%)" + (": the pair is slower to the first token" if toll > 1
                                                     else ": the pair is not slower to the first token")
                    + f" {_path_note(t_base)}")
    if purchase is None or i_base is None:
        text.append("purchase: not measured (no steady-stream ITL in the pair or in a single arm)")
    elif why_purchase:
        text.append(_cannot("purchase", why_purchase, f"{i_base} ITL p99 {s_itl:.1f} ms, pair {p_itl:.1f} ms"))
        purchase = None
    else:
        text.append(f"purchase: {i_base} ITL p99 {s_itl:.1f} ms / pair ITL p99 {p_itl:.1f} ms = {purchase:.2f}x"
                    + (": the pair bought smoother decode" if purchase > 1
                       else f": the pair LOSES here, its decode stalls are no better than {i_base}'s")
                    + f" {_path_note(i_base)}")
    delivery, why_delivery = None, []
    if why_purchase and i_base:  # the ITL that survives bunching, checked on its own
        key = "stream_delivery_gap_ms"
        b99 = ((summaries[i_base]["interference"].get(key) or {}).get("p99"), (pair["interference"].get(key) or {}).get("p99"))
        why_delivery = itl_problems(summaries[i_base], i_base, key) + itl_problems(pair, "pair", key)
        if "interference" in hungry.get(i_base, {}):
            why_delivery.append(hungry[i_base]["interference"])
        if None not in b99:
            numbers = f"{i_base} delivery gap p99 {b99[0]:.1f} ms, pair {b99[1]:.1f} ms"
            if why_delivery:
                text.append(_cannot("purchase by delivery", why_delivery, numbers))
            else:
                delivery = _ratio(b99[0], b99[1])
                text.append(f"purchase by delivery (events read together count once; what the client waited,"
                            f" D's decode or not): {numbers} = {_fmt_ratio(delivery)}")
        text.append(PER_TOKEN_NOTE)
    if (toll is not None and t_base not in PROXIED) or (purchase is not None and i_base not in PROXIED):
        text.append(CROSSES_NOTE)
    text += extra
    two = summaries.get("two-single")
    if two:
        t_ttft, t_itl = _stat(two, "ttft"), _stat(two, "itl99")
        why_two = itl_problems(two, "two-single") + itl_problems(pair, "pair")
        itl_ratio = ("cannot tell (" + "; ".join(why_two) + ")") if why_two else _fmt_ratio(_ratio(t_itl, p_itl))
        text.append("two-single (two colocated instances, round-robin: the pair's hardware):"
                    f" TTFT p50 {_ms(t_ttft)} ms, ITL p99 {_ms(t_itl)} ms;"
                    f" pair TTFT / two-single = {_fmt_ratio(_ratio(p_ttft, t_ttft))},"
                    f" two-single ITL p99 / pair = {itl_ratio} ({THROUGH_PROXY})")
    return {"toll": toll, "purchase": purchase, "purchase_delivery": delivery,
            "compares": {"toll": ["pair", t_base] if toll is not None else None,
                         "purchase": [i_base, "pair"] if purchase is not None else None},
            "same_path": {"toll": t_base in PROXIED if toll is not None else None,
                          "purchase": i_base in PROXIED if purchase is not None else None},
            "cannot_tell": {"toll": why_toll, "purchase": why_purchase, "purchase_delivery": why_delivery},
            "starved": hungry, "proxy_cost": cost, "text": text}


def switch_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """The toll per pair arm (``pair`` and the switch arms, runners.SWITCH_ARMS), the follow TTFT
    split into steps that add up to it (those of the median request: "sum" is its TTFT),
    the second-token gap (where first_token_from_p moves the hop and D's leg) and the steady
    streams' ITL p99. Empty unless a switch arm ran."""
    arms = [a for a in summaries if a == "pair" or (a.startswith("pair-") and a not in ROUTING_ARMS)]
    if arms == ["pair"] or not arms:
        return []
    base = baseline_for(summaries, "ttft")
    s_ttft = _stat(summaries.get(base), "ttft") if base else None
    lines = ["", (f"toll per switch (follow TTFT p50 against {base or 'no single arm'}; the steps are the median"
                  " request's, and add up to its TTFT; ms):"), "",
             ("| arm | TTFT p50 | toll | P leg | hop | D leg | proxy | client | sum | 2nd-token gap p50 | seam p50"
              " | ITL p99 | served |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for arm in arms:
        f = summaries[arm]["follow"]
        ttft = f["ttft_ms"]["p50"]
        toll = _ratio(ttft, s_ttft)
        ts = f.get("toll_split_ms") or {}
        mid = f.get("median_split_ms") or {}
        parts = [mid.get(k) for k in SPLIT_KEYS]
        total = sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None
        served = ", ".join(f"{k} {n}" for k, n in (f.get("switches") or {}).items())
        lines.append(f"| {arm} | {_ms(ttft)} | {'-' if toll is None else f'{(toll - 1) * 100:+.0f}%'} | "
                     + " | ".join(_ms(p) for p in parts) + f" | {_ms(total)} | {_ms(f['second_gap_ms']['p50'])}"
                     f" | {_ms((ts.get('seam_ms') or {}).get('p50'))}"
                     f" | {_ms(_stat(summaries[arm], 'itl99'))} | {served} |")
    engine = [(a, summaries[a]["follow"]["engine_split_ms"]) for a in arms if "engine_split_ms" in summaries[a]["follow"]]
    if engine:
        lines += ["", ("inside the legs, by the engines' own spans (p50, ms; queue and prefill/first step measured,"
                       " the rest inferred: pdtui.core.otlp):"), "",
                  "| arm | P outside | P other | P queue | P prefill | D outside | D other | D queue | D first step |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for arm, es in engine:
            lines.append(f"| {arm} | " + " | ".join(_ms(es[k]["p50"]) for k in ENGINE_KEYS) + " |")
    return lines


# ----- the link: the pair re-priced per emulated link (`pdtui bench --links`, docs/link.md) ------------

LINK_PREFIX = "pair~"
WHAT_IF_BYTES = 256 * 2**20
"""The lab's 8B prompt: Llama-3.1-8B's KV (32 layers x 8 KV heads x 128 head_dim x 2 (K,V) x 2 B =
128 KiB per token) x 2,048 tokens = 256 MiB."""
WHAT_IF_WORDS = "Llama-3.1-8B, 128 KiB per token x 2,048 tokens = 256 MiB"


def link_arms(summaries: dict[str, Any]) -> list[str]:
    return [a for a in summaries if a.startswith(LINK_PREFIX)]


def link_rows(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per pair~LINK arm, fastest link first (loopback first of all): the follow prompt's
    KV read as NIXL measured it (p50) against the formula (bytes / rate + RTT), the achieved Gbit/s,
    the follow TTFT p50 and its toll against the single arm (single-proxied when it ran), the steady
    streams' ITL p99 and the purchase, whether the pair pays (purchase >= toll: it buys at least the
    factor on decode that it pays on the first token), and the what-if for the 8B shape at the rate
    (computed from the formula, not measured)."""
    from pdtui.core.link import LinkSpec, LinkSpecError

    t_base, i_base = baseline_for(summaries, "ttft"), baseline_for(summaries, "itl99")
    s_ttft = _stat(summaries.get(t_base), "ttft") if t_base else None
    s_itl = _stat(summaries.get(i_base), "itl99") if i_base else None
    rows: list[dict[str, Any]] = []
    for arm in link_arms(summaries):
        try:
            spec = LinkSpec.parse(arm[len(LINK_PREFIX):])
        except LinkSpecError:
            continue
        sm = summaries[arm]
        k = sm["follow"].get("kv_read") or {}
        read_ms = (k.get("ms") or {}).get("p50")
        nbytes = (k.get("bytes") or {}).get("p50")
        formula = spec.transfer_s(int(nbytes)) * 1e3 if nbytes and spec.emulated else None  # type: ignore[operator]
        ttft, itl = _stat(sm, "ttft"), _stat(sm, "itl99")
        toll, purchase = _ratio(ttft, s_ttft), _ratio(s_itl, itl)
        why = itl_problems(summaries.get(i_base), i_base) + itl_problems(sm, arm) if i_base else []
        by = "token"
        if why and i_base:  # as the verdict does: the purchase on the gaps between deliveries, checked
            key = "stream_delivery_gap_ms"
            b = summaries[i_base]["interference"].get(key) or {}
            d = sm["interference"].get(key) or {}
            why_d = itl_problems(summaries[i_base], i_base, key) + itl_problems(sm, arm, key)
            purchase, by = (None, "token") if why_d else (_ratio(b.get("p99"), d.get("p99")), "delivery")
            why = why_d
        elif why:
            purchase = None
        rows.append({
            "arm": arm, "link": spec.text, "describe": spec.describe(), "rate_bps": spec.rate_bps,
            "rtt_s": spec.rtt_s, "read_ms": read_ms, "bytes": nbytes, "formula_ms": formula,
            "read_vs_formula": _ratio(read_ms, formula),
            "gbit_s": nbytes * 8 / (read_ms / 1e3) / 1e9 if nbytes and read_ms else None,
            "ttft_ms": ttft, "toll": toll, "itl_p99_ms": itl, "purchase": purchase, "purchase_by": by,
            "purchase_cannot_tell": why,
            "pays": None if toll is None or purchase is None else purchase >= toll,
            "what_if_8b_ms": spec.transfer_s(WHAT_IF_BYTES) * 1e3 if spec.emulated else None,  # type: ignore[operator]
            "compares": {"toll": t_base, "purchase": i_base}})
    rows.sort(key=lambda r: -(r["rate_bps"] or math.inf))
    return rows


def break_even(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the pair stops paying, in words: measured (the slowest link where it still pays, and the
    next slower where it does not), and computed from the formula: the rate at which the follow
    prompt's transfer, bytes / rate, would raise the pair's TTFT to purchase x single's (the TTFT
    the purchase still covers), from the fastest emulated link's figures (its TTFT less its measured
    read: the pair's TTFT with no transfer)."""
    emulated = [r for r in rows if r["rate_bps"]]
    judged = [r for r in emulated if r["pays"] is not None]
    out: dict[str, Any] = {"measured": None, "computed_gbit_s": None, "text": []}
    if not judged:
        out["text"].append("break-even: not measured (no link arm with both a toll and a purchase)")
        return out
    paying = [r for r in judged if r["pays"]]
    losing = [r for r in judged if not r["pays"]]
    if not paying:
        out["measured"] = {"pays_at": None, "stops_at": judged[0]["rate_bps"]}
        out["text"].append(f"break-even: for this workload the pair does not pay at any rate measured (from"
                           f" {judged[0]['describe']} down: its purchase is below its toll)")
    else:
        low = min(paying, key=lambda r: r["rate_bps"])
        below = [r for r in losing if r["rate_bps"] < low["rate_bps"]]
        nxt = max(below, key=lambda r: r["rate_bps"]) if below else None
        out["measured"] = {"pays_at": low["rate_bps"], "stops_at": nxt["rate_bps"] if nxt else None}
        if nxt is None:
            out["text"].append(f"break-even: for this workload the pair pays at every rate measured, down to"
                               f" {low['describe']} (purchase {low['purchase']:.2f}x >= toll {low['toll']:.2f}x)")
        else:
            out["text"].append(f"break-even: for this workload the pair stops paying below {low['describe']}"
                               f" (there: purchase {low['purchase']:.2f}x >= toll {low['toll']:.2f}x; at"
                               f" {nxt['describe']}: purchase {nxt['purchase']:.2f}x < toll {nxt['toll']:.2f}x)")
    top = max(emulated, key=lambda r: r["rate_bps"])
    need: list[float] = [v for k in ("ttft_ms", "read_ms", "bytes", "purchase", "toll") if (v := top.get(k)) is not None]
    if len(need) == 5:
        ttft, read_ms, nbytes, purchase, toll = need
        single = ttft / toll
        room = purchase * single - (ttft - read_ms)  # ms of transfer the purchase still covers
        if room <= 0:
            out["text"].append(f"computed: the pair would not pay at any rate (with no transfer at all its TTFT"
                               f" {ttft - read_ms:.1f} ms already exceeds purchase x single = {purchase * single:.1f} ms)")
        else:
            gbit = nbytes * 8 / (room / 1e3) / 1e9
            out["computed_gbit_s"] = gbit
            out["text"].append(f"computed (the formula, not measured): the {nbytes / 2**20:.2f} MiB follow prompt's"
                               f" transfer fits the {room:.1f} ms the purchase covers above {gbit:.3g} Gbit/s"
                               f" (from {top['describe']}: TTFT {ttft:.1f} ms less its read {read_ms:.2f} ms,"
                               f" purchase {purchase:.2f}x of single's {single:.1f} ms)")
    return out


def link_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """The pair re-priced per link (`pdtui bench --links`): empty unless a pair~LINK arm ran."""
    rows = link_rows(summaries)
    if not rows:
        return []
    base = rows[0]["compares"]
    lines = ["", (f"the pair per link (follow prompt alone: KV read p50 measured by NIXL on D against the formula"
                  f" bytes / rate + RTT; toll against {base['toll'] or 'no single arm'}, purchase against"
                  f" {base['purchase'] or 'no single arm'}; the 8B column is computed, not measured: {WHAT_IF_WORDS}):"),
             "",
             ("| link | KV read ms | formula ms | read/formula | Gbit/s | TTFT p50 ms | toll | ITL p99 ms | purchase"
              " | pays | 8B transfer ms (computed) |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        pays = "-" if r["pays"] is None else ("yes" if r["pays"] else "NO")
        purchase = "cannot tell" if r["purchase_cannot_tell"] else _fmt_ratio(r["purchase"]) + (
            " (deliveries)" if r["purchase_by"] == "delivery" else "")
        lines.append(f"| {r['describe'] if r['rate_bps'] else 'loopback'} | {_ms3(r['read_ms'])}"
                     f" | {_ms3(r['formula_ms'])} | {_fmt_ratio(r['read_vs_formula'])}"
                     f" | {'-' if r['gbit_s'] is None else format(r['gbit_s'], '.3g')} | {_ms(r['ttft_ms'])}"
                     f" | {_fmt_ratio(r['toll'])} | {_ms(r['itl_p99_ms'])} | {purchase} | {pays}"
                     f" | {_ms(r['what_if_8b_ms'])} |")
    why = sorted({w for r in rows for w in r["purchase_cannot_tell"]})
    notes = [f"purchase cannot tell: {'; '.join(why)}"] if why else []
    if any(r["purchase_by"] == "delivery" for r in rows):
        notes.append("purchase (deliveries): per token the ITL could not carry a p99 (chunks in bunches), so the"
                     " gaps between deliveries are compared instead, as the verdict does (docs/bench.md)")
    return [*lines, "", *break_even(rows)["text"], *notes]


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown: per arm TTFT p50/p99 (follow: one big prompt alone) and ITL p50/p99 (steady
    streams under interference), then the detail rows and the verdict."""
    lines = [
        "| arm | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm, s in summaries.items():
        t, i = s["follow"]["ttft_ms"], s["interference"]["stream_itl_ms"]
        lines.append(f"| {arm} | {_ms(t['p50'])} | {_ms(t['p99'])} | {_ms(i['p50'])} | {_ms(i['p99'])} |")
    lines += [
        "",
        "| arm | follow n | follow ITL p50 | big n | big TTFT p50 | big TTFT p99 | stream gaps n | ITL p90 | ITL max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, s in summaries.items():
        f, i = s["follow"], s["interference"]
        lines.append(
            f"| {arm} | {f['ok']} | {_ms(f['itl_ms']['p50'])} | {i['big_ok']} | {_ms(i['big_ttft_ms']['p50'])}"
            f" | {_ms(i['big_ttft_ms']['p99'])} | {i['stream_itl_ms']['n']} | {_ms(i['stream_itl_ms']['p90'])}"
            f" | {_ms(i['stream_itl_ms']['max'])} |"
        )
    if any("stream_delivery_gap_ms" in s["interference"] for s in summaries.values()):
        lines += [
            "",
            (f"the steady streams, read as deliveries (events read less than {BUNCH_MS:g} ms apart count once:"
             " the ITL that survives bunching; per-token times are not derivable, docs/bench.md):"),
            "",
            (f"| arm | event gaps under {BUNCH_MS:g} ms | delivery gaps n | p50 ms | p99 ms | max ms"
             " | tokens per event |"),
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for arm, s in summaries.items():
            i = s["interference"]
            b, dg, te = i.get("stream_bunching") or {}, i.get("stream_delivery_gap_ms") or dist([]), \
                i.get("tokens_per_event") or {}
            share = "-" if b.get("share") is None else f"{b['bunched']} of {b['gaps']} ({b['share']:.0%})"
            tpe = "-" if te.get("mean") is None else \
                f"{te['mean']:.2f} ({te['streams']} stream{'' if te['streams'] == 1 else 's'} that ran to the end)"
            lines.append(f"| {arm} | {share} | {dg['n']} | {_ms(dg['p50'])} | {_ms(dg['p99'])} | {_ms(dg['max'])}"
                         f" | {tpe} |")
    pair = summaries.get("pair")
    if pair and "toll_split_ms" in pair["follow"]:
        ts = pair["follow"]["toll_split_ms"]
        lines += ["", (f"pair toll split (follow, p50): P prefill {_ms(ts['prefill_ms']['p50'])} ms"
                       f" + proxy hop {_ms(ts['hop_ms']['p50'])} ms"
                       f" + transfer & D first step {_ms(ts['decode_ttft_ms']['p50'])} ms")]
    reads = kv_read_lines(summaries)
    if reads:
        lines += ["", *reads]
    elif pair:
        lines += ["", ("pair KV read: not measured per request (D logged no reads: its connector was not"
                       " loaded through pdtui's tuned module, docs/freight.md)")]
    lines += switch_table(summaries)
    lines += transport_table(summaries)
    lines += routing_table(summaries)
    lines += link_table(summaries)
    lines += [""] + verdict(summaries)["text"]
    checks = {a: s["cross_check"] for a, s in summaries.items() if s.get("cross_check")}
    if checks:
        lines += [""] + cross_check_table(summaries)
    return "\n".join(lines)


# ----- the cross-check: `vllm bench serve` against the same arm ---------------------------------------
# Each row compares one statistic, computed the same way on both sides (vllm bench serve's
# definition: a token chunk is any SSE chunk with choices, empty text or not), and is marked
# agree when |ours - theirs| <= max(rel x theirs, abs ms). docs/bench.md explains the choice.

TOLERANCES: dict[str, tuple[float, float]] = {
    "TTFT p50": (0.15, 25.0),
    "TTFT p99": (0.25, 50.0),
    "ITL p50": (0.15, 1.0),
    "ITL p99": (0.25, 2.0),
}
P99_MIN_N = 100
"""A p99 of fewer samples is (nearly) the largest one or two: too few to check against another run."""
STALL_MS = 50.0
"""A gap over this long is a stall (footnotes count them on both sides)."""


def tolerance_text(metric: str) -> str:
    rel, abs_ms = TOLERANCES[metric]
    return f"max({rel * 100:.0f}%, {abs_ms:g} ms)"


def agree(metric: str, ours: float | None, theirs: float | None, n_ours: int, n_theirs: int) -> str:
    """agree | disagree | n/a (a side has no value, or a p99 of fewer than P99_MIN_N samples)."""
    if ours is None or theirs is None:
        return "n/a"
    if metric.endswith("p99") and min(n_ours, n_theirs) < P99_MIN_N:
        return f"n/a (n<{P99_MIN_N})"
    rel, abs_ms = TOLERANCES[metric]
    return "agree" if abs(ours - theirs) <= max(rel * abs(theirs), abs_ms) else "disagree"


def vllm_bench_follow(data: dict[str, Any]) -> dict[str, Any]:
    """TTFT and ITL of a `vllm bench serve --save-detailed` result (seconds -> ms), every request."""
    ok = [k for k, e in enumerate(data.get("errors") or []) if not e] or list(range(len(data.get("ttfts") or [])))
    ttfts = [data["ttfts"][k] * 1000.0 for k in ok]
    gaps = [g * 1000.0 for k in ok for g in data["itls"][k]]
    return {"completed": data.get("completed"), "failed": data.get("failed"), "ttft_ms": dist(ttfts),
            "itl_ms": dist(gaps), "ttfts_ms": [round(x, 1) for x in ttfts], "stalls": _stalls(gaps),
            "published": {k: data.get(k) for k in ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")}}


def vllm_bench_interference(streams: dict[str, Any], bigs: dict[str, Any], duration_s: float,
                            n_streams: int) -> dict[str, Any]:
    """The streams' run and the big prompts' run of `vllm bench serve` (detailed results), with
    pdtui's window rule: it opens when the first big prompt is sent and closes ``duration_s`` later
    or when the last big prompt is done, whichever is later; a stream's gaps count when wholly
    inside. Both runs time with perf_counter = CLOCK_MONOTONIC, one clock for both processes.
    ``streams_warm_s``: from the moment every one of the first ``n_streams`` streams had its first
    token to the first big prompt (ours waits --warmup-s)."""
    ok = [k for k, e in enumerate(bigs.get("errors") or []) if not e]
    if not ok:
        return {"error": "no big prompt completed", "completed": bigs.get("completed")}
    t0 = min(bigs["start_times"])
    t1 = max(t0 + duration_s, max(bigs["start_times"][k] + bigs["latencies"][k] for k in ok))
    gaps: list[float] = []
    end = t0
    firsts = [st + tt for st, tt in zip(streams["start_times"][:n_streams], streams["ttfts"][:n_streams],
                                        strict=True) if tt]
    for start, ttft, itl in zip(streams["start_times"], streams["ttfts"], streams["itls"], strict=True):
        if not ttft:
            continue
        times = [start + ttft]
        for g in itl:
            times.append(times[-1] + g)
        end = max(end, times[-1])
        gaps += window_gaps(times, [t0, t1])
    return {"completed": (streams.get("completed"), bigs.get("completed")),
            "failed": (streams.get("failed"), bigs.get("failed")), "window_s": t1 - t0,
            "window_covered": max(0.0, min(1.0, (end - t0) / (t1 - t0))), "big_ok": len(ok),
            "streams_warm_s": t0 - max(firsts) if len(firsts) == n_streams else None,
            "big_ttft_ms": dist([bigs["ttfts"][k] * 1000.0 for k in ok]), "stream_itl_ms": dist(gaps),
            "big_ttfts_ms": [round(bigs["ttfts"][k] * 1000.0, 1) for k in ok],
            "stalls": _stalls(gaps)}


BURST_MS = 0.5
"""A gap under this is a chunk that arrived back to back with the one before (queued behind a stall)."""


def _stalls(gaps: Sequence[float]) -> dict[str, Any]:
    """The gaps' tail and bursts: how many over STALL_MS (the largest five), share under BURST_MS."""
    big = sorted((g for g in gaps if g > STALL_MS), reverse=True)
    burst = sum(g < BURST_MS for g in gaps) / len(gaps) if gaps else None
    return {"over_ms": STALL_MS, "n": len(big), "largest_ms": [round(g, 1) for g in big[:5]],
            "burst_under_ms": BURST_MS, "burst_share": burst}


def cross_check_rows(summary: dict[str, Any], check: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per compared statistic of one arm: workload, metric, ours, theirs, n, verdict."""
    rows: list[dict[str, Any]] = []

    def add(wl: str, label: str, metric: str, ours: dict[str, Any], theirs: dict[str, Any],
            ours_text: dict[str, Any]) -> None:
        p = metric.split()[-1]
        rows.append({"workload": wl, "metric": label + metric, "ours": ours[p], "theirs": theirs[p],
                     "ours_text_chunks": ours_text[p], "n_ours": ours["n"], "n_theirs": theirs["n"],
                     "tolerance": tolerance_text(metric),
                     "verdict": agree(metric, ours[p], theirs[p], ours["n"], theirs["n"])})

    f, c = summary["follow"], (check.get("follow") or {}).get("theirs")
    if c and f["ok"]:
        for m in ("TTFT p50", "TTFT p99"):
            add("follow", "", m, f["ttft_ms_every_chunk"], c["ttft_ms"], f["ttft_ms"])
        for m in ("ITL p50", "ITL p99"):
            add("follow", "", m, f["itl_ms_every_chunk"], c["itl_ms"], f["itl_ms"])
    i, c = summary["interference"], (check.get("interference") or {}).get("theirs")
    if c and not c.get("error") and i["big_ok"]:
        for m in ("TTFT p50", "TTFT p99"):
            add("interference", "big ", m, i["big_ttft_ms_every_chunk"], c["big_ttft_ms"], i["big_ttft_ms"])
        for m in ("ITL p50", "ITL p99"):
            add("interference", "stream ", m, i["stream_itl_ms_every_chunk"], c["stream_itl_ms"], i["stream_itl_ms"])
    return rows


def cross_check_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """The cross-check rows of every arm, then a footnote under each row that disagrees."""
    lines = [("cross-check: `vllm bench serve` against the same arm (docs/bench.md); ours and theirs both count"
              " every chunk with choices (vllm bench serve's definition), ours by text chunks in ()"),
             "", "| arm | workload | metric | ours ms | vllm bench serve ms | n ours / theirs | tolerance | verdict |",
             "|---|---|---|---:|---:|---:|---|---|"]
    notes: list[str] = []
    for arm, s in summaries.items():
        check = s.get("cross_check")
        if not check:
            continue
        for wl in ("follow", "interference"):
            c = check.get(wl)
            if c and (c.get("error") or (c.get("theirs") or {}).get("error")):
                why = c.get("error") or c["theirs"]["error"]
                rc = c.get("returncode", (c.get("streams") or {}).get("returncode"))
                lines.append(f"| {arm} | {wl} | - | | failed (rc {rc}) | | | n/a |")
                notes.append(f"{arm} {wl}: vllm bench serve failed: {why.strip().splitlines()[-1] if why.strip() else '?'}")
        for r in cross_check_rows(s, check):
            mark = r["verdict"]
            if mark == "disagree":
                n = sum(x.startswith("[") for x in notes) + 1
                notes.append(f"[{n}] {arm} {r['workload']} {r['metric']}: " + _disagreement_note(r, s, check))
                mark = f"DISAGREE [{n}]"
            lines.append(f"| {arm} | {r['workload']} | {r['metric']} | {_ms(r['ours'])} ({_ms(r['ours_text_chunks'])})"
                         f" | {_ms(r['theirs'])} | {r['n_ours']} / {r['n_theirs']} | {r['tolerance']} | {mark} |")
        theirs = (check.get("interference") or {}).get("theirs") or {}
        cov, warm = theirs.get("window_covered"), theirs.get("streams_warm_s")
        if cov is not None and cov < 0.999:
            notes.append(f"{arm} interference: vllm bench serve's streams ended before its window did"
                         f" (covered {cov * 100:.0f}%): their request count is planned from our streams' rate")
        if "window_covered" in theirs and (warm is None or warm < 0):
            notes.append(f"{arm} interference: vllm bench serve's streams were not all running when its first big"
                         " prompt came (the streams' run took longer to start than planned)")
    return lines + ([""] + notes if notes else [])


def _disagreement_note(r: dict[str, Any], summary: dict[str, Any], check: dict[str, Any]) -> str:
    """The data behind a disagreement, for the footnote; the reading is in docs/bench.md."""
    wl = r["workload"]
    theirs = (check.get(wl) or {}).get("theirs") or {}
    if "ITL" in r["metric"]:
        o = summary["follow" if wl == "follow" else "interference"].get("stalls") or {}
        t = theirs.get("stalls") or {}

        def side(x: dict[str, Any], n: int) -> str:
            share = x.get("burst_share")
            return (f"{x.get('n', '?')} of {n} gaps over {STALL_MS:g} ms {x.get('largest_ms', [])},"
                    f" {'?' if share is None else f'{share * 100:.0f}%'} under {BURST_MS:g} ms")

        return (f"ours {side(o, r['n_ours'])}; theirs {side(t, r['n_theirs'])}. Stalls after the engine and"
                " the chunks queued behind them, in two runs minutes apart (docs/bench.md, 'Reading a"
                " disagreement')")
    if wl == "follow":
        ours, their = summary["follow"].get("ttfts_ms") or [], theirs.get("ttfts_ms", [])
    else:
        ours, their = summary["interference"].get("big_ttfts_ms") or [], theirs.get("big_ttfts_ms", [])
    return (f"per request, ours {ours} ms, theirs {their} ms: {len(ours)} and {len(their)} requests, two runs"
            " minutes apart (docs/bench.md, 'Reading a disagreement')")


def bytes_check(traces: Sequence[dict[str, Any]], metric_before: float | None, metric_after: float | None,
                bytes_per_token: int | None, block_size: int,
                blocks_of: Callable[[int], int] | None = None) -> dict[str, Any]:
    """Sum of the traces' kv_bytes against the connector's own count (D's vllm:nixl_bytes_transferred
    delta for pull: runners.freight_count), and every trace against the formula blocks x block_size x
    bytes/token with blocks = ceil(prompt_tokens / block_size) (``blocks_of``: a connector's own rule,
    storage's whole blocks less the last token, kvmath.stored_blocks)."""
    # a request the client hung up on mid-stream ends as "error" but D pulled its KV all the same;
    # a fallback pulled nothing
    pair = [t for t in traces if t.get("kv_bytes") is not None and t.get("outcome") != "fallback"]
    total = sum(t.get("kv_bytes") or 0 for t in pair)
    # A request the client hung up on after P answered but before D's first token may or may not
    # have been pulled (D aborts it at some point of its pull): those bytes are uncertain.
    uncertain = sum(t.get("kv_bytes") or 0 for t in pair
                    if t.get("status") == 499 and t.get("decode_ttft_ms") is None)
    delta = None if metric_before is None or metric_after is None else metric_after - metric_before
    formula_ok = None
    if bytes_per_token:
        blocks = blocks_of or (lambda n: math.ceil(n / block_size))
        formula_ok = all(
            t.get("kv_bytes") == blocks(t.get("prompt_tokens") or 0) * block_size * bytes_per_token
            for t in pair
        )
    return {"requests": len(pair), "trace_kv_bytes": total, "uncertain_kv_bytes": uncertain,
            "d_metric_delta": delta,
            "match": delta is not None and total - uncertain <= int(delta) <= total, "formula_ok": formula_ok,
            "bytes_per_token": bytes_per_token, "block_size": block_size}


def to_json(result: Any) -> dict[str, Any]:
    """The whole run (runners.BenchResult) as plain JSON: every raw sample, environment, summaries."""
    arms = {}
    summaries = {}
    for name, arm in result.arms.items():
        summaries[name] = summarize_arm(arm.samples, arm.windows)
        if (proxied(name) or name.startswith(LINK_PREFIX)) and name not in ("single-proxied", "two-single"):
            summaries[name]["routing"] = routing_summary(arm.samples, getattr(arm, "preemptions", None))
        if getattr(arm, "connector", None):
            summaries[name]["connector"] = arm.connector
        d = {k: v for k, v in dataclasses.asdict(arm).items() if k != "samples"}
        d["samples"] = [{**dataclasses.asdict(s), "chunks": s.chunks} for s in arm.samples]
        if arm.cross_check:
            summaries[name]["cross_check"] = arm.cross_check
        d["summary"] = summaries[name]
        arms[name] = d
    return {
        "schema": SCHEMA,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "interrupted": result.interrupted,
        "error": result.error,
        "command": result.command,
        "flags": result.flags,
        "environment": result.environment,
        "config": result.config,
        "arms": arms,
        "verdict": verdict(summaries),
        "placement": placement(arms),
        **({"links": {"rows": rows, "break_even": break_even(rows)}} if (rows := link_rows(summaries)) else {}),
    }


def placement(arms: dict[str, Any]) -> str | None:
    """Where each arm's engines run: on a CPU machine the cores of the launched ones' model threads,
    from the arms' launch environments (None on GPUs): the comparison is one core per vLLM
    instance in every arm (docs/bench.md); engines attached by URL (``attached`` members): their
    URLs and the vLLM they report, started and stopped by someone else, caches kept across arms."""
    parts, attached = [], []
    for name, arm in arms.items():
        launch = arm.get("launch") or []
        cores = [f"{x['name']} on {x['env']['VLLM_CPU_OMP_THREADS_BIND']}" for x in launch
                 if x.get("env", {}).get("VLLM_CPU_OMP_THREADS_BIND")]
        if cores:
            parts.append(f"{name}: {', '.join(cores)}")
        given = [f"{x['name']} {x['url']}" for x in launch if x.get("attached")]
        if given:
            attached.append(f"{name}: {', '.join(given)}")
    out = []
    if parts:
        out.append("cores of the model threads (VLLM_CPU_OMP_THREADS_BIND; P's and D's kept there by nixl_quiet): "
                   + "; ".join(parts) + ". API servers, engine cores, the proxy process and the load client may run"
                   " on any core. One core per vLLM instance in every arm: the single instance (straight or behind"
                   " the proxy) computes on one core like each member of the pair; two-single has the pair's"
                   " hardware (docs/bench.md, 'Cores').")
    if attached:
        versions = sorted({str(x.get("vllm") or "vLLM version not reported") for arm in arms.values()
                           for x in arm.get("launch") or [] if x.get("attached")})
        out.append("engines attached by URL (" + "; ".join(attached) + f"; {', '.join(versions)}): pdtui did not"
                   " start them, place them or stop them. Nothing was restarted between arms: the engines kept"
                   " their prefix caches across arms, so each arm's prompts carry its name and this run's nonce"
                   " (prompt_salt) and none was cached before.")
    return "\n".join(out) or None


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write ``data`` to ``path``, gzip-compressed if the name ends in .gz (what the bench writes:
    bench.json.gz; on a GPU the raw samples are 16+ MiB of JSON), atomically (a temp file, then
    a rename). Floats are rounded to 6 decimals (1 ns for the ms fields, 1 us for the seconds ones),
    below what a perf_counter gap means, and it shortens 1.2407799999891722 to 1.24078: on the H100
    run that took the gzip from 10.8 to 5.1 MB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(_rounded(data), separators=(",", ":"), default=str).encode()
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".gz":
        with gzip.open(tmp, "wb", compresslevel=6) as f:
            f.write(raw)
    else:
        tmp.write_bytes(raw)
    tmp.replace(path)
    return path


def read_json(path: Path) -> dict[str, Any]:
    """Read a bench.json.gz or a plain bench.json (gzip is recognised by its magic bytes)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return json.loads(raw)


def _arm_itl(data: dict[str, Any], arm: str) -> list[float]:
    a = data["arms"][arm]
    samples = [Sample(**{k: v for k, v in s.items() if k != "chunks"}) for s in a["samples"]]
    return window_itl(samples, a["windows"].get("interference"))


def plots(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG files (matplotlib, Agg): ITL histograms of every arm on one axis, TTFT distributions,
    the pair's per-request toll as stacked bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    arms = list(data["arms"])

    fig, ax = plt.subplots(figsize=(8, 4.5))
    all_itl = {a: _arm_itl(data, a) for a in arms}
    top = max((percentile(v, 99.9) or 0 for v in all_itl.values()), default=0) or 1
    for a, v in all_itl.items():
        if v:
            ax.hist(v, bins=60, range=(0, top), alpha=0.5, label=f"{a} (n={len(v)}, p99 {percentile(v, 99):.1f} ms)")
    ax.set_xlabel("inter-token latency of the steady streams (ms)")
    ax.set_ylabel("gaps")
    ax.set_yscale("log")
    ax.set_title("ITL under interference")
    _legend(ax)
    written.append(_save(fig, out_dir / "itl_hist.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    groups, labels = [], []
    for a in arms:
        for wl, title in (("follow", "alone"), ("big", "under load")):
            v = [s["ttft_ms"] for s in data["arms"][a]["samples"]
                 if s["workload"] == wl and not s["warmup"] and s["ttft_ms"] is not None]
            if v:
                groups.append(v)
                labels.append(f"{a}\n{title}")
    if groups:
        ax.boxplot(groups, showfliers=True)
        ax.set_xticks(range(1, len(labels) + 1), labels)
        for i, v in enumerate(groups, start=1):
            ax.scatter([i] * len(v), v, s=10, alpha=0.6)
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("time to first token: big prompts")
    written.append(_save(fig, out_dir / "ttft.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    pair = [s for s in data["arms"].get("pair", {}).get("samples", [])
            if s["workload"] == "follow" and not s["warmup"] and s.get("trace")]
    singles = {a: [s for s in data["arms"].get(a, {}).get("samples", [])
                   if s["workload"] == "follow" and not s["warmup"] and s["ttft_ms"] is not None]
               for a in ("single", "single-proxied")}
    x = list(range(len(pair)))
    bottom = [0.0] * len(pair)
    parts = (("prefill_ms", "P prefill"), ("hop_ms", "proxy hop"), ("decode_ttft_ms", "transfer + D first step"))
    for key, label in parts:
        vals = [s["trace"].get(key) or 0.0 for s in pair]
        ax.bar(x, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    if pair:
        ax.scatter(x, [s["ttft_ms"] for s in pair], color="black", marker="_", s=200, label="pair TTFT (client)")
    for (a, single), (color, marker) in zip(singles.items(), (("red", "x"), ("blue", "+")), strict=True):
        if single:
            ax.scatter(list(range(len(single))), [s["ttft_ms"] for s in single], color=color, marker=marker,
                       label=f"{a} TTFT (client)")
    ax.set_xlabel("follow request")
    ax.set_ylabel("ms")
    ax.set_title("the toll, per request")
    _legend(ax)
    written.append(_save(fig, out_dir / "toll.png"))
    links = (data.get("links") or {}).get("rows") or []
    if any(r["rate_bps"] for r in links):
        written.append(link_plot(links, out_dir, plt))
    transports = [a for a in arms if a.startswith("pair@")]
    if transports:  # the connectors side by side (transport_table): TTFT alone, and the KV's own transfer time
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
        ttft = [_stat(data["arms"][a]["summary"], "ttft") or 0.0 for a in transports]
        left.bar(range(len(transports)), ttft, color="tab:blue")
        for base in ("single-proxied", "single"):
            if (b := _stat(data["arms"].get(base, {}).get("summary"), "ttft")) is not None:
                left.axhline(b, color="red", linestyle="--", label=f"{base} {b:.0f} ms")
                break
        left.set_xticks(range(len(transports)), [a.partition("@")[2] for a in transports])
        left.set_ylabel("follow TTFT p50 (ms)")
        left.set_title("the toll per transport")
        _legend(left)
        xfer = [((data["arms"][a]["summary"].get("kv_read") or {}).get("ms") or {}).get("p50") for a in transports]
        right.bar(range(len(transports)), [x or 0.0 for x in xfer], color="tab:green")
        for k, ms in enumerate(xfer):
            if ms is None:
                right.text(k, 0, "no per-request\nfigure", ha="center", va="bottom", fontsize=8)
        right.set_xticks(range(len(transports)), [a.partition("@")[2] for a in transports])
        right.set_ylabel("KV transfer p50 (ms, the connector's own measure)")
        right.set_title("the transfer per request")
        written.append(_save(fig, out_dir / "transports.png"))
    return written


def link_plot(rows: list[dict[str, Any]], out_dir: Path, plt: Any) -> Path:
    """links.png: per link rate, the follow prompt's KV read (measured) and the formula's, the pair's
    TTFT p50, and the 8B shape's transfer (computed, dashed); loopback as a horizontal line."""
    rated = sorted((r for r in rows if r["rate_bps"]), key=lambda r: r["rate_bps"])
    x = [r["rate_bps"] / 1e9 for r in rated]
    fig, ax = plt.subplots(figsize=(8, 4.5))

    def line(key: str, label: str, **kw: Any) -> None:
        pts = [(xi, r[key]) for xi, r in zip(x, rated, strict=True) if r[key] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, **kw)

    line("read_ms", "KV read, measured (p50)")
    line("formula_ms", "formula: bytes / rate + RTT", linestyle=":")
    line("ttft_ms", "pair TTFT p50 (measured)")
    line("what_if_8b_ms", "8B shape's 256 MiB transfer (computed)", linestyle="--")
    for r in rows:
        if not r["rate_bps"] and r["ttft_ms"] is not None:
            ax.axhline(r["ttft_ms"], color="grey", linewidth=0.8, label="pair TTFT p50 on loopback")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate (Gbit/s)")
    ax.set_ylabel("ms")
    ax.set_title("the pair per link")
    _legend(ax)
    return _save(fig, out_dir / "links.png")


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def terminal_histograms(data: dict[str, Any], width: int = 80, height: int = 12, color: bool = False) -> str:
    """The ITL histograms of the steady streams, one per arm on the same x range, as text
    (plotext); ANSI colours only if ``color``."""
    import plotext as plt

    series = {a: _arm_itl(data, a) for a in data["arms"]}
    if not any(series.values()):
        return "(no ITL samples under interference to plot)"
    top = max(percentile(v, 99.9) or 0 for v in series.values() if v) or 1.0
    parts = []
    for a, v in series.items():
        if not v:
            continue
        plt.clear_figure()
        plt.theme("clear")
        plt.plotsize(width, height)
        plt.hist([min(x, top) for x in v], bins=40)
        plt.xlim(0, top)
        parts.append(f"{a}: ITL of the steady streams under interference, n={len(v)}, p50 {percentile(v, 50):.1f} ms,"
                     f" p99 {percentile(v, 99):.1f} ms (x clipped at {top:.0f} ms)")
        parts.append(plt.build())
    plt.clear_figure()
    out = "\n".join(parts)
    return out if color else re.sub(r"\x1b\[[0-9;]*m", "", out)
