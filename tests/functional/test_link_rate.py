"""The link's nominal rate beside D's achieved KV read (issue 22): NVML's answers about the two GPUs
(a FAKE NVML module here, as tests/functional/test_gpus.py uses: NVLink through NVSwitch, NVLink
bridged, PCIe), the CPU pair's loopback, and unknown, saying why, everywhere else. Never a guess."""

from __future__ import annotations

import dataclasses
import sys
import types
from dataclasses import dataclass
from typing import Any

import pytest

from pdtui.app import gpu
from pdtui.app.app import make_app
from pdtui.app.widgets import RequestDetail
from pdtui.core.events import LinkShaped, RuntimeStarted
from tests.functional.fake_runtime import T0, FakeRuntime, kv_read, request, started, state
from tests.functional.test_dashboard import clock, pair_up, screen_text, settle

pytestmark = pytest.mark.anyio


@dataclass
class _Mem:
    used: int
    total: int


@dataclass
class _V:
    uiVal: int = 0
    ullVal: int = 0


@dataclass
class _Field:
    nvmlReturn: int
    value: _V


@dataclass
class _Pci:
    busId: bytes


def fake_link_nvml(topology: str, gpus: int = 2, names: tuple[str, ...] = (), speed_mbps: int = 26562,
                   pcie: tuple[tuple[int, int], ...] = ((5, 16), (4, 16))) -> types.ModuleType:
    """A FAKE pynvml with what the GPU line and the link probe call. ``topology``: ``nvswitch``
    (18 NVLinks per GPU, each to an NVSwitch: an HGX H100/H200), ``bridge`` (4 NVLinks from GPU 0
    straight to GPU 1, none elsewhere) or ``pcie`` (no NVLink P2P; ``pcie``: each GPU's max
    generation and width). ``names``: each GPU's model (default all H200)."""
    m = types.ModuleType(f"fake_link_nvml_{topology}")

    class NVMLError(Exception):
        pass

    names = names or ("NVIDIA H200",) * gpus
    bus = [f"00000000:{0x18 + 0x10 * i:02X}:00.0".encode() for i in range(gpus)]
    m.NVMLError = NVMLError
    m.NVML_PCIE_UTIL_TX_BYTES, m.NVML_PCIE_UTIL_RX_BYTES = 0, 1
    m.NVML_P2P_CAPS_INDEX_NVLINK = 2
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetCount = lambda: gpus
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetIndex = lambda h: h
    m.nvmlDeviceGetHandleByUUID = lambda u: int(u.removeprefix("GPU-fake-"))
    m.nvmlDeviceGetName = lambda h: names[h].encode()
    m.nvmlDeviceGetMemoryInfo = lambda h: _Mem(used=40 * 2**30, total=140 * 2**30)
    m.nvmlDeviceGetPcieThroughput = lambda h, which: 0
    m.nvmlDeviceGetPciInfo = lambda h: _Pci(bus[h])

    def fields(h: int, ids: list[Any]) -> list[_Field]:
        if all(isinstance(i, tuple) for i in ids):  # the GPU line's NVLink traffic counters
            return [_Field(0, _V(ullVal=0)) for _ in ids]
        assert ids == [gpu.NVLINK_SPEED_COMMON], ids
        if topology == "pcie":
            return [_Field(3, _V())]  # NVML_ERROR_NOT_SUPPORTED
        return [_Field(0, _V(uiVal=speed_mbps))]

    def links(h: int) -> int:
        return 18 if topology == "nvswitch" else 4 if topology == "bridge" and h in (0, 1) else 0

    def state(h: int, link: int) -> int:
        if link >= 18:
            raise NVMLError("Invalid Argument")
        return 1 if link < links(h) else 0

    def remote(h: int, link: int) -> _Pci:
        if topology == "bridge":
            return _Pci(bus[1 - h])
        return _Pci(b"00000000:C5:00.0")  # an NVSwitch's

    def p2p(a: int, b: int, which: int) -> int:
        assert which == 2
        ok = topology == "nvswitch" or (topology == "bridge" and {a, b} == {0, 1})
        return 0 if ok else 4  # NVML_P2P_STATUS_NOT_SUPPORTED

    m.nvmlDeviceGetFieldValues = fields
    m.nvmlDeviceGetNvLinkState = state
    m.nvmlDeviceGetNvLinkRemotePciInfo = remote
    m.nvmlDeviceGetNvLinkRemoteDeviceType = lambda h, link: 2 if topology == "nvswitch" else 0  # NVSwitch, GPU
    m.nvmlDeviceGetP2PStatus = p2p
    m.nvmlDeviceGetMaxPcieLinkGeneration = lambda h: pcie[h % len(pcie)][0]
    m.nvmlDeviceGetMaxPcieLinkWidth = lambda h: pcie[h % len(pcie)][1]
    return m


