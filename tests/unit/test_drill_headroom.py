"""The headroom drill's verdict (pdtui.app.drill_headroom.checks), from traces made by hand: what
the choice by headroom gives, and what round-robin gives on the same fill. No engine, no app."""

from __future__ import annotations

from pdtui.app.drill import DrillResult
from pdtui.app.drill_headroom import Stream, checks, need_blocks
from pdtui.core.events import RequestTraced

HEADROOM = "headroom: D2 1900-96=1804 >= 16 needed, 6 in flight; D1 15-0=15 < 16"


def traced(rid: str, decode: str, outcome: str = "pair", reason: str = HEADROOM) -> RequestTraced:
    return RequestTraced(request_id=rid, endpoint="/v1/completions", stream=True, outcome=outcome,
                         status=200 if outcome == "pair" else 502, prefill="P", decode=decode, decode_reason=reason,
                         error=None if outcome == "pair" else "decode D1 broke the stream")


def streams(fills: int, probes: int) -> list[Stream]:
    return [Stream(f"f{i}", "fill") for i in range(fills)] + [Stream(f"p{i}", "probe") for i in range(probes)]


def test_a_stream_needs_its_prompt_and_its_tokens_in_blocks():
    assert need_blocks(1000, 1000, 128) == 16 and need_blocks(1000, 1048, 128) == 16 and need_blocks(1, 1, 128) == 1


def test_headroom_every_probe_elsewhere_nothing_failed_nothing_preempted():
    s = streams(14, 4)
    traces = {f"f{i}": traced(f"f{i}", "D1" if i % 2 == 0 else "D2") for i in range(14)}
    traces |= {f"p{i}": traced(f"p{i}", "D2") for i in range(4)}
    got = checks("D1", s, traces, preempted=0, need=16)
    assert all(c.held for c in got), got
    assert [c.observed for c in got] == ["18 of 18 paired", "D2 4", "D1 7, D2 7", "+0", HEADROOM]
    table = DrillResult(checks=got).table()
    assert "ok   the 4 streams sent once D1 was full go elsewhere, or to it only with room counted again" in table
    assert "NOT" not in table


def test_round_robin_sends_probes_to_the_full_d_which_preempts_and_fails_one():
    s = streams(14, 4)
    traces = {f"f{i}": traced(f"f{i}", "D1" if i % 2 == 0 else "D2", reason="round-robin: D1 in turn")
              for i in range(14)}
    traces |= {f"p{i}": traced(f"p{i}", "D1" if i % 2 == 0 else "D2", reason="round-robin: D1 in turn",
                               outcome="error" if i == 2 else "pair") for i in range(4)}
    got = {c.expected: c for c in checks("D1", s, traces, preempted=6, need=16)}
    bad = [e for e, c in got.items() if not c.held]
    assert len(bad) == 4, got
    probes = got["the 4 streams sent once D1 was full go elsewhere, or to it only with room counted again"]
    assert probes.observed == ("D1 2, D2 2; on D1: without room (round-robin: D1 in turn);"
                               " without room (round-robin: D1 in turn)")
    assert got["D1 preempts nothing (vllm:num_preemptions)"].observed == "+6"
    assert "p2 error 502: decode D1 broke the stream" in got["every stream answered in full (outcome pair, no error)"].observed
    assert "NOT" in DrillResult(checks=list(got.values())).table()


def test_a_missing_trace_or_an_unknown_preemption_count_does_not_pass():
    s = streams(2, 1)
    got = checks("D1", s, {"f0": traced("f0", "D1")}, preempted=None)
    assert not got[0].held and "no trace of 2" in got[0].observed
    assert not got[1].held and got[1].observed == "none traced"
    assert got[3].observed == "not reported" and not got[3].held


def test_a_probe_on_the_target_is_fine_only_when_the_proxy_counted_room_there_again():
    """Streams on the full D end and free room while the probes go out: a probe the proxy sent
    there with room counted passes, with its figures; one whose counted room was short does not."""
    s = streams(2, 2)
    again = "headroom: D1 49-20=29 >= 16 needed, 5 in flight; D2 1802-128=1674, 19 in flight"
    traces = {"f0": traced("f0", "D1"), "f1": traced("f1", "D2"), "p0": traced("p0", "D1", reason=again),
              "p1": traced("p1", "D2")}
    got = checks("D1", s, traces, preempted=0, need=16)[1]
    assert got.held and got.observed == "D1 1, D2 1; on D1: room again (29 >= 16)", got
    short = "headroom: none has 16 free; D1 the most, 20-5=15"
    traces["p0"] = traced("p0", "D1", reason=short)
    got = checks("D1", s, traces, preempted=0, need=16)[1]
    assert not got.held and "without room (headroom: none has 16 free" in got.observed, got
