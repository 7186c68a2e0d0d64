"""Run as a script: asks for the AMX tile state at import as __main__ and __mp_main__ (as
pdtui.engine.vllm_entry does), then runs the AMX probe in a spawn child."""
import ctypes
import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.environ["PDTUI_ROOT"])
from pdtui.engine import amx  # noqa: E402

if __name__ in ("__main__", "__mp_main__"):
    amx.request()


def child(q):
    q.put(ctypes.CDLL(os.environ["AMXPROBE"]).probe())


if __name__ == "__main__":
    ctx = mp.get_context(sys.argv[1])
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    p.join()
    print(f"{sys.argv[1]} child: exitcode {p.exitcode}", "probe " + str(q.get()) if p.exitcode == 0 else "")
