"""Faults the proxy injects into one request, for ``pdtui drill``'s field scenarios only.

Off unless the proxy runs with ``ProxySettings.drill`` (``pdtui drill`` turns it on for the pair it
drives; ``pdtui proxy --drill`` by hand); then a request may carry ``X-Pdtui-Drill`` with
``key=value`` pairs separated by commas:

- ``hold_decode_s=S``: wait S seconds (at most ``MAX_HOLD_S``) between P's answer and D's dispatch:
  the window in which a client that leaves strands P's blocks (llm-d #1138), made wide enough for a
  drill to leave in (a router under load has it by itself);
- ``tamper=KIND``: D is given ``kv_transfer_params`` other than P's (vLLM #52234's fail-open):
  ``reuse`` (the previous paired request's, whose blocks D already read and P freed), ``shift``
  (every block id + 1: in range, the wrong blocks), ``out_of_range`` (block ids past any pool),
  ``foreign_engine`` (an engine id no P has). P's own params are then released
  (``Proxy._release``), as for a D leg never sent.

Never on in a service: a tamper reads another request's KV (reuse), which is the point of the
drill and a leak anywhere else. A header without the setting is ignored; a malformed one with it
is a 400.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

HEADER = "x-pdtui-drill"
MAX_HOLD_S = 30.0
TAMPERS = ("reuse", "shift", "out_of_range", "foreign_engine")
OUT_OF_RANGE = 10**7
"""Added to every block id by ``out_of_range``: past the pool of any engine (a 2 TiB pool of 128 KiB
blocks has 16 M)."""
FOREIGN_ENGINE = "pdtui-drill-no-such-engine"


class DrillHeaderError(ValueError):
    """``X-Pdtui-Drill`` that cannot be read; the message names the part."""


@dataclass(frozen=True)
class DrillFaults:
    """What ``X-Pdtui-Drill`` asked of one request."""

    hold_decode_s: float = 0.0
    tamper: str | None = None


def parse(text: str) -> DrillFaults:
    """The header's faults; DrillHeaderError for an unknown key, a bad number or tamper kind."""
    hold, tamper = 0.0, None
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise DrillHeaderError(f"{HEADER}: {part!r} is not key=value")
        if key == "hold_decode_s":
            try:
                hold = float(value)
            except ValueError:
                raise DrillHeaderError(f"{HEADER}: hold_decode_s={value!r} is not a number") from None
            if not 0 <= hold <= MAX_HOLD_S:
                raise DrillHeaderError(f"{HEADER}: hold_decode_s must be 0 to {MAX_HOLD_S:g}, got {hold:g}")
        elif key == "tamper":
            if value not in TAMPERS:
                raise DrillHeaderError(f"{HEADER}: tamper={value!r}: one of {', '.join(TAMPERS)}")
            tamper = value
        else:
            raise DrillHeaderError(f"{HEADER}: no such key {key!r} (hold_decode_s, tamper)")
    return DrillFaults(hold, tamper)


def _map_blocks(ids: Any, f: Any) -> Any:
    """``remote_block_ids`` (flat, or a list per KV cache group) with ``f`` applied to each id."""
    if isinstance(ids, list):
        return [_map_blocks(x, f) for x in ids]
    return f(ids) if isinstance(ids, int) else ids


def tampered(kind: str, params: dict[str, Any], previous: dict[str, Any] | None, blocks_param: str) -> dict[str, Any]:
    """The params D gets instead of P's ``params`` (``previous``: the last paired request's, for
    reuse; None: there was none yet, and P's own go, shifted, so that D still reads wrong blocks)."""
    out = copy.deepcopy(params)
    if kind == "reuse" and previous is not None:
        return copy.deepcopy(previous)
    if kind in ("shift", "reuse"):
        out[blocks_param] = _map_blocks(out.get(blocks_param), lambda i: i + 1)
    elif kind == "out_of_range":
        out[blocks_param] = _map_blocks(out.get(blocks_param), lambda i: i + OUT_OF_RANGE)
    elif kind == "foreign_engine":
        out["remote_engine_id"] = FOREIGN_ENGINE
    return out
