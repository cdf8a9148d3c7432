"""Merging partial attention states: ``o = sum_i exp(lse_i - lse) o_i``, ``lse = logsumexp_i lse_i``.

One program per (query row, block of heads) reads every state's ``lse`` and
``o`` once (an online merge with a running max), so the merge costs one pass
over its inputs. A state with ``lse = -inf`` has weight 0 and its ``o`` is never
multiplied in, so garbage there (even NaN) cannot leak; a row where every state
is ``-inf`` gives ``o = 0`` and ``lse = -inf``. A NaN ``lse`` or a NaN ``o`` of a
state with weight propagates to the row (a bad input stays visible).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _finish(acc, denom, m, O_OUT, LSE_OUT, row, offs_h, offs_d, mask_h, mask_hd,
            stride_out_t, stride_out_h, stride_lse_out_t):
    """Normalise and store; rows with no weight get o = 0, lse = -inf."""
    # `!= 0` rather than `> 0`: a NaN state makes denom NaN, and NaN must propagate.
    seen = denom != 0.0  # [BLOCK_H]
    o = acc / tl.where(seen, denom, 1.0)[:, None]  # [BLOCK_H, BLOCK_D]
    lse = tl.where(seen, m + tl.log(tl.where(seen, denom, 1.0)), float("-inf"))
    tl.store(O_OUT + row * stride_out_t + offs_h[:, None] * stride_out_h + offs_d[None, :],
             o.to(O_OUT.dtype.element_ty), mask=mask_hd)
    tl.store(LSE_OUT + row * stride_lse_out_t + offs_h, lse, mask=mask_h)


@triton.jit
def merge_states_tile(
    o_ptrs, lse_ptrs, stride_o, stride_lse, num_states, row_mask, elem_mask,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge ``num_states`` states of a ``[ROWS, BLOCK_D]`` tile, online (running max).

    State ``i`` of the tile is ``o_ptrs + i * stride_o`` ([ROWS, BLOCK_D]) and
    ``lse_ptrs + i * stride_lse`` ([ROWS], natural log). Shared by the merge kernel
    below (a row's heads) and the attention kernel's split-KV merge (a tile's rows
    and heads). The loads skip L1 (``.cg``): in split-KV, other SMs wrote the states
    during the same launch. Returns ``(o, lse)`` in fp32: 0 and -inf where
    ``row_mask`` is off or no state has weight.
    """
    m = tl.full([ROWS], float("-inf"), tl.float32)
    denom = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for i in range(num_states):
        lse_i = tl.load(lse_ptrs + i * stride_lse, mask=row_mask, other=float("-inf"),
                        cache_modifier=".cg")
        o_i = tl.load(o_ptrs + i * stride_o, mask=elem_mask, other=0.0,
                      cache_modifier=".cg").to(tl.float32)
        m_new = tl.maximum(m, lse_i)
        # A finite stand-in while every state so far is -inf: exp2(-inf - 0) = 0, no NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m - m_safe) * LOG2E)
        w = tl.exp2((lse_i - m_safe) * LOG2E)  # [ROWS]
        acc = acc * alpha[:, None] + tl.where(w[:, None] == 0.0, 0.0, w[:, None] * o_i)
        denom = denom * alpha + w
        m = m_new
    # `!= 0` rather than `> 0`: a NaN state makes denom NaN, and NaN must propagate.
    seen = row_mask & (denom != 0.0)
    o = tl.where(seen[:, None], acc / tl.where(seen, denom, 1.0)[:, None], 0.0)
    lse = tl.where(seen, tl.where(m == float("-inf"), 0.0, m) + tl.log(tl.where(seen, denom, 1.0)),
                   float("-inf"))
    return o, lse


