"""Topology: what a run is, typed and immutable. ``Runtime(topology)`` starts and watches it.

A topology is its members (each instance: name, role, URL, and how it comes to exist: launched
from a rendered command line, or attached by URL), the proxy in front of them (its address, its
settings, which members it sends prefills and decodes to) and the connector entry, resolved once.
Profiles and flags build one (``pair``); so do the bench's arms (``single``, ``single_proxied``,
``two_single``, ``pair`` with its switches: ``ARMS``) and any script. A new arm is one more builder
here; a new proxy switch is a field of ``ProxySettings`` plus the config field it is read from in
:func:`proxy_settings`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pdtui.core import config as config_mod
from pdtui.core import connectors, kvmath
from pdtui.core.config import InstanceConfig, LaunchSpec, PairConfig
from pdtui.core.proxy import ProxySettings


@dataclass(frozen=True)
class Member:
    """One engine instance of a topology."""

    name: str
    role: str
    """prefill | decode | single (a colocated instance: prefill and decode in one)."""
    url: str
    launch: LaunchSpec | None
    """The command line pdtui starts it with; None: attached (someone else serves ``url``)."""
    port: int | None = None
    side_channel_port: int | None = None


@dataclass(frozen=True)
class ProxyPlan:
    """pdtui's proxy in front of the members: where it listens, with what settings, and which
    members it sends the P leg to (``prefills``) and the D leg, or the whole request, to (``decodes``)."""

    host: str
    port: int
    settings: ProxySettings
    prefills: tuple[str, ...]
    decodes: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class Topology:
    name: str
    """pair | single | single-proxied | two-single | ... (the bench's arm names)."""
    cfg: PairConfig
    """The one config the command lines were rendered from: model, timeouts, host, ..."""
    members: tuple[Member, ...]
    proxy: ProxyPlan | None
    connector: connectors.Connector | None
    geometry: kvmath.KvGeometry | None
    warmup: bool
    """One P/D request through the proxy before the run is called ready (the pair's handshake)."""
    model: str
    """The model as the engines load it (a folder, or a Hugging Face id)."""

    @property
    def url(self) -> str:
        """Where clients send requests: the proxy, or the one member without one."""
        if self.proxy is not None:
            return self.proxy.url
        return self.members[0].url

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    def describe(self) -> str:
        """One line: the arm and its members, for logs and reports."""
        who = ", ".join(f"{m.name} ({m.role}{'' if m.launch else ', attached'}) {m.url}" for m in self.members)
        via = f" behind the proxy at {self.proxy.url}" if self.proxy else ""
        return f"{self.name}: {who}{via}"


def geometry_of(cfg: PairConfig, model: str) -> kvmath.KvGeometry | None:
    """The KV geometry of the model the engines load (its config.json), None when not readable."""
    path = Path(model)
    if (path / "config.json").exists():
        try:
            return kvmath.geometry_from_dir(path, cfg.kv_cache_dtype if cfg.kv_cache_dtype != "auto" else cfg.dtype)
        except (KeyError, ValueError, json.JSONDecodeError):
            return None
    return None


def proxy_settings(cfg: PairConfig, geometry: kvmath.KvGeometry | None, **override: object) -> ProxySettings:
    """The pair's proxy settings, from the config: the one place a config field becomes a switch.
    ``override``: the bench's per-arm switches (ProxySettings field names)."""
    switches = {f.name: getattr(cfg, f.name) for f in config_mod.proxy_switches()}
    settings = ProxySettings(block_size=cfg.block_size, geometry=geometry, connector=cfg.connector, **switches,
                             decode_reports_cached=True)  # every instance: --enable-prompt-tokens-details
    return dataclasses.replace(settings, **override) if override else settings  # type: ignore[arg-type]


def _launched(spec: LaunchSpec, inst: InstanceConfig) -> Member:
    return Member(spec.name, spec.role, spec.url, spec, inst.port, inst.side_channel_port)


def pair(cfg: PairConfig, *, model_root: Path | None = None, python: str | None = None,
         name: str = "pair", switches: Mapping[str, object] | None = None) -> Topology:
    """The P/D pair (or NpMd) of the config, behind pdtui's proxy; ``switches``: ProxySettings
    fields set for this topology only (the bench's switch arms)."""
    specs = config_mod.render(cfg, model_root=model_root, python=python)
    model = config_mod.model_path(cfg, model_root)
    geometry = geometry_of(cfg, model)
    members = tuple(_launched(s, i) for s, i in zip(specs, cfg.instances, strict=True))
    plan = ProxyPlan(cfg.host, cfg.proxy_port, proxy_settings(cfg, geometry, **(switches or {})),
                     tuple(m.name for m in members if m.role == "prefill"),
                     tuple(m.name for m in members if m.role == "decode"))
    return Topology(name, cfg, members, plan, connectors.known(cfg.connector), geometry, cfg.warmup, model)


def proxied_settings(block_size: int, decode_choice: str = "round-robin") -> ProxySettings:
    """The proxy in front of colocated instances (single-proxied, two-single): no prefill instance,
    every request to one of them as it is, picked round-robin by default."""
    return ProxySettings(block_size=block_size, decode_choice=decode_choice)


def _singles(cfg: PairConfig, name: str, where: list[tuple[str, InstanceConfig]], proxied: bool,
             model_root: Path | None, python: str | None, decode_choice: str = "round-robin") -> Topology:
    specs = [config_mod.render_single(cfg, model_root=model_root, python=python, name=n, inst=i) for n, i in where]
    model = config_mod.model_path(cfg, model_root)
    members = tuple(_launched(s, i) for s, (_, i) in zip(specs, where, strict=True))
    plan = None
    if proxied:
        # no prefill instance: every request goes to a colocated instance as it is (a plain relay),
        # round-robin over those up whatever their load: vLLM's own fair baseline (its
        # examples/disagg toy proxies pick round-robin too); with one instance it is that one
        plan = ProxyPlan(cfg.host, cfg.proxy_port, proxied_settings(cfg.block_size, decode_choice),
                         (), tuple(m.name for m in members))
    return Topology(name, cfg, members, plan, None, geometry_of(cfg, model), False, model)


def single(cfg: PairConfig, *, model_root: Path | None = None, python: str | None = None) -> Topology:
    """One colocated instance (P's port and core/GPU), measured at its own URL: no proxy."""
    return _singles(cfg, "single", [("S", cfg.prefills[0])], False, model_root, python)


def single_proxied(cfg: PairConfig, *, model_root: Path | None = None, python: str | None = None) -> Topology:
    """The single arm's instance behind the proxy, as the pair is: the proxy's own cost."""
    return _singles(cfg, "single-proxied", [("S", cfg.prefills[0])], True, model_root, python)


def two_single(cfg: PairConfig, *, model_root: Path | None = None, python: str | None = None) -> Topology:
    """Two colocated instances, on P's and D's port and core/GPU, behind the proxy, round-robin:
    the same hardware as the pair."""
    return _singles(cfg, "two-single", [("S1", cfg.prefills[0]), ("S2", cfg.decodes[0])], True, model_root, python)


def two_single_least_loaded(cfg: PairConfig, *, model_root: Path | None = None, python: str | None = None) -> Topology:
    """two-single with the proxy's least-loaded choice (fewest requests in flight, as the pair picks
    its D) instead of round-robin: whether a load-aware router alone buys what disaggregation does."""
    return _singles(cfg, "two-single-least-loaded", [("S1", cfg.prefills[0]), ("S2", cfg.decodes[0])], True,
                    model_root, python, decode_choice="least-loaded")


ARMS: dict[str, Callable[..., Topology]] = {
    "single": single,
    "single-proxied": single_proxied,
    "two-single": two_single,
    "two-single-least-loaded": two_single_least_loaded,
    "pair": pair,
}
"""The bench's arms by name: each builds its topology from the one config."""
