"""spanfill's ops as ``torch.library`` custom ops, for ``torch.compile`` and CUDA graphs.

A :class:`~spanfill.SpanLayout` is a Python object and cannot cross an op
boundary, so these ops take the serving engine's plain tensors (``positions``,
``query_start_loc``, ``seq_lens``, ``block_table``, ``slot_mapping``) and an int
``page_size``, and build the layout inside with ``validate=False``: nothing in
them waits on the device, so a compiled or captured step stays free of host
syncs. Validate the metadata once per batch (``SpanLayout.from_tensors`` with
``validate=True``) before handing it to a compiled model.

Each op takes every option of its :mod:`spanfill.ops` function (``window_left``,
``logits_soft_cap``, ``backend``, and the KV-shard bounds ``kv_start``/``kv_end``
of :meth:`SpanLayout.from_tensors <spanfill.SpanLayout.from_tensors>`), with the
same defaults. Importing this module registers::

    torch.ops.spanfill.append_kv       mutates k_cache, v_cache
    torch.ops.spanfill.span_prefill    -> (o [T, Hq, D], lse [T, Hq] fp32)
    torch.ops.spanfill.span_prefill_append  (k_new, v_new written in the same launch)
    torch.ops.spanfill.padded_prefill  -> (o [B, S, Hq, D], lse [B, S, Hq] fp32)
    torch.ops.spanfill.varlen_prefill  -> (o [T, Hq, D], lse [T, Hq] fp32)

Custom ops have a fixed number of outputs, so the attention ops always return
``(o, lse)``; with ``return_lse=False`` the lse is an empty ``[0]`` tensor and is
not computed. The Python wrappers below return what the :mod:`spanfill.ops`
functions return.
"""

from __future__ import annotations

import torch

from . import ops
from .layout import SpanLayout

__all__ = ["append_kv", "span_prefill", "padded_prefill", "varlen_prefill"]


def _layout(positions: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
            block_table: torch.Tensor, page_size: int, slot_mapping: torch.Tensor | None,
            kv_start: torch.Tensor | None, kv_end: torch.Tensor | None) -> SpanLayout:
    return SpanLayout.from_tensors(positions, query_start_loc, seq_lens, block_table, page_size,
                                   slot_mapping=slot_mapping, validate=False, kv_start=kv_start,
                                   kv_end=kv_end)


def _scale_tensor(scale: float | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """An fp8 scale as the ops' schema takes it: None, or an fp32 tensor (a number becomes
    a 0-d one, so one compiled graph serves every calibration value)."""
    if scale is None or torch.is_tensor(scale):
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"k_scale/v_scale must be a real number or an fp32 tensor, got "
                        f"{type(scale).__name__} {scale!r}")
    return torch.tensor(float(scale), dtype=torch.float32, device=device)


def _no_lse(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=device)


