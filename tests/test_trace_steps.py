"""``scripts/trace_steps.py`` (host only): its edits still find their anchors in the kernel
file, the traced copy compiles for sm_90 with the clock stamps in it, and the analysis
reads a hand-made trace as it should."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import trace_steps  # noqa: E402


def test_every_edit_finds_its_anchor() -> None:
    src = trace_steps.KERNEL.read_text()
    traced = trace_steps.traced_source(src)
    # its definition, seven step stamps and four item stamps
    assert traced.count("_trace(tr") == 1 + 7 + 4
    assert "tr=None):" in traced and "lse_arg = TRACE" in traced
    # the variants apply on top (their anchors are the traced text's)
    assert "p = s_acc * qk_scale" in trace_steps.traced_source(src, tensor_only=True)
    assert "p = _exp2_fma(" in trace_steps.traced_source(src, exp_fma=True)
    turns = trace_steps.traced_source(src, turns_done=True)
    assert "turns, stagger = True, False" in turns
    passes = "_pass_turn(turn, TURN_WG, NAMED_TURNS, TURN_GROUPS)"
    assert turns.count(passes) == traced.count(passes) == 3
    with pytest.raises(ValueError, match="anchor is gone"):
        trace_steps.traced_source(src.replace("_wait_ready(ready, ring_base + j,", "x("))


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU-only, as tests/test_compile_sm90.py: on a GPU, run the script")
def test_traced_copy_compiles_for_sm90_with_stamps() -> None:
    """The registry's D=128 form with the stamps compiles for sm_90 (in a subprocess
    without the interpreter, as tests/test_compile_sm90.py compiles every kernel)."""
    from tests.helpers import compile_check

    reads = int(compile_check("trace_steps.py").split("clock reads:")[1])
    assert reads >= 2 * 11  # eleven stamps in each of the two consumer groups


def _buf(steps: int, items: int, groups: list[tuple[list, list]]) -> np.ndarray:
    """The trace buffer of ``groups`` (per group: step stamps, item stamps), each stamp
    the same on every warp unless it is a tuple of per-warp stamps."""
    warps = trace_steps.WARPS

    def per_warp(events: list) -> np.ndarray:
        out = np.zeros((len(events), 4, warps), dtype=np.int64)
        for i, ev in enumerate(events):
            for k, stamp in enumerate(ev):
                out[i, k] = stamp if isinstance(stamp, tuple) else (stamp,) * warps
        return out

    rows = []
    for st, it in groups:
        row = np.zeros((steps + items) * 4 * warps, dtype=np.int64)
        row[:len(st) * 4 * warps] = per_warp(st).ravel()
        row[steps * 4 * warps:(steps + len(it)) * 4 * warps] = per_warp(it).ravel()
        rows.append(row)
    return np.stack(rows)


def test_analysis_of_a_hand_made_trace() -> None:
    # One program, two groups, one item of two steps each. Group 0: item 100..400; its
    # loop starts at 110, tile 0 ready at 120, S at 150, softmax to 200; tile 1 ready at
    # 210, S at 240, PV at 260, end at 300; last PV to 350; stored at 400.
    g0 = ([(120, 150, 0, 200), (210, 240, 260, 300)], [(100, 110, 350, 400)])
    # Group 1 the same, 200 cycles later.
    g1 = ([(a + 200, b + 200, c + 200 if c else 0, e + 200) for a, b, c, e in g0[0]],
          [(a + 200, b + 200, c + 200, e + 200) for a, b, c, e in g0[1]])
    res = trace_steps.analyse(_buf(4, 2, [g0, g1]), 4, 2)
    total = 2 * 300.0
    assert res["wait_tile"] == pytest.approx(2 * 10 / total)   # 210 - 200
    assert res["qk"] == pytest.approx(2 * (30 + 30) / total)
    assert res["pv_after_s"] == pytest.approx(2 * 20 / total)
    assert res["softmax"] == pytest.approx(2 * (50 + 40) / total)
    assert res["stagger_wait"] == pytest.approx(2 * 10 / total)
    assert res["q_wait_first_tile"] == pytest.approx(2 * 10 / total)
    assert res["last_pv"] == pytest.approx(2 * 50 / total)
    assert res["stores"] == pytest.approx(2 * 50 / total)
    assert res["cycles_per_step"] == pytest.approx(total / 4)
    # wgmma in flight: group 0 over [120,150], [210,260], [300,350]; group 1 shifted by
    # 200. Neither in flight, within 120..550: about (60 + 40 + 60) of 430 cycles,
    # to the 16-cycle bins the coverage is counted in.
    assert 0.2 < res["no_wgmma_in_flight"] < 0.5
    assert 0.0 < res["both_groups_in_flight"] < 0.25
    assert res["warp_skew"] == 0.0  # every warp stamped alike
    assert res["after_last_warp"] == pytest.approx(2 * 10 / total)


def test_three_groups_are_read_as_one_program() -> None:
    """The 192-row D=64 form has three consumer groups a program (rows ``pid * 3 + g``),
    which the traced launch records for the analysis; the three are one program's."""
    g = ([(120, 150, 0, 200), (210, 240, 260, 300)], [(100, 110, 350, 400)])

    def shifted(d: int) -> tuple[list, list]:
        return ([(a + d, b + d, c + d if c else 0, e + d) for a, b, c, e in g[0]],
                [(a + d, b + d, c + d, e + d) for a, b, c, e in g[1]])

    # two programs of three groups; the second program's groups start 1000 cycles later
    groups = [shifted(0), shifted(100), shifted(200), shifted(1000), shifted(1100),
              shifted(1200)]
    buf = _buf(4, 2, groups)
    # the launcher records its groups a program (block_m // 64), not the buffer's rows:
    # a short launch of three groups can leave fewer rows written than two would
    traced = trace_steps.traced_source(trace_steps.KERNEL.read_text())
    assert "TRACE_GROUPS = block_m // 64" in traced and "TRACE_GROUPS = None" in traced
    res = trace_steps.analyse(buf, 4, 2, groups=3)
    assert res["qk"] == pytest.approx(6 * 60 / (6 * 300.0))
    # wgmmas in flight: [120,150], [210,260] and the last PV [300,350], shifted by 0, 100
    # and 200 cycles. All three groups at once only over [320,350], about 30 of the
    # program's 500 cycles (16-cycle bins).
    assert 0.0 < res["both_groups_in_flight"] < 0.2
    assert 0.0 < res["no_wgmma_in_flight"] < 0.5


