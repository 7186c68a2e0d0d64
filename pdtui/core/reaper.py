"""``python -m pdtui.core.reaper RUN_TAG``: kills what a pdtui left behind, once that pdtui is gone.

Started by the first instance a pdtui launches (``supervisor.ensure_reaper``), in a session of its
own so that Ctrl-C in the terminal does not reach it. Its stdin is a pipe whose write end only
that pdtui holds: when pdtui ends, however it ends (quit, crash, SIGTERM, ``kill -9``, the OOM
killer), the pipe reports end-of-file and the reaper SIGKILLs every process whose environment
carries ``PDTUI_TAG=RUN_TAG...``: the engines, their engine cores and workers (also any that
left their process group), the proxy. A pdtui that shut down cleanly leaves nothing to kill.
"""

from __future__ import annotations

import signal
import sys

from pdtui.core.supervisor import kill_tagged


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0]:
        print("usage: python -m pdtui.core.reaper RUN_TAG", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    kill_tagged(argv[0] + ":", timeout_s=10.0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
