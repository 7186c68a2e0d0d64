"""Items 2 and 3 by hand.

2. Context-length asymmetry: P (max_model_len 4096) with Ds (1024), and Ps (1024) with D (4096),
   each behind `pdtui proxy` (main's, no defence added): a prompt one admits and the other rejects,
   both directions, streamed and not; what the client gets and when, and whether P's blocks stay.
3. Fail-open: D given reused, shifted and out-of-range kv_transfer_params directly (as a router
   with a bug would): what D answers, whether its answer equals the known greedy answer token for
   token, and what the failure counters say (D's vllm:nixl_num_failed_transfers, P's
   vllm:nixl_num_notifications_after_expiry).

    timeout 2700 flock -w 2400 /tmp/pdtui-engines.lock timeout 900 .venv/bin/python results/2026-12-07-field/probe_context_failopen.py
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from engines import ROOT, Engine, d_leg, ids, p_leg, running  # noqa: E402

FAILED = "vllm:nixl_num_failed_transfers_total"
AFTER_EXPIRY = "vllm:nixl_num_notifications_after_expiry_total"


@contextlib.contextmanager
def proxy(port: int, p: Engine, d: Engine, folder: Path):
    out = (folder / f"proxy-{port}.jsonl").open("w")
    err = (folder / f"proxy-{port}.err").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pdtui", "proxy", "--prefill", f"P={p.url}", "--decode", f"D={d.url}",
                             "--port", str(port), "--block-size", "128", "--decode-reports-cached"],
                            stdout=out, stderr=err, cwd=ROOT, start_new_session=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def usage(e: Engine) -> float:
    return e.metrics().get("vllm:kv_cache_usage_perc", float("nan"))


def via(url: str, prompt, max_tokens: int | None, stream: bool, rid: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "stream": stream, "temperature": 0, "ignore_eos": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    t = time.monotonic()
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"X-Request-Id": rid},
                          timeout=httpx.Timeout(120, connect=5)) as r:
            text = r.read().decode()[:220].replace("\n", " ")
            status = r.status_code
    except httpx.HTTPError as e:
        return f"{type(e).__name__} after {time.monotonic() - t:.1f} s"
    return f"{status} in {(time.monotonic() - t) * 1000:.0f} ms: {text}"


def context(folder: Path, p: Engine, d: Engine, ps: Engine, ds: Engine) -> None:
    print("\n== 2. context-length asymmetry ==", flush=True)
    for name, (pp, dd), port in (("P 4096 -> Ds 1024", (p, ds), 26010), ("Ps 1024 -> D 4096", (ps, d), 26011)):
        with proxy(port, pp, dd, folder) as url:
            print(f"-- {name} (proxy :{port})", flush=True)
            # warm the handshake
            print("   warm 64+4:", via(url, ids(64, 900 + port), 4, False, f"warm-{port}")[:60], flush=True)
            for n, mt, stream in ((2000, 16, False), (2000, 16, True), (1000, 100, False), (1000, 100, True),
                                  (1020, None, False), (1024, 4, False), (1023, 1, False), (900, 16, True)):
                base = usage(pp)
                res = via(url, ids(n, n * 3 + port + (1 if stream else 0) + (mt or 0)), mt, stream,
                          f"ctx-{port}-{n}-{mt}-{int(stream)}")
                time.sleep(1.5)
                print(f"   prompt {n} max_tokens {mt} stream {stream}: {res}", flush=True)
                print(f"      P usage {base:.5f} -> {usage(pp):.5f} 1.5 s after", flush=True)
        events = [json.loads(x) for x in (folder / f"proxy-{port}.jsonl").read_text().splitlines() if x.strip()]
        for ev in events:
            if ev.get("kind") == "request":
                print(f"   trace {ev['request_id']}: {ev['outcome']} {ev['status']} p={ev.get('prefill_ms')}"
                      f" err={str(ev.get('error'))[:100]}")


def fail_open(p: Engine, d: Engine) -> None:
    """Each case on a prompt of its own (D has nothing of it cached); its known answer is P's own,
    computed colocated (no kv_transfer_params): the same dummy weights, greedy."""
    print("\n== 3. fail-open ==", flush=True)
    n, mt = 300, 16

    def toks(r: httpx.Response):
        try:
            return r.json()["choices"][0]["token_ids"]
        except Exception:
            return None

    def known(prompt) -> list[int]:
        r = httpx.post(f"{p.url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": mt,
                                                        "temperature": 0, "ignore_eos": True, "return_token_ids": True},
                       timeout=60)
        return toks(r)

    def counters() -> tuple:
        return d.raw_metric(FAILED), p.raw_metric(AFTER_EXPIRY), d.raw_metric("vllm:nixl_xfer_time_seconds_count")

    # the pair is right: a prompt through P then D equals P's own answer
    a = ids(n, 111)
    ref_a = known(a)
    params_a = p_leg(p, a, "fo-a-p").json()["kv_transfer_params"]
    ra = d_leg(d, a, "fo-a", params_a, max_tokens=mt, return_token_ids=True)
    print(f"   A through the pair equals P's own answer: {toks(ra) == ref_a}; counters (D failed, P after-expiry,"
          f" D xfers) {counters()}", flush=True)
    time.sleep(1)

    cases = {
        "reused (A's params, already read by D, freed by P)": lambda got: params_a,
        "shifted (every block + 1)": lambda got: {**got, "remote_block_ids": [[x + 1 for x in g] for g in got["remote_block_ids"]]},
        "short (last block left out)": lambda got: {**got, "remote_block_ids": [g[:-1] for g in got["remote_block_ids"]]},
        "out-of-range (block ids + 10^7)": lambda got: {**got, "remote_block_ids": [[x + 10**7 for x in g] for g in got["remote_block_ids"]]},
        "foreign engine id": lambda got: {**got, "remote_engine_id": "not-an-engine"},
    }
    for i, (name, tamper) in enumerate(cases.items()):
        b = ids(n, 200 + i)
        ref_b = known(b)
        before = counters()
        got = p_leg(p, b, f"fo-{i}-p").json()["kv_transfer_params"]
        t = time.monotonic()
        try:
            r = d_leg(d, b, f"fo-{i}", tamper(got), max_tokens=mt, return_token_ids=True)
            out = toks(r)
            same = None if out is None else sum(1 for x, y in zip(out, ref_b) if x == y)
            desc = (f"{r.status_code} in {(time.monotonic() - t) * 1000:.0f} ms; equal to the known answer: {out == ref_b}"
                    f" ({same} of {mt} tokens in place); {r.text[:160] if r.status_code != 200 else ''}")
        except httpx.HTTPError as e:
            desc = f"{type(e).__name__} after {time.monotonic() - t:.1f} s"
        # P's own blocks for this request were never read: release them (the proxy's way)
        httpx.post(f"{d.url}/v1/completions", json={"model": "pdtui-release-kv", "prompt": "x", "max_tokens": 1,
                                                    "kv_transfer_params": got}, timeout=30)
        time.sleep(1.5)
        print(f"   {name}: {desc}; counters {before} -> {counters()}", flush=True)
        if d.proc is None or d.proc.poll() is not None:
            print("   D died:", d.log.read_text()[-1500:])
            return
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{d.url}/health", timeout=5).status_code != 200:
                print("   D unhealthy after", name)
    # after all that, is the pair still right?
    c = ids(n, 300)
    ref_c = known(c)
    params_c = p_leg(p, c, "fo-c-p").json()["kv_transfer_params"]
    rc = d_leg(d, c, "fo-c", params_c, max_tokens=mt, return_token_ids=True)
    print(f"   afterwards, a clean pair request equals the known answer: {toks(rc) == ref_c}", flush=True)


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="pdtui-field-"))
    p = Engine("P", "prefill", 26100, 26101, 0, folder)
    d = Engine("D", "decode", 26200, 26201, 1, folder)
    ps = Engine("Ps", "prefill", 26300, 26301, 0, folder, max_model_len=1024, kv_bytes=64 * 2**20)
    ds = Engine("Ds", "decode", 26400, 26401, 1, folder, max_model_len=1024, kv_bytes=64 * 2**20)
    which = sys.argv[1:] or ["context", "failopen"]
    try:
        with running(p, d, ps, ds) if "context" in which else running(p, d):
            if "failopen" in which:
                fail_open(p, d)
            if "context" in which:
                context(folder, p, d, ps, ds)
    finally:
        print(f"[probe] logs in {folder}")
    for e in (p, d):
        for line in e.log.read_text().splitlines():
            low = line.lower()
            if any(w in low for w in ("nixl transfer failure", "invalid kv", "mismatch", "error", "expired")):
                print(f"  {e.name}:", line[-240:])


if __name__ == "__main__":
    main()
