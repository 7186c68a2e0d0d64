"""pdtui: a prefill/decode disaggregation dashboard for vLLM.

With no arguments, pdtui launches the default pair for this machine (one GPU: the one-gpu
profile; no GPU: the CPU profile with a generated tiny model) behind the embedded proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pdtui.core import config as config_mod
from pdtui.core import model as model_mod
from pdtui.core.config import ConfigError
from pdtui.core.preflight import PreflightError

PRECEDENCE = (
    "Settings come from, highest first: command-line flags > PDTUI_<FIELD> environment variables"
    " (e.g. PDTUI_MODEL=qwen2.5-0.5b, PDTUI_PROXY_PORT=9000) > the profile file > built-in defaults."
)

EPILOG = f"""\
examples:
  pdtui                                    the dashboard over the default pair for this machine
  pdtui up --record run.jsonl              the dashboard, and a recording for replay
  pdtui replay run.jsonl --speed 10        the dashboard driven by a recording, 10x faster
  pdtui up --headless --record run.jsonl   events as JSON lines, and a recording for replay
  pdtui up --profile one-gpu               a profile from launch/ (cpu, one-gpu, two-gpu, 1p2d, 1p2d-small) or a path
  pdtui drill --shots screenshots/        kill D mid-stream, kill P, restart both, unattended, with SVGs
  pdtui drill --profile 1p2d-small --scenario headroom   fill one D's KV pool, check new requests go elsewhere
  pdtui drill --profile 1p2d-small --scenario migrate    kill a stream's D mid-way, watch it finish on the other D
  pdtui drill --connector storage --scenario kill-p-load    kill P before D has the KV: each connector's outcome
  pdtui preflight                          check the pair against this machine: CPU, attention path, model
  pdtui config --profile two-gpu           print the vllm serve command lines, without launching
  pdtui model synth --shape qwen2.5-0.5b   write a synthetic model directory (no download)
  pdtui bench --quick                      single instance vs the pair, same prompts: toll and purchase
  pdtui proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200
                                           the P/D proxy alone, over a pair started by hand
  pdtui ctl status                         what a running pdtui (dashboard or --headless) is doing
  pdtui ctl restart D                      restart D from another terminal, wait until it is ready
  pdtui up --detach                        the pair as a service in the background: returns once it is ready
  pdtui attach                             the dashboard on that service (as many as you like; q leaves it running)
  pdtui ctl down                           stop the service

then, in another terminal:
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "tiny", "prompt": "hello", "max_tokens": 16, "stream": true}}'

{PRECEDENCE}
"""


CTL_DESCRIPTION = """\
Control a running `pdtui up` (dashboard or --headless) or `pdtui drill` from another terminal,
through its control socket: a Unix socket only you can reach (folder 0700, socket 0600, the peer's
uid checked), <state dir>/ctl/<proxy port>.sock, or a TCP listener (pdtui up --listen) with
--connect HOST:PORT --token-file FILE. The dashboard's keys do the same things.

  status        the instances (state, pid, URL, ready, last death, restarts, log file), the proxy
                URL, the run folder, the uptime
  kill X        SIGKILL instance X's process group (the dashboard's k / K); X is P, D, D2, ...
  restart X     stop X, start it and wait until it answers /health; prints the ready time
  down          stop the engines and the proxy; that pdtui exits (the dashboard closes)

Exit status: 0 done; 1 no pdtui listening there, or the operation failed; 2 an unknown instance
or a malformed request."""

CTL_EPILOG = """\
examples:
  pdtui ctl status                         the pdtui on proxy port 8000
  pdtui ctl kill D --port-offset 20000     the one started with --port-offset 20000
  pdtui ctl restart D --json               wait for D, then one JSON line: {"ok": true, "ready_s": ...}
  pdtui ctl down --socket /path/to/8000.sock
  pdtui ctl status --connect 127.0.0.1:8799 --token-file ~/.pdtui-token"""


UP_DESCRIPTION = """\
Launch the prefill and decode instances and the embedded proxy, wait until the pair is ready
(both /health 200 and one warm-up request through P and D), then serve: under the dashboard until
q or Ctrl-C, or --headless (events as JSON lines) until a signal or `pdtui ctl down`.

--detach runs the same pair as a service that outlives this terminal: it starts `pdtui up
--headless` in a session of its own (stdin /dev/null, its output in <run folder>/service.out, every
event recorded to <run folder>/events.jsonl unless --record says where), shows the start's progress,
and returns once the pair is ready (exit 0), printing where the control socket, the logs and the
recording are. Exit 1 if the service died during start-up (the last lines of its output say why)
or was not ready within the ready timeout (it is then stopped); 3 if the pair is up but BROKEN (the
warm-up did not pass through P and D; `pdtui ctl status` says why). Then any number of `pdtui attach`
dashboards watch it; quitting one leaves the service running. `pdtui ctl down` stops it.

Nothing listens beyond 127.0.0.1 and the owner-only Unix socket unless asked: --listen HOST:PORT
also serves the control protocol on TCP, for `pdtui attach --connect` and `pdtui ctl --connect`, and
every request there must carry the token (--token-file, or a new one written 0600 to <run
folder>/token). The protocol is plain text: over a network, prefer SSH forwarding (pdtui attach
--help).

""" + PRECEDENCE

UP_EPILOG = """\
examples:
  pdtui up                                  the dashboard over the pair; q stops everything
  pdtui up --headless --record run.jsonl    events as JSON lines on stdout, and a recording
  pdtui up --detach                         the service in the background; then `pdtui attach`
  pdtui up --detach --port-offset 100       a second service beside the first (attach/ctl: --port-offset 100)
  pdtui up --detach --listen 127.0.0.1:8799 also on TCP, with a token (printed: where it is)
  pdtui up --link 10gbit                    P and D in namespaces of their own, joined by a shaped 10 Gbit/s
                                            veth (root; docs/link.md)"""

ATTACH_SERVICE_TEXT = """\
Open the dashboard on a pdtui service that runs on its own (`pdtui up --detach`; any running `pdtui
up` works too): the history first (a late viewer sees the table and the histograms filled), then
every event as it comes; the same panes and keys. Kill and restart (k/K, r/R) go to the service
through its control socket, as `pdtui ctl` does. Quitting (q), a closed terminal or a lost SSH
session ends this viewer only: the service and its other viewers run on (`pdtui ctl down` stops
it; the dashboard closes when it does). --read-only: a viewer with no kill or restart keys (hidden,
refused with a notice if pressed; the service refuses them too).

Which service: the one on the default profile's proxy port (8000), or --port-offset N, --proxy-port
N, --socket PATH (a socket forwarded by ssh), or --connect HOST:PORT --token-file FILE (one started
with --listen). A viewer the service drops (it fell thousands of events behind) or whose connection
breaks reconnects for up to 10 s and says so; what it missed meanwhile is taken from the service's
history when it still reaches back that far."""

ATTACH_SERVICE_EXAMPLES = """\
examples:
  pdtui attach                              the service on this machine's default proxy port
  pdtui attach --port-offset 100            the one started with --port-offset 100
  pdtui attach --read-only                  a viewer that cannot kill or restart anything

over SSH, from a laptop (the service runs on `host`; a Unix socket forwarded, owner-only there):
  ssh -N -L /tmp/pdtui.sock:/root/.local/state/pdtui/ctl/8000.sock host &
  pdtui attach --socket /tmp/pdtui.sock
  ssh -N -L 8000:127.0.0.1:8000 host &      also the proxy, for the load keys (1-4) and curl

or a TCP listener (pdtui up --detach --listen 127.0.0.1:8799 on host), forwarded, with its token:
  scp host:/root/.local/state/pdtui/runs/<run>/token ~/.pdtui-token && chmod 600 ~/.pdtui-token
  ssh -N -L 8799:127.0.0.1:8799 host &
  pdtui attach --connect 127.0.0.1:8799 --token-file ~/.pdtui-token"""


def _add_up_args(up: argparse.ArgumentParser) -> None:
    """Every flag of `pdtui up` (``_service_args`` rebuilds a detached service's command line from them)."""
    _add_pair_flags(up)
    up.add_argument("--headless", action="store_true", help="print events as JSON lines instead of the dashboard")
    up.add_argument("--detach", action="store_true",
                    help="run as a service in the background: return once the pair is ready, print where it is;"
                    " `pdtui attach` watches it, `pdtui ctl down` stops it")
    up.add_argument("--record", type=Path, default=None,
                    help="also write every event to this JSONL file (for replay; --detach: default <run folder>/"
                    "events.jsonl)")
    up.add_argument("--logs", action="store_true", help="--headless: include the engines' log lines")
    up.add_argument("--log-dir", type=Path, default=None,
                    help="write the engines' and the proxy's logs here (default: a new run folder under the state"
                    " dir, ~/.local/state/pdtui/runs/; printed at start)")
    up.add_argument("--listen", metavar="HOST:PORT", default=None,
                    help="also serve the control protocol on TCP (pdtui attach --connect); every request needs the"
                    " token. Off by default: only the owner-only Unix socket")
    up.add_argument("--token-file", type=Path, default=None,
                    help="--listen: the token is this file's first line (default: a new one, written 0600 to"
                    " <run folder>/token)")
    up.add_argument("--service", action="store_true", help=argparse.SUPPRESS)  # what --detach starts


def _add_attach_service_args(p: argparse.ArgumentParser) -> None:
    """`pdtui attach` to a running service: which one, and read-only."""
    _add_service_address_args(p)
    p.add_argument("--read-only", action="store_true",
                   help="no kill or restart keys (hidden; refused with a notice, and by the service, if pressed)")


def _add_pair_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None,
                   help="profile name from launch/ or a TOML path (default: one-gpu with a GPU, else cpu)")
    p.add_argument("--model", default=None,
                   help="synthetic shape (tiny, qwen2.5-0.5b), a model directory, or a HF id whose weights are here")
    p.add_argument("--connector", default=None,
                   help="KV connector: nixl (NixlConnector, pull: the default), nixl-push (P writes into D's blocks),"
                        " storage (ExampleConnector: KV through files in a shared folder), multi (MultiConnector:"
                        " nixl + storage); docs/connectors.md")
    p.add_argument("--kv-storage-path", default=None,
                   help="the folder a storage connector (storage, multi) keeps the KV in, shared by P and D"
                        " (default: <state folder>/kv-store)")
    p.add_argument("--kv-load-failure-policy", choices=("fail", "recompute"), default=None,
                   help="what D does when the KV pull fails: fail the request (500) or recompute")
    add_switch_flags(p)
    p.add_argument("--traces-port", type=int, default=None,
                   help="receive the engines' per-request OpenTelemetry spans on this port (docs/ttft-toll.md)")
    p.add_argument("--proxy-port", type=int, default=None, help="port of the embedded proxy (default 8000)")
    p.add_argument("--port-offset", type=int, default=0,
                   help="add N to every port of the profile, to run beside another pair")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--link", default=None, metavar="LINK",
                   help="the link between P and D: loopback (default), 1gbit, 10gbit, 25gbit, 100gbit, or"
                   " rate=2.5gbit,rtt=1ms,loss=0.1%%: P and D each in a network namespace, joined by a veth shaped"
                   " with tc, NIXL on it (needs root and iproute2; docs/link.md)")


