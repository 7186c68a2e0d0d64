"""The transport warning trusts UCX's own table over a throughput guess (on two H200s NIXL's
average read 496 MB/s while UCX's table said zero-copy cuda_ipc)."""

from __future__ import annotations

from pdtui.core import config as config_mod
from pdtui.core import topology
from pdtui.core.events import ConnectorEvent, Notice
from pdtui.core.runtime import Runtime


def _runtime() -> tuple[Runtime, list]:
    cfg = config_mod.load_profile("cpu")
    rt = Runtime(topology.pair(cfg))
    rt.cfg.device = "cuda"  # the inference only applies to GPUs
    seen: list = []
    rt.hub.publish = seen.append  # type: ignore[method-assign]
    return rt, seen


def _metrics(mbps: float) -> ConnectorEvent:
    return ConnectorEvent(instance="D", what="kv_metrics", text="KV Transfer metrics", fields={"Throughput (MB/s)": mbps})


def _warnings(seen: list) -> list[str]:
    return [e.text for e in seen if isinstance(e, Notice) and e.level == "warning"]


def test_a_slow_average_without_a_table_warns_of_tcp():
    rt, seen = _runtime()
    rt.emit(_metrics(496.0))
    assert any("TCP loopback" in w for w in _warnings(seen))


def test_ucx_table_saying_cuda_ipc_wins_over_a_slow_average():
    rt, seen = _runtime()
    rt.emit(ConnectorEvent(instance="D", what="kv_read_transport", text="GPU KV read (intra-node): zero-copy over cuda_ipc/cuda",
                           fields={"scope": "intra-node", "method": "zero-copy", "transport": "cuda_ipc/cuda",
                                   "over_tcp": False, "cuda_ipc": True}))
    rt.emit(_metrics(496.0))
    assert _warnings(seen) == []


def test_ucx_table_saying_tcp_warns_once():
    rt, seen = _runtime()
    ev = ConnectorEvent(instance="D", what="kv_read_transport", text="GPU KV read (intra-node): over tcp/lo",
                        fields={"scope": "intra-node", "method": "software emulation", "transport": "tcp/lo",
                                "over_tcp": True, "cuda_ipc": False})
    rt.emit(ev)
    rt.emit(ev)
    rt.emit(_metrics(300.0))
    assert len(_warnings(seen)) == 1 and "tcp/lo" in _warnings(seen)[0]
