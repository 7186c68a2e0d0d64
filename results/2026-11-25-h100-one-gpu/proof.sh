#!/usr/bin/env bash
# Run pdtui itself on the lent GPU machine (after shared/gpu/README.md's 3 install calls put vLLM
# 0.22.1 + nixl into /root/site). Usage, in the repo root on the device:
#   bash results/2026-11-25-h100-one-gpu/proof.sh TAG [PDTUI_ENV_JSON]
# TAG names the outputs; PDTUI_ENV_JSON adds environment to both engines, e.g. '{"UCX_TLS":"cuda_ipc,cuda_copy,tcp"}'.
# Writes to $OUT: TAG.jsonl (the recording), TAG.out (headless stdout), TAG-P.metrics, TAG-D.metrics, TAG.summary.
set -u
TAG=${1:-gpu}; ENVJSON=${2:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
REPO=$(pwd)
export PYTHONPATH="$REPO:/root/site" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
export PDTUI_HOME=/root/pdtui-home
# stop a previous run (processes started with setsid outlive a call)
if [ -f /tmp/pdtui.pgid ]; then kill -INT -- -"$(cat /tmp/pdtui.pgid)" 2>/dev/null; sleep 15; kill -KILL -- -"$(cat /tmp/pdtui.pgid)" 2>/dev/null; fi
pkill -9 -f pdtui.engine.vllm_entry 2>/dev/null; sleep 1
[ -n "$ENVJSON" ] && export PDTUI_ENV="$ENVJSON"
cd /tmp  # never from a folder holding a vllm/ directory
setsid python3 -m pdtui up --headless --profile one-gpu --logs --record "$OUT/$TAG.jsonl" > "$OUT/$TAG.out" 2> "$OUT/$TAG.err" &
echo $! > /tmp/pdtui.pgid
t0=$(date +%s)
until grep -q '"pair_ready"' "$OUT/$TAG.out" 2>/dev/null; do
  sleep 2
  if ! kill -0 "$(cat /tmp/pdtui.pgid)" 2>/dev/null; then echo "pdtui exited during start-up"; tail -30 "$OUT/$TAG.err"; exit 1; fi
  if [ $(( $(date +%s) - t0 )) -gt 300 ]; then echo "not ready in 300 s"; tail -30 "$OUT/$TAG.err"; break; fi
done
echo "[proof] ready after $(( $(date +%s) - t0 )) s"
python3 "$REPO/results/2026-11-25-h100-one-gpu/follow.py" --proxy http://127.0.0.1:8000 --n "${FOLLOW_N:-6}" --prompt-tokens 2031 \
   --record "$OUT/$TAG.jsonl" --metrics-out "$OUT/$TAG" | tee "$OUT/$TAG.summary"
grep -h '"ucx_transport"\|"compat_ok"\|"transfer_plan"\|"kv_pool"\|"notice"' "$OUT/$TAG.out" | cut -c1-400 | head -20
kill -INT -- -"$(cat /tmp/pdtui.pgid)" 2>/dev/null; sleep 12; kill -KILL -- -"$(cat /tmp/pdtui.pgid)" 2>/dev/null
grep -c . "$OUT/$TAG.jsonl"; xz -9 -f "$OUT/$TAG.jsonl" "$OUT/$TAG.out" 2>/dev/null; ls -la "$OUT"
