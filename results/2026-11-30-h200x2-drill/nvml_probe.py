#!/usr/bin/env python3
"""What NVML's NVLink data counters say, three ways, every --every seconds, for --seconds: the
all-links scope (scopeId UINT_MAX, what pdtui.app.gpu asks first), the sum of links 0..17 one by
one (its fallback), and link 0 alone (pynvml's default scopeId 0). Cumulative KiB, TX/RX, per GPU,
one line each; `-` where NVML answers with an error. Run beside a pair moving KV over NVLink:

    python3 results/2026-11-30-h200x2-drill/nvml_probe.py --seconds 200 > nvml.txt &
"""
from __future__ import annotations

import argparse
import time

import pynvml as nv

TX, RX = 138, 139


def read(h: object, ids: list[tuple[int, int]]) -> list[int | None]:
    try:
        vals = nv.nvmlDeviceGetFieldValues(h, ids)
    except nv.NVMLError as e:
        print(f"# NVMLError {e}", flush=True)
        return [None] * len(ids)
    return [int(v.value.ullVal) if v.nvmlReturn == 0 else None for v in vals]


def fmt(x: int | None) -> str:
    return "-" if x is None else str(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--every", type=float, default=2)
    a = ap.parse_args()
    nv.nvmlInit()
    hs = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
    print("t gpu all_tx all_rx sum18_tx sum18_rx links_ok link0_tx link0_rx pcie_tx_KBps pcie_rx_KBps", flush=True)
    end = time.time() + a.seconds
    while time.time() < end:
        for i, h in enumerate(hs):
            all_tx, all_rx = read(h, [(TX, 0xFFFFFFFF), (RX, 0xFFFFFFFF)])
            per = read(h, [(f, link) for link in range(18) for f in (TX, RX)])
            ok = [v for v in per if v is not None]
            s_tx = sum(v for v in per[0::2] if v is not None) if ok else None
            s_rx = sum(v for v in per[1::2] if v is not None) if ok else None
            try:
                p_tx = nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES)
                p_rx = nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES)
            except nv.NVMLError:
                p_tx = p_rx = None
            print(f"{time.time():.1f} {i} {fmt(all_tx)} {fmt(all_rx)} {fmt(s_tx)} {fmt(s_rx)} {len(ok) // 2}"
                  f" {fmt(per[0])} {fmt(per[1])} {fmt(p_tx)} {fmt(p_rx)}", flush=True)
        time.sleep(a.every)


if __name__ == "__main__":
    main()
