"""The migration drill's verdict on tokens (pdtui.app.drill_migrate): ids and near-ties read off a
stream's events, the migrated stream against the unbroken run's; the proxy's in-flight gauge read
back. Plain data: no engine."""

from __future__ import annotations

import math

from pdtui.app.drill_migrate import NEAR_TIE, answer, inflight, same_tokens, seam_words


def ev(ids: list[int], tops: list[dict[str, float]] | None = None) -> dict:
    c: dict = {"text": "x" * len(ids), "token_ids": ids}
    if tops is not None:
        c["logprobs"] = {"top_logprobs": tops}
    return c


def test_ids_and_margins_from_events_merged_or_not():
    ids, margins = answer([ev([5], [{"a": -0.1, "b": -2.0}]), ev([6, 7], [{"c": -0.5, "d": -0.52}, {"e": -1.0}])])
    assert ids == [5, 6, 7]
    assert margins[0] == 1.9 and abs(margins[1] - 0.02) < 1e-9 and margins[2] == math.inf
    ids, margins = answer([ev([1, 2]), {"text": "", "token_ids": None}])  # no logprobs asked; an empty event
    assert ids == [1, 2] and margins == [math.inf, math.inf]


def test_equal_tokens_hold():
    words, held = same_tokens([1, 2, 3, 4], [1.0] * 4, [1, 2, 3, 4], sent=2)
    assert held and words.startswith("equal, token for token (4 tokens)")


def test_a_repeated_token_at_the_seam_does_not_hold():
    # D1 sent 1, 2; a bug sends 2 again: it differs at the seam where the reference was sure
    words, held = same_tokens([1, 2, 3, 4], [1.0] * 4, [1, 2, 2, 3], sent=2)
    assert not held and "differs at token 2 (0 after the seam at 2)" in words and "not a near-tie" in words


def test_a_difference_before_the_seam_does_not_hold_whatever_the_margins():
    words, held = same_tokens([1, 2, 3, 4], [0.0] * 4, [1, 9, 3, 4], sent=3)
    assert not held and "before the seam" in words


def test_a_near_tie_after_the_seam_is_the_engines_numerics():
    margins = [1.0, 1.0, 1.0, NEAR_TIE / 10, 1.0]
    words, held = same_tokens([1, 2, 3, 4, 5], margins, [1, 2, 3, 8, 9], sent=2)
    assert held and "equal up to token 3 (1 after the seam at 2), then a near-tie" in words and "dummy" not in words


def test_a_reference_of_near_ties_everywhere_says_the_order_is_not_checked():
    words, held = same_tokens([1, 2, 3, 4], [1e-6] * 4, [1, 2, 7, 7], sent=2)
    assert held and "near-ties (dummy weights?)" in words
    assert same_tokens([], [], [1], sent=0)[1] is False  # no ids: nothing to compare, not held


def test_the_proxys_inflight_gauge_read_back_and_the_seam_in_words():
    text = ('# HELP pdtui_inflight x\n# TYPE pdtui_inflight gauge\npdtui_inflight{instance="P",role="prefill"} 0.0\n'
            'pdtui_inflight{instance="D1",role="decode"} 1.0\n')
    assert inflight(text) == {"P": 0.0, "D1": 1.0}
    m = {"to": "D2", "seam_ms": 300.0, "prefill_ms": 40.0, "decode_ttft_ms": 200.0}
    assert seam_words(m, 500.0) == ("seam 300 ms (P's leg 40, D2's first token 200, the rest 60 ms); the pair's TTFT"
                                    " 500 ms (median): 0.60x")
    assert seam_words({}, 500.0).startswith("no seam measured")


def test_how_a_stream_ended_in_the_drills_words():
    from pdtui.core.sse_client import SseStream

    assert SseStream(events=3, done=True).outcome() == "3 events, [DONE]"
    assert SseStream(events=1).outcome() == "1 events, no end yet"
    assert SseStream(status=503, body="busy").outcome() == "HTTP 503 'busy'"
    assert SseStream(transport_error="ReadError: gone").outcome() == "transport error ReadError: gone"
    assert SseStream(events=2, error_event={"message": "x"}).outcome() == "2 events, error event {'message': 'x'}"
