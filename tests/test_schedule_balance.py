"""``scripts/schedule_balance.py``: the model deals items as the persistent kernel's rounds
do (``_round_item``), and its loads add up."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from bench.workloads import PaddedWorkload

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "schedule_balance.py"

pytest.importorskip("triton.experimental.gluon")  # (the model calls the kernel's _round_item)


@pytest.fixture(scope="module")
def model():
    spec = importlib.util.spec_from_file_location("schedule_balance", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_alternate_direction(model) -> None:
    # 3 programs, 6 items: round 0 deals items 0, 1, 2 to programs 0, 1, 2 and round 1
    # deals items 3, 4, 5 to programs 2, 1, 0, as the kernel's _round_item does.
    costs = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    assert model.snake_makespan(costs, 3) == 7.0  # every program: 6+1, 5+2, 4+3
    assert model.greedy_makespan(costs, 3) == 7.0
    # Program 0 takes items 0, 5 (odd rounds run backwards) and 6 (a partial third round).
    assert model.snake_makespan([4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0], 3) == 6.0


def test_item_costs_cover_every_row_block_and_head(model) -> None:
    w = PaddedWorkload("t", (1, 130, 300), 512, 3, 64)
    costs = model.item_costs(w, 128, 128, 1.0)
    # row blocks of 128: 1, 2 and 3; each sees ceil(len / 128) KV tiles plus the overhead
    assert costs == sorted([2.0] * 3 + [3.0] * 6 + [4.0] * 9, reverse=True)
    total = sum(costs)
    for programs in (1, 4, 7, 100):
        mean = total / programs
        assert model.greedy_makespan(costs, programs) >= mean - 1e-9
        assert model.snake_makespan(costs, programs) >= mean - 1e-9
    assert model.snake_makespan(costs, 1) == total
    assert math.isclose(model.greedy_makespan(costs, 100), max(costs))
