#!/usr/bin/env bash
# Issue 10 on two H200s (nvidia-h200-x2), after the 3 install calls of shared/gpu/README.md.
# Carry .whl and .whl-router (Python 3.12 wheels: results/2026-11-30-h200x2-switches/make_whl.sh, ROUTER=1 for vllm-router).
#   bash results/2026-11-30-h200x2-proxy/proxy_h200.sh bench          pdtui bench: single, single-proxied, pair (two-gpu)
#   bash results/2026-11-30-h200x2-proxy/proxy_h200.sh transparency   the transparency bench on the box's CPUs, with the
#                                                 dashboard arms, the proxy pinned to its own core
# Writes $OUT/...; prints the tables.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl $(ls .whl-router/*.whl 2>/dev/null) || exit 1
REPO=$(pwd)
export PYTHONPATH="$REPO:/tmp/site2:/root/site" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PDTUI_HOME=/root/pdtui-home
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg NCCL_NVLS_ENABLE=0 PATH="/tmp/site2/bin:$PATH"
nproc; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
case "${1:-bench}" in
bench)
  pkill -9 -f pdtui.engine.vllm_entry 2>/dev/null; sleep 1
  cd /tmp  # never from a folder holding a vllm/ directory
  # the proxy on a core of its own, away from the API servers and the bench's client
  export PDTUI_PROXY_CPUS=${PDTUI_PROXY_CPUS:-3}
  set -x
  timeout 585 python3 -m pdtui bench --profile two-gpu --arms "${ARMS:-single,single-proxied,pair}" \
    --workloads follow,interference --requests 20 --prompt-len 2031 --streams 32 --rate 4 --duration 30 \
    --out "$OUT/bench" 2>&1 | tee "$OUT/bench.txt"
  rc=${PIPESTATUS[0]}
  set +x
  pkill -9 -f pdtui.engine.vllm_entry 2>/dev/null
  ls -la "$OUT/bench"
  exit $rc ;;
transparency)
  cd "$REPO"
  D='{python} scripts/bench/proxy_under_dashboard.py --decode {decode} --port {port} --proxy-cpu 2'
  set -x
  timeout 400 python3 -m pdtui.bench.transparency --rates 3200,6400,12800 --arms direct,pdtui,pdtui-legacy,vllm-router \
    --arm "headless=$D --view headless --ui-cpu 3" --arm "dashboard=$D --view dashboard --ui-cpu 3" \
    --out "$OUT/transparency" 2>&1 | tail -40
  ;;
esac
