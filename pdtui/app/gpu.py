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


# ----- the link between P's and D's GPUs: its nominal rate, and how it was found ---------------

NVLINK_SPEED_COMMON = 90
"""NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON: the speed of every active NVLink of the device, MB/s each way."""
NVML_FEATURE_ENABLED = 1
"""nvmlDeviceGetNvLinkState: the link is active."""
P2P_STATUS_OK = 0
P2P_CAPS_INDEX_NVLINK = 2
"""NVML_P2P_CAPS_INDEX_NVLINK, for nvmlDeviceGetP2PStatus (NVML_P2P_STATUS_OK is 0)."""
NVLINK_DEVICE_TYPE_SWITCH = 2
"""NVML_NVLINK_DEVICE_TYPE_SWITCH: the far end of the link is an NVSwitch (0 is a GPU)."""
PCIE_LANE_GBS = {1: 2.5 * 8 / 10 / 8, 2: 5 * 8 / 10 / 8, 3: 8 * 128 / 130 / 8, 4: 16 * 128 / 130 / 8,
                 5: 32 * 128 / 130 / 8, 6: 64 * 242 / 256 / 8}
"""GB/s per lane each way by PCIe generation: the transfer rate after its line code (8b/10b for 1
and 2, 128b/130b for 3 to 5, 6's FLIT with its 242 payload bytes of 256)."""


@dataclass(frozen=True)
class LinkRate:
    """What pdtui knows of the link the KV crosses from P's memory to D's: its nominal rate each
    way (bytes per second), or None where there is none or it is not known, and how it was found
    (or why not). Never a guess: every rate comes from NVML's answers about these two GPUs."""

    bytes_per_s: float | None
    how: str
    rtt_s: float | None = None
    """The link's round-trip time when pdtui made the link itself (an emulated one: its spec's RTT,
    0 when it added none): the transfer's formula, bytes / rate + RTT, is then shown beside the
    measured read. None: no formula (NVML says nothing of an RTT)."""

    @property
    def gbps(self) -> float | None:
        return None if self.bytes_per_s is None else self.bytes_per_s / 1e9

    def formula_s(self, nbytes: int) -> float | None:
        """bytes / rate + RTT, for a link pdtui shaped itself; None otherwise."""
        if self.bytes_per_s is None or self.rtt_s is None:
            return None
        return nbytes / self.bytes_per_s + self.rtt_s


LOOPBACK = LinkRate(None, "loopback: no link rate")
"""The CPU pair: P and D on one host, the KV through UCX's loopback (shared memory or TCP on lo)."""


def emulated(link: dict[str, Any]) -> LinkRate:
    """The emulated link of the run (RuntimeStarted.link, pdtui.core.link): its rate as tc shapes
    it, each way; an unshaped veth (the bench's loopback) has no rate."""
    rate = link.get("rate_bps")
    if not rate:
        return LinkRate(None, f"emulated link {link.get('describe', '?')}: no rate")
    return LinkRate(rate / 8, f"emulated link {link.get('describe', '?')}: a veth shaped by tc", float(link.get("rtt_s") or 0.0))


def unknown(why: str) -> LinkRate:
    return LinkRate(None, f"link rate unknown: {why}")


def cuda_devices(visible: str | None, tp: int) -> list[str]:
    """The CUDA devices an engine's ranks 0..tp-1 use: the first ``tp`` entries of its
    CUDA_VISIBLE_DEVICES (indices or GPU-UUIDs), or devices 0..tp-1 when that is not set."""
    if visible is None:
        return [str(i) for i in range(tp)]
    return [x.strip() for x in visible.split(",") if x.strip()][:tp]


def _text(v: Any) -> str:
    return (v.decode() if isinstance(v, bytes) else str(v)).strip().lower()


