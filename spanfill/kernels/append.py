"""KV append: copy each new token's K/V rows into its paged-cache slot."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _append_kv_kernel(
    K_NEW, V_NEW, K_CACHE, V_CACHE, SLOTS,
    stride_knt, stride_knh, stride_vnt, stride_vnh,
    stride_kpage, stride_krow, stride_kh, stride_vpage, stride_vrow, stride_vh,
    page_size, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
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
) -> None:
    """Write ``k_new[t]``/``v_new[t]`` into slot ``slot_mapping[t]`` (skip -1).

    Parameters
    ----------
    k_new, v_new : [T, Hk, D] (last dim contiguous)
    k_cache, v_cache : [num_pages, page_size, Hk, D] (last dim contiguous)
    slot_mapping : [T] int64
    """
    num_tokens, num_heads, head_dim = k_new.shape
    if num_tokens == 0:
        return
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
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4,
    )
