#!/usr/bin/env bash
# Why does UCX pick tcp/lo for NIXL's GPU-to-GPU reads on one host? Checks, on the device:
# 1. which UCX transports nixl's bundled UCX has (libuct_cuda*.so), 2. whether CUDA IPC works
# between two processes at all (torch.multiprocessing shares CUDA tensors through cudaIpc*).
export PYTHONPATH=/root/site
python3 - <<'PY'
import glob, os, importlib.util
spec = importlib.util.find_spec("nixl_cu13")
root = os.path.dirname(spec.origin)
libs = sorted(set(os.path.basename(p) for p in glob.glob(os.path.join(root, "..", "nixl_cu13*", "**", "*.so*"), recursive=True)))
print("[diag] nixl_cu13 libs:", [l for l in libs if "uct" in l or "ucs" in l or "ucp" in l or "cuda" in l][:40])
PY
python3 "$(dirname "$0")/ipc_probe.py"
find /root/site -name "ucx_info*" -o -name "libuct_cuda*" | head
