"""Where the ping-pong forms' cycles go: SM clock stamps of every KV step.

    PYTHONPATH=. python3 scripts/trace_steps.py [--out DIR] [WORKLOAD ...]

Adds clock stamps to a copy of ``spanfill/kernels_gluon/attention.py``
(:func:`traced_source`; the checkout's own kernel file stays as it is), loads the copy
as a module of its own (``ab_gluon._load_kernels``) and runs each workload's spanfill
call once with its kernels swapped in (``backend="gluon"``: the form ``choose_form``
gives). In the copy,
each consumer warp group of the overlapped ping-pong form stamps ``%clock64`` (the SM's
cycle counter, common to the warps of a program) at four points of every KV step
``j``, into an int64 buffer passed in the LSE argument:

- ``ready``: tile ``j`` has landed (after the ring's mbarrier wait);
- ``s``: ``S_j = Q K_j^T`` has retired (the wait that leaves ``P_{j-1} V_{j-1}`` in flight);
- ``pv``: ``P_{j-1} V_{j-1}`` has retired (no PV before the first tile);
- ``end``: the softmax, the output's rescale and P's conversion are done;

and at four points of every work item: its start, the start of its KV loop (after the
stagger signal), the loop's end (its last PV retired) and the end of its stores.

Each stamp is taken by every warp of the group (lane 0 of each). ``--tensor-only``,
``--exp-fma`` and ``--turns-done`` add variants of the form (below), each traced too.
Reported per workload, over all programs and their consumer groups (two, or three in
the 192-row D=64 form; warp 0's stamps), as shares of the groups' cycles (first stamp
to last): waiting for a tile (``ready`` after the last ``end``), ``QK^T`` (``ready`` to
``s``), the rest of PV after ``S`` (``s`` to ``pv``), the softmax (``pv`` to ``end``),
and per-item time (the stagger wait, the first
tile's wait for Q, the last PV, the stores, and between items). ``wait_tile`` splits
into ``warp_skew`` (how long a warp waits, on average, for the group's last warp to
finish the step) and ``after_last_warp`` (from the last warp's end of the step to the
first warp past the barrier and the tile's mbarrier: the tile arriving late, if large).
Also, per program, the share of cycles in which no group has a wgmma in flight
(from ``ready`` to ``pv`` of each step, and the last PV): an upper bound on the tensor
cores' idle time; and the share in which every group has one
(``both_groups_in_flight``, all three in the three-group form). Only the persistent
ping-pong forms are traced: the buffer has a row per consumer group of each of the SMs'
programs, and the traced launch records how many groups a program has. Writes
``DIR/trace_steps.csv`` (the bench's columns; ``unit`` ``share``, ``cycles`` or ``ms``)
and ``DIR/trace_steps_WORKLOAD.png`` (program 0's groups over 40 steps).

The stamps cost a few instructions each, and ptxas may move them across the
instructions around them (the ``pv`` stamp of the unchanged form comes with part of the
softmax before it); the shares are the point, not cycle-exact times.
``tests/test_trace_steps.py`` compiles the traced copy for sm_90 on the CPU, so a kernel
change that moves an anchor shows there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import spanfill as sf  # noqa: E402
from _results import new_figure, quantiles, save_figure, write_rows  # noqa: E402
from ab_gluon import _load_kernels, _with_kernels  # noqa: E402
from bench.workloads import PaddedWorkload, core_workloads  # noqa: E402

KERNEL = ROOT / "spanfill" / "kernels_gluon" / "attention.py"
STEP_EVENTS = ("ready", "s", "pv", "end")
ITEM_EVENTS = ("start", "loop", "loop_end", "stored")


# The tracing copy's edits, in order: (anchor, replacement), each anchor found exactly
# once in the text the edits before it leave.
EDITS: list[tuple[str, str]] = []


def _edit(old: str, new: str) -> None:
    EDITS.append((old, new))


def _after(anchor: str, added: str) -> None:
    """Insert ``added`` right after ``anchor``."""
    _edit(anchor, anchor + added)


def _before(anchor: str, added: str) -> None:
    """Insert ``added`` right before ``anchor``."""
    _edit(anchor, added + anchor)


LIM = "TRACE_STEPS * 4"
ILIM = "TRACE_ITEMS * 4"
# 1. the trace buffer, clock read and event store
_after('''__all__ = ["attention_fwd_dense", "attention_fwd_paged"]
''', '''
# TRACING COPY (made by scripts/trace_steps.py, never the package's file): the ping-pong
# consumers write SM clock stamps (%clock64) of each KV step and work item into TRACE,
# an int64 CUDA tensor [programs * groups, TRACE_STRIDE] that the launcher passes in
# the LSE argument (launches without lse only).
TRACE = None
TRACE_GROUPS = None  # the last traced launch's consumer groups a program (set by it)
TRACE_STEPS: gl.constexpr = gl.constexpr(2048)  # KV steps recorded per consumer group
TRACE_ITEMS: gl.constexpr = gl.constexpr(128)  # work items recorded per consumer group
# each event: one stamp per warp of the group (4)
TRACE_STRIDE: gl.constexpr = gl.constexpr((2048 * 4 + 128 * 4) * 4)


@gluon.jit
def _clock(like):
    """``%clock64`` in the layout of ``like`` (the asm's one input, which it never reads)."""
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [like],
                                     dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _trace(tr, index, limit):
    """Stamp event ``index`` (< ``limit``) of this consumer group, one stamp per warp
    (its lane 0's clock); ``tr`` None: off."""
    if tr is not None:
        # The limit is in the store's mask, not a branch: Triton 3.6 (the H200's) lowered
        # the loop's last stamp away when each stamp sat in an `if index < limit` block
        # (20 clock reads in the SASS, 22 with the mask).
        lanes: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        t = gl.arange(0, 128, layout=lanes)
        gl.store(tr + index * 4 + t // 32, _clock(t), mask=((t % 32) == 0) & (index < limit))
''')
# 2. the overlapped loop takes tr; step events: tile landed, S retired, PV retired, end
_edit('''                        TURN_GROUPS: gl.constexpr = 2, q_release=None,
                        HOLD_LAST: gl.constexpr = False):
    """The KV loop with the softmax of tile''',
      '''                        TURN_GROUPS: gl.constexpr = 2, q_release=None,
                        HOLD_LAST: gl.constexpr = False, tr=None):
    """The KV loop with the softmax of tile''')
_after('''        first = ring_base % STAGES
        _wait_ready(ready, ring_base, STAGES, PAGE_SIZE)
''', f'''        _trace(tr, ring_base * 4 + 0, {LIM})
''')
_after('''        s_acc = warpgroup_mma_wait(num_outstanding=0, deps=(s_acc, ))
''', f'''        _trace(tr, ring_base * 4 + 1, {LIM})
''')
_before('''        for j in range(1, num_tiles):
''', f'''        _trace(tr, ring_base * 4 + 3, {LIM})
''')
_after('''            _wait_ready(ready, ring_base + j, STAGES, PAGE_SIZE)
''', f'''            _trace(tr, (ring_base + j) * 4 + 0, {LIM})
''')
_after('''            s_acc = warpgroup_mma_wait(num_outstanding=1, deps=(s_acc, ))
''', f'''            _trace(tr, (ring_base + j) * 4 + 1, {LIM})
''')
_after('''            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
''', f'''            _trace(tr, (ring_base + j) * 4 + 2, {LIM})
''')
_before('''        if q_release is not None:  # every QK^T of the item has retired''',
        f'''            _trace(tr, (ring_base + j) * 4 + 3, {LIM})
''')
# 3. the consumer: tr from the LSE stand-in, item events
_after('''    slot = pid * 0  # ring slots used by this program's earlier items
    q_phase = pid * 0
''', '''    tr = WS_LSE + (pid * NUM_GROUPS + WG).to(gl.int64) * TRACE_STRIDE
    tr_items = tr + TRACE_STEPS * 4 * 4
''')
_before('''                    if STAGGER and WG > 0:
                        mbarrier.wait(go_prev, q_phase)
''', f'''                    _trace(tr_items, r * 4 + 0, {ILIM})
''')
_edit('''                    acc, m_i, l_i = (_kv_loop_overlapped if OVERLAP else _kv_loop_sequential)(
                        q_half, my_q_bar, kv_len, kv_len, k_smem, v_smem, ready, empty, row0,''', f'''                    _trace(tr_items, r * 4 + 1, {ILIM})
                    acc, m_i, l_i = _kv_loop_overlapped(
                        q_half, my_q_bar, kv_len, kv_len, k_smem, v_smem, ready, empty, row0,''')
