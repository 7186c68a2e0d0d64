"""What the silent-recompute check adds to the proxy's relay, per chunk and per request.

On a paired stream with ``decode_reports_cached`` (pdtui up's proxy), a chunk that the byte scan
(``SseScan.feed``, which every chunk already pays) calls usual (one whole token event) is
written as it is, after one more substring check when D's usage event is to be dropped
(``UsageCheck.watches``: does the chunk end its choice? its terminal event then waits for the
usage event's system_fingerprint); any other goes through ``UsageCheck.feed`` too, whose own fast
path is one ``endswith`` and three substring checks (a chunk of several whole token events). The final usage
event is JSON-parsed and edited once per request. This times each on the chunks vLLM 0.32.0 writes
(compact JSON) and prints the figures (results/2026-11-30-cpu-proxy keeps them).

    PYTHONPATH=. python scripts/bench/usage_check_cost.py
"""

from __future__ import annotations

import json
import time
import timeit

from pdtui.core.proxy.sse import SseScan
from pdtui.core.proxy.trace import Trace
from pdtui.core.proxy.usage import UsageCheck

TOKEN = (b'data: {"id":"cmpl-e2e-1234abcd-0-89abcdef","object":"text_completion","created":1764486000,'
         b'"model":"tiny","choices":[{"index":0,"text":" fox","logprobs":null,"finish_reason":null,'
         b'"stop_reason":null,"token_ids":null,"prompt_logprobs":null,"prompt_token_ids":null}]}\n\n')
USAGE = b"data: " + json.dumps({
    "id": "cmpl-e2e-1234abcd-0-89abcdef", "object": "text_completion", "created": 1764486000, "model": "tiny",
    "choices": [], "usage": {"prompt_tokens": 700, "total_tokens": 716, "completion_tokens": 16,
                             "prompt_tokens_details": {"cached_tokens": 700}}}, separators=(",", ":")).encode() + b"\n\n"


def per_call_ns(fn, n: int) -> float:
    best = min(timeit.repeat(fn, number=n, repeat=7))
    return best / n * 1e9


def main() -> None:
    trace = Trace("r", "/v1/completions", True)
    scan = SseScan(trace, time.perf_counter())
    check = UsageCheck(trace, 128, p_cached=0, drop=True)
    now = time.perf_counter()
    n = 200_000
    empty_ns = per_call_ns(lambda: check.flush(), n)  # a method call that does nothing: the harness
    scan_ns = per_call_ns(lambda: scan.feed(TOKEN, now), n)
    check_ns = per_call_ns(lambda: check.feed(TOKEN * 2), n)  # two events in one chunk: not the usual one
    watch_ns = per_call_ns(lambda: check.watches(TOKEN), n)  # the usual chunk: does it end its choice?

    def final() -> None:
        c = UsageCheck(trace, 128, p_cached=0, drop=False)
        c.feed(USAGE + b"data: [DONE]\n\n")

    final_ns = per_call_ns(final, 20_000)
    print(f"usual chunk, one token event ({len(TOKEN)} B): byte scan {scan_ns:.0f} ns, usage check 0 (not called),"
          f" the terminal-event check (drop: a client that did not ask for usage) {watch_ns:.0f} ns")
    print(f"two token events in one chunk: usage check {check_ns:.0f} ns on top of the scan")
    print(f"(a method call that does nothing, the harness: {empty_ns:.0f} ns)")
    print(f"final usage event + [DONE], once per request: {final_ns / 1000:.1f} us (JSON parse, record, edit)")


if __name__ == "__main__":
    main()
