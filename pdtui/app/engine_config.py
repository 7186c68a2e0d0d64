"""What each engine reports about its own configuration, side by side (no Textual here).

pdtui renders both instances' command lines from one config, but a pair started by hand, or an
engine that resolved a setting its own way, can differ where it matters to a KV transfer. So this
asks the engines: ``GET /v1/models`` (the model's path, max_model_len) and the labels of
``vllm:cache_config_info`` in ``GET /metrics`` (block size, KV cache dtype, prefix caching, the
pool...), as vLLM's vmon does, and lists the keys whose values differ between P and D.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

CRITICAL = ("block_size", "cache_dtype", "max_model_len", "model", "effective_attention_block_size",
            "is_attention_free", "kv_cache_layout")
"""Keys whose difference breaks or distorts the KV transfer (the rest are told, in yellow)."""
IGNORED = ("engine", "model_name", "id", "created")
"""Labels that name rather than configure."""


async def probe(client: httpx.AsyncClient, url: str) -> dict[str, str]:
    """The engine's own words on its configuration: key -> value as text. An answer that is not
    vLLM's (or none) gives what could be read, possibly nothing."""
    out: dict[str, str] = {}
    base = url.rstrip("/")
    r = await client.get(f"{base}/v1/models")
    if r.status_code == 200:
        data = (r.json().get("data") or [{}])[0]
        if data.get("root") is not None:
            out["model"] = str(data["root"])
        if data.get("max_model_len") is not None:
            out["max_model_len"] = str(data["max_model_len"])
    r = await client.get(f"{base}/metrics")
    if r.status_code == 200:
        for family in text_string_to_metric_families(r.text):
            if family.name != "vllm:cache_config_info":
                continue
            for sample in family.samples[:1]:
                out.update({k.lstrip("_"): v for k, v in sample.labels.items() if k not in IGNORED})
    return out


def differences(configs: Mapping[str, Mapping[str, str]]) -> list[tuple[str, dict[str, str]]]:
    """Keys whose values differ between the instances (critical ones first), with every value; a
    key one instance does not report is not a difference (another vLLM version)."""
    if len(configs) < 2:
        return []
    keys = sorted(set.intersection(*(set(c) for c in configs.values())),
                  key=lambda k: (k not in CRITICAL, k))
    return [(k, {name: c[k] for name, c in configs.items()}) for k in keys
            if len({c[k] for c in configs.values()}) > 1]


def summary(diffs: list[tuple[str, dict[str, str]]], limit: int = 3) -> str:
    """One line: "block_size P 128 D 64; max_model_len P 4096 D 2048 (+2 more)"."""
    parts = [f"{k} " + " ".join(f"{n} {v}" for n, v in vals.items()) for k, vals in diffs[:limit]]
    more = f" (+{len(diffs) - limit} more: g)" if len(diffs) > limit else ""
    return "; ".join(parts) + more
