"""One attention kernel for padded, varlen and span (KV-with-holes) prefill.

Each program takes one tile of the plan (up to ``BLOCK_Q`` packed query rows of
one request; with ``ZERO_FILL``, an entry of padding rows of any length, which
it only fills with zeros) and ``STACKED_HEADS`` q heads that share a KV head, stacked
into the rows of a ``BLOCK_M = BLOCK_Q * STACKED_HEADS`` block, so every K/V tile loaded from
memory serves all of them. The KV loop is split into the tiles every valid row sees in full (no
mask) and the boundary tiles that need the per-row mask (causal diagonal, kv_len
edge, sliding-window or shard lower bound). Tiles outside every row's range are
never visited.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .append import FP8_FORMATS
from .fused_append import write_new_rows
from .merge import merge_states_tile
from .scales import kv_scale_args

# Named constants. The kernel keeps scores in the log2 domain (exp2 is one
# instruction), so the host folds log2(e) into the scale and the lse is turned back
# into a natural log with ln 2.
LOG2E = 1.4426950408889634
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
TWO_LOG2E: tl.constexpr = tl.constexpr(2 * LOG2E)  # tanh(x) through exp2(2x log2 e)
# The position of a row that is not a query row (padding, or past the tile's end).
NO_POSITION: tl.constexpr = tl.constexpr(-1)
# Above every real position: the neutral element of the tile's minimum position.
POSITION_MAX: tl.constexpr = tl.constexpr(2147483646)


@triton.jit
def _kv_row_offsets(
    kv_pos, kv_in, req, kv_row0, block_table, stride_bt, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, MASK_N: tl.constexpr,
):
    """Where KV positions ``kv_pos`` live: ``(page, slot)`` for paged KV, else the row.

    Computed once per KV tile and shared by the K and V loads, so the block table
    is read once per tile, not twice. ``PAGE_SIZE`` is a compile-time constant so
    the page arithmetic is shifts, not integer division (measured on the H100:
    page_size 1, which Triton specialises by itself, ran 15% faster than a
    run-time page_size of 16).
    """
    if PAGED:
        if MASK_N:
            page = tl.load(block_table + req * stride_bt + kv_pos // PAGE_SIZE, mask=kv_in,
                           other=0)
        else:
            page = tl.load(block_table + req * stride_bt + kv_pos // PAGE_SIZE)
        return page.to(tl.int64), (kv_pos % PAGE_SIZE).to(tl.int64)
    row = (kv_row0 + kv_pos).to(tl.int64)
    return row, row  # dense rows: the second value (slot) is not read


@triton.jit
def _load_kv_tile(
    base, page, slot, kv_in, hk, offs_d, d_in, strides,
    PAGED: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
):
    """K or V rows at ``(page, slot)`` (or dense row ``page``), as ``[BLOCK_N, BLOCK_D]``.

    ``strides`` is ``(page, row, head)`` (page unused for dense rows). Zero outside
    ``kv_in``. ``MASK_N`` / ``EVEN_D`` False drop the row / column masks, so the
    loads of the unmasked KV tiles stay full-width vector loads.
    """
    stride_page, stride_row, stride_head = strides
    if PAGED:
        row = page * stride_page + slot * stride_row
    else:
        row = page * stride_row
    ptrs = base + row[:, None] + hk * stride_head + offs_d[None, :]
    if MASK_N:
        if EVEN_D:
            return tl.load(ptrs, mask=kv_in[:, None], other=0.0)
        return tl.load(ptrs, mask=kv_in[:, None] & d_in[None, :], other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_in[None, :], other=0.0)


@triton.jit
def _attend_kv_tile(
    state, q, K, V, start_n, kv_start, loop_end, rows, req, hk, offs_n, offs_d, d_in, kv_row0,
    block_table, stride_bt, k_strides, v_strides, qk_scale, cap_scale, window_left,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr,
    IEEE_DOT: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_CAST: tl.constexpr, page_in=None, PAGES_GIVEN: tl.constexpr = False,
):
    """One online-softmax step over the KV positions ``start_n + offs_n``.

    ``state`` is ``(acc, m_i, l_i)`` and comes back updated; ``rows`` is ``(pos,
    valid)``, the query rows' positions and which rows are real; ``k_strides`` and
    ``v_strides`` are ``(page, row, head)``. A position is attended when it lies in
    ``[kv_start, loop_end)`` (and passes the causal and window masks). ``MASKED``
    False is for tiles every valid row sees in full: no load mask, no score mask.
    ``PAGES_GIVEN``: ``page_in`` holds the block-table entry of each position (read
    ahead by the caller) instead of this step reading it. ``KV_CAST``: K/V are
    stored in another dtype than q (fp8) and are widened to q's after the load (exact:
    every fp8 value is an fp16/bf16 value); their scales are folded in by the caller.
    Scores are kept in the log2 domain (``qk_scale`` holds log2 e).
    """
    acc, m_i, l_i = state
    pos, valid = rows
    kv_pos = start_n + offs_n
    kv_in = (kv_pos >= kv_start) & (kv_pos < loop_end)
    if USE_TMA:
        # Dense KV through tensor descriptors (the copy engine): whole rows of the
        # [rows, Hk * D] view; rows past loop_end belong to padding or the next
        # request, so V is zeroed there (p = 0 times a NaN would still be NaN).
        tma_row = (kv_row0 + start_n).to(tl.int32)
        tma_col = (hk * BLOCK_D).to(tl.int32)
        k = K.load([tma_row, tma_col])
        v = V.load([tma_row, tma_col])
        if MASKED:
            v = tl.where(kv_in[:, None], v, 0.0)
    else:
        if PAGES_GIVEN:  # the caller read the block table (see _attn_fwd_kernel)
            page = page_in.to(tl.int64)
            slot = (kv_pos % PAGE_SIZE).to(tl.int64)
        else:
            page, slot = _kv_row_offsets(kv_pos, kv_in, req, kv_row0, block_table, stride_bt,
                                         PAGE_SIZE, PAGED, MASKED)
        k = _load_kv_tile(K, page, slot, kv_in, hk, offs_d, d_in, k_strides, PAGED=PAGED,
                          MASK_N=MASKED, EVEN_D=EVEN_D)
        v = _load_kv_tile(V, page, slot, kv_in, hk, offs_d, d_in, v_strides, PAGED=PAGED,
                          MASK_N=MASKED, EVEN_D=EVEN_D)
    if KV_CAST:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    if IEEE_DOT:
        # fp32 operands: no-op casts for fp32 inputs; for bf16 in the interpreter,
        # whose bf16 dot is wrong (numpy has no bf16), an exact fp32 dot instead.
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N]
    if SOFT_CAP:
        # cap * tanh(s / cap) with tanh(x) = 1 - 2 / (exp(2x) + 1): no libdevice
        # call, so the interpreter runs it too; saturates cleanly at +-1.
        x = qk * cap_scale
        qk = 1.0 - 2.0 / (tl.math.exp2(x * TWO_LOG2E) + 1.0)
    if MASKED:
        visible = kv_in[None, :] & valid[:, None]
        if CAUSAL:
            visible = visible & (kv_pos[None, :] <= pos[:, None])
        if HAS_WINDOW:
            visible = visible & (kv_pos[None, :] >= pos[:, None] - window_left)
        qk = tl.where(visible, qk, float("-inf"))
    # Scores stay unscaled; the scale (with log2 e) is folded into one FMA inside
    # exp2, as the running max m is kept in the scaled log2 domain.
    m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
    if MASKED:
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead so
        # exp2 gives 0, not NaN.
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.math.exp2(qk * qk_scale - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if IEEE_DOT:
        # p rounded to the input dtype first, as the tensor-core path does.
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _fill_padding_rows(
    O, LSE, row0, row_end, h0, o_strides, lse_strides,
    STACKED_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, RETURN_LSE: tl.constexpr,
):
    """Write 0 (and lse -inf) on packed rows ``[row0, row_end)`` for this program's heads.

    The rows may be many tiles long: a padded plan gives all of a sample's padding
    rows (the torch-built plan: its run of padding-only tiles) to one entry (see
    :func:`spanfill.layout.plan_padded`).
    """
    stride_ot, stride_oh = o_strides
    stride_lt, stride_lh = lse_strides
    BLOCK_Q: tl.constexpr = BLOCK_M // STACKED_HEADS
    offs_m = tl.arange(0, BLOCK_M)
    tok = offs_m // STACKED_HEADS
    head = h0 + offs_m % STACKED_HEADS
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM
    zeros = tl.zeros([BLOCK_M, BLOCK_D], dtype=O.dtype.element_ty)
    for r0 in range(row0, row_end, BLOCK_Q):
        row = r0 + tok
        in_rows = (tok < BLOCK_Q) & (row < row_end)
        row64 = row.to(tl.int64)
        tl.store(O + row64[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 zeros, mask=in_rows[:, None] & d_in[None, :])
        if RETURN_LSE:
            tl.store(LSE + row64 * stride_lt + head * stride_lh,
                     tl.full([BLOCK_M], float("-inf"), tl.float32), mask=in_rows)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, SPLIT_WS, POSITIONS,
    plan, BLOCK_TABLE,
    qk_scale, cap_scale, window_left,
    q_strides, o_strides, lse_strides,
    num_rows,
    k_strides, v_strides,
    stride_bt,
    k_scale, v_scale, scale_stride, new,
    GQA_GROUP: tl.constexpr, STACKED_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, PAGED: tl.constexpr,
    HAS_POSITIONS: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SOFT_CAP: tl.constexpr, RETURN_LSE: tl.constexpr, ZERO_FILL: tl.constexpr,
    IEEE_DOT: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr,
    NUM_HEAD_STACKS: tl.constexpr, BOUNDARY_STAGES: tl.constexpr, NUM_SPLITS: tl.constexpr,
    KV_CAST: tl.constexpr, KV_SCALES: tl.constexpr, FUSED_APPEND: tl.constexpr,
    FP8_LIMIT: tl.constexpr, FP8_MANTISSA_BITS: tl.constexpr, FP8_MIN_EXPONENT: tl.constexpr,
):
    """Attention over one (tile, head stack[, KV split]) of a tile plan.

    Arguments, grouped as the host passes them (:func:`attention_fwd`):

    - ``plan``: the tile plan's int32 arrays ``(TILE_REQ, TILE_ROW0, TILE_ROW_END,
      Q_START, Q_LEN, KV_ROW0, KV_LEN, KV_START)``; the last is read only with
      ``HAS_KV_START``.
    - ``q_strides``, ``o_strides``, ``lse_strides``: ``(token, head)`` strides.
    - ``k_strides``, ``v_strides``: ``(page, row, head)`` strides (page 0 for dense KV).
    - ``num_rows``: T, the packed row count, which sizes the split workspace.
    - ``k_scale``, ``v_scale``: what stored K/V values are multiplied by (fp8 caches):
      ``KV_SCALES`` 0: none (both None); 1: two floats; 2: fp32 pointers, KV head
      ``hk``'s scale at ``hk * scale_stride`` (stride 0: one scale for all heads).
    - ``new`` (``FUSED_APPEND``): ``(K_NEW, V_NEW, SLOTS, stride_knt, stride_knh,
      stride_vnt, stride_vnh)``, the rows' new K/V and cache slots, written in this
      launch (:mod:`spanfill.kernels.fused_append`); ``FP8_*`` describe an fp8 cache's
      format for quantizing them. None otherwise.
    - ``GQA_GROUP``: q heads per KV head; ``STACKED_HEADS`` of them share a program's
      query block, and ``NUM_HEAD_STACKS = Hq // STACKED_HEADS`` programs cover all
      q heads of a tile.
    """
    TILE_REQ, TILE_ROW0, TILE_ROW_END, Q_START, Q_LEN, KV_ROW0, KV_LEN, KV_START = plan
    stride_qt, stride_qh = q_strides
    stride_ot, stride_oh = o_strides
    stride_lt, stride_lh = lse_strides
    BLOCK_Q: tl.constexpr = BLOCK_M // STACKED_HEADS
    # One grid axis, head stacks fastest: programs start in the plan's order
    # (longest tile first) across all heads, so the last wave holds the shortest
    # tiles of every head rather than a sawtooth of long and short ones. With
    # NUM_SPLITS > 1 the KV splits of one (tile, head stack) are faster still.
    pid = tl.program_id(0)
    if NUM_SPLITS > 1:
        split = pid % NUM_SPLITS
        pid = pid // NUM_SPLITS  # the (tile, head stack) the splits share
    else:
        split = 0
    tile = pid // NUM_HEAD_STACKS
    head_stack = pid % NUM_HEAD_STACKS
    req = tl.load(TILE_REQ + tile)
    if req < 0:
        return
    row0 = tl.load(TILE_ROW0 + tile)
    row_end = tl.load(TILE_ROW_END + tile)
    q_start = tl.load(Q_START + req)
    q_stop = q_start + tl.load(Q_LEN + req)
    h0 = head_stack.to(tl.int64) * STACKED_HEADS  # first q head of this program
    if ZERO_FILL:
        if (row_end <= q_start) | (row0 >= q_stop):
            # Padding only: zeros, straight away, with none of the set-up of an
            # attention tile, and one entry per sample's run of such tiles. H100,
            # bert_base_512 kernel: 97.9 us with a full program per padding tile
            # (wherever the plan put them), 89.4 us now, 85.1 us with the padding
            # removed (bench/results/logs/kernel_ab_padding_runs_h100.log).
            _fill_padding_rows(O, LSE, row0, row_end, h0, o_strides, lse_strides,
                               STACKED_HEADS, HEAD_DIM, BLOCK_M, BLOCK_D, RETURN_LSE)
            return
    kv_len = tl.load(KV_LEN + req)
    kv_row0 = tl.load(KV_ROW0 + req)
    if HAS_KV_START:
        kv_start = tl.load(KV_START + req)
    else:
        kv_start = 0
    hk = h0 // GQA_GROUP
    if KV_SCALES != 0:
        # One KV head per program, so its scales are two scalars: K's multiplies every
        # score (folded into the score scale, before tanh with a soft cap), V's every
        # output row (applied once, at the end).
        if KV_SCALES == 1:
            k_s = k_scale
            v_s = v_scale
        else:
            k_s = tl.load(k_scale + hk * scale_stride)
            v_s = tl.load(v_scale + hk * scale_stride)
        if SOFT_CAP:
            cap_scale = cap_scale * k_s
        else:
            qk_scale = qk_scale * k_s

    offs_m = tl.arange(0, BLOCK_M)
    tok = offs_m // STACKED_HEADS
    head = h0 + offs_m % STACKED_HEADS
    row = row0 + tok
    in_tile = (tok < BLOCK_Q) & (row < row_end)
    valid = in_tile & (row >= q_start) & (row < q_stop)
    if HAS_POSITIONS:
        pos = tl.load(POSITIONS + row, mask=valid, other=NO_POSITION)
    else:
        pos = tl.where(valid, row - q_start, NO_POSITION)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    row64 = row.to(tl.int64)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    q = tl.load(Q + row64[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=valid[:, None] & d_in[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    # A tile of padding only gets pos_min = 0, not the sentinel: loop bounds near
    # 2^31 overflow in the software pipeliner's prologue predicates (seen on the
    # H100 as an illegal address with a sliding window).
    pos_min = tl.where(n_valid > 0, tl.min(tl.where(valid, pos, POSITION_MAX), axis=0), 0)
    pos_max = tl.max(pos, axis=0)
    # The tile's KV loop [loop_begin, loop_end) and inside it [full_lo, full_hi), the
    # BLOCK_N-aligned positions that every valid row sees in full.
    if CAUSAL:
        loop_end = tl.minimum(pos_max + 1, kv_len)
        full_hi = tl.minimum(pos_min + 1, kv_len)
    else:
        loop_end = kv_len
        full_hi = kv_len
    if HAS_WINDOW:
        loop_begin = tl.maximum(kv_start, pos_min - window_left)
        full_lo = tl.maximum(kv_start, pos_max - window_left)
    else:
        loop_begin = kv_start
        full_lo = kv_start
    loop_begin = (loop_begin // BLOCK_N) * BLOCK_N
    full_lo = ((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    # No full tile (or a tile of padding only): everything goes through the masked loop.
    no_full = (full_hi <= full_lo) | (n_valid == 0)
    full_lo = tl.where(no_full, loop_begin, full_lo)
    full_hi = tl.where(no_full, loop_begin, full_hi)
    loop_end = tl.where(n_valid > 0, loop_end, 0)
    if FUSED_APPEND:
        # The new rows this program's loop can read, written by the program itself
        # before the loop (a barrier after): see kernels/fused_append.py.
        write_new_rows(K, V, POSITIONS, new, k_strides, v_strides, q_start, q_stop,
                       loop_begin, loop_end, hk, offs_d, d_in, k_scale, v_scale, scale_stride,
                       PAGE_SIZE, KV_SCALES, FP8_LIMIT, FP8_MANTISSA_BITS, FP8_MIN_EXPONENT,
                       BLOCK_N)
    if NUM_SPLITS > 1:
        # Split-KV (few tiles, long KV): this program takes the split-th of
        # NUM_SPLITS equal runs of the tile's BLOCK_N steps, and every loop bound is
        # clamped into it. The runs start on BLOCK_N boundaries of the unsplit loop,
        # so the tiles visited, and which of them are masked, are those of the
        # unsplit program; loop_end stays the mask bound for the positions visited.
        steps = tl.maximum((loop_end - loop_begin + BLOCK_N - 1) // BLOCK_N, 0)
        per_split = (steps + NUM_SPLITS - 1) // NUM_SPLITS
        chunk_lo = loop_begin + split * per_split * BLOCK_N
        chunk_hi = chunk_lo + per_split * BLOCK_N
        loop_begin = tl.minimum(tl.maximum(loop_begin, chunk_lo), chunk_hi)
        full_lo = tl.minimum(tl.maximum(full_lo, chunk_lo), chunk_hi)
        full_hi = tl.minimum(tl.maximum(full_hi, chunk_lo), chunk_hi)
        loop_end = tl.minimum(tl.maximum(loop_end, chunk_lo), chunk_hi)

    rows = (pos, valid)
    if HAS_WINDOW or HAS_KV_START:  # a lower bound: masked tiles below the full ones
        for start_n in tl.range(loop_begin, full_lo, BLOCK_N, num_stages=BOUNDARY_STAGES):
            acc, m_i, l_i = _attend_kv_tile(
                (acc, m_i, l_i), q, K, V, start_n, kv_start, loop_end, rows, req, hk, offs_n,
                offs_d, d_in, kv_row0, BLOCK_TABLE, stride_bt, k_strides, v_strides, qk_scale,
                cap_scale, window_left, PAGE_SIZE=PAGE_SIZE, PAGED=PAGED, EVEN_D=EVEN_D,
                MASKED=True, CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW, SOFT_CAP=SOFT_CAP,
                IEEE_DOT=IEEE_DOT, USE_TMA=USE_TMA, BLOCK_D=BLOCK_D, KV_CAST=KV_CAST)
    # Paged KV: the block-table entries of tile j + 1 are read during tile j and
    # carried, so the K/V addresses of a step depend on no load of the same step,
    # and Triton's software pipeliner keeps two tiles of K/V in flight (3 buffers,
    # cp.async.wait_group 2). Read in the same step, the indirect load left it one
    # tile ahead with wait_group 0, and the loop waited on memory (H100: 15-19%
    # slower on every segmented workload; bench/results/logs). Dense KV reads no table.
    bt_row = BLOCK_TABLE + req * stride_bt
    if PAGED:
        page_next = tl.load(bt_row + (full_lo + offs_n) // PAGE_SIZE,
                            mask=full_lo + offs_n < full_hi, other=0)
    else:
        page_next = offs_n  # a placeholder of the same type, never read
    for start_n in range(full_lo, full_hi, BLOCK_N):  # seen in full by every row
        page = page_next
        if PAGED:
            ahead = start_n + BLOCK_N + offs_n
            page_next = tl.load(bt_row + ahead // PAGE_SIZE, mask=ahead < full_hi, other=0)
        acc, m_i, l_i = _attend_kv_tile(
            (acc, m_i, l_i), q, K, V, start_n, kv_start, loop_end, rows, req, hk, offs_n,
            offs_d, d_in, kv_row0, BLOCK_TABLE, stride_bt, k_strides, v_strides, qk_scale,
            cap_scale, window_left, PAGE_SIZE=PAGE_SIZE, PAGED=PAGED, EVEN_D=EVEN_D,
            MASKED=False, CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW, SOFT_CAP=SOFT_CAP,
            IEEE_DOT=IEEE_DOT, USE_TMA=USE_TMA, BLOCK_D=BLOCK_D, KV_CAST=KV_CAST, page_in=page,
            PAGES_GIVEN=PAGED)
    # causal diagonal and kv_len edge
    for start_n in tl.range(full_hi, loop_end, BLOCK_N, num_stages=BOUNDARY_STAGES):
        acc, m_i, l_i = _attend_kv_tile(
            (acc, m_i, l_i), q, K, V, start_n, kv_start, loop_end, rows, req, hk, offs_n,
            offs_d, d_in, kv_row0, BLOCK_TABLE, stride_bt, k_strides, v_strides, qk_scale,
            cap_scale, window_left, PAGE_SIZE=PAGE_SIZE, PAGED=PAGED, EVEN_D=EVEN_D,
            MASKED=True, CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW, SOFT_CAP=SOFT_CAP,
            IEEE_DOT=IEEE_DOT, USE_TMA=USE_TMA, BLOCK_D=BLOCK_D, KV_CAST=KV_CAST)

    if KV_SCALES != 0:
        acc = acc * v_s
    # l_i != 0 (not > 0): a NaN input row stays NaN instead of passing for "sees nothing".
    seen = valid & (l_i != 0.0)
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out = tl.where(seen[:, None], out, 0.0)
    # the natural-log lse from the log2-domain state: (m + log2 l) * ln 2
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    store_rows = in_tile if ZERO_FILL else valid
    if NUM_SPLITS > 1:
        # Split-KV: publish this split's state, count it in, and the last split of
        # the (tile, head stack) to arrive merges all of them, in this same launch
        # (no merge kernel: on the H100 machines its launch cost more host time
        # than the split saved GPU time on the launches small enough to split).
        # One fp32 workspace (one launch argument, as every tensor argument costs
        # host time at each launch): partial o [NUM_SPLITS, T, Hq, D], partial lse
        # [NUM_SPLITS, T, Hq], then one int32 arrival counter per (tile, head stack).
        ROW_L: tl.constexpr = NUM_HEAD_STACKS * STACKED_HEADS
        ROW_O: tl.constexpr = ROW_L * HEAD_DIM
        # tl.cast, not num_rows.to(): a launch of one row passes num_rows == 1,
        # which Triton turns into a compile-time int with no .to() (issue 14).
        rows64 = tl.cast(num_rows, tl.int64)
        split_stride_o = rows64 * ROW_O
        split_stride_l = rows64 * ROW_L
        O_SPLIT = SPLIT_WS
        LSE_SPLIT = SPLIT_WS + NUM_SPLITS * split_stride_o
        SPLIT_SEM = (LSE_SPLIT + NUM_SPLITS * split_stride_l).to(tl.pointer_type(tl.int32),
                                                                 bitcast=True)
        split64 = split.to(tl.int64)
        split_o = O_SPLIT + split64 * split_stride_o + row64[:, None] * ROW_O + \
            head[:, None] * HEAD_DIM + offs_d[None, :]
        split_lse = LSE_SPLIT + split64 * split_stride_l + row64 * ROW_L + head
        tl.store(split_o, out, mask=valid[:, None] & d_in[None, :])
        tl.store(split_lse, lse, mask=valid)
        # Every thread's stores precede the counter's release (Triton's stream-K
        # tutorial publishes partial tiles the same way).
        tl.debug_barrier()
        arrived = tl.atomic_add(SPLIT_SEM + pid, 1, sem="acq_rel")
        if arrived == NUM_SPLITS - 1:
            out, lse = merge_states_tile(
                O_SPLIT + row64[:, None] * ROW_O + head[:, None] * HEAD_DIM + offs_d[None, :],
                LSE_SPLIT + row64 * ROW_L + head, split_stride_o, split_stride_l, NUM_SPLITS,
                valid, valid[:, None] & d_in[None, :], BLOCK_M, BLOCK_D)
            _store_rows(O, LSE, out, lse, row64, head, offs_d, store_rows, d_in, o_strides,
                        lse_strides, RETURN_LSE)
    else:
        _store_rows(O, LSE, out, lse, row64, head, offs_d, store_rows, d_in, o_strides,
                    lse_strides, RETURN_LSE)


@triton.jit
def _store_rows(O, LSE, out, lse, row64, head, offs_d, store_rows, d_in, o_strides, lse_strides,
                RETURN_LSE: tl.constexpr):
    """Write a tile's final rows (and their lse) where ``store_rows``."""
    stride_ot, stride_oh = o_strides
    stride_lt, stride_lh = lse_strides
    tl.store(O + row64[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=store_rows[:, None] & d_in[None, :])
    if RETURN_LSE:
        tl.store(LSE + row64 * stride_lt + head * stride_lh, lse, mask=store_rows)


def _kv_descriptor(x: torch.Tensor, block_n: int):
    """A descriptor over dense ``[N, Hk, D]`` rows viewed as ``[N, Hk * D]``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, hk, d = x.shape
    return TensorDescriptor(x, [n, hk * d], [x.stride(0), 1], [block_n, d])


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    plan,
    launch,
    sm_scale: float,
    causal: bool,
    positions: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    zero_fill: bool = False,
    kv_start: torch.Tensor | None = None,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
):
    """Launch the attention kernel over a tile plan, exactly as ``launch`` decided.

    Parameters
    ----------
    q : [T, Hq, D] fp16|bf16|fp32, packed query rows (last dim contiguous)
    k, v : paged ``[num_pages, page_size, Hk, D]`` when ``block_table`` is given,
        else dense ``[N, Hk, D]`` rows addressed as ``plan.kv_row0[b] + pos``
    out : [T, Hq, D] q.dtype, written for every valid row (every tile row with
        ``zero_fill``; padded rows get 0)
    lse : [T, Hq] fp32 or None
    plan : :class:`spanfill.layout.TilePlan` built with ``launch.block_q``; a row of
        request ``b`` sees no KV position at or past ``plan.kv_len[b]``
    launch : :class:`spanfill.backends.LaunchConfig` from the portable backend's
        ``select_config`` (or :func:`spanfill.backends.triton_config.launch_config`):
        tiles, split count (``num_splits`` programs share each tile's KV range and
        write ``num_splits * T * Hq * (D + 1)`` fp32 partial states, merged by the
        last to finish in the same launch), descriptors, boundary stages, exact dots
    sm_scale : softmax scale
    causal : row at ``pos`` sees positions ``<= pos``
    positions : [T] int32 or None (rows at ``0, 1, ...`` within a request)
    block_table : [B, max_pages] int32 or None (dense KV)
    zero_fill : write 0 / -inf on tile rows that are not valid rows (padding)
    kv_start : [B] int32 or None: request ``b`` sees no KV position below ``kv_start[b]``
        (its pages there need not exist: a shard of the cache)
    window_left : if >= 0, a row at ``pos`` sees no position below ``pos - window_left``
    logits_soft_cap : if > 0, scores become ``cap * tanh(score / cap)``
    k_scale, v_scale : fp8 K/V (any other dtype than q's is widened to q's after each
        load): the numbers stored values are multiplied by, both floats or both fp32
        tensors of shape [], [1] or [Hk]; None for K/V in q's dtype
    k_new, v_new : [T, Hk, D] (paged KV with ``positions`` only): the rows' new K/V,
        written into the cache at ``slot_mapping`` ([T] int64, -1: not written) and
        attended in this same launch (:mod:`spanfill.kernels.fused_append`)

    Returns
    -------
    Triton's handle of the launched kernel (its ``n_regs``/``n_spills`` feed the
    tuning notes).
    """
    cfg, num_splits = launch.tile, launch.num_splits
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[-2]
    paged = block_table is not None
    if launch.use_tma and paged:
        raise ValueError("a launch with use_tma needs dense KV (block_table=None)")
    if paged:
        page_size = k.shape[1]
        k_strides, v_strides = (k.stride(0), k.stride(1), k.stride(2)), \
            (v.stride(0), v.stride(1), v.stride(2))
        bt, stride_bt = block_table, block_table.stride(0)
    else:
        page_size = 1
        k_strides, v_strides = (0, k.stride(0), k.stride(1)), (0, v.stride(0), v.stride(1))
        bt, stride_bt = plan.kv_len, 0  # never read: PAGED is False
    if num_splits > 1:
        # The split workspace (see _attn_fwd_kernel): partial o and lse, left
        # uninitialised, then the arrival counters, zeroed for every launch (a
        # replayed CUDA graph zeroes them again).
        rows = q.shape[0]
        n_float = num_splits * rows * num_q_heads * (head_dim + 1)
        split_ws = torch.empty(n_float + plan.num_tiles * (num_q_heads // cfg.heads),
                               dtype=torch.float32, device=q.device)
        split_ws[n_float:].zero_()  # all-zero bits: int32 0
        num_rows = rows
    else:
        split_ws, num_rows = out, 0  # never read
    lse_arg = lse if lse is not None else out
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    soft_cap = logits_soft_cap > 0
    # With soft-capping the score is scaled twice: by sm_scale / cap inside tanh,
    # then by cap * log2(e); otherwise once, by sm_scale * log2(e).
    qk_scale = logits_soft_cap * LOG2E if soft_cap else sm_scale * LOG2E
    cap_scale = sm_scale / logits_soft_cap if soft_cap else 1.0
    head_stacks = num_q_heads // cfg.heads
    k_arg, v_arg = (_kv_descriptor(k, cfg.block_n), _kv_descriptor(v, cfg.block_n)) \
        if launch.use_tma else (k, v)
    kv_scales, k_scale, v_scale, scale_stride = kv_scale_args(k_scale, v_scale)
    fused = k_new is not None
    fp8 = None
    if fused:
        if not paged or positions is None or v_new is None or slot_mapping is None:
            raise ValueError("k_new/v_new need paged KV, positions, v_new and slot_mapping")
        new = (k_new, v_new, slot_mapping, k_new.stride(0), k_new.stride(1), v_new.stride(0),
               v_new.stride(1))
        if kv_scales:
            fp8 = FP8_FORMATS[k.dtype]
    else:
        new = None  # a None argument is a constant: the kernel without append is unchanged
    plan_arrays = (plan.tile_req, plan.tile_row0, plan.tile_row_end, plan.q_start, plan.q_len,
                   plan.kv_row0, plan.kv_len, kv_start if kv_start is not None else plan.kv_len)
    grid = (plan.num_tiles * head_stacks * num_splits,)
    return _attn_fwd_kernel[grid](
        q, k_arg, v_arg, out, lse_arg, split_ws,
        positions if positions is not None else plan.q_start,
        plan_arrays, bt,
        qk_scale, cap_scale, window_left,
        (q.stride(0), q.stride(1)), (out.stride(0), out.stride(1)), lse_strides,
        num_rows,
        k_strides, v_strides,
        stride_bt,
        k_scale, v_scale, scale_stride, new,
        GQA_GROUP=num_q_heads // num_kv_heads, STACKED_HEADS=cfg.heads, HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE_SIZE=page_size, CAUSAL=causal, PAGED=paged,
        HAS_POSITIONS=positions is not None, HAS_KV_START=kv_start is not None,
        HAS_WINDOW=window_left >= 0, SOFT_CAP=soft_cap, RETURN_LSE=lse is not None,
        ZERO_FILL=zero_fill, IEEE_DOT=launch.ieee_dot,
        EVEN_D=triton.next_power_of_2(head_dim) == head_dim, USE_TMA=launch.use_tma,
        NUM_HEAD_STACKS=head_stacks, BOUNDARY_STAGES=launch.boundary_stages,
        NUM_SPLITS=num_splits, KV_CAST=k.dtype != q.dtype, KV_SCALES=kv_scales,
        FUSED_APPEND=fused, FP8_LIMIT=fp8 and fp8[0], FP8_MANTISSA_BITS=fp8 and fp8[1],
        FP8_MIN_EXPONENT=fp8 and fp8[2],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
