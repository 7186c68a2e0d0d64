"""`pdtui bench --links` (issue 26): the pair arm once per link (pair~LINK), the link table (the KV
read against bytes / rate + RTT, toll and purchase per link, the 8B what-if, computed), the
break-even line and the plot, on synthetic arms (no engine)."""

from __future__ import annotations

import argparse
import json

import pytest

from pdtui.bench import command, report, runners
from pdtui.core import config, link
from pdtui.core.config import ConfigError
from tests.unit.test_bench_report import CLEAN, _arm

MiB3 = 3 * 2**20  # a 3,072-token prompt of the tiny model: 24 blocks x 128 x 1 KiB


def _linked(name: str, ttft: float, stall_s: float, read_ms: float | None, nbytes: int = MiB3):
    trace = {"kv_read": {"ms": read_ms, "bytes": nbytes, "gbps": nbytes / (read_ms / 1e3) / 1e9}} if read_ms else None
    samples, windows = _arm(name, ttft=ttft, gap_s=0.01, stall_s=stall_s, trace=trace, **CLEAN)
    return report.summarize_arm(samples, windows)


def _sums():
    return {
        "single-proxied": _linked("single-proxied", 100.0, 0.30, None),
        "pair~loopback": _linked("pair~loopback", 120.0, 0.02, 1.5),
        "pair~10gbit": _linked("pair~10gbit", 125.0, 0.02, 3.1),
        "pair~1gbit": _linked("pair~1gbit", 148.0, 0.03, 26.4),
        "pair~rate=200mbit": _linked("pair~rate=200mbit", 250.0, 0.30, 130.0),
    }


def test_each_link_row_prices_the_read_against_the_formula_and_the_pair_against_single():
    rows = report.link_rows(_sums())
    assert [r["link"] for r in rows] == ["loopback", "10gbit", "1gbit", "rate=200mbit"]
    one = rows[2]
    formula = MiB3 * 8 / 1e9 * 1e3  # 25.17 ms
    assert one["formula_ms"] == pytest.approx(formula)
    assert one["read_vs_formula"] == pytest.approx(26.4 / formula)
    assert one["gbit_s"] == pytest.approx(MiB3 * 8 / 0.0264 / 1e9)
    assert one["toll"] == pytest.approx(148.0 / 100.0)  # the follow p50s (both x1.1)
    assert one["compares"] == {"toll": "single-proxied", "purchase": "single-proxied"}
    assert one["what_if_8b_ms"] == pytest.approx(256 * 2**20 * 8 / 1e9 * 1e3)  # 2,147 ms: computed
    assert rows[0]["formula_ms"] is None and rows[0]["what_if_8b_ms"] is None  # loopback: no rate
    assert [r["pays"] for r in rows] == [True, True, True, False]


def test_the_table_and_the_break_even_say_it_plainly():
    sums = _sums()
    text = report.table(sums)
    assert "the pair per link (follow prompt alone" in text and "the 8B column is computed, not measured" in text
    assert "| 1 Gbit/s | 26.4 | 25.2 | 1.05x | 0.953 | 162.8 | 1.48x |" in text
    assert "| loopback | 1.50 | - | - |" in text
    assert ("break-even: for this workload the pair stops paying below 1 Gbit/s (there: purchase" in text
            and "at 200 Mbit/s: purchase" in text)
    assert "toll and purchase: per link, in the link table above" in text  # no plain pair arm
    be = report.break_even(report.link_rows(sums))
    assert be["measured"] == {"pays_at": 1e9, "stops_at": 200e6}
    # computed from 10gbit's figures: the TTFT the purchase covers, less the TTFT with no transfer
    top = report.link_rows(sums)[1]
    single = top["ttft_ms"] / top["toll"]
    room = top["purchase"] * single - (top["ttft_ms"] - top["read_ms"])
    assert be["computed_gbit_s"] == pytest.approx(MiB3 * 8 / (room / 1e3) / 1e9)
    assert any(x.startswith("computed (the formula, not measured)") for x in be["text"])


