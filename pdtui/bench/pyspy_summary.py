"""Where a Python proxy's CPU goes: a summary of ``py-spy record --format raw`` (collapsed stacks).

    python -m pdtui.bench.pyspy_summary proxy.raw [--us-per-chunk 120]

py-spy samples only threads that are not idle, so the samples are on-CPU time. Three views:

- own time by layer: the module of the innermost Python frame (a C call, e.g. ``sock.send`` or
  ``json.loads``'s scanner, counts in its Python caller);
- what the sample was doing: the first role, in a fixed priority order, that any frame of the
  stack matches (the per-chunk SSE parse, the send to the client, the upstream receive, ...);
- the top functions by own and by cumulative time.

With ``--us-per-chunk`` (the bench's proxy CPU per chunk) each line also says how many
microseconds of a chunk it is. ``python -m pdtui.bench.transparency --py-spy`` writes one of these
for every Python proxy arm.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+?)(?::(?P<line>\d+))?\)$")
Frames = list[tuple[str, str]]

_ASYNCIO_TASKS = ("asyncio/tasks", "asyncio/futures", "asyncio/locks", "asyncio/queues", "asyncio/timeouts",
                  "asyncio/mixins")
LAYERS: list[tuple[str, Callable[[str], bool]]] = [
    ("event loop in C (uvloop: epoll, socket syscalls; no Python frame above asyncio.Runner.run)",
     lambda f: f.startswith("asyncio/runners")),
    ("asyncio socket I/O (selector_events: recv/send syscalls, transport write)",
     lambda f: f.startswith("asyncio/selector_events")),
    ("asyncio loop (epoll select, _run_once, Handle._run)",
     lambda f: f.startswith(("asyncio/base_events", "asyncio/events", "selectors"))),
    ("asyncio tasks/futures (task switching, current_task, wait)", lambda f: f.startswith(_ASYNCIO_TASKS)),
    ("asyncio other (streams, runners, ...) and contextlib", lambda f: f.startswith(("asyncio/", "contextlib"))),
    ("uvicorn + httptools (server side: request parse, ASGI send/receive)",
     lambda f: f.startswith(("uvicorn/", "httptools"))),
    ("h11 (httpcore's HTTP/1.1 parser: the upstream's chunked body)", lambda f: f.startswith("h11/")),
    ("httpcore (upstream connection, body iteration)", lambda f: f.startswith("httpcore/")),
    ("httpx (client, Response.aiter_raw)", lambda f: f.startswith("httpx/")),
    ("anyio / sniffio (httpcore's async backend: cancel scopes, stream receive)",
     lambda f: f.startswith(("anyio/", "sniffio/"))),
    ("json (stdlib)", lambda f: f.startswith("json/")),
    ("prometheus_client", lambda f: f.startswith("prometheus_client/")),
    ("pdtui httpio (HTTP/1.1 on asyncio protocols)", lambda f: f.endswith("proxy/httpio.py")),
    ("pdtui proxy code (own lines)", lambda f: "legacy_proxy" in f or "pdtui/core/" in f),
]

ROLES: list[tuple[str, Callable[[str, str], bool]]] = [
    ("per-chunk SSE scan in pdtui (_SseTimer: event split + json.loads; SseScan)",
     lambda fn, f: fn.startswith(("_SseTimer.", "_SseScan.", "SseScan."))),
    ("relay send to the client (uvicorn RequestResponseCycle.send + transport write)",
     lambda fn, f: f.startswith("uvicorn/") and fn.endswith(".send")),
    ("upstream receive (httpx aiter_raw -> httpcore -> h11 -> anyio -> socket recv)",
     lambda fn, f: f.startswith(("httpx/", "httpcore/", "h11/", "anyio/"))),
    ("client side receive (uvicorn httptools data_received / ASGI receive)", lambda fn, f: f.startswith("uvicorn/")),
    ("pdtui httpio (relay inside data_received, client/server connections)",
     lambda fn, f: f.endswith("proxy/httpio.py")),
    ("prometheus_client", lambda fn, f: f.startswith("prometheus_client/")),
    ("pdtui proxy per-request code (body, trace, P leg, metrics)",
     lambda fn, f: "legacy_proxy" in f or "pdtui/core/" in f),
    ("asyncio task switching (Task.__step, futures, wait)", lambda fn, f: f.startswith(_ASYNCIO_TASKS)),
    ("asyncio socket callbacks (_read_ready -> data_received) outside the above",
     lambda fn, f: f.startswith("asyncio/selector_events")),
    ("asyncio loop itself (epoll, _run_once, handles)", lambda fn, f: f.startswith(("asyncio/", "selectors"))),
]
_LOOP_ENTRY = ("Runner.run", "BaseEventLoop.run_forever", "BaseEventLoop.run_until_complete")

_ENTRY = ("_run_module_as_main", "_run_code", "<module>", "main (", "serve_inproc_proxy", "run (",
          "Runner.run", "BaseEventLoop.run_until_complete", "BaseEventLoop.run_forever", "serve (")


def parse(lines: Iterator[str]) -> Iterator[tuple[Frames, int]]:
    for line in lines:
        line = line.rstrip("\n")
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = []
        for f in stack.split(";"):
            if f.startswith(("process ", "thread ")):  # py-spy --subprocesses / --threads prefixes
                continue
            m = _FRAME.match(f)
            frames.append((m["func"], m["file"]) if m else (f, "?"))
        if frames:
            yield frames, int(n)


def layer_of(file: str) -> str:
    for name, pred in LAYERS:
        if pred(file):
            return name
    return f"other ({file.split('/')[0]})"


def role_of(frames: Frames) -> str:
    """Only the frames above the event loop's entry count (the entry is pdtui code too)."""
    cut = max((i for i, (fn, _) in enumerate(frames) if fn in _LOOP_ENTRY), default=-1)
    above = frames[cut + 1:]
    if not above:
        return "event loop in C (uvloop) or startup: no Python frame above the loop's entry"
    for name, pred in ROLES:
        if any(pred(fn, f) for fn, f in above):
            return name
    return "other"