_edit('''                        TURNS == 2, NUM_GROUPS, my_q_free if EARLY_Q else None, K_STAGED)
''', f'''                        TURNS == 2, NUM_GROUPS, my_q_free if EARLY_Q else None, K_STAGED,
                        tr)
                    _trace(tr_items, r * 4 + 2, {ILIM})
''')
_after('''                                    ZERO_FILL, RETURN_LSE, NUM_SPLITS)
''', f'''                    _trace(tr_items, r * 4 + 3, {ILIM})
''')
# 4. the launcher passes TRACE as the LSE pointer
_edit('''    lse_arg = lse if lse is not None else out
''', '''    lse_arg = lse if lse is not None else out
    if TRACE is not None:
        if (lse is not None or num_splits > 1 or not (pingpong and overlap)
                or not persistent):
            raise ValueError("tracing takes the persistent overlapped ping-pong form without "
                             "lse or splits")
        global TRACE_GROUPS
        TRACE_GROUPS = block_m // 64  # (row pid * TRACE_GROUPS + WG: how to read the buffer)
        if TRACE.shape[0] < persistent * TRACE_GROUPS:  # a row per group of a program
            raise ValueError(f"the trace buffer has {TRACE.shape[0]} rows, the launch "
                             f"{persistent * TRACE_GROUPS} consumer groups")
        lse_arg = TRACE
''')


