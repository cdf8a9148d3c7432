"""Context-parallel segmented prefill: the KV cache sharded by position over the ranks
of a ``torch.distributed`` process group.

Rank ``r`` holds, for each request ``b``, the KV positions ``[kv_start[b], kv_end[b])``
in its own page pool (block-table entries of pages outside that range may be -1).
The ranges of all ranks partition ``[0, seq_lens[b])``; a rank may hold nothing of a
request, and ranks need not be in position order. Every rank receives the same
span (hole) tokens ``q, k_new, v_new`` of the whole batch, and

1. appends the new K/V of the span tokens whose position it holds (other tokens
   get slot -1),
2. computes the partial attention of ALL span rows over its shard: ``(o_r, lse_r)``,
   where rows whose causal range ends before the shard get ``o = 0, lse = -inf``,
3. merges the partials exactly (:func:`spanfill.merge_states_n`).

Two ways to merge, ``method=``:

``"allgather"``
    all-gather every rank's ``(o_r, lse_r)``, then every rank merges all rows.
    With ``S = T * Hq * (D * elem_size + 4)`` bytes per partial, each rank receives
    ``(R - 1) * S`` and merges ``R`` states of ``T`` rows. One collective step.
``"reduce_scatter"``
    an all-to-all sends rank ``j`` the ``j``-th slice of rows of every partial, rank
    ``j`` merges its ``T / R`` rows (a reduce-scatter whose reduction is the merge,
    which NCCL's sum cannot express), then an all-gather of the merged rows if the
    caller wants all of them. Each rank receives ``(R - 1) / R * S`` plus
    ``(R - 1) / R * T * Hq * D * elem_size``: about ``2 (R - 1) / R * S``.

So for 2 ranks both move the same bytes and ``"allgather"`` has one step less; for
3 or more ranks ``"reduce_scatter"`` moves ``R / 2`` times fewer bytes and merges
``R`` times fewer rows per rank; with ``all_rows=False`` (the next layer is
sequence-parallel over rows too) it moves only ``(R - 1) / R * S``.
``scripts/bench_cp.py`` measures both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import SpanLayout
from .merge import merge_states_n
from .ops import append_kv, span_prefill

__all__ = ["shard_layout", "span_prefill_cp", "row_range"]

METHODS = ("allgather", "reduce_scatter")
# torch 2.13 renamed all_gather_into_tensor (same arguments) and deprecated the old name.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _check_partition(kv_start: torch.Tensor, kv_end: torch.Tensor, seq_lens: torch.Tensor,
                     group: dist.ProcessGroup | None) -> None:
    """Raise unless the ranks' ranges tile ``[0, seq_lens[b])`` exactly (one all-gather)."""
    world = dist.get_world_size(group)
    mine = torch.stack([kv_start.long(), torch.minimum(kv_end.long(), seq_lens.long())])
    ranges = torch.empty(world * 2, mine.shape[1], dtype=torch.int64, device=mine.device)
    _all_gather(ranges, mine, group=group)
    lo, hi = ranges.view(world, 2, -1).unbind(1)  # [R, B] each
    hi = torch.maximum(hi, lo)
    covered = (hi - lo).sum(0)
    overlap = (torch.maximum(lo[:, None], lo[None, :]) < torch.minimum(hi[:, None], hi[None, :]))
    overlap &= ~torch.eye(world, dtype=torch.bool, device=lo.device)[..., None]
    bad = (covered != seq_lens.long()) | overlap.any(0).any(0)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0, 0])
        parts = ", ".join(f"rank {r}: [{int(lo[r, b])}, {int(hi[r, b])})" for r in range(world))
        raise ValueError(
            f"the ranks' [kv_start[{b}], kv_end[{b}]) ranges must partition "
            f"[0, seq_lens[{b}]={int(seq_lens[b])}), got {parts}"
        )