def test_nvlink_through_nvswitch_bridged_and_pcie() -> None:
    hgx = gpu.LinkProbe(fake_link_nvml("nvswitch")).pair(["0"], ["1"], None)
    assert hgx.how == "NVLink 18 links x 26.6 GB/s through NVSwitch (NVML)"
    assert hgx.bytes_per_s == 18 * 26562e6 and f"{hgx.gbps:.1f}" == "478.1"
    bridge = gpu.LinkProbe(fake_link_nvml("bridge", gpus=4)).pair(["1"], ["0"], None)
    assert bridge == gpu.LinkRate(4 * 26562e6, "NVLink 4 links x 26.6 GB/s (NVML)")
    pcie = gpu.LinkProbe(fake_link_nvml("bridge", gpus=4)).pair(["0"], ["3"], None)  # no bridge there
    assert pcie.how == "PCIe Gen4 x16, the narrower of the two GPUs' links (NVML)"
    assert f"{pcie.gbps:.2f}" == "31.51"  # 16 GT/s x 128/130 / 8 x 16 lanes
    gen5 = gpu.LinkProbe(fake_link_nvml("pcie", pcie=((5, 16),))).pair(["0"], ["1"], None)
    assert f"{gen5.gbps:.2f}" == "63.02" and gen5.how.startswith("PCIe Gen5 x16")


def test_ranks_uuids_and_what_stays_unknown() -> None:
    probe = gpu.LinkProbe(fake_link_nvml("nvswitch", gpus=4))
    tp2 = probe.pair(gpu.cuda_devices("0,1,7", 2), gpu.cuda_devices("2,3", 2), None)
    assert tp2.how == "2 rank pairs x NVLink 18 links x 26.6 GB/s through NVSwitch (NVML)"
    assert tp2.bytes_per_s == 2 * 18 * 26562e6
    assert probe.pair(["GPU-fake-0"], ["GPU-fake-3"], None).bytes_per_s == 18 * 26562e6
    same = probe.pair(["1"], ["1"], None)
    assert same.bytes_per_s is None and same.how.startswith("same GPU (1): no link")
    assert probe.pair(["MIG-1234"], ["1"], None).how == "link rate unknown: MIG-1234 is a MIG instance"
    assert probe.pair(["0"], ["9"], None).how == "link rate unknown: no GPU 9 here (4 GPUs)"
    assert probe.pair(["0"], ["1", "2"], None).how == "link rate unknown: P and D do not use as many GPUs"
    assert gpu.cuda_devices(None, 2) == ["0", "1"] and gpu.cuda_devices(" 3, 1", 1) == ["3"]
    # unlike GPUs: CUDA's default order (fastest first) need not be NVML's (PCI bus) unless pinned
    mixed = gpu.LinkProbe(fake_link_nvml("nvswitch", names=("NVIDIA H100 80GB HBM3", "NVIDIA H200")))
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in mixed.pair(["0"], ["1"], None).how
    assert mixed.pair(["0"], ["1"], "PCI_BUS_ID").bytes_per_s == 18 * 26562e6


def _started_cuda(p_env: dict[str, str], d_env: dict[str, str]) -> RuntimeStarted:
    argv = ["vllm", "serve", "m", "--tensor-parallel-size", "1"]
    return RuntimeStarted(
        profile="two-gpu", model="qwen2.5-0.5b", model_shape="qwen2.5-0.5b", connector="NixlConnector",
        device="cuda", proxy_url="http://127.0.0.1:9000", vllm_version="0.32.0", kv_bytes_per_token=12288,
        block_size=16, kv_load_failure_policy="fail",
        instances=[{"name": "P", "role": "prefill", "url": "http://127.0.0.1:9100", "argv": argv, "env": p_env},
                   {"name": "D", "role": "decode", "url": "http://127.0.0.1:9200", "argv": argv, "env": d_env}], t=T0)


def _read_line(app: Any) -> str:
    text = app.query_one(RequestDetail).read_text()
    assert text is not None
    return text.plain


