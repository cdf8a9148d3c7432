"""Append inside attention: the pieces :func:`attention_fwd` uses with ``k_new``/``v_new``.

One launch writes the span tokens' new K/V into the cache and attends over cached plus
new KV. Programs of one launch cannot wait for each other's writes, so no program
reads a new token's K/V from the cache: for every KV tile it finds which positions
are new tokens of its request and takes their K/V from ``k_new``/``v_new`` instead
(quantized first for an fp8 cache, so the values are those the cache will hold). The
cache is written by one program per (tile, KV head): the first head stack of the KV
head, split 0, writes its tile's rows.

The new rows of a request are sorted by position (strictly increasing), so those
inside a KV tile ``[start, start + BLOCK_N)`` are a run of at most ``BLOCK_N`` rows
starting at the first row whose position is ``>= start``. The KV loop visits tiles in
increasing order and carries that row index along.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .append import _quantize

__all__ = ["first_new_row", "new_kv_tile", "write_new_rows"]

# Above every real position (the same sentinel as the attention kernel's POSITION_MAX).
_NO_ROW: tl.constexpr = tl.constexpr(2147483646)


@triton.jit
def first_new_row(POSITIONS, q_start, q_stop, pos_begin, BLOCK_N: tl.constexpr):
    """The first row of ``[q_start, q_stop)`` whose position is ``>= pos_begin``."""
    offs = tl.arange(0, BLOCK_N)
    count = tl.zeros([], dtype=tl.int32)
    for r in range(q_start, q_stop, BLOCK_N):
        rows = r + offs
        p = tl.load(POSITIONS + rows, mask=rows < q_stop, other=_NO_ROW)
        count += tl.sum((p < pos_begin).to(tl.int32), axis=0)
    return q_start + count


@triton.jit
def new_kv_tile(POSITIONS, new, r_ptr, q_stop, start_n, offs_n, offs_d, d_in, hk,
                k_scale, v_scale, scale_stride, cache_dtype: tl.constexpr,
                KV_SCALES: tl.constexpr, FP8_LIMIT: tl.constexpr,
                FP8_MANTISSA_BITS: tl.constexpr, FP8_MIN_EXPONENT: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The new tokens among KV positions ``start_n + offs_n``: ``((is_new, k, v), r_next)``.

    ``is_new`` is False for a row whose slot is -1 (not stored: attention reads the
    cache there, as after a separate :func:`append_kv`).

    ``r_ptr`` is the request's first row with position ``>= start_n``; ``k``/``v`` are
    ``[BLOCK_N, BLOCK_D]`` in the cache's dtype (zero where not new), ``r_next`` the
    first row with position ``>= start_n + BLOCK_N``. ``new`` is ``(K_NEW, V_NEW,
    SLOTS, stride_knt, stride_knh, stride_vnt, stride_vnh)``.
    """
    K_NEW, V_NEW, SLOTS, stride_knt, stride_knh, stride_vnt, stride_vnh = new
    cand = r_ptr + offs_n
    p = tl.load(POSITIONS + cand, mask=cand < q_stop, other=_NO_ROW)  # sorted
    kv_pos = start_n + offs_n
    # Which candidate row (if any) holds each position: a [BLOCK_N, BLOCK_N] compare,
    # small next to the tile's two dots.
    match = p[None, :] == kv_pos[:, None]
    idx = tl.max(tl.where(match, cand[None, :], -1), axis=1)
    r_next = r_ptr + tl.sum((p < start_n + BLOCK_N).to(tl.int32), axis=0)
    idx64 = tl.maximum(idx, 0).to(tl.int64)
    # A row with slot -1 is not stored (append_kv skips it), so the cache keeps what it
    # holds there and attention reads that, as after a separate append; nobody writes it.
    slot = tl.load(SLOTS + idx64, mask=idx >= 0, other=-1)
    is_new = (idx >= 0) & (slot >= 0)
    mask = is_new[:, None] & d_in[None, :]
    k = tl.load(K_NEW + idx64[:, None] * stride_knt + hk * stride_knh + offs_d[None, :],
                mask=mask, other=0.0)
    v = tl.load(V_NEW + idx64[:, None] * stride_vnt + hk * stride_vnh + offs_d[None, :],
                mask=mask, other=0.0)
    if KV_SCALES != 0:  # an fp8 cache: the values it will hold
        heads = tl.zeros([BLOCK_N], dtype=tl.int64) + hk
        k = _quantize(k, k_scale, heads, hk + 1, scale_stride, KV_SCALES, FP8_LIMIT,
                      FP8_MANTISSA_BITS, FP8_MIN_EXPONENT, cache_dtype)
        v = _quantize(v, v_scale, heads, hk + 1, scale_stride, KV_SCALES, FP8_LIMIT,
                      FP8_MANTISSA_BITS, FP8_MIN_EXPONENT, cache_dtype)
    return (is_new, k.to(cache_dtype), v.to(cache_dtype)), r_next


@triton.jit
def write_new_rows(K, V, new, k_strides, v_strides, row, lane, hk, offs_d, d_in,
                   k_scale, v_scale, scale_stride, PAGE_SIZE: tl.constexpr,
                   KV_SCALES: tl.constexpr, FP8_LIMIT: tl.constexpr,
                   FP8_MANTISSA_BITS: tl.constexpr, FP8_MIN_EXPONENT: tl.constexpr):
    """Write KV head ``hk`` of the rows ``row`` where ``lane`` into their cache slots
    (slot -1: skipped), as :func:`spanfill.kernels.append_kv_launch` does."""
    K_NEW, V_NEW, SLOTS, stride_knt, stride_knh, stride_vnt, stride_vnh = new
    stride_kpage, stride_krow, stride_kh = k_strides
    stride_vpage, stride_vrow, stride_vh = v_strides
    row64 = row.to(tl.int64)
    # (!= 0: the interpreter carries this mask, combined with a scalar test, as int32 data)
    lane = lane != 0
    slot = tl.load(SLOTS + row64, mask=lane, other=-1).to(tl.int64)
    ok = lane & (slot >= 0)
    page = tl.where(ok, slot, 0) // PAGE_SIZE
    off = tl.where(ok, slot, 0) % PAGE_SIZE
    mask = ok[:, None] & d_in[None, :]
    k = tl.load(K_NEW + row64[:, None] * stride_knt + hk * stride_knh + offs_d[None, :],
                mask=mask, other=0.0)
    v = tl.load(V_NEW + row64[:, None] * stride_vnt + hk * stride_vnh + offs_d[None, :],
                mask=mask, other=0.0)
    if KV_SCALES != 0:
        heads = tl.zeros(row.shape, dtype=tl.int64) + hk
        k = _quantize(k, k_scale, heads, hk + 1, scale_stride, KV_SCALES, FP8_LIMIT,
                      FP8_MANTISSA_BITS, FP8_MIN_EXPONENT, K.dtype.element_ty)
        v = _quantize(v, v_scale, heads, hk + 1, scale_stride, KV_SCALES, FP8_LIMIT,
                      FP8_MANTISSA_BITS, FP8_MIN_EXPONENT, V.dtype.element_ty)
    tl.store(K + page[:, None] * stride_kpage + off[:, None] * stride_krow + hk * stride_kh
             + offs_d[None, :], k.to(K.dtype.element_ty), mask=mask)
    tl.store(V + page[:, None] * stride_vpage + off[:, None] * stride_vrow + hk * stride_vh
             + offs_d[None, :], v.to(V.dtype.element_ty), mask=mask)

