"""How much inter-chunk-gap tail a proxy adds to SSE streams: a benchmark with no engines.

    python -m pdtui.bench.transparency                      # the default run, about 2-3 minutes
    python -m pdtui.bench.transparency --quick              # a few seconds (CI)
    python -m pdtui.bench.transparency --rates 6400 --arms direct,pdtui-legacy --pin --out /tmp/tr

What runs, each in its own process, all on 127.0.0.1 and free ports:

  fake    pdtui.bench.fake_sse: a fake vLLM (raw asyncio on uvloop) that streams vLLM-shaped SSE
          chunks (224 bytes of `data: {...}\\n\\n`), one every `interval` per stream on an
          absolute grid, so its own lateness never accumulates
  proxy   the arm under test, started from its command line (none for `direct`)
  client  pdtui.bench.transparency_client: --streams keep-alive streaming requests, each restarted as soon
          as it ends (steady load); every SSE event carrying `data: {` is stamped with
          time.perf_counter() in data_received (several events in one read are gaps of 0, as a
          real client sees them)

Arms (--arms; an arm that cannot run here is reported as skipped, with the reason):

  direct        client -> fake: the floor, and the proof that fake and client do not bunch by
                themselves
  pdtui-legacy  client -> the embedded proxy as it was before the rewrite (uvicorn + httpx; the
                frozen copy pdtui/bench/legacy_proxy.py, read from git at LEGACY_PROXY_REF into a
                temporary folder with the pdtui package of that commit) in a subprocess on plain
                asyncio (asyncio.run, as the Runtime ran it under Textual): the baseline. Skipped,
                saying why, where git or that commit is not at hand (an installed wheel, a shallow
                clone)
  pdtui         client -> `python -m pdtui proxy --decode URL --port N` (its stdout, the events,
                is a pipe this process drains, as the Runtime's): included when
                `python -m pdtui proxy --help` works
  pdtui-asyncio (not by default) client -> pdtui.core.proxy's Proxy + ProxyServer in a subprocess
                on plain asyncio instead of uvloop: the data path without the faster loop
  vllm-router   client -> `vllm-router --worker-urls URL --policy round_robin` (the Rust router;
                `pip install 'pdtui[router]'` or `pip install vllm-router==0.1.17`)
  --arm 'NAME=CMD'  any other proxy; CMD is split like a shell line, with {decode}, {prefill},
                {port}, {python} replaced (e.g. --arm 'mine=mybin --to {decode} --port {port}')

Rates (--rates) are TOTAL chunks/s: each stream gets one chunk every streams/rate seconds (the
default 3200,6400,12800 with 32 streams = 100, 200, 400 chunks/s per stream = 10, 5, 2.5 ms).
Per (rate, arm): a fresh proxy, a warm-up (--warmup), then a window of --duration seconds in
which the gaps between consecutive events of one answer count.

The report, per (rate, arm): chunks measured in the window, their rate, gap p50/p90/p99/max in ms,
gaps over 20 ms, p99 / direct's p99, and CPU per relayed chunk in microseconds: utime + stime from
/proc/<pid>/stat of the proxy process (all its threads), plus its live descendants and its reaped
children (cutime + cstime), read at the window's start and end, divided by the chunks the clients
received in the window; the same for the fake and the client (their own cost, for scale).
--pin puts the proxy on one core and fake + client + this process on another
(os.sched_setaffinity); without it the OS schedules everything on every core.

On a 2-core machine the fake, the client and the proxy share the cores: a proxy's CPU per chunk
times the chunk rate says how much of a core it needs, and past one core its gaps must grow.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gzip
import hashlib
import http.client
import json
import math
import os
import platform
import resource
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdtui.core.stats import percentile

DEFAULT_RATES = (3200, 6400, 12800)
DEFAULT_STREAMS = 32
DEFAULT_DURATION_S = 10.0
DEFAULT_WARMUP_S = 1.5
DEFAULT_MAX_TOKENS = 256
DEFAULT_ARMS = ("direct", "pdtui-legacy", "pdtui", "vllm-router")
KNOWN_ARMS = (*DEFAULT_ARMS, "pdtui-asyncio")
DEFAULT_PIN = "proxy=1,fake=0,client=0"
ROUTER_VERSION = "0.1.17"
ROUTER_INSTALL = (f"pip install 'pdtui[router]' (or: pip install vllm-router=={ROUTER_VERSION}) into the"
                  " environment that runs the bench")
SLOW_GAP_MS = 20.0
CPU_NOTE = ("CPU/chunk = utime+stime (/proc/<pid>/stat: the process, all its threads, its live descendants"
            " and its reaped children) over the window / chunks the clients received in the window")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----- processes --------------------------------------------------------------------------------
_libc: ctypes.CDLL | None = None


def _child_setup(cpus: set[int] | None) -> Callable[[], None]:
    """preexec_fn: die with this process (PR_SET_PDEATHSIG), and pin to ``cpus``."""
    def setup() -> None:
        global _libc
        with contextlib.suppress(Exception):
            if _libc is None:
                _libc = ctypes.CDLL(None, use_errno=True)
            _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


@dataclass
class Child:
    role: str
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""


class Processes:
    """Every process this bench starts, each in its own process group; ``stop_all`` ends them all
    (SIGTERM to the group, SIGKILL after a grace period), and is called whatever happens."""

    def __init__(self, log_dir: Path, pin: dict[str, set[int]] | None, scratch: Path | None = None) -> None:
        self.log_dir = log_dir
        self.pin = pin or {}
        self.scratch = scratch
        """A folder for files the arms need (removed by whoever made it)."""
        self.children: list[Child] = []
        self.all_pids: list[int] = []
        self.selector = selectors.DefaultSelector()
        self.count = 0

    def spawn(self, role: str, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        """stderr goes to the log file; stdout is a pipe that ``pump`` drains into it (a proxy may
        print an event per request, and some loops refuse a regular file as stdout)."""
        self.count += 1
        log_path = self.log_dir / f"{self.count:02d}-{name}.log"
        with open(log_path, "wb") as logf:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf, start_new_session=True,
                preexec_fn=_child_setup(self.pin.get(role)), env=env,  # noqa: PLW1509 - no threads here
            )
        assert popen.stdout is not None
        os.set_blocking(popen.stdout.fileno(), False)
        self.selector.register(popen.stdout, selectors.EVENT_READ, log_path)
        child = Child(role, name, argv, popen, log_path)
        self.children.append(child)
        self.all_pids.append(popen.pid)
        return child

    def pump(self, timeout_s: float) -> None:
        """Drain the children's stdout pipes into their logs for up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if not self.selector.get_map():
                time.sleep(max(0.0, left))
                return
            for key, _ in self.selector.select(max(0.0, left)):
                try:
                    data = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    with open(key.data, "ab") as f:
                        f.write(data)
                else:
                    self._unregister(key.fileobj)
            if time.monotonic() >= deadline:
                return

    def _unregister(self, fileobj: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fileobj)
        with contextlib.suppress(OSError):
            fileobj.close()

    def wait(self, child: Child, timeout_s: float) -> bool:
        """Wait for ``child`` to exit while pumping; True if it did."""
        deadline = time.monotonic() + timeout_s
        while child.popen.poll() is None:
            if time.monotonic() >= deadline:
                return False
            self.pump(0.05)
        return True

    def note_tree(self, pid: int) -> None:
        """Remember a process's descendants too, so the end check can see they are gone."""
        for p in descendants(pid):
            if p not in self.all_pids:
                self.all_pids.append(p)

    def stop(self, child: Child, grace_s: float = 5.0) -> None:
        if child.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGTERM)
            self.wait(child, grace_s)
        # The group may hold more than the leader (a proxy's workers): kill what is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(2)
        self.pump(0)
        if child.popen.stdout is not None:
            self._unregister(child.popen.stdout)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"content-type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_ready(procs: Processes, child: Child | None, port: int, timeout_s: float,
               path: str = "/v1/completions") -> float:
    """Until a short streamed request through ``port`` ends with [DONE]; returns the seconds it
    took. Raises with the process's log tail when it exits or the time runs out."""
    t0 = time.monotonic()
    req: dict[str, Any] = {"model": "tiny", "max_tokens": 2, "stream": True}
    if path.endswith("/chat/completions"):
        req["messages"] = [{"role": "user", "content": "ready?"}]
    else:
        req["prompt"] = "ready?"
    body = json.dumps(req).encode()
    last = ""
    while time.monotonic() - t0 < timeout_s:
        if child is not None and child.popen.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.popen.returncode} while starting:\n{child.tail()}")
        try:
            status, data = _http(port, "POST", path, body)
            if status == 200 and b"data: [DONE]" in data:
                return time.monotonic() - t0
            last = f"status {status}: {data[:200]!r}"
            if 400 <= status < 500 and status not in (404, 408, 429):
                break  # the request itself is refused: waiting will not help
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        procs.pump(0.1)
    tail = f"\n{child.tail()}" if child is not None else ""
    raise RuntimeError(f"not ready on port {port} after {time.monotonic() - t0:.0f} s (last: {last}){tail}")