# --tensor-only: the softmax without its maxima, exponentials and sums (p = s * scale,
# alpha = 1): what the loop's wgmmas, barriers and copies take by themselves. Its output
# is wrong; it is timed, never checked.
TENSOR_ONLY = [
    ('''    return s_acc, gl.maximum(m_i, gl.max(s_acc, axis=1) * qk_scale)''',
     '''    return s_acc, m_i'''),
    ('''    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s_acc * qk_scale - m_safe[:, None])
    alpha = gl.exp2(m_i - m_safe)
    return p, alpha, l_i * alpha + gl.sum(p, axis=1)''', '''    p = s_acc * qk_scale
    return p, m_i * 0.0 + 1.0, l_i + 1.0'''),
]


# --exp-fma: every exponential of p on the FMA pipes (a cubic on the fraction, the
# integer part added to the exponent bits; relative error under 7.5e-5) instead of
# MUFU.EX2: whether the exponentials' cost is MUFU's, or any instruction's.
EXP_FMA = ('''    p = gl.exp2(s_acc * qk_scale - m_safe[:, None])''',
           '''    p = _exp2_fma(s_acc * qk_scale - m_safe[:, None])''')
EXP_FMA_HELPER = ('''@gluon.jit
def _exps_from_max(''', '''@gluon.jit
def _exp2_fma(x):
    """2^x for x <= 0 without MUFU (-inf and anything under -126 give 0)."""
    xc = gl.maximum(x, -126.0)
    t = xc + 12582912.0  # 1.5 * 2^23: rounds xc to an integer held in t's low bits
    f = xc - (t - 12582912.0)
    poly = f * 0.05517159402370453 + 0.24261096119880676
    poly = poly * f + 0.6932609677314758
    poly = poly * f + 0.9999280571937561
    bits = poly.to(gl.int32, bitcast=True) + (t.to(gl.int32, bitcast=True) << 23)
    return gl.where(x >= -126.0, bits.to(gl.float32, bitcast=True), 0.0)


@gluon.jit
def _exps_from_max(''')


