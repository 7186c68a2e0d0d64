"""Topology: what a run is, typed and immutable. ``Runtime(topology)`` starts and watches it.

A topology is its members (each instance: name, role, URL, and how it comes to exist: launched
from a rendered command line, or attached by URL), the proxy in front of them (its address, its
settings, which members it sends prefills and decodes to) and the connector entry, resolved once.
Profiles and flags build one (``pair``); so do the bench's arms (``single``, ``single_proxied``,
``two_single``, ``pair`` with its switches: ``ARMS``), engines someone else started (``attached``:
``pdtui attach`` and the bench's pair arms over them; ``attached_single``: the bench's ``--single``)
and any script. A new arm is one more builder
here; a new proxy switch is a field of ``ProxySettings`` plus the config field it is read from in
:func:`proxy_settings`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pdtui.core import config as config_mod
from pdtui.core import connectors, kvmath
from pdtui.core import link as link_mod
from pdtui.core.config import InstanceConfig, LaunchSpec, PairConfig
from pdtui.core.proxy import ProxySettings


@dataclass(frozen=True)
class Attach:
    """How pdtui follows and drives an engine it did not start (``pdtui attach``)."""

    log: Path | None = None
    """Its log file, followed as it grows (--log NAME=FILE); None: its metrics alone."""
    kill: str | None = None
    """A shell command that kills it (--kill NAME=CMD); None: the kill key is off."""
    restart: str | None = None
    """A shell command that restarts it (--restart NAME=CMD); None: the restart key is off."""
    command_timeout_s: float = 120.0
    """How long either command may run before it is killed and reported as failed."""


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
    attach: Attach | None = None
    """Attached members: their log and the user's kill and restart commands."""


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
    observe: bool = False
    """Observe only: engines behind someone else's router, no proxy; metrics (and witnesses) only."""
    router: str | None = None
    """Observe only: the user's router (--witness URL), where witness requests and the load keys go."""
    vllm_version: str | None = None
    """The engines' vLLM as they report it (/version), for attached ones; None: the one installed here."""
    link: link_mod.LinkPlan | None = None
    """The emulated link between P and D (pdtui.core.link): the Runtime makes it before the engines
    start, in their namespaces, and removes it when it closes. None: loopback."""

    @property
    def url(self) -> str:
        """Where clients send requests: the proxy, the user's router (observe), or the one member."""
        if self.proxy is not None:
            return self.proxy.url
        if self.router is not None:
            return self.router
        return self.members[0].url

    @property
    def all_attached(self) -> bool:
        """Every member attached: pdtui starts and stops none of them, so their state (their prefix
        caches) outlives this run; a launched topology starts every member afresh."""
        return all(m.launch is None for m in self.members)

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
                             max_model_len=cfg.max_model_len,
                             decode_reports_cached=True)  # every instance: --enable-prompt-tokens-details
    return dataclasses.replace(settings, **override) if override else settings  # type: ignore[arg-type]


def _launched(spec: LaunchSpec, inst: InstanceConfig) -> Member:
    return Member(spec.name, spec.role, spec.url, spec, inst.port, inst.side_channel_port)


def pair(cfg: PairConfig, *, model_root: Path | None = None, python: str | None = None,
         name: str = "pair", switches: Mapping[str, object] | None = None,
         link: link_mod.LinkPlan | None = None) -> Topology:
    """The P/D pair (or NpMd) of the config, behind pdtui's proxy; ``switches``: ProxySettings
    fields set for this topology only (the bench's switch arms). With an emulated link
    (``cfg.link``), ``link`` is the run's plan; none given, one is reserved here (its state file
    written: pdtui.core.link.reserve)."""
    config_mod.validate(cfg)
    spec = config_mod.link_spec(cfg)
    if spec.emulated and link is None:
        link = link_mod.reserve(spec)
    specs = config_mod.render(cfg, model_root=model_root, python=python, link=link if spec.emulated else None)
    model = config_mod.model_path(cfg, model_root)
    geometry = geometry_of(cfg, model)
    members = tuple(_launched(s, i) for s, i in zip(specs, cfg.instances, strict=True))
    plan = ProxyPlan(cfg.host, cfg.proxy_port, proxy_settings(cfg, geometry, **(switches or {})),
                     tuple(m.name for m in members if m.role == "prefill"),
                     tuple(m.name for m in members if m.role == "decode"))
    return Topology(name, cfg, members, plan, connectors.known(cfg.connector), geometry, cfg.warmup, model,
                    link=link if spec.emulated else None)


def attached_names(n: int, letter: str) -> list[str]:
    """P, or P1, P2, ... when there are several."""
    return [letter] if n == 1 else [f"{letter}{i}" for i in range(1, n + 1)]


def _attached_cfg(*, model_name: str, block_size: int, model: str | None, max_model_len: int | None, dtype: str,
                  kv_cache_dtype: str, host: str, proxy_port: int, ready_timeout_s: float, warmup: bool,
                  profile_name: str, switches: Mapping[str, object] | None,
                  traces_port: int | None) -> PairConfig:
    """The config of engines pdtui did not start: no instances (nothing to render), what they
    report of themselves, and pdtui's own side (the proxy's address and switches)."""
    cfg = PairConfig(model=model or model_name, served_model_name=model_name, block_size=block_size,
                     dtype=dtype, kv_cache_dtype=kv_cache_dtype, host=host, proxy_port=proxy_port,
                     ready_timeout_s=ready_timeout_s, warmup=warmup, profile_name=profile_name,
                     traces_port=traces_port)
    if max_model_len is not None:
        cfg.max_model_len = max_model_len
    for field_name, value in (switches or {}).items():
        setattr(cfg, field_name, value)
    return cfg