def add_switch_flags(p: argparse.ArgumentParser) -> None:
    """A flag per proxy switch of the config (config.proxy_switches): a bool is --name (on), a
    Literal its choices; unset (None) leaves the profile's or the environment's value."""
    import typing

    hints = typing.get_type_hints(config_mod.PairConfig)
    for f in config_mod.proxy_switches():
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            p.add_argument(flag, action="store_const", const=True, default=None, help=f.metadata["switch"])
        else:
            p.add_argument(flag, choices=typing.get_args(hints[f.name]), default=None, help=f.metadata["switch"])


def load_config(args: argparse.Namespace) -> config_mod.PairConfig:
    cfg = config_mod.load_profile(args.profile or config_mod.default_profile_name())
    config_mod.apply_overrides(cfg, config_mod.env_overrides(), source=lambda name: f"PDTUI_{name.upper()}")
    config_mod.apply_overrides(cfg, {
        "model": args.model, "connector": args.connector, "kv_load_failure_policy": args.kv_load_failure_policy,
        "kv_storage_path": args.kv_storage_path,
        **{f.name: getattr(args, f.name) for f in config_mod.proxy_switches()},
        "traces_port": args.traces_port, "proxy_port": args.proxy_port, "host": args.host,
        "link": args.link,
    }, source=lambda name: "--" + name.replace("_", "-"))
    if args.port_offset:
        cfg = config_mod.shift_ports(cfg, args.port_offset)
    config_mod.validate(cfg)
    return cfg


ATTACH_ENGINES_TEXT = """\
The dashboard (or --headless) over prefill and decode engines someone else started (`vllm serve`
with a NixlConnector kv_transfer_config, on this box or others), given by URL. Before anything is
sent, every URL must answer /health, each engine's kv role must fit its side as far as it can be
read (its log, vLLM's /server_info in development mode, else /metrics), and the engines must agree
on the model, block size, KV cache dtype, dtype (where readable), max_model_len and vLLM version:
a mismatch is refused naming the field and both values (exit 2).

pdtui's proxy then goes in front of them (--proxy-port): send requests there. Their /metrics are
scraped; their log files (--log NAME=FILE) are followed for registration, handshake and transfer
lines, else the panes say they show metrics alone. The kill and restart keys run the commands you
give (--kill NAME=CMD, --restart NAME=CMD, run with /bin/sh); without one the key is off and the
pane says why. Closing pdtui stops its proxy and leaves the engines running.

--observe: for a deployment behind someone else's router: no proxy, metrics only; --witness URL
sends one small streamed request every 5 s through that router for TTFT/ITL from outside.

Instances are named in the order given: P and D, or P1, P2, ... and D1, D2, ... when there are
several; NAME in --log/--kill/--restart is one of those."""

ATTACH_ENGINES_EXAMPLES = """\
engines you started yourself:
  pdtui attach --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200
  pdtui attach --prefill http://10.0.0.1:8100 --decode http://10.0.0.2:8200,http://10.0.0.3:8200 \\
      --log P=/var/log/vllm-p.log --restart D1='ssh 10.0.0.2 systemctl restart vllm-decode'
  pdtui attach --headless --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 \\
      --kill D='kill -9 12345' --restart D='systemctl --user restart vllm-d'
  pdtui attach --observe --prefill http://p:8000 --decode http://d:8000 --witness http://router:8000"""


ATTACH_DESCRIPTION = ("Two ways in. Without --prefill/--decode: a viewer of a running pdtui service.\n\n"
                      + ATTACH_SERVICE_TEXT + "\n\nWith --prefill/--decode: engines pdtui did not start.\n\n"
                      + ATTACH_ENGINES_TEXT)
ATTACH_EPILOG = ATTACH_SERVICE_EXAMPLES + "\n\n" + ATTACH_ENGINES_EXAMPLES


def _add_engine_url_args(p: argparse.ArgumentParser) -> None:
    """Engines someone else started, by URL, and how to reach, kill and restart them: `pdtui
    attach` and `pdtui drill` (``_attached_topology`` reads them)."""
    p.add_argument("--prefill", action="append", default=[], metavar="URL[,URL...]",
                   help="the prefill engines' URLs (named P, or P1, P2, ...); repeat or separate with commas")
    p.add_argument("--decode", action="append", default=[], metavar="URL[,URL...]",
                   help="the decode engines' URLs (named D, or D1, D2, ...)")
    p.add_argument("--model-name", default=None,
                   help="the model name clients send (default: the one every engine serves, /v1/models)")
    p.add_argument("--block-size", type=int, default=None,
                   help="KV block size, when the engines do not report it (vllm:cache_config_info)")
    p.add_argument("--log", action="append", default=[], metavar="NAME=FILE",
                   help="an engine's log file, followed as it grows for its connector lines (repeatable)")
    p.add_argument("--kill", action="append", default=[], metavar="NAME=CMD",
                   help="a shell command that kills NAME: the k/K key and `pdtui ctl kill NAME` run it")
    p.add_argument("--restart", action="append", default=[], metavar="NAME=CMD",
                   help="a shell command that restarts NAME (it should return once the old engine is gone);"
                   " pdtui then waits until /health answers")
    p.add_argument("--command-timeout", type=float, default=120.0,
                   help="seconds a --kill or --restart command may run before it is killed (default 120)")
    p.add_argument("--decode-reports-cached", action="store_true",
                   help="the decode engines run with --enable-prompt-tokens-details: check every paired"
                   " request for a silent recompute (without it, D's usage cannot tell)")
    p.add_argument("--no-warmup", action="store_true",
                   help="send no warm-up request through the pair before calling it ready")


def _add_attach_engine_args(p: argparse.ArgumentParser) -> None:
    """`pdtui attach`'s arguments for engines given by URL (``run_attach_engines``)."""
    _add_engine_url_args(p)
    p.add_argument("--observe", action="store_true",
                   help="observe only: no proxy, metrics (and --witness) only; for someone else's router")
    p.add_argument("--witness", default=None, metavar="URL",
                   help="with --observe: the router to send a small witness request through every 5 s")
    add_switch_flags(p)
    # --proxy-port is the service flags' (one flag, one meaning: that pdtui's proxy port): with
    # URLs, the port pdtui's proxy serves on (default 8000), which also names its control socket
    p.add_argument("--host", default="127.0.0.1", help="address the proxy binds (default 127.0.0.1)")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds a restarted engine may take to answer /health (default 300)")
    p.add_argument("--headless", action="store_true", help="print events as JSON lines instead of the dashboard")
    p.add_argument("--record", type=Path, default=None, help="also write every event to this JSONL file (for replay)")
    p.add_argument("--logs", action="store_true", help="--headless: include the engines' log lines")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="the run folder (the proxy's log, screenshots; default: a new one under the state dir)")


def _add_ctl_args(ctl: argparse.ArgumentParser) -> None:
    ctl.add_argument("verb", choices=("status", "kill", "restart", "down"), help="what to do")
    ctl.add_argument("instance", nargs="?", default=None, help="kill and restart: the instance (P, D, D2, ...)")
    _add_service_address_args(ctl)
    ctl.add_argument("--json", action="store_true", help="print the answer as one JSON line")
    ctl.add_argument("--timeout", type=float, default=None,
                     help="restart: give up waiting after this many seconds (default: the instance's ready timeout)")


def _add_service_address_args(p: argparse.ArgumentParser) -> None:
    """Which running pdtui: the same flags for `pdtui ctl` and `pdtui attach` (ctl_address reads them)."""
    p.add_argument("--profile", default=None,
                   help="the profile that pdtui runs (its proxy port names it; default: this machine's default)")
    p.add_argument("--proxy-port", type=int, default=None, help="that pdtui's proxy port (default: the profile's)")
    p.add_argument("--port-offset", type=int, default=0, help="the --port-offset that pdtui was started with")
    p.add_argument("--socket", type=Path, default=None,
                   help="the control socket itself (default: <state dir>/ctl/<proxy port>.sock), e.g. one forwarded"
                   " by ssh -L")
    p.add_argument("--connect", metavar="HOST:PORT", default=None,
                   help="a pdtui that listens on TCP (pdtui up --listen HOST:PORT), instead of the socket; needs"
                   " --token-file")
    p.add_argument("--token-file", type=Path, default=None,
                   help="--connect: the file holding that pdtui's token (its <run folder>/token, or the"
                   " --token-file it was given)")