# --turns-done: the registry's D=128 form with the consumer groups taking turns at the
# tensor cores (``turns`` instead of ``stagger``), each turn passed once the group's
# wgmmas have retired rather than once they are issued, so that the other group's
# wgmmas run under this group's softmax (applied after EDITS: its anchors are the
# traced text's).
TURNS_DONE = [
    ('''        _pass_turn(turn, TURN_WG, NAMED_TURNS, TURN_GROUPS)
        s_acc = warpgroup_mma_wait(num_outstanding=0, deps=(s_acc, ))
''', '''        s_acc = warpgroup_mma_wait(num_outstanding=0, deps=(s_acc, ))
        _pass_turn(turn, TURN_WG, NAMED_TURNS, TURN_GROUPS)
'''),
    ('''            _pass_turn(turn, TURN_WG, NAMED_TURNS, TURN_GROUPS)
            # wgmma groups retire in order: one left in flight is the PV just issued.
            s_acc = warpgroup_mma_wait(num_outstanding=1, deps=(s_acc, ))
            _trace(tr, (ring_base + j) * 4 + 1, TRACE_STEPS * 4)
''', '''            s_acc = warpgroup_mma_wait(num_outstanding=1, deps=(s_acc, ))
            _trace(tr, (ring_base + j) * 4 + 1, TRACE_STEPS * 4)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            _pass_turn(turn, TURN_WG, NAMED_TURNS, TURN_GROUPS)
            _trace(tr, (ring_base + j) * 4 + 2, TRACE_STEPS * 4)
'''),
    # ... so the step's softmax (and any pin store) follows the wait and the pass
    ('''            # p_op is PV's register operand: kept alive (a dependency) until PV retires.
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            _trace(tr, (ring_base + j) * 4 + 2, TRACE_STEPS * 4)
''', ""),
    ('''        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        _pass_turn(turn, TURN_WG, NAMED_TURNS, TURN_GROUPS)
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
''', '''        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        _pass_turn(turn, TURN_WG, NAMED_TURNS, TURN_GROUPS)
'''),
    ('''    if persistent < 0:
        raise ValueError(f"persistent must be a program count >= 0, got {persistent}")''',
     '''    if pingpong and overlap and persistent:
        turns, stagger = True, False
    if persistent < 0:
        raise ValueError(f"persistent must be a program count >= 0, got {persistent}")'''),
]


def traced_source(src: str, tensor_only: bool = False, exp_fma: bool = False,
                  turns_done: bool = False) -> str:
    """The kernel file's source with the stamps added (:data:`EDITS`; an anchor that is
    gone, or found more than once, means the kernel changed where the tracer hooks in)."""
    for old, new in (EDITS + (TENSOR_ONLY if tensor_only else [])
                     + ([EXP_FMA_HELPER, EXP_FMA] if exp_fma else [])
                     + (TURNS_DONE if turns_done else [])):
        if src.count(old) != 1:  # gone, or no longer pointing at one place
            where = "gone from" if old not in src else "not unique in"
            raise ValueError(f"trace_steps: an anchor is {where} the kernel file: "
                             + old.strip().splitlines()[0][:70])
        src = src.replace(old, new, 1)
    return src


def traced_kernels(workdir: Path, tensor_only: bool = False, kernel: Path = KERNEL,
                   exp_fma: bool = False, turns_done: bool = False):
    """The kernel file (``kernel``: the checkout's, or a variant's copy) with the
    stamps, loaded as its own module."""
    name = ("traced" + ("_tensor_only" if tensor_only else "") + ("_exp_fma" if exp_fma else "")
            + ("_turns_done" if turns_done else ""))
    copy = workdir / f"{name}.py"
    copy.write_text(traced_source(kernel.read_text(), tensor_only, exp_fma, turns_done))
    return _load_kernels(f"{name}={copy}")[1]


WARPS = 4  # stamps per event: one per warp of a consumer group
MAX_GROUPS = 3  # consumer groups of a program: two, or three (192-row blocks at D=64)


def group_events_by_warp(buf: np.ndarray, steps: int, items: int):
    """``buf`` [programs * 2, stride] -> per (program, group): the step stamps
    [slots, 4 events, 4 warps] and item stamps [rounds, 4, 4] that were written."""
    out = []
    for row in buf:
        st = row[:steps * 4 * WARPS].reshape(steps, 4, WARPS)
        it = row[steps * 4 * WARPS:(steps + items) * 4 * WARPS].reshape(items, 4, WARPS)
        out.append((st[st[:, 0, 0] != 0], it[it[:, 0, 0] != 0]))
    return out


def group_events(buf: np.ndarray, steps: int, items: int):
    """As :func:`group_events_by_warp`, warp 0's stamps only: [slots, 4], [rounds, 4]."""
    return [(st[:, :, 0], it[:, :, 0]) for st, it in group_events_by_warp(buf, steps, items)]


