"""Hand-started CPU engines for the field probes (the README's "A pair you started yourself" lines,
as tests/e2e/handset.py starts them): `vllm serve` of the tiny model in a session of its own,
logging to a file. Ports 26000+ (this helper's range). Run under the engine lock:

    timeout 900 flock /tmp/pdtui-engines.lock .venv/bin/python results/2026-12-07-field/probe_X.py
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MODEL = os.environ.get("PDTUI_FIELD_MODEL") or str(Path.home() / ".cache/pdtui/models/tiny")
"""The tiny model (dummy weights), or a folder with weights (PDTUI_FIELD_MODEL: `pdtui model synth --weights`)."""
VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Engine:
    name: str
    role: str
    port: int
    side_port: int | None
    core: int
    folder: Path
    max_model_len: int = 4096
    kv_bytes: int = 268435456
    extra_kv: dict = field(default_factory=dict)
    block_size: int = 128
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.log"

    def argv(self) -> list[str]:
        a = [str(VENV_BIN / "vllm"), "serve", MODEL, "--host", "127.0.0.1", "--port", str(self.port),
             "--served-model-name", "tiny", "--block-size", str(self.block_size), "--max-model-len",
             str(self.max_model_len), *(["--load-format", "dummy"] if "PDTUI_FIELD_MODEL" not in os.environ else []), "--enforce-eager", "--enable-prompt-tokens-details",
             "--kv-cache-memory-bytes", str(self.kv_bytes), "--disable-uvicorn-access-log"]
        if self.role != "single":
            kv = {"kv_connector": "NixlConnector", "kv_role": "kv_producer" if self.role == "prefill" else "kv_consumer",
                  "kv_buffer_device": "cpu", "kv_connector_module_path": "pdtui.engine.nixl_quiet", **self.extra_kv}
            a += ["--kv-transfer-config", json.dumps(kv)]
        return a

    def env(self) -> dict[str, str]:
        tmp = self.folder / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        e = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=str(self.core), VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1",
                 PYTHONPATH=str(ROOT), TMPDIR=str(tmp), VLLM_RPC_BASE_PATH=str(tmp))
        if self.side_port is not None:
            e |= {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(self.side_port), "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
                  "UCX_NET_DEVICES": "lo", "PDTUI_NIXL_PROG_DELAY_US": "1000"}
        return e

    def start(self) -> None:
        import socket

        for port in (self.port, self.side_port):
            if port is None:
                continue
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    raise RuntimeError(f"{self.name}: port {port} is taken (an engine left by an earlier probe?)") from None
        self.folder.mkdir(parents=True, exist_ok=True)
        out = self.log.open("a")
        self.proc = subprocess.Popen(self.argv(), env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(20)
        elif self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def wait_health(self, timeout: float = 420) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy in {timeout} s")

    def metrics(self) -> dict[str, float]:
        from pdtui.core.scrape import parse_metrics

        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def raw_metric(self, name: str) -> float | None:
        """One family's summed value (any metric, not only scrape.WANTED's)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total, seen = 0.0, False
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
                seen = True
        return total if seen else None


def _exit_on_term(signum, frame):  # a `timeout` or a kill: leave through the finally blocks
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def running(*engines: Engine):
    signal.signal(signal.SIGTERM, _exit_on_term)
    signal.signal(signal.SIGHUP, _exit_on_term)
    for e in engines:
        e.start()
    try:
        t0 = time.monotonic()
        for e in engines:
            e.wait_health()
        print(f"[probe] {', '.join(e.name for e in engines)} healthy after {time.monotonic() - t0:.1f} s", flush=True)
        yield engines
    finally:
        for e in engines:
            e.kill()


def p_leg(p: Engine, prompt: str | list[int], rid: str, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "stream": False,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                   "remote_block_ids": None, "remote_host": None, "remote_port": None}, **extra}
    return httpx.post(f"{p.url}/v1/completions", json=body, headers={"X-Request-Id": rid}, timeout=120)


def d_leg(d: Engine, prompt: str | list[int], rid: str, params: dict, max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "kv_transfer_params": params, **extra}
    return httpx.post(f"{d.url}/v1/completions", json=body, headers={"X-Request-Id": rid}, timeout=120)


def ids(n: int, salt: int) -> list[int]:
    """A prompt of exactly n token ids, unique by salt (no prefix-cache hit across probes)."""
    return [(salt * 7919 + i * 31) % 250 + 3 for i in range(n)]