def shard_layout(
    positions: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    page_size: int,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    validate: bool = True,
) -> SpanLayout:
    """This rank's layout for :func:`span_prefill_cp`, from a serving engine's metadata.

    Parameters
    ----------
    positions : [T] int32|int64, the same on every rank: position of each span token,
        strictly increasing within a request
    query_start_loc : [B+1] int32|int64, the same on every rank
    seq_lens : [B] int32|int64, full KV length of each request, the same on every rank
    block_table : [B, max_pages] int32|int64, THIS rank's pages: entry ``j`` of
        request ``b`` holds positions ``[j*page_size, (j+1)*page_size)``; entries of
        pages outside ``[kv_start[b], kv_end[b])`` are not read and may be -1
    page_size : tokens per page
    kv_start, kv_end : [B] int32|int64, the positions this rank holds,
        ``0 <= kv_start <= kv_end <= seq_lens``
    group : the process group (default: the world)
    validate : check the metadata, and (one all-gather of ``2 * B`` ints, so every
        rank must call this together) that the ranks' ranges partition each request;
        with False nothing waits on the device (invalid metadata is then undefined
        behaviour)

    Returns
    -------
    :class:`spanfill.SpanLayout` with ``kv_start``/``kv_end`` set: its ``slot_mapping``
    is -1 for the span tokens this rank does not hold
    """
    layout = SpanLayout.from_tensors(positions, query_start_loc, seq_lens, block_table, page_size,
                                     validate=validate, kv_start=kv_start, kv_end=kv_end)
    if validate:
        _check_partition(layout.kv_start, layout.kv_end, layout.seq_lens, group)
    return layout


