"""Does legacy CUDA IPC (cudaIpcGetMemHandle, what torch.multiprocessing uses) work between two
processes on this machine? And what does a same-GPU copy of 24 MiB cost? Run on the device."""
import time

import torch
import torch.multiprocessing as mp


def child(q, r):
    try:
        t = q.get()
        r.put(float(t.sum().item()))
    except Exception as e:  # noqa: BLE001
        r.put(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    q, r = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=child, args=(q, r))
    p.start()
    t = torch.ones(1024, 1024, device="cuda")
    try:
        q.put(t)
        got = r.get(timeout=60)
        print("[ipc] CUDA IPC between processes:", "OK" if got == 1024 * 1024 else f"FAILED: {got}")
    except Exception as e:  # noqa: BLE001
        print("[ipc] CUDA IPC between processes FAILED:", type(e).__name__, e)
    p.join(30)
    x = torch.empty(24 * 2**20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    print(f"[ipc] same-GPU copy of 24 MiB: {(time.perf_counter() - t0) / 20 * 1000:.3f} ms")
