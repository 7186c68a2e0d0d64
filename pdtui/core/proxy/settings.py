"""The proxy's settings (``ProxySettings``): what the proxy is told once, at its start.

One definition, three ways in: Python (the Runtime, the bench and the tests build one); the proxy's
own process, which ``ProxyProcess`` hands them whole as ``--settings JSON`` (``to_json`` and
``from_json``, the KV geometry included); and the standalone ``pdtui proxy`` command, whose flags
are made from the fields' metadata (``flag()``; ``add_flags`` and ``from_flags``). Adding a switch
is a field here, with its help, and the code that uses it; a field without ``flag()`` metadata is
set from Python only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdtui.core import connectors, kvmath
from pdtui.core.proxy.routing import DECODE_CHOICES

PREFILL_FAILURE_POLICIES = ("retry", "decode-locally")
MIGRATE_POLICIES = ("off", "via-prefill", "on-decode")

Rule = tuple[str, Callable[[Any], bool]]
AT_LEAST_1: Rule = ("at least 1", lambda v: v >= 1)
POSITIVE: Rule = ("positive", lambda v: v > 0)


class ProxyOptionError(ValueError):
    """A proxy setting or option that cannot be used; the message names it as it was given."""


def flag(name: str, help: str, *, choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
         rule: Rule | None = None, metavar: str | None = None,
         read: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """A field's metadata: its ``pdtui proxy`` flag and help. A bool field is a switch; any other
    takes a value of the field's type, or ``read``'s from the flag's text. ``choices`` (or a
    function giving them, read when used) and ``rule`` bound the value, from Python too."""
    return {"flag": name, "help": help, "choices": choices, "rule": rule, "metavar": metavar, "read": read}


def _positive_int(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ProxyOptionError(f"{name} {text!r}: expected a whole number") from None
    if value < 1:
        raise ProxyOptionError(f"{name} must be at least 1, got {value}")
    return value


def _geometry_from_dir(text: str) -> kvmath.KvGeometry:
    model = Path(text)
    if not (model / "config.json").exists():
        raise ProxyOptionError(f"--model {model}: no config.json there")
    return kvmath.geometry_from_dir(model, "auto")


@dataclass(frozen=True)
class ProxySettings:
    block_size: int = field(default=16, metadata=flag(
        "--block-size", "the engines' KV block size, for the freight (default 16)", rule=AT_LEAST_1))
    geometry: kvmath.KvGeometry | None = field(default=None, metadata=flag(
        "--model", "a model directory with config.json: per-token KV bytes for the freight (kv_bytes)",
        metavar="DIR", read=_geometry_from_dir))
    """What one token of KV costs (None: kv_bytes is not counted)."""
    decode_choice: str = field(default="least-loaded", metadata=flag(
        "--decode-choice", "how a decode instance is picked: least-loaded (fewest requests in flight), round-robin,"
        " or headroom (the least loaded of those whose free KV blocks, less those promised to requests in"
        " flight, hold this request's; with it, `pdtui proxy` also polls each engine's /metrics)"
        " (default least-loaded)", choices=DECODE_CHOICES))
    """How a decode instance is picked (pdtui.core.proxy.routing): "least-loaded" (fewest requests
    in flight, ties to the first: the pair's default), "round-robin" (each request to the next
    instance that is up, in list order, whatever their load: vLLM's examples/disagg toy proxies, the
    bench's two-single) or "headroom" (the least loaded of the D's whose free KV blocks less those
    promised to requests in flight hold the blocks this request needs, a D with no scrape under 3 s
    old counted among them; none: the one with the most). Each trace says why its D was chosen
    (``decode_reason``)."""
    max_model_len: int | None = field(default=None, metadata=flag(
        "--max-model-len", "the engines' max_model_len: how far a chat request without max_tokens may grow"
        " (the headroom choice's need; default: not counted)", metavar="N", rule=AT_LEAST_1,
        read=lambda v: _positive_int("--max-model-len", v)))
    """The engines' max_model_len: the room a chat request without max_tokens may take on D (the
    headroom choice counts it as the request's growth). None: such growth is not counted."""
    prefill_failure: str = field(default="retry", metadata=flag(
        "--prefill-failure", "when P fails after the request reached it: retry (502/503/504 or a broken connection"
        " are sent once more, to another P if there is one, then the client gets the error; other"
        " 5xx: the error) or decode-locally (D computes the prompt itself: pdtui's behaviour before"
        " issue 14, which slows every other stream on D). No P up or no connection to P falls"
        " back to D either way (default retry)", choices=PREFILL_FAILURE_POLICIES))
    """What a P failure after dispatch does: "retry" (502/503/504 or a broken connection: one more
    try, on another P if there is one, then an error; other 5xx: an error) or "decode-locally"
    (pdtui before issue 14: D computes the prompt itself, a fallback)."""
    tokenize_once: bool = field(default=False, metadata=flag(
        "--tokenize-once", "/v1/completions: D gets the prompt as P's token ids and does not tokenize it again"))
    """P is asked for its token ids (``return_token_ids``) and D gets the prompt as those ids, so D
    does not tokenize it again (docs/ttft-toll.md). Chat: D gets /v1/completions from the rendered
    prompt's ids, and the proxy writes its answer back as chat (every chunk rewritten)."""
    first_token_from_p: bool = field(default=False, metadata=flag(
        "--first-token-from-p", "/v1/completions: P's token goes to the client the moment P answers; D continues"
        " from the prompt plus that token (the same output, token for token, under greedy sampling)"))
    """P's sampled token goes to the client the moment P answers, and D continues from the prompt's
    ids plus that token with max_tokens - 1 (``pdtui.core.proxy.firsttoken``), for completions and chat.
    Requests it cannot serve token for token (n > 1, echo, logprobs, stop strings, tools, ...) take
    the normal path, counted in ``pdtui_switch_skipped_total``."""
    decode_reports_cached: bool = field(default=False, metadata=flag(
        "--decode-reports-cached", "the decode instances run with --enable-prompt-tokens-details: record, per"
        " paired request, the prompt tokens D computed itself, and count more than one block as a silent"
        " recompute (pdtui up starts its instances so)"))
    """The decode instances run with ``--enable-prompt-tokens-details`` (``pdtui up`` starts them
    so): on a paired request the proxy records how many prompt tokens D computed itself and counts
    more than one block as a silent recompute (pdtui.core.proxy.contract's docstring). vLLM 0.22.1
    leaves prompt_tokens_details out when D cached nothing, which only this setting lets the proxy
    read as 0. False: D's params and usage pass as they are, and d_computed_tokens stays None."""
    prefill_timeout_s: float = field(default=300.0, metadata=flag(
        "--prefill-timeout", "seconds for the whole P leg (default 300)", rule=POSITIVE))
    """Whole P leg (the first request after start-up can stall for tens of seconds)."""
    decode_read_timeout_s: float = field(default=300.0, metadata=flag(
        "--decode-timeout", "longest silence from D before its stream is called broken, seconds (default 300)",
        rule=POSITIVE))
    """Longest silence from D (before its answer's head, or while streaming) before it is called broken."""
    connect_timeout_s: float = 5.0
    """To open a connection to an upstream."""
    migrate: str = field(default="via-prefill", metadata=flag(
        "--migrate", "when a decode instance dies under a stream and another is up, continue the stream there:"
        " via-prefill (P prefills the prompt plus the tokens sent, the new D pulls that KV: a second transfer),"
        " on-decode (the new D computes it all) or off (an error event, as with one D). Only with two decode"
        " instances or more (default via-prefill)", choices=MIGRATE_POLICIES))
    """What the proxy does when D breaks a paired stream after its first token while another D is up
    (``pdtui.core.proxy.migrate``, docs/proxy.md "Migration"): "via-prefill" (P prefills the prompt
    plus the tokens already sent, the new D pulls that KV and continues), "on-decode" (the new D
    computes prompt and tokens itself) or "off" (the final SSE error event). With one D there is
    nowhere to go: the error event, whatever this says."""
    migrate_max: int = field(default=1, metadata=flag(
        "--migrate-max", "migrations per request at most (default 1)", rule=AT_LEAST_1))
    """Migrations per request at most; a death past them ends the stream with the error event."""
    migrate_timeout_s: float = field(default=30.0, metadata=flag(
        "--migrate-timeout", "seconds for a migration to get the new D's answer head, P's leg included"
        " (default 30)", rule=POSITIVE))
    """From the break to the new D's answer head (P's leg included); past it, the error event."""
    connector: str = field(default=connectors.NIXL.name, metadata=flag(
        "--connector", f"the KV connector the engines run: the names of the kv_transfer_params the proxy sends P"
        f" and reads in P's answer (default {connectors.NIXL.name})", choices=lambda: (*connectors.CONNECTORS,
                                                     *(c.name for c in connectors.CONNECTORS.values()))))
    """The KV connector the engines run (``pdtui.core.connectors``): the names of the
    kv_transfer_params the proxy sends P and reads in P's answer come from its entry."""

    drill: bool = field(default=False, metadata=flag(
        "--drill", "honour X-Pdtui-Drill on a request: faults injected for `pdtui drill`'s field scenarios (D's"
        " dispatch held, D given tampered kv_transfer_params). Never on in a service: a tamper reads another"
        " request's KV"))
    """Honour ``X-Pdtui-Drill`` (pdtui.core.proxy.drillhooks): the field drills' per-request faults.
    ``pdtui drill`` turns it on for the pair it drives; never on in ``up`` or ``attach``."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if (why := _refused(f, getattr(self, f.name))) is not None:
                raise ProxyOptionError(f"{f.name} {why}")

    def to_json(self) -> str:
        """Every field, as one line of JSON (the KV geometry as an object)."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ProxySettings:
        """The settings ``to_json`` wrote; a field left out keeps its default."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProxyOptionError(f"settings: not JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ProxyOptionError("settings: expected a JSON object")
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(raw) - set(hints))
        if unknown:
            raise ProxyOptionError(f"settings: no such field: {', '.join(unknown)}")
        return cls(**{name: _from_json_value(hints[name], value) for name, value in raw.items()})


def _from_json_value(hint: Any, value: Any) -> Any:
    """``value`` as the field's type: a dataclass (the KV geometry) from its object."""
    for t in typing.get_args(hint) or (hint,):
        if dataclasses.is_dataclass(t) and isinstance(t, type) and isinstance(value, dict):
            return t(**value)
    return value


