#!/usr/bin/env bash
# Issue 13 on two H200s (nvidia-h200-x2), after the 3 install calls of shared/gpu/README.md: the
# TTFT toll with and without the switches, 0.5B shape (the two-gpu profile's model), one GPU per role.
#   bash results/2026-11-30-h200x2-switches/toll_h200x2.sh switches   scripts/bench/ttft_switches.py: ONE pair, five proxies over it
#                                              (single = P alone, none, tokenize_once, first_token, both),
#                                              follow requests interleaved round by round, the engines'
#                                              OTLP spans on (traces port 8017)
#   bash results/2026-11-30-h200x2-switches/toll_h200x2.sh bench      pdtui bench: single-proxied, pair, pair-first-token,
#                                              pair-both (ARMS), follow + interference: the toll per arm
#                                              and ITL p99 under mixed load (no spans: nothing extra runs)
# Carry .whl (results/2026-11-30-h200x2-switches/make_whl.sh: the dashboard's wheels, OpenTelemetry, nvidia-ml-py).
# Env: ROUNDS (40), REQUESTS (20), DURATION (20), RATE (4), ARMS, LIMIT_S (560). Writes $OUT/...
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl || exit 1
REPO=$(pwd)
export PYTHONPATH="$REPO:/tmp/site2:/root/site" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PDTUI_HOME=/root/pdtui-home
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg NCCL_NVLS_ENABLE=0 PATH="/tmp/site2/bin:$PATH"
export PDTUI_PROXY_CPUS=${PDTUI_PROXY_CPUS:-3}   # the proxy on a core of its own
nproc; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
pkill -9 -f vllm_entry 2>/dev/null; sleep 1
cd /tmp  # never from a folder holding a vllm/ directory
case "${1:-switches}" in
switches)
  set -x
  timeout -s INT -k 30 "${LIMIT_S:-560}" python3 "$REPO/scripts/bench/ttft_switches.py" --profile two-gpu \
    --port-offset 0 --traces-port 8017 --rounds "${ROUNDS:-40}" --prompt-len 2031 --max-tokens 16 \
    --json "$OUT/switches.json" 2>&1 | tee "$OUT/switches.txt"
  rc=${PIPESTATUS[0]} ;;
bench)
  set -x
  timeout -s INT -k 30 "${LIMIT_S:-560}" python3 -m pdtui bench --profile two-gpu \
    --arms "${ARMS:-single-proxied,pair,pair-first-token,pair-both}" --workloads follow,interference \
    --requests "${REQUESTS:-20}" --prompt-len 2031 --streams 32 --rate "${RATE:-4}" --duration "${DURATION:-20}" \
    --out "$OUT/bench" 2>&1 | tee "$OUT/bench.txt"
  rc=${PIPESTATUS[0]}
  rm -f "$OUT/bench"/bench.json.gz.samples 2>/dev/null ;;
*) echo "usage: $0 switches|bench" >&2; exit 2 ;;
esac
set +x
pkill -9 -f vllm_entry 2>/dev/null
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
ls -la "$OUT"
exit $rc
