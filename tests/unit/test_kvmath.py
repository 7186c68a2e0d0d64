import re
from pathlib import Path

from pdtui.core import kvmath, model

QWEN05 = {"num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_size": 896,
          "torch_dtype": "bfloat16"}


def test_qwen05_per_token_bytes_and_the_lab_prompt():
    geo = kvmath.geometry_from_config(QWEN05)
    assert geo.bytes_per_token == 2 * 24 * 2 * 64 * 2 == 12288
    blocks = kvmath.blocks_for_tokens(2031, 16)
    assert blocks == 127
    assert kvmath.shipped_bytes(blocks, 16, geo) == 24_969_216
    assert "24 layers x 2 KV heads x 64 head_dim" in geo.formula(2031)


def test_llama8b_is_128_kib_per_token():
    cfg = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
           "torch_dtype": "bfloat16"}
    assert kvmath.geometry_from_config(cfg).bytes_per_token == 128 * 1024


def test_dtype_override_and_unknown_dtype():
    assert kvmath.geometry_from_config(QWEN05, "float32").bytes_per_token == 24576
    import pytest

    with pytest.raises(ValueError, match="unknown dtype"):
        kvmath.geometry_from_config(QWEN05, "int3")


def test_count_blocks_flat_and_per_group():
    assert kvmath.count_blocks(None) == 0
    assert kvmath.count_blocks([]) == 0
    assert kvmath.count_blocks([4, 5, 6]) == 3          # older vLLM: flat
    assert kvmath.count_blocks([[4, 5, 6, 7]]) == 4     # newer: one list per KV cache group
    assert kvmath.count_blocks([[1, 2], [3]]) == 3


def test_the_cpu_profiles_comment_says_how_many_tokens_its_kv_pool_holds():
    """vLLM reports 262,144 tokens of KV cache for each instance of the cpu profile (the dashboard's
    "KV use ... of 262,144 tok"); the comment once said 16k."""
    text = (Path(__file__).resolve().parents[2] / "launch" / "cpu.toml").read_text()
    found = re.search(r"kv_cache_memory_bytes = (\d+)\s+# .*?([\d,]+) tokens of the tiny model", text)
    assert found, "the cpu profile's KV comment"
    tiny = kvmath.geometry_from_config(model.config_json(model.SHAPES["tiny"]))
    assert tiny.bytes_per_token == 1024  # 2 (K,V) x 2 layers x 2 KV heads x 64 head_dim x 2 B (bfloat16)
    assert int(found[2].replace(",", "")) == int(found[1]) // tiny.bytes_per_token == 262_144
