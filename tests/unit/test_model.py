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