def summarize(text: str, us_per_chunk: float | None = None, top: int = 15, title: str = "") -> str:
    total = 0
    own_layer: Counter[str] = Counter()
    own_fn: Counter[str] = Counter()
    cum_fn: Counter[str] = Counter()
    roles: Counter[str] = Counter()
    for frames, n in parse(iter(text.splitlines())):
        total += n
        fn, f = frames[-1]
        own_layer[layer_of(f)] += n
        own_fn[f"{fn} ({f})"] += n
        for key in {f"{a} ({b})" for a, b in frames}:
            cum_fn[key] += n
        roles[role_of(frames)] += n
    if not total:
        return f"{title}no samples"

    def line(name: str, n: int) -> str:
        us = f"  {us_per_chunk * n / total:6.1f} us/chunk" if us_per_chunk else ""
        return f"  {100 * n / total:5.1f}%{us}  {name}"

    cpu = f"; proxy CPU {us_per_chunk:.0f} us/chunk" if us_per_chunk else ""
    out = [f"{title}py-spy samples on CPU: {total}{cpu}",
           "", "OWN time by layer (the innermost Python frame's module; C calls count in their Python caller):"]
    out += [line(k, n) for k, n in own_layer.most_common() if 100 * n / total >= 0.5]
    rest = sum(n for n in own_layer.values() if 100 * n / total < 0.5)
    if rest:
        out.append(line("(layers under 0.5% each)", rest))
    out += ["", "What the sample was doing (first role in this order that any frame of its stack matches):"]
    out += [line(k, n) for k, n in roles.most_common()]
    out += ["", f"Top {top} functions by OWN time:"]
    out += [line(k, n) for k, n in own_fn.most_common(top)]
    out += ["", f"Top {top} functions by CUMULATIVE time (below the event loop's entry):"]
    out += [line(k, n) for k, n in cum_fn.most_common(200) if not k.startswith(_ENTRY)][:top]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdtui.bench.pyspy_summary", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", help="py-spy record --format raw output")
    ap.add_argument("--us-per-chunk", type=float, help="the proxy's CPU per chunk, to turn shares into microseconds")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    with open(args.raw) as f:
        print(summarize(f.read(), args.us_per_chunk, args.top), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