# ----- /proc ------------------------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """utime + stime + cutime + cstime of ``pid``, plus utime + stime of its live descendants."""
    fields = _stat_fields(pid)
    if fields is None:
        return math.nan
    ticks = sum(int(x) for x in fields[11:15])
    if tree:
        for d in descendants(pid):
            f = _stat_fields(d)
            if f is not None:
                ticks += int(f[11]) + int(f[12])
    return ticks / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, all cores (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK, steal / CLK_TCK


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pid_alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


# ----- arms -------------------------------------------------------------------------------------
@dataclass
class ArmContext:
    decode_url: str
    prefill_url: str | None
    port: int
    python: str = sys.executable
    scratch: Path | None = None
    """A folder of this run's, removed at its end (the legacy arm's source goes there)."""


@dataclass
class Arm:
    name: str
    what: str
    argv: Callable[[ArmContext], list[str]] | None
    """None: no proxy (the client talks to the fake)."""
    check: Callable[[bool], str | None] = lambda pd: None
    """Returns why the arm cannot run here (None: it can)."""


LEGACY_PROXY_REF = "d55dfe20379e985880835decea348232d54ca63a"
"""The commit the pdtui-legacy arm takes the old proxy from: main's last commit with
pdtui/bench/legacy_proxy.py, a frozen copy of pdtui/core/proxy.py as it was at d2a8a0d (uvicorn +
httpx, before the data path moved to asyncio protocols + httptools in e199ea2). The file left the
tree (issue 21: the lab out of the product); the arm reads the whole pdtui package of this commit,
so the old proxy runs with the events, kvmath and connectors it was written against, not today's."""
LEGACY_PROXY_PATH = "pdtui/bench/legacy_proxy.py"
LEGACY_PROXY_TREE = ("pdtui/__init__.py", "pdtui/core", "pdtui/bench")
"""What of LEGACY_PROXY_REF's tree the arm extracts (enough for transparency.serve_inproc_proxy)."""
LEGACY_MAIN = (
    "import sys\n"
    "tree, decode, port, prefill = sys.argv[1:5]\n"
    "sys.path.insert(0, tree)\n"
    "import pdtui\n"
    "assert pdtui.__file__.startswith(tree), f'pdtui from {pdtui.__file__}, not from {tree}'\n"
    "from pdtui.bench.transparency import serve_inproc_proxy\n"
    "print(f'pdtui-legacy: the old proxy from {tree}', file=sys.stderr, flush=True)\n"
    "sys.exit(serve_inproc_proxy(decode, prefill or None, int(port), legacy=True))\n"
)
"""The legacy arm's process: LEGACY_PROXY_REF's pdtui first on sys.path, then that commit's own
serve_inproc_proxy(legacy=True), which serves its pdtui.bench.legacy_proxy."""


class LegacyUnavailable(RuntimeError):
    """The old proxy cannot be read from git here; the message says why and what would do."""


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=60, check=False,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise LegacyUnavailable(
            "git is not installed: the pdtui-legacy arm reads the old proxy from the repository's history") from None
    except subprocess.TimeoutExpired:
        raise LegacyUnavailable(f"git -C {repo} {' '.join(args)} took over 60 s") from None


def legacy_unavailable(ref: str = LEGACY_PROXY_REF, repo: Path | None = None) -> str | None:
    """Why the pdtui-legacy arm cannot run here (None: it can): no git, not a git checkout (an
    installed wheel), ``ref`` not in the history (a shallow clone: ``git fetch --unshallow``), or
    httpx/uvicorn missing."""
    repo = _repo_root() if repo is None else repo
    try:
        top = _git(repo, "rev-parse", "--show-toplevel")
        if top.returncode != 0:
            return (f"{repo} is not a git checkout (an installed wheel?): the pdtui-legacy arm reads the old proxy"
                    f" from the repository's history, {LEGACY_PROXY_PATH} at {ref[:12]}; run the bench from a clone")
        have = _git(repo, "cat-file", "-e", f"{ref}:{LEGACY_PROXY_PATH}")
        if have.returncode != 0:
            return (f"commit {ref[:12]} (with {LEGACY_PROXY_PATH}) is not in the repository at {repo}"
                    " (a shallow clone? `git fetch --unshallow`)")
    except LegacyUnavailable as e:
        return str(e)
    try:
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        return f"the old proxy needs httpx and uvicorn ({e})"
    return None


def legacy_tree(dest: Path, ref: str = LEGACY_PROXY_REF, repo: Path | None = None) -> Path:
    """Write ``LEGACY_PROXY_TREE`` as it is at ``ref`` under ``dest`` (``git archive``); returns
    ``dest``, the folder to put first on sys.path. Raises LegacyUnavailable, saying why."""
    import io
    import tarfile

    repo = _repo_root() if repo is None else repo
    why = legacy_unavailable(ref, repo)
    if why:
        raise LegacyUnavailable(why)
    r = _git(repo, "archive", "--format=tar", ref, *LEGACY_PROXY_TREE)
    if r.returncode != 0:
        raise LegacyUnavailable(f"git archive {ref[:12]} failed: {r.stderr.decode(errors='replace').strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _legacy_argv(ctx: ArmContext) -> list[str]:
    if ctx.scratch is None:
        raise LegacyUnavailable("no scratch folder to put the old proxy's source in")
    tree = ctx.scratch / f"legacy-{LEGACY_PROXY_REF[:12]}"
    if not (tree / LEGACY_PROXY_PATH).exists():
        legacy_tree(tree)
    return [ctx.python, "-c", LEGACY_MAIN, str(tree), ctx.decode_url, str(ctx.port), ctx.prefill_url or ""]


def _legacy_check(pd: bool) -> str | None:
    return legacy_unavailable()


def _asyncio_argv(ctx: ArmContext) -> list[str]:
    argv = [ctx.python, "-m", "pdtui.bench.transparency", "--serve-inproc-proxy", "--decode", ctx.decode_url,
            "--port", str(ctx.port)]
    return argv + (["--prefill", ctx.prefill_url] if ctx.prefill_url else [])


def _asyncio_check(pd: bool) -> str | None:
    try:
        from pdtui.core.proxy import Proxy, ProxyServer, ProxySettings, Upstream  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the arm cannot run
        return f"pdtui.core.proxy has no Proxy/ProxyServer/ProxySettings/Upstream ({type(e).__name__}: {e})"
    return None


def _pdtui_argv(ctx: ArmContext) -> list[str]:
    argv = [ctx.python, "-m", "pdtui", "proxy", "--decode", ctx.decode_url, "--port", str(ctx.port)]
    return argv + (["--prefill", ctx.prefill_url] if ctx.prefill_url else [])


def _pdtui_check(pd: bool) -> str | None:
    try:
        r = subprocess.run([sys.executable, "-m", "pdtui", "proxy", "--help"], capture_output=True, timeout=60,
                           stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`python -m pdtui proxy --help` failed: {e}"
    if r.returncode != 0:
        err = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()
        return f"`python -m pdtui proxy --help` exited {r.returncode}: {err[-1] if err else ''} (not built yet?)"
    return None


def router_binary() -> str | None:
    beside = Path(sys.executable).parent / "vllm-router"
    if beside.exists():
        return str(beside)
    return shutil.which("vllm-router")


def _router_argv(ctx: ArmContext) -> list[str]:
    binary = router_binary() or "vllm-router"
    common = ["--host", "127.0.0.1", "--port", str(ctx.port), "--prometheus-port", str(free_port()),
              "--log-level", "warning", "--worker-startup-check-interval", "1", "--policy", "round_robin"]
    if ctx.prefill_url:
        return [binary, "--vllm-pd-disaggregation", "--prefill", ctx.prefill_url, "--decode", ctx.decode_url, *common]
    return [binary, "--worker-urls", ctx.decode_url, *common]


def _router_check(pd: bool) -> str | None:
    if router_binary() is None:
        return f"vllm-router is not installed: {ROUTER_INSTALL}"
    return None


def builtin_arms() -> dict[str, Arm]:
    return {
        "direct": Arm("direct", "client -> fake", None),
        "pdtui-legacy": Arm("pdtui-legacy", f"{LEGACY_PROXY_PATH} at {LEGACY_PROXY_REF[:12]} (uvicorn + httpx)"
                            " on plain asyncio", _legacy_argv, _legacy_check),
        "pdtui": Arm("pdtui", "python -m pdtui proxy", _pdtui_argv, _pdtui_check),
        "pdtui-asyncio": Arm("pdtui-asyncio", "pdtui.core.proxy Proxy + ProxyServer on plain asyncio",
                             _asyncio_argv, _asyncio_check),
        "vllm-router": Arm("vllm-router", "vllm-router (Rust), round_robin over one worker", _router_argv,
                           _router_check),
    }


def custom_arm(spec: str) -> Arm:
    name, sep, cmd = spec.partition("=")
    if not sep or not name or not cmd:
        raise ValueError(f"--arm {spec!r}: NAME=COMMAND")

    def argv(ctx: ArmContext) -> list[str]:
        subst = {"decode": ctx.decode_url, "prefill": ctx.prefill_url or "", "port": str(ctx.port),
                 "python": ctx.python}
        return [part.format(**subst) for part in shlex.split(cmd)]

    return Arm(name, cmd, argv)


# ----- stats ------------------------------------------------------------------------------------
def quantile(sorted_xs: list[float], q: float) -> float:
    """q in 0..1, by pdtui.core.stats.percentile (the one definition); nan for no values."""
    v = percentile(sorted_xs, q * 100)
    return math.nan if v is None else v


def stalls(slow_gaps: list[list[float]], within_s: float = 0.005) -> list[dict[str, float]]:
    """Gaps over 20 ms that END within ``within_s`` of each other (across streams) are one stall:
    [{"t_s": end of the first, relative to the window's start, "streams": gaps in it, "max_ms": ...}]."""
    out: list[dict[str, float]] = []
    for t, g in sorted(slow_gaps):
        if out and t - out[-1]["t_last"] <= within_s:
            out[-1]["streams"] += 1
            out[-1]["max_ms"] = max(out[-1]["max_ms"], g)
            out[-1]["t_last"] = t
        else:
            out.append({"t_s": t, "t_last": t, "streams": 1, "max_ms": g})
    return [{"t_s": round(x["t_s"], 3), "streams": x["streams"], "max_ms": x["max_ms"]} for x in out]


def gap_stats(gaps_ms: list[float]) -> dict[str, Any]:
    xs = sorted(gaps_ms)
    return {
        "gaps": len(xs), "p50_ms": quantile(xs, 0.5), "p90_ms": quantile(xs, 0.9), "p99_ms": quantile(xs, 0.99),
        "max_ms": xs[-1] if xs else math.nan, "over_20ms": sum(1 for g in xs if g > SLOW_GAP_MS),
        "mean_ms": sum(xs) / len(xs) if xs else math.nan,
    }


# ----- one point --------------------------------------------------------------------------------
@dataclass
class Options:
    streams: int = DEFAULT_STREAMS
    rates: tuple[float, ...] = DEFAULT_RATES
    duration_s: float = DEFAULT_DURATION_S
    warmup_s: float = DEFAULT_WARMUP_S
    max_tokens: int = DEFAULT_MAX_TOKENS
    length_spread: float = 0.5
    arms: tuple[str, ...] = DEFAULT_ARMS
    custom_arms: tuple[str, ...] = ()
    client_procs: int = 1
    pin: str | None = None
    pd: bool = False
    lockstep: bool = False
    chat: bool = False
    out: str | None = None
    ready_timeout_s: float = 60.0
    py_spy: bool = False


@dataclass
class Point:
    rate: float
    arm: str
    status: str = "ok"
    """ok, skipped or failed."""
    reason: str | None = None
    streams: int = 0
    interval_ms: float = 0.0
    chunks: int = 0
    chunks_per_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    p99_ratio: float | None = None
    proxy_cpu_us_per_chunk: float | None = None
    proxy_cpu_pct: float | None = None
    fake_cpu_us_per_chunk: float | None = None
    client_cpu_us_per_chunk: float | None = None
    other_cpu_pct: float | None = None
    """Busy CPU on the machine in the window (/proc/stat, in % of one core) that neither the fake,
    the client, the proxy nor this process spent: someone else's load. High = a noisy point."""
    steal_pct: float | None = None
    stalls: list[dict[str, float]] = field(default_factory=list)
    """Gaps over 20 ms grouped by when they ended (within 5 ms): one entry per stall."""
    responses: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    ready_s: float | None = None
    argv: list[str] | None = None
    profile: str | None = None
    """With --py-spy: the summary file of the proxy's profile over the window."""
    gaps_ms: list[float] = field(default_factory=list)


def _cpu_delta(a: float, b: float, chunks: int) -> float | None:
    if chunks <= 0 or math.isnan(a) or math.isnan(b):
        return None
    return (b - a) / chunks * 1e6


def run_point(procs: Processes, opts: Options, arm: Arm, rate: float, fake_ports: dict[str, int],
              fake_pids: list[int]) -> Point:
    interval_s = opts.streams / rate
    point = Point(rate=rate, arm=arm.name, streams=opts.streams, interval_ms=interval_s * 1000)
    decode_url = f"http://127.0.0.1:{fake_ports['decode']}"
    prefill_url = f"http://127.0.0.1:{fake_ports['prefill']}" if "prefill" in fake_ports else None
    proxy: Child | None = None
    try:
        if arm.argv is None:
            port = fake_ports["decode"]
        else:
            port = free_port()
            argv = arm.argv(ArmContext(decode_url, prefill_url, port, scratch=procs.scratch))
            point.argv = argv
            proxy = procs.spawn("proxy", arm.name, argv)
        point.ready_s = wait_ready(procs, proxy, port, opts.ready_timeout_s, _path(opts))
        if proxy is not None:
            procs.note_tree(proxy.pid)
        # The window, on CLOCK_MONOTONIC (time.perf_counter in every process on Linux).
        w0 = time.perf_counter() + 1.0 + opts.warmup_s  # ~1 s for the clients to start
        w1 = w0 + opts.duration_s
        outs: list[Path] = []
        clients: list[Child] = []
        per = [opts.streams // opts.client_procs + (1 if i < opts.streams % opts.client_procs else 0)
               for i in range(opts.client_procs)]
        for i, n in enumerate(x for x in per if x > 0):
            out = procs.log_dir / f"client-{arm.name}-{int(rate)}-{i}.json"
            out.unlink(missing_ok=True)
            outs.append(out)
            clients.append(procs.spawn("client", f"client{i}", [
                sys.executable, "-m", "pdtui.bench.transparency_client", "--port", str(port), "--path", _path(opts),
                "--streams", str(n), "--max-tokens", str(opts.max_tokens), "--length-spread", repr(opts.length_spread),
                "--ramp", repr(min(1.0, opts.warmup_s)), "--seed", str(i), "--window-start", repr(w0),
                "--window-end", repr(w1), "--out", str(out)]))
        _sleep_until(procs, w0)
        spy = _start_py_spy(procs, opts, proxy, arm, rate)
        cpu0 = cpu_seconds(proxy.pid) if proxy else math.nan
        fake0 = sum(cpu_seconds(p, tree=False) for p in fake_pids)
        (busy0, steal0), me0 = machine_cpu(), self_cpu()
        _sleep_until(procs, w1)
        cpu1 = cpu_seconds(proxy.pid) if proxy else math.nan
        fake1 = sum(cpu_seconds(p, tree=False) for p in fake_pids)
        (busy1, steal1), me1 = machine_cpu(), self_cpu()
        if proxy is not None:
            procs.note_tree(proxy.pid)
        if spy is not None:
            procs.wait(spy[0], 30)
        results = []
        for c, out in zip(clients, outs, strict=True):
            if not procs.wait(c, 30):
                raise RuntimeError(f"{c.name} did not finish:\n{c.tail()}")
            if c.popen.returncode != 0 or not out.exists():
                raise RuntimeError(f"{c.name} exited with {c.popen.returncode}:\n{c.tail()}")
            results.append(json.loads(out.read_text()))
            procs.stop(c)
        gaps: list[float] = []
        slow: list[list[float]] = []
        client_cpu = 0.0
        for r in results:
            gaps.extend(r["gaps_ms"])
            slow.extend(r["slow_gaps"])
            point.chunks += r["events_in_window"]
            point.responses += r["responses"]
            point.errors += r["errors"]
            point.error_samples.extend(r["error_samples"][: 5 - len(point.error_samples)])
            client_cpu += r["cpu_s_in_window"]
        point.gaps_ms = gaps
        point.stats = gap_stats(gaps)
        point.stalls = stalls(slow)
        point.chunks_per_s = point.chunks / opts.duration_s
        point.proxy_cpu_us_per_chunk = _cpu_delta(cpu0, cpu1, point.chunks)
        if proxy is not None and not math.isnan(cpu0) and not math.isnan(cpu1):
            point.proxy_cpu_pct = (cpu1 - cpu0) / opts.duration_s * 100
        point.fake_cpu_us_per_chunk = _cpu_delta(fake0, fake1, point.chunks)
        point.client_cpu_us_per_chunk = client_cpu / point.chunks * 1e6 if point.chunks else None
        ours = (fake1 - fake0) + client_cpu + (me1 - me0) + ((cpu1 - cpu0) if proxy is not None else 0.0)
        point.other_cpu_pct = max(0.0, (busy1 - busy0) - ours) / opts.duration_s * 100
        point.steal_pct = (steal1 - steal0) / opts.duration_s * 100
        if point.chunks == 0:
            point.status, point.reason = "failed", "no chunk arrived in the window: " + "; ".join(point.error_samples)
        if spy is not None:
            point.profile = _summarize_py_spy(spy[1], point)
    except Exception as e:  # noqa: BLE001 - one arm failing must not lose the others
        point.status, point.reason = "failed", f"{type(e).__name__}: {e}"
    finally:
        if proxy is not None:
            procs.stop(proxy)
    return point


def py_spy_binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _start_py_spy(procs: Processes, opts: Options, proxy: Child | None, arm: Arm,
                  rate: float) -> tuple[Child, Path] | None:
    """With --py-spy, for a proxy that is a Python process: ``py-spy record --format raw`` on it
    for the window (pinned with the client)."""
    if not opts.py_spy or proxy is None or "python" not in Path(proxy.argv[0]).name:
        return None
    binary = py_spy_binary()
    if binary is None:
        return None
    raw = procs.log_dir.parent / f"pyspy-{arm.name}-{rate:g}.raw"
    argv = [binary, "record", "--pid", str(proxy.pid), "--duration", str(max(1, int(opts.duration_s))),
            "--rate", "250", "--format", "raw", "--subprocesses", "-o", str(raw)]
    return procs.spawn("client", f"py-spy-{arm.name}", argv), raw


def _summarize_py_spy(raw: Path, point: Point) -> str | None:
    from pdtui.bench.pyspy_summary import summarize

    if not raw.exists():
        return None
    title = f"{point.arm} at {point.rate:g} chunks/s ({point.streams} streams): "
    text = summarize(raw.read_text(), point.proxy_cpu_us_per_chunk, title=title)
    summary = raw.with_suffix(".txt")
    summary.write_text(text)
    return str(summary)


def _path(opts: Options) -> str:
    return "/v1/chat/completions" if opts.chat else "/v1/completions"


def _sleep_until(procs: Processes, t: float) -> None:
    while (d := t - time.perf_counter()) > 0:
        procs.pump(min(d, 0.5))


# ----- the run ----------------------------------------------------------------------------------
def parse_pin(spec: str | None) -> dict[str, set[int]] | None:
    if not spec:
        return None
    out: dict[str, set[int]] = {}
    allowed = os.sched_getaffinity(0)
    for part in spec.split(","):
        role, sep, cpus = part.partition("=")
        role = role.strip()
        if not sep or role not in ("proxy", "fake", "client"):
            raise ValueError(f"--pin {spec!r}: ROLE=CPU[+CPU...] for proxy, fake, client (e.g. {DEFAULT_PIN})")
        out[role] = {int(c) for c in cpus.split("+")}
        if not out[role] <= allowed:
            raise ValueError(f"--pin {spec!r}: CPUs {sorted(out[role] - allowed)} are not available"
                             f" (this process may use {sorted(allowed)})")
    return out


def resolve_arms(opts: Options) -> list[tuple[Arm, str | None]]:
    """The arms to run, each with the reason it cannot run here (None: it can)."""
    known = builtin_arms()
    custom = {a.name: a for a in (custom_arm(s) for s in opts.custom_arms)}
    names = list(opts.arms) + [n for n in custom if n not in opts.arms]
    out: list[tuple[Arm, str | None]] = []
    for name in names:
        if name in custom:
            out.append((custom[name], None))
        elif name in known:
            arm = known[name]
            out.append((arm, arm.check(opts.pd)))
        else:
            raise ValueError(f"unknown arm {name!r}: one of {', '.join(KNOWN_ARMS)}, or --arm NAME=CMD")
    if "direct" not in [a.name for a, _ in out]:
        out.insert(0, (known["direct"], None))  # the ratios need it
    return out


PROXY_PACKAGE = "pdtui/core/proxy"
"""The proxy's code, one package: its sha1 (every .py file's name and bytes, in name order) is in meta."""


def _package_sha(files: dict[str, bytes]) -> str | None:
    if not files:
        return None
    h = hashlib.sha1()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name])
    return h.hexdigest()[:12]


def _tree_sha(rel: str) -> str | None:
    root = Path(__file__).resolve().parents[2] / rel
    with contextlib.suppress(OSError):
        return _package_sha({p.name: p.read_bytes() for p in root.glob("*.py")})
    return None


def _git_head_sha(rel: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    with contextlib.suppress(Exception):
        names = subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", f"HEAD:{rel}"], capture_output=True,
                               text=True, timeout=10, check=True).stdout.split()
        files = {}
        for name in (n for n in names if n.endswith(".py")):
            files[name] = subprocess.run(["git", "-C", str(root), "show", f"HEAD:{rel}/{name}"], capture_output=True,
                                         timeout=10, check=True).stdout
        return _package_sha(files)
    return None


def meta(opts: Options, pin: dict[str, set[int]] | None) -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio (uvloop missing)"
    router_version = None
    with contextlib.suppress(Exception):
        from importlib.metadata import version
        router_version = version("vllm-router")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv, "python": sys.version.split()[0],
        "platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
        "fake_client_loop": loop, "options": asdict(opts),
        "pin": {k: sorted(v) for k, v in pin.items()} if pin else None,
        "proxy_py_sha1": _tree_sha(PROXY_PACKAGE), "proxy_py_head_sha1": _git_head_sha(PROXY_PACKAGE),
        "vllm_router_version": router_version, "cpu_note": CPU_NOTE,
    }


