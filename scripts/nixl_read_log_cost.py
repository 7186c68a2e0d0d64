"""What measuring each KV read per request costs: inside D (pdtui.engine.nixl_quiet) and in pdtui.

A benchmark, not a test: nothing is asserted; it prints the figures (docs/freight.md keeps them).

    PYTHONPATH=. .venv/bin/python scripts/nixl_read_log_cost.py

Inside D, per engine step, vLLM's ``_pop_done_transfers`` polls the reads outstanding. This times
it on a worker of vLLM's own class (``NixlBaseConnectorWorker``, made without its __init__) whose
NIXL agent is a stand-in answering at once (``DONE``, a telemetry record), before and after
nixl_quiet wraps it, with its real ``NixlKVConnectorStats``, so the difference is the wrapper and
the log line only: a step with no read outstanding (most steps), a step that finds one request's
read done (once per request), and the line alone through vLLM's own logger, written to a pipe as
an engine's stdout is (a thread drains it, as pdtui's supervisor does). In pdtui: the log parser on
the line (``LogParser.feed``) and what the extra rule adds to every other line of the engine's log.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import timeit
import types

# the engine's stdout is a pipe to pdtui: vLLM's log handler writes to fd 1, so make fd 1 a pipe
# (drained by a thread) before vLLM configures its logging; the figures go to stderr
_read_end, _write_end = os.pipe()
os.dup2(_write_end, 1)
DRAINED = [0]


def _drain() -> None:
    while chunk := os.read(_read_end, 1 << 16):
        DRAINED[0] += len(chunk)


threading.Thread(target=_drain, daemon=True).start()

from vllm.logger import _configure_vllm_root_logger

_configure_vllm_root_logger()  # as an engine's entrypoint does: vLLM's format, INFO, to stdout
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import NixlKVConnectorStats

REAL_POP = base_worker.NixlBaseConnectorWorker._pop_done_transfers
from pdtui.core import logparse
from pdtui.engine import nixl_quiet  # wraps _pop_done_transfers on import

REQ = "cmpl-pdtui-0193c4a980604042-0-a39dd6a0"
TEL = types.SimpleNamespace(startTime=1_000_000, postDuration=210, xferDuration=1422, totalBytes=524288, descCount=2)


class Agent:
    """NIXL's agent as vLLM calls it in _pop_done_transfers: every read is done."""

    def check_xfer_state(self, handle):
        return "DONE"

    def get_xfer_telemetry(self, handle):
        return TEL

    def release_xfer_handle(self, handle):
        pass


def worker():
    w = object.__new__(base_worker.NixlBaseConnectorWorker)
    w.nixl_wrapper = Agent()
    w.xfer_stats = NixlKVConnectorStats()
    w._recving_transfers = {}
    w.tp_rank = 0
    return w


def per_call_us(fn, n: int) -> float:
    return min(timeit.repeat(fn, number=n, repeat=7)) / n * 1e6


def main() -> None:
    patched = base_worker.NixlBaseConnectorWorker._pop_done_transfers
    assert patched is not REAL_POP, "nixl_quiet did not wrap _pop_done_transfers (PDTUI_NIXL_READ_LOG=0?)"
    rows = []
    for name, pop in (("vLLM's", REAL_POP), ("with the read log", patched)):
        w = worker()

        def idle(w=w, pop=pop):
            pop(w, w._recving_transfers)

        def one_done(w=w, pop=pop):
            w._recving_transfers[REQ] = [object()]
            pop(w, w._recving_transfers)
            w.xfer_stats.reset()

        def setup_only(w=w):
            w._recving_transfers[REQ] = [object()]
            w._recving_transfers.clear()
            w.xfer_stats.reset()

        rows.append((name, per_call_us(idle, 200_000), per_call_us(one_done, 20_000) - per_call_us(setup_only, 20_000)))
    fmt = nixl_quiet.NIXL.read_log
    assert nixl_quiet.log.isEnabledFor(logging.INFO), "vLLM's logging is not configured: the line would not be written"
    before = DRAINED[0]
    log_us = per_call_us(lambda: nixl_quiet.log.info(fmt, REQ, 0, 1, 524288, 2, 1.422, 0.21), 20_000)
    sys.stdout.flush()
    line = ("(Worker pid=1418) INFO 12-07 01:35:39 [nixl_quiet.py:188] "
            + fmt % (REQ, 0, 1, 524288, 2, 1.422, 0.21))
    other = "(APIServer pid=762) INFO 12-07 01:35:42 [loggers.py:335] Engine 000: Avg prompt throughput: 0.0 tokens/s"
    parser = logparse.LogParser()
    parse_us = per_call_us(lambda: parser.feed(line), 50_000)
    other_us = per_call_us(lambda: parser.feed(other), 50_000)
    rules = logparse._RULES
    logparse._RULES = [r for r in rules if r[0] != "kv_read"]
    other_without_us = per_call_us(lambda: parser.feed(other), 50_000)
    logparse._RULES = rules
    out = sys.stderr
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores", file=out)
    print("inside D, _pop_done_transfers per engine step (us):", file=out)
    for name, idle_us, done_us in rows:
        print(f"  {name:<18} no read outstanding {idle_us:6.3f}   one request's read done {done_us:6.2f}", file=out)
    print(f"  the line alone (vLLM's logger, to a pipe): {log_us:.2f} us, {len(line) + 1} bytes"
          f" ({DRAINED[0] - before:,} bytes drained)", file=out)
    print("in pdtui, LogParser.feed per line (us):", file=out)
    print(f"  the KV read line {parse_us:.2f}; another line {other_us:.2f} (without the kv_read rule"
          f" {other_without_us:.2f})", file=out)


if __name__ == "__main__":
    main()
