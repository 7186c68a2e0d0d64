#!/usr/bin/env bash
# The AMX permission on a real AMX CPU (the device machine's host CPU), without vLLM:
#   A: a process that never asked runs one AMX tile sequence       -> expect SIGILL (rc -4 / 132)
#   B: pdtui.engine.amx.request() first, then the same              -> expect 42
#   C: asked in the parent, probe in a fork child                   -> inherited
#   D: asked in the parent, probe in a freshly exec'd python        -> cleared by execve?
#   E/F: spawn_main.py (asks at import as __main__/__mp_main__, like vllm_entry), spawn and forkserver child
# Run from the repo root: bash results/2026-12-07-amx/amx_probe.sh
set -u
here=results/2026-12-07-amx
export PDTUI_ROOT=$PWD AMXPROBE=$PWD/$here/amxprobe.so
PY=${PY:-python3}
lscpu | grep -E 'Model name|^CPU\(s\)'; grep -o 'amx[a-z0-9_]*' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
uname -r
$PY -c "import torch; print('torch', torch.__version__, 'amx tile supported:', torch.cpu._is_amx_tile_supported())" 2>/dev/null
probe="import ctypes, os; print('probe', ctypes.CDLL(os.environ['AMXPROBE']).probe())"
echo "== A: no request";            $PY -c "$probe"; echo "rc $?"
echo "== B: request, then probe";   $PY -c "import sys; sys.path.insert(0, '$PWD'); from pdtui.engine import amx; print(amx.request()); $probe"; echo "rc $?"
echo "== C: request, fork child";   $PY -c "
import os, sys, ctypes; sys.path.insert(0, '$PWD'); from pdtui.engine import amx; print(amx.request())
pid = os.fork()
if pid == 0:
    ctypes.CDLL(os.environ['AMXPROBE']).probe(); os._exit(0)
print('fork child status', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))"; echo "rc $?"
echo "== D: request, exec child";   $PY -c "
import subprocess, sys; sys.path.insert(0, '$PWD'); from pdtui.engine import amx; print(amx.request())
r = subprocess.run([sys.executable, '-c', \"$probe\"]); print('exec child rc', r.returncode)"; echo "rc $?"
echo "== E: spawn";      $PY $here/spawn_main.py spawn; echo "rc $?"
echo "== F: forkserver"; $PY $here/spawn_main.py forkserver; echo "rc $?"
echo "== G: PDTUI_AMX_REQUEST=0 (the way to reproduce)"; PDTUI_AMX_REQUEST=0 $PY -c "import sys; sys.path.insert(0, '$PWD'); from pdtui.engine import amx; print(amx.request()); $probe"; echo "rc $?"
echo "== H: the C probe (no Python): ask, then a tile sequence"; $here/amxperm; echo "rc $?"
echo "== I: the C probe without asking"; $here/amxperm noask; echo "rc $?"
python3 - <<'PY' 2>/dev/null || true
import torch
print("torch._init_amx():", torch.cpu._init_amx())
a = torch.randn(256, 256, dtype=torch.bfloat16); print("bf16 matmul ok:", float((a @ a).float().sum()) == float((a @ a).float().sum()))
PY
