"""`pdtui bench --arms pair@KEY,...`: the pair over each connector, one transport table (issue 25)."""

import pytest

from pdtui.bench import report, runners
from pdtui.core import config, connectors
from pdtui.core.connectors import NIXL


def test_a_pair_arm_over_a_connector_is_the_pair_with_that_connector():
    cfg = config.load_profile("cpu")
    for key in connectors.CONNECTORS:
        topo = runners.arm_topology(f"pair@{key}", cfg)
        assert topo.name == f"pair@{key}" and topo.connector is connectors.CONNECTORS[key]
        assert topo.cfg.connector == key and topo.cfg.sources["connector"] == f"--arms pair@{key}"
    assert cfg.connector == "NixlConnector"  # the profile's own config is left alone
    topo = runners.arm_topology("pair-first-token@storage", cfg)
    assert topo.proxy is not None and topo.proxy.settings.first_token_from_p and topo.connector is connectors.STORAGE


@pytest.mark.parametrize("arm,why", [("pair@nope", "unknown connector 'nope'"), ("single@storage", "only a pair arm"),
                                     ("pear@nixl", "unknown arm"), ("pair@multi", None), ("pair-headroom@nixl-push", None)])
def test_arm_names_are_checked(arm, why):
    got = runners.arm_problem(arm)
    assert (got is None) if why is None else (why in (got or ""))


def test_over_engines_given_by_url_the_connector_is_theirs():
    why = runners.attached_refusal("pair@storage", pair=True, single=True)
    assert why is not None and "the connector is the one they run" in why


def test_the_freight_is_counted_where_each_connector_counts_it():
    b = NIXL.bytes_metric + "_sum"
    roles = {"P": "prefill", "D": "decode"}
    scrapes = {"P": {b: 100.0}, "D": {b: 786432.0, runners.EXTERNAL_TOKENS: 640.0}}
    assert runners.freight_count(connectors.NIXL, scrapes, roles, 1024) == 786432.0  # D pulled
    assert runners.freight_count(connectors.NIXL_PUSH, scrapes, roles, 1024) == 100.0  # P wrote
    assert runners.freight_count(connectors.MULTI, scrapes, roles, 1024) == 786432.0  # its NIXL child
    assert runners.freight_count(connectors.STORAGE, scrapes, roles, 1024) == 640 * 1024  # D's loaded tokens
    assert runners.freight_count(connectors.STORAGE, {"D": {}}, roles, 1024) is None


def test_the_storage_formula_is_its_own_in_the_bytes_check():
    from pdtui.core import kvmath

    traces = [{"outcome": "pair", "kv_bytes": 5 * 128 * 1024, "prompt_tokens": 700}]
    got = report.bytes_check(traces, 0.0, 640.0 * 1024, 1024, 128, blocks_of=lambda n: kvmath.stored_blocks(n, 128))
    assert got["match"] and got["formula_ok"]
    assert not report.bytes_check(traces, 0.0, 655360.0, 1024, 128)["formula_ok"]  # pull's ceil would want 6 blocks


def _summary(ttft: float, itl99: float, freight: float | None = None, read_ms: float | None = None,
             computed: int = 0) -> dict:
    out = {"follow": {"ttft_ms": {"p50": ttft}}, "interference": {"stream_itl_ms": {"p99": itl99}},
           "recompute": {"checked": 3, "recomputed": 0, "d_computed_tokens": computed}}
    if freight is not None:
        out["freight_bytes"] = {"p50": freight, "mean": freight}
    if read_ms is not None:
        out["kv_read"] = {"ms": {"p50": read_ms}}
    return out


def test_the_transport_table_puts_the_connectors_side_by_side():
    summaries = {"single-proxied": _summary(100.0, 40.0), "pair@nixl": _summary(130.0, 20.0, 786432.0, 0.25),
                 "pair@storage": _summary(120.0, 20.0, 655360.0, computed=180)}
    summaries["pair@storage"]["connector"] = "storage"
    lines = report.transport_table(summaries)
    text = "\n".join(lines)
    assert "| pair@nixl | nixl | 130.0 | 1.30x | 20.0 | 2.00x | 0.75 / 0.75 MiB | 0.25 | 0 tok in 3 |" in text
    assert "| pair@storage | storage | 120.0 | 1.20x | 20.0 | 2.00x | 0.62 / 0.62 MiB | none per request | 180 tok in 3 |" in text
    assert report.transport_table({"pair": _summary(1.0, 1.0)}) == []  # no pair@ arm: no table
    assert report.proxied("pair@multi") and not report.proxied("single")


def test_the_kill_p_drill_expects_each_connectors_own_outcome():
    from pdtui.app import drill_transport as dt
    from pdtui.core import sse_client

    clean = sse_client.SseStream(status=200, done=True)
    hung = sse_client.SseStream()

    class T:
        d_computed_tokens = 2

    push = dt.checks(connectors.NIXL_PUSH, "recompute", hung, True, None, 642, 128, None, 1.0)
    assert all(c.held for c in push) and "D waits for P's write" in push[0].expected
    assert not dt.checks(connectors.NIXL_PUSH, "recompute", clean, False, None, 642, 128, None, 0.0)[0].held
    for conn in (connectors.STORAGE, connectors.MULTI):
        got = dt.checks(conn, "recompute", clean, False, T(), 642, 128, 640.0, None)
        assert all(c.held for c in got) and "stored copy" in got[0].expected, got
        assert not dt.checks(conn, "recompute", clean, False, T(), 642, 128, 0.0, None)[1].held  # loaded nothing

    class All:
        d_computed_tokens = 642

    assert dt.checks(connectors.NIXL, "recompute", clean, False, All(), 642, 128, 0.0, None)[0].held
    assert "recomputes the whole prompt" in dt.expected(connectors.NIXL, "recompute")
    assert dt.expected(connectors.NIXL, "fail").startswith("an error")
    assert dt.expected(connectors.MULTI, "fail").startswith("an error")  # the pull's failure ends it
    assert dt.expected(connectors.STORAGE, "fail").startswith("200")  # nothing to fail: the folder has it
