"""Prompts of an exact size, counted by the model's own tokenizer (no Textual, no engine needed).

A prompt built from words is only an estimate: the generated "tiny" model's tokenizer is
byte-level with no merges (pdtui.core.model), so "prefill decode cache" is 20 tokens, not 3, and
the load keys' "3000-token" prompts were 18,954 tokens, over max_model_len. Here the text is cut
at a token count and re-encoded, and the count that comes back is what the engine will see.

``TokenCounter.for_model()`` finds a ``tokenizer.json`` (a local model folder, the generated
model, or a Hugging Face cache entry, never the network); ``EngineTokenizer`` asks a running
vLLM engine's ``/tokenize`` and ``/detokenize`` instead, for a model whose tokenizer is not here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

WORDS = ("prefill", "decode", "cache", "block", "transfer", "token", "layer", "head", "pull", "push", "engine",
         "proxy", "stream", "latency", "nixl", "memory", "pool", "queue", "batch")


def filler(salt: int, words: int) -> str:
    """Unique text (unique so prefix caching does not hide the KV pull): ``[salt]`` and words."""
    return f"[{salt}] " + " ".join(WORDS[(salt * 7 + i * 3) % len(WORDS)] for i in range(max(1, words)))


def prompt_budget(max_model_len: int, max_tokens: int, margin: int = 8) -> int:
    """The longest prompt a request may carry: max_model_len less the tokens it asks for, less a
    margin for the specials a chat template or a BOS may add."""
    return max(1, max_model_len - max_tokens - margin)


class TokenCounter:
    """A model's tokenizer (the ``tokenizers`` package) that cuts text at an exact token count."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name

    @classmethod
    def from_file(cls, path: Path | str) -> TokenCounter:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), str(path))

    @classmethod
    def for_model(cls, model: str) -> TokenCounter | None:
        """The tokenizer of ``model`` (a folder, or a Hugging Face id already in the local cache);
        None when there is none here (then ask the engine: EngineTokenizer)."""
        folder = Path(model).expanduser()
        if (folder / "tokenizer.json").is_file():
            return cls.from_file(folder / "tokenizer.json")
        if folder.exists() or model.count("/") != 1:  # a folder without one, or not a hub id
            return None
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        try:
            found = try_to_load_from_cache(model, "tokenizer.json")
        except ValueError:  # an id the hub library refuses (HFValidationError): not cached
            return None
        return cls.from_file(found) if isinstance(found, str) else None

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def prompt(self, tokens: int, salt: int) -> tuple[str, int]:
        """A unique prompt of ``tokens`` tokens (fewer only when cutting splits a character)."""
        words = max(1, tokens)
        text = filler(salt, words)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        while len(ids) < tokens:  # a tokenizer that merges whole words: more words
            words *= 2
            text = filler(salt, words)
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return cut(ids[:tokens], self.tokenizer.decode, self.count)


def cut(ids: list[int], decode: Callable[[list[int]], str], count: Callable[[str], int]) -> tuple[str, int]:
    """Text of at most ``len(ids)`` tokens: decoding and encoding again may merge across the cut,
    or split, so drop tokens from the end until the count is within."""
    n = len(ids)
    for keep in range(n, max(0, n - 16), -1):
        text = decode(ids[:keep])
        got = count(text)
        if got <= n:
            return text, got
    text = decode(ids[: max(1, n - 16)])
    return text, count(text)


class EngineTokenizer:
    """The same cut, by a running vLLM engine's /tokenize and /detokenize (for a model whose
    tokenizer is not on this machine). ``client`` is an httpx.AsyncClient."""

    def __init__(self, client: Any, base_url: str, model: str) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"{base_url}/tokenize"

    async def _ids(self, text: str) -> list[int]:
        r = await self.client.post(f"{self.base_url}/tokenize",
                                   json={"model": self.model, "prompt": text, "add_special_tokens": False})
        r.raise_for_status()
        return list(r.json()["tokens"])

    async def prompt(self, tokens: int, salt: int) -> tuple[str, int]:
        ids = await self._ids(filler(salt, max(1, tokens)))
        ids = ids[:tokens]
        r = await self.client.post(f"{self.base_url}/detokenize", json={"model": self.model, "tokens": ids})
        r.raise_for_status()
        text = r.json()["prompt"]
        return text, len(await self._ids(text))
