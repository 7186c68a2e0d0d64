#!/usr/bin/env bash
# `pdtui bench` on the lent GPU machine (after the 3 install calls of shared/gpu/README.md).
# Carry .whl (Python 3.12 wheels: results/2026-11-30-h200x2-switches/make_whl.sh).
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl || exit 1
REPO=$(pwd)
export PYTHONPATH="$REPO:/tmp/site2:/root/site" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PDTUI_HOME=/root/pdtui-home MPLBACKEND=Agg
pkill -9 -f pdtui.engine.vllm_entry 2>/dev/null; sleep 1
cd /tmp
set -x
python3 -m pdtui bench --profile one-gpu --arms single,pair --workloads follow,interference \
  --requests 20 --prompt-len 2031 --streams 32 --rate 4 --duration 30 --out "$OUT/bench" "$@"
