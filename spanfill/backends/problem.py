"""What a backend decides on: one attention call's host-known metadata, and its answer.

Everything here is read off shapes, dtypes, strides, pointers and plain Python
values: building a problem or a config never waits on the device and never
allocates, so selection can run inside a CUDA-graph capture and on every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttentionProblem", "LaunchConfig", "dense_problem", "paged_problem"]


@dataclass(frozen=True)
class AttentionProblem:
    """One attention call as a backend sees it.

    Attributes
    ----------
    op : "padded" | "varlen" | "span" | "append"
    device : where the tensors live
    dtype : q's dtype (fp16|bf16|fp32)
    head_dim : D
    num_q_heads, num_kv_heads : Hq, Hk
    num_tokens : T, the packed query rows (``B * S`` for a padded batch)
    num_requests : B
    causal : a row at ``pos`` sees KV positions ``<= pos``
    paged : KV in pages (span prefill) rather than dense rows
    page_size : tokens per page (1 for dense KV)
    max_kv_len : an upper bound of any request's KV length known on the host
        (block-table width x page size; ``S`` or ``T`` for dense KV)
    window_left : sliding window, -1 for none
    logits_soft_cap : 0 for none
    has_kv_bounds : the layout holds a KV shard (``kv_start``/``kv_end``)
    kv_dtype : the K/V (or cache) dtype: ``dtype``, or fp8 with scales
    dense_kv : ``(q, k, v)`` as ``[rows, H, D]`` for dense KV, else None. Only their
        shapes, strides and data pointers are read (whether the rows suit tensor
        descriptors), as FlashAttention-4's ``select_fwd_config`` reads its inputs.
    pages_contiguous : paged KV whose pools are whole pages one after the other (NHD
        strides ``(page_size * Hk * D, Hk * D, D, 1)``: one ``[rows, Hk * D]`` view)
    appends : the call also writes new K/V into the cache (``k_new``/``v_new``)
    """

    op: str
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    num_q_heads: int
    num_kv_heads: int
    num_tokens: int
    num_requests: int
    causal: bool
    paged: bool
    page_size: int
    max_kv_len: int
    window_left: int = -1
    logits_soft_cap: float = 0.0
    has_kv_bounds: bool = False
    kv_dtype: torch.dtype | None = None
    dense_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    pages_contiguous: bool = False
    appends: bool = False

    @property
    def group(self) -> int:
        """q heads per KV head (GQA group size)."""
        return self.num_q_heads // self.num_kv_heads


@dataclass(frozen=True)
class LaunchConfig:
    """Everything one launch needs decided: tiles, split-KV and descriptors.

    Attributes
    ----------
    tile : the kernel's tile sizes (``spanfill.backends.triton_config.AttentionConfig``),
        None for a backend without tiles (the reference)
    num_splits : programs sharing each tile's KV range (split-KV); 1: no split
    use_tma : dense K/V loaded through tensor descriptors
    boundary_stages : software-pipelining stages of the masked boundary KV loops
    ieee_dot : the dots run on fp32 operands in IEEE precision (fp32 inputs; bf16
        in Triton's interpreter)
    """

    tile: object | None
    num_splits: int = 1
    use_tma: bool = False
    boundary_stages: int = 1
    ieee_dot: bool = False

    @property
    def block_q(self) -> int:
        """Query tokens per tile of the plan."""
        return self.tile.block_q

    def describe(self) -> str:
        """One line for ``spanfill info``."""
        if self.tile is None:
            return "no tiles"
        t = self.tile
        return (f"BLOCK_M={t.block_m} (block_q={t.block_q} x heads={t.heads}) BLOCK_N={t.block_n} "
                f"warps={t.num_warps} stages={t.num_stages} "
                f"boundary_stages={self.boundary_stages} splits={self.num_splits} "
                f"tma={'yes' if self.use_tma else 'no'}"
                + getattr(t, "describe_form", lambda: "")())


def dense_problem(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_requests: int,
                  max_kv_len: int, causal: bool, window_left: int = -1,
                  logits_soft_cap: float = 0.0) -> AttentionProblem:
    """The problem of a call over dense KV rows (padded and varlen prefill).

    Parameters
    ----------
    op : "padded" | "varlen"
    q : [rows, Hq, D] packed query rows; k, v : [rows, Hk, D]
    num_requests : B
    max_kv_len : a host bound of any request's KV length (S, or T)
    """
    return AttentionProblem(
        op=op, device=q.device, dtype=q.dtype, head_dim=q.shape[-1], num_q_heads=q.shape[-2],
        num_kv_heads=k.shape[-2], num_tokens=q.shape[0], num_requests=num_requests,
        causal=causal, paged=False, page_size=1, max_kv_len=max_kv_len,
        window_left=window_left, logits_soft_cap=logits_soft_cap, kv_dtype=k.dtype,
        dense_kv=(q, k, v))


def paged_problem(q: torch.Tensor, k_cache: torch.Tensor, num_requests: int, table_width: int,
                  causal: bool, window_left: int = -1, logits_soft_cap: float = 0.0,
                  has_kv_bounds: bool = False, op: str = "span",
                  v_cache: torch.Tensor | None = None, appends: bool = False) -> AttentionProblem:
    """The problem of a call over a paged cache: span prefill, or (``op="append"``, with
    the new K rows as ``q``) the append that writes into it.

    Parameters
    ----------
    q : [T, Hq, D]
    k_cache : [num_pages, page_size, Hk, D]
    num_requests : B
    table_width : the block table's pages per request (bounds every KV length)
    v_cache : [num_pages, page_size, Hk, D] or None: its strides join ``pages_contiguous``
    appends : k_new/v_new are written in the same call
    """
    _, page_size, heads, d = k_cache.shape
    whole_pages = (page_size * heads * d, heads * d, d, 1)
    contiguous = all(c.stride() == whole_pages for c in (k_cache, v_cache) if c is not None)
    return AttentionProblem(
        op=op, device=q.device, dtype=q.dtype, head_dim=q.shape[-1], num_q_heads=q.shape[-2],
        num_kv_heads=k_cache.shape[-2], num_tokens=q.shape[0], num_requests=num_requests,
        causal=causal, paged=True, page_size=page_size, max_kv_len=table_width * page_size,
        window_left=window_left, logits_soft_cap=logits_soft_cap, has_kv_bounds=has_kv_bounds,
        kv_dtype=k_cache.dtype, pages_contiguous=contiguous, appends=appends)
