#!/usr/bin/env python3
"""What a chunk of D's stream costs the proxy in CPU, per relay: the default byte relay, the
first-token stitch (completions), and chat served from D's /v1/completions (tokenize_once, and
first_token_from_p), which rewrites every chunk (pdtui.core.proxy.firsttoken.ChatStream).

No engine, no socket: the relay's chunk callback is called with vLLM 0.32.0's own events (the shapes
the CPU engine sent, a token of ``--text`` per event, token ids if ``--ids``), one event per chunk as
vLLM writes them, into a response that only counts bytes. So the figure is the proxy's Python work
per chunk (scan, rewrite, timing), without the write to the client's socket, which every relay
pays alike. Printed: microseconds per chunk, the best of ``--repeat`` runs of ``--chunks`` chunks
(process CPU time), and the extra over the byte relay.

    PYTHONPATH=. .venv/bin/python scripts/bench/chat_relay_cost.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pdtui.core.proxy import Upstream, firsttoken
from pdtui.core.proxy.relay import Stitch, relay_for
from pdtui.core.proxy.trace import Trace


class _NullConn:
    on_chunk = None

    def attach(self, on_chunk, on_end) -> None:
        self.on_chunk = on_chunk  # what the upstream connection would call per chunk

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


class _CountingResponse:
    lost = False

    def __init__(self) -> None:
        self.bytes = 0
        self.on_lost = self.on_pause = self.on_resume = None

    def start(self, status, headers) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.bytes += len(data)

    def finish(self, data: bytes = b"") -> None:
        self.bytes += len(data)


def completion_event(i: int, text: str, ids: bool) -> bytes:
    """One of vLLM 0.32.0's /v1/completions stream events (CompletionStreamResponse, exclude_unset)."""
    obj = {"id": "cmpl-r1", "object": "text_completion", "created": 1796021625, "model": "tiny",
           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None, "stop_reason": None,
                        "prompt_token_ids": None, "token_ids": [1000 + i % 3000] if ids else None}]}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chat_event(i: int, text: str, ids: bool) -> bytes:
    """One of vLLM 0.32.0's /v1/chat/completions stream events (what the normal path relays for chat)."""
    obj = {"id": "chatcmpl-r1", "object": "chat.completion.chunk", "created": 1796021625, "model": "tiny",
           "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None,
                        "token_ids": [1000 + i % 3000] if ids else None}]}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def p_answer(chat: bool) -> firsttoken.PAnswer:
    raw = {"id": "chatcmpl-r1", "object": "chat.completion", "created": 1796021625, "model": "tiny"} if chat else None
    return firsttoken.PAnswer(id="chatcmpl-r1" if chat else "cmpl-r1", created=1796021625, model="tiny",
                              text=" w1", token_id=1, prompt_ids=list(range(2031)), finish_reason="length",
                              stop_reason=None, raw=raw)


def make(kind: str, ids: bool):
    chat = kind.startswith("chat")
    endpoint = firsttoken.CHAT if chat else firsttoken.COMPLETIONS
    trace = Trace("r1", endpoint, True)
    resp = _CountingResponse()
    up, conn = Upstream("D", "decode", "http://127.0.0.1:1"), _NullConn()
    now = time.perf_counter()
    if kind in ("relay", "relay-chat"):
        stitch = None
    elif kind == "stitch":
        stitch = Stitch(p_answer(False), ids, t_first=now)
    else:
        first = kind == "chat-first-token"
        stitch = Stitch(p_answer(True), ids, t_first=now if first else None, first=first, chat=True)
    relay = relay_for(trace, up, conn, resp, now, stitch)  # type: ignore[arg-type]
    relay.start(b"text/event-stream; charset=utf-8")
    return relay, conn.on_chunk, resp


KINDS = {
    "relay": "byte relay, /v1/completions (default path)",
    "relay-chat": "byte relay, chat (default path)",
    "stitch": "first_token_from_p, /v1/completions (byte edits on 2 rare events)",
    "chat-tokenize-once": "chat from D's /v1/completions, tokenize_once (every chunk rewritten)",
    "chat-first-token": "chat from D's /v1/completions, first_token_from_p (every chunk rewritten)",
}


async def measure(kind: str, args: argparse.Namespace) -> float:
    make_event = chat_event if kind == "relay-chat" else completion_event
    events = [make_event(i, args.text, args.ids) for i in range(args.chunks)]
    best = float("inf")
    for _ in range(args.repeat):
        relay, on_chunk, resp = make(kind, args.ids)
        t0 = time.process_time()
        for ev in events:
            on_chunk(ev)
        dt = time.process_time() - t0
        assert resp.bytes > 0 and relay.trace.chunks == len(events), (kind, relay.trace.chunks)
        best = min(best, dt)
    return best / args.chunks * 1e6


async def main(args: argparse.Namespace) -> int:
    if args.json_only:  # every event through ChatStream's JSON parse and dump: no byte fast path
        firsttoken._TOKEN_EVENT = re.compile(rb"(?!)")
    print(f"per chunk, best of {args.repeat} x {args.chunks} chunks, token text {args.text!r},"
          f" token ids {'on' if args.ids else 'off'}{', JSON path only' if args.json_only else ''}"
          f" (python {sys.version.split()[0]})")
    base = None
    for kind, what in KINDS.items():
        us = await measure(kind, args)
        base = us if base is None else base
        print(f"| {kind} | {us:.2f} us | {us - base:+.2f} us | {what} |")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--text", default=" w1683", help="each event's token text")
    ap.add_argument("--ids", action="store_true", help="events with token_ids (return_token_ids)")
    ap.add_argument("--json-only", action="store_true", help="chat: no byte fast path, every event parsed")
    sys.exit(asyncio.run(main(ap.parse_args())))
