"""bench.tile_work: the kernel's work on a plan against the work the FLOPs count."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import spanfill as sf
from bench.tile_work import tile_work
from bench.workloads import PaddedWorkload, core_workloads, with_window


def _plan(tile_req, tile_row0, tile_row_end, q_start, q_len, kv_len, block_q):
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return SimpleNamespace(tile_req=t(tile_req), tile_row0=t(tile_row0),
                           tile_row_end=t(tile_row_end), q_start=t(q_start), q_len=t(q_len),
                           kv_len=t(kv_len), block_q=block_q)


def test_by_hand_causal():
    # One request of 6 rows at positions 0..5, tiles of 4 tokens, KV steps of 4.
    plan = _plan([0, 0, -1], [0, 4, 0], [4, 8, 0], [0], [6], [6], 4)
    work = tile_work(plan, 4, True)
    # Tile 1: rows 0..3 see 1+2+3+4 = 10 positions, compute one step of 4 x 4 slots.
    # Tile 2: rows 4, 5 see 5+6 = 11, compute 2 steps (positions 0..7) x 4 slots.
    assert (work.counted, work.tile_slots, work.tiles) == (21, 16 + 32, 2)
    assert work.ratio == pytest.approx(48 / 21)
    assert work.row_fill == pytest.approx(6 / 8)


def test_by_hand_window_and_positions():
    # Two span tokens at positions 9 and 10 of a 12-position request, window of 2.
    plan = _plan([0], [0], [2], [0], [2], [12], 2)
    work = tile_work(plan, 4, True, positions=torch.tensor([9, 10]), window_left=2)
    # Each sees 3 positions; the tile runs from 7 floored to 4 up to 11: 2 steps.
    assert (work.counted, work.tile_slots) == (6, 2 * 2 * 4)


def test_padding_entries_do_no_work():
    # Padded batch [2, 8], valid 3 and 8: the plan's padding entry computes nothing.
    layout = sf.PaddedLayout.build(torch.tensor([3, 8]), 8)
    work = tile_work(layout.tile_plan(4, False), 4, False)
    assert work.counted == 3 * 3 + 8 * 8
    # Sample 0: one tile of 4 slots x 4 positions; sample 1: two tiles x 4 x 8.
    assert work.tile_slots == 16 + 2 * 32
    assert work.tiles == 3


@pytest.mark.parametrize("w", core_workloads(small=True)
                         + [with_window(core_workloads(small=True)[0], "swa", 20)],
                         ids=lambda w: w.name)
def test_counted_work_is_the_flop_count(w):
    t = w.make("cpu", torch.float32)
    if isinstance(w, PaddedWorkload):
        plan = sf.PaddedLayout.build(t.valid_lens, w.seq_len).tile_plan(8, w.causal)
        work = tile_work(plan, 16, w.causal)
        heads = w.num_heads
    else:
        plan = t.layout.tile_plan(8, True)
        work = tile_work(plan, 16, True, t.layout.positions, w.window_left)
        heads = w.num_q_heads
    assert 4.0 * heads * w.head_dim * work.counted == pytest.approx(w.flops)
    assert work.ratio >= 1.0
    assert 0.0 < work.row_fill <= 1.0
