"""The proxy's settings (``ProxySettings``): what it is told once, at its start."""

from __future__ import annotations

from dataclasses import dataclass

from pdtui.core import connectors, kvmath

DECODE_CHOICES = ("least-loaded", "round-robin")
PREFILL_FAILURE_POLICIES = ("retry", "decode-locally")


@dataclass
class ProxySettings:
    block_size: int = 16
    geometry: kvmath.KvGeometry | None = None
    connect_timeout_s: float = 5.0
    prefill_timeout_s: float = 300.0
    """Whole P leg (the first request after start-up can stall for tens of seconds)."""
    decode_read_timeout_s: float = 300.0
    """Longest silence from D (before its answer's head, or while streaming) before it is called broken."""
    decode_choice: str = "least-loaded"
    """How a decode instance is picked: "least-loaded" (fewest requests in flight, ties to the
    first: the pair's default) or "round-robin" (each request to the next instance that is up, in
    list order, whatever their load: vLLM's examples/disagg toy proxies, the bench's two-single)."""
    prefill_failure: str = "retry"
    """What a P failure after dispatch does: "retry" (502/503/504 or a broken connection: one more
    try, on another P if there is one, then an error; other 5xx: an error) or "decode-locally"
    (pdtui before issue 14: D computes the prompt itself, a fallback)."""
    tokenize_once: bool = False
    """P is asked for its token ids (``return_token_ids``) and D gets the prompt as those ids, so D
    does not tokenize it again (docs/ttft-toll.md). Chat: D gets /v1/completions from the rendered
    prompt's ids, and the proxy writes its answer back as chat (every chunk rewritten)."""
    first_token_from_p: bool = False
    """P's sampled token goes to the client the moment P answers, and D continues from the prompt's
    ids plus that token with max_tokens - 1 (``pdtui.core.proxy.firsttoken``), for completions and chat.
    Requests it cannot serve token for token (n > 1, echo, logprobs, stop strings, tools, ...) take
    the normal path, counted in ``pdtui_switch_skipped_total``."""
    decode_reports_cached: bool = False
    """The decode instances run with ``--enable-prompt-tokens-details`` (``pdtui up`` starts them
    so): on a paired request the proxy records how many prompt tokens D computed itself and counts
    more than one block as a silent recompute (the module's docstring). vLLM 0.22.1 leaves
    prompt_tokens_details out when D cached nothing, which only this setting lets the proxy read as
    0. False: D's params and usage pass as they are, and d_computed_tokens stays None."""
    connector: str = connectors.NIXL.name
    """The KV connector the engines run (``pdtui.core.connectors``): the names of the
    kv_transfer_params the proxy sends P and reads in P's answer come from its entry."""

