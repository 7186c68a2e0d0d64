"""Issue 23 on real engines: a pair pdtui did not start, watched by viewers of a pdtui service, and
the failure drill run on it through the user's own kill and restart commands.

The test starts P and D itself, as a user does, with `vllm serve` and a NixlConnector
kv_transfer_config (the README's "A pair you started yourself" lines; on 2 cores also the connector
module pdtui ships that keeps NIXL's progress thread from spinning a core each,
docs/ucx-busy-poll.md), each in a session of its own, logging to a file; the user's kill and
restart commands are shell scripts of the test's (kill -9 of the engine's session; start it again
and append to its log). Then:

1. the sides swapped (P's URL given as the decode) are refused before any request, the role named;
2. `pdtui attach --headless --prefill URL --decode URL` (a process: the service) with the logs and
   the commands: preflight passes, the warm-up pairs;
3. a request through pdtui's proxy: D's own counters say the prompt came by KV transfer and D
   computed none of it; `pdtui bench --prefill URL --decode URL --arms pair` (tiny counts) through
   the same engines: samples joined to traces, the freight against D's counter, the engines left up;
4. two viewers of the service (`pdtui attach` without URLs: RemoteSource), the dashboard under Pilot
   one of them. It attaches after the request: the history brings the row, with its blocks and the
   bytes from the formula; the other viewer saw the same trace; a read-only request to kill is
   refused; that viewer leaves and the rest goes on;
5. the failure drill (pdtui.app.drill, the dashboard's own keys) over the viewer: kill D during a
   witness stream (the user's script), which ends with an error event, restart D (the script), kill
   P: the request falls back to D, restart P, steady streams through the restored pair with no
   silent recompute; then the load key 3 (four 3,000-token prompts by the model's tokenizer, paired);
6. `pdtui ctl down` ends the service and leaves the engines running (pdtui did not start them);
   the test stops them: nothing of either is left, no port held.

This is also the drill's one real-pair run in CI: the keys, the control path (here through the
service's socket) and the panes are the same for a pair pdtui launched (tests/e2e/test_pair.py
kills those from outside; test_start_fault.py runs `pdtui drill` on a launched pair).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pdtui.bench import report
from pdtui.core import config as config_mod
from pdtui.core import kvmath
from pdtui.core.ctl_client import default_socket_path, request
from pdtui.core.events import RequestTraced
from pdtui.core.scrape import parse_metrics
from tests.e2e.conftest import PORT_OFFSET, _ports_free

pytestmark = pytest.mark.e2e
OFFSET = PORT_OFFSET + 2000  # 23000: its own ports, under 32768 (conftest.py)
ROOT = Path(__file__).resolve().parents[2]
EXT = 'vllm:prompt_tokens_by_source{source="external_kv_transfer"}'
LOCAL = 'vllm:prompt_tokens_by_source{source="local_compute"}'


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
        return int(self.pid_file.read_text())


def hand_started(name: str, role: str, port: int, side_port: int, core: int, model: str, folder: Path) -> HandStarted:
    """`vllm serve` as the README writes it for a hand-started CPU pair."""
    kv = {"kv_connector": "NixlConnector", "kv_role": "kv_producer" if role == "prefill" else "kv_consumer",
          "kv_buffer_device": "cpu", "kv_connector_module_path": "pdtui.engine.nixl_quiet"}
    argv = [str(Path(sys.executable).parent / "vllm"), "serve", model, "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "tiny", "--block-size", "128", "--max-model-len", "4096", "--load-format", "dummy",
            "--enforce-eager", "--enable-prompt-tokens-details", "--kv-cache-memory-bytes", "268435456",
            "--disable-uvicorn-access-log", "--kv-transfer-config", json.dumps(kv)]
    env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_port), "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
           "UCX_NET_DEVICES": "lo", "VLLM_CPU_OMP_THREADS_BIND": str(core), "PDTUI_NIXL_PROG_DELAY_US": "1000",
           "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           # vLLM's ZeroMQ sockets and gloo's file: in a folder the test removes (killed engines leave
           # them; test_zz_no_leftovers.py checks the temp folder); short, for a socket path
           "TMPDIR": str(folder / "tmp"), "VLLM_RPC_BASE_PATH": str(folder / "tmp")}
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


def wait_health(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer /health within {timeout:.0f} s")


def pdtui(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdtui", *args], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_a_pair_started_by_hand_is_checked_watched_by_two_viewers_and_drilled_by_the_users_commands(
        tmp_path: Path) -> None:
    cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), OFFSET)
    assert _ports_free(cfg), f"ports at offset {OFFSET} are taken"
    model = config_mod.model_path(cfg)
    pc, dc = cfg.instances
    short = Path(tempfile.mkdtemp(prefix="pdtui-e2e-attach-"))  # a Unix socket path holds 107 bytes
    p = hand_started("P", "prefill", pc.port, pc.side_channel_port, 0, model, short)
    d = hand_started("D", "decode", dc.port, dc.side_channel_port, 1, model, short)
    sessions: list[int] = []
    service: subprocess.Popen[str] | None = None
    try:
        sessions += [p.start(), d.start()]
        t0 = time.monotonic()
        wait_health(p.url, 300)
        wait_health(d.url, 300)
        print(f"\n[e2e] hand-started P and D answer /health after {time.monotonic() - t0:.1f} s")

        # 1. the sides swapped: refused before anything is sent, the role named
        swapped = pdtui("attach", "--headless", "--prefill", d.url, "--decode", p.url,
                        "--proxy-port", str(cfg.proxy_port), "--log", f"P={d.log}", "--log", f"D={p.log}")
        assert swapped.returncode == 2, swapped.stderr[-2000:]
        assert "role" in swapped.stderr and "kv_consumer" in swapped.stderr, swapped.stderr[-2000:]

        # 2. attached, with the logs and the user's commands
        err_path = tmp_path / "service.err"
        with open(err_path, "w") as err:
            service = subprocess.Popen(
                [sys.executable, "-m", "pdtui", "attach", "--headless", "--prefill", p.url, "--decode", d.url,
                 "--proxy-port", str(cfg.proxy_port), "--log", f"P={p.log}", "--log", f"D={d.log}",
                 "--decode-reports-cached", "--ready-timeout", "300",
                 "--kill", f"P=sh {p.kill_script}", "--restart", f"P=sh {p.start_script}",
                 "--kill", f"D=sh {d.kill_script}", "--restart", f"D=sh {d.start_script}"],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
                text=True)
        deadline = time.monotonic() + 180
        while "pair ready" not in err_path.read_text():
            assert service.poll() is None, err_path.read_text()[-3000:]
            assert time.monotonic() < deadline, err_path.read_text()[-3000:]
            time.sleep(0.2)

        # 3. one request through pdtui's proxy: D's counters say it came by KV transfer
        before = parse_metrics(httpx.get(f"{d.url}/metrics", timeout=10).text)
        rid = f"e2e-attach-{uuid.uuid4().hex[:6]}"
        prompt = (uuid.uuid4().hex + " the quick brown fox jumps over the lazy dog" * 20)[:700]
        r = httpx.post(f"{cfg.proxy_url}/v1/completions", headers={"X-Request-Id": rid}, timeout=120,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 8, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text[:500]
        after = parse_metrics(httpx.get(f"{d.url}/metrics", timeout=10).text)
        assert after[EXT] - before[EXT] == 700 and after[LOCAL] - before[LOCAL] == 0

        # the bench through the same engines (its own proxy beside the service's): the pair arm
        out = tmp_path / "bench"
        bench = pdtui("bench", "--prefill", p.url, "--decode", d.url, "--proxy-port", str(cfg.proxy_port + 1),
                      "--arms", "pair", "--requests", "2", "--prompt-len", "300", "--max-tokens", "16",
                      "--streams", "2", "--duration", "3", "--rate", "0.4", "--stream-max-tokens", "128",
                      "--big-max-tokens", "8", "--warmup-s", "1", "--out", str(out), "--no-plots", timeout=600)
        assert bench.returncode == 0, (bench.stdout[-2000:], bench.stderr[-3000:])
        data = report.read_json(next(out.glob("*.json.gz")))
        arm = data["arms"]["pair"]
        assert arm["error"] is None and arm["summary"]["follow"]["ok"] == 2, arm["summary"]
        joined = [x for x in arm["samples"] if not x["warmup"] and x["trace"] and x["trace"]["outcome"] == "pair"]
        assert joined and all(x["trace"]["kv_bytes"] == x["trace"]["blocks"] * cfg.block_size * 1024 for x in joined)
        assert arm["kv_bytes"]["match"], arm["kv_bytes"]
        for e in (p, d):  # the bench left the engines it did not start running
            httpx.get(f"{e.url}/health", timeout=5).raise_for_status()

        asyncio.run(_viewers_and_drill(default_socket_path(cfg.proxy_port), cfg, rid, tmp_path))

        # 6. down: the service ends; the engines it did not start run on
        down = pdtui("ctl", "down", "--proxy-port", str(cfg.proxy_port), "--json")
        assert down.returncode == 0, down.stderr
        assert service.wait(timeout=60) == 0, err_path.read_text()[-2000:]
        service = None
        for e in (p, d):
            httpx.get(f"{e.url}/health", timeout=5).raise_for_status()
            sessions.append(e.sessions())  # as restarted by the drill
    finally:
        if service is not None and service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait(10)
        for e in (p, d):
            with contextlib.suppress(OSError, ValueError):
                sessions.append(e.sessions())
        for sid in set(sessions):
            for pid in session_alive(sid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while any(session_alive(s) for s in sessions) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(short, ignore_errors=True)
    assert not [s for s in sessions if session_alive(s)], "an engine process was left"
    deadline = time.monotonic() + 10
    while not _ports_free(cfg) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ports_free(cfg), "a port of the attached pair is still held"


async def _viewers_and_drill(sock: Path, cfg: config_mod.PairConfig, rid: str, shots: Path) -> None:
    from pdtui.app import drill
    from pdtui.app.app import make_app
    from pdtui.app.messages import LoadFinished
    from pdtui.app.widgets import RequestDetail
    from pdtui.core.remote import RemoteSource

    # 4. two viewers; the dashboard attaches after the request: the history brings its row
    viewer = RemoteSource(sock)
    await viewer.connect()
    reader = RemoteSource(sock, read_only=True)
    await reader.connect()
    await reader.start()
    app = make_app(viewer, screenshot_dir=shots)
    seen: list[object] = []
    async with app.run_test(size=(160, 48), message_hook=seen.append) as pilot:
        deadline = time.monotonic() + 30
        while app.snapshot.request(rid) is None:
            assert time.monotonic() < deadline, "the late viewer's table lacks the request"
            await pilot.pause(0.1)
        row = app.snapshot.request(rid)
        geo = viewer.geometry
        assert row is not None and row.outcome == "pair", row
        assert geo is not None and geo.bytes_per_token == 1024
        assert row.blocks == math.ceil(700 / cfg.block_size)
        assert row.kv_bytes == kvmath.shipped_bytes(row.blocks, cfg.block_size, geo)
        assert (row.d_computed_tokens, row.recomputed) == (0, False)
        same = [e for e in reader.history if isinstance(e, RequestTraced) and e.request_id == rid]
        assert same and same[-1].kv_bytes == row.kv_bytes  # the other viewer saw the same trace
        refused = await asyncio.to_thread(request, sock, {"verb": "kill", "instance": "D", "read_only": True},
                                          timeout_s=10)
        assert refused.get("code") == "forbidden", refused
        await reader.aclose()  # one viewer leaves: the service and the dashboard go on

        # 5. the drill over the viewer, through the user's commands
        res = await drill.run(pilot, shots=shots, ready_timeout_s=300, step_timeout_s=180, witness_tokens=3000)
        print("\n" + res.table())
        assert res.ok, res.failed
        assert [s.name for s in res.steps] == ["ready", "load", "kill-d", "restart-d", "kill-p", "restart-p",
                                               "latency"]
        kill_d = res.steps[2].detail
        m = re.search(r"errors (\d+) -> (\d+)", kill_d)
        assert m and int(m[2]) > int(m[1]), kill_d
        assert "fell back to D colocated (prefill_down" in res.steps[4].detail, res.steps[4].detail
        assert re.search(r"no silent recompute in [1-9]\d* paired requests", res.steps[6].detail)
        d_view = app.snapshot.instance("D")
        assert d_view is not None and d_view.state == "ready"

        # the load key 3: 4 prompts of 3,000 tokens by the model's tokenizer, all paired
        await pilot.press("t")
        await pilot.press("3")
        for _ in range(1200):  # bounded: 4 sequential requests on 2 shared cores
            if any(isinstance(m, LoadFinished) and m.name == "big" for m in seen):
                break
            await pilot.pause(0.25)
        done = [m for m in seen if isinstance(m, LoadFinished) and m.name == "big"]
        assert done, "load key 3 did not finish within 300 s"
        assert (done[0].ok, done[0].errors, done[0].detail) == (4, 0, "prompts 3,000 tokens"), done[0]
        for _ in range(40):
            if app.snapshot.requests and app.snapshot.requests[-1].prompt_tokens == 3000:
                break
            await pilot.pause(0.25)
        last = app.snapshot.requests[-1]
        assert (last.outcome, last.prompt_tokens, last.completion_tokens) == ("pair", 3000, 8)
        assert (last.d_computed_tokens, last.recomputed) == (0, False)
        await pilot.pause(0.3)
        assert "completion None" not in str(app.query_one(RequestDetail).render())
        await pilot.press("q")  # this viewer leaves; the service runs on until `down`
    await viewer.aclose()
    print(f"[e2e] attached pair: {rid} paired, {row.blocks} blocks, {row.kv_bytes:,} B; the drill through the"
          " user's kill and restart scripts passed")
