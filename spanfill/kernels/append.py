"""KV append: copy each new token's K/V rows into its paged-cache slot (quantizing for fp8)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .scales import kv_scale_args

# fp8 cache formats: (largest finite value, mantissa bits, exponent of the smallest normal)
FP8_FORMATS = {
    torch.float8_e4m3fn: (448.0, 3, -6),
    torch.float8_e5m2: (57344.0, 2, -14),
}


@triton.jit
def _round_to_fp8_grid(x, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """``x`` (fp32) rounded to nearest even on the grid of an fp8 format, still in fp32.

    The cast to fp8 that follows is then exact, so the result does not depend on the
    conversion's own rounding: Triton's interpreter rounds fp32 -> fp8 half-up and
    drops the carry into the exponent (31.7 became 16 in e4m3), while the GPU's
    ``cvt.rn`` is right; both now give torch's bits. The grid step is
    ``2^(max(e, MIN_EXPONENT) - MANTISSA_BITS)`` for ``2^e <= |x| < 2^(e+1)``
    (subnormals share the smallest normal binade's step).
    """
    bits = x.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, MIN_EXPONENT)
    # The step and its inverse built from their bits: powers of two, so scaling by them
    # is exact (a division would be approximate on the GPU).
    step = ((exponent - MANTISSA_BITS + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - exponent + MANTISSA_BITS) << 23).to(tl.float32, bitcast=True)
    y = x * inv_step  # |y| < 2^(MANTISSA_BITS + 1)
    # Adding and removing 1.5 * 2^23 rounds |y| < 2^22 to an integer, ties to even.
    rounded = (y + 12582912.0) - 12582912.0
    # A negative value that rounds to zero is -0 in torch; the sum above gave +0.
    # The sign bit of x is right for every result (rounding keeps the sign).
    magnitude = (rounded * step).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return (magnitude | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _quantize(x, scale, offs_h, num_heads, scale_stride, KV_SCALES: tl.constexpr,
              LIMIT: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr,
              dtype: tl.constexpr):
    """``x / scale`` saturated at +-``LIMIT`` (the fp8 format's largest finite value) and
    rounded to nearest even in ``dtype``, as :func:`spanfill.reference.quantize_kv`;
    ``x`` is ``[BLOCK_H, BLOCK_D]``, one row per KV head ``offs_h``."""
    if KV_SCALES == 1:
        s = tl.full(offs_h.shape, 1.0, tl.float32) * scale
    else:
        s = tl.load(scale + offs_h * scale_stride, mask=offs_h < num_heads, other=1.0)
    # div_rn: the IEEE quotient torch computes (Triton's "/" is approximate on the GPU).
    scaled = tl.math.div_rn(x.to(tl.float32), tl.broadcast_to(s[:, None], x.shape))
    # NaN stays NaN, as in torch's clamp (a bad K/V must not pass for a saturated one).
    scaled = tl.minimum(tl.maximum(scaled, -LIMIT, propagate_nan=tl.PropagateNan.ALL), LIMIT,
                        propagate_nan=tl.PropagateNan.ALL)
    stored = _round_to_fp8_grid(scaled, MANTISSA_BITS, MIN_EXPONENT).to(dtype)
    # NaN explicitly (0x7F is a NaN in e4m3fn and e5m2): the interpreter's conversion
    # turns NaN into 384.
    nan = tl.full(x.shape, 0x7F, tl.uint8).to(dtype, bitcast=True)
    return tl.where(scaled != scaled, nan, stored)


@triton.jit
def _append_kv_kernel(
    K_NEW, V_NEW, K_CACHE, V_CACHE, SLOTS,
    stride_knt, stride_knh, stride_vnt, stride_vnh,
    stride_kpage, stride_krow, stride_kh, stride_vpage, stride_vrow, stride_vh,
    page_size, num_heads,
    k_scale, v_scale, scale_stride,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_SCALES: tl.constexpr, FP8_LIMIT: tl.constexpr, FP8_MANTISSA_BITS: tl.constexpr,
    FP8_MIN_EXPONENT: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + token).to(tl.int64)
    if slot < 0:
        return
    page = slot // page_size
    offset = slot % page_size
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K_NEW + token * stride_knt + offs_h[:, None] * stride_knh + offs_d[None, :],
                mask=mask)
    v = tl.load(V_NEW + token * stride_vnt + offs_h[:, None] * stride_vnh + offs_d[None, :],
                mask=mask)
    if KV_SCALES != 0:  # an fp8 cache
        k = _quantize(k, k_scale, offs_h, num_heads, scale_stride, KV_SCALES, FP8_LIMIT,
                      FP8_MANTISSA_BITS, FP8_MIN_EXPONENT, K_CACHE.dtype.element_ty)
        v = _quantize(v, v_scale, offs_h, num_heads, scale_stride, KV_SCALES, FP8_LIMIT,
                      FP8_MANTISSA_BITS, FP8_MIN_EXPONENT, V_CACHE.dtype.element_ty)
    tl.store(K_CACHE + page * stride_kpage + offset * stride_krow + offs_h[:, None] * stride_kh
             + offs_d[None, :], k.to(K_CACHE.dtype.element_ty), mask=mask)
    tl.store(V_CACHE + page * stride_vpage + offset * stride_vrow + offs_h[:, None] * stride_vh
             + offs_d[None, :], v.to(V_CACHE.dtype.element_ty), mask=mask)


def append_kv_launch(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> None:
    """Write ``k_new[t]``/``v_new[t]`` into slot ``slot_mapping[t]`` (skip -1).

    Parameters
    ----------
    k_new, v_new : [T, Hk, D] (last dim contiguous)
    k_cache, v_cache : [num_pages, page_size, Hk, D] (last dim contiguous)
    slot_mapping : [T] int64
    k_scale, v_scale : an fp8 cache's scales (both floats, or fp32 tensors of shape [],
        [1] or [Hk]): the cache gets ``new / scale`` saturated at the format's largest
        finite value, as :func:`spanfill.reference.quantize_kv`. None: a plain cast.
    """
    num_tokens, num_heads, head_dim = k_new.shape
    if num_tokens == 0:
        return
    kv_scales, k_scale, v_scale, scale_stride = kv_scale_args(k_scale, v_scale)
    fp8 = FP8_FORMATS.get(k_cache.dtype) if kv_scales else None
    if kv_scales and fp8 is None:
        raise TypeError(f"k_scale/v_scale need an fp8 cache, got {k_cache.dtype}")
    block_d = triton.next_power_of_2(head_dim)
    # ~4K elements per program: wide 16-byte accesses without register pressure.
    block_h = min(triton.next_power_of_2(num_heads), max(1, 4096 // block_d))
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _append_kv_kernel[grid](
        k_new, v_new, k_cache, v_cache, slot_mapping,
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], num_heads,
        k_scale, v_scale, scale_stride,
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, KV_SCALES=kv_scales,
        FP8_LIMIT=fp8[0] if fp8 else None, FP8_MANTISSA_BITS=fp8[1] if fp8 else None,
        FP8_MIN_EXPONENT=fp8[2] if fp8 else None,
        num_warps=4,
    )
