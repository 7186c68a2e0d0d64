#!/usr/bin/env bash
# `pdtui drill` on the lent GPU machine (after the 3 install calls of shared/gpu/README.md): the
# dashboard, headless, over the one-gpu pair; kill D mid-stream, restart D, kill P (fallback), restart
# P; an SVG per step and a recording of the whole session for `pdtui replay`. Extra arguments go to
# `pdtui drill` (e.g. `--profile two-gpu` on nvidia-h200-x2). Beside it, results/2026-11-30-h200x2-drill/nvml_probe.py
# logs NVML's NVLink counters every 2 s to $OUT/nvml.txt (what the dashboard's GPU line reads).
# Carry .whl (Python 3.12 wheels: results/2026-11-30-h200x2-switches/make_whl.sh).
# Writes $OUT/shots/gpu-*.svg, $OUT/gpu-drill.jsonl.xz, $OUT/drill.txt.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/shots"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl || exit 1
REPO=$(pwd)
export PYTHONPATH="$REPO:/tmp/site2:/root/site" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PDTUI_HOME=/root/pdtui-home
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
# eager mode: no CUDA-graph capture, so each of the three starts takes less of the 10-minute call
export PDTUI_ENFORCE_EAGER=${PDTUI_ENFORCE_EAGER:-true}
pkill -9 -f pdtui.engine.vllm_entry 2>/dev/null; sleep 1
cd /tmp  # never from a folder holding a vllm/ directory
python3 "$REPO/results/2026-11-30-h200x2-drill/nvml_probe.py" --seconds 580 > "$OUT/nvml.txt" 2>&1 &
PROBE=$!
set -x
timeout 560 python3 -m pdtui drill --headless --profile one-gpu --shots "$OUT/shots" --prefix gpu- \
  --record "$OUT/gpu-drill.jsonl" --ready-timeout 200 "$@" 2>&1 | tee "$OUT/drill.txt"
rc=${PIPESTATUS[0]}
set +x
kill $PROBE 2>/dev/null
pkill -9 -f pdtui.engine.vllm_entry 2>/dev/null
grep -c . "$OUT/gpu-drill.jsonl"; xz -9 -f "$OUT/gpu-drill.jsonl"; ls -la "$OUT" "$OUT/shots"
exit $rc
