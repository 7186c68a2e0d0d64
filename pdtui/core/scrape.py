"""Prometheus /metrics of an instance -> the few series pdtui shows, via prometheus_client's parser.

Keys are ``name`` or ``name{label="value"}`` (only the labels that tell series apart here, not
``engine`` or ``model_name``), so a snapshot is a flat ``dict[str, float]`` that is easy to diff,
record and replay.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from pdtui.core import connectors

# family name (as the parser reports it, without _total) -> labels to keep in the key
WANTED: dict[str, tuple[str, ...]] = {
    "vllm:kv_cache_usage_perc": (),
    "vllm:num_requests_running": (),
    "vllm:num_requests_waiting": (),
    # D only (a kv consumer, vLLM 0.32): waiting requests by the stage of their KV pull
    "vllm:num_requests_kv_fetch_by_stage": ("stage",),
    "vllm:prompt_tokens_by_source": ("source",),
    "vllm:prompt_tokens": (),
    "vllm:generation_tokens": (),
    "vllm:request_success": ("finished_reason",),
    "vllm:num_preemptions": (),
    "vllm:prefix_cache_queries": (),
    "vllm:prefix_cache_hits": (),
    "vllm:time_to_first_token_seconds": (),
    "vllm:inter_token_latency_seconds": (),
    # the connectors' own (pdtui/core/connectors.py), e.g. vllm:nixl_bytes_transferred
    **{name: () for c in connectors.CONNECTORS.values() for name in c.metrics},
}
# Histograms whose buckets are kept too (key ``name_bucket{le="..."}``), for quantiles: NIXL's own
# per-transfer time, p50/p99 per D (as vLLM's vmon shows it).
BUCKETS = (connectors.NIXL.xfer_time_metric,)  # vllm:nixl_xfer_time_seconds
# From cache_config_info's labels: the KV pool's geometry.
CACHE_INFO_LABELS = ("block_size", "num_gpu_blocks", "num_cpu_blocks", "kv_cache_size_tokens", "kv_cache_memory_bytes")


def _key(name: str, labels: dict[str, str], keep: tuple[str, ...]) -> str:
    kept = [f'{k}="{labels[k]}"' for k in keep if k in labels]
    return f"{name}{{{','.join(kept)}}}" if kept else name


def parse_metrics(text: str) -> dict[str, float]:
    """Selected values from a /metrics body. Histograms give _sum and _count; counters drop _total."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:cache_config_info":
            for sample in family.samples:
                for label in CACHE_INFO_LABELS:
                    value = sample.labels.get(label)
                    if value not in (None, "None", ""):
                        try:
                            out[f"cache_config:{label}"] = float(value)
                        except ValueError:
                            pass
            continue
        keep = WANTED.get(family.name)
        if keep is None:
            continue
        for sample in family.samples:
            name = sample.name
            if name.endswith("_created") or (name.endswith("_bucket") and family.name not in BUCKETS):
                continue
            name = name.removesuffix("_total")
            key = _key(name, sample.labels, ("le", *keep) if name.endswith("_bucket") else keep)
            out[key] = out.get(key, 0.0) + float(sample.value)  # sum over engines/ranks
    return out


def kv_pool_tokens(values: dict[str, float]) -> int | None:
    """The KV pool's size in tokens, from cache_config_info."""
    if "cache_config:kv_cache_size_tokens" in values:
        return int(values["cache_config:kv_cache_size_tokens"])
    blocks = values.get("cache_config:num_gpu_blocks")
    block_size = values.get("cache_config:block_size")
    if blocks and block_size:
        return int(blocks * block_size)
    return None


def capacity(values: dict[str, float]) -> dict[str, float | int | None]:
    """What the proxy's choice of D and P reads of a scrape (pdtui.core.proxy.routing.Capacity, less
    its time): the pool's blocks (cache_config_info's num_gpu_blocks), the share in use
    (kv_cache_usage_perc, 0 to 1) and the queue (num_requests_waiting). None where not reported."""
    blocks = values.get("cache_config:num_gpu_blocks")
    usage = values.get("vllm:kv_cache_usage_perc")
    waiting = values.get("vllm:num_requests_waiting")
    return {"total_blocks": int(blocks) if blocks else None, "used_perc": usage,
            "waiting": None if waiting is None else int(waiting)}
