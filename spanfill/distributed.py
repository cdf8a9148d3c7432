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

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import reference
from .layout import SpanLayout
from .merge import merge_states_n
from .ops import append_kv

__all__ = ["ShardLayout", "shard_layout", "span_prefill_cp", "row_range"]

METHODS = ("allgather", "reduce_scatter")
# torch 2.13 renamed all_gather_into_tensor (same arguments) and deprecated the old name.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class ShardLayout:
    """This rank's view of a batch of spans: built once per batch, reused by every layer.

    Attributes
    ----------
    layout : :class:`spanfill.SpanLayout` over this rank's page pool; its
        ``slot_mapping`` is -1 for the span tokens whose position this rank does not hold
    kv_start, kv_end : [B] int32, this rank holds KV positions ``[kv_start[b],
        min(kv_end[b], seq_lens[b]))`` of request ``b``
    validated : whether :func:`shard_layout` checked the metadata; an unvalidated
        shard also skips the page-pool check, so that nothing waits on the device
    """

    layout: SpanLayout
    kv_start: torch.Tensor
    kv_end: torch.Tensor
    validated: bool = True
    _pools_checked: set = field(default_factory=set, repr=False)

    def check_pool(self, num_pages: int) -> None:
        """Raise if a page of this rank's range is outside ``[0, num_pages)`` (once per pool size)."""
        if not self.validated or num_pages in self._pools_checked:
            return
        bad = _shard_pages(self.layout, self.kv_start, self.kv_end) & (
            (self.layout.block_table < 0) | (self.layout.block_table >= num_pages))
        if bool(bad.any()):
            b, j = (int(x) for x in torch.nonzero(bad)[0])
            raise ValueError(
                f"block_table[{b}, {j}] = {int(self.layout.block_table[b, j])} is not a page of "
                f"this rank's pool (num_pages={num_pages}), but positions [kv_start[{b}], "
                f"kv_end[{b}]) = [{int(self.kv_start[b])}, {int(self.kv_end[b])}) need it"
            )
        self._pools_checked.add(num_pages)


def _shard_pages(layout: SpanLayout, kv_start: torch.Tensor, kv_end: torch.Tensor) -> torch.Tensor:
    """[B, max_pages] bool: the block-table entries that hold a position of this rank's range."""
    page_size = layout.page_size
    hi = torch.minimum(kv_end.long(), layout.seq_lens.long())
    lo = kv_start.long()
    col = torch.arange(layout.block_table.shape[1], device=layout.device)[None, :]
    first, stop = lo // page_size, (hi + page_size - 1) // page_size
    return (hi > lo)[:, None] & (col >= first[:, None]) & (col < stop[:, None])


