import json

from pdtui.core import kvmath, model


def test_tiny_tokenizer_decodes_every_id_the_model_can_emit(tmp_path):
    out = model.synth("tiny", tmp_path / "tiny")
    cfg = json.loads((out / "config.json").read_text())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == cfg["vocab_size"]
    for i in range(cfg["vocab_size"]):
        assert tok.id_to_token(i) is not None, i
    text = tok.decode(list(range(256, 300)))
    assert text.startswith(" w256 w257")


def test_byte_level_prompt_is_one_token_per_byte(tmp_path):
    out = model.synth("tiny", tmp_path / "tiny")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    prompt = "The quick brown fox, 0123456789!"
    ids = tok.encode(prompt).ids
    assert len(ids) == len(prompt.encode())
    assert tok.decode(ids) == prompt


def test_qwen_shape_has_the_real_geometry(tmp_path):
    out = model.synth("qwen2.5-0.5b", tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (24, 896, 14)
    assert (cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == (2, 4864, 151936)
    geo = kvmath.geometry_from_dir(out)
    assert geo.head_dim == 64
    assert geo.bytes_per_token == 12288


def test_8b_shape_has_llama_3_1_8b_kv_geometry(tmp_path):
    """The lab's 8B: 128 KiB of KV per token in bf16, so a 2031-token prompt in 16-token blocks
    ships 127 blocks = 254 MiB (the lab rounds it to 256 MiB)."""
    out = model.synth("llama3.1-8b", tmp_path / "l")
    geo = kvmath.geometry_from_dir(out)
    assert (geo.layers, geo.kv_heads, geo.head_dim, geo.dtype_bytes) == (32, 8, 128, 2)
    assert geo.bytes_per_token == 128 * 1024
    blocks = kvmath.blocks_for_tokens(2031, 16)
    assert kvmath.shipped_bytes(blocks, 16, geo) == 127 * 16 * 128 * 1024


def test_ensure_reuses_a_complete_directory(tmp_path):
    first = model.ensure("tiny", tmp_path)
    stamp = (first / "tokenizer.json").stat().st_mtime_ns
    again = model.ensure("tiny", tmp_path)
    assert again == first
    assert (again / "tokenizer.json").stat().st_mtime_ns == stamp


def test_unknown_shape_names_the_choices(tmp_path):
    import pytest

    with pytest.raises(KeyError, match="tiny"):
        model.synth("llama-9000", tmp_path)
