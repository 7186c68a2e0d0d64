"""Synthetic models: a Qwen2 config.json plus a locally built tokenizer, no weights.

vLLM serves such a directory with ``--load-format dummy`` (random weights), which is all
prefill/decode disaggregation needs: the KV cache has the real geometry, so the bytes shipped
between P and D are the bytes the real model would ship.

The tokenizer is byte-level: ids 0..255 are the 256 bytes (GPT-2's byte-to-unicode alphabet),
so any text encodes to one token per UTF-8 byte, and a prompt of N ASCII characters is N tokens.
Every other id up to ``vocab_size`` is a word token `` w<id>`` plus three Qwen-style special
tokens at the end, so every id the model can emit decodes to readable text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer  # at run time, loaded by the function that builds one

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelShape:
    """The geometry of a Qwen2ForCausalLM; everything the KV cache size depends on."""

    name: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    torch_dtype: str = "bfloat16"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


SHAPES: dict[str, ModelShape] = {
    # Two layers, for tests: a CPU pair is ready in well under a minute.
    "tiny": ModelShape(
        name="tiny",
        num_hidden_layers=2,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=4096,
        max_position_embeddings=4096,
    ),
    # The real Qwen2.5-0.5B-Instruct geometry.
    "qwen2.5-0.5b": ModelShape(
        name="qwen2.5-0.5b",
        num_hidden_layers=24,
        hidden_size=896,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        max_position_embeddings=32768,
    ),
    # Llama-3.1-8B's geometry (32 layers, hidden 4096, 32 heads, 8 KV heads of 128, MLP 14336,
    # vocab 128256): 128 KiB of KV per token in bf16, the lab's 256 MiB for a 2031-token prompt.
    # Built as a Qwen2ForCausalLM like the others (one tokenizer and loader path); its KV and its
    # per-token compute are the 8B's, which is what the pair's economics depend on.
    "llama3.1-8b": ModelShape(
        name="llama3.1-8b",
        num_hidden_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=131072,
    ),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def config_json(shape: ModelShape) -> dict[str, Any]:
    eos = shape.vocab_size - len(SPECIAL_TOKENS) + 2  # <|im_end|>
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": shape.vocab_size - len(SPECIAL_TOKENS),
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "max_window_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": shape.torch_dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": shape.vocab_size,
        "pdtui_shape": shape.name,
    }


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer whose vocabulary covers exactly ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size {vocab_size} is below the 256 byte tokens + specials")
    alphabet = bytes_to_unicode()
    vocab: dict[str, int] = {alphabet[b]: b for b in range(256)}
    space = alphabet[ord(" ")]
    for i in range(256, vocab_size - n_special):
        vocab[f"{space}w{i}"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise AssertionError(f"tokenizer has {got} ids, the model {vocab_size}")
    return tok


def synth(shape_name: str, out_dir: Path, *, weights: bool = False) -> Path:
    """Write config.json + tokenizer files for ``shape_name`` into ``out_dir``; return it.
    ``weights``: also seeded random weights that make answers depend on the prompt (``write_weights``)."""
    if shape_name not in SHAPES:
        raise KeyError(f"unknown shape {shape_name!r}; choose one of {', '.join(SHAPES)}")
    shape = SHAPES[shape_name]
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(shape.vocab_size)
    tmp = out_dir / "tokenizer.json.tmp"
    tok.save(str(tmp))
    tmp.replace(out_dir / "tokenizer.json")
    eos = SPECIAL_TOKENS[2]
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": shape.max_position_embeddings,
                "bos_token": None,
                "eos_token": eos,
                "pad_token": SPECIAL_TOKENS[0],
                "unk_token": None,
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config_json(shape)["eos_token_id"], "do_sample": False}, indent=2)
    )
    if weights:
        write_weights(out_dir, shape)
    # config.json last: its presence marks a complete directory (see ensure()).
    (out_dir / "config.json").write_text(json.dumps(config_json(shape), indent=2))
    (out_dir / "pdtui-shape.json").write_text(json.dumps(asdict(shape), indent=2))
    return out_dir


def weight_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen2ForCausalLM of ``shape`` as vLLM loads it from safetensors (the word
    embeddings tied to the output head: no ``lm_head.weight``)."""
    h, hd = shape.hidden_size, shape.head_dim
    q, kv = shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(shape.num_hidden_layers):
        at = f"model.layers.{i}"
        out |= {f"{at}.input_layernorm.weight": (h,), f"{at}.post_attention_layernorm.weight": (h,),
                f"{at}.self_attn.q_proj.weight": (q, h), f"{at}.self_attn.q_proj.bias": (q,),
                f"{at}.self_attn.k_proj.weight": (kv, h), f"{at}.self_attn.k_proj.bias": (kv,),
                f"{at}.self_attn.v_proj.weight": (kv, h), f"{at}.self_attn.v_proj.bias": (kv,),
                f"{at}.self_attn.o_proj.weight": (h, q),
                f"{at}.mlp.gate_proj.weight": (shape.intermediate_size, h),
                f"{at}.mlp.up_proj.weight": (shape.intermediate_size, h),
                f"{at}.mlp.down_proj.weight": (h, shape.intermediate_size)}
    return out


WEIGHT_STD = {"embed": 0.5, "qk_gain": 6.0, "vo_gain": 4.0}
"""The random weights' scale (``write_weights``), chosen with transformers on the tiny shape
(results/2026-12-07-field, "the witness's weights"): with the embeddings at std 1 (tied to the
output head) the residual stream is the current token's embedding and the answer saturates on it
(logprob 0.0, the same 16 ids after any prefix); at 0.5, with sharp attention (q, k x6) and strong
values (v, o x4), 16 greedy tokens after a prompt share none with those after another prefix
ending in the same 20 tokens, top logprob -1.4, the closest top-2 margin 0.135."""