def run(opts: Options, progress: Callable[[str], None] = log) -> dict[str, Any]:
    """Runs every (rate, arm) point; returns the result (``points``, ``meta``, ``pids``)."""
    pin = parse_pin(opts.pin)
    arms = resolve_arms(opts)
    out_dir = Path(opts.out) if opts.out else None
    tmp = None
    if out_dir is not None:
        log_dir = out_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        for old in [*log_dir.glob("*.log"), *log_dir.glob("client-*.json")]:
            old.unlink()
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pdtui-transparency-")
        log_dir = Path(tmp.name)
    scratch = tempfile.TemporaryDirectory(prefix="pdtui-transparency-src-")
    procs = Processes(log_dir, pin, Path(scratch.name))
    old_affinity = os.sched_getaffinity(0)
    if pin and "client" in pin:
        os.sched_setaffinity(0, pin["client"])  # this process sleeps, but keep it off the proxy's core
    result: dict[str, Any] = {"meta": meta(opts, pin), "points": [], "pids": procs.all_pids}
    for arm, why in arms:
        if why:
            progress(f"transparency: arm {arm.name} skipped: {why}")
    try:
        for rate in opts.rates:
            interval_s = opts.streams / rate
            progress(f"transparency: rate {rate:g} chunks/s = {opts.streams} streams x {rate / opts.streams:g}/s"
                     f" (one chunk every {interval_s * 1000:g} ms per stream)")
            fake_ports: dict[str, int] = {}
            fakes: list[Child] = []
            for role in (("decode", "prefill") if opts.pd else ("decode",)):
                fake_ports[role] = free_port()
                argv = [sys.executable, "-m", "pdtui.bench.fake_sse", "--port", str(fake_ports[role]),
                        "--interval-ms", repr(interval_s * 1000), "--verbose"]
                fakes.append(procs.spawn("fake", f"fake-{role}", argv + (["--lockstep"] if opts.lockstep else [])))
            try:
                for role, child in zip(fake_ports, fakes, strict=True):
                    if role == "decode":
                        wait_ready(procs, child, fake_ports[role], 20, _path(opts))
                for arm, why in arms:
                    if why:
                        result["points"].append(Point(rate=rate, arm=arm.name, status="skipped", reason=why,
                                                      streams=opts.streams, interval_ms=interval_s * 1000))
                        continue
                    progress(f"transparency:   {arm.name}: warm-up {opts.warmup_s:g} s, window {opts.duration_s:g} s")
                    point = run_point(procs, opts, arm, rate, fake_ports, [f.pid for f in fakes])
                    result["points"].append(point)
                    progress("transparency:   " + _point_line(point))
            finally:
                for f in fakes:
                    procs.stop(f)
    finally:
        procs.stop_all()
        os.sched_setaffinity(0, old_affinity)
        _ratios(result["points"])
        if tmp is not None:
            tmp.cleanup()
        scratch.cleanup()
    return result