def _check_ranges(kv_start: torch.Tensor, kv_end: torch.Tensor, num_req: int,
                  device: torch.device) -> None:
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if tuple(t.shape) != (num_req,):
            raise ValueError(f"{name} must have shape [B] = ({num_req},), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but positions is on {device}")
    bad = (kv_start < 0) | (kv_end < kv_start)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"kv_start[{b}] = {int(kv_start[b])}, kv_end[{b}] = {int(kv_end[b])}: need "
            f"0 <= kv_start <= kv_end"
        )


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
) -> ShardLayout:
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
    kv_start, kv_end : [B] int32|int64, the positions this rank holds; ``kv_end`` past
        ``seq_lens`` means "to the end"
    group : the process group (default: the world)
    validate : check the metadata, and (one all-gather of ``2 * B`` ints, so every
        rank must call this together) that the ranks' ranges partition each request;
        with False nothing here or in :func:`span_prefill_cp`'s own checks waits on
        the device (invalid metadata is then undefined behaviour)

    Returns
    -------
    :class:`ShardLayout`
    """
    # Type and shape checks, int32 copies, and the slots (those of tokens this rank
    # does not hold read -1 entries and are replaced below).
    probe = SpanLayout.from_tensors(positions, query_start_loc, seq_lens, block_table, page_size,
                                    validate=False)
    device = probe.device
    if validate:
        _check_ranges(kv_start, kv_end, probe.num_requests, device)
        # The layout's own checks (sorted positions, table coverage, ...) with the
        # pages outside this rank's range stood in by page 0: only its pages matter.
        held = _shard_pages(probe, kv_start, kv_end)
        SpanLayout.from_tensors(probe.positions, probe.query_start_loc, probe.seq_lens,
                                torch.where(held, probe.block_table, 0), page_size,
                                slot_mapping=probe.slot_mapping, validate=True)
        _check_partition(kv_start, kv_end, probe.seq_lens, group)
    token = torch.arange(probe.num_tokens, device=device)
    req = torch.searchsorted(probe.query_start_loc[1:].long(), token, right=True)
    req = req.clamp(max=max(probe.num_requests - 1, 0))
    pos = probe.positions.long()
    owned = (pos >= kv_start.long()[req]) & (pos < kv_end.long()[req])
    slots = torch.where(owned, probe.slot_mapping, torch.full_like(probe.slot_mapping, -1))
    layout = SpanLayout.from_tensors(probe.positions, probe.query_start_loc, probe.seq_lens,
                                     probe.block_table, page_size, slot_mapping=slots,
                                     validate=False)
    return ShardLayout(layout, kv_start.to(device=device, dtype=torch.int32).contiguous(),
                       kv_end.to(device=device, dtype=torch.int32).contiguous(), validate)


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
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    causal: bool,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every span row over the KV positions ``[kv_start[b], kv_end[b])``
    this rank holds: the one call site of the attention itself.

    Returns
    -------
    o : [T, Hq, D] q.dtype, 0 on rows that see no key of this shard
    lse : [T, Hq] fp32, natural log, -inf on those rows
    """
    o, lse = reference.span_prefill(
        q, k_cache, v_cache, layout.positions, layout.query_start_loc, layout.seq_lens,
        layout.block_table, causal, sm_scale, kv_start=kv_start, kv_end=kv_end,
    )
    return o.to(q.dtype), lse.float()


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
    shard: ShardLayout,
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
    shard : :class:`ShardLayout` from :func:`shard_layout`
    group : the process group (default: the world); NCCL for CUDA tensors, gloo for CPU
    causal : row at ``pos`` sees ``[0, pos]`` (default) or ``[0, seq_len)``
    sm_scale : defaults to ``1/sqrt(D)``
    method : "allgather" or "reduce_scatter" (see the module docstring for the bytes)
    all_rows : return all ``T`` rows (default), or only this rank's rows
        ``row_range(T, rank, world_size)`` (cheaper with "reduce_scatter")
    return_lse : also return the merged log-sum-exp
    backend : "auto" | "triton" | "reference", for the append and the merge

    Returns
    -------
    o : [T, Hq, D] q.dtype (or [hi - lo, Hq, D] with ``all_rows=False``)
    lse : [T, Hq] fp32, natural log, -inf on rows that see no key (only if ``return_lse``)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(shard, ShardLayout):
        raise TypeError(f"shard must be a ShardLayout (see shard_layout), got {type(shard).__name__}")
    layout = shard.layout
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
    if layout.device != q.device:
        raise ValueError(f"shard is on {layout.device} but q is on {q.device}")
    shard.check_pool(k_cache.shape[0])
    append_kv(k_new, v_new, k_cache, v_cache, layout, backend=backend)
    if q.shape[0] == 0:  # T is the same on every rank, so all of them return here
        out = q.new_empty(q.shape)
        return (out, torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)) \
            if return_lse else out
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    o, lse = _partial(q, k_cache, v_cache, layout, shard.kv_start, shard.kv_end, causal, scale)
    if method == "allgather":
        rows = (0, q.shape[0]) if all_rows else \
            row_range(q.shape[0], dist.get_rank(group), dist.get_world_size(group))
        out, out_lse = _merge_allgather(o, lse, group, rows, backend)
    else:
        out, out_lse = _merge_reduce_scatter(o, lse, group, all_rows, return_lse, backend)
    return (out, out_lse) if return_lse else out
