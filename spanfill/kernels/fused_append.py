"""Append inside attention: the piece :func:`attention_fwd` uses with ``k_new``/``v_new``.

One launch writes the span tokens' new K/V into the cache and attends over cached plus
new KV. Programs of one launch cannot wait for each other's writes, so every program
writes, itself, the new rows of its request that its KV loop will read (its KV head,
positions in ``[pos_lo, pos_hi)``), then waits at a CTA barrier; after it, its loads
see its own stores (the CUDA memory model's ``__syncthreads`` rule), and the KV loops
are those of a launch without append, reading the new rows from the cache like any
cached row.

Several programs write the same new row: the same bytes (the same inputs through the
same arithmetic, fp8 rounding included) to the same slot. A program that reads a slot
while another is writing it reads those bytes either way. Every new row is written by
at least the programs of its own tile, whose loops reach its position.

The cost: a request's new rows are written once per tile that reads them, about
``rows * tiles / 2`` row writes per KV head. On the H200 (``docs/performance.md``) that
is parity with two launches at the demo's 320 new rows and 1.4-1.9x their GPU time at
1-2k new rows per request.

Why not take the new rows from ``k_new``/``v_new`` inside the loop instead (the first
version): merging them into each loaded tile puts a select between the load and the
dot, so K/V cannot go straight from the async copy to the dot's shared memory, and
the per-tile search for new positions ran on every tile. On the H200 that made the
whole fill-holes step 1.4 ms slower in GPU time than two launches
(``bench/results/fill_holes_h200_e24d028.csv``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .append import _quantize

__all__ = ["write_new_rows"]

# Above every real position (the same sentinel as the attention kernel's POSITION_MAX).
_NO_ROW: tl.constexpr = tl.constexpr(2147483646)


@triton.jit
def _write_rows(K, V, new, k_strides, v_strides, row, lane, hk, offs_d, d_in,
                k_scale, v_scale, scale_stride, PAGE_SIZE: tl.constexpr,
                KV_SCALES: tl.constexpr, FP8_LIMIT: tl.constexpr,
                FP8_MANTISSA_BITS: tl.constexpr, FP8_MIN_EXPONENT: tl.constexpr):
    """Write KV head ``hk`` of the rows ``row`` where ``lane`` into their cache slots
    (slot -1: skipped), as :func:`spanfill.kernels.append_kv_launch` does."""
    K_NEW, V_NEW, SLOTS, stride_knt, stride_knh, stride_vnt, stride_vnh = new
    stride_kpage, stride_krow, stride_kh = k_strides
    stride_vpage, stride_vrow, stride_vh = v_strides
    row64 = row.to(tl.int64)
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


@triton.jit
def write_new_rows(K, V, POSITIONS, new, k_strides, v_strides, q_start, q_stop, pos_lo,
                   pos_hi, hk, offs_d, d_in, k_scale, v_scale, scale_stride,
                   PAGE_SIZE: tl.constexpr, KV_SCALES: tl.constexpr, FP8_LIMIT: tl.constexpr,
                   FP8_MANTISSA_BITS: tl.constexpr, FP8_MIN_EXPONENT: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Write KV head ``hk`` of the request's new rows ``[q_start, q_stop)`` whose
    position lies in ``[pos_lo, pos_hi)`` into the cache, then a CTA barrier, so the
    program's KV loop that follows reads them (see the module docstring).

    ``new`` is ``(K_NEW, V_NEW, SLOTS, stride_knt, stride_knh, stride_vnt, stride_vnh)``;
    ``k_strides``/``v_strides`` are the cache's ``(page, row, head)`` strides.
    """
    offs = tl.arange(0, BLOCK_N)
    for r0 in range(q_start, q_stop, BLOCK_N):
        rows = r0 + offs
        in_req = rows < q_stop
        p = tl.load(POSITIONS + rows, mask=in_req, other=_NO_ROW)
        lane = in_req & (p >= pos_lo) & (p < pos_hi)
        _write_rows(K, V, new, k_strides, v_strides, rows, lane, hk, offs_d, d_in, k_scale,
                    v_scale, scale_stride, PAGE_SIZE, KV_SCALES, FP8_LIMIT, FP8_MANTISSA_BITS,
                    FP8_MIN_EXPONENT)
    # Every thread's stores before any thread's loads of the KV loop.
    tl.debug_barrier()