def _with_lse(res, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` from an op called with ``return_lse``; an empty lse without it.

    A custom op's outputs may not alias each other or its inputs: these are fresh.
    """
    return res if isinstance(res, tuple) else (res, _no_lse(device))


# ----------------------------------------------------------------------------- append_kv

@torch.library.custom_op("spanfill::append_kv", mutates_args=("k_cache", "v_cache"))
def _append_kv_op(
    k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    positions: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, page_size: int, slot_mapping: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None, kv_end: torch.Tensor | None = None,
    backend: str | None = None, kv_layout: str = "NHD", k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    layout = _layout(positions, query_start_loc, seq_lens, block_table, page_size, slot_mapping,
                     kv_start, kv_end)
    ops.append_kv(k_new, v_new, k_cache, v_cache, layout, backend=backend, kv_layout=kv_layout,
                  k_scale=k_scale, v_scale=v_scale)


@_append_kv_op.register_fake
def _append_kv_fake(k_new, v_new, k_cache, v_cache, positions, query_start_loc, seq_lens,
                    block_table, page_size, slot_mapping=None, kv_start=None, kv_end=None,
                    backend=None, kv_layout="NHD", k_scale=None, v_scale=None) -> None:
    return None


def append_kv(
    k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    positions: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, page_size: int, slot_mapping: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None, kv_end: torch.Tensor | None = None,
    backend: str | None = None, kv_layout: str = "NHD",
    k_scale: float | torch.Tensor | None = None, v_scale: float | torch.Tensor | None = None,
) -> None:
    """:func:`spanfill.append_kv` from plain metadata, as a custom op (in place).

    Parameters
    ----------
    k_new, v_new : [T, Hk, D] with the cache's dtype
    k_cache, v_cache : [num_pages, page_size, Hk, D] (or [num_pages, Hk, page_size, D]
        with ``kv_layout="HND"``), written in place
    positions : [T] int32|int64, the position of each new token
    query_start_loc : [B+1] int32|int64
    seq_lens : [B] int32|int64
    block_table : [B, max_pages] int32|int64
    page_size : tokens per page
    slot_mapping : [T] int64 or None (computed from the block table); -1 skips a token
    kv_start, kv_end : [B] int32|int64 or None: this cache holds only KV positions
        ``[kv_start[b], kv_end[b])`` of request ``b`` (a shard by position); tokens
        outside are not written. Defaults: 0 and ``seq_lens``
    backend : "auto" | "triton" | "reference", as :func:`spanfill.append_kv`
    kv_layout : "NHD" (default) or "HND"
    k_scale, v_scale : fp8 caches' scales, as :func:`spanfill.append_kv`
    """
    torch.ops.spanfill.append_kv(k_new, v_new, k_cache, v_cache, positions, query_start_loc,
                                 seq_lens, block_table, page_size, slot_mapping, kv_start, kv_end,
                                 backend, kv_layout, _scale_tensor(k_scale, k_new.device),
                                 _scale_tensor(v_scale, k_new.device))


# ----------------------------------------------------------------------------- span_prefill

def _run_span(q, k_new, v_new, k_cache, v_cache, positions, query_start_loc, seq_lens,
              block_table, page_size, causal, sm_scale, return_lse, window_left,
              logits_soft_cap, kv_start, kv_end, backend, kv_layout, k_scale, v_scale):
    """The body of both span ops: :func:`spanfill.span_prefill` on a layout of the metadata
    (with ``k_new``/``v_new``: appended in the same launch)."""
    layout = _layout(positions, query_start_loc, seq_lens, block_table, page_size, None,
                     kv_start, kv_end)
    res = ops.span_prefill(q, k_cache, v_cache, layout, causal=causal, sm_scale=sm_scale,
                           return_lse=return_lse, window_left=window_left,
                           logits_soft_cap=logits_soft_cap, backend=backend,
                           kv_layout=kv_layout, k_scale=k_scale, v_scale=v_scale,
                           k_new=k_new, v_new=v_new)
    return _with_lse(res, q.device)


def _span_outputs(q: torch.Tensor, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake kernels' outputs: o like q, and lse [T, Hq] fp32 (empty without it)."""
    lse_shape = q.shape[:2] if return_lse else (0,)
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("spanfill::span_prefill", mutates_args=())
def _span_prefill_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
    page_size: int, causal: bool = True, sm_scale: float | None = None, return_lse: bool = False,
    window_left: int = -1, logits_soft_cap: float = 0.0, kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None, backend: str | None = None, kv_layout: str = "NHD",
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run_span(q, None, None, k_cache, v_cache, positions, query_start_loc, seq_lens,
                     block_table, page_size, causal, sm_scale, return_lse, window_left,
                     logits_soft_cap, kv_start, kv_end, backend, kv_layout, k_scale, v_scale)


@_span_prefill_op.register_fake
def _span_prefill_fake(q, k_cache, v_cache, positions, query_start_loc, seq_lens, block_table,
                       page_size, causal=True, sm_scale=None, return_lse=False, window_left=-1,
                       logits_soft_cap=0.0, kv_start=None, kv_end=None, backend=None,
                       kv_layout="NHD", k_scale=None, v_scale=None):
    return _span_outputs(q, return_lse)


@torch.library.custom_op("spanfill::span_prefill_append", mutates_args=("k_cache", "v_cache"))
def _span_prefill_append_op(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, positions: torch.Tensor, query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor, block_table: torch.Tensor, page_size: int, causal: bool = True,
    sm_scale: float | None = None, return_lse: bool = False, window_left: int = -1,
    logits_soft_cap: float = 0.0, kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None, backend: str | None = None, kv_layout: str = "NHD",
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # A separate op: writing the cache is declared (mutates_args), which the pure
    # span_prefill op must not be.
    return _run_span(q, k_new, v_new, k_cache, v_cache, positions, query_start_loc, seq_lens,
                     block_table, page_size, causal, sm_scale, return_lse, window_left,
                     logits_soft_cap, kv_start, kv_end, backend, kv_layout, k_scale, v_scale)


@_span_prefill_append_op.register_fake
def _span_prefill_append_fake(q, k_new, v_new, k_cache, v_cache, positions, query_start_loc,
                              seq_lens, block_table, page_size, causal=True, sm_scale=None,
                              return_lse=False, window_left=-1, logits_soft_cap=0.0,
                              kv_start=None, kv_end=None, backend=None, kv_layout="NHD",
                              k_scale=None, v_scale=None):
    return _span_outputs(q, return_lse)


def span_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
    page_size: int, causal: bool = True, sm_scale: float | None = None, return_lse: bool = False,
    window_left: int = -1, logits_soft_cap: float = 0.0, kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None, backend: str | None = None, kv_layout: str = "NHD",
    k_scale: float | torch.Tensor | None = None, v_scale: float | torch.Tensor | None = None,
    k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`spanfill.span_prefill` from plain metadata, as a custom op.

    Parameters
    ----------
    q : [T, Hq, D] fp16|bf16|fp32
    k_cache, v_cache : [num_pages, page_size, Hk, D] q.dtype (or HND with ``kv_layout``)
    positions, query_start_loc, seq_lens, block_table, page_size : as :func:`append_kv`
    causal : default True
    sm_scale : defaults to ``1/sqrt(D)``
    return_lse : also return the log-sum-exp
    window_left : if >= 0, a row at position ``pos`` sees no key below
        ``pos - window_left``; -1 (default): off
    logits_soft_cap : if > 0, scores become ``cap * tanh(score / cap)``; 0 (default): off
    kv_start, kv_end : [B] int32|int64 or None, the KV positions this cache holds, as
        :func:`append_kv`; rows attend only to those (merge the shards' states with
        :func:`spanfill.merge_states`)
    backend : "auto" | "triton" | "reference", as :func:`spanfill.span_prefill`
    kv_layout : "NHD" (default) or "HND"
    k_scale, v_scale : fp8 caches' scales, as :func:`spanfill.span_prefill`
    k_new, v_new : [T, Hk, D] or None: written into the cache and attended in one launch
        (``torch.ops.spanfill.span_prefill_append``, which declares the caches mutated)

    Returns
    -------
    o : [T, Hq, D] q.dtype
    lse : [T, Hq] fp32, natural log (only if ``return_lse``)
    """
    if k_new is not None or v_new is not None:
        o, lse = torch.ops.spanfill.span_prefill_append(
            q, k_new, v_new, k_cache, v_cache, positions, query_start_loc, seq_lens, block_table,
            page_size, causal, sm_scale, return_lse, window_left, logits_soft_cap, kv_start,
            kv_end, backend, kv_layout, _scale_tensor(k_scale, q.device),
            _scale_tensor(v_scale, q.device))
        return (o, lse) if return_lse else o
    o, lse = torch.ops.spanfill.span_prefill(q, k_cache, v_cache, positions, query_start_loc,
                                             seq_lens, block_table, page_size, causal, sm_scale,
                                             return_lse, window_left, logits_soft_cap, kv_start,
                                             kv_end, backend, kv_layout,
                                             _scale_tensor(k_scale, q.device),
                                             _scale_tensor(v_scale, q.device))
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- padded_prefill

@torch.library.custom_op("spanfill::padded_prefill", mutates_args=())
def _padded_prefill_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_lens: torch.Tensor,
    causal: bool = False, padding_side: str = "right", sm_scale: float | None = None,
    return_lse: bool = False, window_left: int = -1, logits_soft_cap: float = 0.0,
    backend: str | None = None, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    res = ops.padded_prefill(q, k, v, valid_lens, causal=causal, padding_side=padding_side,
                             sm_scale=sm_scale, return_lse=return_lse, window_left=window_left,
                             logits_soft_cap=logits_soft_cap, backend=backend, k_scale=k_scale,
                             v_scale=v_scale)
    return _with_lse(res, q.device)


@_padded_prefill_op.register_fake
def _padded_prefill_fake(q, k, v, valid_lens, causal=False, padding_side="right", sm_scale=None,
                         return_lse=False, window_left=-1, logits_soft_cap=0.0, backend=None,
                         k_scale=None, v_scale=None):
    lse_shape = q.shape[:3] if return_lse else (0,)
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


def padded_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_lens: torch.Tensor,
    causal: bool = False, padding_side: str = "right", sm_scale: float | None = None,
    return_lse: bool = False, window_left: int = -1, logits_soft_cap: float = 0.0,
    backend: str | None = None, k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`spanfill.padded_prefill` as a custom op (same arguments and results;
    ``valid_lens`` a [B] tensor, not a PaddedLayout)."""
    o, lse = torch.ops.spanfill.padded_prefill(q, k, v, valid_lens, causal, padding_side,
                                               sm_scale, return_lse, window_left, logits_soft_cap,
                                               backend, _scale_tensor(k_scale, q.device),
                                               _scale_tensor(v_scale, q.device))
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- varlen_prefill

@torch.library.custom_op("spanfill::varlen_prefill", mutates_args=())
def _varlen_prefill_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    causal: bool = True, sm_scale: float | None = None, return_lse: bool = False,
    window_left: int = -1, logits_soft_cap: float = 0.0, backend: str | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    res = ops.varlen_prefill(q, k, v, cu_seqlens, causal=causal, sm_scale=sm_scale,
                             return_lse=return_lse, window_left=window_left,
                             logits_soft_cap=logits_soft_cap, backend=backend, k_scale=k_scale,
                             v_scale=v_scale)
    return _with_lse(res, q.device)


@_varlen_prefill_op.register_fake
def _varlen_prefill_fake(q, k, v, cu_seqlens, causal=True, sm_scale=None, return_lse=False,
                         window_left=-1, logits_soft_cap=0.0, backend=None, k_scale=None,
                         v_scale=None):
    lse_shape = q.shape[:2] if return_lse else (0,)
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


def varlen_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    causal: bool = True, sm_scale: float | None = None, return_lse: bool = False,
    window_left: int = -1, logits_soft_cap: float = 0.0, backend: str | None = None,
    k_scale: float | torch.Tensor | None = None, v_scale: float | torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`spanfill.varlen_prefill` as a custom op (same arguments and results)."""
    o, lse = torch.ops.spanfill.varlen_prefill(q, k, v, cu_seqlens, causal, sm_scale, return_lse,
                                               window_left, logits_soft_cap, backend,
                                               _scale_tensor(k_scale, q.device),
                                               _scale_tensor(v_scale, q.device))
    return (o, lse) if return_lse else o
