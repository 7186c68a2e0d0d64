"""The committed classroom example (examples/gpu-drill.jsonl.xz, recorded by `pdtui drill` on the
H100) plays to its end in the dashboard, and shows what the drill did: both kills, both restarts,
the errored streams, the fallback and the pair requests."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from pdtui.app.app import make_app
from pdtui.app.widgets import InstancePane
from pdtui.core.events import InstanceStateChanged
from pdtui.core.replay import BadRecording, Replay, read_recording

EXAMPLE = Path(__file__).parent.parent.parent / "examples" / "gpu-drill.jsonl.xz"
pytestmark = pytest.mark.anyio


async def test_gpu_drill_example_replays_to_the_end() -> None:
    rt = Replay(EXAMPLE, speed=0)
    app = make_app(rt)
    async with app.run_test(size=(160, 48)) as pilot:
        for _ in range(200):
            await pilot.pause(0.05)
            if app.ended:
                break
        assert app.ended and app.replay
        snap = app.snapshot
        assert snap.header.profile == "one-gpu" and "0.22.1" in snap.header.vllm_version
        assert snap.counts["pair"] >= 2 and snap.counts["fallback"] >= 1 and snap.counts["error"] >= 1
        # both instances were killed once and came back: starting, ready, exited (killed), starting, ready
        for name in ("P", "D"):
            states = [e.state for e in rt.history if isinstance(e, InstanceStateChanged) and e.instance == name]
            assert states.count("ready") == 2 and "exited" in states, (name, states)
            assert app.query_one(f"#pane-{name}", InstancePane).view.state in ("exited", "stopping")  # end of run
        fallback = next(r for r in snap.requests if r.outcome == "fallback")
        assert fallback.fallback_reason.startswith("prefill_down")


def test_bad_recordings_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event": "notice", "t": 1, "level": "info", "text": "x"}\nnot json\n')
    with pytest.raises(BadRecording, match=r"bad.jsonl:2: not a pdtui event"):
        read_recording(bad)
    empty = tmp_path / "empty.jsonl.xz"
    empty.write_bytes(lzma.compress(b"\n"))
    with pytest.raises(BadRecording, match="no events"):
        read_recording(empty)
    broken = tmp_path / "broken.jsonl.xz"
    broken.write_bytes(b"not xz at all")
    with pytest.raises(BadRecording, match="cannot read"):
        read_recording(broken)
