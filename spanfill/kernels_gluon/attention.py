"""Hopper (sm_90) attention in Triton's Gluon dialect (issue 16).

Status: every form is correct on the H200 (``tests/test_gluon_gpu.py`` in the whole GPU
suite, and 5,000 fuzz examples through ``backend="gluon"`` at dc0020c): 64- or 128-row
programs (one or two warp groups), D 64/128/256, the softmax in sequence or under the
previous tile's PV (``overlap=True``), with or without a producer warp, GQA head
stacking (``stack``), split-KV (``num_splits``), dense and paged K/V
(:func:`attention_fwd_paged`). Which form runs, and where the registry takes this
family at all (span prefill at D=128 and 256, bidirectional padded batches at D=128 and
long ones at D=64, where it is faster than the portable kernel), is decided in
``spanfill/backends/gluon.py`` from ``scripts/ab_gluon.py`` runs.
Scope: dense K/V (padded and varlen prefill) and paged K/V with per-row positions (span
prefill; pages of up to 256 rows: one TMA copy per page of 8 rows or more, or per tile
of a larger page; cp.async gathers for smaller pages), fp16/bf16, one q head per
program or ``stack`` q heads of one KV head, causal or not, zero-filled padding rows,
lse. It serves the same tile plans as the portable kernel
(:class:`spanfill.layout.TilePlan`).

Structure (one warp group of 4 warps per 64 rows of a program; ``warp_specialize=True``
adds one producer warp that issues the K/V copies, ``gl.warp_specialize``):

- Q tile ``[BLOCK_M, D]`` and K/V tiles ``[BLOCK_N, D]`` come by TMA from 2-D views
  ``[rows, H * D]`` of the packed tensors, into NVMMA-swizzled shared memory; rows past
  a request's end are loaded and masked (TMA zero-fills past the tensor's end).
- K/V go through a ring of ``STAGES`` buffers, each with an mbarrier: the copy of
  tile ``j + STAGES - 1`` is issued before tile ``j`` is computed.
- ``S = Q K^T`` and ``O += P V`` are ``warpgroup_mma`` (wgmma), accumulating in
  registers; P goes to the second one from registers (no shared-memory trip).
- Online softmax in the log2 domain, as the portable kernel.

- ``overlap=True``: the next tile's QK^T and this tile's PV are issued together and
  the softmax runs while PV does (:func:`_kv_loop_overlapped`).

- ``pingpong=True``: the two warp groups of a 128-row program are separate consumer
  partitions (:func:`_pingpong_consumer`), each storing its own rows and releasing ring
  stages itself; nothing but the ring orders them (the 8-warp form's two warp groups
  meet at two 256-thread barriers every KV step). With ``overlap`` each runs the
  overlapped loop over a three-stage ring (the form the registry chooses at D=128);
  without, the in-sequence loop (D=256, where a third stage does not fit).
  ``persistent=N``: N programs (one per SM) walk the work items in rounds
  (:func:`_round_item`); the producer (:func:`_pingpong_loader`) copies the next item's
  first K/V tiles and Q while the consumers finish the last item. ``stagger``: each
  group starts an item once the one before it has run its first softmax;
  ``split_q``: each group's Q rows on their own barriers (no group waits for another to
  finish an item); ``rescale_early``: O rescaled under the QK^T wgmma (FA3's order);
  ``pin_softmax``: a scratch shared-memory store that keeps ptxas from scheduling the
  softmax after the PV wait, which it otherwise does (``scripts/sass_overlap.py``: on
  Triton 3.6 and 3.9 no exponential of the registry's D=128 loop precedes that wait, so
  the softmax never runs under this group's PV); ``pin_softmax="max"``: the same for the
  row max only (its compare chain and shuffles under PV, the exponentials after);
  ``pin_softmax="max_reload"``: the same, the maxima read back after PV's stage is
  released (so no exponential delays the release).
- ``block_m=192`` (D=64, dense K/V): three consumer groups, FA4's tile at D=64.

What FA3/FA4 add on top, for the next steps: separate K and V rings (the overlapped
loop then needs no third stage, which D=256 has no room for), a dynamic tile scheduler
(here the rounds are fixed at launch), and a split-KV merge inside the launch (here a
second launch merges). Registers and spills of the one- and two-group forms on Triton
3.6: ``scripts/ptxas_usage.py`` (none spills); three groups at 160 and 168 registers:
none overlapped, 8 bytes a thread with ``stagger`` and ``split_q``, 4 with
``rescale_early``.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

__all__ = ["attention_fwd_dense", "attention_fwd_paged"]

LOG2E = 1.4426950408889634
# Shared memory a program may take for Q and the K/V ring (the H100/H200 allow 227 KiB
# per block; the rest is left to barriers and the compiler's scratch). 224 KiB: Q and
# three stages of 128 KV rows at D=128, which ran on the H200 in every 128-row form
# (ab_gluon_tiles_h200_5a0ab1b.csv, ab_gluon_overlap_noturns_h200_ae88b2c.csv).
SHARED_MEMORY_BUDGET = 224 * 1024
LN2: gl.constexpr = gl.constexpr(0.6931471805599453)
# The launch's pin_softmax as the kernel's PIN_SOFTMAX (_kv_loop_overlapped).
_PIN_SOFTMAX = {False: 0, True: 1, "max": 2, "max_reload": 3}

# Gluon is experimental and renames things between releases: the GPU machine has
# Triton 3.6 (tma.async_copy_global_to_shared), CI 3.9 (tma.async_load).
if hasattr(gl, "barrier"):
    @gluon.jit
    def _barrier():
        gl.barrier()
else:
    @gluon.jit
    def _barrier():
        gl.thread_barrier()

if hasattr(tma, "async_load"):
    @gluon.jit
    def _tma_load(desc, coord, bar, smem):
        tma.async_load(desc, coord, bar, smem)
else:
    @gluon.jit
    def _tma_load(desc, coord, bar, smem):
        tma.async_copy_global_to_shared(desc, coord, bar, smem)

# TMA stores: tma.async_store on 3.9, tma.async_copy_shared_to_global on 3.6.
if hasattr(tma, "async_store"):
    @gluon.jit
    def _tma_store(desc, coord, smem):
        tma.async_store(desc, coord, smem)
else:
    @gluon.jit
    def _tma_store(desc, coord, smem):
        tma.async_copy_shared_to_global(desc, coord, smem)

# cp.async: async_copy.async_load on 3.9, async_copy_global_to_shared on 3.6.
if hasattr(async_copy, "async_load"):
    @gluon.jit
    def _cp_async(smem, ptrs, mask):
        async_copy.async_load(smem, ptrs, mask=mask)
else:
    @gluon.jit
    def _cp_async(smem, ptrs, mask):
        async_copy.async_copy_global_to_shared(smem, ptrs, mask=mask)


@gluon.jit
def _fill_padding(O, LSE, row0, row_end, head, stride_ot, stride_oh, stride_lt, stride_lh,
                  o_layout: gl.constexpr, dtype: gl.constexpr, BLOCK_M: gl.constexpr,
                  HEAD_DIM: gl.constexpr, RETURN_LSE: gl.constexpr):
    """Zeros (and lse -inf) on rows ``[row0, row_end)`` of one head: a run of padding."""
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    zeros = gl.zeros([BLOCK_M, HEAD_DIM], dtype, layout=o_layout)
    for r0 in range(row0, row_end, BLOCK_M):
        r = r0 + gl.arange(0, BLOCK_M, layout=row_o)
        keep = r < row_end
        gl.store(O + r.to(gl.int64)[:, None] * stride_ot + head * stride_oh + cols[None, :],
                 zeros, mask=keep[:, None])
        if RETURN_LSE:
            gl.store(LSE + r.to(gl.int64) * stride_lt + head * stride_lh,
                     gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_o), mask=keep)


@gluon.jit
def _padding_filler(TILE_REQ, TILE_ROW0, TILE_ROW_END, Q_START, Q_LEN, O, LSE, stride_ot,
                    stride_oh, stride_lt, stride_lh, num_items, dtype: gl.constexpr,
                    HEAD_DIM: gl.constexpr, NUM_Q_HEADS: gl.constexpr, STACK: gl.constexpr,
                    RETURN_LSE: gl.constexpr, FILL_WARPS: gl.constexpr):
    """The padding partition of a ping-pong program (``FILL_WARPS`` > 0): zeros and lse
    -inf on the rows of the program's padding items, the plan's entries of a sample's
    padding (the consumers skip them). It waits on nothing, so it runs through the
    program's items at once and its stores go out under the consumers' first items:
    with the consumers' warp group 0 filling them instead, they come last in the plan's
    order, where the tensor cores have nothing else to do. ``FILL_WARPS == 0``: the
    partition is there (its warps come from the producer's warp group, which is padded
    to four warps anyway) but does nothing."""
    if FILL_WARPS > 0:
        # 16-byte stores, a row of the head across HEAD_DIM // 8 threads; two passes of
        # the layout's rows an iteration (more would take registers: the partition shares
        # the producer warp's group and its count).
        COLS_T: gl.constexpr = HEAD_DIM // 8
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // COLS_T, COLS_T],
                                                [FILL_WARPS, 1], [1, 0])
        ROWS: gl.constexpr = 2 * (32 // COLS_T) * FILL_WARPS
        pid = gl.program_id(0)
        num_programs = gl.num_programs(0)
        for r in range(gl.cdiv(num_items, num_programs)):
            item = _round_item(r, pid, num_programs)
            if item < num_items:
                tile, head, split, req = _item_tile(item, TILE_REQ, NUM_Q_HEADS, STACK, 1)
                if req >= 0:
                    row0, row_end, q_start, q_stop, padding = _item_rows(
                        tile, req, TILE_ROW0, TILE_ROW_END, Q_START, Q_LEN)
                    if padding:
                        for g in gl.static_range(STACK):
                            _fill_padding(O, LSE, row0, row_end, head + g, stride_ot,
                                          stride_oh, stride_lt, stride_lh, layout, dtype, ROWS,
                                          HEAD_DIM, RETURN_LSE)


@gluon.jit
def _keep_rows(part, rows, keep, kv_layout: gl.constexpr):
    """Zero the rows of ``part`` (a shared-memory slice of a tile) from row ``keep`` on,
    in place: read through ``kv_layout``, masked, written back. ``rows``: the slice's row
    indices in ``SliceLayout(1, kv_layout)``."""
    part.store(gl.where((rows < keep)[:, None], part.load(kv_layout), 0.0))


@gluon.jit
def _zero_v_tail(v_tile, j, kv_len, BLOCK_N: gl.constexpr, num_warps: gl.constexpr):
    """Zero the rows of V tile ``j`` (positions ``j * BLOCK_N + [0, BLOCK_N)``) at or
    past ``kv_len``, before a wgmma reads the tile.

    By halves: a half wholly past ``kv_len`` is overwritten with zeros without being
    read, and only the half holding ``kv_len`` is read and masked. (The whole tile
    through registers had cost every item's last step 128 loads and stores a thread at
    D=128.)"""
    if (j + 1) * BLOCK_N > kv_len:
        # The tile reaches past the request's keys: padding (or the next request's
        # rows), which may hold NaN. p is 0 there, but 0 * NaN is NaN, so those V rows
        # are zeroed in shared memory before the PV wgmma reads them (scores need
        # nothing: masked to -inf).
        HALF: gl.constexpr = BLOCK_N // 2
        HEAD_DIM: gl.constexpr = v_tile.shape[1]
        kv_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        rows = gl.arange(0, HALF, layout=gl.SliceLayout(1, kv_layout))
        tail = kv_len - j * BLOCK_N  # the tile's rows before kv_len
        if tail <= HALF:
            _keep_rows(v_tile.slice(0, HALF), rows, tail, kv_layout)
            v_tile.slice(HALF, HALF).store(gl.zeros([HALF, HEAD_DIM], v_tile.dtype, kv_layout))
        else:
            _keep_rows(v_tile.slice(HALF, HALF), rows, tail - HALF, kv_layout)
        # The fence also orders these generic-proxy accesses before the producer's next
        # TMA copy into the stage (after this group releases it): no fence at release.
        fence_async_shared()
        _barrier()  # every warp's stores before the warp group's wgmma reads them


@gluon.jit
def _masked_row_max(s_acc, m_i, j, kv_len, valid_s, pos_s, mask_from, qk_scale,
                    s_layout: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """The first half of the online-softmax update for the scores ``s_acc`` of KV tile
    ``j``: ``(s_acc, m_new)``, the scores masked and the new row maxima (scaled).
    Tiles from ``mask_from`` on are masked (keys past ``kv_len``, past a row's position,
    rows that are not valid); the earlier ones are seen in full by every valid row and
    skip the mask's per-score compares and selects (rows that are not valid are never
    stored, and each row's state depends on its own scores only)."""
    if j >= mask_from:
        kv_pos = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = (kv_pos[None, :] < kv_len) & valid_s[:, None]
        if CAUSAL:
            visible = visible & (kv_pos[None, :] <= pos_s[:, None])
        s_acc = gl.where(visible, s_acc, float("-inf"))
    return s_acc, gl.maximum(m_i, gl.max(s_acc, axis=1) * qk_scale)


