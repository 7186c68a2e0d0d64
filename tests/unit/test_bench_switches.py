"""The bench's toll per TTFT switch (report.toll_split, report.switch_table, runners.SWITCH_ARMS),
over hand-made samples: no engines."""

from __future__ import annotations

import pytest

from pdtui.bench import report
from pdtui.bench.runners import ALL_ARMS, SWITCH_ARMS
from pdtui.bench.workload import Sample


def _follow(arm: str, ttft_ms: float, second_gap_ms: float, trace: dict) -> list[Sample]:
    out = []
    for i in range(3):
        t0 = 10.0 * i
        first = t0 + ttft_ms / 1000
        s = Sample(arm=arm, workload="follow", request_id=f"{arm}-{i}", prompt_tokens=100, max_tokens=8, t_send=t0,
                   ttft_ms=ttft_ms, chunk_t=[first, first + second_gap_ms / 1000, first + second_gap_ms / 1000 + 0.01],
                   t_end=first + 1, status=200, trace=dict(trace))
        s.itl_ms = report.gaps_ms(s)
        out.append(s)
    return out


def test_the_split_adds_up_to_the_client_ttft_and_first_token_moves_the_seam_to_the_second_gap():
    normal = {"prefill_ms": 25.0, "hop_ms": 0.5, "decode_ttft_ms": 19.0, "ttft_ms": 45.0}
    first = {"prefill_ms": 25.0, "hop_ms": 0.5, "decode_ttft_ms": 19.0, "ttft_ms": 25.8, "switch": "first_token"}
    (s,) = _follow("pair", 46.0, 10.0, normal)[:1]
    split = report.toll_split(s)
    assert sum(split[k] for k in report.SPLIT_KEYS) == pytest.approx(46.0)
    assert split["proxy_ms"] == pytest.approx(0.5) and split["client_ms"] == pytest.approx(1.0)
    (f,) = _follow("pair-first-token", 26.5, 20.0, first)[:1]
    split = report.toll_split(f)
    assert split["hop_ms"] == split["decode_ttft_ms"] == 0.0 and split["seam_ms"] == pytest.approx(19.5)
    assert sum(split[k] for k in report.SPLIT_KEYS) == pytest.approx(26.5)


def test_switch_table_gives_the_toll_per_arm_with_the_second_token_gap():
    single = _follow("single-proxied", 30.0, 10.0, {})
    for s in single:
        s.trace = None
    sums = {
        "single-proxied": report.summarize_arm(single, {}),
        "pair": report.summarize_arm(_follow("pair", 46.0, 10.0, {"prefill_ms": 25.0, "hop_ms": 0.5,
                                                                   "decode_ttft_ms": 19.0, "ttft_ms": 45.0}), {}),
        "pair-first-token": report.summarize_arm(_follow("pair-first-token", 27.0, 21.0, {
            "prefill_ms": 25.0, "hop_ms": 0.5, "decode_ttft_ms": 19.0, "ttft_ms": 26.0, "switch": "first_token"}), {}),
    }
    assert sums["pair-first-token"]["follow"]["second_gap_ms"]["p50"] == pytest.approx(21.0)
    assert sums["pair-first-token"]["follow"]["switches"] == {"first_token": 3}
    lines = report.switch_table(sums)
    row = next(x for x in lines if x.startswith("| pair-first-token |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "27.0" and cells[2] == "-10%"  # 27 / 30
    assert cells[8] == "27.0" and cells[9] == "21.0" and cells[10] == "19.5"  # sum, 2nd gap, seam
    assert next(x for x in lines if x.startswith("| pair |")).split("|")[3].strip() == "+53%"
    assert report.switch_table({"pair": sums["pair"]}) == []  # no switch arm: no table
    assert "toll per switch" in report.table(sums)


def test_every_switch_arm_is_a_bench_arm():
    assert set(SWITCH_ARMS) <= set(ALL_ARMS) and set(SWITCH_ARMS) <= set(report.PROXIED)
    assert all(set(v) <= {"tokenize_once", "first_token_from_p"} for v in SWITCH_ARMS.values())
