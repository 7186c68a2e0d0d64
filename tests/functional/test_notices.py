"""The notice line at 80x24 (issue 20): one line with the essential words first (who, what,
cause), and every notice whole, wrapped, on `n`."""

from __future__ import annotations

import pytest

from pdtui.app.app import make_app
from pdtui.app.messages import LoadFinished
from pdtui.core.events import Notice
from tests.functional.fake_runtime import T0, FakeRuntime
from tests.functional.test_dashboard import clock, pair_up, screen_text, settle

pytestmark = pytest.mark.anyio

DEATH = ("D (decode) died: its VLLM::Worker (pid 1234) died: SIGILL (illegal instruction) in an AMX tile load;"
         " all its processes were killed. Restart it with r/R or `pdtui ctl restart D`."
         " Log: /root/.local/state/pdtui/runs/20261130-120000-9000/D.log."
         " Last lines: (EngineCore pid=1234) Fatal Python error: Illegal instruction | Current thread 0x7f (most"
         " recent call first) | File cpu_attn.py, line 88 in forward")


def notice_line(app) -> str:
    return screen_text(app).splitlines()[-2]


def modal_text(app) -> str:
    """The notices screen's text, unwrapped (its lines inside the border joined with spaces)."""
    return " ".join(line.strip().strip("│").strip() for line in screen_text(app).splitlines())


async def test_a_death_notice_fits_one_line_and_n_shows_it_whole() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        pair_up(fake)
        fake.emit(Notice(level="error", instance="D", text=DEATH, t=T0 + 80))
        await settle(pilot, app)
        line = notice_line(app)
        assert len(line) == 80
        # who, what, cause first; what to do and where the log is wait behind `n`
        assert line.strip().startswith("D (decode) died: its VLLM::Worker (pid 1234) died: SIGILL (illegal")
        assert "n Notices" in screen_text(app).splitlines()[-1]  # the key, in the footer at 80 columns
        await pilot.press("n")
        await settle(pilot, app)
        text = modal_text(app)
        for words in ("all its processes were killed.", "Restart it with r/R or `pdtui ctl restart D`.",
                      "Log: /root/.local/state/pdtui/runs/20261130-120000-9000/D.log.",
                      "Illegal instruction | Current thread 0x7f (most recent call first)", "line 88 in forward"):
            assert words in text, words
        await pilot.press("escape")
        await settle(pilot, app)
        assert "Restart it with" not in screen_text(app)  # closed: the dashboard again
        await pilot.press("up")  # and its keys work at once
        await settle(pilot, app)
        assert app.focused is not None and app.focused.id == "table"


async def test_a_load_result_shows_its_first_error_words_and_n_the_rest() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        pair_up(fake)
        await settle(pilot, app)
        app.post_message(LoadFinished("big", 0, 4, "prompts 3,000 tokens",
                                      "HTTP 400: {'message': 'This model's maximum context length is 4096 tokens'}"))
        await settle(pilot, app)
        line = notice_line(app)
        assert "load big: 0 ok, 4 errors: HTTP 400: {'message': 'This model" in line, line
        await pilot.press("n")
        await settle(pilot, app)
        text = modal_text(app)
        assert "prompts 3,000 tokens (total 0 ok, 4 errors)" in text
        assert "maximum context length is 4096 tokens" in text


async def test_the_notices_screen_lists_the_newest_first_with_their_levels() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        pair_up(fake)
        fake.emit(Notice(level="warning", text="warm-up request ended as fallback: prefill_unreachable"
                         " (ConnectError: All connection attempts failed); the KV transfer path is not working",
                         t=T0 + 63))
        await settle(pilot, app)
        fake.emit(Notice(level="info", instance="D", text="restarting D (decode)", t=T0 + 90))
        await settle(pilot, app)
        await pilot.press("n")
        await settle(pilot, app)
        text = modal_text(app)
        assert text.index("restarting D (decode)") < text.index("warm-up request ended as fallback")
        assert "the KV transfer path is not working" in text and "warning" in text
        await pilot.press("n")  # n again closes it too
        await settle(pilot, app)
        assert "the KV transfer path is not working" not in screen_text(app)


def test_one_line_keeps_a_notice_that_fits_else_its_first_clause() -> None:
    from pdtui.app.notices import headline, one_line

    assert headline(DEATH) == ("D (decode) died: its VLLM::Worker (pid 1234) died: SIGILL (illegal instruction)"
                               " in an AMX tile load")
    assert one_line(DEATH, 400) == DEATH
    pools = "KV pools differ: P 262,144 tokens, D 131,072 tokens. Pin them with kv_cache_memory_bytes in the profile."
    assert one_line(pools, 78) == "KV pools differ: P 262,144 tokens, D 131,072 tokens"
    # no clause end in "0.5 s" or "D.log"
    assert headline("took 0.5 s, log in D.log") == "took 0.5 s, log in D.log"
