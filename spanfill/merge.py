"""Merging partial attention results (the public ops): check, dispatch, allocate, launch.

Attention of a row over a KV set split into disjoint parts ``S_1 .. S_N`` equals
the merge of the per-part results ``(o_i, lse_i)``:

``lse = logsumexp_i lse_i``,  ``o = sum_i exp(lse_i - lse) * o_i``

with natural-log ``lse`` (what :func:`spanfill.span_prefill` returns). A part the
row sees no key of (``lse_i = -inf``) is ignored; a row with every part ``-inf``
gives ``o = 0``, ``lse = -inf``, never NaN. The names follow FlashInfer's
``merge_state`` / ``merge_states``, and :func:`merge_states_n` takes FlashInfer's
``[T, N, H, D]`` layout; note FlashInfer's own kernels may return base-2 lse.
"""

from __future__ import annotations

import torch

from . import reference
from .ops import _check_tensor as _check_o, resolve_backend

__all__ = ["merge_states", "merge_states_n"]

def _check_lse(name: str, lse: object, o_name: str, o: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(lse):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(lse).__name__}")
    if lse.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {lse.dtype}")
    if tuple(lse.shape) != tuple(o.shape[:-1]):
        raise ValueError(
            f"{name} has shape {tuple(lse.shape)} but {o_name} has {tuple(o.shape)}: expected "
            f"{tuple(o.shape[:-1])}"
        )
    if lse.device != o.device:
        raise ValueError(f"{name} is on {lse.device} but {o_name} is on {o.device}")
    return lse


def merge_states(
    o_a: torch.Tensor,
    lse_a: torch.Tensor,
    o_b: torch.Tensor,
    lse_b: torch.Tensor,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint KV sets A and B.

    Parameters
    ----------
    o_a, o_b : [T, H, D] fp16|bf16|fp32, the same dtype and device, last dim contiguous
    lse_a, lse_b : [T, H] fp32, natural log; ``-inf`` where the row saw no key
    backend : "auto" | "triton" | "reference" (see :mod:`spanfill.ops`)

    Returns
    -------
    o : [T, H, D] o_a.dtype, attention over ``A ∪ B`` (computed in fp32)
    lse : [T, H] fp32
    """
    _check_o("o_a", o_a, 3)
    _check_o("o_b", o_b, 3)
    if o_b.dtype != o_a.dtype:
        raise TypeError(f"o_b has dtype {o_b.dtype} but o_a has {o_a.dtype}")
    if o_b.device != o_a.device:
        raise ValueError(f"o_b is on {o_b.device} but o_a is on {o_a.device}")
    if o_b.shape != o_a.shape:
        raise ValueError(f"o_b has shape {tuple(o_b.shape)} but o_a has {tuple(o_a.shape)}")
    _check_lse("lse_a", lse_a, "o_a", o_a)
    _check_lse("lse_b", lse_b, "o_b", o_b)
    if resolve_backend(o_a.device, backend) == "reference":
        o, lse = reference.merge_states(torch.stack([o_a, o_b], 1), torch.stack([lse_a, lse_b], 1))
        return o.to(o_a.dtype), lse

    from .kernels import merge_two_launch

    o = torch.empty(o_a.shape, dtype=o_a.dtype, device=o_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=o_a.device)
    merge_two_launch(o_a, lse_a, o_b, lse_b, o, lse)
    return o, lse


def merge_states_n(
    o: torch.Tensor,
    lse: torch.Tensor,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``N`` partial attention results per row over disjoint KV sets.

    Parameters
    ----------
    o : [T, N, H, D] fp16|bf16|fp32 (FlashInfer's ``merge_states`` layout), last dim
        contiguous; other strides are free, so ``N`` results stacked as
        ``[N, T, H, D]`` (an all-gather's output) go in as ``stack.transpose(0, 1)``
        without a copy
    lse : [T, N, H] fp32, natural log; ``-inf`` where the row saw no key of a part
    backend : "auto" | "triton" | "reference" (see :mod:`spanfill.ops`)

    Returns
    -------
    o : [T, H, D] o.dtype (computed in fp32)
    lse : [T, H] fp32
    """
    _check_o("o", o, 4)
    _check_lse("lse", lse, "o", o)
    if o.shape[1] == 0:
        raise ValueError(f"o has shape {tuple(o.shape)}: it needs at least one state (dim 1)")
    if resolve_backend(o.device, backend) == "reference":
        out, out_lse = reference.merge_states(o, lse)
        return out.to(o.dtype), out_lse

    from .kernels import merge_states_launch

    num_tokens, _, num_heads, head_dim = o.shape
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=o.dtype, device=o.device)
    out_lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=o.device)
    merge_states_launch(o, lse, out, out_lse)
    return out, out_lse