def busy_intervals(st: np.ndarray, it: np.ndarray) -> list[tuple[int, int]]:
    """When this group has a wgmma in flight: each step from ``ready`` to ``pv`` (to ``s``
    on an item's first step, which has no PV), and each item's last PV (from the last
    step's ``end`` to the loop's end)."""
    spans = [(int(r), int(p if p else s)) for r, s, p, _ in st]
    ends = st[:, 3]
    for loop_end in it[:, 2]:
        before = ends[ends <= loop_end]
        if before.size:
            spans.append((int(before.max()), int(loop_end)))
    return spans


def coverage(spans: list[tuple[int, int]], t0: int, t1: int) -> np.ndarray:
    """A per-cycle (in 16-cycle bins) 0/1 mask of ``spans`` over ``[t0, t1)``."""
    bins = np.zeros((t1 - t0) // 16 + 1, dtype=bool)
    for a, b in spans:
        bins[max(a - t0, 0) // 16:max(b - t0, 0) // 16 + 1] = True
    return bins


def analyse(buf: np.ndarray, steps: int, items: int, groups: int = 2) -> dict[str, float]:
    """The shares of :func:`main`'s table from a trace buffer ``buf`` [programs * groups,
    stride] (row ``pid * groups + g``: program ``pid``'s consumer group ``g``)."""
    per = group_events(buf, steps, items)
    shares = {k: 0.0 for k in ("wait_tile", "qk", "pv_after_s", "softmax", "stagger_wait",
                               "q_wait_first_tile", "last_pv", "stores", "between_items")}
    total = 0.0
    idle = both = 0.0
    prog_cycles = 0.0
    for p in range(len(per) // groups):
        cov = []
        members = [per[p * groups + g] for g in range(groups)]
        stamps = [np.concatenate([st.ravel(), it.ravel()]) for st, it in members]
        stamps = [s[s != 0] for s in stamps if s.size]
        if not stamps:
            continue
        t0 = int(min(s.min() for s in stamps))
        t1 = int(max(s.max() for s in stamps))
        for st, it in members:
            if not st.size:
                continue
            total += float(it[:, 3].max() - it[:, 0].min())
            # steps: ready after the previous step's end (first step of an item: after
            # the loop start, which includes waiting for Q)
            ready, s, pv, end = (st[:, k].astype(np.float64) for k in range(4))
            first = np.zeros(len(st), dtype=bool)
            for loop_start in it[:, 1]:
                after = np.nonzero(ready >= loop_start)[0]
                if after.size:
                    first[after[0]] = True
            prev_end = np.concatenate([[np.nan], end[:-1]])
            shares["wait_tile"] += float(np.nansum(np.where(first, 0, ready - prev_end)))
            shares["qk"] += float(np.sum(s - ready))
            shares["pv_after_s"] += float(np.sum(np.where(pv > 0, pv - s, 0)))
            shares["softmax"] += float(np.sum(np.where(pv > 0, end - pv, end - s)))
            for k, loop_start in enumerate(it[:, 1]):
                nxt = ready[ready >= loop_start]
                if nxt.size:
                    shares["q_wait_first_tile"] += float(nxt.min() - loop_start)
                ends = end[end <= it[k, 2]]
                if ends.size:
                    shares["last_pv"] += float(it[k, 2] - ends.max())
            shares["stagger_wait"] += float(np.sum(it[:, 1] - it[:, 0]))
            shares["stores"] += float(np.sum(it[:, 3] - it[:, 2]))
            shares["between_items"] += float(np.sum(it[1:, 0] - it[:-1, 3]))
            cov.append(coverage(busy_intervals(st, it), t0, t1))
        if len(cov) == groups:
            stacked = np.stack(cov)
            idle += float((~stacked.any(0)).sum() * 16)
            both += float(stacked.all(0).sum() * 16)
            prog_cycles += float(stacked.shape[1] * 16)
    # The warps of a group: how far apart they finish a step (skew: the others wait for
    # the last at the next step's barrier), and how long after the last one finished
    # the first got past the barrier and the tile's mbarrier (data: the tile was late).
    skew = data = 0.0
    for st, it in group_events_by_warp(buf, steps, items):
        if len(st) < 2:
            continue
        end_prev = st[:-1, 3, :].astype(np.float64)
        ready = st[1:, 0, :].astype(np.float64)
        # the next step of the same item: no item's loop starts between the two steps
        # (the item boundary's time is counted apart, as for wait_tile)
        loop_starts = it[:, 1, 0].astype(np.float64)
        contiguous = ~((loop_starts[None, :] > end_prev.max(1)[:, None])
                       & (loop_starts[None, :] <= ready.min(1)[:, None])).any(1)
        skew += float(np.sum((end_prev.max(1) - end_prev.mean(1))[contiguous]))
        data += float(np.sum((ready.min(1) - end_prev.max(1))[contiguous]))
    shares["warp_skew"] = skew
    shares["after_last_warp"] = data
    out = {k: v / total for k, v in shares.items()}
    out["no_wgmma_in_flight"] = idle / prog_cycles
    out["both_groups_in_flight"] = both / prog_cycles
    out["cycles_per_step"] = total / max(1, sum(len(st) for st, _ in per))
    return out


def plot_timeline(buf: np.ndarray, steps: int, items: int, path: Path, name: str,
                  window: int = 40, groups: int = 2) -> Path:
    """Program 0's ``groups`` consumer groups over ``window`` steps from the middle of
    its run."""
    per = group_events(buf, steps, items)[:groups]
    fig, ax = new_figure(11, 1.3 * groups)
    colors = {"wait_tile": "#bbbbbb", "qk": "#1f77b4", "pv_after_s": "#aec7e8",
              "softmax": "#d62728"}
    mid = min(len(st) for st, _ in per) // 2
    t0 = min(st[mid, 0] for st, _ in per)
    for g, (st, _) in enumerate(per):
        for ready, s, pv, end in st[mid:mid + window]:
            phases = [("qk", ready, s), ("pv_after_s", s, pv if pv else s),
                      ("softmax", pv if pv else s, end)]
            for kind, a, b in phases:
                ax.broken_barh([(a - t0, max(b - a, 1))], (g * 10, 8), color=colors[kind])
    ax.set_yticks([4 + 10 * g for g in range(groups)], [f"group {g}" for g in range(groups)])
    ax.set_xlabel("SM cycles (%clock64), program 0")
    ax.set_title(f"{name}: QK^T issued to S ready (dark blue), rest of PV (light blue), "
                 "softmax + rescale (red)", fontsize=8)
    return save_figure(fig, path)


def compile_check() -> int:
    """Compile the traced copy of the registry's D=128 form (persistent, staggered,
    overlapped ping-pong, padded batch) for sm_90 on this machine, as
    ``scripts/compile_sm90.py`` compiles every kernel case; returns how many clock reads
    its SASS has (``tests/test_trace_steps.py`` runs this without a GPU)."""
    from compile_sm90 import _packed_plan, _rand, compile_instead_of_launch
    from sass_overlap import sass_of

    with tempfile.TemporaryDirectory() as tmp:
        mod = traced_kernels(Path(tmp))
        programs = 132  # an H200's SMs: the persistent launch below, two groups a program
        mod.TRACE = torch.zeros(programs * 2, 1, dtype=torch.int64)  # (compiled, not run)
        b, s, h, d = 2, 256, 2, 128
        q, k, v = (_rand(b * s, h, d) for _ in range(3))
        plan = _packed_plan([s, s - 5], [s, s - 5], 128, False, kv_row0=[0, s])
        sink: list[dict] = []
        with compile_instead_of_launch(sink):
            mod.attention_fwd_dense(q, k, v, torch.empty_like(q), None, plan, d ** -0.5, False,
                                    zero_fill=True, block_m=128, overlap=True, pingpong=True,
                                    persistent=programs, stagger=True, warp_specialize=True)
    kernel = next(e for e in sink if e["kernel"].startswith("_attn"))
    return sum("SR_CLOCKLO" in line for line in sass_of(kernel["ptx"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--dump", type=int, default=0, metavar="N",
                        help="also save the raw stamps of the first N programs "
                             "(DIR/trace_steps_WORKLOAD.npz)")
    parser.add_argument("--kernel-file", type=Path, default=KERNEL,
                        help="trace this copy of the kernel file (a variant, as "
                             "ab_gluon.py --kernels takes) instead of the checkout's")
    parser.add_argument("--tensor-only", action="store_true",
                        help="also each workload with the softmax reduced to p = s * scale "
                             "(timed only: its output is wrong), named WORKLOAD/tensor_only")
    parser.add_argument("--exp-fma", action="store_true",
                        help="also each workload with every exponential of p on the FMA "
                             "pipes instead of MUFU, named WORKLOAD_exp_fma")
    parser.add_argument("--turns-done", action="store_true",
                        help="also each workload with turns at the tensor cores passed once "
                             "a group's wgmmas retire, named WORKLOAD_turns_done")
    parser.add_argument("--compile-check", action="store_true",
                        help="only compile the traced form for sm_90 here (no GPU) and "
                             "print its number of clock reads")
    parser.add_argument("workloads", nargs="*", default=["whole_8k", "enc_2k_d128", "few_big"])
    args = parser.parse_args()
    if args.compile_check:
        print("clock reads:", compile_check())
        return
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit("needs a Hopper (sm_90) GPU")
    device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        mods = [("", traced_kernels(Path(tmp), kernel=args.kernel_file))]
        if args.tensor_only:
            mods.append(("_tensor_only", traced_kernels(Path(tmp), tensor_only=True,
                                                        kernel=args.kernel_file)))
        if args.turns_done:
            mods.append(("_turns_done", traced_kernels(Path(tmp), turns_done=True,
                                                       kernel=args.kernel_file)))
        if args.exp_fma:
            mods.append(("_exp_fma", traced_kernels(Path(tmp), exp_fma=True,
                                                    kernel=args.kernel_file)))
        steps, items = int(mods[0][1].TRACE_STEPS), int(mods[0][1].TRACE_ITEMS)
        stride = int(mods[0][1].TRACE_STRIDE)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        for (suffix, mod), w in ((m, w) for w in core_workloads() for m in mods):
            if w.name not in args.workloads:
                continue
            t = w.make(device, torch.bfloat16)
            if isinstance(w, PaddedWorkload):
                def run(t=t, w=w):
                    return sf.padded_prefill(t.q, t.k, t.v, t.valid_lens, causal=w.causal,
                                             backend="gluon")
            else:
                def run(t=t):
                    return sf.span_prefill(t.q, t.k_cache, t.v_cache, t.layout, backend="gluon")
            traced = _with_kernels(mod, run)
            # a row per consumer group of each (persistent) program: two, or three in the
            # 192-row D=64 form (row pid * NUM_GROUPS + WG)
            mod.TRACE = torch.zeros(sms * MAX_GROUPS, stride, dtype=torch.int64, device=device)
            try:
                traced()  # compile
            except ValueError as exc:  # a form the tracer does not take (KV splits...)
                print(f"{w.name}{suffix}: not traced: {exc}", flush=True)
                mod.TRACE = None
                continue
            name = w.name + suffix
            # the traced launch's own time (stamps included), median of 10
            times = []
            for _ in range(10):
                start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                traced()
                stop.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(stop))
            mod.TRACE.zero_()
            traced()
            torch.cuda.synchronize()
            buf = mod.TRACE.cpu().numpy()
            mod.TRACE = None
            groups = int(mod.TRACE_GROUPS)  # as the traced launch recorded it
            buf = buf[:sms * groups]
            if args.dump:
                np.savez_compressed(out / f"trace_steps_{name}.npz",
                                    stamps=buf[:args.dump * groups], steps=steps, items=items,
                                    groups=groups)
            res = analyse(buf, steps, items, groups)
            res["traced_launch_ms"] = float(np.median(times))
            for metric, value in res.items():
                unit = {"cycles_per_step": "cycles", "traced_launch_ms": "ms"}.get(metric, "share")
                rows.append({"kernel": "trace_steps", "provider": "gluon_chosen",
                             "workload": name, "metric": metric, "unit": unit,
                             **quantiles([value]),
                             "note": "one traced launch; shares of the consumer groups' cycles"})
            table.append((name, res))
            plot_timeline(buf, steps, items, out / f"trace_steps_{name}.png", name,
                          groups=groups)
            print(name, {k: round(v, 3) for k, v in res.items()}, flush=True)
    print("wrote", write_rows(out / "trace_steps.csv", rows))
    keys = list(table[0][1]) if table else []
    print("\n| metric | " + " | ".join(n for n, _ in table) + " |")
    print("|---|" + "---|" * len(table))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[k]:.0f}" if k == "cycles_per_step" else f"{r[k]:.3f}"
                                       for _, r in table) + " |")


if __name__ == "__main__":
    main()
