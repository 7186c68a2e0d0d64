"""The transparency bench (pdtui.bench.transparency): a tiny real run checks the STRUCTURE of what it
measures and that it leaves no process behind, never the speed (the machine may be busy)."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pdtui.bench import transparency
from pdtui.bench.transparency import Options
from pdtui.bench.transparency_client import ChunkedDecoder


def _gone(pid: int) -> bool:
    return not transparency.pid_alive(pid)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("transparency")
    opts = Options(streams=4, rates=(400.0,), duration_s=2.0, warmup_s=0.5, max_tokens=64,
                   arms=transparency.DEFAULT_ARMS, out=str(out))
    result = transparency.run(opts, progress=lambda msg: None)
    text = transparency.table(result)
    transparency.write_out(result, out, text)
    return result, text, out


def test_every_arm_that_can_run_measures_gaps(tiny_run):
    result, _, _ = tiny_run
    points = {p.arm: p for p in result["points"]}
    assert set(points) == set(transparency.DEFAULT_ARMS)
    assert points["direct"].status == "ok"
    why = transparency.legacy_unavailable()
    if why is None:  # git, this repository's history and httpx/uvicorn are here: the old proxy runs
        assert points["pdtui-legacy"].status == "ok", points["pdtui-legacy"].reason
    else:
        assert points["pdtui-legacy"].status == "skipped" and points["pdtui-legacy"].reason == why
    ran = [p for p in points.values() if p.status != "skipped"]
    assert len(ran) >= 2
    for p in ran:
        assert p.status == "ok", (p.arm, p.reason)
        assert p.chunks > 0 and p.gaps_ms and p.stats["gaps"] == len(p.gaps_ms), p.arm
        s = p.stats
        assert 0 <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"], (p.arm, s)
        assert p.p99_ratio is not None and p.p99_ratio > 0
        assert p.responses > 0 and p.errors == 0, (p.arm, p.error_samples)
        if p.arm == "direct":
            assert p.proxy_cpu_us_per_chunk is None
        else:
            assert isinstance(p.proxy_cpu_us_per_chunk, float) and p.proxy_cpu_us_per_chunk > 0, p.arm
    for p in points.values():
        if p.status == "skipped":
            assert p.reason  # says why (and, for vllm-router, how to install it)


def test_the_legacy_arm_runs_the_old_proxy_read_from_git_at_its_commit(tiny_run, tmp_path):
    if transparency.legacy_unavailable() is not None:
        pytest.skip(transparency.legacy_unavailable())
    _, _, out = tiny_run
    ref = transparency.LEGACY_PROXY_REF
    # the product no longer carries it; the arm's process ran that commit's copy, in this run's scratch folder
    assert not (Path(transparency.__file__).parent / "legacy_proxy.py").exists()
    (log,) = [p for p in (out / "logs").glob("*-pdtui-legacy.log")]
    text = log.read_text()
    assert "pdtui-legacy: the old proxy from " in text and f"legacy-{ref[:12]}" in text
    assert "pdtui-legacy proxy: http://127.0.0.1:" in text  # that commit's serve_inproc_proxy, serving it
    tree = transparency.legacy_tree(tmp_path / "src")
    shown = subprocess.run(["git", "show", f"{ref}:{transparency.LEGACY_PROXY_PATH}"], capture_output=True,
                           check=True, cwd=Path(transparency.__file__).parent).stdout
    assert (tree / transparency.LEGACY_PROXY_PATH).read_bytes() == shown
    assert (tree / "pdtui/core/events.py").exists() and not (tree / "pdtui/app").exists()


def test_without_git_or_its_commit_the_legacy_arm_is_skipped_saying_why(tmp_path, monkeypatch):
    if shutil.which("git") is not None:
        assert "not in the repository" in transparency.legacy_unavailable(ref="0" * 40)
        assert "a shallow clone?" in transparency.legacy_unavailable(ref="0" * 40)
        assert "not a git checkout (an installed wheel?)" in transparency.legacy_unavailable(repo=tmp_path)
        with pytest.raises(transparency.LegacyUnavailable, match="not a git checkout"):
            transparency.legacy_tree(tmp_path / "src", repo=tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on it
    assert transparency.legacy_unavailable().startswith("git is not installed")
    opts = Options(streams=2, rates=(200.0,), duration_s=0.5, warmup_s=0.2, max_tokens=16,
                   arms=("direct", "pdtui-legacy"))
    (why,) = [w for a, w in transparency.resolve_arms(opts) if a.name == "pdtui-legacy"]
    assert why and why.startswith("git is not installed")


def test_no_process_is_left_behind(tiny_run):
    result, _, _ = tiny_run
    pids = result["pids"]
    # fake + one client per arm that ran + one proxy per proxied arm
    assert len(pids) >= 3
    assert os.getpid() not in pids
    assert all(_gone(pid) for pid in pids), [pid for pid in pids if not _gone(pid)]


def test_the_table_and_the_files(tiny_run):
    result, text, out = tiny_run
    assert text.startswith("| chunks/s")
    for p in result["points"]:
        assert f"| {p.arm} |" in text
    assert "CPU/chunk" in text and "Pinning: none" in text
    with gzip.open(out / "transparency.json.gz", "rt") as f:
        full = json.load(f)
    by_arm = {p["arm"]: p for p in full["points"]}
    assert len(by_arm["direct"]["gaps_ms"]) == by_arm["direct"]["stats"]["gaps"]
    summary = json.loads((out / "summary.json").read_text())
    assert all("gaps_ms" not in p for p in summary["points"])
    assert (out / "transparency.md").read_text() == text


def test_a_proxy_that_dies_at_start_fails_its_arm_and_is_cleaned_up(tmp_path):
    opts = Options(streams=2, rates=(200.0,), duration_s=0.5, warmup_s=0.2, max_tokens=16, arms=("direct",),
                   custom_arms=(f"broken={sys.executable} -c 'import sys; sys.exit(3)' {{port}}",), out=str(tmp_path))
    result = transparency.run(opts, progress=lambda msg: None)
    points = {p.arm: p for p in result["points"]}
    assert points["direct"].status == "ok"
    assert points["broken"].status == "failed" and "exited with 3" in points["broken"].reason
    assert all(_gone(pid) for pid in result["pids"])


def test_chunked_decoder_whatever_the_read_boundaries():
    payloads = [b"data: {\"a\":1}\n\n", b"x" * 300, b"data: [DONE]\n\n"]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads) + b"0\r\n\r\n"
    for step in (1, 2, 3, 7, 64, len(wire)):
        d = ChunkedDecoder()
        got = b"".join(d.feed(wire[i:i + step]) for i in range(0, len(wire), step))
        assert got == b"".join(payloads) and d.done, step


def test_rates_are_total_chunks_per_second():
    args = transparency.build_parser().parse_args([])
    opts = transparency.options_from_args(args)
    assert opts.rates == (3200, 6400, 12800) and opts.streams == 32
    assert [opts.streams / r * 1000 for r in opts.rates] == [10.0, 5.0, 2.5]  # ms between a stream's chunks
    quick = transparency.options_from_args(transparency.build_parser().parse_args(["--quick"]), {"quick"})
    assert quick.streams == 4 and quick.duration_s == 2.0


def test_pin_spec_is_checked():
    assert transparency.parse_pin(None) is None
    cpu = min(os.sched_getaffinity(0))
    assert transparency.parse_pin(f"proxy={cpu},client={cpu}") == {"proxy": {cpu}, "client": {cpu}}
    with pytest.raises(ValueError):
        transparency.parse_pin("gpu=0")
    with pytest.raises(ValueError):
        transparency.parse_pin("proxy=4096")


def test_pyspy_summary_groups_samples_by_layer_and_role():
    from pdtui.bench.pyspy_summary import summarize

    entry = "main (pdtui/core/proxy/process.py:1);Runner.run (asyncio/runners.py:118)"
    legacy = ("main (x.py:1);BaseEventLoop.run_forever (asyncio/base_events.py:607);"
              "BaseEventLoop._run_once (asyncio/base_events.py:1922)")
    raw = "\n".join([
        f'process 1:"python -m pdtui proxy";{entry} 60',  # time inside uvloop's C loop
        f"{entry};Response.write (pdtui/core/proxy/httpio.py:10) 20",
        f"{legacy};_SseTimer.feed (pdtui/bench/legacy_proxy.py:1);loads (json/__init__.py:346) 15",
        f"{legacy};Response.aiter_raw (httpx/_models.py:1);ChunkedReader.__call__ (h11/_readers.py:1) 5",
    ])
    text = summarize(raw, us_per_chunk=100.0)
    assert "samples on CPU: 100" in text

    def share(name: str) -> list[str]:  # "60.0% 60.0" for each line naming it
        return [" ".join(line.split()[:2]) for line in text.splitlines() if name in line]

    assert share("event loop in C (uvloop") == ["60.0% 60.0", "60.0% 60.0"]  # its layer and its role
    assert share("pdtui httpio")[0] == "20.0% 20.0"
    assert share("json (stdlib)") == ["15.0% 15.0"]
    assert share("per-chunk SSE scan in pdtui") == ["15.0% 15.0"]
    assert share("upstream receive (httpx") == ["5.0% 5.0"]


def test_slow_gaps_that_end_together_are_one_stall():
    slow = [[1.000, 25.0], [1.002, 30.0], [1.004, 21.0], [3.5, 40.0]]
    assert transparency.stalls(slow) == [{"t_s": 1.0, "streams": 3, "max_ms": 30.0},
                                         {"t_s": 3.5, "streams": 1, "max_ms": 40.0}]
    assert transparency.stalls([]) == []
