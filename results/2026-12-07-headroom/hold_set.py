"""Start the e2e hand set (offset 23000) and hold it until /tmp/hold/stop exists (max 40 min)."""
import os, signal, sys, time, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pdtui.core import config as config_mod
from tests.e2e.handset import hand_started, session_alive, wait_health


def hold(engines):
    """Start ``engines(pc, dc, model, folder)``'s list, print where they answer, hold them, kill them."""
    cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), 23000)
    model = config_mod.model_path(cfg)
    pc, dc = cfg.instances
    folder = Path(tempfile.mkdtemp(prefix="pdtui-hold-"))
    es = engines(pc, dc, model, folder)
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


if __name__ == "__main__":
    hold(lambda pc, dc, model, folder: [
        hand_started("P", "prefill", pc.port, pc.side_channel_port, 0, model, folder),
        hand_started("D", "decode", dc.port, dc.side_channel_port, 1, model, folder),
        hand_started("D2", "decode", dc.port + 50, dc.side_channel_port + 50, 1, model, folder,
                     kv_cache_bytes=16 * 1024 * 1024),
        hand_started("S", "single", pc.port + 50, None, 0, model, folder),
        hand_started("P2", "prefill", pc.port + 60, pc.side_channel_port + 60, 0, model, folder)])