@pytest.mark.parametrize("nvml", ["fake_link_nvml", None], ids=["fake-nvml", "no-nvml"])
async def test_the_kv_read_line_shows_the_link_beside_the_achieved_rate(nvml: str | None,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU pair (P on GPU 0, D on GPU 1 of a fake HGX H200): the detail's KV read line says the
    achieved GB/s of the link's 478.12 GB/s and how that was found; without NVML, why it is not
    known. 80x24's compact line: achieved of the link's."""
    monkeypatch.setitem(sys.modules, "fake_link_nvml", fake_link_nvml("nvswitch"))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    app.nvml_module = nvml or "pynvml"
    async with app.run_test(size=(160, 48)) as pilot:
        fake.emit(_started_cuda({"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}),
                  state("P", "ready", T0 + 61, pid=11), state("D", "ready", T0 + 62, pid=12),
                  kv_read("pdtui-aaaa0001", T0 + 70, 1.422, 524288), request("pdtui-aaaa0001", T0 + 70.5))
        for _ in range(60):  # the GPU thread probes once the pair is known: bounded wait
            await settle(pilot, app)
            if not nvml or app.links:
                break
        line = _read_line(app)
        if nvml:
            assert app.links[("P", "D")].how == "NVLink 18 links x 26.6 GB/s through NVSwitch (NVML)"
            assert ("= 0.369 GB/s of the link's 478.12 GB/s (NVLink 18 links x 26.6 GB/s through NVSwitch"
                    " (NVML)); ") in line, line
        else:
            assert "= 0.369 GB/s (link rate unknown: no NVML here (nvidia-ml-py and a driver)); " in line, line
        detail = app.query_one(RequestDetail)
        compact = detail.read_text(compact=True)
        assert compact is not None
        assert compact.plain.endswith("0.369 of 478.12 GB/s" if nvml else "0.369 GB/s"), compact.plain


async def test_the_cpu_pair_reads_over_the_loopback() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(160, 48)) as pilot:
        pair_up(fake)
        fake.emit(kv_read("pdtui-aaaa0001", T0 + 70, 1.422, 524288), request("pdtui-aaaa0001", T0 + 70.5))
        await settle(pilot, app)
        assert "= 0.369 GB/s (loopback: no link rate); " in _read_line(app)


def _started_linked(link: dict[str, Any]) -> RuntimeStarted:
    return dataclasses.replace(started(), link=link)


LINK_1G = {"text": "1gbit", "rate_bps": 1e9, "rtt_s": 0.0, "loss": 0.0, "describe": "1 Gbit/s", "run_id": "abc123",
           "namespaces": ["pdtui-abc123-P", "pdtui-abc123-D"], "devices": ["pdlabc123P", "pdlabc123D"]}


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
async def test_an_emulated_link_in_the_header_and_the_formula_beside_each_read(size: tuple[int, int]) -> None:
    """pdtui up --link 1gbit (issue 26): the header names the link and its rate; a request's KV read
    shows the measured time beside bytes / rate + RTT, their ratio, and the achieved Gbit/s of the
    link's. A reshape (the bench's --links) changes both from the next request on."""
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=size) as pilot:
        fake.emit(_started_linked(LINK_1G), state("P", "ready", T0 + 61, pid=11), state("D", "ready", T0 + 62, pid=12),
                  kv_read("pdtui-aaaa0001", T0 + 70, 27.0, 3_145_728), request("pdtui-aaaa0001", T0 + 70.5, blocks=24))
        await settle(pilot, app)
        assert "link 1 Gbit/s" in screen_text(app).splitlines()[0]
        detail = app.query_one(RequestDetail)
        assert detail.link is not None and detail.link.bytes_per_s == 1e9 / 8
        line = _read_line(app)
        # 3,145,728 B x 8 / 1 Gbit/s = 25.17 ms; measured 27.0 ms = 0.932 Gbit/s
        assert ("27.0 ms for 3,145,728 B (3.00 MiB) = 0.932 Gbit/s of the link's 1 Gbit/s (emulated link 1 Gbit/s:"
                " a veth shaped by tc); the formula, bytes / rate + RTT: 3,145,728 B x 8 / 1 Gbit/s + 0 ms ="
                " 25.2 ms (measured 1.07x)") in line, line
        compact = detail.read_text(compact=True)
        assert compact is not None and compact.plain == "KV read 27.0 ms (formula 25.2) 3.00 MiB 0.932 of 1 Gbit/s"
        fake.emit(LinkShaped(link={**LINK_1G, "text": "rate=10gbit,rtt=1ms", "rate_bps": 10e9, "rtt_s": 1e-3,
                                   "describe": "10 Gbit/s, RTT 1 ms"}, t=T0 + 80),
                  kv_read("pdtui-aaaa0002", T0 + 81, 4.0, 3_145_728), request("pdtui-aaaa0002", T0 + 81.5, blocks=24))
        await settle(pilot, app)
        assert "link 10 Gbit/s, RTT 1 ms" in screen_text(app).splitlines()[0]
        assert app.query_one(RequestDetail).request.request_id == "pdtui-aaaa0002"
        # 2.52 ms at the rate + 1 ms
        assert "3,145,728 B x 8 / 10 Gbit/s + 1 ms = 3.52 ms (measured 1.14x)" in _read_line(app)
