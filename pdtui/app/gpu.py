"""Each GPU's memory and NVLink/PCIe traffic, from NVML (nvidia-ml-py's ``pynvml``), no Textual.

Optional: without the package, or without a driver (a CPU box), ``open_nvml()`` gives None and
the dashboard shows nothing of it. With it, the KV that crosses between P's and D's GPUs shows as
NVLink (or PCIe) bytes per second while a pull runs.

NVML's figures: memory used/total per device; PCIe TX/RX in KB/s (``nvmlDeviceGetPcieThroughput``,
a 20 ms sample taken by the driver); NVLink data TX/RX as cumulative KiB counters
(``nvmlDeviceGetFieldValues`` with ``NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX``/``_RX``), turned into
a rate between two samples. A figure the device does not support is None (no NVLink: "-").
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

NVLINK_TX = 138
"""NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX in nvml.h (RX is 139), when pynvml does not name them."""
ALL_LINKS = 0xFFFFFFFF
"""The field's scopeId for every link together (UINT_MAX); scopeId 0, pynvml's default, is link 0 only."""
MAX_LINKS = 18
"""Links summed one by one when a driver refuses ALL_LINKS (an H100 or H200 has 18)."""


@dataclass(frozen=True)
class GpuView:
    index: int
    name: str
    mem_used: int
    mem_total: int
    pcie_tx: float | None = None
    """Bytes per second."""
    pcie_rx: float | None = None
    nvlink_tx: float | None = None
    nvlink_rx: float | None = None


def open_nvml(module: str = "pynvml") -> Any | None:
    """pynvml, initialised; None without the package or without a driver (never raises)."""
    try:
        nvml = importlib.import_module(module)
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
        if nvml.nvmlDeviceGetCount() < 1:
            return None
    except Exception:  # NVMLError_LibraryNotFound, _DriverNotLoaded...: not a GPU box  # noqa: BLE001
        return None
    return nvml


class GpuSampler:
    """One ``sample()`` per second or so, from a thread (NVML calls block)."""

    def __init__(self, nvml: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.nvml = nvml
        self.clock = clock
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        self.names = [self._name(h) for h in self.handles]
        self._nvlink_prev: dict[int, tuple[float, int, int]] = {}
        self.tx_field = getattr(nvml, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", NVLINK_TX)
        self.rx_field = getattr(nvml, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", NVLINK_TX + 1)

    def _name(self, handle: Any) -> str:
        name = self.nvml.nvmlDeviceGetName(handle)
        return (name.decode() if isinstance(name, bytes) else str(name)).removeprefix("NVIDIA ")

    def _try(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self.nvml.NVMLError:  # not supported on this device, or a transient failure
            return None

    def _counters(self, handle: Any) -> tuple[int, int] | None:
        """Cumulative NVLink data KiB (TX, RX) over every link: the all-links scope, else the sum of
        the links that answer; None when none does."""
        get = self.nvml.nvmlDeviceGetFieldValues
        values = self._try(lambda: get(handle, [(self.tx_field, ALL_LINKS), (self.rx_field, ALL_LINKS)]))
        if values and all(getattr(v, "nvmlReturn", 1) == 0 for v in values):
            return int(values[0].value.ullVal), int(values[1].value.ullVal)
        ids = [(f, link) for link in range(MAX_LINKS) for f in (self.tx_field, self.rx_field)]
        values = self._try(lambda: get(handle, ids))
        ok = [(fid, v) for (fid, _), v in zip(ids, values or [], strict=False) if getattr(v, "nvmlReturn", 1) == 0]
        if not ok:
            return None
        return (sum(int(v.value.ullVal) for fid, v in ok if fid == self.tx_field),
                sum(int(v.value.ullVal) for fid, v in ok if fid == self.rx_field))

    def _nvlink(self, i: int, handle: Any, now: float) -> tuple[float | None, float | None]:
        counters = self._counters(handle)
        if counters is None:
            return None, None
        tx, rx = counters
        prev = self._nvlink_prev.get(i)
        self._nvlink_prev[i] = (now, tx, rx)
        if prev is None or now <= prev[0]:
            return None, None
        dt = now - prev[0]
        return max(0, tx - prev[1]) * 1024 / dt, max(0, rx - prev[2]) * 1024 / dt

    def sample(self) -> tuple[GpuView, ...]:
        now = self.clock()
        out = []
        nvml = self.nvml
        for i, (h, name) in enumerate(zip(self.handles, self.names, strict=True)):
            mem = self._try(partial(nvml.nvmlDeviceGetMemoryInfo, h))
            tx = self._try(partial(nvml.nvmlDeviceGetPcieThroughput, h, nvml.NVML_PCIE_UTIL_TX_BYTES))
            rx = self._try(partial(nvml.nvmlDeviceGetPcieThroughput, h, nvml.NVML_PCIE_UTIL_RX_BYTES))
            nv_tx, nv_rx = self._nvlink(i, h, now)
            out.append(GpuView(i, name, int(mem.used) if mem else 0, int(mem.total) if mem else 0,
                               None if tx is None else tx * 1000.0, None if rx is None else rx * 1000.0,
                               nv_tx, nv_rx))
        return tuple(out)


def rate(v: float | None) -> str:
    """Bytes per second, short: "12.3 GB/s", "450 MB/s", "-" for unknown."""
    if v is None:
        return "-"
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if v >= scale:
            return f"{v / scale:.1f} {unit}" if v < 100 * scale else f"{v / scale:.0f} {unit}"
    return f"{v:.0f} B/s"


def line(g: GpuView) -> str:
    """One GPU on one line: "GPU0 H200 mem 41.2/139.8 GiB nvlink tx 12.1 GB/s rx 0 B/s pcie tx ..."."""
    return (f"GPU{g.index} {g.name} mem {g.mem_used / 2**30:.1f}/{g.mem_total / 2**30:.1f} GiB"
            f" nvlink tx {rate(g.nvlink_tx)} rx {rate(g.nvlink_rx)}"
            f" pcie tx {rate(g.pcie_tx)} rx {rate(g.pcie_rx)}")
