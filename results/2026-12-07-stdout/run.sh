#!/bin/bash
# Issue 22: `pdtui proxy > /dev/null` and `pdtui up --headless > /dev/null` serve 1,000 streamed
# requests (fake engines, not vLLM); then the other stdout cases. Run from the repo root on the
# 2-core development box; the output is README.md's. BEFORE=REF also runs commit REF's pdtui (from
# `git archive` into /tmp) over the same fakes and client.
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=$PWD
date -u; nproc; uptime
$PY results/2026-12-07-stdout/serve_many.py --n 1000 --cases devnull
$PY results/2026-12-07-stdout/serve_many.py --n 1000 --cases closed,full_pipe,tty_gone
$PY results/2026-12-07-stdout/serve_many.py --n 1000 --cases full_pipe --buffer 65536
if [ -n "${BEFORE:-}" ]; then
  OLD=$(mktemp -d /tmp/pdtui-before.XXXX)
  git archive "$BEFORE" pdtui | tar -x -C "$OLD"
  echo "== before: $(git log -1 --format='%h %s' "$BEFORE" | cut -c1-80)"
  $PY results/2026-12-07-stdout/serve_many.py --n 1000 --cases devnull,closed,full_pipe,tty_gone --src "$OLD"
  $PY results/2026-12-07-stdout/hup_group.py "$OLD"
  rm -rf "$OLD"
fi
$PY results/2026-12-07-stdout/hup_group.py "$PWD"
