"""Pilot: the panes per connector (issue 25), from the engines' own words captured on the CPU pair
(results/2026-12-07-zoo): a storage pair shows its registration, no handshake to wait for, D's load,
and says it has no per-request figure; a push pair shows P's measured write."""

from __future__ import annotations

import dataclasses

import pytest

from pdtui.app.app import make_app
from pdtui.core import logparse
from pdtui.core.connectors import NIXL
from pdtui.core.events import ConnectorEvent, MetricsSampled
from tests.functional.fake_runtime import T0, FakeRuntime, request, started, state
from tests.functional.test_dashboard import screen_text

pytestmark = pytest.mark.anyio
EXT = 'vllm:prompt_tokens_by_source{source="external_kv_transfer"}'


def said(instance: str, line: str, t: float) -> ConnectorEvent:
    p = logparse.parse_line(line)
    assert p is not None, line
    return ConnectorEvent(instance=instance, what=p.what, text=p.text, fields=p.fields, t=t)


def up(fake: FakeRuntime, connector: str, *events) -> None:
    fake.emit(dataclasses.replace(started(), connector=connector), state("P", "starting", T0 + 1, pid=11),
              state("D", "starting", T0 + 2, pid=12), *events[:2],
              state("P", "ready", T0 + 61, pid=11, elapsed_s=60.0), state("D", "ready", T0 + 62, pid=12, elapsed_s=60.0),
              *events[2:])


async def settle(pilot) -> None:
    for _ in range(6):
        await pilot.pause(0.05)


async def test_a_storage_pair_shows_registration_the_load_and_no_per_request_figure() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=lambda: T0 + 100)
    reg = "(EngineCore pid=9418) INFO 12-07 13:53:41 [example_connector.py:108] Shared storage path is /tmp/kv"
    load = ("(Worker pid=9505) INFO 12-07 13:53:50 [example_connector.py:171] Inject KV cache of 640 tokens to the"
            " paged memory")
    async with app.run_test(size=(160, 48)) as pilot:
        up(fake, "storage", said("P", reg, T0 + 50), said("D", reg, T0 + 50), said("D", load, T0 + 70),
           MetricsSampled(instance="D", t=T0 + 71, values={EXT: 640.0}), request("pdtui-s1", T0 + 71))
        await settle(pilot)
        text = screen_text(app)
    assert "reg✓ hs n/a load✓" in text  # D: registered, nothing to handshake, the KV loaded from the folder
    assert "reg✓ hs n/a" in text.replace("reg✓ hs n/a load✓", "")  # P
    assert "freight: no per-request figure  loaded 640 tok" in text
    assert "xfer" not in text  # no NIXL figures, and no zero standing for them


async def test_a_push_pair_shows_ps_measured_write() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=lambda: T0 + 100)
    write = ("(Worker pid=8178) INFO 12-07 13:52:15 [nixl_quiet.py:201] pdtui: KV write req=cmpl-pdtui-w1-0-8366be76"
             " rank=0 handles=1 bytes=786432 descs=2 xfer_ms=0.202 post_ms=0.202")
    async with app.run_test(size=(160, 48)) as pilot:
        up(fake, "nixl-push",
           ConnectorEvent(instance="P", what="registered", text="Registering KV_Caches. use_mla: False", t=T0 + 50),
           ConnectorEvent(instance="D", what="registered", text="Registering KV_Caches. use_mla: False", t=T0 + 50),
           said("P", write, T0 + 70), request("pdtui-w1", T0 + 70.5),
           MetricsSampled(instance="P", t=T0 + 71, values={NIXL.bytes_metric + "_sum": 786432.0}))
        await settle(pilot)
        text = screen_text(app)
        detail = app.snapshot.kv_reads["pdtui-w1"]
    assert detail.op == "write" and detail.bytes == 786432
    assert "pushed 0.75 MiB" in text and "xfer p50/p99 0.20/0.20ms" in text