class LinkProbe:
    """NVML's answers about the link between two GPUs (the NVLinks from one to the other or to
    NVSwitches, their common speed; else both GPUs' PCIe links), as UCX's CUDA transports ask
    them. Blocking calls: from the GPU thread."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.count = int(nvml.nvmlDeviceGetCount())
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(self.count)]
        self.names = [_text(nvml.nvmlDeviceGetName(h)) for h in self.handles]

    def _try(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (self.nvml.NVMLError, AttributeError):  # not supported here, or an older pynvml
            return None

    def _call(self, name: str, *args: Any) -> Any:
        """``nvml.<name>(*args)``, or None: not in this pynvml, not supported, or failed."""
        fn = getattr(self.nvml, name, None)
        return None if fn is None else self._try(partial(fn, *args))

    def index(self, dev: str, order: str | None) -> int | str:
        """The NVML index of a CUDA device name (an index, or a GPU-UUID), or why it is not known.
        CUDA numbers devices fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID; NVML numbers them
        by PCI bus. They agree when that is set, or when every GPU is the same model (CUDA then
        orders them by PCI bus too)."""
        if dev.lower().startswith("mig-"):
            return f"{dev} is a MIG instance"
        if dev.lower().startswith("gpu-"):
            handle = self._try(lambda: self.nvml.nvmlDeviceGetHandleByUUID(dev))
            i = None if handle is None else self._try(lambda: self.nvml.nvmlDeviceGetIndex(handle))
            return int(i) if i is not None else f"NVML does not know {dev}"
        try:
            i = int(dev)
        except ValueError:
            return f"CUDA device {dev!r} is neither an index nor a UUID"
        if not 0 <= i < self.count:
            return f"no GPU {i} here ({self.count} GPUs)"
        if order != "PCI_BUS_ID" and len(set(self.names)) > 1:
            return "unlike GPUs, and CUDA's device order may differ from NVML's (set CUDA_DEVICE_ORDER=PCI_BUS_ID)"
        return i

    def _bus(self, pci: Any) -> str | None:
        return None if pci is None else _text(getattr(pci, "busId", ""))

    def _nvlinks(self, a: Any, b: Any) -> tuple[int, int]:
        """Active NVLinks of ``a``: (to ``b`` itself, to an NVSwitch)."""
        b_bus = self._bus(self._call("nvmlDeviceGetPciInfo", b))
        direct = switch = 0
        for link in range(MAX_LINKS):
            if self._call("nvmlDeviceGetNvLinkState", a, link) != NVML_FEATURE_ENABLED:
                continue
            remote = self._bus(self._call("nvmlDeviceGetNvLinkRemotePciInfo", a, link))
            if remote is not None and remote == b_bus:
                direct += 1
            elif self._call("nvmlDeviceGetNvLinkRemoteDeviceType", a, link) == NVLINK_DEVICE_TYPE_SWITCH:
                switch += 1
        return direct, switch

    def _speed_mbps(self, h: Any) -> int | None:
        values = self._try(lambda: self.nvml.nvmlDeviceGetFieldValues(h, [NVLINK_SPEED_COMMON]))
        if not values or getattr(values[0], "nvmlReturn", 1) != 0:
            return None
        v = values[0].value
        speed = getattr(v, "uiVal", None) or getattr(v, "ullVal", None)
        return int(speed) if speed else None

    def _pcie(self, h: Any) -> tuple[int, int] | None:
        gen = self._try(lambda: self.nvml.nvmlDeviceGetMaxPcieLinkGeneration(h))
        width = self._try(lambda: self.nvml.nvmlDeviceGetMaxPcieLinkWidth(h))
        return (int(gen), int(width)) if gen and width else None

    def between(self, i: int, j: int) -> LinkRate:
        """The link between GPUs i and j (NVML indices)."""
        if i == j:
            return LinkRate(None, f"same GPU ({i}): no link, the KV is copied within its memory")
        a, b = self.handles[i], self.handles[j]
        nvml = self.nvml
        p2p = self._try(lambda: nvml.nvmlDeviceGetP2PStatus(
            a, b, getattr(nvml, "NVML_P2P_CAPS_INDEX_NVLINK", P2P_CAPS_INDEX_NVLINK)))
        if p2p == P2P_STATUS_OK:
            speed = self._speed_mbps(a)
            direct, switch = self._nvlinks(a, b)
            if direct:
                links, via = direct, ""
            elif switch:
                links, via = min(switch, self._nvlinks(b, a)[1]), " through NVSwitch"
            else:
                links, via = 0, ""
            if speed and links:
                return LinkRate(links * speed * 1e6, f"NVLink {links} links x {speed / 1000:.1f} GB/s{via} (NVML)")
            return unknown(f"GPU {i} and {j} talk over NVLink, but NVML gives no link count or speed")
        pa, pb = self._pcie(a), self._pcie(b)
        if pa is None or pb is None:
            return unknown(f"no NVLink between GPU {i} and {j}, and NVML gives no PCIe link width or generation")
        gen, width = min(pa[0], pb[0]), min(pa[1], pb[1])
        if gen not in PCIE_LANE_GBS:
            return unknown(f"PCIe Gen{gen}: a rate pdtui does not know")
        return LinkRate(PCIE_LANE_GBS[gen] * width * 1e9,
                        f"PCIe Gen{gen} x{width}, the narrower of the two GPUs' links (NVML)")

    def pair(self, p_devices: list[str], d_devices: list[str], order: str | None) -> LinkRate:
        """The link between P's and D's GPUs, rank by rank (rank r of P sends to rank r of D);
        with several ranks, the sum of the pairs' rates when every pair is known."""
        if not p_devices or len(p_devices) != len(d_devices):
            return unknown("P and D do not use as many GPUs")
        rates = []
        for p, d in zip(p_devices, d_devices, strict=True):
            i, j = self.index(p, order), self.index(d, order)
            if isinstance(i, str) or isinstance(j, str):
                return unknown(i if isinstance(i, str) else str(j))
            rates.append(self.between(i, j))
        if len(rates) == 1 or any(r.bytes_per_s is None for r in rates):
            return rates[0] if len(rates) == 1 else next(r for r in rates if r.bytes_per_s is None)
        hows = {r.how for r in rates}
        how = (f"{len(rates)} rank pairs x {rates[0].how}" if len(hows) == 1
               else "; ".join(f"rank {k}: {r.how}" for k, r in enumerate(rates)))
        return LinkRate(sum(r.bytes_per_s or 0.0 for r in rates), how)
