"""The GPU line (NVML via nvidia-ml-py): absent on a CPU box (nothing shown, no crash), and with a
named fake NVML module, one line per GPU with memory and NVLink/PCIe traffic."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest

from pdtui.app import gpu
from pdtui.app.app import make_app
from tests.functional.fake_runtime import FakeRuntime
from tests.functional.test_dashboard import clock, pair_up, screen_text, settle

pytestmark = pytest.mark.anyio


@dataclass
class _Mem:
    used: int
    total: int


@dataclass
class _U:
    ullVal: int  # NVML's field names


@dataclass
class _Field:
    nvmlReturn: int
    value: _U


def fake_nvml(nvlink_kib: list[int], per_link: bool = False) -> types.ModuleType:
    """FakeNvml: pynvml's functions that pdtui calls, two H200s; GPU1 has no NVLink counters. Each
    sample of GPU0's NVLink TX counter takes the next value of ``nvlink_kib`` (cumulative KiB, all
    links). ``per_link``: the driver refuses the all-links scope and answers for links 0 and 1 only,
    each with half the traffic."""
    m = types.ModuleType("fake_nvml")

    class NVMLError(Exception):
        pass

    m.NVMLError = NVMLError
    m.NVML_PCIE_UTIL_TX_BYTES, m.NVML_PCIE_UTIL_RX_BYTES = 0, 1
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetCount = lambda: 2
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H200"
    m.nvmlDeviceGetMemoryInfo = lambda h: _Mem(used=(40 + h) * 2**30, total=140 * 2**30)
    m.nvmlDeviceGetPcieThroughput = lambda h, which: 2000 if which == 0 else 1000  # KB/s

    def fields(h: int, ids: list[tuple[int, int]]) -> list[_Field]:
        if h == 1:
            raise NVMLError("Not Supported")
        if not per_link:
            assert [scope for _, scope in ids] == [gpu.ALL_LINKS] * 2, ids  # scope 0 would be link 0 only
            return [_Field(0, _U(nvlink_kib.pop(0) if nvlink_kib else 0)), _Field(0, _U(0))]
        if ids[0][1] == gpu.ALL_LINKS:
            return [_Field(3, _U(0)) for _ in ids]  # NVML_ERROR_NOT_SUPPORTED for that scope
        tx = nvlink_kib.pop(0) if nvlink_kib else 0
        return [_Field(0 if link < 2 else 3, _U(tx // 2 if fid == gpu.NVLINK_TX and link < 2 else 0))
                for fid, link in ids]

    m.nvmlDeviceGetFieldValues = fields
    return m


def test_no_pynvml_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # an import of it raises ImportError
    assert gpu.open_nvml() is None


def test_a_driverless_nvml_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    m = types.ModuleType("driverless_nvml")

    def init() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    m.nvmlInit = init
    monkeypatch.setitem(sys.modules, "driverless_nvml", m)
    assert gpu.open_nvml("driverless_nvml") is None


def test_sampler_rates_from_the_cumulative_nvlink_counter() -> None:
    now = [100.0]
    sampler = gpu.GpuSampler(fake_nvml([1_000, 1_000 + 2 * 1024 * 1024]), clock=lambda: now[0])
    first = sampler.sample()
    assert first[0].nvlink_tx is None and first[0].pcie_tx == 2e6 and first[0].pcie_rx == 1e6
    now[0] += 2.0
    second = sampler.sample()
    assert second[0].nvlink_tx == 1024 * 1024 * 1024 and second[1].nvlink_tx is None  # 2 GiB over 2 s
    assert gpu.line(second[0]) == ("GPU0 H200 mem 40.0/140.0 GiB nvlink tx 1.1 GB/s rx 0 B/s"
                                   " pcie tx 2.0 MB/s rx 1.0 MB/s")
    assert "nvlink tx - rx -" in gpu.line(second[1])


def test_sampler_sums_the_links_when_the_driver_refuses_the_all_links_scope() -> None:
    now = [100.0]
    sampler = gpu.GpuSampler(fake_nvml([1_000, 1_000 + 2 * 1024 * 1024], per_link=True), clock=lambda: now[0])
    sampler.sample()
    now[0] += 2.0
    assert sampler.sample()[0].nvlink_tx == 1024 * 1024 * 1024


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
async def test_the_gpu_line_shows_with_nvml_and_not_without(monkeypatch: pytest.MonkeyPatch,
                                                            size: tuple[int, int]) -> None:
    monkeypatch.setitem(sys.modules, "fake_nvml", fake_nvml([0, 1024 * 1024]))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    for module, shown in (("pynvml", False), ("fake_nvml", True)):
        fake = FakeRuntime()
        app = make_app(fake, clock=clock)
        app.nvml_module = module
        async with app.run_test(size=size) as pilot:
            pair_up(fake)
            for _ in range(60):  # sampled in a thread once a second: bounded wait for two samples
                if not shown or (app.gpu_views and app.gpu_views[0].nvlink_tx is not None):
                    break
                await pilot.pause(0.05)
            await settle(pilot, app)
            text = screen_text(app)
            assert ("GPU0 H200 mem 40.0/140.0 GiB nvlink tx" in text) is shown
            assert ("GPU1 H200 mem 41.0/140.0 GiB nvlink tx - rx -" in text) is shown
            assert app.query_one("#gpus").display is shown
