"""Prompt sizes by the model's own tokenizer (the generated tiny model's), and the load keys' use of them."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from pdtui.app import loadgen
from pdtui.core import model as model_mod
from pdtui.core.prompts import TokenCounter, cut, prompt_budget


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TokenCounter:
    folder = model_mod.ensure("tiny", tmp_path_factory.mktemp("models"))
    counter = TokenCounter.for_model(str(folder))
    assert counter is not None
    return counter


def test_prompt_has_the_exact_count(tiny: TokenCounter) -> None:
    for n in (1, 7, 300, 3000):
        text, got = tiny.prompt(n, salt=n)
        assert got == n and tiny.count(text) == n
    # a words estimate is far off on this byte-level tokenizer: what the load keys used to send
    assert tiny.count(loadgen.prompt_of(300, 1)) > 1500


def test_prompts_are_unique(tiny: TokenCounter) -> None:
    assert tiny.prompt(50, 1)[0] != tiny.prompt(50, 2)[0]


def test_cut_drops_tokens_that_merge_across_the_cut() -> None:
    # a fake tokenizer whose re-encoding of a decoded cut of more than 2 tokens is one token longer
    text, got = cut([1, 2, 3, 4], lambda ids: "x" * len(ids), lambda t: len(t) + (1 if len(t) > 2 else 0))
    assert (text, got) == ("xxx", 4)  # 4 ids re-encode to 5: one dropped


def test_budget_leaves_room_for_the_answer() -> None:
    assert prompt_budget(4096, 8) == 4080
    assert prompt_budget(16, 64) == 1


def test_no_tokenizer_for_an_uncached_hub_id_or_an_empty_folder(tmp_path) -> None:
    assert TokenCounter.for_model(str(tmp_path)) is None
    assert TokenCounter.for_model("pdtui-test/not-a-cached-model") is None


def _serve(seen: list[dict]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, text='data: {"choices":[{"text":"x"}]}\n\ndata: [DONE]\n\n',
                              headers={"content-type": "text/event-stream"})
    return httpx.MockTransport(handler)


def test_big_prompts_fit_max_model_len_and_are_labelled_with_what_was_sent(tiny: TokenCounter) -> None:
    seen: list[dict] = []
    sizer = loadgen.LocalSizer(tiny)
    res = asyncio.run(loadgen.run("big", "http://proxy", "tiny", transport=_serve(seen), sizer=sizer,
                                  max_model_len=4096))
    assert res.ok == 4 and res.errors == 0
    assert [tiny.count(b["prompt"]) for b in seen] == [3000] * 4 == res.prompt_tokens
    assert all(b["stream_options"] == {"include_usage": True} for b in seen)
    assert res.sizes() == "prompts 3,000 tokens"
    # a shorter max_model_len: cut to it less max_tokens (8) less the margin (8)
    seen.clear()
    res = asyncio.run(loadgen.run("mix", "http://proxy", "tiny", transport=_serve(seen), sizer=sizer,
                                  max_model_len=1024))
    assert max(tiny.count(b["prompt"]) for b in seen) == 1008 == max(res.prompt_tokens)
    assert res.sizes() == f"prompts {loadgen.STEADY_TOKENS}-1,008 tokens"


def test_engine_tokenizer_asks_tokenize_and_detokenize() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append(request.url.path)
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": list(range(len(body["prompt"]))), "count": len(body["prompt"])})
        return httpx.Response(200, json={"prompt": "y" * len(body["tokens"])})

    async def go() -> tuple[str, int]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            from pdtui.core.prompts import EngineTokenizer
            return await EngineTokenizer(client, "http://engine", "m").prompt(40, 3)

    assert asyncio.run(go()) == ("y" * 40, 40)
    assert calls == ["/tokenize", "/detokenize", "/tokenize"]
