#!/bin/sh
# `pdtui up --headless --link 1gbit` from the CLI: ready, one request through the link, SIGTERM,
# then nothing left (namespaces, veths, state files). Run under the engine lock:
#   flock /tmp/pdtui-engines.lock timeout 600 sh results/2026-12-07-link/cli_sigterm.sh
set -u
export PYTHONPATH=$PWD PDTUI_HOME=$(mktemp -d /tmp/pdtui-link-cli-XXXX)
OFF=25600
.venv/bin/python -m pdtui up --headless --link 1gbit --port-offset $OFF > $PDTUI_HOME/events.jsonl 2> $PDTUI_HOME/stderr &
PID=$!
t0=$(date +%s)
until grep -q '"event": "pair_ready"\|"event":"pair_ready"' $PDTUI_HOME/events.jsonl 2>/dev/null; do
  sleep 1
  if ! kill -0 $PID 2>/dev/null; then echo "pdtui exited early"; tail -20 $PDTUI_HOME/stderr; exit 1; fi
  if [ $(( $(date +%s) - t0 )) -gt 400 ]; then echo "not ready in 400 s"; kill -TERM $PID; wait $PID; exit 1; fi
done
echo "ready after $(( $(date +%s) - t0 )) s; namespaces: $(ip netns list | grep pdtui- | tr '\n' ' ')"
grep -o '"link": {[^}]*}' $PDTUI_HOME/events.jsonl | head -1
curl -s localhost:$((8000 + OFF))/v1/completions -H 'Content-Type: application/json' \
  -d "{\"model\": \"tiny\", \"prompt\": \"$(head -c 3000 /dev/zero | tr '\0' 'x')\", \"max_tokens\": 4}" | head -c 300; echo
sleep 1
grep '"what": "kv_read"' $PDTUI_HOME/events.jsonl | tail -1 | head -c 400; echo
kill -TERM $PID
t1=$(date +%s.%N)
wait $PID; echo "pdtui exited $? after SIGTERM in $(echo "$(date +%s.%N) - $t1" | bc) s"
echo "namespaces left: [$(ip netns list | grep pdtui- | tr '\n' ' ')] veths left: [$(ip -br link | grep -c '^pd[lar]')]"
echo "state files left: [$(ls $PDTUI_HOME/state/links/ 2>/dev/null | grep -v '^\.lock$' | tr '\n' ' ')]"
tail -3 $PDTUI_HOME/stderr
