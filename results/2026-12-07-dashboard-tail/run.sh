#!/bin/bash
# Issue 22 item 2 on the device machine's CPUs (16 cores): does the open dashboard move the proxy's
# tail? Run from the repo root on the device: carry .whl (pdtui's pure-Python deps for Python 3.12,
# downloaded as ../../.library/device/README.md says); writes the tables to $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA" > $OUT/cpu.txt
for c in 0 2 6 7 10; do echo "cpu$c siblings: $(cat /sys/devices/system/cpu/cpu$c/topology/thread_siblings_list)"; done >> $OUT/cpu.txt
cat $OUT/cpu.txt
python3 -c "import pdtui.core.proxy, pdtui.app.app, pdtui.bench.transparency; print('imports ok')" || exit 1
D='{python} scripts/bench/proxy_under_dashboard.py --decode {decode} --port {port} --proxy-cpu 2 --ui-cpu 10'
B='python3 -m pdtui.bench.transparency --streams 32 --duration 8 --warmup 1.5'
# 1. pinned: proxy 2, fake 6, client 7, consumer/dashboard 10 (each its own core)
$B --rates 6400,12800 --arms direct --pin proxy=2,fake=6,client=7 \
  --arm "headless=$D --view headless" \
  --arm "busy-100=$D --view headless --burn-ms 25 --burn-duty 1.0" \
  --arm "fold=$D --view fold" \
  --arm "dashboard=$D --view dashboard" \
  --arm "dash-same-core={python} scripts/bench/proxy_under_dashboard.py --decode {decode} --port {port} --proxy-cpu 10 --ui-cpu 10 --view dashboard" \
  --out /tmp/pinned > $OUT/pinned.txt 2>&1
cp /tmp/pinned/transparency.md $OUT/pinned.md; cp /tmp/pinned/summary.json $OUT/pinned.summary.json
# 2. unpinned, as users run it
U='{python} scripts/bench/proxy_under_dashboard.py --decode {decode} --port {port}'
$B --rates 6400,12800,25600 --arms direct,pdtui \
  --arm "headless=$U --view headless" --arm "dashboard=$U --view dashboard" \
  --out /tmp/unpinned > $OUT/unpinned.txt 2>&1
cp /tmp/unpinned/transparency.md $OUT/unpinned.md; cp /tmp/unpinned/summary.json $OUT/unpinned.summary.json
tail -30 $OUT/pinned.md; tail -30 $OUT/unpinned.md
