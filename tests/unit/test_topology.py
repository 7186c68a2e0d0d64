"""Topology: each bench arm and the pair are built from the one config, typed and immutable."""

from __future__ import annotations

import dataclasses

import pytest

from pdtui.bench.runners import ALL_ARMS, SWITCH_ARMS, arm_topology
from pdtui.core import config as config_mod
from pdtui.core import topology


@pytest.fixture(scope="module")
def cfg() -> config_mod.PairConfig:
    return config_mod.load_profile("cpu")


def test_the_pair_is_its_members_behind_the_proxy_with_the_config_switches(cfg) -> None:
    t = topology.pair(cfg)
    assert [(m.name, m.role) for m in t.members] == [("P", "prefill"), ("D", "decode")]
    assert all(m.launch is not None and m.url == m.launch.url for m in t.members)
    assert t.proxy is not None and t.proxy.prefills == ("P",) and t.proxy.decodes == ("D",)
    assert t.url == cfg.proxy_url and t.warmup and t.connector is not None
    assert t.proxy.settings.block_size == cfg.block_size and t.proxy.settings.decode_reports_cached
    assert t.geometry is not None and t.proxy.settings.geometry == t.geometry
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.name = "other"  # type: ignore[misc]


def test_every_bench_arm_is_a_topology(cfg) -> None:
    arms = {name: arm_topology(name, cfg) for name in ALL_ARMS}
    single, proxied, two = arms["single"], arms["single-proxied"], arms["two-single"]
    assert single.proxy is None and single.url == single.members[0].url and single.members[0].role == "single"
    assert proxied.proxy is not None and proxied.proxy.prefills == () and proxied.proxy.decodes == ("S",)
    assert proxied.proxy.settings.decode_choice == "round-robin" and not proxied.warmup
    assert [m.port for m in two.members] == [cfg.prefills[0].port, cfg.decodes[0].port]
    for name, switches in SWITCH_ARMS.items():
        t = arms[name]
        assert t.name == name and all(getattr(t.proxy.settings, k) == v for k, v in switches.items())
    with pytest.raises(ValueError, match="unknown arm"):
        arm_topology("three-single", cfg)
    assert "P (prefill)" in arms["pair"].describe() and "behind the proxy" in arms["pair"].describe()
