"""Start P, D and D2 as the e2e hand set starts them (offset 23000; D2 with CI's 8 MiB pool: 64
blocks of 128 tokens) and hold them until /tmp/hold/stop exists (max 40 min)."""
import os, signal, sys, time, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pdtui.core import config as config_mod
from tests.e2e.handset import hand_started, session_alive, wait_health
cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), 23000)
model = config_mod.model_path(cfg)
pc, dc = cfg.instances
folder = Path(tempfile.mkdtemp(prefix="pdtui-hold-"))
es = [hand_started("P", "prefill", pc.port, pc.side_channel_port, 0, model, folder),
      hand_started("D", "decode", dc.port, dc.side_channel_port, 1, model, folder),
      hand_started("D2", "decode", dc.port + 50, dc.side_channel_port + 50, 1, model, folder,
                   kv_cache_bytes=8 * 1024 * 1024)]
t0 = time.monotonic()
for e in es: e.start()
try:
    for e in es: wait_health(e.url, 420)
    print(f"ready after {time.monotonic()-t0:.1f}s folder {folder}", flush=True)
    for e in es: print(e.name, e.url, flush=True)
    deadline = time.monotonic() + 2400
    while not Path("/tmp/hold/stop").exists() and time.monotonic() < deadline:
        time.sleep(1)
finally:
    for e in es:
        try:
            for pid in session_alive(e.sessions()):
                os.kill(pid, signal.SIGKILL)
        except Exception as ex:
            print("kill", e.name, ex)
    print("stopped", flush=True)
