#!/usr/bin/env bash
# Issue 12 on two H200s (nvidia-h200-x2), after the 3 install calls of shared/gpu/README.md.
# The pair's economics at the 8B size: `pdtui bench` on the two-gpu profile with the llama3.1-8b
# shape (Llama-3.1-8B's KV geometry, dummy weights): single-proxied (GPU 0) against the pair
# (P on GPU 0, D on GPU 1), both through pdtui's proxy, follow + interference.
#   bash results/2026-11-30-h200x2-8b/economics_h200x2.sh [MODEL] [RATE]      (defaults: llama3.1-8b 4)
# Carry .whl (see proxy_h200.sh). Writes $OUT/bench-<model>/ and $OUT/bench-<model>.txt.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=${1:-llama3.1-8b}; RATE=${2:-4}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl || exit 1
REPO=$(pwd)
export PYTHONPATH="$REPO:/tmp/site2:/root/site" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PDTUI_HOME=/root/pdtui-home
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg NCCL_NVLS_ENABLE=0 PATH="/tmp/site2/bin:$PATH"
export PDTUI_PROXY_CPUS=${PDTUI_PROXY_CPUS:-3}   # the proxy on a core of its own
nproc; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
pkill -9 -f vllm_entry 2>/dev/null; sleep 1
cd /tmp  # never from a folder holding a vllm/ directory
set -x
timeout -s INT -k 30 "${LIMIT_S:-560}" python3 -m pdtui bench --profile two-gpu --model "$MODEL" --arms "${ARMS:-single-proxied,pair}" \
  --workloads follow,interference --requests "${REQUESTS:-10}" --prompt-len 2031 --streams 32 --rate "$RATE" \
  --duration "${DURATION:-20}" --out "$OUT/bench-$MODEL" 2>&1 | tee "$OUT/bench-$MODEL.txt"
rc=${PIPESTATUS[0]}
set +x
pkill -9 -f vllm_entry 2>/dev/null
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
rm -f "$OUT/bench-$MODEL"/bench.json.gz.samples 2>/dev/null
ls -la "$OUT/bench-$MODEL"
exit $rc
