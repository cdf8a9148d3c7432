"""The softmax's ``2 ** x``, some of it on the FMA units instead of the MUFU.

Why: at D=64 an SM's tensor cores and its MUFU take the same time per score. A score
costs ``4 * D`` flops of wgmma (QK^T and PV); the H200 does 4,096 bf16 flops a clock
per SM, so that is 1/16 clock at D=64. Its exponential costs one ``MUFU.EX2``, and the
MUFU does 16 a clock per SM: also 1/16 clock. The two pipes must then both run flat
out to keep up, which they never do. The FMA units, which do 128 fp32 operations a
clock, have room. So some of the exponentials are computed there as a polynomial, as
FlashAttention-4 does on Blackwell (the technique; the code and its constants are
ours).

The polynomial, for ``x <= 0`` (the softmax's ``s * scale - max``):

- ``x`` is clamped to -127 (``-inf``, a masked score, becomes -127);
- ``j = round(x)``, by adding and subtracting ``1.5 * 2**23``. The integer ``j`` is
  then in the low bits of the sum;
- ``f = x - j`` is in ``[-1/2, 1/2]``, and ``2**f = 1 + f (c1 + f (c2 + f c3))``, with
  a relative error under 1.1e-4 (:data:`POLY_EXP2_COEFFS`). That is 1/36 of a bf16
  ulp and 1/5 of an fp16 one;
- ``2**x = 2**f * 2**j``: ``j << 23`` is added to the bits of ``2**f``.

Exact where it matters: ``2**0 = 1``, and a clamped ``-inf`` gives ``1`` with ``j =
-127``, which is bits 0: the float ``+0.0``, as the MUFU gives. So masked scores add
nothing, and a row with every score masked keeps a zero sum. Results under ``2**-126``
come out as denormals or 0, where the MUFU (``.ftz``) gives 0. Neither matters next to
the row's maximum, which is 1.

The PTX takes ``PACK`` fp32 values at a time; of each ``PACK``, the last ``poly`` go
through the polynomial and the others through ``ex2.approx.ftz.f32``. Which elements
they are does not matter: only the share does.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

__all__ = ["POLY_EXP2_COEFFS", "PACK", "poly_exp2_ptx", "softmax_exp2"]

# c1, c2, c3 of 2**f - 1 = f (c1 + f (c2 + f c3)) on [-1/2, 1/2] (fp32 bits), fitted by
# reweighted least squares to a largest relative error of 1.02e-4
# (tests/test_exp2_poly.py checks it, in fp32, with the clamp and the rounding).
POLY_EXP2_COEFFS = (0x3F317AFD, 0x3E7805FF, 0x3D6150AE)
# Values per call of the PTX: the share taken by the polynomial goes in eighths.
PACK = 8


def _f32(bits: int) -> str:
    return f"0f{bits:08X}"


def poly_exp2_ptx(poly: int, pack: int = PACK) -> str:
    """PTX for ``gl.inline_asm_elementwise`` (``pack`` values, ``$0..`` out and
    ``$pack..`` in): ``poly`` of them by the polynomial, the rest by the MUFU."""
    if not 0 <= poly <= pack:
        raise ValueError(f"poly must be 0..{pack}, got {poly}")
    c1, c2, c3 = (_f32(c) for c in POLY_EXP2_COEFFS)
    lines = ["{", ".reg .b32 x, r, f, p, e;"]
    for i in range(pack):
        out, arg = f"${i}", f"${pack + i}"
        if i < pack - poly:
            lines.append(f"ex2.approx.ftz.f32 {out}, {arg};")
            continue
        lines += [
            f"max.ftz.f32 x, {arg}, {_f32(0xC2FE0000)};",  # -127
            f"add.rn.ftz.f32 r, x, {_f32(0x4B400000)};",  # 1.5 * 2**23 + round(x)
            f"sub.rn.ftz.f32 f, r, {_f32(0x4B400000)};",  # round(x)
            "sub.rn.ftz.f32 f, x, f;",  # x - round(x), in [-1/2, 1/2]
            f"fma.rn.ftz.f32 p, f, {c3}, {c2};",
            f"fma.rn.ftz.f32 p, p, f, {c1};",
            f"fma.rn.ftz.f32 p, p, f, {_f32(0x3F800000)};",  # 2**f
            "shl.b32 e, r, 23;",  # round(x) << 23: the sum's high bits shift out
            f"add.s32 {out}, p, e;",  # 2**f * 2**round(x)
        ]
    lines.append("}")
    return " ".join(lines)


# One constexpr a share (a jit function reads module constants only as constexprs).
_PTX_1: gl.constexpr = gl.constexpr(poly_exp2_ptx(1))
_PTX_2: gl.constexpr = gl.constexpr(poly_exp2_ptx(2))
_PTX_3: gl.constexpr = gl.constexpr(poly_exp2_ptx(3))
_PTX_4: gl.constexpr = gl.constexpr(poly_exp2_ptx(4))
_CONSTRAINTS: gl.constexpr = gl.constexpr(",".join(["=r"] * PACK + ["r"] * PACK))
_PACK: gl.constexpr = gl.constexpr(PACK)


@gluon.jit
def softmax_exp2(x, POLY: gl.constexpr = 0):
    """``2 ** x`` of an fp32 tensor whose values are ``<= 0`` or ``-inf`` (with ``POLY``;
    ``gl.exp2`` without): ``POLY`` of every 8 by the polynomial (0 to 4), the rest by
    the MUFU. The tensor's elements per thread must be a multiple of 8."""
    gl.static_assert(POLY >= 0 and POLY <= 4, "POLY is 0..4 (eighths)")
    if POLY == 0:
        y = gl.exp2(x)
    elif POLY == 1:
        y = gl.inline_asm_elementwise(_PTX_1, _CONSTRAINTS, [x], dtype=gl.float32,
                                      is_pure=True, pack=_PACK)
    elif POLY == 2:
        y = gl.inline_asm_elementwise(_PTX_2, _CONSTRAINTS, [x], dtype=gl.float32,
                                      is_pure=True, pack=_PACK)
    elif POLY == 3:
        y = gl.inline_asm_elementwise(_PTX_3, _CONSTRAINTS, [x], dtype=gl.float32,
                                      is_pure=True, pack=_PACK)
    else:
        y = gl.inline_asm_elementwise(_PTX_4, _CONSTRAINTS, [x], dtype=gl.float32,
                                      is_pure=True, pack=_PACK)
    return y
