#!/bin/bash
# Issue 22: pdtui's proxy beside vllm-router at 6.4k, 12.8k and 25.6k chunks/s on the fake
# upstream, on the device machine's CPUs (no GPU used), unpinned as users run it.
# The wheels do not fit one device call (the tree 38 MB + the router's 23.7 MB + pdtui's deps
# 11 MB > 64 MiB), so two calls back to back, while the machine stays warm:
#   bash results/2026-12-07-router/run.sh router   # carry .whl-router (vllm-router 0.1.17, cp38-abi3)
#   bash results/2026-12-07-router/run.sh bench    # carry .whl (pdtui's pure-Python deps, cp312)
# vllm-router's Python launcher imports its debugging load balancer (mini_lb: aiohttp, fastapi,
# orjson) and setproctitle at the top; neither is carried: the shim below stands them in as empty
# modules and runs the same launch_router.main(), so the Rust router (vllm_router_rs) is what runs.
set -u
case "$1" in
router)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/rsite .whl-router/*.whl || exit 1
  mkdir -p /tmp/rsite/bin
  cat > /tmp/rsite/bin/vllm-router <<'PY'
#!/usr/bin/env python3
import sys, types
sys.path.insert(0, "/tmp/rsite")
stub = types.ModuleType("vllm_router.mini_lb"); stub.MiniLoadBalancer = None
sys.modules["vllm_router.mini_lb"] = stub
title = types.ModuleType("setproctitle"); title.setproctitle = lambda _t: None
sys.modules["setproctitle"] = title
from vllm_router.launch_router import main
sys.exit(main())
PY
  chmod +x /tmp/rsite/bin/vllm-router
  /tmp/rsite/bin/vllm-router --help | head -5
  ls -la /tmp/rsite
  ;;
bench)
  test -x /tmp/rsite/bin/vllm-router || { echo "no /tmp/rsite: the machine was recycled; run 'router' again"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:/tmp/rsite:$PWD PATH=/tmp/rsite/bin:$PATH PYTHONUNBUFFERED=1
  lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA" > $OUT/cpu.txt; cat $OUT/cpu.txt
  python3 -V
  python3 -m pdtui.bench.transparency --streams 32 --duration 8 --warmup 1.5 --rates 6400,12800,25600 \
    --arms direct,pdtui,vllm-router --out /tmp/router > $OUT/bench.txt 2>&1
  echo "rc=$?"
  cp /tmp/router/transparency.md $OUT/ 2>/dev/null; cp /tmp/router/summary.json $OUT/ 2>/dev/null
  tail -40 $OUT/bench.txt
  ;;
*) echo "usage: run.sh router|bench"; exit 2;;
esac
