"""``python -m pdtui.core.reaper RUN_TAG``: kills what a pdtui left behind, once that pdtui is gone.

Started by the first instance a pdtui launches (``supervisor.ensure_reaper``), in a session of its
own so that Ctrl-C in the terminal does not reach it. Its stdin is a pipe whose write end only
that pdtui holds: when pdtui ends, however it ends (quit, crash, SIGTERM, ``kill -9``, the OOM
killer), the pipe reports end-of-file and the reaper SIGKILLs every process group pdtui told it about
(an instance's API server leads one: ``+PGID`` lines on the pipe, ``-PGID`` when it ended), every
process in those sessions (engine cores and workers that left the group keep the session), and
every process whose environment carries ``PDTUI_TAG=RUN_TAG...`` (the proxy; vLLM's renamed
engine processes no longer show theirs: setproctitle overwrites /proc/<pid>/environ); then it
removes the instances' temp folders (``supervisor.make_scratch``) and the emulated link's
namespaces and veths of a pdtui that is gone (``pdtui.core.link.clean_stale``). A pdtui that shut
down cleanly leaves nothing to kill.
"""

from __future__ import annotations

import contextlib
import signal
import sys

from pdtui.core import link
from pdtui.core.supervisor import kill_family, remove_scratch


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0]:
        print("usage: python -m pdtui.core.reaper RUN_TAG", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    groups: set[int] = set()
    try:
        for line in sys.stdin.buffer:  # "+PGID" / "-PGID" as instances start and end
            with contextlib.suppress(ValueError):
                pgid = int(line[1:])
                (groups.add if line[:1] == b"+" else groups.discard)(pgid)
    except OSError:
        pass
    kill_family(argv[0] + ":", groups, timeout_s=10.0)
    remove_scratch(argv[0])  # the engines' temp folders (supervisor.make_scratch)
    owner = argv[0].split("-")[0]  # RUN_TAG is "<pdtui's pid>-<hex>"
    with contextlib.suppress(Exception):  # its link (pdtui.core.link), now that nothing runs in it
        link.clean_stale(gone=[int(owner)] if owner.isdigit() else [])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
