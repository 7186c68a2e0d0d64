#!/usr/bin/env bash
# docs/d-leg.md section c): one GPU run per hypothesis on nvidia-h200-x2 (after the 3 install calls),
# the 8B shape, pair only, 10 follow requests + 20 s of 32 streams and 4 big prompts/s. Beside it, D's
# /metrics scraped once a second ($OUT/<run>/d-metrics.txt), D's KV-transfer log lines
# ($OUT/<run>/d-log.txt), and the stall per big request ($OUT/<run>/stalls.csv).
#   bash results/2026-11-30-h200x2-dleg/dleg_h200x2.sh baseline|bigpool|block128|crosslayer|quiet
# Carry .whl. About 2.5 minutes each with the compile cache warm.
set -u
RUN=${1:?usage: $0 baseline|bigpool|block128|crosslayer|quiet}
REPO=$(pwd)
export OUT=${OUT:-/tmp/out}/$RUN; mkdir -p "$OUT"
SCRIPT=results/2026-11-30-h200x2-8b/economics_h200x2.sh
case "$RUN" in
baseline) export PDTUI_EXTRA_ARGS='["--attention-backend","FLASH_ATTN","--cudagraph-metrics"]' ;;
bigpool)  export PDTUI_EXTRA_ARGS='["--attention-backend","FLASH_ATTN","--cudagraph-metrics"]'
          sed 's/^kv_cache_memory_bytes = 17179869184/kv_cache_memory_bytes = 85899345920/' launch/two-gpu.toml > /tmp/two-gpu-80g.toml
          sed 's#--profile two-gpu#--profile /tmp/two-gpu-80g.toml#' $SCRIPT > /tmp/econ-80g.sh; SCRIPT=/tmp/econ-80g.sh ;;
block128) export PDTUI_BLOCK_SIZE=128 ;;
crosslayer) export PDTUI_KV_CONNECTOR_EXTRA_CONFIG='{"enable_cross_layers_blocks":"true"}' ;;
quiet)    export PDTUI_NIXL_PROGRESS_DELAY_US=1000 ;;
*) echo "unknown run $RUN" >&2; exit 2 ;;
esac
python3 -c 'import time,re,urllib.request as u
k=re.compile(r"^vllm:(nixl_(num_descriptors|post_time_seconds|xfer_time_seconds)_(bucket|sum|count)|request_(queue|prefill)_time_seconds_(sum|count)|time_to_first_token_seconds_(sum|count))")
while 1:
 time.sleep(1)
 try: t=u.urlopen("http://127.0.0.1:8200/metrics",timeout=2).read().decode()
 except Exception: continue
 print("T",time.time()); print("\n".join(l for l in t.splitlines() if k.match(l)),flush=True)' > "$OUT/d-metrics.txt" 2>/dev/null &
SP=$!
ARMS=pair REQUESTS=10 DURATION=20 LIMIT_S=${LIMIT_S:-260} bash "$SCRIPT" llama3.1-8b 4
rc=$?
kill $SP 2>/dev/null
grep -h -E "KV Transfer metrics|Runtime Mode|\| *(FULL|PIECEWISE|NONE) " "$(ls -td /root/pdtui-home/state/runs/*/ | head -1)D.log" | tail -300 > "$OUT/d-log.txt"
cd "$REPO" && python3 -c 'import gzip,json,os,bisect
d=json.loads(gzip.decompress(open(os.environ["OUT"]+"/bench-llama3.1-8b/bench.json.gz","rb").read()))
S=d["arms"]["pair"]["samples"]
B=sorted((s for s in S if s["workload"]=="big" and not s.get("warmup")),key=lambda s:s["t_send"])
G=sorted((b,(b-a)*1e3) for s in S if s["workload"]=="stream" for a,b in zip(s["chunk_t"],s["chunk_t"][1:]))
T=[g[0] for g in G]
print("i,t_s,big_ttft_ms,max_stream_gap_ms_next_300ms")
for i,s in enumerate(B):
 lo,hi=bisect.bisect_left(T,s["t_send"]),bisect.bisect_left(T,s["t_send"]+0.3)
 print(i,round(s["t_send"]-B[0]["t_send"],2),s["ttft_ms"],round(max([g[1] for g in G[lo:hi]] or [0]),1),sep=",")' > "$OUT/stalls.csv"
tail -3 "$OUT/stalls.csv"
exit $rc