def test_warp_skew_and_late_tiles_are_told_apart() -> None:
    # Step 0's warps end at 200, 210, 220, 250 (mean 220, last 250); step 1's first warp
    # is past the barrier and the tile's wait at 300: 30 cycles of skew (the mean warp
    # waits for the last), 50 after the last warp (the tile was late).
    g = ([(120, 150, 0, (200, 210, 220, 250)), (300, 330, 350, 400)], [(100, 110, 420, 450)])
    res = trace_steps.analyse(_buf(4, 2, [g, g]), 4, 2)
    total = 2 * 350.0
    assert res["warp_skew"] == pytest.approx(2 * 30 / total)
    assert res["after_last_warp"] == pytest.approx(2 * 50 / total)


def test_item_boundaries_are_not_counted_as_late_tiles() -> None:
    # Two items of one step each: the 500 cycles between them (stores, the next Q) are
    # per-item time, not a tile arriving late after the group's last warp.
    g = ([(120, 150, 0, 200), (720, 750, 0, 800)],
         [(100, 110, 250, 300), (700, 710, 850, 900)])
    res = trace_steps.analyse(_buf(4, 2, [g, g]), 4, 2)
    assert res["after_last_warp"] == 0.0
    assert res["warp_skew"] == 0.0
    assert res["wait_tile"] == 0.0


def test_an_anchor_found_twice_is_refused() -> None:
    """A kernel edit that repeats an anchor's text would put a stamp in the wrong place:
    the tracer refuses it instead."""
    src = trace_steps.KERNEL.read_text()
    with pytest.raises(ValueError, match="an anchor is not unique in the kernel file"):
        trace_steps.traced_source(src + "\n        for j in range(1, num_tiles):\n")