def test_a_pair_that_pays_everywhere_and_one_that_never_does():
    sums = _sums()
    del sums["pair~rate=200mbit"]
    assert "pays at every rate measured, down to 1 Gbit/s" in "\n".join(report.link_table(sums))
    never = {"single-proxied": _linked("single-proxied", 100.0, 0.02, None),
             "pair~1gbit": _linked("pair~1gbit", 300.0, 0.3, 26.4)}
    text = "\n".join(report.link_table(never))
    assert "does not pay at any rate measured" in text
    assert "computed: the pair would not pay at any rate" in text


def test_the_json_keeps_the_link_rows_and_the_plot_is_drawn(tmp_path):
    sums = _sums()
    rows = report.link_rows(sums)
    path = report.link_plot(rows, tmp_path, __import__("matplotlib.pyplot").pyplot)
    assert path.name == "links.png" and path.stat().st_size > 5000
    json.dumps({"rows": rows, "break_even": report.break_even(rows)})  # JSON-able


def _args(**kw):
    base = {"arms": None, "links": None, "quick": True, "workloads": "follow,interference", "requests": None,
            "prompt_len": 2031, "max_tokens": None, "streams": None, "duration": None, "rate": None,
            "stream_max_tokens": None, "big_max_tokens": 16, "warmup_s": 2.0, "fill_requests": 1,
            "fill_prompt_len": 100, "fill_max_tokens": 10, "fill_interval": 1.0, "seed": 0, "cross_check": False}
    return argparse.Namespace(**{**base, **kw})


def test_links_replace_the_pair_arm_once_per_link_in_place():
    opts = command.options_from_args(_args(links="loopback,100gbit,rate=2.5gbit;rtt=1ms,1gbit"))
    assert opts.arms == ("single", "single-proxied", "pair~loopback", "pair~100gbit", "pair~rate=2.5gbit,rtt=1ms",
                         "pair~1gbit")
    assert command.options_from_args(_args(arms="single", links="1gbit")).arms == ("single", "pair~1gbit")
    with pytest.raises(ConfigError, match="--links: link 'fast'"):
        command.options_from_args(_args(links="1gbit,fast"))
    with pytest.raises(ConfigError, match="a link given twice"):
        command.options_from_args(_args(links="1gbit,1GBIT"))
    assert runners.attached_refusal("pair~1gbit", pair=True, single=True).startswith("the pair~1gbit arm runs")


def test_a_link_arm_is_the_pair_over_that_link(tmp_path, monkeypatch):
    monkeypatch.setenv("PDTUI_HOME", str(tmp_path))
    cfg = config.load_profile("cpu")
    topo = runners.arm_topology("pair~1gbit", cfg)
    try:
        assert topo.name == "pair~1gbit" and topo.link is not None and topo.link.spec.rate_bps == 1e9
        assert topo.members[0].launch.argv[:4] == ["ip", "netns", "exec", topo.link.prefill.netns]
        assert cfg.link == "loopback"  # the profile's config is not changed
    finally:
        link.release(topo.link)
    plain = runners.arm_topology("pair~loopback", cfg)
    assert plain.link is None and plain.members[0].launch.argv[0] != "ip"


def test_links_that_cannot_carry_the_pair_are_refused_before_anything_starts():
    cfg = config.load_profile("1p2d")
    with pytest.raises(ConfigError, match="joins one P and one D"):
        command.check_links(cfg, ("loopback", "1gbit"))
    command.check_links(cfg, ("loopback",))  # no link made: nothing to refuse


def test_bunched_chunks_fall_back_to_the_purchase_by_delivery_as_the_verdict_does():
    from tests.unit.test_bench_report import _bunched, _synthetic_arm

    sums = {"single-proxied": _synthetic_arm("single-proxied", _bunched(0.040, 1600, 8)),
            "pair~1gbit": _synthetic_arm("pair~1gbit", _bunched(0.010, 1600, 8), follow_ttft=150.0)}
    row = report.link_rows(sums)[0]
    assert row["purchase_by"] == "delivery" and row["purchase"] == pytest.approx(4.0, rel=0.01)
    assert row["toll"] == pytest.approx(1.5) and row["pays"] is True
    text = "\n".join(report.link_table(sums))
    assert "| 4.00x (deliveries) | yes |" in text and "purchase (deliveries): per token" in text