def _refused(f: dataclasses.Field[Any], value: Any) -> str | None:
    """Why ``value`` is no value for field ``f`` (its metadata's choices and rule), or None."""
    meta = f.metadata
    if value is None or not meta:
        return None
    choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
    if choices is not None and value not in choices:
        return f"{value!r}: one of {', '.join(choices)}"
    if meta["rule"] is not None and not meta["rule"][1](value):
        return f"must be {meta['rule'][0]}, got {value!r}"
    return None


def _flagged() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(ProxySettings) if f.metadata.get("flag")]


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The settings' flags, in the fields' order (their metadata: ``flag()``)."""
    for f in _flagged():
        meta = f.metadata
        name, help_ = meta["flag"], meta["help"]
        if f.type in (bool, "bool"):
            parser.add_argument(name, dest=f.name, action="store_true", default=None, help=help_)
            continue
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        metavar = meta["metavar"] or (None if choices else name.lstrip("-").upper().replace("-", "_"))
        parser.add_argument(name, dest=f.name, default=None, choices=choices, metavar=metavar, help=help_,
                            type=str if meta["read"] else type(f.default))


def from_flags(args: argparse.Namespace) -> ProxySettings:
    """The settings from ``add_flags``'s flags: each one given, checked and read; the others default."""
    given: dict[str, Any] = {}
    for f in _flagged():
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if (read := f.metadata["read"]) is not None:
            value = read(value)
        elif (why := _refused(f, value)) is not None:
            raise ProxyOptionError(f"{f.metadata['flag']} {why}")
        given[f.name] = value
    return ProxySettings(**given)
