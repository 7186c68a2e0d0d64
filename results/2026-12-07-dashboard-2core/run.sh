#!/bin/sh
# Issue 22: the dashboard's cost to the proxy's tail on the 2-core machine, unpinned (as users run
# it): a plain consumer (headless), the dashboard (160x48, Latency tab, + 200 recorded events/s), the
# dashboard reniced +19, and the dashboard in SCHED_IDLE; and `pdtui proxy` now against the one before
# the redesign (beca6f9, a worktree at /work/wt-before: git worktree add --detach /work/wt-before beca6f9). Quiet machine: run under the engine lock.
#   timeout 900 flock /tmp/pdtui-engines.lock sh results/2026-12-07-dashboard-2core/run.sh [TAG]
cd "$(dirname "$0")/../.." || exit 1
out=results/2026-12-07-dashboard-2core; tag=${1:-run1}
U='{python} scripts/bench/proxy_under_dashboard.py --decode {decode} --port {port}'
lscpu | grep -E "Model name|^CPU\(s\)" > $out/cpu.txt
PYTHONPATH=$PWD .venv/bin/python -m pdtui.bench.transparency --streams 32 --duration 8 --warmup 1.5 \
  --rates 6400,12800 --arms direct,pdtui \
  --arm "pdtui-beca6f9=env PYTHONPATH=/work/wt-before {python} -m pdtui proxy --decode {decode} --port {port}" \
  --arm "headless=$U --view headless" --arm "dashboard=$U --view dashboard" \
  --arm "dash-nice19=$U --view dashboard --nice 19" --arm "dash-idle=$U --view dashboard --idle" \
  --arm "dash-200ms=$U --view dashboard --refresh-ms 200" --arm "dash-500ms=$U --view dashboard --refresh-ms 500" \
  --out /tmp/dash2core-$tag > $out/$tag.txt 2>&1
echo "rc=$?" >> $out/$tag.txt
cp /tmp/dash2core-$tag/transparency.md $out/$tag.md; cp /tmp/dash2core-$tag/summary.json $out/$tag.summary.json
grep -E "^\| [0-9]" $out/$tag.md