def write_weights(out_dir: Path, shape: ModelShape, seed: int = 0) -> Path:
    """``model.safetensors`` with seeded random weights whose answers depend on the prompt: norms
    1, biases 0, the rest normal with std 1/sqrt(fan in) scaled by ``WEIGHT_STD``. vLLM's dummy
    weights (uniform in +-1e-3) give every token the same logprob, ln 1/vocab, whatever came
    before, so no answer can tell a wrong KV cache from a right one; these can (the correctness
    witness, pdtui.core.known_answer). Float32; serve them with --dtype float32 so that P alone
    and the pair round alike (bfloat16 can flip a near tie)."""
    import struct

    import numpy as np

    rng = np.random.default_rng(seed)
    tensors: dict[str, bytes] = {}
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "pdtui": f"random weights, seed {seed}"}}
    offset = 0
    for name, dims in weight_shapes(shape).items():
        if name.endswith("norm.weight"):
            arr = np.ones(dims, dtype=np.float32)
        elif name.endswith(".bias"):
            arr = np.zeros(dims, dtype=np.float32)
        else:
            std = WEIGHT_STD["embed"] if name == "model.embed_tokens.weight" else dims[-1] ** -0.5
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                std *= WEIGHT_STD["qk_gain"]
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                std *= WEIGHT_STD["vo_gain"]
            arr = rng.normal(0.0, std, dims).astype(np.float32)
        data = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(dims), "data_offsets": [offset, offset + len(data)]}
        tensors[name] = data
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = out_dir / "model.safetensors.tmp"
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for data in tensors.values():
            f.write(data)
    tmp.replace(out_dir / "model.safetensors")
    return out_dir


def default_model_root() -> Path:
    import os

    base = os.environ.get("PDTUI_HOME") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return (root / "pdtui" / "models") if not os.environ.get("PDTUI_HOME") else root / "models"


def ensure(shape_name: str, root: Path | None = None) -> Path:
    """The directory of a synthetic model, made on first use."""
    out = (root or default_model_root()) / shape_name
    marker = out / "pdtui-shape.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(SHAPES[shape_name]):
        return out
    return synth(shape_name, out)


# ----- where a model named in a profile is (no network) -----------------------------------------


@dataclass(frozen=True)
class Located:
    """Where the engines will find a profile's ``model``."""

    kind: str
    """"shape" (a synthetic shape pdtui writes), "dir" (a path that exists) or "hf-cache" (a
    Hugging Face id downloaded into the local hub cache)."""
    path: Path | None
    """The folder holding its config.json (a cached snapshot for "hf-cache"); None for a shape."""

    def describe(self, name: str) -> str:
        if self.kind == "shape":
            return f"{name}: a synthetic shape (config and tokenizer written by pdtui, random weights)"
        if self.kind == "dir":
            return f"{name}: a local " + ("model folder" if self.path is not None and self.path.is_dir() else "file")
        return f"{name}: in the Hugging Face cache, {self.path}"


MODEL_FOLDER_FILES = ("config.json", "params.json")
"""What makes a folder a model vLLM can read (a Hugging Face config, or Mistral's format)."""


def hf_hub_cache(environ: dict[str, str] | None = None) -> Path:
    """The folder huggingface_hub downloads into, as its ``constants`` decide it: HF_HUB_CACHE,
    else the older HUGGINGFACE_HUB_CACHE, else ``$HF_HOME/hub`` (HF_HOME defaulting to
    ``$XDG_CACHE_HOME/huggingface``, then ``~/.cache/huggingface``)."""
    import os

    env = os.environ if environ is None else environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = env.get("HF_HOME") or str(Path(env.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(model_id: str, environ: dict[str, str] | None = None) -> Path | None:
    """The snapshot folder of Hugging Face model ``model_id`` (``org/name``) in the local hub cache
    that holds a config.json (``refs/main``'s first), or None: nothing is asked of the network."""
    repo = hf_hub_cache(environ) / f"models--{model_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    try:
        main = (repo / "refs" / "main").read_text().strip()
    except OSError:
        main = ""
    candidates = ([snapshots / main] if main else []) + (sorted(snapshots.iterdir()) if snapshots.is_dir() else [])
    for snap in candidates:
        if (snap / "config.json").is_file():
            return snap
    return None


def locate(model: str, environ: dict[str, str] | None = None) -> Located | None:
    """Where ``model`` is: a synthetic shape, a model folder (with the config.json vLLM reads, or a
    Mistral-format params.json), a file (vLLM loads a .gguf), or a Hugging Face id already in the
    local cache. None: not here (pdtui does not download; vLLM would try to, and fail seconds into
    the start, or later on a machine without the network)."""
    if model in SHAPES:
        return Located("shape", None)
    path = Path(model)
    if path.is_file() or any((path / f).is_file() for f in MODEL_FOLDER_FILES):
        return Located("dir", path)
    if path.exists():
        return None
    snap = cached_snapshot(model, environ) if model and not model.startswith(("/", ".", "~")) else None
    return Located("hf-cache", snap) if snap is not None else None


def model_config(model: str, environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The model's config.json as a dict (a shape's as pdtui writes it), or None when not here."""
    found = locate(model, environ)
    if found is None:
        return None
    if found.kind == "shape":
        return config_json(SHAPES[model])
    config = (found.path / "config.json") if found.path is not None and found.path.is_dir() else None
    try:
        return json.loads(config.read_text()) if config is not None else None
    except (OSError, ValueError):
        return None
