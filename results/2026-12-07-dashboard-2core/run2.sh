#!/bin/sh
# The confirming run: headless, the dashboard at 20 Hz and at 500 ms (what pdtui now does with fewer
# than 4 CPUs), twice each, on the 2-core box, quiet (under the engine lock).
#   timeout 600 flock /tmp/pdtui-engines.lock sh results/2026-12-07-dashboard-2core/run2.sh
cd "$(dirname "$0")/../.." || exit 1
out=results/2026-12-07-dashboard-2core
U='{python} scripts/bench/proxy_under_dashboard.py --decode {decode} --port {port}'
PYTHONPATH=$PWD .venv/bin/python -m pdtui.bench.transparency --streams 32 --duration 8 --warmup 1.5 \
  --rates 6400,12800 --arms direct \
  --arm "headless=$U --view headless" --arm "dashboard=$U --view dashboard" --arm "dash-500ms=$U --view dashboard --refresh-ms 500" \
  --arm "headless-2=$U --view headless" --arm "dashboard-2=$U --view dashboard" --arm "dash-500ms-2=$U --view dashboard --refresh-ms 500" \
  --out /tmp/dash2core-run2 > $out/run2.txt 2>&1
echo "rc=$?" >> $out/run2.txt
cp /tmp/dash2core-run2/transparency.md $out/run2.md; cp /tmp/dash2core-run2/summary.json $out/run2.summary.json
grep -E "^\| [0-9]" $out/run2.md
