#!/bin/sh
# Issue 24: `pdtui bench`'s routing arms on real engines, 1P2D at a load that fills the small D's pool.
# The engines: the e2e hand set's lines (tests/e2e/handset.py) started by ../2026-12-07-headroom/hold_set.py
# (offset 23000: P 31100, D 31200 with 2,048 blocks, D2 31250 with a 16 MiB pool = 128 blocks of 128
# tokens). Run from the repo root under the engine lock:
#   timeout 1500 flock /tmp/pdtui-engines.lock sh results/2026-12-07-routing/run.sh
# a heavier fill: TAG=bench-heavy FILL="--fill-requests 40 --fill-interval 0.1" sh ...
cd "$(dirname "$0")/../.." || exit 1
out=results/2026-12-07-routing
mkdir -p /tmp/hold && rm -f /tmp/hold/stop
.venv/bin/python results/2026-12-07-headroom/hold_set.py > $out/hold.txt 2>&1 &
hold=$!
i=0; until grep -q "^ready" $out/hold.txt || [ $i -ge 300 ]; do sleep 2; i=$((i+2)); done
cat $out/hold.txt
lscpu | grep -E "Model name|^CPU\(s\)" > $out/cpu.txt
# the small D first: D1 is the one whose pool fills
.venv/bin/pdtui bench --prefill http://127.0.0.1:31100 --decode http://127.0.0.1:31250,http://127.0.0.1:31200 \
  --arms pair-round-robin,pair-least-loaded,pair-headroom --workloads fill --decode-reports-cached \
  --proxy-port 31003 ${FILL:-} --out $out/${TAG:-bench} > $out/${TAG:-bench}.txt 2>&1
echo "bench rc=$?" >> $out/${TAG:-bench}.txt
touch /tmp/hold/stop; wait $hold
tail -60 $out/${TAG:-bench}.txt