def row_range(num_tokens: int, rank: int, world_size: int) -> tuple[int, int]:
    """The span rows ``[lo, hi)`` of ``rank``: slices of ``ceil(T / R)`` rows in rank order.

    With ``method="reduce_scatter"`` a rank merges these rows; with ``all_rows=False``
    it returns only these rows (either method).
    """
    chunk = -(-num_tokens // world_size)
    return min(num_tokens, rank * chunk), min(num_tokens, (rank + 1) * chunk)


def _partial(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: SpanLayout,
    causal: bool,
    sm_scale: float | None,
    backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every span row over the KV positions ``[kv_start[b], kv_end[b])``
    this rank holds (``layout.kv_start``/``kv_end``): the one call site of the attention.

    Returns
    -------
    o : [T, Hq, D] q.dtype, 0 on rows that see no key of this shard
    lse : [T, Hq] fp32, natural log, -inf on those rows
    """
    return span_prefill(q, k_cache, v_cache, layout, causal, sm_scale, return_lse=True,
                        backend=backend)


def _gather(out: torch.Tensor, t: torch.Tensor, group) -> dist.Work:
    return _all_gather(out, t.contiguous(), group=group, async_op=True)


def _merge_allgather(o, lse, group, rows, backend):
    world = dist.get_world_size(group)
    num_tokens = o.shape[0]
    all_o = torch.empty((world * num_tokens,) + tuple(o.shape[1:]), dtype=o.dtype, device=o.device)
    all_lse = torch.empty((world * num_tokens,) + tuple(lse.shape[1:]), dtype=lse.dtype,
                          device=lse.device)
    for work in (_gather(all_o, o, group), _gather(all_lse, lse, group)):
        work.wait()
    lo, hi = rows
    # [R, T, ...] stacks go in as [T, R, ...] views: the merge kernel is strided.
    return merge_states_n(all_o.view((world,) + tuple(o.shape))[:, lo:hi].transpose(0, 1),
                          all_lse.view((world,) + tuple(lse.shape))[:, lo:hi].transpose(0, 1),
                          backend=backend)


def _merge_reduce_scatter(o, lse, group, all_rows, return_lse, backend):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    num_tokens = o.shape[0]
    chunk = -(-num_tokens // world)
    pad = chunk * world - num_tokens
    # Equal slices keep the collectives on their fast equal-split paths; the padding
    # rows are states that saw nothing.
    o_p = torch.cat([o, o.new_zeros((pad,) + tuple(o.shape[1:]))]) if pad else o.contiguous()
    lse_p = torch.cat([lse, lse.new_full((pad,) + tuple(lse.shape[1:]), float("-inf"))]) \
        if pad else lse.contiguous()
    recv_o, recv_lse = torch.empty_like(o_p), torch.empty_like(lse_p)
    works = [dist.all_to_all_single(recv_o, o_p, group=group, async_op=True),
             dist.all_to_all_single(recv_lse, lse_p, group=group, async_op=True)]
    for work in works:
        work.wait()
    mine_o, mine_lse = merge_states_n(
        recv_o.view((world, chunk) + tuple(o.shape[1:])).transpose(0, 1),
        recv_lse.view((world, chunk) + tuple(lse.shape[1:])).transpose(0, 1), backend=backend)
    if not all_rows:
        lo, hi = row_range(num_tokens, rank, world)
        return mine_o[:hi - lo], mine_lse[:hi - lo]
    full_o = torch.empty_like(o_p)
    works = [_gather(full_o, mine_o, group)]
    full_lse = torch.empty_like(lse_p) if return_lse else None
    if return_lse:
        works.append(_gather(full_lse, mine_lse, group))
    for work in works:
        work.wait()
    return full_o[:num_tokens], full_lse[:num_tokens] if return_lse else None


def span_prefill_cp(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: SpanLayout,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    sm_scale: float | None = None,
    method: str = "allgather",
    all_rows: bool = True,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Segmented prefill with the KV cache sharded by position over ``group``.

    Appends the new K/V this rank holds, computes every span row's attention over
    this rank's shard, and merges the shards' results, so the output equals
    :func:`spanfill.span_prefill` over the whole cache. Every rank of ``group`` must
    call it with the same ``q``, ``k_new``, ``v_new``, ``causal``, ``method`` and
    ``all_rows`` (collectives).

    Parameters
    ----------
    q : [T, Hq, D] fp16|bf16|fp32, all span tokens of the batch, request by request
    k_new, v_new : [T, Hk, D] k_cache.dtype, all span tokens' new K/V; this rank writes
        the ones it holds
    k_cache, v_cache : [num_pages, page_size, Hk, D], this rank's page pool (NHD)
    layout : this rank's :class:`spanfill.SpanLayout` from :func:`shard_layout`
    group : the process group (default: the world); NCCL for CUDA tensors, gloo for CPU
    causal : row at ``pos`` sees ``[0, pos]`` (default) or ``[0, seq_len)``
    sm_scale : defaults to ``1/sqrt(D)``
    method : "allgather" or "reduce_scatter" (see the module docstring for the bytes)
    all_rows : return all ``T`` rows (default), or only this rank's rows
        ``row_range(T, rank, world_size)`` (cheaper with "reduce_scatter")
    return_lse : also return the merged log-sum-exp
    backend : "auto" | "triton" | "reference", for the append, the attention and the merge

    Returns
    -------
    o : [T, Hq, D] q.dtype (or [hi - lo, Hq, D] with ``all_rows=False``)
    lse : [T, Hq] fp32, natural log, -inf on rows that see no key (only if ``return_lse``)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(layout, SpanLayout) or layout.kv_start is None:
        raise TypeError("layout must be a SpanLayout with kv_start/kv_end: build it with shard_layout")
    if not torch.is_tensor(q) or q.dim() != 3:
        raise ValueError(f"q must be a [T, Hq, D] tensor, got {getattr(q, 'shape', type(q).__name__)}")
    if q.shape[0] != layout.num_tokens:
        raise ValueError(f"q has {q.shape[0]} rows but the layout has {layout.num_tokens} span tokens")
    if q.dtype != k_cache.dtype or q.device != k_cache.device:
        raise TypeError(f"q is {q.dtype} on {q.device} but k_cache is {k_cache.dtype} on {k_cache.device}")
    if k_cache.dim() != 4 or q.shape[-1] != k_cache.shape[-1] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(
            f"q has shape {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}: need the same head "
            f"dim and Hq a multiple of Hk"
        )
    append_kv(k_new, v_new, k_cache, v_cache, layout, backend=backend)
    if q.shape[0] == 0:  # T is the same on every rank, so all of them return here
        out = q.new_empty(q.shape)
        return (out, torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)) \
            if return_lse else out
    o, lse = _partial(q, k_cache, v_cache, layout, causal, sm_scale, backend)
    if method == "allgather":
        rows = (0, q.shape[0]) if all_rows else \
            row_range(q.shape[0], dist.get_rank(group), dist.get_world_size(group))
        out, out_lse = _merge_allgather(o, lse, group, rows, backend)
    else:
        out, out_lse = _merge_reduce_scatter(o, lse, group, all_rows, return_lse, backend)
    return (out, out_lse) if return_lse else out
