"""pdtui: a terminal dashboard for prefill/decode disaggregated serving on vLLM."""

__version__ = "0.1.0"
