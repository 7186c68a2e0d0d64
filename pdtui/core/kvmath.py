"""The freight: how many bytes of KV cache a prompt ships from P to D.

    per-token bytes = 2 (K and V) x layers x kv_heads x head_dim x dtype bytes
    bytes shipped   = blocks x block_size x per-token bytes

NIXL moves whole blocks, so the last, partly filled block costs as much as a full one. D pulls
only the blocks it does not already hold: with prefix caching, a prompt D has seen before ships
fewer blocks than P offered (``remote_block_ids``). D's ``vllm:nixl_bytes_transferred`` counts
what was really pulled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {
    "float32": 4,
    "fp32": 4,
    "float": 4,
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}


@dataclass(frozen=True)
class KvGeometry:
    """What one token of KV cache costs, read from a model's config.json."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    dtype_bytes: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def formula(self, tokens: int) -> str:
        """The freight formula with its numbers, for people."""
        total = self.bytes_per_token * tokens
        return (
            f"{self.layers} layers x {self.kv_heads} KV heads x {self.head_dim} head_dim x 2 (K,V)"
            f" x {self.dtype_bytes} B ({self.dtype}) x {tokens} tokens = {total:,} B"
            f" = {total / 2**20:.2f} MiB"
        )


def geometry_from_config(cfg: dict[str, Any], dtype: str = "auto") -> KvGeometry:
    """KV geometry of a HF config dict; ``dtype`` is vLLM's ``--dtype`` (``auto``: the model's)."""
    text = cfg.get("text_config", cfg)
    layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or text["hidden_size"] // heads)
    if dtype == "auto":
        dtype = str(text.get("torch_dtype") or text.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    dtype = dtype.removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
    return KvGeometry(layers, kv_heads, head_dim, dtype, DTYPE_BYTES[dtype])


def geometry_from_dir(model_dir: Path, dtype: str = "auto") -> KvGeometry:
    return geometry_from_config(json.loads((Path(model_dir) / "config.json").read_text()), dtype)


def count_blocks(remote_block_ids: Any) -> int:
    """Blocks offered by P: a flat list (older vLLM) or a list of per-group lists (newer).

    With several KV cache groups (hybrid models) the groups' blocks are summed.
    """
    if not remote_block_ids:
        return 0
    if isinstance(remote_block_ids[0], list):
        return sum(len(group) for group in remote_block_ids)
    return len(remote_block_ids)


def blocks_for_tokens(tokens: int, block_size: int) -> int:
    return math.ceil(tokens / block_size)


def shipped_bytes(blocks: int, block_size: int, geometry: KvGeometry) -> int:
    return blocks * block_size * geometry.bytes_per_token


def stored_blocks(prompt_tokens: int, block_size: int) -> int:
    """Whole blocks a storage connector keeps of an n-token prompt (vLLM's ExampleConnector saves
    ``(n - 1) // block_size`` blocks: the last token, and the partial block it ends, are D's to compute).
    D finds them only if it looks under the same length: it looks under ``(n - 2) // block_size``
    blocks, so a prompt whose ``n - 1`` is a multiple of the block size misses (``storage_hit``)."""
    return max(0, prompt_tokens - 1) // block_size


def storage_hit(prompt_tokens: int, block_size: int) -> bool:
    """Whether ExampleConnector's D finds what its P stored for an n-token prompt (``stored_blocks``)."""
    return stored_blocks(prompt_tokens, block_size) > 0 and (prompt_tokens - 1) % block_size != 0