def attached(prefills: Sequence[str], decodes: Sequence[str], *, model_name: str, block_size: int,
             model: str | None = None, max_model_len: int | None = None, dtype: str = "auto",
             kv_cache_dtype: str = "auto", host: str = "127.0.0.1", proxy_port: int = 8000, observe: bool = False,
             router: str | None = None, attach: Mapping[str, Attach] | None = None, ready_timeout_s: float = 600.0,
             warmup: bool = True, decode_reports_cached: bool = False,
             switches: Mapping[str, object] | None = None, vllm_version: str | None = None,
             name: str = "attached", traces_port: int | None = None) -> Topology:
    """Engines someone else started (``vllm serve`` by hand, on this box or others), by URL:
    members named P (P1, P2, ...) and D (D1, D2, ...) in the order given, ``launch=None``.
    pdtui's proxy goes in front of them unless ``observe`` (then ``router``, the user's own, is
    where witness requests go). ``model_name``: what clients send as ``model``; ``model``: what the
    engines loaded (/v1/models root), for the KV geometry when it is readable here; the rest as
    the engines report it (pdtui.core.engine_facts). ``attach``: per member name, its log and commands.
    ``decode_reports_cached``: D runs with --enable-prompt-tokens-details, so the proxy's
    silent-recompute check can read D's usage (off: a D without it would read as recomputing).
    ``name``: "attached" for `pdtui attach`, the arm's for the bench's (pair, pair-first-token, ...)."""
    ps, ds = attached_names(len(prefills), "P"), attached_names(len(decodes), "D")
    extra = attach or {}
    members = tuple(Member(n, role, url.rstrip("/"), None, attach=extra.get(n, Attach()))
                    for names, urls, role in ((ps, prefills, "prefill"), (ds, decodes, "decode"))
                    for n, url in zip(names, urls, strict=True))
    cfg = _attached_cfg(model_name=model_name, block_size=block_size, model=model, max_model_len=max_model_len,
                        dtype=dtype, kv_cache_dtype=kv_cache_dtype, host=host, proxy_port=proxy_port,
                        ready_timeout_s=ready_timeout_s, warmup=warmup and not observe,
                        profile_name="observe" if observe else "attached", switches=switches,
                        traces_port=traces_port)
    geometry = geometry_of(cfg, cfg.model)
    plan = None if observe else ProxyPlan(
        host, proxy_port, proxy_settings(cfg, geometry, decode_reports_cached=decode_reports_cached),
        tuple(ps), tuple(ds))
    return Topology(name, cfg, members, plan, connectors.NIXL, geometry, cfg.warmup, cfg.model, observe=observe,
                    router=router.rstrip("/") if router else None, vllm_version=vllm_version)


def attached_single(url: str, *, proxied: bool, model_name: str, block_size: int, model: str | None = None,
                    max_model_len: int | None = None, dtype: str = "auto", kv_cache_dtype: str = "auto",
                    host: str = "127.0.0.1", proxy_port: int = 8000, ready_timeout_s: float = 600.0,
                    vllm_version: str | None = None, name: str | None = None) -> Topology:
    """One colocated engine someone else started (``pdtui bench --single URL``), named S,
    ``launch=None``: the single arm (measured at its own URL) or, ``proxied``, single-proxied
    (behind pdtui's proxy with no prefill instance, as :func:`single_proxied`)."""
    cfg = _attached_cfg(model_name=model_name, block_size=block_size, model=model, max_model_len=max_model_len,
                        dtype=dtype, kv_cache_dtype=kv_cache_dtype, host=host, proxy_port=proxy_port,
                        ready_timeout_s=ready_timeout_s, warmup=False, profile_name="attached", switches=None,
                        traces_port=None)
    member = Member("S", "single", url.rstrip("/"), None, attach=Attach())
    plan = ProxyPlan(host, proxy_port, proxied_settings(block_size), (), ("S",)) if proxied else None
    return Topology(name or ("single-proxied" if proxied else "single"), cfg, (member,), plan, None,
                    geometry_of(cfg, cfg.model), False, cfg.model, vllm_version=vllm_version)


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


def with_settings(topo: Topology, **fields: object) -> Topology:
    """``topo`` with its proxy's settings changed (ProxySettings field names): `pdtui drill` turns
    on ``drill`` (the field drills' per-request faults) for the pair it drives."""
    if topo.proxy is None:
        return topo
    settings = dataclasses.replace(topo.proxy.settings, **fields)  # type: ignore[arg-type]
    return dataclasses.replace(topo, proxy=dataclasses.replace(topo.proxy, settings=settings))


def with_argv(topo: Topology, name: str, flag: str, value: str) -> Topology:
    """``topo`` with launched member ``name``'s ``flag`` set to ``value`` in its command line,
    after the config's checks. The field drills that need a pair the config refuses (D with
    another max_model_len: `pdtui drill --scenario context`) bypass the refusal on purpose here,
    and only here. KeyError for a member that is not launched or not there."""
    member = next((m for m in topo.members if m.name == name and m.launch is not None), None)
    if member is None or member.launch is None:
        raise KeyError(f"no launched member {name!r} in {[m.name for m in topo.members]}")
    argv = list(member.launch.argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    spec = dataclasses.replace(member.launch, argv=argv)
    members = tuple(dataclasses.replace(m, launch=spec) if m is member else m for m in topo.members)
    return dataclasses.replace(topo, members=members)