class _Version(argparse.Action):
    """--version: pdtui's and the engines' versions (looked up only when asked)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(version_text())
        parser.exit(0)


def version_text() -> str:
    """pdtui's version, then the engines' (vLLM, NIXL, torch) from their metadata, none imported."""
    import platform

    import pdtui
    from pdtui.core import versions

    lines = [f"pdtui {pdtui.__version__} ({Path(pdtui.__file__).parent})"]
    lines += [f"{dist} {ver or 'not installed'}" for dist, ver in versions.engines()]
    return "\n".join([*lines, f"python {platform.python_version()}"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdtui", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action=_Version, help="print pdtui's and the engines' versions, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser("up", help="launch P + D + the proxy (under the dashboard, headless, or detached)",
                        description=UP_DESCRIPTION, epilog=UP_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_up_args(up)

    attach = sub.add_parser("attach", help="the dashboard on a running service (pdtui up --detach), here or over"
                            " SSH; or over engines pdtui did not start (--prefill URL --decode URL)",
                            description=ATTACH_DESCRIPTION, epilog=ATTACH_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_attach_service_args(attach)
    _add_attach_engine_args(attach)

    drill = sub.add_parser("drill", help="run the failure drills on the dashboard, unattended, and check them",
                           description=(
        "Launch the pair in the dashboard and drive it with its own keys: steady load and a witness stream,"
        " kill D mid-stream (D's pane turns red, the stream ends with an explicit error, the error counter"
        " moves), restart D, kill P (a request falls back to D colocated), restart P (back to the pair, its"
        " freight formula shown), then the histograms. Each consequence is waited for (bounded) and checked;"
        " the exit code is 0 only if every step was seen. Rehearse it before a class; --shots saves an SVG"
        " of the dashboard at each step. Over engines someone else started (--prefill URL --decode URL),"
        " the same drill runs through your --kill and --restart commands, and --scenario headroom over"
        " --decode SMALL,LARGE fills the small D's pool. " + PRECEDENCE),
        epilog=DRILL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_pair_flags(drill)
    drill.add_argument("--shots", type=Path, default=None, help="save an SVG screenshot per step into this folder")
    drill.add_argument("--prefix", default="", help="prefix of the screenshot file names (e.g. cpu-)")
    drill.add_argument("--record", type=Path, default=None, help="also write every event to this JSONL file")
    drill.add_argument("--headless", action="store_true",
                       help="no terminal UI (over ssh scripts, CI); the steps are printed to stderr")
    drill.add_argument("--size", default="160x48", help="--headless: the screen size, WxH (default 160x48)")
    drill.add_argument("--ready-timeout", type=float, default=300.0,
                       help="seconds to wait for the pair, and for a restarted instance (default 300)")
    drill.add_argument("--witness-tokens", type=int, default=3000,
                       help="max_tokens of the stream that is cut by the kill of D (default 3000)")
    drill.add_argument("--scenario", choices=("failure", "headroom", "migrate", "kill-p-load", *FIELD_SCENARIOS),
                       default="failure",
                       help="failure (the default: kill and restart D and P under load) or headroom (a pair with"
                       " several D, e.g. --profile 1p2d-small: fill the smallest D's KV pool with long streams,"
                       " send more, and check they all went to another D, none failed and the full D preempted"
                       " nothing; expected and observed printed) or migrate (a pair with several D: kill the D of a"
                       " greedy stream after its KV transfer, mid-stream; the stream goes on on another D with a"
                       " second transfer, its text equal to an unbroken run's, both transfers on the engines' own"
                       " counters, the seam beside the pair's TTFT) or kill-p-load (D paused, P killed after its answer"
                       " and before D has the KV: what this --connector does then, expected beside observed;"
                       " docs/connectors.md); or a drill from the field (docs/drills.md):"
                       " stranded (KV held on P when D is never sent the request, and the proxy's release),"
                       " fail-open (D given tampered kv_transfer_params, the correctness witness), context (P and"
                       " D with different max_model_len: a launched pair's D gets a quarter of P's), restart-order"
                       " (D restarted while P stays up), handshake (a launched pair whose D's dtype differs, or"
                       " engines given by URL whose KV-shaped settings differ)")
    drill.add_argument("--kv-lease", type=float, default=None, metavar="SECONDS",
                       help="--scenario stranded: how long P holds KV that no D read (its kv_lease_duration,"
                       " in the kv_transfer_config's kv_connector_extra_config; default vLLM's 30)")
    drill.add_argument("--fill-interval", type=float, default=None, metavar="SECONDS",
                       help="--scenario headroom: seconds between the fill streams (default 0.2; slower lets the"
                       " target's streams end while it fills, and takes longer)")
    _add_engine_url_args(drill)
    drill.add_argument("--log-dir", type=Path, default=None,
                       help="write the engines' and the proxy's logs here (default: a new run folder under the"
                       " state dir; printed at start)")

    soak = sub.add_parser("soak", help="the pair under steady mixed load for minutes or hours, a report every N"
                          " minutes, and whether anything grew", description=(
        "Start the pair (or attach to engines given by --prefill/--decode URLs) and keep it under steady mixed"
        " load through pdtui's proxy: several clients, prompts of 64 to --max-prompt tokens, streamed and not."
        " Every --every minutes a line: requests sent, clean and lost (by kind), transfers, the proxy's"
        " traces by outcome, RSS and open fds of every engine pdtui started and of the proxy, each KV pool's"
        " blocks in use. At the end, once the load stopped: the blocks each engine still holds, and the"
        " verdict (no lost request; RSS and fds flat within 5%% after the first report; no block held);"
        " exit 0 only if it all held. " + PRECEDENCE), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_pair_flags(soak)
    _add_engine_url_args(soak)
    soak.add_argument("--minutes", type=float, default=60.0, help="how long the load runs (default 60)")
    soak.add_argument("--every", type=float, default=5.0, help="minutes between reports (default 5)")
    soak.add_argument("--streams", type=int, default=3, help="clients sending at once (default 3)")
    soak.add_argument("--max-prompt", type=int, default=1500, help="longest prompt, tokens (default 1500)")
    soak.add_argument("--seed", type=int, default=0, help="the load's seed (default 0)")
    soak.add_argument("--out", type=Path, default=None, help="write the reports and the verdict as JSON here")
    soak.add_argument("--ready-timeout", type=float, default=300.0,
                      help="seconds to wait for the pair (default 300)")
    soak.add_argument("--log-dir", type=Path, default=None,
                      help="write the engines' and the proxy's logs here (default: a new run folder)")

    ctl = sub.add_parser("ctl", help="control a running pdtui from another terminal: status, kill, restart, down",
                         description=CTL_DESCRIPTION, epilog=CTL_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_ctl_args(ctl)

    rep = sub.add_parser("replay", help="drive the dashboard from a recording (pdtui up --record FILE)",
                         description="Play a recording into the dashboard, at real speed or faster. Kill, restart"
                         " and load are disabled in a replay.")
    rep.add_argument("file", type=Path, help="a JSONL recording from `pdtui up --record`")
    rep.add_argument("--speed", type=float, default=1.0,
                     help="1 = real time, 10 = ten times faster, 0 = as fast as possible (default 1)")
    rep.add_argument("--max-gap", type=float, default=None,
                     help="cap one wait between events at this many seconds (after --speed)")

    pre = sub.add_parser("preflight", help="check the pair against this machine, and say what the engines will do",
                         description=(
        "Run the checks `pdtui up` runs before it starts anything (the device, the model, the connector, the KV"
        " memory, the ports, another pdtui on the proxy port), and print what the engines will do here: the"
        " CPU's features and the attention kernel vLLM will take (device cpu), the AMX tile-state request, the"
        " model, the KV pool in tokens, the engines' versions. Exit 0 when nothing stops the pair, 2 (naming"
        " each problem) when something does. Launches nothing. " + PRECEDENCE),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_pair_flags(pre)

    cfg = sub.add_parser("config", help="show the rendered vllm serve command lines, and check the pair")
    _add_pair_flags(cfg)
    cfg.add_argument("--json", action="store_true", help="print as JSON")

    from pdtui.bench import command as bench_cmd  # no engine, plot or UI imports at this point

    bench = sub.add_parser("bench", help="single instance vs the P/D pair on the same prompts",
                           description=bench_cmd.DESCRIPTION + "\n" + PRECEDENCE, epilog=bench_cmd.EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_pair_flags(bench)
    bench_cmd.add_arguments(bench)

    from pdtui.core.proxy import process as proxy_process

    prox = sub.add_parser("proxy", help="the P/D proxy alone, over engines pdtui did not start", description=(
        "Serve the P/D proxy that `pdtui up` runs inside, over instances started by hand (`vllm serve` with a"
        " kv_producer and a kv_consumer kv_transfer_config) or any OpenAI-compatible servers. Each request goes"
        " to a prefill instance with max_tokens=1, its kv_transfer_params go to a decode instance, which streams"
        " the answer. Without --prefill, requests go to the decode instances as they are (a plain proxy, e.g."
        " to measure the proxy's own cost). Upstreams count as up while their /health answers 200 (polled"
        " every --health-interval s). Events (one per request: outcome, TTFT, every inter-token gap, KV"
        " blocks) are printed to stdout as JSON lines; status lines go to stderr."),
        epilog=("examples:\n"
                "  pdtui proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000\n"
                "  pdtui proxy --prefill P=http://10.0.0.1:8100 --decode D1=http://10.0.0.2:8200"
                " --decode D2=http://10.0.0.3:8200 --record run.jsonl\n"
                "  pdtui proxy --decode http://127.0.0.1:8200 --port 8001    # no P/D: the proxy's own cost"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    proxy_process.add_arguments(prox)


    link = sub.add_parser("link", help="the emulated link between P and D: remove a gone run's, or check one",
                          description=(
        "pdtui up --link makes, for its run, a network namespace for P and one for D, joined by a shaped veth"
        " (docs/link.md), and removes them on every exit; a pdtui killed with SIGKILL leaves them to its reaper"
        " and to the next start. `pdtui link clean` removes those of runs that are gone (by the state files in"
        " the state folder's links/; live runs are left alone). `pdtui link check LINK` tries what the link"
        " needs here (root, veth, htb; netem for rtt and loss) and says what is missing."))
    lsub = link.add_subparsers(dest="link_command", metavar="ACTION")
    lsub.add_parser("clean", help="remove the namespaces and veths of runs that are gone")
    lcheck = lsub.add_parser("check", help="say whether this machine can make a link (exit 2 if not)")
    lcheck.add_argument("spec", help="e.g. 1gbit, rate=2.5gbit,rtt=1ms")

    model = sub.add_parser("model", help="synthetic models (config + tokenizer, no weights)")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION")
    synth = msub.add_parser("synth", help="write a synthetic model directory", description=(
        "Write config.json + a local tokenizer for a model shape. vLLM serves it with --load-format dummy."))
    synth.add_argument("--shape", default="tiny", choices=sorted(model_mod.SHAPES))
    synth.add_argument("--out", type=Path, default=None,
                       help="directory to write (default: the cache pdtui launches from, $PDTUI_HOME/models/SHAPE)")
    synth.add_argument("--weights", action="store_true",
                       help="also write seeded random weights (model.safetensors) whose answers depend on the prompt:"
                       " serve the folder as a model (--model DIR), not with --load-format dummy, for the"
                       " correctness witness (`pdtui drill --scenario fail-open`); give --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None or sys.stderr is None:  # `>&-`: no socket or file of ours may become fd 1 or 2
        from pdtui.core.linesink import hold_closed_std_fds

        hold_closed_std_fds()
    if (sys.argv[1:] if argv is None else argv)[:1] == ["ctl"]:
        # the client alone: no bench or proxy imports, so it starts fast on a busy box (it is
        # what someone types while the engines take every core)
        ctl = argparse.ArgumentParser(prog="pdtui ctl", description=CTL_DESCRIPTION, epilog=CTL_EPILOG,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_ctl_args(ctl)
        try:
            return run_ctl(ctl.parse_args((sys.argv[1:] if argv is None else argv)[1:]))
        except ConfigError as e:
            print(f"pdtui ctl: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["up", *(argv or [])])
    try:
        return COMMANDS[args.command](args) if args.command in COMMANDS else _help(parser)
    except PreflightError as e:
        print(f"pdtui: refused before launch: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"pdtui: config error: {e}", file=sys.stderr)
        return 2


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


BENCH_ENGINES_ONLY = ("model_name", "block_size", "decode_reports_cached")
"""`pdtui bench` flags for engines given by URL."""
BENCH_LAUNCH_ONLY = ("profile", "model", "connector", "kv_load_failure_policy", "kv_storage_path", "links", "link")
"""`pdtui bench` flags for the engines pdtui launches."""


def run_bench(args: argparse.Namespace) -> int:
    """`pdtui bench`: the arms pdtui launches from the profile, or, with --prefill/--decode/--single,
    the arms over engines someone else started (``_bench_engines``). A flag of the other form is refused."""
    from pdtui.bench import command as bench_cmd

    engines = bool(args.prefill or args.decode or args.single)
    defaults = build_parser().parse_args(["bench"])
    other = BENCH_LAUNCH_ONLY if engines else BENCH_ENGINES_ONLY
    given = [n for n in other if getattr(args, n) != getattr(defaults, n)]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        what = ("the engines pdtui launches (with --prefill/--decode/--single the engines are yours, started with"
                " their own settings)" if engines else "engines given by URL (--prefill/--decode/--single)")
        raise ConfigError(f"{flags} is for {what} (pdtui bench --help)")
    if engines:
        return _bench_engines(args)
    cfg = load_config(args)
    _preflight(cfg)
    return bench_cmd.run(cfg, args)


def _bench_engines(args: argparse.Namespace) -> int:
    """`pdtui bench --prefill URL --decode URL [--single URL]`: the arms over engines someone else
    started: the arms asked checked against the engines given, then the engines checked as
    `pdtui attach` checks them (preflight_attached, --single's among them), before anything is sent."""
    from pdtui.bench import command as bench_cmd
    from pdtui.bench.runners import AttachedEngines
    from pdtui.core import topology
    from pdtui.core.ctl_client import default_socket_path
    from pdtui.core.preflight import preflight_attached

    prefills, decodes = _attach_urls(args.prefill, "--prefill"), _attach_urls(args.decode, "--decode")
    singles = _attach_urls([args.single], "--single") if args.single else []
    if len(singles) > 1:
        raise ConfigError(f"--single {args.single}: one URL, the one colocated engine of the single arms")
    if bool(prefills) != bool(decodes):
        raise ConfigError("pdtui bench over engines you started needs both sides of the pair: --prefill URL and"
                          " --decode URL (or --single URL alone, for the single arms)")
    arms = bench_cmd.chosen_arms(args, (bool(prefills), bool(singles)))
    host = args.host or "127.0.0.1"
    proxy_port = (args.proxy_port or 8000) + args.port_offset
    ps, ds = topology.attached_names(len(prefills), "P"), topology.attached_names(len(decodes), "D")
    check = preflight_attached(list(zip(ps, prefills, strict=True)), list(zip(ds, decodes, strict=True)),
                               singles=[("S", u) for u in singles], model_name=args.model_name,
                               proxy=(host, proxy_port), control_socket=default_socket_path(proxy_port))
    for note in check.notes:
        print(f"pdtui bench: note: {note}", file=sys.stderr)
    switches = {f.name: getattr(args, f.name) for f in config_mod.proxy_switches() if getattr(args, f.name) is not None}
    engines = AttachedEngines(
        prefills=tuple(prefills), decodes=tuple(decodes), single=singles[0] if singles else None, host=host,
        proxy_port=proxy_port, switches=switches, decode_reports_cached=args.decode_reports_cached,
        traces_port=args.traces_port,
        engines=tuple({"name": f.name, "role": f.role, "url": f.url, "vllm": f.version} for f in check.facts),
        **_attached_facts(check, args.model_name, args.block_size))
    for arm in arms:
        print(f"pdtui bench: {engines.topology(arm).describe()}", file=sys.stderr, flush=True)
    return bench_cmd.run(engines.topology(arms[0]).cfg, args, engines)


def run_proxy(args: argparse.Namespace) -> int:
    from pdtui.core.proxy import ProxyOptionError
    from pdtui.core.proxy import process as proxy_process
    from pdtui.core.supervisor import PortInUse

    try:
        return proxy_process.main(args)
    except (ProxyOptionError, PortInUse, OSError) as e:
        print(f"pdtui proxy: {e}", file=sys.stderr)
        return 2


def run_model(args: argparse.Namespace) -> int:
    if args.model_command != "synth":
        build_parser().parse_args(["model", "--help"])
    if args.weights and args.out is None:
        raise ConfigError("--weights needs --out: the cache's folder is served with dummy weights")
    out = args.out or (model_mod.default_model_root() / args.shape)
    path = model_mod.synth(args.shape, out, weights=args.weights)
    how = f"serve it as a model: --model {path}" if args.weights else "serve with --load-format dummy"
    print(f"wrote {args.shape} model to {path} ({how})")
    return 0


def run_config(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    for note in _preflight(cfg, ports=False):  # it launches nothing: ports taken now are a note
        print(f"pdtui config: note: {note.text} (`pdtui up` would refuse)", file=sys.stderr)
    from pdtui.core import link as link_mod

    spec = config_mod.link_spec(cfg)
    # an emulated link's names and addresses are the run's, picked when it starts: shown as run "run"
    specs = config_mod.render(cfg, link=link_mod.plan(spec, "run", 0) if spec.emulated else None)
    if spec.emulated:
        print(f"pdtui config: note: link {spec.describe()}: the namespaces, devices and addresses below are an"
              " example (each run picks its own)", file=sys.stderr)
    if args.json:
        print(json.dumps({"config": config_mod.describe(cfg),
                          "launch": [{"name": s.name, "role": s.role, "argv": s.argv, "env": s.env} for s in specs]},
                         indent=2))
        return 0
    import shlex

    print(f"# profile {cfg.profile_name}: proxy on {cfg.proxy_url}")
    for s in specs:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in s.env.items())
        print(f"\n# {s.name} ({s.role}) at {s.url}\n{env} \\\n  {shlex.join(s.argv)}")
    return 0


def run_preflight(args: argparse.Namespace) -> int:
    """The report on stdout, then `up`'s checks: a refusal goes to stderr with exit 2 (main)."""
    from pdtui.core.preflight import report

    cfg = load_config(args)
    where = f" ({cfg.profile_path})" if cfg.profile_path else ""
    print(f"pdtui preflight: profile {cfg.profile_name}{where}, device {cfg.device}, proxy {cfg.proxy_url}")
    for topic, text in report(cfg):
        print(f"  {topic:<10} {text}")
    sys.stdout.flush()
    _preflight(cfg)
    print("ok: nothing here stops this pair (`pdtui up` would start it)")
    return 0


def _preflight(cfg: config_mod.PairConfig, *, ports: bool = True) -> list[Any]:
    """Refuse (PreflightError, exit 2) what cannot launch here: a GPU profile with no GPU, KV over
    the free memory, a connector other than NixlConnector, ports in use, another pdtui answering
    on this proxy port's control socket. Before any engine, and before the dashboard exists."""
    from pdtui.core.preflight import ephemeral_warnings, preflight

    found = preflight(cfg, ports=ports)
    for text in ephemeral_warnings(cfg):
        print(f"pdtui: warning: {text}", file=sys.stderr)
    return found


def _runtime(cfg: config_mod.PairConfig, args: argparse.Namespace, topo: Any = None) -> Any:
    """The Runtime of `up`, `drill` and `attach` (``topo``: a topology other than the config's
    pair), its log folder printed (stderr) before anything starts."""
    from pdtui.core import topology
    from pdtui.core.runtime import Runtime

    rt = Runtime(topo or topology.pair(cfg), log_dir=args.log_dir)
    print(f"pdtui: logs in {rt.log_dir}", file=sys.stderr, flush=True)
    if rt.control_socket is not None:
        print(f"pdtui: control socket {rt.control_socket} (pdtui ctl status{_ctl_hint(cfg)})", file=sys.stderr,
              flush=True)
    return rt


@contextlib.asynccontextmanager
async def _run_context(rt: Any, args: argparse.Namespace, on_signal: Callable[[], Any],
                       signals: tuple[signal.Signals, ...], reason: Callable[[], str]) -> AsyncIterator[None]:
    """The one life of a live run, for `up` (dashboard and headless) and `drill`: its recording
    (--record) from the first event, ``on_signal`` on each of ``signals`` (a closed terminal, a
    kill, Ctrl-C), and whatever ends it (a return, an error, a signal), ``rt.aclose()`` with
    ``reason()`` and the recording closed."""
    record = args.record.open("w") if args.record else None
    if record:
        rt.record_to(record)
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await rt.aclose(reason=reason())
        await rt.control.wait_streams(2.0)  # each `pdtui attach` gets its stream's last line
        if record:
            record.close()


def _ctl_hint(cfg: config_mod.PairConfig) -> str:
    return "" if cfg.proxy_port == 8000 else f" --proxy-port {cfg.proxy_port}"


NOT_A_TERMINAL = (
    "pdtui: the dashboard draws on stderr and reads keys from stdin, and {which} not a terminal"
    " (redirected?), so nothing would show. Run it without redirecting them{alternative}.")


def _terminal_missing(alternative: str) -> int | None:
    """Textual draws on stderr: with ``2>file`` the screen stayed blank and the engines started
    behind it. Said on stdout (stderr is what is redirected), before anything starts; 2, or None
    when stdin and stderr are terminals."""
    missing = [name for name, stream in (("stdin", sys.stdin), ("stderr", sys.stderr))
               if stream is None or not stream.isatty()]
    if not missing:
        return None
    which = " and ".join(missing) + (" are" if len(missing) > 1 else " is")
    print(NOT_A_TERMINAL.format(which=which, alternative=alternative), flush=True)
    return 2


def run_up(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.listen is not None:
        _listen_address(args)  # a malformed --listen: refused before anything starts
    if args.token_file is not None and args.listen is None:
        raise ConfigError("--token-file is the token of --listen HOST:PORT; without --listen nothing uses it")
    if args.detach and not args.service:
        return run_up_detached(cfg, args)
    _preflight(cfg)  # a second pdtui on these ports ends here, before any dashboard exists
    if args.headless or args.service:
        return asyncio.run(_up_headless(cfg, args))
    if code := _terminal_missing(", or `pdtui up --headless` (events as JSON lines)"):
        return code  # after the checks that need no terminal, before anything starts
    return asyncio.run(_up_dashboard(cfg, args))


def _refresh_s() -> float:
    """The live dashboard's refresh interval (pdtui.app.app.refresh_interval_s), a bad
    PDTUI_REFRESH_MS a ConfigError."""
    from pdtui.app.app import refresh_interval_s

    try:
        return refresh_interval_s()
    except ValueError as e:
        raise ConfigError(str(e)) from None


async def _up_dashboard(cfg: config_mod.PairConfig, args: argparse.Namespace, topo: Any = None) -> int:
    """The dashboard over a live Runtime. Whatever ends the app (q, Ctrl-C, a closed terminal, a
    crash, `pdtui ctl down`), ``aclose()`` runs, so both engines and the proxy stop."""
    from pdtui.app.app import make_app  # textual stays out of the headless path

    rt = _runtime(cfg, args, topo)
    app = make_app(rt, freeze_gc=True, refresh_s=_refresh_s())
    try:  # a closed terminal or a kill: leave through aclose()
        async with _run_context(rt, args, app.exit, (signal.SIGTERM, signal.SIGHUP), lambda: "dashboard closed"), \
                _tcp_control(rt, args):
            await app.run_async()
            return app.return_code or 0
    finally:
        print(f"pdtui: logs in {rt.log_dir}", file=sys.stderr, flush=True)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 160x48") from None
    if w < 80 or h < 24:
        raise ConfigError(f"--size {text}: the dashboard needs at least 80x24")
    return w, h


FIELD_SCENARIOS = ("stranded", "fail-open", "context", "restart-order", "handshake")
"""`pdtui drill --scenario`'s drills from the field (pdtui.app.drill_field.SCENARIOS)."""


def _field_topology(cfg: config_mod.PairConfig, scenario: str, topo: Any = None) -> Any:
    """The topology a field drill runs on: the proxy honours the drill's faults (ProxySettings.drill);
    the context drill's launched D gets a quarter of P's max_model_len, past the config's check on
    purpose (topology.with_argv)."""
    from pdtui.core import topology

    topo = topology.with_settings(topo or topology.pair(cfg), drill=True)
    launched = [m for m in topo.members if m.launch is not None and m.role == "decode"]
    for m in launched:
        if scenario == "context":
            topo = topology.with_argv(topo, m.name, "--max-model-len", str(cfg.max_model_len // 4))
        elif scenario == "handshake":  # KV-shaped: P's and D's KV bytes per token differ
            topo = topology.with_argv(topo, m.name, "--dtype", "float32" if cfg.dtype != "float32" else "bfloat16")
    return topo


# `pdtui drill` flags that only mean something for one of its two forms
DRILL_LAUNCH_ONLY = ("profile", "model", "connector", "kv_load_failure_policy", "kv_storage_path", "traces_port",
                     "port_offset", "link")
DRILL_ENGINES_ONLY = ("log", "kill", "restart", "model_name", "block_size", "decode_reports_cached", "no_warmup")


DRILL_EPILOG = """examples:
  pdtui drill --headless                      the failure drill on the default pair, steps on stderr
  pdtui drill --profile 1p2d-small --scenario headroom
                                              fill the small D's pool, check new streams go elsewhere
  pdtui drill --headless --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 \\
      --kill P='pkill -9 -f port.8100' --restart P=./start-p.sh \\
      --kill D='pkill -9 -f port.8200' --restart D=./start-d.sh
                                              the failure drill over engines you started
  pdtui drill --headless --scenario headroom --decode-choice headroom \\
      --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8250,http://127.0.0.1:8200
                                              the headroom drill over your 1P2D (the smaller D fills)
  pdtui drill --profile 1p2d-small --scenario migrate
                                              kill the D of a stream mid-way: it goes on on the other D
  pdtui drill --headless --scenario stranded  a drill from the field (docs/drills.md): stranded, fail-open,
                                              context; over a launched pair or --prefill/--decode URLs
"""


def run_drill(args: argparse.Namespace) -> int:
    """`pdtui drill`: over a pair it launches (a profile), or over engines someone else started
    (--prefill URL --decode URL, with their kill and restart commands)."""
    engines = bool(args.prefill or args.decode)
    defaults = build_parser().parse_args(["drill"])
    given = [n for n in (DRILL_LAUNCH_ONLY if engines else DRILL_ENGINES_ONLY) if getattr(args, n) != getattr(defaults, n)]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        what = "a pair pdtui launches (no --prefill/--decode)" if engines else "engines given by URL (--prefill/--decode)"
        print(f"pdtui drill: {flags} is for {what} (pdtui drill --help)", file=sys.stderr)
        return 2
    size = _size(args.size) if args.headless else None
    if args.witness_tokens < 50:
        raise ConfigError("--witness-tokens must be at least 50: the stream has to outlive the kill")
    if args.fill_interval is not None and (args.scenario != "headroom" or not 0.05 <= args.fill_interval <= 60):
        raise ConfigError("--fill-interval SECONDS (0.05 to 60) is for --scenario headroom: the time between fill"
                          " streams")
    if args.kv_lease is not None and (args.scenario != "stranded" or args.kv_lease <= 0):
        raise ConfigError("--kv-lease SECONDS (positive) is for --scenario stranded: P's kv_lease_duration")
    topo = None
    if engines:
        # the context and handshake drills show what a pair that pdtui refuses does: they go past
        # preflight's comparison of the two sides on purpose (its refusals printed as notes)
        topo = _attached_topology(args, "pdtui drill", despite=args.scenario in ("context", "handshake"))
        _drill_needs(topo, args.scenario)
        cfg = topo.cfg
    else:
        cfg = load_config(args)
        _preflight(cfg)
    if not args.headless and (code := _terminal_missing(", or `pdtui drill --headless`")):
        return code
    return asyncio.run(_drill(cfg, args, size, topo))


def _drill_needs(topo: Any, scenario: str) -> None:
    """What a drill over engines pdtui did not start needs before it begins: the failure drill
    kills and restarts D and P through the user's commands; the headroom drill needs two D."""
    members = list(topo.members)
    if scenario == "kill-p-load":
        raise ConfigError("--scenario kill-p-load pauses D's processes (SIGSTOP) between P's answer and D's load:"
                          " it runs on a pair pdtui launches (--connector KEY), not over engines given by URL")
    if scenario == "restart-order":
        missing = [f"--{what} {m.name}=CMD" for m in members if m.role == "decode" for what in ("kill", "restart")
                   if getattr(m.attach, what) is None]
        if missing:
            raise ConfigError("the restart-order drill kills and restarts D through your commands; missing: "
                              + ", ".join(missing))
        return
    if scenario in FIELD_SCENARIOS:  # they kill and restart nothing
        return
    if scenario == "headroom":
        if sum(1 for m in members if m.role == "decode") < 2:
            raise ConfigError("--scenario headroom needs two decode engines or more: --decode URL,URL")
        return
    if scenario == "migrate":
        decodes = [m for m in members if m.role == "decode"]
        if len(decodes) < 2:
            raise ConfigError("--scenario migrate needs two decode engines or more: --decode URL,URL")
        missing = [f"--kill {m.name}=CMD" for m in decodes if m.attach.kill is None]
        if missing:
            raise ConfigError("the migration drill kills the D that runs its stream (either may) through your"
                              " commands; missing: " + ", ".join(missing) + " (--restart NAME=CMD brings it back"
                              " after; without it, it is left down)")
        return
    missing = [f"--{what} {m.name}=CMD" for m in members for what in ("kill", "restart")
               if getattr(m.attach, what) is None]
    if missing:
        raise ConfigError("the failure drill kills and restarts every engine through your commands; missing: "
                          + ", ".join(missing))


async def _drill(cfg: config_mod.PairConfig, args: argparse.Namespace, size: tuple[int, int] | None,
                 topo: Any = None) -> int:
    from pdtui.app import drill
    from pdtui.app.app import make_app

    rt = _runtime(cfg, args, _field_topology(cfg, args.scenario, topo) if args.scenario in FIELD_SCENARIOS else topo)
    app = make_app(rt, screenshot_dir=args.shots)
    result: list[drill.DrillResult] = []

    def log(text: str) -> None:
        if args.headless:
            print(text, file=sys.stderr, flush=True)
        else:
            app.show_notice(text)

    async def autopilot(pilot: Any) -> None:
        if args.scenario in FIELD_SCENARIOS:
            from pdtui.app import drill_field

            options = {"lease_s": args.kv_lease} if args.kv_lease is not None else {}
            res = await drill_field.run(pilot, args.scenario, shots=args.shots, prefix=args.prefix, log=log,
                                        **options)
        elif args.scenario == "headroom":
            from pdtui.app import drill_headroom

            fill = {"interval_s": args.fill_interval} if args.fill_interval is not None else {}
            res = await drill_headroom.run(pilot, shots=args.shots, prefix=args.prefix,
                                           ready_timeout_s=args.ready_timeout, log=log, **fill)
        elif args.scenario == "migrate":
            from pdtui.app import drill_migrate

            res = await drill_migrate.run(pilot, migrate=cfg.migrate, connector=cfg.connector, shots=args.shots,
                                          prefix=args.prefix, ready_timeout_s=args.ready_timeout, log=log)
        elif args.scenario == "kill-p-load":
            from pdtui.app import drill_transport

            res = await drill_transport.run(pilot, policy=cfg.kv_load_failure_policy, shots=args.shots,
                                            prefix=args.prefix, ready_timeout_s=args.ready_timeout, log=log)
        else:
            res = await drill.run(pilot, shots=args.shots, prefix=args.prefix, ready_timeout_s=args.ready_timeout,
                                  witness_tokens=args.witness_tokens, log=log)
        result.append(res)
        if app.is_running:
            await app.action_quit()

    async with _run_context(rt, args, app.exit, (signal.SIGTERM, signal.SIGHUP), lambda: "drill over"):
        await app.run_async(headless=args.headless, size=size, auto_pilot=autopilot)
    if not result:
        print("pdtui drill: stopped before the drill finished", file=sys.stderr)
        return 1
    print(result[0].table())
    if args.shots:
        print(f"screenshots in {args.shots}/")
    return 0 if result[0].ok else 1


def run_soak(args: argparse.Namespace) -> int:
    """`pdtui soak`: over a pair it launches, or engines given by URL; the verdict's exit code."""
    if args.minutes <= 0 or args.every <= 0 or args.streams < 1 or args.max_prompt < 64:
        raise ConfigError("--minutes and --every are positive, --streams at least 1, --max-prompt at least 64")
    topo = None
    if args.prefill or args.decode:
        topo = _attached_topology(args, "pdtui soak")
        cfg = topo.cfg
    else:
        cfg = load_config(args)
        _preflight(cfg)
    return asyncio.run(_soak(cfg, args, topo))


async def _soak(cfg: config_mod.PairConfig, args: argparse.Namespace, topo: Any = None) -> int:
    from pdtui.bench import soak

    rt = _runtime(cfg, args, topo)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, task.cancel if task else (lambda: None))
    try:
        elapsed = await rt.start()
        if rt.broken:
            print(f"pdtui soak: the pair came up broken: {rt.broken}", file=sys.stderr)
            return 1
        print(f"[soak] pair ready in {elapsed:.1f} s; {args.minutes:g} min of load, a report every {args.every:g} min",
              flush=True)
        res = await soak.run(rt, minutes=args.minutes, every_min=args.every, streams=args.streams,
                             max_prompt=args.max_prompt, seed=args.seed, out=args.out,
                             say=lambda line: print(line, flush=True))
    except asyncio.CancelledError:
        print("pdtui soak: stopped before the end", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await rt.aclose(reason="soak over")
    rows = res.verdict()
    print(f"\n{'':<4} {'expected':<58} observed")
    for expected, observed, held in rows:
        print(f"{'ok' if held else 'NOT':<4} {expected:<58} {observed}")
    return 0 if all(h for _, _, h in rows) else 1


def run_replay(args: argparse.Namespace) -> int:
    if not args.file.exists():
        print(f"pdtui: no such recording: {args.file}", file=sys.stderr)
        return 2
    from pdtui.app.app import make_app
    from pdtui.core.replay import BadRecording, Replay

    if args.speed < 0:
        print("pdtui: --speed must be 0 (as fast as possible) or more", file=sys.stderr)
        return 2
    if code := _terminal_missing(""):
        return code

    async def go() -> int:
        try:
            rt = Replay(args.file, speed=args.speed, max_gap_s=args.max_gap)
        except BadRecording as e:
            print(f"pdtui: {e}", file=sys.stderr)
            return 2
        app = make_app(rt, replay=True, speed=args.speed, freeze_gc=True)
        try:
            await app.run_async()
        finally:
            await rt.aclose()
        return app.return_code or 0

    return asyncio.run(go())


async def _up_headless(cfg: config_mod.PairConfig, args: argparse.Namespace, topo: Any = None) -> int:
    """Events as JSON lines on stdout, until a signal or `pdtui ctl down` (`up --headless`, `attach
    --headless`). As the detached service (``--service``): no events on stdout (they go to the
    recording), and SIGHUP ignored, as it is when started under nohup: the service outlives its
    terminal. Without --service, SIGHUP (the terminal went away) stops everything, unless it was
    ignored at start (nohup, `trap '' HUP`).

    stdout and stderr are written through LineSinks (pdtui.core.linesink): never blocking the loop,
    never raising. A stdout nobody reads loses whole events past 16 MiB, counted; one closed or gone
    (EPIPE, EIO) loses them all, counted: the pair serves on either way. The counts show in `pdtui
    ctl status` (``stdout``) and in the last line on stderr; --record keeps every event."""
    from pdtui.core.events import LogLine, Notice
    from pdtui.core.linesink import LineSink

    rt = _runtime(cfg, args, topo)
    stop = asyncio.Event()
    rt.control.on_down(stop.set)  # `pdtui ctl down`: everything is stopped, return
    service = getattr(args, "service", False)  # `attach --headless` has no --service
    if service:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    hangup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    events = None if service else rt.subscribe()
    err = LineSink(sys.stderr, name="stderr", limit=2**20)

    def say(text: str) -> None:
        err.write((text + "\n").encode(errors="replace"))

    def gap_line(n: int) -> bytes:
        text = f"pdtui: {n:,} events were dropped here: stdout was not read (the recording, if any, has them)"
        return (Notice(level="warning", text=text).to_json() + "\n").encode()

    out = LineSink(sys.stdout, name="stdout", gap_line=gap_line,
                   on_change=lambda text: say(f"pdtui: {text} (pdtui ctl status{_ctl_hint(cfg)} counts them)"))
    if events is not None:
        rt.control.extra_status["stdout"] = out.counts
        if out.gone == "closed":
            say("pdtui: stdout is closed: events are dropped, and counted (pdtui ctl status); --record keeps them")

    async def printer() -> None:
        if events is None:
            return
        async for ev in events:
            if isinstance(ev, LogLine) and not args.logs:
                continue
            out.write((ev.to_json() + "\n").encode())
        await events.aclose()

    printing = asyncio.create_task(printer())
    code = 0
    try:
        async with _run_context(rt, args, stop.set, (signal.SIGINT, signal.SIGTERM, *hangup),
                                lambda: "signal" if stop.is_set() else "exit"), _tcp_control(rt, args):
            code = await _serve_headless(rt, stop, "pdtui ctl down" + _ctl_hint(cfg) if service else "Ctrl-C", say)
    finally:
        await printing
        await out.aclose(2.0)
        if out.dropped:
            say(f"pdtui: {out.summary().replace('lines', 'events')}; {out.written:,} written"
                + ("; the recording has every one" if getattr(args, "record", None) else ""))
        await err.aclose(1.0)
    return code


def _listen_address(args: argparse.Namespace) -> tuple[str, int]:
    from pdtui.core.ctl_client import parse_hostport

    try:
        return parse_hostport(args.listen)
    except ValueError as e:
        raise ConfigError(f"--listen {e}") from None


@contextlib.asynccontextmanager
async def _tcp_control(rt: Any, args: argparse.Namespace) -> AsyncIterator[None]:
    """`--listen HOST:PORT`: the control protocol on TCP too, behind a token (--token-file, or a
    new one written 0600 to the run folder), for as long as the run."""
    if getattr(args, "listen", None) is None:  # `attach --headless` has no --listen
        yield
        return
    from pdtui.core.control import ControlTcpServer

    host, port = _listen_address(args)
    token, where = _token(args, rt.log_dir)
    try:
        server = await ControlTcpServer(rt.control, host, port, token).start()
    except OSError as e:
        raise ConfigError(f"--listen {args.listen}: {e.strerror or e}") from None
    wide = "" if host in ("127.0.0.1", "localhost", "::1") else (
        "; it is reachable beyond this machine, in plain text: prefer 127.0.0.1 and SSH forwarding")
    print(f"pdtui: control on TCP {rt.control.tcp_address} (token in {where}{wide})", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        server.close()


def _token(args: argparse.Namespace, run_dir: Path) -> tuple[str, Path]:
    """The --listen token: --token-file's first line, or a new one written 0600 to <run dir>/token."""
    import os
    import secrets
    import stat

    from pdtui.core.ctl_client import read_token

    if args.token_file is not None:
        try:
            token = read_token(args.token_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--token-file: {e}") from None
        if len(token) < 16:
            raise ConfigError(f"--token-file {args.token_file}: a token of at least 16 characters, e.g."
                              " `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        if stat.S_IMODE(os.stat(args.token_file).st_mode) & 0o077:
            print(f"pdtui: warning: {args.token_file} can be read by others (chmod 600 it)", file=sys.stderr)
        return token, args.token_file
    path = Path(run_dir) / "token"
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, path


def _say_stderr(text: str) -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        print(text, file=sys.stderr, flush=True)


async def _serve_headless(rt: Any, stop: asyncio.Event, stopper: str = "Ctrl-C",
                          say: Callable[[str], None] | None = None) -> int:
    """Start, say ready (or broken) on stderr, serve until a signal or `pdtui ctl down`; 1 if the
    start failed. ``stopper``: what stops it, in the ready line; ``say``: a line on stderr (default
    print, errors ignored)."""
    say = say or _say_stderr
    from pdtui.core.supervisor import PortInUse, StartupFailed

    try:
        starting = asyncio.create_task(rt.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and not rt.control.down_requested:
            elapsed = starting.result()
            if rt.topology.observe:
                names = ", ".join(rt.instances)
                via = f"; witness requests through {rt.topology.router}" if rt.topology.router else ""
                say(f"pdtui: observing {names} in {elapsed:.1f} s (metrics only, no proxy{via}); {stopper}"
                    " detaches")
            elif rt.broken is not None:  # up, but the warm-up says the pair does not work
                say(f"pdtui: pair up in {elapsed:.1f} s but BROKEN: {rt.broken}; proxy at {rt.url}"
                    f" serving anyway ({stopper} stops everything)")
            else:
                warm = " (warm-up through P and D included)" if rt.topology.warmup else ""
                ends = "stops the proxy; attached engines run on" if rt.specs == [] else "stops everything"
                say(f"pdtui: pair ready in {elapsed:.1f} s{warm}; proxy at {rt.url} ({stopper} {ends})")
            await stopping
        else:  # a signal, or `pdtui ctl down` during start-up (its stop fails the start: no error then)
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
        if rt.control.down_requested:  # let `down` finish and answer before this pdtui ends
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(stopping, 120)
    except (StartupFailed, PortInUse) as e:
        say(f"pdtui: {e}")
        return 1
    return 0


# ----- the detached service (pdtui up --detach) --------------------------------------------------

SERVICE_SKIP = frozenset({"help", "detach", "headless", "service", "log_dir", "record"})
"""`up` flags a detached service's command line does not copy (it sets them itself)."""


def _service_args(args: argparse.Namespace, run_dir: Path, record: Path) -> list[str]:
    """The detached service's `pdtui ...` arguments: `up --headless --service`, its run folder and
    recording, and every other `up` flag given (as parsed, so an abbreviation is not copied blind)."""
    flags = argparse.ArgumentParser(add_help=False)
    _add_up_args(flags)
    out = ["up", "--headless", "--service", "--log-dir", str(run_dir), "--record", str(record)]
    for action in flags._actions:
        if not action.option_strings or action.dest in SERVICE_SKIP:
            continue
        value = getattr(args, action.dest, action.default)
        if value is None or value == action.default:
            continue
        flag = next(o for o in action.option_strings if o.startswith("--"))
        if action.nargs == 0:  # store_true, store_const
            out.append(flag)
        else:
            out += [flag, str(Path(value).resolve()) if isinstance(value, Path) else str(value)]
    return out


def run_up_detached(cfg: config_mod.PairConfig, args: argparse.Namespace) -> int:
    """`pdtui up --detach`: the checks here, then `pdtui up --headless --service` in a session of
    its own, its progress shown until the pair is ready (0), broken (3), or the service died or
    timed out (1, with the last lines of its output); then where everything is."""
    import subprocess
    import time

    from pdtui.core import ctl_client
    from pdtui.core.runtime import default_run_dir
    from pdtui.core.supervisor import PortInUse, check_port_free

    _preflight(cfg)
    if args.listen is not None:
        host, port = _listen_address(args)
        try:
            check_port_free(host, port, "--listen")
        except PortInUse as e:
            raise ConfigError(str(e)) from None
    if args.token_file is not None:
        try:
            ctl_client.read_token(args.token_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--token-file: {e}") from None
    run_dir = Path(args.log_dir or default_run_dir(cfg)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    record = Path(args.record or run_dir / "events.jsonl").resolve()
    out_path = run_dir / "service.out"
    sock = ctl_client.default_socket_path(cfg.proxy_port)
    argv = [sys.executable, "-m", "pdtui", *_service_args(args, run_dir, record)]
    with open(out_path, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    print(f"pdtui: starting the service (pid {proc.pid}); its output goes to {out_path}", file=sys.stderr, flush=True)
    # the service's own bounds end it first: each engine's ready timeout, the proxy, the warm-up (180 s)
    bound = cfg.ready_timeout_s + (180.0 if cfg.warmup else 0.0) + 60.0
    t0 = time.monotonic()
    progress = _Progress()
    try:
        outcome, status = _wait_service(proc, sock, t0 + bound, progress)
    except KeyboardInterrupt:
        progress.end()
        print("pdtui: interrupted: stopping the service", file=sys.stderr, flush=True)
        _stop_service(proc, sock)
        return 130
    progress.end()
    if outcome in ("died", "timeout"):
        if outcome == "died":
            print(f"pdtui: the service exited with code {proc.returncode} during start-up"
                  f" ({time.monotonic() - t0:.0f} s). The last lines of {out_path}:", file=sys.stderr)
        else:
            print(f"pdtui: the pair was not ready within {bound:.0f} s: stopping the service. The last lines"
                  f" of {out_path}:", file=sys.stderr)
            _stop_service(proc, sock)
        for line in _tail(out_path, 20):
            print(f"  | {line}", file=sys.stderr)
        print(f"pdtui: logs in {run_dir}", file=sys.stderr)
        return 1
    hint = _ctl_hint(cfg)
    ready_s = status.get("pair_ready_s")
    head = (f"pair up in {time.monotonic() - t0:.1f} s but BROKEN: {status.get('pair_broken')}" if outcome == "broken"
            else f"pair ready in {ready_s:.1f} s")
    where = [("control socket", str(sock)),
             ("run folder", f"{run_dir} (engine and proxy logs, service.out)"),
             ("recording", str(record))]
    if args.listen is not None:
        token = Path(args.token_file).resolve() if args.token_file else run_dir / "token"
        where.append(("TCP", f"{status.get('tcp') or args.listen}, token in {token}"))
    where += [("watch it", f"pdtui attach{hint}   (--read-only: no kill/restart keys)"),
              ("stop it", f"pdtui ctl down{hint}")]
    print(f"pdtui: service running (pid {proc.pid}): {head}; proxy at {cfg.proxy_url}")
    for what, text in where:
        print(f"  {what:<15} {text}")
    return 3 if outcome == "broken" else 0


class _Progress:
    """The start's progress on stderr: one line rewritten on a terminal, else a line per change."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.open = False
        self.last: str | None = None

    def show(self, elapsed: float, text: str) -> None:
        line = f"pdtui: {elapsed:3.0f} s: {text}"
        if self.tty:
            import shutil

            sys.stderr.write("\r\x1b[K" + line[: max(20, shutil.get_terminal_size((100, 24)).columns - 1)])
            sys.stderr.flush()
            self.open = True
        elif text != self.last:
            print(line, file=sys.stderr, flush=True)
        self.last = text

    def end(self) -> None:
        if self.open:
            sys.stderr.write("\n")
            self.open = False


def _wait_service(proc: Any, sock: Path, deadline: float, progress: _Progress) -> tuple[str, dict[str, Any]]:
    """Until the pair is ready or broken, the service died, or ``deadline`` (time.monotonic())."""
    import time

    from pdtui.core.ctl_client import probe

    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            return "died", {}
        st = probe(sock, 2.0) if sock.exists() else None
        mine = st if st and st.get("pid") == proc.pid else None  # not another pdtui's
        elapsed = time.monotonic() - t0
        if mine is None:
            progress.show(elapsed, "starting the service")
        else:
            instances = mine.get("instances", [])
            states = ", ".join(f"{i['name']} {i['state']}" for i in instances)
            warm = mine.get("pair_ready_s") is None and instances and all(i["state"] == "ready" for i in instances)
            progress.show(elapsed, states + (", then the proxy and the warm-up through the pair" if warm else ""))
            if mine.get("pair_broken"):
                return "broken", mine
            if mine.get("pair_ready_s") is not None:
                return "ready", mine
        if time.monotonic() > deadline:
            return "timeout", mine or {}
        time.sleep(0.5)


def _stop_service(proc: Any, sock: Path) -> None:
    """`down` through its socket, else SIGTERM then SIGKILL to its process group (its engines die
    with it: PR_SET_PDEATHSIG and the reaper)."""
    import os
    import subprocess

    from pdtui.core.ctl_client import request

    with contextlib.suppress(OSError, ValueError):
        if sock.exists():
            request(sock, {"verb": "down", "source": "pdtui up --detach"}, timeout_s=60)
    for sig, wait_s in ((None, 30.0), (signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return [f"(cannot read it: {e})"]
    return [line for line in lines if line.strip()][-n:] or ["(nothing)"]


# ----- pdtui attach: the dashboard on a running service --------------------------------------------


def run_attach_service(args: argparse.Namespace) -> int:
    """`pdtui attach` with no engine URLs: a RemoteSource on the service's control socket, under
    the dashboard."""
    try:
        address, token = ctl_address(args)
    except (OSError, ValueError) as e:
        print(f"pdtui attach: {e}", file=sys.stderr)
        return 2
    if code := _terminal_missing(""):
        return code
    return asyncio.run(_attach_service(address, token, args))


async def _attach_service(address: Any, token: str | None, args: argparse.Namespace) -> int:
    from pdtui.app.app import make_app
    from pdtui.core.ctl_client import NotListening, describe
    from pdtui.core.remote import RemoteRefused, RemoteSource

    remote = RemoteSource(address, token=token, read_only=args.read_only)
    try:
        await remote.connect()
    except NotListening as e:
        print(f"pdtui attach: {e}. Start one with `pdtui up --detach`, or name the one you mean with"
              f" --port-offset N, --proxy-port N, --socket PATH or --connect HOST:PORT{_other_sockets(address)}",
              file=sys.stderr)
        return 1
    except RemoteRefused as e:
        print(f"pdtui attach: {e}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError, ValueError) as e:
        print(f"pdtui attach: {describe(address)}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    app = make_app(remote, freeze_gc=True, refresh_s=_refresh_s())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal or SSH session: this viewer ends, alone
        loop.add_signal_handler(sig, app.exit)
    try:
        await app.run_async()
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await remote.aclose()
    with contextlib.suppress(OSError):  # the terminal may be gone
        if remote.ended == "closed":
            print(f"pdtui attach: {remote.end_reason}", file=sys.stderr)
        else:
            print(f"pdtui attach: left the service at {describe(address)}; it runs on (`pdtui ctl down` stops it)",
                  file=sys.stderr)
    return app.return_code or 0


def _other_sockets(address: Any) -> str:
    if not isinstance(address, Path) or not address.parent.is_dir():
        return ""
    others = sorted(p.name for p in address.parent.glob("*.sock") if p != address)
    return f"; sockets there: {', '.join(others)}" if others else ""


def ctl_address(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The control socket meant (ctl_socket_path), or --connect HOST:PORT with --token-file's token."""
    from pdtui.core import ctl_client

    if args.connect is None:
        if args.token_file is not None:
            raise ValueError("--token-file goes with --connect HOST:PORT (the Unix socket needs no token)")
        return ctl_socket_path(args), None
    if args.socket is not None:
        raise ValueError("--socket or --connect, not both")
    if args.token_file is None:
        raise ValueError(f"--connect {args.connect} needs --token-file FILE: the token of the pdtui that listens"
                         " there (its <run folder>/token, or the --token-file it was given)")
    return ctl_client.parse_hostport(args.connect), ctl_client.read_token(args.token_file)
def _attach_urls(values: list[str], flag: str) -> list[str]:
    """URLs from repeated and comma-separated flags; a malformed one is a ConfigError (exit 2)."""
    from urllib.parse import urlsplit

    out = []
    for value in values:
        for url in (u.strip() for u in value.split(",")):
            try:
                parts = urlsplit(url)
                port = parts.port
            except ValueError as e:
                raise ConfigError(f"{flag} {url!r}: not a URL ({e}); expected http://HOST:PORT") from None
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
                    or parts.query or (port is None and ":" in parts.netloc.rsplit("]", 1)[-1]):
                raise ConfigError(f"{flag} {url!r}: not an engine's URL; expected http://HOST:PORT (the address"
                                  " `vllm serve` listens on, no path)")
            out.append(url.rstrip("/"))
    return out


def _attach_named(values: list[str], flag: str, names: list[str]) -> dict[str, str]:
    """NAME=VALUE flags: NAME one of ``names`` (case does not matter), each at most once."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        match = next((n for n in names if n.lower() == name.strip().lower()), None)
        if not sep or not rest.strip():
            raise ConfigError(f"{flag} {value!r}: expected NAME=VALUE, e.g. {flag} {names[-1]}=...")
        if match is None:
            raise ConfigError(f"{flag} {name}=...: no instance {name!r}; this attach has {', '.join(names)}"
                              " (named from --prefill and --decode, in order)")
        if match in out:
            raise ConfigError(f"{flag} {match}: given twice")
        out[match] = rest.strip()
    return out


ATTACH_SERVICE_ONLY = ("socket", "connect", "token_file", "read_only", "port_offset", "profile")
ATTACH_ENGINES_ONLY = ("log", "kill", "restart", "observe", "witness", "model_name", "block_size", "headless",
                       "record", "logs", "log_dir", "decode_reports_cached", "no_warmup")


def run_attach(args: argparse.Namespace) -> int:
    """`pdtui attach`: engines given by URL (--prefill/--decode) -> run_attach_engines; else a
    viewer of a running service -> run_attach_service. A flag of the other form is refused."""
    engines = bool(args.prefill or args.decode)
    defaults = build_parser().parse_args(["attach"])
    other = ATTACH_SERVICE_ONLY if engines else ATTACH_ENGINES_ONLY
    given = [n for n in other if getattr(args, n) != getattr(defaults, n)]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        what = "a viewer of a running service (no --prefill/--decode)" if engines else "engines given by URL (--prefill/--decode)"
        print(f"pdtui attach: {flags} is for {what} (pdtui attach --help)", file=sys.stderr)
        return 2
    if engines:
        return run_attach_engines(args)
    return run_attach_service(args)


def run_attach_engines(args: argparse.Namespace) -> int:
    """Engines someone else started, by URL: checked (preflight_attached), then the dashboard or
    --headless over a Runtime of their attached topology, as `up` over a launched pair."""
    if args.witness is not None and not args.observe:
        raise ConfigError("--witness needs --observe: with pdtui's proxy in the path every request is measured")
    router = _attach_urls([args.witness], "--witness")[0] if args.witness else None
    topo = _attached_topology(args, "pdtui attach", observe=args.observe, router=router)
    if args.headless:
        return asyncio.run(_up_headless(topo.cfg, args, topo))
    if code := _terminal_missing(", or `pdtui attach --headless ...` (events as JSON lines)"):
        return code
    return asyncio.run(_up_dashboard(topo.cfg, args, topo))


def _attached_topology(args: argparse.Namespace, verb: str, *, observe: bool = False,
                       router: str | None = None, despite: bool = False) -> Any:
    """The topology of engines given by URL (``_add_engine_url_args``), after preflight_attached
    checked them (refusals raise; notes printed): `pdtui attach` and `pdtui drill` over engines.
    ``despite``: the two sides may differ (a drill showing what such a pair does): those refusals
    are printed as notes instead."""
    from pdtui.core import topology
    from pdtui.core.ctl_client import default_socket_path
    from pdtui.core.preflight import preflight_attached

    if args.proxy_port is None:
        args.proxy_port = 8000
    if args.host is None:
        args.host = "127.0.0.1"
    prefills, decodes = _attach_urls(args.prefill, "--prefill"), _attach_urls(args.decode, "--decode")
    if not prefills or not decodes:
        raise ConfigError(f"{verb} needs both sides: --prefill URL and --decode URL")
    ps, ds = topology.attached_names(len(prefills), "P"), topology.attached_names(len(decodes), "D")
    names = ps + ds
    logs = {n: Path(f).expanduser() for n, f in _attach_named(args.log, "--log", names).items()}
    for n, path in logs.items():
        if not path.is_file():
            raise ConfigError(f"--log {n}={path}: no such file")
    kills = _attach_named(args.kill, "--kill", names)
    restarts = _attach_named(args.restart, "--restart", names)
    if args.command_timeout <= 0 or args.ready_timeout <= 0:
        raise ConfigError("--command-timeout and --ready-timeout are positive numbers of seconds")
    check = preflight_attached(list(zip(ps, prefills, strict=True)), list(zip(ds, decodes, strict=True)),
                               model_name=args.model_name, logs=logs, observe=observe, despite=despite,
                               proxy=None if observe else (args.host, args.proxy_port),
                               control_socket=default_socket_path(args.proxy_port))
    for note in check.notes:
        print(f"{verb}: note: {note}", file=sys.stderr)
    attach = {n: topology.Attach(log=logs.get(n), kill=kills.get(n), restart=restarts.get(n),
                                 command_timeout_s=args.command_timeout) for n in names}
    switches = {f.name: getattr(args, f.name) for f in config_mod.proxy_switches() if getattr(args, f.name) is not None}
    topo = topology.attached(
        prefills, decodes, host=args.host, proxy_port=args.proxy_port, observe=observe,
        router=router, attach=attach, ready_timeout_s=args.ready_timeout, warmup=not args.no_warmup,
        decode_reports_cached=args.decode_reports_cached, switches=switches,
        **_attached_facts(check, args.model_name, args.block_size))
    print(f"{verb}: {topo.describe()}", file=sys.stderr, flush=True)
    return topo


def _attached_facts(check: Any, model_name: str | None, block_size: int | None) -> dict[str, Any]:
    """What engines someone else started say of themselves (a preflight_attached check), as
    topology.attached takes it: the model name they serve in common (or --model-name), the block
    size (or --block-size), the first engine's model, max_model_len, dtypes and vLLM version.
    `pdtui attach` and `pdtui bench` over engines build their topologies from it."""
    model_name = model_name or check.served_name
    if model_name is None:
        raise ConfigError("the engines report no model name in common (/v1/models); give --model-name")
    first = check.facts[0]
    block_size = block_size or next((f.block_size for f in check.facts if f.block_size), None)
    if block_size is None:
        raise ConfigError("no engine reports its block size (vllm:cache_config_info on /metrics); give --block-size")
    return {"model_name": model_name, "model": first.model, "block_size": block_size,
            "max_model_len": first.max_model_len, "kv_cache_dtype": first.cache.get("cache_dtype") or "auto",
            "dtype": first.dtype or "auto",
            "vllm_version": f"vLLM {first.version} (the engines')" if first.version else None}


def ctl_socket_path(args: argparse.Namespace) -> Path:
    """The socket of the pdtui meant: --socket, else the proxy port's (--proxy-port, PDTUI_PROXY_PORT or
    the profile's, plus --port-offset) under the state dir."""
    from pdtui.core import ctl_client as control

    if args.socket is not None:
        return args.socket
    port = args.proxy_port
    if port is None:
        env = config_mod.env_overrides()
        if "proxy_port" in env:
            port = int(env["proxy_port"])
        else:
            port = config_mod.load_profile(args.profile or config_mod.default_profile_name()).proxy_port
    return control.default_socket_path(port + args.port_offset)


def run_ctl(args: argparse.Namespace) -> int:
    from pdtui.core import ctl_client as control  # light: no server, no httpx

    if args.verb in ("kill", "restart") and not args.instance:
        print(f"pdtui ctl {args.verb}: name the instance, e.g. `pdtui ctl {args.verb} D`", file=sys.stderr)
        return 2
    if args.verb in ("status", "down") and args.instance:
        print(f"pdtui ctl {args.verb}: takes no instance (got {args.instance!r})", file=sys.stderr)
        return 2
    try:
        path, token = ctl_address(args)
    except (OSError, ValueError) as e:
        print(f"pdtui ctl: {e}", file=sys.stderr)
        return 2
    req: dict[str, Any] = {"verb": args.verb}
    if args.instance:
        req["instance"] = args.instance
    if args.timeout is not None:
        req["timeout_s"] = args.timeout
    timeout = {"status": 15.0, "kill": 60.0, "down": 180.0}.get(args.verb)  # restart: bounded by the server

    def progress(p: dict[str, Any]) -> None:
        print(f"pdtui ctl: {p.get('progress')} ({p.get('elapsed_s', 0):.1f} s)", file=sys.stderr, flush=True)

    try:
        answer = control.request(path, req, timeout_s=timeout, on_progress=progress, token=token)
    except control.NotListening as e:
        msg = (f"{e}. Start one with `pdtui up`, or name the one you mean with --port-offset N,"
               f" --proxy-port N or --socket PATH{_other_sockets(path)}")
        if args.json:
            print(json.dumps({"ok": False, "code": "not_listening", "error": msg, "socket": control.describe(path)}))
        print(f"pdtui ctl: {msg}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        if args.json:
            print(json.dumps({"ok": False, "code": "failed", "error": str(e), "socket": control.describe(path)}))
        print(f"pdtui ctl: {control.describe(path)}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer))
    elif answer.get("ok"):
        print(_ctl_text(answer))
    if not answer.get("ok"):
        if not args.json:
            print(f"pdtui ctl {args.verb}: {answer.get('error')}", file=sys.stderr)
        return 2 if answer.get("code") in ("unknown_instance", "unknown_verb", "bad_request") else 1
    return 0


def _ctl_text(a: dict[str, Any]) -> str:
    verb = a.get("verb")
    if verb == "kill":
        code = a.get("exit_code")
        how = f"signal {_signame(-code)}" if isinstance(code, int) and code < 0 else f"code {code}"
        if a.get("was") not in ("starting", "ready", "stopping", "failed"):
            return f"{a['instance']} ({a.get('role')}) was not running ({a.get('was')})"
        if code is None:  # attached: the user's command killed it, /health says the rest
            return f"killed {a['instance']} ({a.get('role')}) with its --kill command: now {a.get('state')}"
        return f"killed {a['instance']} ({a.get('role')}): it exited with {how}"
    if verb == "restart":
        pid = f"pid {a.get('pid')}" if a.get("pid") is not None else "attached"
        return f"{a['instance']} ({a.get('role')}) ready in {a['ready_s']:.1f} s ({pid})"
    if verb == "down":
        return f"pdtui (pid {a.get('pid')}) stopped {', '.join(a.get('stopped', []))} and the proxy in {a['elapsed_s']:.1f} s"
    up = a.get("uptime_s")
    uptime = f"{up:.0f} s" if up is not None else "not started"
    lines = [f"pdtui pid {a.get('pid')}, profile {a.get('profile')}, proxy {a.get('proxy_url')}, up {uptime}"
             + (f", pair up but BROKEN: {a['pair_broken']}" if a.get("pair_broken")
                else f", pair ready in {a['pair_ready_s']:.1f} s" if a.get("pair_ready_s") is not None else "")
             + (" (shutting down)" if a.get("closing") else ""),
             f"run folder {a.get('run_dir')}"
             + (f"; viewers {a['viewers']}" if a.get("viewers") else "")
             + (f"; TCP {a['tcp']}" if a.get("tcp") else "")]
    out = a.get("stdout")
    if isinstance(out, dict) and (out.get("dropped_full") or out.get("dropped_gone") or out.get("gone")):
        gone = f", {out['gone']}" if out.get("gone") else ""
        lines.append(f"events on stdout ({out.get('output')}{gone}): {out.get('written', 0):,} written,"
                     f" {out.get('dropped_full', 0):,} dropped while it was not read,"
                     f" {out.get('dropped_gone', 0):,} dropped once it was closed or gone")
    for i in a.get("instances", []):
        line = f"  {i['name']:<4} {i['role']:<8} {i['state']:<9} pid {i.get('pid') or '-':<8} {i.get('url')}"
        if i.get("restarts"):
            line += f"  restarts {i['restarts']}"
        d = i.get("last_death")
        if d:
            code = f" (code {d['exit_code']})" if d.get("exit_code") is not None and "signal" not in d["detail"] else ""
            line += f"\n       last exit {d['at']}: {d['detail']}{code}"
        lines.append(line)
    return "\n".join(lines)


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def run_link(args: argparse.Namespace) -> int:
    """`pdtui link clean`: remove the links of runs that are gone; `pdtui link check LINK`: what stops one here."""
    from pdtui.core import link as link_mod

    if args.link_command == "check":
        try:
            spec = link_mod.LinkSpec.parse(args.spec)
        except link_mod.LinkSpecError as e:
            raise ConfigError(str(e)) from None
        problems = link_mod.check(spec)
        for text in problems:
            print(f"pdtui link: {text}", file=sys.stderr)
        if not problems:
            print(f"ok: a {spec.describe()} link can be made here")
        return 2 if problems else 0
    if args.link_command != "clean":
        build_parser().parse_args(["link", "--help"])
    try:
        removed = link_mod.clean_stale()
    except link_mod.LinkError as e:
        print(f"pdtui link clean: {e}", file=sys.stderr)
        return 1
    for text in removed:
        print(f"removed {text}")
    if not removed:
        print("nothing to remove: no link of a run that is gone")
    for name in link_mod.orphans():
        print(f"note: namespace {name} is named by no state file in {link_mod.links_dir()} (another PDTUI_HOME's,"
              f" or a run still starting?); `ip netns del {name}` removes it", file=sys.stderr)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": run_up, "config": run_config, "preflight": run_preflight, "replay": run_replay, "drill": run_drill,
    "soak": run_soak,
    "ctl": run_ctl, "bench": run_bench, "proxy": run_proxy, "model": run_model, "attach": run_attach,
    "link": run_link,
}
"""Each subcommand (build_parser) and the function that runs it: a new command is a parser and a line here."""


if __name__ == "__main__":
    sys.exit(main())
