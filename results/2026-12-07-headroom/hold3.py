"""Start P, D and D2 as the e2e hand set starts them (offset 23000; D2 with CI's 8 MiB pool: 64
blocks of 128 tokens) and hold them until /tmp/hold/stop exists (max 40 min): hold_set.hold."""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hold_set import hand_started, hold

hold(lambda pc, dc, model, folder: [
    hand_started("P", "prefill", pc.port, pc.side_channel_port, 0, model, folder),
    hand_started("D", "decode", dc.port, dc.side_channel_port, 1, model, folder),
    hand_started("D2", "decode", dc.port + 50, dc.side_channel_port + 50, 1, model, folder,
                 kv_cache_bytes=8 * 1024 * 1024)])
