#!/usr/bin/env bash
# The Python 3.12 wheels that pdtui's GPU scripts install on the device beside the vLLM bundle of
# shared/gpu/README.md (which has vLLM 0.22.1 and its server deps, but not these): the dashboard
# (textual, textual-plotext, plotext, rich and their pure deps), the GPU line (nvidia-ml-py), and
# OpenTelemetry for `traces_port` (vLLM 0.22.1's vllm/tracing/otel.py imports both the gRPC and the
# HTTP OTLP exporters, so grpcio comes too; pdtui's receiver decodes with opentelemetry-proto).
# The device has torch and typing-extensions already.
#   bash results/2026-11-30-h200x2-switches/make_whl.sh [OUT_DIR]       (default ./.whl; about 12 MiB; keep it out of git)
#   ROUTER=1 bash results/2026-11-30-h200x2-switches/make_whl.sh        also vllm-router (23 MiB) into ./.whl-router, for
#                                                proxy_h200.sh's transparency arm
# Carry it with a device call: `carry [".whl"]`; the scripts run
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl
set -eu
cd "$(dirname "$0")/../.."
OUT=${1:-.whl}
mkdir -p "$OUT"
PY=${PY:-python3}
"$PY" -m pip download -q --no-deps --python-version 3.12 --implementation cp --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$OUT" -r results/2026-11-30-h200x2-switches/whl.txt
if [ "${ROUTER:-0}" = 1 ]; then
  mkdir -p .whl-router
  "$PY" -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
    --platform manylinux_2_28_x86_64 -d .whl-router vllm-router==0.1.17
fi
du -sh "$OUT"
