"""``bench.timing.time_interleaved`` and ``median_of_rounds`` (host only: a fake timer
records the order in which the cases are timed)."""
from __future__ import annotations

import pytest
import torch

from bench.timing import Stats, median_of_rounds, time_interleaved


def _recording_timer(order: list[str]):
    def timer(fn, device) -> Stats:
        name = fn()
        order.append(name)
        t = float(len(order))  # later timings read slower: a drifting clock
        return Stats(t, t - 0.5, t + 0.5, 10)

    return timer


def test_each_round_starts_one_case_later() -> None:
    order: list[str] = []
    fns = {n: (lambda n=n: n) for n in "abc"}
    out = time_interleaved(fns, torch.device("cpu"), 4, timer=_recording_timer(order))
    assert order == list("abc" "bca" "cab" "abc")
    assert [len(v) for v in out.values()] == [4, 4, 4]
    # Under the drift the three medians are close: no case took only the early slots.
    medians = {n: median_of_rounds(v).p50 for n, v in out.items()}
    assert max(medians.values()) - min(medians.values()) <= 2.0


def test_one_round_is_one_timing_each() -> None:
    order: list[str] = []
    out = time_interleaved({"x": lambda: "x", "y": lambda: "y"}, torch.device("cpu"), 1,
                           timer=_recording_timer(order))
    assert order == ["x", "y"]
    assert out["y"][0].p50 == 2.0


def test_median_of_rounds_takes_each_quantile_and_sums_reps() -> None:
    st = median_of_rounds([Stats(1.0, 0.9, 1.1, 5), Stats(3.0, 2.0, 4.0, 5),
                           Stats(2.0, 1.5, 2.5, 7)])
    assert (st.p50, st.p20, st.p80, st.reps) == (2.0, 1.5, 2.5, 17)


def test_rounds_below_one_refused() -> None:
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        time_interleaved({"x": lambda: None}, torch.device("cpu"), 0)


def test_real_timer_on_the_host() -> None:
    out = time_interleaved({"noop": lambda: None}, torch.device("cpu"), 2)
    assert len(out["noop"]) == 2 and all(s.p50 >= 0 for s in out["noop"])
