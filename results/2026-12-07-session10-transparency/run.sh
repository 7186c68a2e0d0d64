#!/bin/sh
# Session 10 touched the proxy's relay (one wall-clock read per token event, for the headroom's
# dating of chunks) and its events (a headroom report per dispatch and end). Before: ddc6418 (the
# session's start, a worktree: git worktree add --detach /tmp/wt-ddc ddc6418); after: this tree.
# `pdtui proxy` alone, and under the dashboard (160x48) and a headless consumer, each before and after.
#   timeout 900 flock /tmp/pdtui-engines.lock sh results/2026-12-07-session10-transparency/run.sh [TAG]
cd "$(dirname "$0")/../.." || exit 1
out=results/2026-12-07-session10-transparency; tag=${1:-run1}; B=/tmp/wt-ddc
U='{python} scripts/bench/proxy_under_dashboard.py --decode {decode} --port {port}'
UB="env PYTHONPATH=$B {python} $B/scripts/bench/proxy_under_dashboard.py --decode {decode} --port {port}"
lscpu | grep -E "Model name|^CPU\(s\)|amx" > $out/cpu.txt
PYTHONPATH=$PWD .venv/bin/python -m pdtui.bench.transparency --streams 32 --duration 8 --warmup 1.5 \
  --rates 6400,12800 --arms direct,pdtui \
  --arm "pdtui-before=env PYTHONPATH=$B {python} -m pdtui proxy --decode {decode} --port {port}" \
  --arm "headless=$U --view headless" --arm "headless-before=$UB --view headless" \
  --arm "dashboard=$U --view dashboard" --arm "dashboard-before=$UB --view dashboard" \
  --out /tmp/s10-$tag > $out/$tag.txt 2>&1
echo "rc=$?" >> $out/$tag.txt
cp /tmp/s10-$tag/transparency.md $out/$tag.md
grep -E "^\| [0-9]" $out/$tag.md
