"""Preflight: refuse a launch that cannot work on this machine, before anything is started.

``preflight(cfg)`` is called by ``pdtui up``, ``pdtui drill``, ``pdtui bench``, ``pdtui preflight``
and ``pdtui config`` (which reports ports in use as a note, not a refusal: it launches nothing). It checks:

- ``device``: "cuda" on a machine with no NVIDIA GPU (``config.has_gpu()``);
- ``model``: a synthetic shape, a path that exists (a folder with a config.json or params.json),
  or a Hugging Face id in the local hub cache (offline: pdtui downloads nothing);
- ``connector``: one pdtui knows (``pdtui.core.connectors.CONNECTORS``: its environment, log
  lines, metrics and proxy contract are what pdtui sets, parses, shows and checks): NixlConnector;
- ``kv_cache_memory_bytes`` (or ``VLLM_CPU_KVCACHE_SPACE``): the KV every instance asks for, summed,
  against MemAvailable on CPU; on GPU, per CUDA device against ``nvidia-smi``'s memory.free, and
  ``gpu_memory_utilization`` x total against it too (vLLM refuses to start below that);
  ``cuda_devices`` naming a GPU the machine does not have;
- another pdtui on the same proxy port: its control socket answers (``pdtui.core.control``);
- every port (proxy, HTTP, NIXL side channel) free (with an emulated link, the proxy's: the
  engines' are in the run's own namespaces);
- ``link``: an emulated link this machine can make (``pdtui.core.link.check``: root or
  CAP_NET_ADMIN, iproute2, veth, htb, and netem when it has an rtt or a loss).

Every problem is collected and named by its field and where its value came from (the profile
file, a ``PDTUI_*`` variable, a flag); ``PreflightError`` carries them all.

``preflight_attached(...)`` is ``pdtui attach``'s and ``pdtui bench --prefill/--decode``'s: engines
someone else started, checked before anything is sent to them (pdtui.core.engine_facts reads what
they say): each URL answers /health; each engine's kv-transfer role fits its side, as far as it can
be read remotely (``/server_info`` in vLLM's development mode, the log given with --log, else
``/metrics``: engine_facts.py says what vLLM exposes); every engine agrees on what must agree (the
model, block size, KV cache dtype, the model dtype where readable, max_model_len, the vLLM version
that NIXL's compatibility hash includes); the served model name; the proxy port and control socket
free. The bench's ``--single URL`` (``singles``): no kv-transfer config, and the pair's model and
settings. A mismatch is refused naming the field and every engine's value; what could not be read
is a note. Observe only (``--observe``): the engines' own mismatches are notes, not refusals (pdtui
sends nothing into the pair).

``report(cfg)`` says what the engines will do here, refusing nothing (``pdtui preflight`` prints
it): on device cpu the CPU's features and the attention kernel vLLM will take
(``pdtui.core.cpu``), the AMX tile-state request on AMX CPUs, the model, each KV pool in tokens,
the engines' versions.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdtui.core import config as config_mod
from pdtui.core import connectors, engine_facts, kvmath, versions
from pdtui.core import cpu as cpu_mod
from pdtui.core import model as model_mod
from pdtui.core.config import ConfigError, PairConfig

GiB = 1 << 30
SUPPORTED_CONNECTORS = tuple(connectors.CONNECTORS)


@dataclass(frozen=True)
class Problem:
    field: str
    """The profile field (or port) at fault: device, connector, kv_cache_memory_bytes, proxy_port, ..."""
    text: str
    in_use: bool = False
    """Ports or the control socket taken now (a note for `pdtui config`, a refusal for a launch)."""


@dataclass(frozen=True)
class Gpu:
    index: int
    free_bytes: int
    total_bytes: int


class PreflightError(ConfigError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        if len(problems) == 1:
            text = problems[0].text
        else:
            text = f"{len(problems)} problems:\n" + "\n".join(f"  - {p.text}" for p in problems)
        super().__init__(text + "\nNothing was started.")


def preflight(cfg: PairConfig, *, ports: bool = True, control_socket: Path | None = None) -> list[Problem]:
    """Raise PreflightError naming every problem; with ``ports=False``, ports and a live control
    socket are returned as notes instead (``pdtui config``)."""
    found = problems(cfg, control_socket=control_socket)
    refused = [p for p in found if ports or not p.in_use]
    if refused:
        raise PreflightError(refused)
    return found


def problems(cfg: PairConfig, *, control_socket: Path | None = None, gpus: list[Gpu] | None = None,
             mem_available: int | None = None, check_in_use: bool = True) -> list[Problem]:
    """Everything that stops this pair from launching here (``gpus`` and ``mem_available``:
    the machine as measured, unless a test passes them)."""
    out: list[Problem] = []
    gpu_here = config_mod.has_gpu() if gpus is None else bool(gpus)
    if cfg.device == "cuda" and not gpu_here:
        why = ("CUDA_VISIBLE_DEVICES is empty" if os.environ.get("CUDA_VISIBLE_DEVICES") == ""
               else "no nvidia-smi" if shutil.which("nvidia-smi") is None else "no /dev/nvidia0")
        out.append(Problem("device", f"device = \"cuda\" ({_from(cfg, 'device')}), but this machine has no NVIDIA"
                           f" GPU ({why}). Use a CPU profile (--profile cpu) or run it on a GPU machine."))
    for inst in cfg.instances:
        conn = cfg.resolved(inst, "connector")
        if connectors.known(conn) is None:
            where = _in(cfg) if "connector" in inst.overrides else _from(cfg, "connector")
            out.append(Problem("connector", f"connector = {conn!r} ({where}): pdtui drives {connectors.names()} only"
                               " (pdtui/core/connectors.py: the environment, log lines, metrics and proxy contract"
                               " it knows; another connector would launch and be silently wrong). Set connector ="
                               f" \"{connectors.NIXL.name}\" or another of those; docs/connectors.md."
                               + (f" {conn}: {connectors.NOT_HERE[conn]}." if conn in connectors.NOT_HERE else "")))
            break
    else:
        out += connector_problems(cfg)
    out += _model(cfg)
    if cfg.device == "cpu":
        out += _cpu_memory(cfg, mem_available)
    elif gpu_here:
        out += _gpu_memory(cfg, gpus if gpus is not None else query_gpus())
    out += _link(cfg)
    if check_in_use:
        out += _in_use(cfg, control_socket)
    return out


def connector_problems(cfg: PairConfig, vllm_files: Sequence[str] | None = None) -> list[Problem]:
    """What a known connector owes before launch (docs/connectors.md):

    - a storage connector (storage, multi's storage child): its folder (``kv_storage_path``) must be
      the same for P and D (a per-instance value that differs: P would write where D never looks),
      absolute (an engine resolves a relative one in its own working folder), and a folder this user
      can create and write (checked by writing a file there);
    - push (``nixl-push``): vLLM with ``NixlPushConnector`` (0.32.0 has it; the GPU bundle's 0.22.1
      does not: read from the installed files, ``vllm_files``), and one KV layout on both sides: push
      writes P's blocks into D's as they are, so a ``bidirectional_kv_xfer`` extra config (refused by
      vLLM's push scheduler), a ``--disable-hybrid-kv-cache-manager`` on one side only (different
      cache-group layouts: "NixlPushConnector does not support different producer and consumer
      cache-group layouts") and a KV buffer on another device than the KV cache on a GPU (mixed memory
      types: "NixlPushConnector does not support mixed-memory KV caches") are refused.
    """
    out: list[Problem] = []
    conn = connectors.known(cfg.connector)
    if conn is None:
        return out
    parts = connectors.parts(conn)
    if any(c.storage_param for c in parts):
        paths = {inst.name: config_mod.storage_path(cfg, inst) for inst in cfg.instances}
        where = _from(cfg, "kv_storage_path")
        if len(set(paths.values())) > 1:
            seen = ", ".join(f"{n}: {p}" for n, p in paths.items())
            out.append(Problem("kv_storage_path", f"kv_storage_path is not shared ({seen}): the {conn.key} connector"
                               " needs the one folder P writes the KV to and D reads it from. Set it once under [pair]."))
        else:
            path = next(iter(paths.values()))
            if not Path(path).is_absolute():
                out.append(Problem("kv_storage_path", f"kv_storage_path = {path!r} ({where}) is relative: each engine"
                                   " resolves it in its own working folder, so P and D may not share it. Give an"
                                   " absolute path."))
            else:
                why = _writable_folder(Path(path))
                if why:
                    out.append(Problem("kv_storage_path", f"kv_storage_path = {path!r} ({where}): {why}; the"
                                       f" {conn.key} connector writes each prompt's KV there (P) and reads it (D)."))
    if any(c.min_vllm for c in parts):
        have = versions.installed_vllm()
        needs = next(c for c in parts if c.min_vllm)
        files = vllm_files if vllm_files is not None else _vllm_files()
        if have is not None and files is not None and not any(f.endswith("nixl/push_worker.py") for f in files):
            out.append(Problem("connector", f"connector = {conn.key!r} ({_from(cfg, 'connector')}): the installed"
                               f" {have[0]} {have[1]} has no {needs.name} (push mode came with vLLM"
                               f" {'.'.join(map(str, needs.min_vllm or ()))}). Use connector = \"nixl\" (pull)."))
    if conn.key == "nixl-push" or "nixl-push" in conn.children:
        extra = cfg.kv_connector_extra_config
        if extra.get("bidirectional_kv_xfer"):
            out.append(Problem("kv_connector_extra_config", "bidirectional_kv_xfer with nixl-push: vLLM's push"
                               " scheduler refuses it (\"Bidirectional KV transfer is not supported for NIXL push"
                               " connector\"). Drop it, or use connector = \"nixl\"."))
        hybrid = {i.name: "--disable-hybrid-kv-cache-manager" in (cfg.extra_args + i.extra_args) for i in cfg.instances}
        if len(set(hybrid.values())) > 1:
            on = ", ".join(n for n, v in hybrid.items() if v)
            out.append(Problem("extra_args", f"push with a mismatched KV layout: --disable-hybrid-kv-cache-manager on"
                               f" {on} only. P writes its blocks into D's as they are, and vLLM refuses \"different"
                               " producer and consumer cache-group layouts\" at the first write. Set it for every"
                               " instance (extra_args under [pair]) or none."))
        if cfg.device == "cuda" and cfg.kv_buffer_device != "cuda":
            out.append(Problem("kv_buffer_device", f"push with kv_buffer_device = {cfg.kv_buffer_device!r} on"
                               " device \"cuda\": the KV would be staged through host memory, and vLLM's push worker"
                               " refuses mixed-memory KV caches. Set kv_buffer_device = \"cuda\"."))
    return out


def _writable_folder(path: Path) -> str | None:
    """None if ``path`` is (or can be made) a folder this user can write a file in; else why not."""
    if path.exists() and not path.is_dir():
        return "it is a file, not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".pdtui-write-check-{os.getpid()}"
        probe.write_bytes(b"pdtui")
        probe.unlink()
    except OSError as e:
        return f"not a folder pdtui can write in ({e.strerror or e})"
    return None


def _vllm_files() -> list[str] | None:
    """The installed vLLM distribution's file list (its RECORD), None if it cannot be read."""
    import importlib.metadata as md

    have = versions.installed_vllm()
    if have is None:
        return None
    try:
        files = md.distribution(have[0]).files
    except md.PackageNotFoundError:
        return None
    return [str(f) for f in files] if files else None


def _link(cfg: PairConfig) -> list[Problem]:
    """An emulated link: what stops this machine from making it (pdtui.core.link.check: root,
    iproute2, veth, htb, and netem for an rtt or a loss)."""
    from pdtui.core import link as link_mod

    spec = config_mod.link_spec(cfg)
    return [Problem("link", f"link = {cfg.link!r} ({_from(cfg, 'link')}): {text}") for text in link_mod.check(spec)]


# ----- engines pdtui did not start (pdtui attach) -------------------------------------------------


@dataclass(frozen=True)
class AttachedCheck:
    """What ``attached_problems`` found: every engine's facts, the refusals, and what it could not read."""

    facts: list[engine_facts.Facts]
    problems: list[Problem]
    notes: list[str]

    @property
    def served_name(self) -> str | None:
        """The model name every engine serves (the first in common), None if none."""
        served = [f.served for f in self.facts if f.served]
        common = set.intersection(*(set(s) for s in served)) if served else set()
        return next((n for n in served[0] if n in common), None) if served else None


def attached_problems(prefills: Sequence[tuple[str, str]], decodes: Sequence[tuple[str, str]], *,
                      model_name: str | None = None, logs: Mapping[str, Path] | None = None, observe: bool = False,
                      proxy: tuple[str, int] | None = None, control_socket: Path | None = None,
                      read: Any = None, singles: Sequence[tuple[str, str]] = (),
                      despite: bool = False) -> AttachedCheck:
    """Ask every engine (``(name, url)`` per side) and check them as a pair (the module's
    docstring). ``proxy``: (host, port) pdtui's proxy will bind (None: observe); ``read``: the
    engine reader (``engine_facts.read``), for tests. ``despite``: the sides may differ (the context
    and handshake drills run such a pair on purpose): what the comparison finds becomes notes.
    ``singles``: colocated engines the bench
    measures the pair against (``pdtui bench --single URL``): each must run without a KV connector
    and, beside a pair, run what the pair runs (model, block size, dtypes, max_model_len, version)."""
    reader = read or engine_facts.read
    logs = logs or {}
    facts = [reader(n, role, url, log=logs.get(n))
             for role, side in (("prefill", prefills), ("decode", decodes), ("single", singles)) for n, url in side]
    out: list[Problem] = []
    notes: list[str] = []
    for f in facts:
        if f.health is not None:
            out.append(Problem("url", f"{f.label} does not answer /health: {f.health}. Is `vllm serve` running"
                               " there, and is that its --host and --port?"))
    up = [f for f in facts if f.health is None]
    found: list[tuple[str, str]] = []
    for f in up:
        found += engine_facts.role_problems(f)
        notes += f.notes
    if len(up) == len(facts):
        pair = [f for f in up if f.role != "single"]
        differ = engine_facts.compare(pair)
        if despite:
            notes += [f"{text} (pdtui refuses such a pair; the drill goes on, on purpose)" for _, text in differ]
        else:
            found += differ
        for single in (f for f in up if f.role == "single" and pair):
            found += engine_facts.compare([pair[0], single], must="The single arm is the pair's baseline: it must"
                                          " run what the pair runs")
        if model_name is not None:
            lacking = [f for f in up if f.served and model_name not in f.served]
            if lacking:
                out.append(Problem("model_name", f"--model-name {model_name!r}: not served by "
                                   + ", ".join(f"{f.name} (serves {', '.join(f.served)})" for f in lacking)))
        notes += [f"not compared: {t}" for t in engine_facts.unread(up)]
    if observe:
        notes += [f"{text} (observe only: pdtui sends nothing into the pair, so it is not refused)"
                  for _, text in found]
    else:
        out += [Problem(field, text) for field, text in found]
    out += _attach_in_use(proxy, control_socket)
    return AttachedCheck(facts, out, notes)


def preflight_attached(prefills: Sequence[tuple[str, str]], decodes: Sequence[tuple[str, str]],
                       **kw: Any) -> AttachedCheck:
    """``attached_problems``, raising PreflightError naming every problem."""
    check = attached_problems(prefills, decodes, **kw)
    if check.problems:
        raise PreflightError(check.problems)
    return check


def _attach_in_use(proxy: tuple[str, int] | None, control_socket: Path | None) -> list[Problem]:
    from pdtui.core import ctl_client as control
    from pdtui.core.supervisor import PortInUse, check_port_free

    out: list[Problem] = []
    if control_socket is not None:
        found = control.probe(control_socket, timeout_s=2.0)
        if found is not None:
            out.append(Problem("proxy_port", f"another pdtui answers on the control socket {control_socket}"
                               f" (pid {found.get('pid')}, proxy {found.get('proxy_url')}): pick another"
                               " --proxy-port", in_use=True))
    if proxy is not None:
        try:
            check_port_free(proxy[0], proxy[1], "pdtui's proxy")
        except PortInUse as e:
            out.append(Problem("proxy_port", f"--proxy-port {proxy[1]}: {e}", in_use=True))
    return out


# ----- the model ---------------------------------------------------------------------------------


def _engine_env(cfg: PairConfig) -> dict[str, str]:
    """The environment the engines get, as far as the pair decides it (instances add theirs)."""
    return {**os.environ, **cfg.env}


def _model(cfg: PairConfig) -> list[Problem]:
    """A model that is not here: not a shape, no such path, not in the local Hugging Face cache.
    vLLM would look it up on the hub and fail seconds into the start (``PDTUI_MODEL=nonexistent-model``:
    9 s); pdtui asks nothing of the network."""
    inst = cfg.instances[0]
    name = str(cfg.resolved(inst, "model"))
    env = _engine_env(cfg)
    if model_mod.locate(name, env) is not None:
        return []
    where = _in(cfg) if "model" in inst.overrides else _from(cfg, "model")
    if Path(name).is_dir():
        return [Problem("model", f"model = {name!r} ({where}): a folder, but not a model's: it has no"
                        f" {' or '.join(model_mod.MODEL_FOLDER_FILES)}. Give the folder that holds the model's"
                        f" config.json, a synthetic shape ({', '.join(model_mod.SHAPES)}), or a Hugging Face id"
                        " in the local cache.")]
    hub = model_mod.hf_hub_cache(env)
    as_id = (f", and not in the local Hugging Face cache ({hub} has no models--{name.replace('/', '--')}"
             " with a config.json; HF_HUB_CACHE / HF_HOME move it)") if not name.startswith(("/", ".", "~")) else ""
    return [Problem("model", f"model = {name!r} ({where}): not a synthetic shape, no such path{as_id}. pdtui"
                    " looks only here and downloads nothing. Give a synthetic shape"
                    f" ({', '.join(model_mod.SHAPES)}), a model folder (with its config.json), or a Hugging Face"
                    f" id downloaded first (`hf download {name if name.count('/') == 1 else 'ORG/NAME'}`).")]


# ----- what the engines will do here (reported, not refused) -------------------------------------


VLLM_RULE = "0.32.0"
"""The vLLM release whose CPU attention rule ``pdtui.core.cpu.attention_path`` mirrors."""

_DTYPE_NAMES = {"half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32", "bf16": "bfloat16"}


def engine_dtype(cfg: PairConfig, model_cfg: dict[str, Any] | None) -> tuple[str | None, str]:
    """(the dtype the engines compute in, how it was decided, for people). ``dtype = "auto"`` takes
    the model's config.json ``torch_dtype``; a float32 model is computed in bfloat16 on the CPU, as
    vLLM does (``_resolve_auto_dtype``: the platform's first supported dtype). None: unknown here."""
    asked = str(cfg.resolved(cfg.instances[0], "dtype"))
    if asked != "auto":
        return _DTYPE_NAMES.get(asked, asked), _from(cfg, "dtype")
    text = (model_cfg or {}).get("text_config", model_cfg) or {}
    mine = str(text.get("torch_dtype") or text.get("dtype") or (model_cfg or {}).get("torch_dtype") or "")
    mine = mine.removeprefix("torch.")
    mine = _DTYPE_NAMES.get(mine, mine)
    if not mine:
        return None, "\"auto\", and the model's config.json is not here"
    if mine == "float32" and cfg.device == "cpu":
        return "bfloat16", "\"auto\": the model's float32, taken to bfloat16 on the CPU as vLLM does"
    return mine, "\"auto\": the model's"


def report(cfg: PairConfig, *, cpuinfo: cpu_mod.CpuInfo | None = None, environ: dict[str, str] | None = None,
           mem_available: int | None = None) -> list[tuple[str, str]]:
    """What the engines will run on and do here, as (topic, text) lines for people: the CPU
    features that pick vLLM's CPU kernels and the attention path they will take (device cpu), the
    AMX tile-state request on AMX CPUs, the model, the KV pool in tokens, the engines' versions.
    ``cpuinfo`` and ``environ``: another machine, for tests."""
    env = {**(_engine_env(cfg) if environ is None else environ), **cfg.env}
    inst = cfg.instances[0]
    name = str(cfg.resolved(inst, "model"))
    found = model_mod.locate(name, env)
    model_cfg = model_mod.model_config(name, env) if found is not None else None
    dtype, dtype_why = engine_dtype(cfg, model_cfg)
    try:
        geo = kvmath.geometry_from_config(model_cfg, dtype or "auto") if model_cfg else None
    except (KeyError, TypeError, ValueError):
        geo = None
    out: list[tuple[str, str]] = []
    if cfg.device == "cpu":
        c = cpuinfo if cpuinfo is not None else cpu_mod.read()
        out.append(("cpu", f"{c.model} ({c.arch}): {c.features()}"))
        block = int(cfg.resolved(inst, "block_size"))
        given = (f"dtype {dtype or 'unknown'} ({dtype_why}), block {block} ({_from(cfg, 'block_size')})"
                 + (f", head size {geo.head_dim} ({name})" if geo is not None else ""))
        vllm = versions.installed_vllm()
        rule = f"vLLM {VLLM_RULE}'s _get_attn_isa" + (f"; {vllm[0]} {vllm[1]} is installed" if vllm is not None
                                                      and not vllm[1].startswith(VLLM_RULE) else "")
        path = cpu_mod.attention_path(c, dtype, block, geo.head_dim if geo is not None else None) if dtype else ""
        out.append(("attention", f"{path}; for {given} ({rule})" if path else f"not known here: {given}"))
        if c.amx:
            off = [i.name for i in cfg.instances if {**env, **i.env}.get(cpu_mod.AMX_REQUEST_ENV) == "0"]
            why = ("the amx attention kernel needs it: without it D's first decode dies with SIGILL"
                   if path.startswith("amx") else "harmless where the amx kernel is not taken")
            if off:
                text = (f"{cpu_mod.AMX_REQUEST_ENV}=0 for {', '.join(off)}: pdtui does NOT ask for the AMX tile"
                        f" state there; {why}. Unset it unless you mean to reproduce the crash.")
            else:
                text = ("pdtui asks Linux for the AMX tile state (arch_prctl XTILEDATA) in every engine process"
                        f" (pdtui/engine/amx.py); {why}. {cpu_mod.AMX_REQUEST_ENV}=0 turns it off, to reproduce"
                        " the crash.")
            out.append(("amx", text))
    out.append(("model", found.describe(name) if found is not None else f"{name}: not found here"))
    if geo is not None:
        out += _kv_tokens(cfg, geo, mem_available)
    out.append(("engines", ", ".join(f"{d} {v or 'not installed'}" for d, v in versions.engines())))
    return out


def _kv_tokens(cfg: PairConfig, geo: kvmath.KvGeometry, mem_available: int | None) -> list[tuple[str, str]]:
    """Each instance's KV pool in tokens of the model, as the engine will count them (whole blocks)."""
    kv_dtype = str(cfg.kv_cache_dtype)
    if kv_dtype != "auto":
        if kv_dtype not in kvmath.DTYPE_BYTES:
            return []
        geo = dataclasses.replace(geo, dtype=kv_dtype, dtype_bytes=kvmath.DTYPE_BYTES[kv_dtype])
    per_block = geo.bytes_per_token * cfg.block_size
    parts = []
    for inst in cfg.instances:
        asked = kv_asked(cfg, inst)[0]
        if not asked:
            parts.append(f"{inst.name} sized by vLLM")
            continue
        parts.append(f"{inst.name} {human(asked)} = {asked // per_block * cfg.block_size:,} tokens")
    avail = mem_available if mem_available is not None else (mem_available_bytes() if cfg.device == "cpu" else None)
    total = sum(kv_asked(cfg, i)[0] or 0 for i in cfg.instances)
    of = f"; {human(total)} in all of {human(avail)} available" if avail is not None and total else ""
    text = (f"{', '.join(parts)} ({geo.bytes_per_token:,} B per token: {geo.layers} layers x {geo.kv_heads} KV"
            f" heads x {geo.head_dim} head_dim x 2 (K,V) x {geo.dtype_bytes} B {geo.dtype}){of}")
    return [("kv cache", text)]


# ----- memory ------------------------------------------------------------------------------------


def kv_asked(cfg: PairConfig, inst: config_mod.InstanceConfig) -> tuple[int | None, str]:
    """The KV bytes an instance asks for (per device), and the setting that asks."""
    env = {**os.environ, **cfg.env, **inst.env}
    if cfg.device == "cpu" and env.get("VLLM_CPU_KVCACHE_SPACE", "") != "":
        try:
            return int(env["VLLM_CPU_KVCACHE_SPACE"]) * GiB, "VLLM_CPU_KVCACHE_SPACE"
        except ValueError:
            pass
    return inst.kv_cache_memory_bytes, "kv_cache_memory_bytes"


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cpu_memory(cfg: PairConfig, mem_available: int | None) -> list[Problem]:
    asked = [(inst.name, *kv_asked(cfg, inst)) for inst in cfg.instances]
    asks = [(n, b, how) for n, b, how in asked if b]
    if not asks:
        return []
    avail = mem_available if mem_available is not None else mem_available_bytes()
    total = sum(b for _, b, _ in asks)
    if avail is None or total <= avail:
        return []
    fields = sorted({how for _, _, how in asks})
    each = ", ".join(f"{n} {human(b)}" for n, b, _ in asks)
    return [Problem(fields[0], f"{' / '.join(fields)} ({_in(cfg)}): the instances ask for"
                    f" {human(total)} of KV cache in all ({each}), but this machine has {human(avail)} available"
                    " (MemAvailable, /proc/meminfo; the models' weights not counted). Lower kv_cache_memory_bytes.")]


def query_gpus() -> list[Gpu]:
    """Free and total memory of each GPU (nvidia-smi's index order); [] if it cannot be asked."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.free,memory.total",
                              "--format=csv,noheader,nounits"], check=False, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.stdout.splitlines():
        try:
            idx, free, total = (int(x.strip()) for x in line.split(","))
        except ValueError:
            continue
        gpus.append(Gpu(idx, free * (1 << 20), total * (1 << 20)))
    return gpus


def _devices(cfg: PairConfig, inst: config_mod.InstanceConfig) -> list[int] | None:
    """The GPUs an instance runs on (nvidia-smi indices); None if named otherwise (UUIDs)."""
    spec = inst.cuda_devices if inst.cuda_devices is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return [0]
    try:
        devs = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        return None
    return devs[: max(1, int(cfg.resolved(inst, "tensor_parallel_size")))] if devs else None


def _gpu_memory(cfg: PairConfig, gpus: list[Gpu]) -> list[Problem]:
    if not gpus:
        return []
    by_index = {g.index: g for g in gpus}
    out: list[Problem] = []
    kv: dict[int, list[tuple[str, int]]] = {}
    util: dict[int, list[tuple[str, float]]] = {}
    where = _in(cfg)
    for inst in cfg.instances:
        devs = _devices(cfg, inst)
        if devs is None:
            continue
        missing = [d for d in devs if d not in by_index]
        if missing:
            have = ", ".join(str(i) for i in sorted(by_index))
            out.append(Problem("cuda_devices", f"{inst.name} cuda_devices = {inst.cuda_devices!r} ({where}): this machine"
                               f" has no GPU {', '.join(map(str, missing))} (it has {len(by_index)}: {have})."))
            continue
        for d in devs:
            if inst.kv_cache_memory_bytes:
                kv.setdefault(d, []).append((inst.name, inst.kv_cache_memory_bytes))
            if inst.gpu_memory_utilization:
                util.setdefault(d, []).append((inst.name, inst.gpu_memory_utilization))
    for d, asks in sorted(kv.items()):
        total, free = sum(b for _, b in asks), by_index[d].free_bytes
        if total > free:
            each = ", ".join(f"{n} {human(b)}" for n, b in asks)
            out.append(Problem("kv_cache_memory_bytes", f"kv_cache_memory_bytes ({where}): GPU {d} would hold"
                               f" {human(total)} of KV cache ({each}), but has {human(free)} free (nvidia-smi"
                               " memory.free; the models' weights not counted). Lower kv_cache_memory_bytes."))
    for d, shares in sorted(util.items()):
        g = by_index[d]
        want = sum(u for _, u in shares) * g.total_bytes
        if want > g.free_bytes:
            each = ", ".join(f"{n} {u:g}" for n, u in shares)
            out.append(Problem("gpu_memory_utilization", f"gpu_memory_utilization ({where}): on GPU {d} the instances"
                               f" ask for {each} of {human(g.total_bytes)} = {human(want)}, but {human(g.free_bytes)}"
                               " is free (nvidia-smi); vLLM refuses to start below its share. Lower it."))
    return out


# ----- ports and another pdtui -------------------------------------------------------------------


def _in_use(cfg: PairConfig, control_socket: Path | None) -> list[Problem]:
    from pdtui.core import ctl_client as control
    from pdtui.core.supervisor import PortInUse, check_port_free

    out: list[Problem] = []
    path = control_socket or control.default_socket_path(cfg.proxy_port)
    found = control.probe(path, timeout_s=2.0)
    if found is not None:
        who = (f"pid {found.get('pid')}, profile {found.get('profile')}, proxy {found.get('proxy_url')},"
               f" up {found.get('uptime_s')} s" if found.get("ok") else "it gave no status")
        out.append(Problem("proxy_port", f"another pdtui runs on proxy port {cfg.proxy_port}: its control socket"
                           f" {path} answers ({who}). Stop it (`pdtui ctl down{_ctl_flags(cfg)}`), or run beside it"
                           " with --port-offset N.", in_use=True))
    shifted = f", {cfg.sources['port_offset']}" if "port_offset" in cfg.sources else ""
    for name, port, what in _ports(cfg):
        try:
            check_port_free(cfg.host, port, what)
        except PortInUse as e:
            where = _from(cfg, "proxy_port") if name == "proxy_port" else _in(cfg)
            out.append(Problem(name.split()[-1], f"{name} = {port} ({where}{shifted}): {e}", in_use=True))
    return out


def _ports(cfg: PairConfig) -> list[tuple[str, int, str]]:
    """Every port the pair binds: (field as named to the user, port, what listens there). With an
    emulated link the engines bind in namespaces the run creates: only the proxy's is here."""
    out = [("proxy_port", cfg.proxy_port, "proxy")]
    if config_mod.link_spec(cfg).emulated:
        return out
    for inst in cfg.instances:
        out += [(f"{inst.name} port", inst.port, f"{inst.name} ({inst.role}) HTTP"),
                (f"{inst.name} side_channel_port", inst.side_channel_port, f"{inst.name} ({inst.role}) NIXL side channel")]
    return out


def ephemeral_range() -> tuple[int, int] | None:
    """The kernel's range of source ports for outgoing connections (Linux), if it can be read."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return None


def ephemeral_warnings(cfg: PairConfig, span: tuple[int, int] | None = None) -> list[str]:
    """Ports of the pair inside the ephemeral range: any outgoing connection on the machine may take
    one as its source port between this check and the engine's bind (seen on a shared box: D's
    NIXL side-channel port taken, its handshake thread dead). Not a refusal: a warning."""
    span = span if span is not None else ephemeral_range()
    if span is None:
        return []
    inside = [f"{name} {port}" for name, port, _ in _ports(cfg) if port and span[0] <= port <= span[1]]
    if not inside:
        return []
    return [(f"ports in the kernel's ephemeral range {span[0]}-{span[1]} (net.ipv4.ip_local_port_range): "
             f"{', '.join(inside)}. An outgoing connection may take one before the engine binds it; "
             f"prefer ports under {span[0]} (e.g. --port-offset 20000, not 30000 or more).")]


def _ctl_flags(cfg: PairConfig) -> str:
    return "" if cfg.proxy_port == 8000 else f" --proxy-port {cfg.proxy_port}"


def _from(cfg: PairConfig, name: str) -> str:
    """"set in launch/cpu.toml", "from --connector", "from PDTUI_CONNECTOR", "the default"."""
    src = config_mod.origin(cfg, name)
    if src == "the default":
        return "pdtui's default" + (f", not set in {cfg.profile_path}" if cfg.profile_path else "")
    return f"from {src}" if src.startswith(("--", "PDTUI_")) else f"set in {src}"


def _in(cfg: PairConfig) -> str:
    return f"set in {cfg.profile_path}" if cfg.profile_path else "set in the profile"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


__all__ = ["AttachedCheck", "Gpu", "PreflightError", "Problem", "attached_problems", "preflight", "preflight_attached",
           "problems", "query_gpus", "report"]