def _ratios(points: list[Point]) -> None:
    direct = {p.rate: p.stats.get("p99_ms") for p in points if p.arm == "direct" and p.status == "ok"}
    for p in points:
        d = direct.get(p.rate)
        if p.status == "ok" and d:
            p.p99_ratio = p.stats["p99_ms"] / d


def _point_line(p: Point) -> str:
    if p.status != "ok":
        return f"{p.arm}: {p.status}: {p.reason}"
    s = p.stats
    cpu = f", proxy {p.proxy_cpu_us_per_chunk:.0f} us/chunk" if p.proxy_cpu_us_per_chunk is not None else ""
    return (f"{p.arm}: {p.chunks} chunks ({p.chunks_per_s:.0f}/s), gap p50 {s['p50_ms']:.2f} p99 {s['p99_ms']:.2f}"
            f" max {s['max_ms']:.2f} ms, {s['over_20ms']} over 20 ms in {len(p.stalls)} stalls{cpu}, {p.errors} errors,"
            f" other load {_f(p.other_cpu_pct, '.0f')}% of a core")


# ----- report -----------------------------------------------------------------------------------
def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(result: dict[str, Any]) -> str:
    m = result["meta"]
    header = ("| chunks/s (streams x per-stream) | arm | chunks | got/s | p50 ms | p90 ms | p99 ms | max ms "
              "| >20 ms (stalls) "
              "| p99/direct | proxy us/chunk | proxy CPU % | fake us/chunk | client us/chunk | other CPU % | errors |")
    rows = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in result["points"]:
        rate = f"{p.rate:g} ({p.streams} x {p.rate / p.streams:g}, {p.interval_ms:g} ms)"
        if p.status != "ok":
            reason = (p.reason or "").replace("\n", " ").replace("|", "/")[:300]
            rows.append(f"| {rate} | {p.arm} | {p.status}: {reason} |" + " |" * 13)
            continue
        s = p.stats
        rows.append(
            f"| {rate} | {p.arm} | {p.chunks} | {p.chunks_per_s:.0f} | {_f(s['p50_ms'])} | {_f(s['p90_ms'])} "
            f"| {_f(s['p99_ms'])} | {_f(s['max_ms'])} | {s['over_20ms']} ({len(p.stalls)}) | {_f(p.p99_ratio)} "
            f"| {_f(p.proxy_cpu_us_per_chunk, '.0f')} | {_f(p.proxy_cpu_pct, '.0f')} "
            f"| {_f(p.fake_cpu_us_per_chunk, '.1f')} | {_f(p.client_cpu_us_per_chunk, '.1f')} "
            f"| {_f(p.other_cpu_pct, '.0f')} | {p.errors} |")
    o = m["options"]
    pin = ", ".join(f"{k} on CPU {'+'.join(map(str, v))}" for k, v in m["pin"].items()) if m["pin"] else (
        f"none (the OS schedules everything on {m['cpus']} CPUs)")
    load = ", ".join(f"{x:.2f}" for x in m["loadavg"])
    mode = ("; P/D mode (two fakes)" if o["pd"] else "") + ("; lockstep grid" if o["lockstep"] else "")
    notes = [
        "",
        (f"- {o['duration_s']:g} s window after {o['warmup_s']:g} s warm-up per point; streams started over"
         f" {min(1.0, o['warmup_s']):g} s; answers of {o['max_tokens']} x [{1 - o['length_spread']:g},"
         f" {1 + o['length_spread']:g}] tokens, each stream restarted at once; {o['client_procs']} client"
         f" process(es); fake and client on"
         f" {m['fake_client_loop']}{mode}."),
        ("- Gaps: between consecutive `data: {` events of one answer, stamped at the client's read; several"
         " events in one read are gaps of 0. Stalls: gaps over 20 ms that ended within 5 ms of each other, across"
         " streams, count as one (a whole-process pause shows as one stall of about `streams` gaps)."),
        f"- {m['cpu_note']}; proxy CPU % is of one core. fake/client us/chunk: the same for them, for scale.",
        ("- other CPU %: busy CPU on the whole machine in the window (/proc/stat, % of one core) not spent by"
         " the fake, the client, the proxy or the bench itself: someone else's load. A point with more than a few %"
         " was measured on a busy machine: run it again."),
        f"- Pinning: {pin}.",
        f"- Machine: {m['platform']}, {m['cpus']} CPUs, load average at start {load}; {m['date']}.",
        (f"- {PROXY_PACKAGE}/ sha1 {m['proxy_py_sha1']} (HEAD's: {m['proxy_py_head_sha1']});"
         f" vllm-router {m['vllm_router_version'] or 'not installed'}."),
    ]
    return "\n".join(rows + notes) + "\n"


