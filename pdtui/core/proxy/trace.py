"""A request's record while the proxy serves it (``Trace``), frozen into one ``RequestTraced`` at the end."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from pdtui.core.events import RequestTraced

if TYPE_CHECKING:
    from pdtui.core.proxy.usage import UsageCheck

PREFILL_BRANCHES = {
    "fallback_down": "no prefill instance was up: D computed the prompt (before dispatch)",
    "fallback_unreachable": "no connection to P could be made: D computed the prompt (before dispatch)",
    "retry_ok": "P failed with 502/503/504 or broke off; the one retry paired",
    "next_p": "no connection to a P could be made (never sent); another P that was up paired",
    "error_retry_failed": "P failed with 502/503/504 or broke off, and so did the retry: an error to the client",
    "error_5xx": "P answered another 5xx: an error to the client",
    "error_no_kv": "P answered 200 without kv_transfer_params (or not JSON): an error to the client",
    "decode_locally": "prefill_failure=decode-locally: P failed after dispatch and D computed the prompt",
}
"""How a request's P leg ended when it did not simply pair (``RequestTraced.prefill_branch``)."""

_RECORD = tuple(f for f in dataclasses.fields(RequestTraced) if f.init and f.name not in ("t", "total_ms"))
_RECORD_NAMES = tuple(f.name for f in _RECORD)
_ROUNDED_MS = ("prefill_ms", "hop_ms", "decode_ttft_ms", "ttft_ms")


class Trace:
    """A request's record while it runs: the fields of RequestTraced itself (one definition, no
    twin copied field by field), mutable, plus the working state below. ``freeze()`` hands the
    record to RequestTraced at the end. Slots: the relay's per-chunk updates stay attribute stores."""

    __slots__ = (*_RECORD_NAMES, "done_seen", "kv_held", "kv_tampered", "last_chunk_at", "p_answer", "paired", "t0",
                 "usage_check", "warm_target")

    def __init__(self, request_id: str, endpoint: str, stream: bool) -> None:
        for f in _RECORD:
            if f.default is not dataclasses.MISSING:
                setattr(self, f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                setattr(self, f.name, f.default_factory())
        self.request_id, self.endpoint, self.stream = request_id, endpoint, stream
        self.outcome: str = "error"
        """pair | fallback | error (events.OUTCOMES): error until the request is served."""
        self.status: int = 0
        self.t0 = time.perf_counter()
        self.paired = False
        """P's kv_transfer_params went to D."""
        self.last_chunk_at: float | None = None
        """Wall clock (Unix seconds) of the latest token-carrying event: with ``itl_ms`` it dates each
        chunk, which the headroom reads against a scrape's time (routing.Promise.observe)."""
        self.done_seen = False
        """D sent [DONE]: a client hanging up after this is a normal end, not an abort."""
        self.p_answer: Any = None
        """P's parsed answer (the TTFT switches read its token ids)."""
        self.kv_held: dict[str, Any] | None = None
        """P's kv_transfer_params while no D has been sent them: P holds the blocks for a read that
        has not been asked for yet (the proxy releases them if the D leg is never sent)."""
        self.kv_tampered = False
        """A drill gave D other params than P's (pdtui.core.proxy.drillhooks): P's stay held until released."""
        self.usage_check: UsageCheck | None = None
        """Paired with decode_reports_cached: reads D's usage (d_computed_tokens), edits it for the client."""
        self.warm_target: dict[str, str] = {}
        """A warm-up's own P and D (its header's value "P=name,D=name"): the Runtime warms every
        (P, D) of an NpMd, so that no D pays its first NIXL handshake with a client's request (or a
        migration) on it."""

    # The fields as mypy sees them (set in __init__ from RequestTraced's defaults).
    if TYPE_CHECKING:
        warmup: bool
        prefill: str | None
        decode: str | None
        prompt_tokens: int | None
        completion_tokens: int | None
        chunks: int
        prefill_ms: float | None
        hop_ms: float | None
        decode_ttft_ms: float | None
        ttft_ms: float | None
        itl_ms: list[float]
        blocks: int | None
        kv_bytes: int | None
        fallback_reason: str | None
        error: str | None
        failed: str | None
        prefill_attempts: int
        prefill_branch: str | None
        switch: str | None
        switch_skipped: str | None
        d_computed_tokens: int | None
        recomputed: bool
        decode_reason: str | None
        migrations: list[dict[str, Any]]
        drill: str | None
        kv_release: dict[str, Any] | None

    def served(self) -> str:
        """The outcome of a request that was served: pair when P's KV went to D, else fallback."""
        return "pair" if self.paired else "fallback"

    def freeze(self) -> RequestTraced:
        rec = {name: getattr(self, name) for name in _RECORD_NAMES}
        for name in _ROUNDED_MS:
            rec[name] = _r(rec[name])
        rec["itl_ms"] = [round(x, 3) for x in self.itl_ms]
        return RequestTraced(**rec, total_ms=_r((time.perf_counter() - self.t0) * 1000))


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)

