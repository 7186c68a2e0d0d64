#!/bin/sh
# The field drills on a pair pdtui launches (cpu profile, ports shifted by 26000), one after another,
# each printing its steps (stderr) and its table of expected vs observed (stdout); PDTUI_FIELD_MODEL=DIR
# (a folder with weights: `pdtui model synth --weights`) serves that model, e.g. with PDTUI_DTYPE=float32. Run under the lock:
#   timeout 2700 flock -w 2400 /tmp/pdtui-engines.lock timeout 1200 sh results/2026-12-07-field/run_drills.sh [scenario...]
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH="$PWD"
out=results/2026-12-07-field/drills${PDTUI_FIELD_MODEL:+-weights}
mkdir -p "$out"
for s in ${*:-stranded fail-open context restart-order handshake}; do
  echo "=== pdtui drill --scenario $s"
  timeout 600 .venv/bin/python -m pdtui drill --headless --scenario "$s" --port-offset 26000 ${PDTUI_FIELD_MODEL:+--model $PDTUI_FIELD_MODEL} \
    --shots "$out/shots-$s" --record "$out/$s.jsonl" > "$out/$s.txt" 2> "$out/$s.err"
  echo "exit $?"
  cat "$out/$s.txt"
  grep "^\[drill\]" "$out/$s.err"
done
