#!/bin/bash
# The same arms as run.sh on the device host, confined to 2 of its CPUs (taskset -c 0,1: every
# process of the bench inherits it) as a stand-in for a 2-core machine. Carry .whl.
# `device.sh refresh`: the dashboard's refresh interval instead (50, 200, 500 ms), each arm twice where it matters.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
lscpu | grep -E "Model name|^CPU\(s\)" > $OUT/cpu.txt
U='{python} scripts/bench/proxy_under_dashboard.py --decode {decode} --port {port}'
[ "${1:-}" = refresh ] && { taskset -c 0,1 python3 -m pdtui.bench.transparency --streams 32 --duration 8 --warmup 1.5 \
  --rates 6400,12800 --arms direct \
  --arm "headless=$U --view headless" --arm "dashboard=$U --view dashboard" \
  --arm "dash-200ms=$U --view dashboard --refresh-ms 200" --arm "dash-500ms=$U --view dashboard --refresh-ms 500" \
  --arm "headless2=$U --view headless" --arm "dashboard2=$U --view dashboard" \
  --out /tmp/d3 > $OUT/device-2cpu-refresh.txt 2>&1; cp /tmp/d3/transparency.md $OUT/device-2cpu-refresh.md
  grep -E "^\| [0-9]" $OUT/device-2cpu-refresh.md; exit 0; }
taskset -c 0,1 python3 -m pdtui.bench.transparency --streams 32 --duration 8 --warmup 1.5 \
  --rates 6400,12800 --arms direct,pdtui \
  --arm "headless=$U --view headless" --arm "dashboard=$U --view dashboard" \
  --arm "dash-nice19=$U --view dashboard --nice 19" --arm "dash-idle=$U --view dashboard --idle" \
  --out /tmp/d2 > $OUT/device-2cpu.txt 2>&1
echo "rc=$?"
cp /tmp/d2/transparency.md $OUT/device-2cpu.md
grep -E "^\| [0-9]" $OUT/device-2cpu.md