@triton.jit
def _merge_n_kernel(
    O, LSE, O_OUT, LSE_OUT,
    stride_ot, stride_on, stride_oh, stride_lt, stride_ln, stride_lh,
    stride_out_t, stride_out_h, stride_lse_out_t,
    num_states, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < num_heads
    mask_hd = mask_h[:, None] & (offs_d[None, :] < HEAD_DIM)
    o, lse = merge_states_tile(
        O + row * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
        LSE + row * stride_lt + offs_h * stride_lh, stride_on, stride_ln, num_states,
        mask_h, mask_hd, BLOCK_H, BLOCK_D)
    tl.store(O_OUT + row * stride_out_t + offs_h[:, None] * stride_out_h + offs_d[None, :],
             o.to(O_OUT.dtype.element_ty), mask=mask_hd)
    tl.store(LSE_OUT + row * stride_lse_out_t + offs_h, lse, mask=mask_h)


@triton.jit
def _merge_2_kernel(
    O_A, LSE_A, O_B, LSE_B, O_OUT, LSE_OUT,
    stride_at, stride_ah, stride_lat, stride_lah,
    stride_bt, stride_bh, stride_lbt, stride_lbh,
    stride_out_t, stride_out_h, stride_lse_out_t,
    num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < num_heads
    mask_hd = mask_h[:, None] & (offs_d[None, :] < HEAD_DIM)
    lse_a = tl.load(LSE_A + row * stride_lat + offs_h * stride_lah, mask=mask_h,
                    other=float("-inf"))
    lse_b = tl.load(LSE_B + row * stride_lbt + offs_h * stride_lbh, mask=mask_h,
                    other=float("-inf"))
    m = tl.maximum(lse_a, lse_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp2((lse_a - m_safe) * LOG2E)  # [BLOCK_H]
    w_b = tl.exp2((lse_b - m_safe) * LOG2E)
    o_a = tl.load(O_A + row * stride_at + offs_h[:, None] * stride_ah + offs_d[None, :],
                  mask=mask_hd, other=0.0).to(tl.float32)
    o_b = tl.load(O_B + row * stride_bt + offs_h[:, None] * stride_bh + offs_d[None, :],
                  mask=mask_hd, other=0.0).to(tl.float32)
    acc = tl.where(w_a[:, None] == 0.0, 0.0, w_a[:, None] * o_a) \
        + tl.where(w_b[:, None] == 0.0, 0.0, w_b[:, None] * o_b)  # [BLOCK_H, BLOCK_D]
    _finish(acc, w_a + w_b, m_safe, O_OUT, LSE_OUT, row, offs_h, offs_d, mask_h, mask_hd,
            stride_out_t, stride_out_h, stride_lse_out_t)


def _blocks(num_heads: int, head_dim: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(head_dim)
    # ~2K fp32 accumulators per program: enough bytes in flight, no spills.
    block_h = min(triton.next_power_of_2(num_heads), max(1, 2048 // block_d))
    return block_h, block_d


def merge_states_launch(
    o: torch.Tensor, lse: torch.Tensor, o_out: torch.Tensor, lse_out: torch.Tensor
) -> None:
    """Merge ``N`` states per row into ``o_out``/``lse_out``.

    Parameters
    ----------
    o : [T, N, H, D] fp16|bf16|fp32, any strides with the last dim contiguous (so a
        ``[N, T, H, D]`` stack can be passed as ``stack.transpose(0, 1)``)
    lse : [T, N, H] fp32, natural log
    o_out : [T, H, D], last dim contiguous
    lse_out : [T, H] fp32, last dim contiguous
    """
    num_tokens, num_states, num_heads, head_dim = o.shape
    if num_tokens == 0 or num_heads == 0:
        return
    block_h, block_d = _blocks(num_heads, head_dim)
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _merge_n_kernel[grid](
        o, lse, o_out, lse_out,
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        o_out.stride(0), o_out.stride(1), lse_out.stride(0),
        num_states, num_heads,
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )


def merge_two_launch(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor,
    o_out: torch.Tensor, lse_out: torch.Tensor,
) -> None:
    """Merge two states per row into ``o_out``/``lse_out``.

    Parameters
    ----------
    o_a, o_b : [T, H, D] fp16|bf16|fp32, last dim contiguous
    lse_a, lse_b : [T, H] fp32
    o_out : [T, H, D], last dim contiguous
    lse_out : [T, H] fp32, last dim contiguous
    """
    num_tokens, num_heads, head_dim = o_a.shape
    if num_tokens == 0 or num_heads == 0:
        return
    block_h, block_d = _blocks(num_heads, head_dim)
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _merge_2_kernel[grid](
        o_a, lse_a, o_b, lse_b, o_out, lse_out,
        o_a.stride(0), o_a.stride(1), lse_a.stride(0), lse_a.stride(1),
        o_b.stride(0), o_b.stride(1), lse_b.stride(0), lse_b.stride(1),
        o_out.stride(0), o_out.stride(1), lse_out.stride(0),
        num_heads,
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )
