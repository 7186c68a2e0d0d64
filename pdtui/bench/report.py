"""Statistics, the table, the JSON file and the plots of a benchmark.

Pure functions over samples (``workload.Sample``) so they are tested without engines:

- ``percentile``: linear interpolation between closest ranks (numpy's default), p in 0..100;
- ``summarize_arm``: TTFT of the follow requests and of the big prompts, the steady streams' ITL
  inside the measured window, the toll split of the pair;
- ``verdict``: toll = pair TTFT p50 / single TTFT p50 (> 1: the pair is slower to first token);
  purchase = single ITL p99 / pair ITL p99 (> 1: the pair bought smoother decode);
- ``table``: the seed's shape, per arm TTFT p50/p99 and ITL p50/p99, then toll and purchase in words.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pdtui.bench.workload import Sample

SCHEMA = "pdtui-bench/1"
PCTS = (50, 90, 99)


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100), linear between closest ranks; None for no values."""
    if not values:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is outside 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


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


def window_itl(samples: Iterable[Sample], window: Sequence[float] | None) -> list[float]:
    """Gaps between consecutive token chunks of the steady streams that lie wholly inside the window
    (a gap begun in the warm-up or ended after the window is left out; a stream's restart is no gap)."""
    out: list[float] = []
    for s in samples:
        if s.workload != "stream" or s.warmup:
            continue
        for a, b in zip(s.chunk_t, s.chunk_t[1:]):
            if window is None or (window[0] <= a and b <= window[1]):
                out.append((b - a) * 1000.0)
    return out


def toll_split(s: Sample) -> dict[str, float | None] | None:
    """Pair arm: prefill (P queue + prefill), hop (proxy), transfer + D's first step, from the trace."""
    if not s.trace:
        return None
    return {k: s.trace.get(k) for k in ("prefill_ms", "hop_ms", "decode_ttft_ms")}


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
        },
        "interference": {
            "window_s": (windows["interference"][1] - windows["interference"][0])
            if "interference" in windows else None,
            "streams_requests": len(measured(samples, "stream")),
            "big_requests": len(measured(samples, "big")),
            "big_ok": len(big),
            "big_ttft_ms": dist([s.ttft_ms for s in big if s.ttft_ms is not None]),
            "stream_itl_ms": dist(window_itl(samples, windows.get("interference"))),
        },
        "failed": failed,
    }
    splits = [toll_split(s) for s in follow]
    splits = [x for x in splits if x]
    if splits:
        out["follow"]["toll_split_ms"] = {
            k: dist([x[k] for x in splits if x[k] is not None]) for k in ("prefill_ms", "hop_ms", "decode_ttft_ms")
        }
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def verdict(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Toll and purchase of the pair against the single instance; None where an arm is missing."""
    single, pair = summaries.get("single"), summaries.get("pair")
    if not single or not pair:
        return {"toll": None, "purchase": None, "text": ["toll and purchase need both the single and the pair arm"]}
    s_ttft, p_ttft = single["follow"]["ttft_ms"]["p50"], pair["follow"]["ttft_ms"]["p50"]
    s_itl, p_itl = single["interference"]["stream_itl_ms"]["p99"], pair["interference"]["stream_itl_ms"]["p99"]
    toll, purchase = _ratio(p_ttft, s_ttft), _ratio(s_itl, p_itl)
    text = []
    if toll is None:
        text.append("toll: not measured (no follow TTFT in one of the arms)")
    else:
        text.append(f"toll: pair TTFT p50 {p_ttft:.1f} ms vs single {s_ttft:.1f} ms = {toll:.2f}x"
                    f" ({(toll - 1) * 100:+.0f}%)" + (": the pair is slower to the first token" if toll > 1
                                                     else ": the pair is not slower to the first token"))
    if purchase is None:
        text.append("purchase: not measured (no steady-stream ITL in one of the arms)")
    else:
        text.append(f"purchase: single ITL p99 {s_itl:.1f} ms / pair ITL p99 {p_itl:.1f} ms = {purchase:.2f}x"
                    + (": the pair bought smoother decode" if purchase > 1
                       else ": the pair LOSES here, its decode stalls are no better than the single instance's"))
    two = summaries.get("two-single")
    if two:
        t_ttft, t_itl = two["follow"]["ttft_ms"]["p50"], two["interference"]["stream_itl_ms"]["p99"]
        text.append(f"two-single (same hardware as the pair): TTFT p50 {_ms(t_ttft)} ms, ITL p99 {_ms(t_itl)} ms;"
                    f" pair TTFT / two-single = {_fmt_ratio(_ratio(p_ttft, t_ttft))},"
                    f" two-single ITL p99 / pair = {_fmt_ratio(_ratio(t_itl, p_itl))}")
    return {"toll": toll, "purchase": purchase, "text": text}


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
    pair = summaries.get("pair")
    if pair and "toll_split_ms" in pair["follow"]:
        ts = pair["follow"]["toll_split_ms"]
        lines += ["", f"pair toll split (follow, p50): P prefill {_ms(ts['prefill_ms']['p50'])} ms"
                  f" + proxy hop {_ms(ts['hop_ms']['p50'])} ms"
                  f" + transfer & D first step {_ms(ts['decode_ttft_ms']['p50'])} ms"]
    lines += [""] + verdict(summaries)["text"]
    checks = {a: s["cross_check"] for a, s in summaries.items() if s.get("cross_check")}
    if checks:
        lines += ["", "| cross-check (follow shape) | ours TTFT p50 | vllm bench serve TTFT p50 | ours ITL p50"
                  " | vllm bench serve ITL p50 | ITL p99 ours / theirs |", "|---|---:|---:|---:|---:|---:|"]
        for a, c in checks.items():
            f = summaries[a]["follow"]
            if c.get("error"):
                lines.append(f"| {a} | {_ms(f['ttft_ms']['p50'])} | failed (rc {c.get('returncode')}) | | | |")
                continue
            lines.append(f"| {a} | {_ms(f['ttft_ms']['p50'])} | {_ms(c.get('median_ttft_ms'))}"
                         f" | {_ms(f['itl_ms']['p50'])} | {_ms(c.get('median_itl_ms'))}"
                         f" | {_ms(f['itl_ms']['p99'])} / {_ms(c.get('p99_itl_ms'))} |")
    return "\n".join(lines)


def bytes_check(traces: Sequence[dict[str, Any]], metric_before: float | None, metric_after: float | None,
                bytes_per_token: int | None, block_size: int) -> dict[str, Any]:
    """Sum of the traces' kv_bytes against D's vllm:nixl_bytes_transferred delta, and every trace
    against the formula blocks x block_size x bytes/token with blocks = ceil(prompt_tokens / block_size)."""
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
        formula_ok = all(
            t.get("kv_bytes") == math.ceil((t.get("prompt_tokens") or 0) / block_size) * block_size * bytes_per_token
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
    }


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write ``data`` to ``path``, gzip-compressed if the name ends in .gz (what the bench writes:
    bench.json.gz; on a GPU the raw samples are 16+ MiB of JSON), atomically (a temp file, then
    a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(data, separators=(",", ":"), default=str).encode()
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
    single = [s for s in data["arms"].get("single", {}).get("samples", [])
              if s["workload"] == "follow" and not s["warmup"] and s["ttft_ms"] is not None]
    x = list(range(len(pair)))
    bottom = [0.0] * len(pair)
    parts = (("prefill_ms", "P prefill"), ("hop_ms", "proxy hop"), ("decode_ttft_ms", "transfer + D first step"))
    for key, label in parts:
        vals = [s["trace"].get(key) or 0.0 for s in pair]
        ax.bar(x, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    if pair:
        ax.scatter(x, [s["ttft_ms"] for s in pair], color="black", marker="_", s=200, label="pair TTFT (client)")
    if single:
        ax.scatter(list(range(len(single))), [s["ttft_ms"] for s in single], color="red", marker="x",
                   label="single TTFT (client)")
    ax.set_xlabel("follow request")
    ax.set_ylabel("ms")
    ax.set_title("the toll, per request")
    _legend(ax)
    written.append(_save(fig, out_dir / "toll.png"))
    return written


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