@gluon.jit
def _exps_from_max(s_acc, m_i, m_new, l_i, qk_scale):
    """The second half: ``(p, alpha, l_new)`` from the masked scores and the maxima
    before (``m_i``) and after (``m_new``) the tile; ``alpha`` rescales what was
    accumulated before."""
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s_acc * qk_scale - m_safe[:, None])
    alpha = gl.exp2(m_i - m_safe)
    return p, alpha, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _softmax_step(s_acc, m_i, l_i, j, kv_len, valid_s, pos_s, mask_from, qk_scale,
                  s_layout: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Online-softmax update for the scores ``s_acc`` of KV tile ``j``:
    ``(p, alpha, m_new, l_new)`` (:func:`_masked_row_max`, :func:`_exps_from_max`)."""
    s_acc, m_new = _masked_row_max(s_acc, m_i, j, kv_len, valid_s, pos_s, mask_from, qk_scale,
                                   s_layout, BLOCK_N, CAUSAL)
    p, alpha, l_i = _exps_from_max(s_acc, m_i, m_new, l_i, qk_scale)
    return p, alpha, m_new, l_i


@gluon.jit
def _attend_tile(q_smem, k_tile, v_tile, acc, m_i, l_i, j, kv_len, valid_s, pos_s, mask_from,
                 qk_scale, s_layout: gl.constexpr, o_layout: gl.constexpr, dtype: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                 num_warps: gl.constexpr):
    """One online-softmax step over KV tile ``j`` held in shared memory, its two wgmmas
    in sequence; returns ``(acc, m_i, l_i)``."""
    _zero_v_tail(v_tile, j, kv_len, BLOCK_N, num_warps)
    s_acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    s_acc = warpgroup_mma(q_smem, k_tile.permute((1, 0)), s_acc, use_acc=False, is_async=True)
    s_acc = warpgroup_mma_wait(num_outstanding=0, deps=(s_acc, ))
    p, alpha, m_new, l_i = _softmax_step(s_acc, m_i, l_i, j, kv_len, valid_s, pos_s, mask_from,
                                         qk_scale, s_layout, BLOCK_N, CAUSAL)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    p_op = gl.convert_layout(p.to(dtype),
                             gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    acc = warpgroup_mma(p_op, v_tile, acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    return acc, m_new, l_i


@gluon.jit
def _packed_p(p, dtype: gl.constexpr):
    """``p`` (fp32, the wgmma accumulator layout) as ``dtype``, each pair of neighbouring
    values converted by one ``cvt.rn.{bf16,f16}x2.f32`` into one 32-bit register.

    ``p.to(dtype)`` converts value by value into 16-bit registers, which the overlapped
    loop carries to the next step's PV wgmma and packs there. ptxas packs some
    partitions' pairs in swapped halves and then swaps them back before every PV
    wgmma: 32 ``PRMT`` a step, in the three-group form's consumer group 0 (the default
    partition) after it takes its turn at the tensor cores, so the other groups waited
    for it (``logs/ncu_docs_8k_d64_gluon_h200_26a1e79.log``; which partition gets them
    varies). Converted in pairs, no partition swaps.
    """
    if dtype == gl.bfloat16:
        return gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [p],
                                         dtype=gl.bfloat16, is_pure=True, pack=2)
    else:
        return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [p],
                                         dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def _wait_ready(ready, slot, STAGES: gl.constexpr, PAGE_SIZE: gl.constexpr):
    """Wait until the K/V tile of ring slot ``slot`` (the program's ``slot``-th tile, over
    all its work items) has landed in its stage. Tiles gathered by cp.async
    (pages under 8 rows) were written through the generic proxy: a proxy fence orders
    them before the wgmmas (async proxy) read the stage."""
    mbarrier.wait(ready.index(slot % STAGES), (slot // STAGES) & 1)
    if PAGE_SIZE > 0 and PAGE_SIZE < 8:
        fence_async_shared()


@gluon.jit
def _load_kv_tile(k_desc, v_desc, k_smem, v_smem, ready, j, slot, kv_row0, hk,
                  BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, bt_row, kv_len,
                  PAGE_SIZE: gl.constexpr, K_POOL, V_POOL, ROW_STRIDE: gl.constexpr,
                  COPY_WARPS: gl.constexpr):
    """Issue the TMA copies of K/V tile ``j`` into the stage of ring slot ``slot``; its
    ready barrier completes when all land.

    Dense K/V (``PAGE_SIZE`` 0): one copy each of rows ``kv_row0 + j * BLOCK_N + [0,
    BLOCK_N)`` (``bt_row`` and ``kv_len`` unused). Paged K/V: ``bt_row`` points at the
    request's block-table row, and the descriptors view the pools as
    ``[num_pages * PAGE_SIZE, Hk * D]``; one copy per page
    (or per ``BLOCK_N`` rows of a larger page), each into its rows of the stage.
    Positions at or past ``kv_len`` read page 0 (masked later, V zeroed). Pages under
    8 rows (a TMA copy cannot land inside the 8-row swizzle pattern of the stage): the
    ``COPY_WARPS`` issuing warps gather the rows with cp.async from the pools
    ``K_POOL``/``V_POOL`` (rows ``ROW_STRIDE`` elements apart), positions past
    ``kv_len`` zero-filled, and each thread's arrival on the ready barrier waits for its
    copies (the barrier counts ``32 * COPY_WARPS`` arrivals).
    """
    stage = slot % STAGES
    bar = ready.index(stage)
    if PAGE_SIZE == 0:
        mbarrier.expect(bar, 2 * k_desc.block_type.nbytes)
        _tma_load(k_desc, [kv_row0 + j * BLOCK_N, hk * HEAD_DIM], bar, k_smem.index(stage))
        _tma_load(v_desc, [kv_row0 + j * BLOCK_N, hk * HEAD_DIM], bar, v_smem.index(stage))
    elif PAGE_SIZE < 8:
        # In chunks of 8 rows per copying warp: few live pointers per thread (the producer
        # warp runs on 64 registers), and chunks start on the stage's 8-row swizzle atoms.
        CHUNK: gl.constexpr = 8 * COPY_WARPS
        cp_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [COPY_WARPS, 1], [1, 0])
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, cp_layout))
        for r0 in gl.static_range(0, BLOCK_N, CHUNK):
            pos = j * BLOCK_N + r0 + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, cp_layout))
            seen = pos < kv_len
            page = gl.load(bt_row + pos // PAGE_SIZE, mask=seen, other=0)
            row = (page * PAGE_SIZE + pos % PAGE_SIZE).to(gl.int64) * ROW_STRIDE + hk * HEAD_DIM
            _cp_async(k_smem.index(stage).slice(r0, CHUNK), K_POOL + row[:, None] + cols[None, :],
                      seen[:, None])
            _cp_async(v_smem.index(stage).slice(r0, CHUNK), V_POOL + row[:, None] + cols[None, :],
                      seen[:, None])
        async_copy.mbarrier_arrive(bar, increment_count=False)
    else:
        ROWS: gl.constexpr = PAGE_SIZE if PAGE_SIZE < BLOCK_N else BLOCK_N
        mbarrier.expect(bar, 2 * (BLOCK_N // ROWS) * k_desc.block_type.nbytes)
        for i in gl.static_range(BLOCK_N // ROWS):
            pos0 = j * BLOCK_N + i * ROWS
            page = gl.load(bt_row + pos0 // PAGE_SIZE, mask=pos0 < kv_len, other=0)
            row = page * PAGE_SIZE + pos0 % PAGE_SIZE
            _tma_load(k_desc, [row, hk * HEAD_DIM], bar, k_smem.index(stage).slice(i * ROWS, ROWS))
            _tma_load(v_desc, [row, hk * HEAD_DIM], bar, v_smem.index(stage).slice(i * ROWS, ROWS))


@gluon.jit
def _item_tile(item, TILE_REQ, NUM_Q_HEADS: gl.constexpr, STACK: gl.constexpr,
               NUM_SPLITS: gl.constexpr):
    """Work item ``item`` of a launch (one program's, or one of a persistent program's):
    ``(tile, head, split, req)``. Items run tile by tile (longest KV range first, as the
    plan orders the tiles), the ``NUM_Q_HEADS // STACK`` head stacks of a tile next to
    each other, and the KV splits of one (tile, head stack) next to each other.
    ``req < 0``: an unused tile slot of the plan."""
    if NUM_SPLITS > 1:
        split = item % NUM_SPLITS
        item = item // NUM_SPLITS
    else:
        split = 0
    if STACK == 1:
        tile = item // NUM_Q_HEADS
        head = item % NUM_Q_HEADS
    else:
        tile = item // (NUM_Q_HEADS // STACK)
        head = (item % (NUM_Q_HEADS // STACK)) * STACK
    req = gl.load(TILE_REQ + tile)
    return tile, head, split, req


@gluon.jit
def _item_rows(tile, req, TILE_ROW0, TILE_ROW_END, Q_START, Q_LEN):
    """The rows of a work item's tile and its request's valid rows:
    ``(row0, row_end, q_start, q_stop, padding)`` (valid: ``q_start <= row < q_stop``;
    ``padding``: the tile has no valid row, so it is zero-filled or has nothing to do).
    ``padding`` is a runtime value even where no tile can be padding: Triton 3.6 fails
    to lower the persistent item loop with a compile-time False there."""
    row0 = gl.load(TILE_ROW0 + tile)
    row_end = gl.load(TILE_ROW_END + tile)
    q_start = gl.load(Q_START + req)
    q_stop = q_start + gl.load(Q_LEN + req)
    padding = (row_end <= q_start) | (row0 >= q_stop)
    return row0, row_end, q_start, q_stop, padding


@gluon.jit
def _item_kv(req, row0, row_end, q_start, q_stop, split, KV_ROW0, KV_LEN, POSITIONS,
             HAS_POSITIONS: gl.constexpr, bt_base, bt_stride, CAUSAL: gl.constexpr,
             BLOCK_Q: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr,
             NUM_SPLITS: gl.constexpr, NUM_WARPS: gl.constexpr):
    """The KV range of a work item: ``(kv_len, kv_row0, bt_row, num_tiles, kv_shift,
    mask_from)``.

    Causal: up to the last valid row's position. Keys before the first valid row's
    position (and before ``kv_len``) are seen by every valid row, so their tiles, those
    before ``mask_from``, need no masks. ``bt_row``: the request's block-table row
    (``bt_base`` itself for dense K/V). Split-KV: the item takes the ``split``-th run of
    the tile's KV steps, in units of whole pages (so the run starts on a page) and seen
    from the run's first position ``kv_shift``: the loops run unchanged over positions
    shifted by it."""
    kv_len = gl.load(KV_LEN + req)
    kv_row0 = gl.load(KV_ROW0 + req)
    if PAGE_SIZE == 0:
        bt_row = bt_base
    else:
        bt_row = bt_base + req.to(gl.int64) * bt_stride
    if CAUSAL:
        if not HAS_POSITIONS:
            kv_end = gl.minimum(gl.minimum(row_end, q_stop) - q_start, kv_len)
            seen_end = gl.minimum(gl.maximum(row0, q_start) - q_start + 1, kv_len)
        else:
            rows_v = row0 + gl.arange(0, BLOCK_Q,
                                      layout=gl.BlockedLayout([1], [32], [NUM_WARPS], [0]))
            valid_v = (rows_v < row_end) & (rows_v >= q_start) & (rows_v < q_stop)
            pos_v = gl.load(POSITIONS + rows_v, mask=valid_v, other=-1)
            kv_end = gl.minimum(gl.max(pos_v, axis=0) + 1, kv_len)
            seen_end = gl.minimum(gl.min(gl.where(valid_v, pos_v, kv_len), axis=0) + 1, kv_len)
    else:
        kv_end = kv_len
        seen_end = kv_len
    num_tiles = gl.cdiv(gl.maximum(kv_end, 0), BLOCK_N)
    if NUM_SPLITS > 1:
        UNIT: gl.constexpr = PAGE_SIZE // BLOCK_N if PAGE_SIZE > BLOCK_N else 1
        per_split = gl.cdiv(gl.cdiv(num_tiles, UNIT), NUM_SPLITS) * UNIT
        first = gl.minimum(split * per_split, num_tiles)
        num_tiles = gl.minimum(first + per_split, num_tiles) - first
        kv_shift = first * BLOCK_N
        kv_len = kv_len - kv_shift
        kv_row0 = kv_row0 + kv_shift
        if PAGE_SIZE != 0:
            bt_row = bt_row + kv_shift // PAGE_SIZE
    else:
        kv_shift = 0
    mask_from = gl.maximum(seen_end - kv_shift, 0) // BLOCK_N
    return kv_len, kv_row0, bt_row, num_tiles, kv_shift, mask_from


@gluon.jit
def _load_q(q_desc, q_smem, q_bar, row0, head, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr,
            STACK: gl.constexpr):
    """TMA copies of a work item's Q block: ``STACK`` heads, each ``[BLOCK_Q, D]`` into its
    rows of the block; ``q_bar`` completes when they land."""
    if q_desc.block_type.shape[0] == STACK * BLOCK_Q:  # the whole block in one box
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [row0, head * HEAD_DIM], q_bar, q_smem)
    else:
        _load_q_rows(q_desc, q_smem, q_bar, row0, head, 0, STACK * BLOCK_Q, HEAD_DIM, BLOCK_Q)


@gluon.jit
def _load_q_rows(q_desc, q_smem, q_bar, row0, head, FIRST: gl.constexpr, ROWS: gl.constexpr,
                 HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr):
    """TMA copies of block rows ``[FIRST, FIRST + ROWS)`` of a work item's Q block (block
    row ``r``: token ``r % BLOCK_Q`` of head ``head + r // BLOCK_Q``), in boxes of the
    descriptor's rows (``BLOCK_Q`` or less); ``q_bar`` completes when they land."""
    BOX: gl.constexpr = q_desc.block_type.shape[0]
    mbarrier.expect(q_bar, (ROWS // BOX) * q_desc.block_type.nbytes)
    for g in gl.static_range(ROWS // BOX):
        _tma_load(q_desc, [row0 + (FIRST + g * BOX) % BLOCK_Q,
                           (head + (FIRST + g * BOX) // BLOCK_Q) * HEAD_DIM], q_bar,
                  q_smem.slice(FIRST + g * BOX, BOX))


@gluon.jit
def _round_item(r, pid, num_programs):
    """The work item of a persistent program ``pid`` in round ``r``: rounds of
    ``num_programs`` items, each round walked in the other direction (so that, items
    coming longest first, no program takes the longest of every round)."""
    odd = r % 2
    return r * num_programs + pid + odd * (num_programs - 1 - 2 * pid)


@gluon.jit
def _initial_state(row0, row_end, q_start, q_stop, s_layout: gl.constexpr,
                   o_layout: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                   POSITIONS, HAS_POSITIONS: gl.constexpr, BLOCK_Q: gl.constexpr, kv_shift,
                   ROW_OFFSET: gl.constexpr):
    """The tile's rows (which are real, their positions: ``POSITIONS[row]``, or the row's
    index in its request) and the empty softmax state: ``(valid_s, pos_s, m_i, l_i, acc)``.
    With ``BLOCK_Q < BLOCK_M`` the block stacks q heads: block row ``r`` is token
    ``r % BLOCK_Q`` of head ``r // BLOCK_Q``. Positions are counted from ``kv_shift``
    (a KV split's first position; 0 without splits). ``ROW_OFFSET``: the first block row
    these ``BLOCK_M`` rows are (a ping-pong warp group's half of the block; else 0)."""
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    if BLOCK_Q == BLOCK_M and ROW_OFFSET == 0:
        rows_s = row0 + gl.arange(0, BLOCK_M, layout=row_s)
    elif ROW_OFFSET == 0:
        rows_s = row0 + gl.arange(0, BLOCK_M, layout=row_s) % BLOCK_Q
    else:
        rows_s = row0 + (ROW_OFFSET + gl.arange(0, BLOCK_M, layout=row_s)) % BLOCK_Q
    valid_s = (rows_s < row_end) & (rows_s >= q_start) & (rows_s < q_stop)
    if not HAS_POSITIONS:
        pos_s = gl.where(valid_s, rows_s - q_start, -1)
    else:
        pos_s = gl.load(POSITIONS + rows_s, mask=valid_s, other=-1)
    pos_s = pos_s - kv_shift
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    return valid_s, pos_s, m_i, l_i, acc


@gluon.jit
def _kv_loader(k_desc, v_desc, k_smem, v_smem, ready, empty, kv_row0, hk, num_tiles,
               BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
               bt_row, kv_len, PAGE_SIZE: gl.constexpr, k_pool, v_pool,
               ROW_STRIDE: gl.constexpr, first, ring_base):
    """Producer partition (one warp): copies of K/V tiles ``[first, num_tiles)`` into the
    ring, each stage refilled once the consumer has released it. ``ring_base``: the ring
    slots the program used before (by its earlier work items; 0 for its first)."""
    for j in range(first, num_tiles):
        slot = ring_base + j
        # A fresh mbarrier counts as having completed phase 1: the first round of
        # stages is free without any release.
        mbarrier.wait(empty.index(slot % STAGES), ((slot // STAGES) & 1) ^ 1)
        _load_kv_tile(k_desc, v_desc, k_smem, v_smem, ready, j, slot, kv_row0, hk, BLOCK_N,
                      HEAD_DIM, STAGES, bt_row, kv_len, PAGE_SIZE, k_pool, v_pool, ROW_STRIDE, 1)


@gluon.jit
def _kv_loop_sequential(q_smem, q_bar, k_desc, v_desc, k_smem, v_smem, ready, empty, row0,
                        row_end, q_start, q_stop, kv_row0, hk, kv_len, num_tiles, mask_from,
                        qk_scale, s_layout: gl.constexpr, o_layout: gl.constexpr,
                        dtype: gl.constexpr,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                        STAGES: gl.constexpr, CAUSAL: gl.constexpr, PRODUCER: gl.constexpr,
                        num_warps: gl.constexpr, POSITIONS, HAS_POSITIONS: gl.constexpr,
                        bt_row, PAGE_SIZE: gl.constexpr, BLOCK_Q: gl.constexpr, kv_shift,
                        k_pool, v_pool, ROW_STRIDE: gl.constexpr, ROW_OFFSET: gl.constexpr,
                        ring_base, q_phase, stagger_bar=None, turn=None,
                        TURN_WG: gl.constexpr = 0, RESCALE_EARLY: gl.constexpr = False,
                        PIN_SOFTMAX: gl.constexpr = False, NAMED_TURNS: gl.constexpr = False,
                        TURN_GROUPS: gl.constexpr = 2, q_release=None,
                        HOLD_LAST: gl.constexpr = False):
    """The KV loop with each tile's two wgmmas in sequence; returns ``(acc, m_i, l_i)``.

    ``PRODUCER``: a producer warp copies the tiles and this loop (the consumer partition)
    releases each stage after its wgmmas. Otherwise the warp group pipelines the copies
    itself: the copy of tile ``j + STAGES - 1`` is issued before tile ``j`` is computed,
    into the stage freed at step ``j - 1``. Same arguments as :func:`_kv_loop_overlapped`
    (``stagger_bar``: arrived on after the first tile; no ``turn``, ``RESCALE_EARLY`` or
    ``PIN_SOFTMAX``: they are for the overlapped loop, and ``NAMED_TURNS`` and
    ``TURN_GROUPS`` are read only with a ``turn``).
    """
    gl.static_assert(turn is None, "turns are for the overlapped loop")
    gl.static_assert(not RESCALE_EARLY, "RESCALE_EARLY is for the overlapped loop")
    gl.static_assert(not PIN_SOFTMAX, "PIN_SOFTMAX is for the overlapped loop")
    gl.static_assert(q_release is None, "q_release (early_q_release) is for the overlapped loop")
    gl.static_assert(not HOLD_LAST, "HOLD_LAST (the K-stage TMA store) is for the overlapped loop")
    if not PRODUCER:
        for t in gl.static_range(STAGES - 1):
            if t < num_tiles:
                _load_kv_tile(k_desc, v_desc, k_smem, v_smem, ready, t, ring_base + t, kv_row0,
                              hk, BLOCK_N, HEAD_DIM, STAGES, bt_row, kv_len, PAGE_SIZE, k_pool,
                              v_pool, ROW_STRIDE, num_warps)
    valid_s, pos_s, m_i, l_i, acc = _initial_state(row0, row_end, q_start, q_stop, s_layout,
                                                   o_layout, BLOCK_M, HEAD_DIM, POSITIONS,
                                                   HAS_POSITIONS, BLOCK_Q, kv_shift,
                                                   ROW_OFFSET)
    mbarrier.wait(q_bar, phase=q_phase)
    for j in range(num_tiles):
        if not PRODUCER:
            if j + STAGES - 1 < num_tiles:
                _load_kv_tile(k_desc, v_desc, k_smem, v_smem, ready, j + STAGES - 1,
                              ring_base + j + STAGES - 1, kv_row0, hk, BLOCK_N, HEAD_DIM,
                              STAGES, bt_row, kv_len, PAGE_SIZE, k_pool, v_pool, ROW_STRIDE,
                              num_warps)
        stage = (ring_base + j) % STAGES
        _wait_ready(ready, ring_base + j, STAGES, PAGE_SIZE)
        acc, m_i, l_i = _attend_tile(q_smem, k_smem.index(stage), v_smem.index(stage), acc, m_i,
                                     l_i, j, kv_len, valid_s, pos_s, mask_from, qk_scale,
                                     s_layout, o_layout, dtype, BLOCK_M, BLOCK_N, CAUSAL,
                                     num_warps)
        if PRODUCER:
            # The wgmmas reading this stage are done (waited in _attend_tile); a zeroed V
            # tail was fenced in _zero_v_tail, so the release needs no proxy fence.
            mbarrier.arrive(empty.index(stage), count=1)
        if stagger_bar is not None:
            if j == 0:  # (as in _kv_loop_overlapped: after the first tile)
                mbarrier.arrive(stagger_bar, count=1)
    return acc, m_i, l_i


@gluon.jit
def _named_barrier(WG: gl.constexpr, ARRIVE: gl.constexpr):
    """``bar.sync`` (``ARRIVE`` False) or ``bar.arrive`` on the hardware named barrier of
    consumer group ``WG``'s turn (barrier ``10 + WG``), counted over 256 threads: the
    group that waits and the one that hands it the turn (FA3/FA4's warp scheduler
    barriers). Triton's own partitions use barriers 0 to 2 here. One element per thread,
    so each thread executes the instruction once."""
    lanes: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    x = gl.full([128], 0, gl.int32, lanes)
    if ARRIVE:
        if WG == 0:
            gl.inline_asm_elementwise("bar.arrive 10, 256; mov.u32 $0, $1;", "=r,r", [x],
                                      dtype=gl.int32, is_pure=False, pack=1)
        elif WG == 1:
            gl.inline_asm_elementwise("bar.arrive 11, 256; mov.u32 $0, $1;", "=r,r", [x],
                                      dtype=gl.int32, is_pure=False, pack=1)
        else:
            gl.inline_asm_elementwise("bar.arrive 12, 256; mov.u32 $0, $1;", "=r,r", [x],
                                      dtype=gl.int32, is_pure=False, pack=1)
    else:
        if WG == 0:
            gl.inline_asm_elementwise("bar.sync 10, 256; mov.u32 $0, $1;", "=r,r", [x],
                                      dtype=gl.int32, is_pure=False, pack=1)
        elif WG == 1:
            gl.inline_asm_elementwise("bar.sync 11, 256; mov.u32 $0, $1;", "=r,r", [x],
                                      dtype=gl.int32, is_pure=False, pack=1)
        else:
            gl.inline_asm_elementwise("bar.sync 12, 256; mov.u32 $0, $1;", "=r,r", [x],
                                      dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _take_turn(turn, WG: gl.constexpr, count, NAMED: gl.constexpr = False):
    """Wait for warp group ``WG``'s turn number ``count`` at the tensor cores (``turn``:
    one mbarrier per group, or None: no turns). Group 0 goes first: a fresh barrier
    counts as having completed phase 1."""
    if turn is not None:
        if NAMED:
            _named_barrier(WG, False)
        else:
            mbarrier.wait(turn.index(WG), (count + 1 - WG) & 1)


@gluon.jit
def _pass_turn(turn, WG: gl.constexpr, NAMED: gl.constexpr = False,
               GROUPS: gl.constexpr = 2):
    """Hand the turn to the next warp group (of ``GROUPS``, in a ring; mbarriers: two)
    once this group's wgmmas are issued."""
    if turn is not None:
        if NAMED:
            _named_barrier((WG + 1) % GROUPS, True)
        else:
            mbarrier.arrive(turn.index(1 - WG), count=1)


@gluon.jit
def _kv_loop_overlapped(q_smem, q_bar, k_desc, v_desc, k_smem, v_smem, ready, empty, row0,
                        row_end, q_start, q_stop, kv_row0, hk, kv_len, num_tiles, mask_from,
                        qk_scale, s_layout: gl.constexpr, o_layout: gl.constexpr,
                        dtype: gl.constexpr,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                        STAGES: gl.constexpr, CAUSAL: gl.constexpr, PRODUCER: gl.constexpr,
                        num_warps: gl.constexpr, POSITIONS, HAS_POSITIONS: gl.constexpr,
                        bt_row, PAGE_SIZE: gl.constexpr, BLOCK_Q: gl.constexpr, kv_shift,
                        k_pool, v_pool, ROW_STRIDE: gl.constexpr, ROW_OFFSET: gl.constexpr,
                        ring_base, q_phase, stagger_bar=None, turn=None,
                        TURN_WG: gl.constexpr = 0, RESCALE_EARLY: gl.constexpr = False,
                        PIN_SOFTMAX: gl.constexpr = False, NAMED_TURNS: gl.constexpr = False,
                        TURN_GROUPS: gl.constexpr = 2, q_release=None,
                        HOLD_LAST: gl.constexpr = False):
    """The KV loop with the softmax of tile ``j`` under the tensor cores' PV of tile
    ``j - 1``: step ``j`` issues ``S_j = Q K_j^T`` and ``O += P_{j-1} V_{j-1}`` together,
    waits for ``S_j`` only, runs the softmax while PV runs, then waits for PV and
    rescales ``O`` (FA3's intra-warpgroup overlap). Returns ``(acc, m_i, l_i)``.

    ``PRODUCER``: a producer warp copies the tiles and this loop releases each stage
    (``empty``) once PV has read it; otherwise this loop issues the copies itself, the
    copy of tile ``j - 1 + STAGES`` into the stage PV of tile ``j - 1`` has just left.

    ``q_smem`` holds these ``BLOCK_M`` rows, which are block rows from ``ROW_OFFSET`` (a
    ping-pong warp group's half of the block; else 0). ``stagger_bar``: an mbarrier to
    arrive on after the first tile's softmax (the staggered ping-pong form), or None.
    ``turn`` (FA3's ping-pong between two consumer groups, ``TURN_WG`` this one): each
    step's wgmmas are issued in this group's turn, which passes to the other group once
    they are issued, so one group's softmax runs under the other's wgmmas. Both groups
    make ``num_tiles + 1`` turns an item; ``ring_base + q_phase`` has the parity of the
    turns made before. Without ``PRODUCER`` the loop
    reads the descriptors and the page arguments; with it they may be stand-ins.

    ``RESCALE_EARLY`` (FA3's order): ``O`` is rescaled by the last softmax's ``alpha``
    between issuing ``S_j`` and issuing ``P_{j-1} V_{j-1}``, so the multiply runs under the
    QK^T wgmma; otherwise it runs after PV has retired, while this group's tensor-core
    work is drained.

    ``PIN_SOFTMAX``: each step stores the row sums ``l_i`` to a scratch shared-memory row
    before waiting for PV (and tile 0 before the stagger signal, which ptxas otherwise
    hoists above the first softmax: the second group then starts after the first QK^T
    only), and never reads them back. Without it ptxas (Triton 3.6)
    schedules the whole softmax after the PV wait, so this group's softmax runs after its
    PV instead of under it: in the SASS of the D=128 ping-pong form every ``MUFU.EX2``
    of the loop follows ``WARPGROUP.DEPBAR.LE gsb0, 0x0``. ptxas keeps a shared-memory
    store ahead of the wait (the wgmma reads shared memory), and the store needs every
    exponential, so with it they all come before the wait. ``PIN_SOFTMAX == 2`` (the
    launch's ``pin_softmax="max"``) stores the row maxima instead: only the max (a chain
    of compares and two shuffles a row, which the exponentials wait for) moves ahead of
    the wait, and ptxas leaves the exponentials after it. But it puts some of them (9-12
    in the SASS of the span and three-group forms) between the PV wait and the release
    of PV's ring stage, which delays the producer's next copy into it.
    ``PIN_SOFTMAX == 3`` (``pin_softmax="max_reload"``) stores the maxima there too and
    reads them back after the release: the exponentials wait for the load.

    ``q_release``: an mbarrier to arrive on once the item's last QK^T has retired (or, with
    no tile, once Q has landed), or None. PV reads no Q, so the producer can copy the next
    item's Q under this item's last softmax, PV and epilogue (FA3 releases Q there too).

    ``HOLD_LAST`` (with ``PRODUCER``): the stage of the item's last tile is not released
    here; the caller stages its output rows in that K tile and releases it after the
    store (the TMA store with ``q_release``, :func:`_pingpong_consumer`).
    """
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    if PIN_SOFTMAX:  # written; read back by PIN_SOFTMAX == 3 only (see above)
        pin = gl.allocate_shared_memory(gl.float32, [BLOCK_M],
                                        gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    if not PRODUCER:
        # Every stage is free at the start; each later copy goes into the stage the PV
        # of tile j - 1 has just left (tile j - 1 + STAGES, at step j).
        for t in gl.static_range(STAGES):
            if t < num_tiles:
                _load_kv_tile(k_desc, v_desc, k_smem, v_smem, ready, t, ring_base + t, kv_row0,
                              hk, BLOCK_N, HEAD_DIM, STAGES, bt_row, kv_len, PAGE_SIZE, k_pool,
                              v_pool, ROW_STRIDE, num_warps)
    valid_s, pos_s, m_i, l_i, acc = _initial_state(row0, row_end, q_start, q_stop, s_layout,
                                                   o_layout, BLOCK_M, HEAD_DIM, POSITIONS,
                                                   HAS_POSITIONS, BLOCK_Q, kv_shift,
                                                   ROW_OFFSET)
    mbarrier.wait(q_bar, phase=q_phase)
    if num_tiles > 0:
        # Tile 0: scores and softmax; its PV is issued with the next tile's scores.
        first = ring_base % STAGES
        _wait_ready(ready, ring_base, STAGES, PAGE_SIZE)
        _zero_v_tail(v_smem.index(first), 0, kv_len, BLOCK_N, num_warps)
        turns = ring_base + q_phase
        s_acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        _take_turn(turn, TURN_WG, turns, NAMED_TURNS)
        s_acc = warpgroup_mma(q_smem, k_smem.index(first).permute((1, 0)), s_acc,
                              use_acc=False, is_async=True)
        _pass_turn(turn, TURN_WG, NAMED_TURNS, TURN_GROUPS)
        s_acc = warpgroup_mma_wait(num_outstanding=0, deps=(s_acc, ))
        p, alpha, m_i, l_i = _softmax_step(s_acc, m_i, l_i, 0, kv_len, valid_s, pos_s, mask_from,
                                           qk_scale, s_layout, BLOCK_N, CAUSAL)
        if PIN_SOFTMAX == 1 and stagger_bar is not None:
            # The same store keeps ptxas from hoisting the stagger signal above the first
            # softmax (an mbarrier arrive orders the stores before it, not the arithmetic).
            pin.store(l_i)
        if stagger_bar is not None:
            # The other consumer group starts now: its first QK^T and softmax run under
            # this group's steps instead of beside them.
            mbarrier.arrive(stagger_bar, count=1)
        p_op = gl.convert_layout(_packed_p(p, dtype), p_layout)
        for j in range(1, num_tiles):
            stage = (ring_base + j) % STAGES
            prev = (ring_base + j - 1) % STAGES
            _wait_ready(ready, ring_base + j, STAGES, PAGE_SIZE)
            _zero_v_tail(v_smem.index(stage), j, kv_len, BLOCK_N, num_warps)
            s_acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
            _take_turn(turn, TURN_WG, turns + j, NAMED_TURNS)
            s_acc = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s_acc,
                                  use_acc=False, is_async=True)
            if RESCALE_EARLY:  # alpha of tile j - 1's softmax, before its PV adds on
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            _pass_turn(turn, TURN_WG, NAMED_TURNS, TURN_GROUPS)
            # wgmma groups retire in order: one left in flight is the PV just issued.
            s_acc = warpgroup_mma_wait(num_outstanding=1, deps=(s_acc, ))
            if PIN_SOFTMAX == 3:  # the row max before the PV wait, read back after it
                s_acc, m_new = _masked_row_max(s_acc, m_i, j, kv_len, valid_s, pos_s,
                                               mask_from, qk_scale, s_layout, BLOCK_N, CAUSAL)
                pin.store(m_new)
            else:
                p, alpha, m_i, l_i = _softmax_step(s_acc, m_i, l_i, j, kv_len, valid_s, pos_s,
                                                   mask_from, qk_scale, s_layout, BLOCK_N,
                                                   CAUSAL)
                if PIN_SOFTMAX == 2:  # the row max before the PV wait
                    pin.store(m_i)
                elif PIN_SOFTMAX:  # the softmax before the PV wait
                    pin.store(l_i)
            # p_op is PV's register operand: kept alive (a dependency) until PV retires.
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            if PRODUCER:
                # No proxy fence: the stage was read by wgmmas only (async proxy, like the
                # producer's copies), or its V tail zeroed and fenced in _zero_v_tail.
                # (A fence here put a MEMBAR.ALL.CTA between every PV wait and the next
                # QK^T of the group.)
                mbarrier.arrive(empty.index(prev), count=1)
            elif j - 1 + STAGES < num_tiles:
                _load_kv_tile(k_desc, v_desc, k_smem, v_smem, ready, j - 1 + STAGES,
                              ring_base + j - 1 + STAGES, kv_row0, hk, BLOCK_N, HEAD_DIM,
                              STAGES, bt_row, kv_len, PAGE_SIZE, k_pool, v_pool, ROW_STRIDE,
                              num_warps)
            if PIN_SOFTMAX == 3:
                # Read back after the release: the exponentials depend on the load, so
                # ptxas cannot put them between the PV wait and the release.
                m_new = pin.load(gl.SliceLayout(1, s_layout))
                p, alpha, l_i = _exps_from_max(s_acc, m_i, m_new, l_i, qk_scale)
                m_i = m_new
            if not RESCALE_EARLY:
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = gl.convert_layout(_packed_p(p, dtype), p_layout)
        if q_release is not None:  # every QK^T of the item has retired
            mbarrier.arrive(q_release, count=1)
        last = (ring_base + num_tiles - 1) % STAGES
        _take_turn(turn, TURN_WG, turns + num_tiles, NAMED_TURNS)
        if RESCALE_EARLY:
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        _pass_turn(turn, TURN_WG, NAMED_TURNS, TURN_GROUPS)
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        if PRODUCER and not HOLD_LAST:
            mbarrier.arrive(empty.index(last), count=1)
    elif q_release is not None:
        mbarrier.arrive(q_release, count=1)
    return acc, m_i, l_i


@gluon.jit
def _normalized_rows(acc, m_i, l_i, row0, row_end, q_start, q_stop, head,
                     o_layout: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_Q: gl.constexpr,
                     STACK: gl.constexpr, ROW_OFFSET: gl.constexpr):
    """``BLOCK_M`` rows of the block from block row ``ROW_OFFSET``, normalised:
    ``(out, lse, rows_o, heads_o, valid_o)``; rows that are not valid, or saw no key,
    give 0 and lse -inf."""
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    ONE_HEAD: gl.constexpr = STACK == 1 and ROW_OFFSET == 0
    if ONE_HEAD:  # one q head: its row offsets stay scalar
        rows_o = row0 + gl.arange(0, BLOCK_M, layout=row_o)
        heads_o = head
    else:
        block_rows = ROW_OFFSET + gl.arange(0, BLOCK_M, layout=row_o)
        rows_o = row0 + block_rows % BLOCK_Q
        heads_o = head + block_rows // BLOCK_Q
    valid_o = (rows_o < row_end) & (rows_o >= q_start) & (rows_o < q_stop)
    l_o = gl.convert_layout(l_i, row_o)
    seen = valid_o & (l_o != 0.0)
    out = acc / gl.where(seen, l_o, 1.0)[:, None]
    out = gl.where(seen[:, None], out, 0.0)
    m_o = gl.convert_layout(m_i, row_o)
    lse = gl.where(seen, (m_o + gl.log2(gl.where(seen, l_o, 1.0))) * LN2, float("-inf"))
    return out, lse, rows_o, heads_o, valid_o


@gluon.jit
def _store_rows(acc, m_i, l_i, O, LSE, WS_O, WS_LSE, ws_split, ws_lse_split, split, row0,
                row_end, q_start, q_stop, head, stride_ot, stride_oh, stride_lt, stride_lh,
                o_layout: gl.constexpr, dtype: gl.constexpr, BLOCK_M: gl.constexpr,
                HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr, STACK: gl.constexpr,
                ROW_OFFSET: gl.constexpr, NUM_Q_HEADS: gl.constexpr, ZERO_FILL: gl.constexpr,
                RETURN_LSE: gl.constexpr, NUM_SPLITS: gl.constexpr,
                STORE_O: gl.constexpr = True):
    """Normalise and store ``BLOCK_M`` rows of the block from block row ``ROW_OFFSET``:
    ``out`` (and lse), or with split-KV this split's fp32 state into the workspace (for
    the merge launch that follows). The epilogue of every form: the whole block, or a
    ping-pong warp group's half. ``STORE_O`` False: lse only (the rows went out by TMA:
    :func:`_pingpong_consumer`)."""
    out, lse, rows_o, heads_o, valid_o = _normalized_rows(
        acc, m_i, l_i, row0, row_end, q_start, q_stop, head, o_layout, BLOCK_M, BLOCK_Q, STACK,
        ROW_OFFSET)
    ONE_HEAD: gl.constexpr = STACK == 1 and ROW_OFFSET == 0
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    store_rows = (rows_o < row_end) if ZERO_FILL else valid_o
    if NUM_SPLITS > 1:
        at = rows_o.to(gl.int64) * NUM_Q_HEADS + heads_o
        gl.store(WS_O + split * ws_split + at[:, None] * HEAD_DIM + cols_o[None, :], out,
                 mask=store_rows[:, None])
        gl.store(WS_LSE + split * ws_lse_split + at, lse, mask=store_rows)
    else:
        if ONE_HEAD:
            ptrs = (O + rows_o.to(gl.int64)[:, None] * stride_ot + head * stride_oh
                    + cols_o[None, :])
        else:
            ptrs = (O + rows_o.to(gl.int64)[:, None] * stride_ot + heads_o[:, None] * stride_oh
                    + cols_o[None, :])
        if STORE_O:
            gl.store(ptrs, out.to(dtype), mask=store_rows[:, None])
        if RETURN_LSE:
            gl.store(LSE + rows_o.to(gl.int64) * stride_lt + heads_o * stride_lh, lse,
                     mask=store_rows)


@gluon.jit
def _pingpong_consumer(WG: gl.constexpr, q_smem, q_bar, q_free, stagger_bar, turn, k_smem,
                       v_smem, ready, empty,
                       TILE_REQ, TILE_ROW0, TILE_ROW_END, Q_START, Q_LEN, KV_ROW0, KV_LEN,
                       POSITIONS, bt_base, bt_stride, num_items, qk_scale, O, LSE, WS_O,
                       WS_LSE, ws_split, ws_lse_split, stride_ot, stride_oh, stride_lt,
                       stride_lh, dtype: gl.constexpr, GROUP_ROWS: gl.constexpr,
                       BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                       CAUSAL: gl.constexpr, HAS_POSITIONS: gl.constexpr,
                       PAGE_SIZE: gl.constexpr, BLOCK_Q: gl.constexpr, STACK: gl.constexpr,
                       NUM_Q_HEADS: gl.constexpr, ZERO_FILL: gl.constexpr,
                       RETURN_LSE: gl.constexpr, NUM_SPLITS: gl.constexpr,
                       OVERLAP: gl.constexpr, STAGGER: gl.constexpr, TURNS: gl.constexpr,
                       SPLIT_Q: gl.constexpr, RESCALE_EARLY: gl.constexpr,
                       PIN_SOFTMAX: gl.constexpr, o_desc, TMA_STORE: gl.constexpr,
                       EARLY_Q: gl.constexpr = False, FILL_WARPS: gl.constexpr = 0):
    """One of the consumer warp groups of a 128-row program (two groups; 192 rows: three),
    each its own partition: for each of the program's work items (:func:`_round_item`),
    warp group ``WG`` runs its KV loop on block rows ``[WG * GROUP_ROWS, (WG + 1) *
    GROUP_ROWS)`` and stores them. Being
    separate partitions, the groups share no barrier: each releases a ring stage
    itself once its PV has read it (``empty`` counts one arrival per group), and the Q
    block once its last wgmma has read it (``q_free``, likewise); the producer warp
    (:func:`_pingpong_loader`) fills both, so the next item's copies run under this
    item's last steps and stores. Ring slots and Q phases run on across items.

    ``OVERLAP``: the overlapped loop of :func:`_kv_loop_overlapped` in each group (the
    next tile's QK^T issued with this tile's PV, the softmax under them). It holds two
    ring stages at once (K of tile ``j``, V of tile ``j - 1``), so it wants three stages:
    with two the producer cannot load ahead (``bench/results/ab_gluon_overlap_noturns_*``).
    By default the groups do not take turns at the tensor cores (FA3's ping-pong): with
    turns (branch ``gluon-pingpong``, d7ebbc6, two stages) it was slower on every
    workload measured, and with three stages (``TURNS``) it gained less than ``STAGGER``
    (``bench/results/ab_gluon_stagger_h200_9f75240.csv``).
    Without ``OVERLAP``: the in-sequence loop of :func:`_kv_loop_sequential`.

    Tiles without valid rows (padding) are zero-filled by warp group 0 (``ZERO_FILL``),
    or by the padding partition (:func:`_padding_filler`, ``FILL_WARPS`` > 0), and take
    no Q or K/V copies (the producer skips them too).

    ``STAGGER``: warp group ``k`` starts each item once group ``k - 1`` has run its first
    tile's softmax, so that the groups' unoverlapped phases (an item's first QK^T and
    softmax, its last PV) do not coincide. Two groups without ``SPLIT_Q``: ``stagger_bar``
    is that one mbarrier; otherwise it holds ``go[k]`` (group ``k``'s first softmax) at
    ``k`` and ``started[k]`` (group ``k + 1`` has started the item) at ``LAST + k``:
    group ``k`` waits for ``started[k]`` of the last item before it signals ``go[k]``
    again. With one shared Q block nothing else is needed (group ``k`` cannot start an
    item before group ``k + 1`` is done with the one before); with ``SPLIT_Q`` it could
    otherwise signal twice before group ``k + 1`` waits once (a lost phase). ``TURNS``
    (with ``OVERLAP``): the groups take turns issuing each step's wgmmas
    (:func:`_take_turn`), as FA3/FA4 order their consumer warp groups; 1: through the
    two mbarriers of ``turn`` (two groups), 2: through hardware named barriers, passed
    round the groups (two or three; the last group hands group 0 its first turn).

    ``SPLIT_Q``: each group's rows of the Q block have their own mbarriers (``q_bar`` and
    ``q_free`` hold one per group, each ``q_free`` one arrival), so the producer copies a
    group's next rows as soon as that group is done with its last ones, and the group
    that finishes an item first starts the next without waiting for the others.
    ``RESCALE_EARLY`` and ``PIN_SOFTMAX`` (with ``OVERLAP``): see
    :func:`_kv_loop_overlapped`. ``EARLY_Q`` (with ``OVERLAP``): the loop releases this
    group's Q rows (``q_free``) after its last QK^T, its ``q_release``, instead of this
    partition after the loop. With ``TMA_STORE`` too, the rows are staged in this group's
    rows of the item's last K tile, once every group's last QK^T has retired (``q_free``
    completes), and that ring stage is released after the store, not after the last PV
    (``HOLD_LAST``): the next item's first ``STAGES - 1`` tiles go into the other stages.
    """
    NUM_WARPS: gl.constexpr = 4
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
    q_half = q_smem.slice(WG * GROUP_ROWS, GROUP_ROWS)
    # The TMA store with Q released early stages the rows in the last tile's K stage.
    K_STAGED: gl.constexpr = TMA_STORE and EARLY_Q
    if SPLIT_Q:  # this group's own Q rows: their own barriers
        my_q_bar = q_bar.index(WG)
        my_q_free = q_free.index(WG)
    else:
        my_q_bar = q_bar
        my_q_free = q_free
    NUM_GROUPS: gl.constexpr = STACK * BLOCK_Q // GROUP_ROWS
    LAST: gl.constexpr = NUM_GROUPS - 1
    if STAGGER and (SPLIT_Q or NUM_GROUPS > 2):  # go[k] at k, started[k] at LAST + k
        go_mine = stagger_bar.index(WG if WG < LAST else 0)  # (unused by the last group)
        go_prev = stagger_bar.index(WG - 1 if WG > 0 else 0)  # (unused by group 0)
        started_prev = stagger_bar.index(LAST + (WG - 1 if WG > 0 else 0))
        started_mine = stagger_bar.index(LAST + (WG if WG < LAST else 0))
    else:
        go_mine = stagger_bar
        go_prev = stagger_bar
        started_prev = stagger_bar
        started_mine = stagger_bar
    if TURNS == 2 and WG == LAST:  # group 0 takes the first turn
        _named_barrier(0, True)
    pid = gl.program_id(0)
    num_programs = gl.num_programs(0)
    slot = pid * 0  # ring slots used by this program's earlier items
    q_phase = pid * 0
    for r in range(gl.cdiv(num_items, num_programs)):
        item = _round_item(r, pid, num_programs)
        if item < num_items:
            tile, head, split, req = _item_tile(item, TILE_REQ, NUM_Q_HEADS, STACK, NUM_SPLITS)
            if req >= 0:
                row0, row_end, q_start, q_stop, padding = _item_rows(
                    tile, req, TILE_ROW0, TILE_ROW_END, Q_START, Q_LEN)
                if padding:
                    if ZERO_FILL and WG == 0 and FILL_WARPS == 0:
                        for g in gl.static_range(STACK):
                            _fill_padding(O, LSE, row0, row_end, head + g, stride_ot,
                                          stride_oh, stride_lt, stride_lh, o_layout, dtype,
                                          GROUP_ROWS, HEAD_DIM, RETURN_LSE)
                else:
                    kv_len, kv_row0, bt_row, num_tiles, kv_shift, mask_from = _item_kv(
                        req, row0, row_end, q_start, q_stop, split, KV_ROW0, KV_LEN,
                        POSITIONS, HAS_POSITIONS, bt_base, bt_stride, CAUSAL, BLOCK_Q,
                        BLOCK_N, PAGE_SIZE, NUM_SPLITS, NUM_WARPS)
                    if STAGGER and WG > 0:
                        mbarrier.wait(go_prev, q_phase)
                        if SPLIT_Q:
                            mbarrier.arrive(started_prev, count=1)
                    if STAGGER and SPLIT_Q and WG < LAST:
                        # Group WG + 1 has started the last item (a fresh barrier counts as
                        # having completed phase 1: nothing to wait for on the first).
                        mbarrier.wait(started_mine, q_phase ^ 1)
                    # The producer warp copies the tiles (PRODUCER=True): the loops read
                    # no descriptor or page argument, so kv_len stands in for them.
                    acc, m_i, l_i = (_kv_loop_overlapped if OVERLAP else _kv_loop_sequential)(
                        q_half, my_q_bar, kv_len, kv_len, k_smem, v_smem, ready, empty, row0,
                        row_end, q_start, q_stop, kv_len, kv_len, kv_len, num_tiles,
                        mask_from, qk_scale, s_layout, o_layout, dtype, GROUP_ROWS, BLOCK_N,
                        HEAD_DIM, STAGES, CAUSAL, True, NUM_WARPS, POSITIONS, HAS_POSITIONS,
                        kv_len, PAGE_SIZE, BLOCK_Q, kv_shift, kv_len, kv_len, 0, WG * GROUP_ROWS,
                        slot, q_phase, go_mine if STAGGER and WG < LAST else None,
                        turn if TURNS else None, WG, RESCALE_EARLY, PIN_SOFTMAX,
                        TURNS == 2, NUM_GROUPS, my_q_free if EARLY_Q else None, K_STAGED)
                    if STAGGER and WG < LAST:
                        if num_tiles == 0:  # (the loop arrives after its first softmax)
                            mbarrier.arrive(go_mine, count=1)
                    # The loop waited for its last wgmma: this group is done with Q.
                    last = (slot + num_tiles - 1) % STAGES  # (K_STAGED: still held)
                    if TMA_STORE:
                        # This group's rows leave through its half of the Q block and TMA
                        # stores of one box per head (BOX rows: the group's 64, or a
                        # stacked head's 32), when a box holds only rows this item may
                        # write: the tile's, and valid or zero-filled. The group's heads
                        # share their rows, so one test covers every box.
                        BOX: gl.constexpr = GROUP_ROWS if GROUP_ROWS < BLOCK_Q else BLOCK_Q
                        FIRST: gl.constexpr = (WG * GROUP_ROWS) % BLOCK_Q
                        r0 = row0 + FIRST
                        by_tma = r0 + BOX <= row_end
                        if not ZERO_FILL:
                            by_tma = by_tma & (r0 >= q_start) & (r0 + BOX <= q_stop)
                        if K_STAGED:  # (the rows go through the last tile's K stage)
                            by_tma = by_tma & (num_tiles > 0)
                        if by_tma:
                            out, _, _, _, _ = _normalized_rows(
                                acc, m_i, l_i, row0, row_end, q_start, q_stop, head, o_layout,
                                GROUP_ROWS, BLOCK_Q, STACK, WG * GROUP_ROWS)
                            if K_STAGED:
                                # Q's rows may hold the next item's already. The last K tile
                                # is read by every group's last QK^T: once q_free completes
                                # (each group arrives when its last QK^T has retired) this
                                # group's rows of it are free to stage the output in.
                                mbarrier.wait(my_q_free, q_phase)
                                staging = k_smem.index(last).slice(WG * GROUP_ROWS, GROUP_ROWS)
                            else:
                                staging = q_half
                            staging.store(out.to(dtype))
                            fence_async_shared()
                            _barrier()  # every warp's rows in shared memory before the copy
                            for b in gl.static_range(GROUP_ROWS // BOX):
                                _tma_store(o_desc, [r0, (head + (WG * GROUP_ROWS + b * BOX)
                                                         // BLOCK_Q) * HEAD_DIM],
                                           staging.slice(b * BOX, BOX))
                            # The next item's Q (K_STAGED: a K/V tile) lands in these rows:
                            # release them once the store has read them.
                            tma.store_wait(0)
                            if K_STAGED:
                                mbarrier.arrive(empty.index(last), count=1)
                            else:
                                mbarrier.arrive(my_q_free, count=1)
                            if RETURN_LSE:
                                _store_rows(acc, m_i, l_i, O, LSE, WS_O, WS_LSE, ws_split,
                                            ws_lse_split, split, row0, row_end, q_start,
                                            q_stop, head, stride_ot, stride_oh, stride_lt,
                                            stride_lh, o_layout, dtype, GROUP_ROWS, HEAD_DIM,
                                            BLOCK_Q, STACK, WG * GROUP_ROWS, NUM_Q_HEADS,
                                            ZERO_FILL, RETURN_LSE, NUM_SPLITS, False)
                        else:  # the tail of a tile: register stores, as without TMA_STORE
                            if not K_STAGED:
                                mbarrier.arrive(my_q_free, count=1)
                            elif num_tiles > 0:  # the held stage goes back unused
                                # No proxy fence, as at every release: its K was read by
                                # wgmmas only, its V tail fenced where it was zeroed.
                                mbarrier.arrive(empty.index(last), count=1)
                            _store_rows(acc, m_i, l_i, O, LSE, WS_O, WS_LSE, ws_split,
                                        ws_lse_split, split, row0, row_end, q_start, q_stop,
                                        head, stride_ot, stride_oh, stride_lt, stride_lh,
                                        o_layout, dtype, GROUP_ROWS, HEAD_DIM, BLOCK_Q, STACK,
                                        WG * GROUP_ROWS, NUM_Q_HEADS, ZERO_FILL, RETURN_LSE,
                                        NUM_SPLITS)
                    else:
                        if not EARLY_Q:  # (EARLY_Q: the loop released Q after its last QK^T)
                            mbarrier.arrive(my_q_free, count=1)
                        _store_rows(acc, m_i, l_i, O, LSE, WS_O, WS_LSE, ws_split, ws_lse_split,
                                    split, row0, row_end, q_start, q_stop, head, stride_ot,
                                    stride_oh, stride_lt, stride_lh, o_layout, dtype, GROUP_ROWS,
                                    HEAD_DIM, BLOCK_Q, STACK, WG * GROUP_ROWS, NUM_Q_HEADS,
                                    ZERO_FILL, RETURN_LSE, NUM_SPLITS)
                    slot += num_tiles
                    q_phase ^= 1


@gluon.jit
def _pingpong_loader(q_desc, k_desc, v_desc, q_smem, q_bar, q_free, k_smem, v_smem, ready,
                     empty, TILE_REQ, TILE_ROW0, TILE_ROW_END, Q_START, Q_LEN, KV_ROW0, KV_LEN,
                     POSITIONS, bt_base, bt_stride, k_pool, v_pool, num_items,
                     NUM_Q_HEADS: gl.constexpr, GQA_GROUP: gl.constexpr,
                     HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                     CAUSAL: gl.constexpr, ZERO_FILL: gl.constexpr,
                     HAS_POSITIONS: gl.constexpr, PAGE_SIZE: gl.constexpr,
                     BLOCK_Q: gl.constexpr, STACK: gl.constexpr, NUM_SPLITS: gl.constexpr,
                     ROW_STRIDE: gl.constexpr, SPLIT_Q: gl.constexpr):
    """The producer warp of the ping-pong form: for each of the program's work items (the
    consumers' items, in the same order), the Q block once both consumers have released
    the previous one (``q_free``), then the item's K/V tiles into the ring
    (:func:`_kv_loader`). ``SPLIT_Q``: each consumer group's rows of the block (64) once
    that group has released its last ones (``q_free.index(g)``, landing on
    ``q_bar.index(g)``)."""
    pid = gl.program_id(0)
    num_programs = gl.num_programs(0)
    slot = pid * 0
    q_phase = pid * 0
    for r in range(gl.cdiv(num_items, num_programs)):
        item = _round_item(r, pid, num_programs)
        if item < num_items:
            tile, head, split, req = _item_tile(item, TILE_REQ, NUM_Q_HEADS, STACK, NUM_SPLITS)
            if req >= 0:
                row0, row_end, q_start, q_stop, padding = _item_rows(
                    tile, req, TILE_ROW0, TILE_ROW_END, Q_START, Q_LEN)
                if not padding:
                    kv_len, kv_row0, bt_row, num_tiles, kv_shift, mask_from = _item_kv(
                        req, row0, row_end, q_start, q_stop, split, KV_ROW0, KV_LEN,
                        POSITIONS, HAS_POSITIONS, bt_base, bt_stride, CAUSAL, BLOCK_Q,
                        BLOCK_N, PAGE_SIZE, NUM_SPLITS, 1)
                    # The first STAGES - 1 tiles go into stages that the consumers free
                    # before their last step of the previous item, so they are copied
                    # before Q, which waits for that step (q_free: a fresh barrier counts
                    # as having completed phase 1, so the first item's Q waits for none).
                    hk = head // GQA_GROUP
                    early = gl.minimum(num_tiles, STAGES - 1)
                    _kv_loader(k_desc, v_desc, k_smem, v_smem, ready, empty, kv_row0, hk,
                               early, BLOCK_N, HEAD_DIM, STAGES, bt_row, kv_len, PAGE_SIZE,
                               k_pool, v_pool, ROW_STRIDE, 0, slot)
                    if SPLIT_Q:  # group 0 (which starts first when staggered) first
                        GROUP_ROWS: gl.constexpr = 64
                        for g in gl.static_range(STACK * BLOCK_Q // GROUP_ROWS):
                            mbarrier.wait(q_free.index(g), q_phase ^ 1)
                            _load_q_rows(q_desc, q_smem, q_bar.index(g), row0, head,
                                         g * GROUP_ROWS, GROUP_ROWS, HEAD_DIM, BLOCK_Q)
                    else:
                        mbarrier.wait(q_free, q_phase ^ 1)
                        _load_q(q_desc, q_smem, q_bar, row0, head, HEAD_DIM, BLOCK_Q, STACK)
                    _kv_loader(k_desc, v_desc, k_smem, v_smem, ready, empty, kv_row0, hk,
                               num_tiles, BLOCK_N, HEAD_DIM, STAGES, bt_row, kv_len, PAGE_SIZE,
                               k_pool, v_pool, ROW_STRIDE, early, slot)
                    slot += num_tiles
                    q_phase ^= 1


@gluon.jit
def _attn_fwd_dense_kernel(
    q_desc, k_desc, v_desc, O, LSE,
    TILE_REQ, TILE_ROW0, TILE_ROW_END, Q_START, Q_LEN, KV_ROW0, KV_LEN,
    qk_scale, stride_ot, stride_oh, stride_lt, stride_lh, POSITIONS, BLOCK_TABLE, stride_bt,
    WS_O, WS_LSE, ws_split, ws_lse_split, K_POOL, V_POOL, num_items,
    NUM_Q_HEADS: gl.constexpr, GQA_GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr, ZERO_FILL: gl.constexpr,
    WARP_SPECIALIZE: gl.constexpr, OVERLAP: gl.constexpr, PAGE_SIZE: gl.constexpr,
    STACK: gl.constexpr, NUM_SPLITS: gl.constexpr, PINGPONG: gl.constexpr,
    STAGGER: gl.constexpr, TURNS: gl.constexpr, SPLIT_Q: gl.constexpr,
    RESCALE_EARLY: gl.constexpr, PIN_SOFTMAX: gl.constexpr, num_warps: gl.constexpr,
    O_DESC=None, EARLY_Q: gl.constexpr = False, FILL_WARPS: gl.constexpr = 0,
):
    dtype: gl.constexpr = q_desc.dtype
    # The consumers' TMA-store epilogue (ping-pong only); partitions take no None, so
    # q_desc stands in, unread, without it.
    TMA_STORE: gl.constexpr = O_DESC is not None
    if TMA_STORE:
        o_desc_arg = O_DESC
    else:
        o_desc_arg = q_desc
    # wgmma accumulators: S [BLOCK_M, BLOCK_N] and O [BLOCK_M, HEAD_DIM], 16-row atoms
    # over the 4 warps of the warp group.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])

    # STACK q heads of one KV head per program, head-major in the block's rows (block
    # row r: token r % BLOCK_Q of head head + r // BLOCK_Q), so each K/V tile in shared
    # memory serves all of them.
    BLOCK_Q: gl.constexpr = BLOCK_M // STACK
    Q_ROWS: gl.constexpr = 256 if BLOCK_M == 192 else BLOCK_M
    # Dense launches pass no positions and no block table (None: compile-time constants);
    # the partitions of gl.warp_specialize take pointers only, so these stand in, unread.
    HAS_POSITIONS: gl.constexpr = POSITIONS is not None
    if HAS_POSITIONS:
        pos_ptr = POSITIONS
    else:
        pos_ptr = Q_START
    if PAGE_SIZE == 0:
        bt_base = KV_LEN
        bt_stride = 0
    else:
        bt_base = BLOCK_TABLE
        bt_stride = stride_bt
    # Pages under 8 rows are gathered by cp.async from the pools themselves.
    GATHER: gl.constexpr = PAGE_SIZE > 0 and PAGE_SIZE < 8
    ROW_STRIDE: gl.constexpr = (NUM_Q_HEADS // GQA_GROUP) * HEAD_DIM
    if GATHER:
        k_pool = K_POOL
        v_pool = V_POOL
    else:
        k_pool = KV_LEN
        v_pool = KV_LEN
    # Shared memory: Q, the K/V ring, an mbarrier for Q and a pair per ring stage
    # (ready: the copy landed; empty: the consumer released the stage).
    # (Shared memory shapes are powers of two: a 192-row block takes 256 rows, the last 64
    # unused.)
    q_smem = gl.allocate_shared_memory(dtype, [Q_ROWS, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    # A TMA stage completes on one expect-arrive; a gathered stage on every copying
    # thread's arrival (the producer warp's 32, or the whole CTA's).
    if GATHER:
        READY_COUNT: gl.constexpr = 32 if WARP_SPECIALIZE else 32 * num_warps
        # The producer warp computes the gather's addresses: more than the 24 registers
        # that issuing TMA copies needs (with 24 it spilled ~300 bytes a thread).
        LOADER_REGS: gl.constexpr = 64
    else:
        READY_COUNT: gl.constexpr = 1
        # (The persistent producer also computes each work item's KV range; with three
        # consumer groups it takes 24 too, which leaves them 160 and 168: with 32 they
        # spilled 16-24 bytes a thread, Triton 3.6's ptxas.)
        LOADER_REGS: gl.constexpr = (24 if BLOCK_M == 192 else 32) if PINGPONG else 24
    # Ping-pong: one consumer warp group per 64 rows of the block (two, or three in a
    # 192-row block), each releasing every stage.
    NUM_GROUPS: gl.constexpr = BLOCK_M // 64 if PINGPONG else 1
    # The registers of each ping-pong consumer that is a worker partition (all but the
    # first): FA3 gives each of two consumer warp groups 240. Three groups take 160 (FA4's
    # number; the first group then gets 168): with 152 (the first 176) the workers spilled
    # 68 bytes a thread, with 168 (the first 144) the first did.
    CONSUMER_REGS: gl.constexpr = 240 if NUM_GROUPS == 2 else 160
    EMPTY_COUNT: gl.constexpr = NUM_GROUPS
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=READY_COUNT)
        mbarrier.init(empty.index(s), count=EMPTY_COUNT)

    if PINGPONG:
        # Two consumer warp groups of BLOCK_M // 2 rows, each its own partition storing its
        # own rows, and the producer warp; all three walk the same work items (one per
        # program, or several in a persistent launch: grid < num_items). q_free: both
        # consumers are done with the Q block, so the producer may copy the next one.
        if SPLIT_Q:  # one Q barrier pair per consumer group (its rows of the block)
            q_bar_c = gl.allocate_shared_memory(gl.int64, [NUM_GROUPS, 1],
                                                mbarrier.MBarrierLayout())
            q_free = gl.allocate_shared_memory(gl.int64, [NUM_GROUPS, 1],
                                               mbarrier.MBarrierLayout())
            for g in gl.static_range(NUM_GROUPS):
                mbarrier.init(q_bar_c.index(g), count=1)
                mbarrier.init(q_free.index(g), count=1)
        else:
            q_bar_c = q_bar
            q_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(q_free, count=NUM_GROUPS)
        if STAGGER and (SPLIT_Q or NUM_GROUPS > 2):
            # go[k] and started[k] for each pair of groups k, k + 1 (_pingpong_consumer)
            stagger_bar = gl.allocate_shared_memory(gl.int64, [2 * (NUM_GROUPS - 1), 1],
                                                    mbarrier.MBarrierLayout())
            for g in gl.static_range(2 * (NUM_GROUPS - 1)):
                mbarrier.init(stagger_bar.index(g), count=1)
        elif STAGGER:  # group 0's first softmax of each item; group 1 starts on it
            stagger_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(stagger_bar, count=1)
        else:  # a stand-in (partitions take no None), never used
            stagger_bar = q_free
        if TURNS:  # one per consumer group: its turn at the tensor cores
            turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            mbarrier.init(turn.index(0), count=1)
            mbarrier.init(turn.index(1), count=1)
        else:  # a stand-in, never used
            turn = q_free
        fence_async_shared()
        GROUP_ROWS: gl.constexpr = BLOCK_M // NUM_GROUPS
        # The padding partition (_padding_filler) takes warps of the producer warp's group,
        # so its register count, and one warp that does nothing where it is not asked for.
        FILLER_WARPS: gl.constexpr = FILL_WARPS if FILL_WARPS > 0 else 1
        # Partitions take no None: stand-ins for the workspace without KV splits.
        if NUM_SPLITS > 1:
            ws_o, ws_lse, wss, wsl = WS_O, WS_LSE, ws_split, ws_lse_split
        else:
            ws_o, ws_lse, wss, wsl = O, LSE, num_items, num_items
        # (The argument lists are written out: a tuple built here cannot hold a dtype, nor
        # can the list of partitions be concatenated.)
        if NUM_GROUPS == 2:
            gl.warp_specialize([
                (_pingpong_consumer, (0, q_smem, q_bar_c, q_free, stagger_bar, turn, k_smem,
                                      v_smem, ready, empty, TILE_REQ, TILE_ROW0, TILE_ROW_END,
                                      Q_START, Q_LEN, KV_ROW0, KV_LEN, pos_ptr, bt_base,
                                      bt_stride, num_items, qk_scale, O, LSE, ws_o, ws_lse, wss,
                                      wsl, stride_ot, stride_oh, stride_lt, stride_lh, dtype,
                                      GROUP_ROWS, BLOCK_N, HEAD_DIM, STAGES, CAUSAL,
                                      HAS_POSITIONS, PAGE_SIZE, BLOCK_Q, STACK, NUM_Q_HEADS,
                                      ZERO_FILL, RETURN_LSE, NUM_SPLITS, OVERLAP, STAGGER,
                                      TURNS, SPLIT_Q, RESCALE_EARLY, PIN_SOFTMAX, o_desc_arg,
                                      TMA_STORE, EARLY_Q, FILL_WARPS)),
                (_pingpong_consumer, (1, q_smem, q_bar_c, q_free, stagger_bar, turn, k_smem,
                                      v_smem, ready, empty, TILE_REQ, TILE_ROW0, TILE_ROW_END,
                                      Q_START, Q_LEN, KV_ROW0, KV_LEN, pos_ptr, bt_base,
                                      bt_stride, num_items, qk_scale, O, LSE, ws_o, ws_lse, wss,
                                      wsl, stride_ot, stride_oh, stride_lt, stride_lh, dtype,
                                      GROUP_ROWS, BLOCK_N, HEAD_DIM, STAGES, CAUSAL,
                                      HAS_POSITIONS, PAGE_SIZE, BLOCK_Q, STACK, NUM_Q_HEADS,
                                      ZERO_FILL, RETURN_LSE, NUM_SPLITS, OVERLAP, STAGGER,
                                      TURNS, SPLIT_Q, RESCALE_EARLY, PIN_SOFTMAX, o_desc_arg,
                                      TMA_STORE, EARLY_Q, FILL_WARPS)),
                (_pingpong_loader, (q_desc, k_desc, v_desc, q_smem, q_bar_c, q_free, k_smem,
                                    v_smem, ready, empty, TILE_REQ, TILE_ROW0, TILE_ROW_END,
                                    Q_START, Q_LEN, KV_ROW0, KV_LEN, pos_ptr, bt_base, bt_stride,
                                    k_pool, v_pool, num_items, NUM_Q_HEADS, GQA_GROUP, HEAD_DIM,
                                    BLOCK_N, STAGES, CAUSAL, ZERO_FILL, HAS_POSITIONS, PAGE_SIZE,
                                    BLOCK_Q, STACK, NUM_SPLITS, ROW_STRIDE, SPLIT_Q)),
                (_padding_filler, (TILE_REQ, TILE_ROW0, TILE_ROW_END, Q_START, Q_LEN, O, LSE,
                                   stride_ot, stride_oh, stride_lt, stride_lh, num_items,
                                   dtype, HEAD_DIM, NUM_Q_HEADS, STACK,
                                   RETURN_LSE, FILL_WARPS)),
            ], [4, 1, FILLER_WARPS], [CONSUMER_REGS, LOADER_REGS, LOADER_REGS])
        else:  # a third consumer group in 192-row blocks
            gl.warp_specialize([
                (_pingpong_consumer, (0, q_smem, q_bar_c, q_free, stagger_bar, turn, k_smem,
                                      v_smem, ready, empty, TILE_REQ, TILE_ROW0, TILE_ROW_END,
                                      Q_START, Q_LEN, KV_ROW0, KV_LEN, pos_ptr, bt_base,
                                      bt_stride, num_items, qk_scale, O, LSE, ws_o, ws_lse, wss,
                                      wsl, stride_ot, stride_oh, stride_lt, stride_lh, dtype,
                                      GROUP_ROWS, BLOCK_N, HEAD_DIM, STAGES, CAUSAL,
                                      HAS_POSITIONS, PAGE_SIZE, BLOCK_Q, STACK, NUM_Q_HEADS,
                                      ZERO_FILL, RETURN_LSE, NUM_SPLITS, OVERLAP, STAGGER,
                                      TURNS, SPLIT_Q, RESCALE_EARLY, PIN_SOFTMAX, o_desc_arg,
                                      TMA_STORE, EARLY_Q, FILL_WARPS)),
                (_pingpong_consumer, (1, q_smem, q_bar_c, q_free, stagger_bar, turn, k_smem,
                                      v_smem, ready, empty, TILE_REQ, TILE_ROW0, TILE_ROW_END,
                                      Q_START, Q_LEN, KV_ROW0, KV_LEN, pos_ptr, bt_base,
                                      bt_stride, num_items, qk_scale, O, LSE, ws_o, ws_lse, wss,
                                      wsl, stride_ot, stride_oh, stride_lt, stride_lh, dtype,
                                      GROUP_ROWS, BLOCK_N, HEAD_DIM, STAGES, CAUSAL,
                                      HAS_POSITIONS, PAGE_SIZE, BLOCK_Q, STACK, NUM_Q_HEADS,
                                      ZERO_FILL, RETURN_LSE, NUM_SPLITS, OVERLAP, STAGGER,
                                      TURNS, SPLIT_Q, RESCALE_EARLY, PIN_SOFTMAX, o_desc_arg,
                                      TMA_STORE, EARLY_Q, FILL_WARPS)),
                (_pingpong_consumer, (2, q_smem, q_bar_c, q_free, stagger_bar, turn, k_smem,
                                      v_smem, ready, empty, TILE_REQ, TILE_ROW0, TILE_ROW_END,
                                      Q_START, Q_LEN, KV_ROW0, KV_LEN, pos_ptr, bt_base,
                                      bt_stride, num_items, qk_scale, O, LSE, ws_o, ws_lse, wss,
                                      wsl, stride_ot, stride_oh, stride_lt, stride_lh, dtype,
                                      GROUP_ROWS, BLOCK_N, HEAD_DIM, STAGES, CAUSAL,
                                      HAS_POSITIONS, PAGE_SIZE, BLOCK_Q, STACK, NUM_Q_HEADS,
                                      ZERO_FILL, RETURN_LSE, NUM_SPLITS, OVERLAP, STAGGER,
                                      TURNS, SPLIT_Q, RESCALE_EARLY, PIN_SOFTMAX, o_desc_arg,
                                      TMA_STORE, EARLY_Q, FILL_WARPS)),
                (_pingpong_loader, (q_desc, k_desc, v_desc, q_smem, q_bar_c, q_free, k_smem,
                                    v_smem, ready, empty, TILE_REQ, TILE_ROW0, TILE_ROW_END,
                                    Q_START, Q_LEN, KV_ROW0, KV_LEN, pos_ptr, bt_base, bt_stride,
                                    k_pool, v_pool, num_items, NUM_Q_HEADS, GQA_GROUP, HEAD_DIM,
                                    BLOCK_N, STAGES, CAUSAL, ZERO_FILL, HAS_POSITIONS, PAGE_SIZE,
                                    BLOCK_Q, STACK, NUM_SPLITS, ROW_STRIDE, SPLIT_Q)),
                (_padding_filler, (TILE_REQ, TILE_ROW0, TILE_ROW_END, Q_START, Q_LEN, O, LSE,
                                   stride_ot, stride_oh, stride_lt, stride_lh, num_items,
                                   dtype, HEAD_DIM, NUM_Q_HEADS, STACK,
                                   RETURN_LSE, FILL_WARPS)),
            ], [4, 4, 1, FILLER_WARPS],
               [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS, LOADER_REGS])
        mbarrier.invalidate(q_bar)
        if SPLIT_Q:
            for g in gl.static_range(NUM_GROUPS):
                mbarrier.invalidate(q_bar_c.index(g))
                mbarrier.invalidate(q_free.index(g))
        else:
            mbarrier.invalidate(q_free)
        if STAGGER and (SPLIT_Q or NUM_GROUPS > 2):
            for g in gl.static_range(2 * (NUM_GROUPS - 1)):
                mbarrier.invalidate(stagger_bar.index(g))
        elif STAGGER:
            mbarrier.invalidate(stagger_bar)
        if TURNS:
            mbarrier.invalidate(turn.index(0))
            mbarrier.invalidate(turn.index(1))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))
            mbarrier.invalidate(empty.index(s))
    else:  # One work item per program (not traced for ping-pong: 192-row blocks, whose
        # tensors the one-item loops cannot hold, take the ping-pong form only).
        tile, head, split, req = _item_tile(gl.program_id(0), TILE_REQ, NUM_Q_HEADS, STACK,
                                            NUM_SPLITS)
        if req < 0:
            return
        row0, row_end, q_start, q_stop, padding = _item_rows(tile, req, TILE_ROW0, TILE_ROW_END,
                                                             Q_START, Q_LEN)
        if ZERO_FILL:
            if padding:
                for g in gl.static_range(STACK):
                    _fill_padding(O, LSE, row0, row_end, head + g, stride_ot, stride_oh,
                                  stride_lt, stride_lh, o_layout, dtype, BLOCK_M, HEAD_DIM,
                                  RETURN_LSE)
                return
        hk = head // GQA_GROUP
        kv_len, kv_row0, bt_row, num_tiles, kv_shift, mask_from = _item_kv(
            req, row0, row_end, q_start, q_stop, split, KV_ROW0, KV_LEN, POSITIONS,
            HAS_POSITIONS, bt_base, bt_stride, CAUSAL, BLOCK_Q, BLOCK_N, PAGE_SIZE, NUM_SPLITS,
            num_warps)

        fence_async_shared()
        _load_q(q_desc, q_smem, q_bar, row0, head, HEAD_DIM, BLOCK_Q, STACK)

        # The KV loop: the softmax under the previous tile's PV (overlap) or in sequence
        # (both loops take the same arguments); with a producer warp issuing the copies
        # (gl.warp_specialize) or the warp group.
        # Partitions take no None: stand-ins for what this launch does not have (read only
        # under NUM_SPLITS > 1).
        if NUM_SPLITS > 1:
            ws_o, ws_lse, wss, wsl, split_i = WS_O, WS_LSE, ws_split, ws_lse_split, split
        else:
            ws_o, ws_lse, wss, wsl, split_i = O, LSE, row0, row0, row0
        if WARP_SPECIALIZE:
            acc, m_i, l_i = gl.warp_specialize([
                (_kv_loop_overlapped if OVERLAP else _kv_loop_sequential,
                 (q_smem, q_bar, k_desc, v_desc, k_smem, v_smem, ready, empty, row0, row_end,
                  q_start, q_stop, kv_row0, hk, kv_len, num_tiles, mask_from, qk_scale, s_layout,
                  o_layout,
                  dtype, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, True, num_warps, pos_ptr,
                  HAS_POSITIONS, bt_row, PAGE_SIZE, BLOCK_Q, kv_shift, k_pool, v_pool,
                  ROW_STRIDE, 0, 0, 0)),
                (_kv_loader, (k_desc, v_desc, k_smem, v_smem, ready, empty, kv_row0, hk,
                              num_tiles, BLOCK_N, HEAD_DIM, STAGES, bt_row, kv_len, PAGE_SIZE,
                              k_pool, v_pool, ROW_STRIDE, 0, 0)),
            ], [1], [LOADER_REGS])
        else:
            acc, m_i, l_i = (_kv_loop_overlapped if OVERLAP else _kv_loop_sequential)(
                q_smem, q_bar, k_desc, v_desc, k_smem, v_smem, ready, empty, row0, row_end, q_start,
                q_stop, kv_row0, hk, kv_len, num_tiles, mask_from, qk_scale, s_layout, o_layout,
                dtype, BLOCK_M,
                BLOCK_N, HEAD_DIM, STAGES, CAUSAL, False, num_warps, pos_ptr, HAS_POSITIONS, bt_row,
                PAGE_SIZE, BLOCK_Q, kv_shift, k_pool, v_pool, ROW_STRIDE, 0, 0, 0)

        mbarrier.invalidate(q_bar)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))
            mbarrier.invalidate(empty.index(s))

        _store_rows(acc, m_i, l_i, O, LSE, ws_o, ws_lse, wss, wsl, split_i, row0, row_end, q_start,
                    q_stop, head, stride_ot, stride_oh, stride_lt, stride_lh, o_layout, dtype,
                    BLOCK_M, HEAD_DIM, BLOCK_Q, STACK, 0, NUM_Q_HEADS, ZERO_FILL, RETURN_LSE,
                    NUM_SPLITS)


def _desc(x: torch.Tensor, block_rows: int, layout_rows: int | None = None):
    """A TMA descriptor over ``[rows, H, D]`` viewed as ``[rows, H * D]`` (rows 16-byte
    aligned), boxes of ``[block_rows, D]``, laid out in shared memory as tiles of
    ``[layout_rows, D]`` (default ``block_rows``)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    rows, heads, d = x.shape
    gl_dtype = gl.float16 if x.dtype == torch.float16 else gl.bfloat16
    layout = gl.NVMMASharedLayout.get_default_for([layout_rows or block_rows, d], gl_dtype)
    return TensorDescriptor(x, [rows, heads * d], [x.stride(0), 1], [block_rows, d], layout)


def attention_fwd_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor | None, plan, sm_scale: float, causal: bool,
                        zero_fill: bool = False, block_m: int = 64, block_n: int | None = None,
                        stages: int | None = None, warp_specialize: bool = False,
                        overlap: bool = False, stack: int = 1, num_splits: int = 1,
                        pingpong: bool = False, persistent: int = 0,
                        stagger: bool = False, turns: bool | str = False, split_q: bool = False,
                        rescale_early: bool = False, pin_softmax: bool | str = False,
                        tma_store: bool = False, early_q_release: bool = False,
                        fill_warps: int = 0):
    """Launch the Gluon kernel over dense K/V and a tile plan built with
    ``block_q = block_m // stack``.

    Parameters
    ----------
    q : [T, Hq, D] fp16|bf16 packed rows; k, v : [N, Hk, D] dense rows at
        ``plan.kv_row0[b] + pos``
    out : [T, Hq, D] q.dtype; lse : [T, Hq] fp32 or None
    plan : :class:`spanfill.layout.TilePlan` with ``block_q == block_m // stack``
    sm_scale : softmax scale; causal : a row at ``pos`` sees positions ``<= pos``
    zero_fill : write 0 / -inf on tile rows that are not valid rows (padding)
    block_m : 64 (one warp group) or 128 (two warp groups of 64 rows, 8 warps: each K/V
        tile copied into shared memory serves twice the rows); 192 (three consumer groups,
        ``pingpong`` at D=64 only: FA4's tile there)
    block_n : KV positions per step; default 128, 64 at D=256 (the fp32 accumulator
        and the K/V ring then still fit the registers and shared memory)
    stages : K/V ring depth; default 2, or 3 with ``overlap`` where shared memory holds it
    warp_specialize : one producer warp issues the K/V copies (``gl.warp_specialize``)
        instead of the warp group pipelining them itself
    overlap : the softmax of each KV tile runs under the previous tile's PV wgmma
        (:func:`_kv_loop_overlapped`); a stage is then busy one step longer, hence the
        third stage
    stack : q heads of one KV head per program (GQA head stacking): the block's rows are
        ``block_m // stack`` tokens of each, and every K/V tile serves them all
    num_splits : programs sharing each tile's KV range (split-KV, for launches of few
        tiles over long KV): each writes its fp32 state into a workspace, and a second
        launch (:func:`spanfill.kernels.merge_states_launch`) merges them into ``out``
        and ``lse``; not with ``zero_fill``
    pingpong : 128- or 192-row programs whose two or three warp groups run as separate
        consumer partitions fed by a producer warp (implies ``warp_specialize``), each
        storing its own rows,
        nothing but the ring ordering them: each runs the overlapped loop with
        ``overlap``, the in-sequence loop without
    persistent : (with ``pingpong``) a persistent launch of this many programs (the
        backend gives one per SM: the form takes a whole SM's shared memory at D >= 128)
        instead of one per work item (a tile's head stack and KV split): each walks its
        items in rounds, so that the producer copies the next item's Q and first K/V
        tiles while the consumers finish the last one's steps and store its rows. 0: one
        program per item
    stagger : (with ``pingpong``) the second consumer group starts each item after the
        first group's first softmax
    turns : (with ``pingpong`` and ``overlap``) the two consumer groups take turns issuing
        each step's wgmmas (FA3/FA4's ordering of their consumer warp groups): True
        passes the turn through an mbarrier per group, ``"named"`` through a hardware
        named barrier per group, as FA3/FA4 do
    split_q : (with ``pingpong``) each consumer group's rows of the Q block are copied and
        released on their own, so a group starts its next item without waiting for the
        others to finish the last one
    rescale_early : (with ``overlap``) the running output is rescaled between the QK^T
        and PV issues, under the QK^T wgmma (FA3's order), instead of after PV retires
    pin_softmax : (with ``pingpong`` and ``overlap``) a scratch shared-memory store of
        each step's row sums before the PV wait, which keeps ptxas from scheduling the
        softmax after that wait (:func:`_kv_loop_overlapped`); ``"max"``: of the row
        maxima, which moves only the max ahead of the wait; ``"max_reload"``: the
        maxima, read back after PV's ring stage is released
    early_q_release : (with ``pingpong`` and ``overlap``, without ``split_q``) each
        consumer group releases its Q rows once its last QK^T of the item has retired,
        not after its last PV, so that the next item's Q is copied under the last PV and
        the epilogue
    tma_store : (with ``pingpong``, 128-row blocks of at least 32 rows a head, no
        ``split_q``, no KV splits) each consumer group writes its rows through its half of
        the Q block and TMA stores (a box of 64 rows of one head, or of 32 rows of each
        stacked head), where the box holds only rows the item may write;
        others (the tails of tiles) by register stores, as without it. With
        ``early_q_release`` (``block_n`` at least 128) the rows are staged in the item's
        last K tile instead of Q's rows, which may hold the next item's by then
    fill_warps : (with ``pingpong`` and ``zero_fill``) 1 or 2: a partition of this many
        warps, from those the producer warp's group leaves idle, zero-fills the padding
        (its own loop over the program's items, waiting on nothing, so the stores go out
        under the consumers' work), instead of the first consumer group when it reaches
        the padding's entries, last in the plan; 0: the consumer group
    """
    block_n = _block_n(q.shape[2], block_n)
    return _launch(q, _desc(k, block_n), _desc(v, block_n), k.shape[1], out, lse, plan, sm_scale,
                   causal, zero_fill, block_m, block_n, stages, warp_specialize, overlap, stack,
                   num_splits, pingpong=pingpong, persistent=persistent, stagger=stagger,
                   turns=turns, split_q=split_q, rescale_early=rescale_early,
                   pin_softmax=pin_softmax, tma_store=tma_store,
                   early_q_release=early_q_release, fill_warps=fill_warps)


def attention_fwd_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor | None, plan,
                        positions: torch.Tensor, block_table: torch.Tensor, sm_scale: float,
                        causal: bool, block_m: int = 64, block_n: int | None = None,
                        stages: int | None = None, warp_specialize: bool = False,
                        overlap: bool = False, stack: int = 1, num_splits: int = 1,
                        pingpong: bool = False, persistent: int = 0,
                        stagger: bool = False, turns: bool | str = False, split_q: bool = False,
                        rescale_early: bool = False, pin_softmax: bool | str = False,
                        tma_store: bool = False, early_q_release: bool = False):
    """Launch the Gluon kernel over a paged KV cache: span rows at their own positions.

    Parameters
    ----------
    q : [T, Hq, D] fp16|bf16 span rows, request by request
    k_cache, v_cache : [num_pages, page_size, Hk, D] q.dtype, pages contiguous (a page's
        rows follow each other, pages follow each other: one ``[rows, Hk * D]`` view);
        page_size a power of two up to 256 (pages of 8 rows or more: TMA copies; smaller
        ones: cp.async gathers)
    out : [T, Hq, D] q.dtype; lse : [T, Hq] fp32 or None
    plan : :class:`spanfill.layout.TilePlan` of the span layout,
        ``block_q == block_m // stack``;
        ``plan.kv_len[b]`` is request ``b``'s sequence length
    positions : [T] int32, each row's position (causal by position)
    block_table : [B, max_pages] int32
    block_m, block_n, stages, warp_specialize, overlap, stack, num_splits, pingpong,
    persistent, stagger, turns, split_q, rescale_early, pin_softmax, tma_store,
    early_q_release : as
    :func:`attention_fwd_dense`
    """
    num_pages, page_size, heads, d = k_cache.shape
    if page_size < 1 or page_size > 256 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two from 1 to 256, got {page_size}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride() != (page_size * heads * d, heads * d, d, 1):
            raise ValueError(f"{name} pages are not contiguous [page_size, Hk, D] blocks one "
                             f"after the other (strides {c.stride()})")
    block_n = _block_n(d, block_n)
    # Rows per TMA copy: a page, or a tile of a larger page. Gathered pages (under 8
    # rows) take no TMA copies: the descriptors then only give the stages their layout.
    rows = min(page_size, block_n) if page_size >= 8 else block_n
    descs = [_desc(c.view(num_pages * page_size, heads, d), rows, block_n)
             for c in (k_cache, v_cache)]
    pools = (k_cache, v_cache) if page_size < 8 else (None, None)
    return _launch(q, *descs, heads, out, lse, plan, sm_scale, causal, False, block_m, block_n,
                   stages, warp_specialize, overlap, stack, num_splits, positions, block_table,
                   page_size, pools, pingpong, persistent, stagger, turns, split_q,
                   rescale_early, pin_softmax, tma_store, early_q_release)


def _block_n(head_dim: int, block_n: int | None) -> int:
    return block_n if block_n is not None else (64 if head_dim > 128 else 128)


def _launch(q, k_desc, v_desc, num_kv_heads, out, lse, plan, sm_scale, causal, zero_fill,
            block_m, block_n, stages, warp_specialize, overlap, stack, num_splits,
            positions=None, block_table=None, page_size=0, pools=(None, None),
            pingpong=False, persistent=0, stagger=False, turns=False, split_q=False,
            rescale_early=False, pin_softmax=False, tma_store=False, early_q_release=False,
            fill_warps=0):
    """The one launch of :func:`_attn_fwd_dense_kernel` behind both entry points."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    if block_m not in (64, 128, 192):
        raise ValueError(f"block_m must be 64, 128 or 192 (one, two or three warp groups), "
                         f"got {block_m}")
    if pingpong:
        if block_m == 64:
            raise ValueError(f"pingpong takes 128-row programs (two warp groups) or 192-row "
                             f"ones (three), got {block_m}")
        warp_specialize = True
    if block_m == 192:
        # Three consumer groups and the producer warp leave 152 registers a thread: enough
        # for D=64's accumulators (FA4's 192-row tiles are for D <= 64). Paged spans would
        # also need the position reduction of _item_kv over 192 rows (gl.arange takes
        # powers of two).
        if (not pingpong or head_dim != 64 or positions is not None
                or turns not in (False, "named")):
            raise ValueError("192-row programs take the pingpong form at D=64 over dense K/V, "
                             f"with named turns or none (got pingpong={pingpong}, D={head_dim}, "
                             f"{'paged' if positions is not None else 'dense'}, turns={turns})")
    if tma_store and not (pingpong and block_m == 128 and not split_q and num_splits == 1
                          and (block_m // stack) % 32 == 0):
        raise ValueError("tma_store takes the 128-row pingpong form with at least 32 rows a "
                         f"head, without split_q or KV splits (stack={stack}, "
                         f"num_splits={num_splits}, split_q={split_q})")
    if persistent < 0:
        raise ValueError(f"persistent must be a program count >= 0, got {persistent}")
    if persistent and not pingpong:
        raise ValueError("persistent launches take the pingpong form")
    if stagger and not pingpong:
        raise ValueError("stagger takes the pingpong form")
    if turns not in (False, True, "named"):
        raise ValueError(f"turns must be False, True or 'named', got {turns!r}")
    if turns and not (pingpong and overlap):
        raise ValueError("turns take the pingpong form with overlap")
    if split_q and not pingpong:
        raise ValueError("split_q takes the pingpong form")
    if split_q and turns:
        # (each is a variant of the form; together they were never measured or tested)
        raise ValueError("split_q and turns do not combine")
    if rescale_early and not (pingpong and overlap):
        raise ValueError("rescale_early takes the pingpong form with overlap")
    if pin_softmax not in _PIN_SOFTMAX:
        raise ValueError("pin_softmax must be False, True, 'max' or 'max_reload', got "
                         f"{pin_softmax!r}")
    if pin_softmax and not (pingpong and overlap):
        raise ValueError("pin_softmax takes the pingpong form with overlap")
    if early_q_release and not (pingpong and overlap and not split_q):
        # (split_q was not measured with it)
        raise ValueError("early_q_release takes the pingpong form with overlap, without "
                         f"split_q (pingpong={pingpong}, overlap={overlap}, "
                         f"split_q={split_q})")
    if early_q_release and tma_store and block_n < block_m:
        # (the rows are staged in the last K tile: the block's rows must fit in one)
        raise ValueError(f"early_q_release with tma_store stages the {block_m} rows in a K "
                         f"tile: block_n must be at least {block_m}, got {block_n}")
    if isinstance(fill_warps, bool) or fill_warps not in (0, 1, 2):
        raise ValueError(f"fill_warps must be 0, 1 or 2, got {fill_warps!r}")
    if fill_warps and not (pingpong and zero_fill):
        # (the padding partition takes the warps the producer warp's group leaves idle)
        raise ValueError("fill_warps takes the pingpong form with zero_fill (padded batches)")
    group = num_q_heads // num_kv_heads
    if stack < 1 or group % stack or block_m // stack < 16:
        raise ValueError(f"stack must divide the GQA group ({group}) and leave at least 16 "
                         f"rows per head in a block of {block_m}, got {stack}")
    # Q boxes: a head's rows of the block, or with split_q (and in 192-row blocks, whose
    # boxes must be powers of two) at most a consumer group's 64.
    small_q_box = split_q or block_m == 192
    q_box = min(block_m // stack, 64) if small_q_box else block_m // stack
    if small_q_box and ((block_m // stack) % q_box or 64 % q_box):
        # (_load_q_rows: each group's 64 rows in whole boxes, no box across two heads)
        raise ValueError(f"split_q and 192-row blocks take {block_m // stack} rows per head "
                         f"only as a multiple or a divisor of a consumer group's 64 "
                         f"(stack={stack})")
    if stages is None:
        q_rows = 256 if block_m == 192 else block_m  # (the kernel's Q buffer)
        q_bytes, stage_bytes = q_rows * head_dim * 2, 2 * block_n * head_dim * 2
        stages = 3 if overlap and q_bytes + 3 * stage_bytes <= SHARED_MEMORY_BUDGET else 2
    if num_splits < 1 or (num_splits > 1 and zero_fill):
        raise ValueError(f"num_splits must be >= 1, and 1 with zero_fill; got {num_splits}")
    rows = q.shape[0]
    if num_splits > 1:
        ws_o = torch.empty(num_splits, rows, num_q_heads, head_dim, dtype=torch.float32,
                           device=q.device)
        ws_lse = torch.empty(num_splits, rows, num_q_heads, dtype=torch.float32,
                             device=q.device)
        ws = (ws_o, ws_lse, rows * num_q_heads * head_dim, rows * num_q_heads)
    else:
        ws = (None, None, None, None)  # compile-time constants: no workspace arguments
    lse_arg = lse if lse is not None else out
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    num_items = plan.num_tiles * (num_q_heads // stack) * num_splits
    grid = (min(num_items, persistent) if persistent else num_items,)
    handle = _attn_fwd_dense_kernel[grid](
        # (split_q: each consumer group's rows on their own; the layout is the kernel's Q
        # buffer's, 256 rows for a 192-row block)
        _desc(q, q_box, 256 if block_m == 192 else block_m),
        k_desc, v_desc, out, lse_arg,
        plan.tile_req, plan.tile_row0, plan.tile_row_end, plan.q_start, plan.q_len,
        plan.kv_row0, plan.kv_len,
        sm_scale * LOG2E, out.stride(0), out.stride(1), *lse_strides,
        positions, block_table, block_table.stride(0) if block_table is not None else None,
        *ws, *pools, num_items,
        NUM_Q_HEADS=num_q_heads, GQA_GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, CAUSAL=causal,
        RETURN_LSE=lse is not None, ZERO_FILL=zero_fill, WARP_SPECIALIZE=warp_specialize,
        OVERLAP=overlap, PAGE_SIZE=page_size, STACK=stack, NUM_SPLITS=num_splits,
        PINGPONG=pingpong, STAGGER=stagger, TURNS=2 if turns == "named" else int(bool(turns)),
        SPLIT_Q=split_q,
        RESCALE_EARLY=rescale_early,
        PIN_SOFTMAX=_PIN_SOFTMAX[pin_softmax],
        # box: a consumer group's 64 rows of one head, or a stacked head's 32; layout:
        # the Q block's (the rows are staged in it)
        O_DESC=_desc(out, min(64, block_m // stack), block_m) if tma_store else None,
        EARLY_Q=early_q_release, FILL_WARPS=fill_warps,
        # 16 rows per warp: one warp group of 4 per 64 rows; with ping-pong the second
        # warp group is a worker partition, so the launch names the first only.
        num_warps=4 if pingpong else block_m // 16,
    )
    if num_splits > 1:
        from ..kernels.merge import merge_states_launch

        lse_out = lse if lse is not None else torch.empty(rows, num_q_heads,
                                                          dtype=torch.float32, device=q.device)
        merge_states_launch(ws_o.permute(1, 0, 2, 3), ws_lse.permute(1, 0, 2), out, lse_out)
    return handle