def write_out(result: dict[str, Any], out_dir: Path, text: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    points = [asdict(p) for p in result["points"]]
    full = {"meta": result["meta"], "points": points, "pids": result["pids"]}
    with gzip.open(out_dir / "transparency.json.gz", "wt") as f:
        json.dump(full, f)
    summary = {"meta": result["meta"], "points": [{k: v for k, v in p.items() if k != "gaps_ms"} for p in points]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "transparency.md").write_text(text)


# ----- today's proxy in one process on plain asyncio (pdtui-asyncio) -----------------------------
def serve_inproc_proxy(decode: str, prefill: str | None, port: int) -> int:
    """``Proxy`` + ``ProxyServer`` of pdtui.core.proxy on plain asyncio (``asyncio.run``, the default
    loop, as the Runtime ran the proxy under Textual), until SIGTERM or SIGINT. (The pdtui-legacy arm
    runs LEGACY_PROXY_REF's own copy of this function, which also served the legacy proxy.)"""
    import asyncio

    from pdtui.core.proxy import Proxy, ProxyServer, ProxySettings, Upstream
    what = "pdtui-asyncio"

    async def main() -> None:
        prefills = [Upstream("P", "prefill", prefill)] if prefill else []
        proxy = Proxy(prefills, [Upstream("D", "decode", decode)], ProxySettings())
        server = ProxyServer(proxy, "127.0.0.1", port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        log(f"{what} proxy: http://127.0.0.1:{port} -> decode {decode}"
            f"{f', prefill {prefill}' if prefill else ''} ({type(loop).__module__}) pid {os.getpid()}")
        await stop.wait()
        await server.stop()

    asyncio.run(main())
    return 0


# ----- CLI --------------------------------------------------------------------------------------
def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pdtui.bench.transparency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=DEFAULT_STREAMS, help="concurrent streams (default %(default)s)")
    ap.add_argument("--rates", type=_floats, default=DEFAULT_RATES,
                    help="TOTAL chunks/s, comma-separated (default 3200,6400,12800)")
    ap.add_argument("--duration", type=float, default=DEFAULT_DURATION_S,
                    help="window per point, s (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_S, help="warm-up per point, s (default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                    help="mean chunks per answer before the stream restarts (default %(default)s)")
    ap.add_argument("--length-spread", type=float, default=0.5,
                    help="answer lengths uniform over max-tokens x [1 - S, 1 + S], so the streams do not all end"
                         " and restart at once (default %(default)s; 0: every answer max-tokens long)")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                    help=f"comma-separated, from {', '.join(KNOWN_ARMS)} (default: {','.join(DEFAULT_ARMS)};"
                         " direct always runs)")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=CMD",
                    help="one more arm: a proxy command line with {decode} {prefill} {port} {python}")
    ap.add_argument("--client-procs", type=int, default=1, help="client processes sharing the streams (default 1)")
    ap.add_argument("--pin", nargs="?", const=DEFAULT_PIN, default=None, metavar="SPEC",
                    help=f"pin processes to CPUs (default spec {DEFAULT_PIN}; CPUs joined with +)")
    ap.add_argument("--pd", action="store_true",
                    help="P/D mode: a second fake as prefill; proxied arms get --prefill (vllm-router:"
                         " --vllm-pd-disaggregation)")
    ap.add_argument("--lockstep", action="store_true",
                    help="every stream on one grid, like a batched engine's decode steps (default: per-stream grids)")
    ap.add_argument("--chat", action="store_true", help="/v1/chat/completions instead of /v1/completions")
    ap.add_argument("--quick", action="store_true",
                    help="a tiny run for CI: 4 streams, 400 chunks/s, 2 s window, 0.5 s warm-up")
    ap.add_argument("--out", metavar="DIR",
                    help="write transparency.json.gz (every raw gap), summary.json, transparency.md and logs/")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    ap.add_argument("--py-spy", action="store_true",
                    help="profile each Python proxy over its window with py-spy (pip install py-spy): raw stacks"
                         " and a summary by layer (pdtui.bench.pyspy_summary) in --out; sampling pauses the"
                         " proxy, so those points' gaps are not comparable with an unprofiled run")
    # The pdtui-asyncio arm's own entry point.
    ap.add_argument("--serve-inproc-proxy", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--decode", help=argparse.SUPPRESS)
    ap.add_argument("--prefill", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return ap


def options_from_args(args: argparse.Namespace, explicit: set[str] | None = None) -> Options:
    opts = Options(streams=args.streams, rates=args.rates, duration_s=args.duration, warmup_s=args.warmup,
                   max_tokens=args.max_tokens, length_spread=args.length_spread,
                   arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()),
                   custom_arms=tuple(args.arm), client_procs=args.client_procs, pin=args.pin, pd=args.pd,
                   lockstep=args.lockstep, chat=args.chat, out=args.out, py_spy=args.py_spy)
    if args.quick:
        explicit = explicit or set()
        if "streams" not in explicit:
            opts.streams = 4
        if "rates" not in explicit:
            opts.rates = (400.0,)
        if "duration" not in explicit:
            opts.duration_s = 2.0
        if "warmup" not in explicit:
            opts.warmup_s = 0.5
        if "max_tokens" not in explicit:
            opts.max_tokens = 64
    return opts


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.serve_inproc_proxy:
        if not args.decode or not args.port:
            ap.error("--serve-inproc-proxy needs --decode URL and --port N")
        return serve_inproc_proxy(args.decode, args.prefill, args.port)
    raw = sys.argv[1:] if argv is None else argv
    explicit = {a.lstrip("-").split("=")[0].replace("-", "_") for a in raw if a.startswith("--")}
    opts = options_from_args(args, explicit)
    if opts.client_procs < 1 or opts.streams < 1 or any(r <= 0 for r in opts.rates):
        ap.error("--streams, --client-procs and --rates must be positive")
    if opts.py_spy and (not opts.out or py_spy_binary() is None):
        ap.error("--py-spy needs --out DIR and py-spy installed (pip install py-spy)")

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        result = run(opts)
    except KeyboardInterrupt:
        log("transparency: interrupted; every process started was stopped")
        return 130
    text = table(result)
    if args.json:
        print(json.dumps({"meta": result["meta"],
                          "points": [{k: v for k, v in asdict(p).items() if k != "gaps_ms"} for p in result["points"]]},
                         indent=1))
    else:
        print(text, end="")
    if opts.out:
        write_out(result, Path(opts.out), text)
        log(f"transparency: wrote {opts.out}/transparency.json.gz, summary.json, transparency.md")
        for p in result["points"]:
            if p.profile:
                log(f"transparency: py-spy profile of {p.arm} at {p.rate:g}/s: {p.profile}")
    failed = [p for p in result["points"] if p.status == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
