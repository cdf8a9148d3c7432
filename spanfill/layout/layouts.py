"""The layouts: a padded batch's valid lengths, and where a batch's span tokens sit.

Each is built (and checked) once per batch and reused by every layer; each caches
its tile plans (:mod:`spanfill.layout.planning`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .planning import TilePlan, plan_packed, plan_padded
from .validation import (
    Spans,
    check_int32_range,
    check_cu_seqlens,
    check_int_vector,
    check_meta_types,
    check_spans,
    kv_bounds,
    pages_in_use,
    validate_meta,
)

__all__ = ["PaddedLayout", "SpanLayout", "VarlenLayout", "compute_slot_mapping"]


class _PlannedOnce:
    """A layout's tile plans, built on first use and kept for every later layer.

    Each layout holds a ``_plans`` dict and builds a plan with ``_plan(block_q, causal)``.
    """

    _plans: dict

    def _plan(self, block_q: int, causal: bool) -> TilePlan:
        raise NotImplementedError

    def tile_plan(self, block_q: int, causal: bool) -> TilePlan:
        """The (cached) tile plan for tiles of ``block_q`` tokens."""
        key = (block_q, causal)
        if key not in self._plans:
            self._plans[key] = self._plan(block_q, causal)
        return self._plans[key]


@dataclass
class PaddedLayout(_PlannedOnce):
    """A padded batch's valid lengths, checked once and planned once for every layer.

    ``padded_prefill`` accepts either plain ``valid_lens`` (checked and planned on
    every call: one host sync) or this object (no sync after :meth:`build`).

    Attributes
    ----------
    valid_lens : [B] int32, valid tokens per sample
    seq_len : S, the padded length
    padding_side : "right" or "left"
    """

    valid_lens: torch.Tensor
    seq_len: int
    padding_side: str = "right"
    _plans: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, valid_lens: torch.Tensor, seq_len: int, padding_side: str = "right",
              validate: bool = True) -> "PaddedLayout":
        """Check ``0 <= valid_lens[b] <= seq_len`` (one host sync unless ``validate=False``).

        Parameters
        ----------
        valid_lens : [B] int32|int64
        seq_len : S
        padding_side : "right" (valid tokens first) or "left" (valid tokens last)
        """
        check_int_vector("valid_lens", valid_lens)
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if validate and valid_lens.numel():
            bad = (valid_lens < 0) | (valid_lens > seq_len)
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0, 0])
                raise ValueError(f"valid_lens[{i}] = {int(valid_lens[i])} is outside [0, S={seq_len}]")
        return cls(valid_lens.to(torch.int32).contiguous(), int(seq_len), padding_side)

    @property
    def device(self) -> torch.device:
        return self.valid_lens.device

    def _plan(self, block_q: int, causal: bool) -> TilePlan:
        return plan_padded(self.valid_lens, self.seq_len, block_q, self.padding_side, causal)


@dataclass
class VarlenLayout(_PlannedOnce):
    """Sequences packed back to back (``cu_seqlens``), checked once and planned once.

    ``varlen_prefill`` accepts either plain ``cu_seqlens`` (checked and planned on the
    first call with that tensor, one host sync) or this object.

    Attributes
    ----------
    cu_seqlens : [B+1] int32, sequence ``b`` is rows ``[cu_seqlens[b], cu_seqlens[b+1])``
    num_tokens : T, the packed rows
    """

    cu_seqlens: torch.Tensor
    num_tokens: int
    _plans: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, num_tokens: int,
              validate: bool = True) -> "VarlenLayout":
        """Check that ``cu_seqlens`` runs from 0 to T without decreasing (one host sync
        unless ``validate=False``).

        Parameters
        ----------
        cu_seqlens : [B+1] int32|int64
        num_tokens : T
        """
        check_int_vector("cu_seqlens", cu_seqlens)
        if validate:
            check_cu_seqlens(cu_seqlens, num_tokens)
        elif cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens must have at least one entry (0)")
        return cls(cu_seqlens.to(torch.int32).contiguous(), int(num_tokens))

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    @property
    def num_requests(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def _plan(self, block_q: int, causal: bool) -> TilePlan:
        cu = self.cu_seqlens
        return plan_packed(cu, cu[1:] - cu[:-1], self.num_tokens, block_q, causal, kv_row0=cu[:-1])


@dataclass
class SpanLayout(_PlannedOnce):
    """Where the hole (span) tokens of a batch sit, and where their KV lives.

    Build it once per batch with :meth:`build` (Python spans) or
    :meth:`from_tensors` (the metadata a serving engine already holds), then pass it
    to :func:`spanfill.append_kv` and :func:`spanfill.span_prefill` for every layer.

    Attributes
    ----------
    positions : [T] int32, original position of each span token, request by request
    query_start_loc : [B+1] int32, request ``b`` owns rows ``[qsl[b], qsl[b+1])``
    seq_lens : [B] int32, KV length of each request (cached plus holes)
    block_table : [B, max_pages] int32, ``block_table[b, j]`` holds positions
        ``[j*page_size, (j+1)*page_size)`` of request ``b``
    page_size : int
    slot_mapping : [T] int64, cache slot of each span token:
        ``block_table[b, pos // page_size] * page_size + pos % page_size``
    validated : whether the metadata was checked (``from_tensors(validate=...)``);
        an unvalidated layout also skips the page-pool check of the ops
    kv_start, kv_end : [B] int32 or None: this cache holds only KV positions
        ``[kv_start[b], kv_end[b])`` of request ``b`` (a shard by position, for
        context parallelism); pages outside may be -1, span tokens outside get slot
        -1, and rows see no key outside. None means ``[0, seq_lens[b])``.
    """

    positions: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    page_size: int
    slot_mapping: torch.Tensor
    validated: bool = True
    kv_start: torch.Tensor | None = None
    kv_end: torch.Tensor | None = None
    _plans: dict = field(default_factory=dict, repr=False)
    _pools_checked: set = field(default_factory=set, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def num_requests(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @classmethod
    def build(
        cls,
        spans: Spans,
        seq_lens: Sequence[int] | torch.Tensor,
        block_table: torch.Tensor,
        page_size: int,
        device: torch.device | str | None = None,
    ) -> "SpanLayout":
        """Validate Python spans and build the layout.

        Parameters
        ----------
        spans : per request, a list of half-open ``(start, stop)`` pairs of ints (Python
            or numpy integers): sorted, disjoint, non-empty, inside ``[0, seq_len)``. A
            request may have no spans. One request with two spans: ``[[(0, 4), (6, 8)]]``.
        seq_lens : [B] ints, or a [B] int32|int64 tensor: the full prompt length of each
            request
        block_table : [B, max_pages] int32, must cover ``seq_len`` for each request
        page_size : tokens per page, >= 1
        device : where the layout's tensors live; defaults to ``block_table.device``

        Raises
        ------
        ValueError, TypeError
            naming the argument and the request/span index at fault.
        """
        lens, starts, stops, counts = check_spans(spans, seq_lens, block_table)
        st, sp = np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64)
        span_len = sp - st
        # positions = concat(arange(start, stop)) without a Python loop over tokens.
        offsets = np.repeat(st - (np.cumsum(span_len) - span_len), span_len)
        positions = (offsets + np.arange(int(span_len.sum()), dtype=np.int64)).astype(np.int32)
        tokens_per_req = np.zeros(len(lens), dtype=np.int64)
        span_req = np.repeat(np.arange(len(lens)), counts)
        np.add.at(tokens_per_req, span_req, span_len)
        qsl = np.concatenate([[0], np.cumsum(tokens_per_req)]).astype(np.int32)
        device = torch.device(device) if device is not None else block_table.device
        return cls.from_tensors(
            positions=torch.from_numpy(positions).to(device),
            query_start_loc=torch.from_numpy(qsl).to(device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
            block_table=block_table.to(device),
            page_size=page_size,
            validate=True,
        )

    @classmethod
    def from_tensors(
        cls,
        positions: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        page_size: int,
        slot_mapping: torch.Tensor | None = None,
        validate: bool = True,
        kv_start: torch.Tensor | None = None,
        kv_end: torch.Tensor | None = None,
    ) -> "SpanLayout":
        """Build a layout from a serving engine's metadata.

        A batch captured at a fixed token capacity (a CUDA graph) pads its unused
        rows into a spare request of ``seq_lens`` 0, ``validate=False``: those rows
        write no K/V, read nothing, and output 0 with lse -inf. The convention and
        what is guaranteed: docs/captured_batches.md.

        Parameters
        ----------
        positions : [T] int32|int64, position of each new token, strictly
            increasing within a request (padded rows: any value >= 0)
        query_start_loc : [B+1] int32|int64, cumulative token counts, starting at 0
        seq_lens : [B] int32|int64, KV length per request
        block_table : [B, max_pages] int32|int64
        page_size : tokens per page
        slot_mapping : [T] int64 or None (computed from the block table: -1 for a
            row whose position is outside ``[0, seq_lens[b])`` of its request, or
            outside ``[kv_start[b], kv_end[b])``, or that is at or past
            ``query_start_loc[-1]``). Given, it is used as is: padded rows must
            carry -1 there.
        validate : check the metadata (one host sync for the whole check). With
            False nothing here waits on the device, so the call can be captured in a
            CUDA graph; invalid metadata is then undefined behaviour. Validation
            rejects padded rows (a position outside ``[0, seq_lens[b])``).
        kv_start, kv_end : [B] int or None, the KV positions this cache holds (see
            the class docstring); ``0 <= kv_start <= kv_end <= seq_lens``
        """
        check_meta_types(positions, query_start_loc, seq_lens, block_table, page_size)
        if slot_mapping is not None and (
            not torch.is_tensor(slot_mapping) or slot_mapping.dtype not in (torch.int32, torch.int64)
        ):
            raise TypeError(
                f"slot_mapping must be an int32 or int64 tensor, got "
                f"{getattr(slot_mapping, 'dtype', type(slot_mapping).__name__)}"
            )
        if validate:
            check_int32_range(positions=positions, query_start_loc=query_start_loc,
                               seq_lens=seq_lens, block_table=block_table)
        device = positions.device
        positions = positions.to(device=device, dtype=torch.int32).contiguous()
        qsl = query_start_loc.to(device=device, dtype=torch.int32).contiguous()
        seq_lens = seq_lens.to(device=device, dtype=torch.int32).contiguous()
        block_table = block_table.to(device=device, dtype=torch.int32).contiguous()
        if kv_start is not None or kv_end is not None:
            kv_start, kv_end = kv_bounds(kv_start, kv_end, seq_lens, validate)
        if validate:
            validate_meta(positions, qsl, seq_lens, block_table, page_size, kv_start, kv_end)
        if slot_mapping is None:
            slot_mapping = compute_slot_mapping(positions, qsl, seq_lens, block_table, page_size,
                                                kv_start, kv_end)
        elif slot_mapping.shape != positions.shape:
            raise ValueError(
                f"slot_mapping has shape {tuple(slot_mapping.shape)}, expected {tuple(positions.shape)}"
            )
        return cls(positions, qsl, seq_lens, block_table, page_size,
                   slot_mapping.to(device=device, dtype=torch.int64).contiguous(),
                   validated=validate, kv_start=kv_start, kv_end=kv_end)

    def _plan(self, block_q: int, causal: bool) -> TilePlan:
        return plan_packed(self.query_start_loc,
                           self.seq_lens if self.kv_end is None else self.kv_end,
                           self.num_tokens, block_q, causal, positions=self.positions)

    def check_pool(self, num_pages: int) -> None:
        """Raise if a page that covers a valid position is outside ``[0, num_pages)``.

        The check reads one number back from the device; it runs once per layout
        and pool size. A layout built with ``validate=False`` skips it: such a
        layout promises that it waits on nothing (so it can be captured in a CUDA
        graph), and its metadata is the caller's responsibility.
        """
        if not self.validated or num_pages in self._pools_checked:
            return
        needed = pages_in_use(self.seq_lens, self.block_table, self.page_size,
                               self.kv_start, self.kv_end)
        bad = needed & ((self.block_table < 0) | (self.block_table >= num_pages))
        if bool(bad.any()):
            b, j = (int(x) for x in torch.nonzero(bad)[0])
            raise ValueError(
                f"block_table[{b}, {j}] = {int(self.block_table[b, j])} is not a page of the "
                f"pool (num_pages={num_pages}); request {b} needs it for seq_lens[{b}]="
                f"{int(self.seq_lens[b])}"
            )
        bad_slot = (self.slot_mapping < -1) | (self.slot_mapping >= num_pages * self.page_size)
        if bool(bad_slot.any()):
            i = int(torch.nonzero(bad_slot)[0, 0])
            raise ValueError(
                f"slot_mapping[{i}] = {int(self.slot_mapping[i])} is outside the pool "
                f"[0, num_pages*page_size={num_pages * self.page_size}) and is not -1"
            )
        self._pools_checked.add(num_pages)


def compute_slot_mapping(
    positions: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, page_size: int, kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """The cache slot of each row, or -1 for a row that must write no K/V.

    Row ``i`` of request ``b`` (``qsl[b] <= i < qsl[b+1]``) at position ``pos`` gets
    ``block_table[b, pos // page_size] * page_size + pos % page_size`` if
    ``0 <= pos < seq_lens[b]`` (and ``kv_start[b] <= pos < kv_end[b]`` when given);
    every other row gets -1, and so does every row at or past ``qsl[-1]`` (it
    belongs to no request). This is what lets a captured batch pad its unused rows
    (docs/captured_batches.md): they sit in a spare request of ``seq_lens`` 0, whose
    block-table row may be stale, so a table entry is only trusted for a position
    the request holds, and the gather is clamped into the table (a padded row reads
    nothing out of range whatever its position).

    Parameters
    ----------
    positions : [T] int32|int64
    query_start_loc : [B+1] int32|int64
    seq_lens : [B] int32|int64
    block_table : [B, max_pages] int32|int64
    page_size : tokens per page
    kv_start, kv_end : [B] int or None, the KV positions this cache holds

    Returns
    -------
    [T] int64
    """
    num_tokens = positions.shape[0]
    if block_table.numel() == 0:
        # No request, or no page column: no row has a slot, and nothing can be gathered.
        return torch.full((num_tokens,), -1, dtype=torch.int64, device=positions.device)
    token = torch.arange(num_tokens, device=positions.device)
    req = torch.searchsorted(query_start_loc[1:].long(), token, right=True)
    req = req.clamp(max=block_table.shape[0] - 1)
    pos = positions.long()
    hi = seq_lens.long()[req]
    if kv_end is not None:
        hi = torch.minimum(hi, kv_end.long()[req])
    lo = kv_start.long()[req] if kv_start is not None else 0
    held = (pos >= lo) & (pos < hi) & (token < query_start_loc[-1])
    page_idx = (pos // page_size).clamp(min=0, max=block_table.shape[1] - 1)
    slots = block_table.long()[req, page_idx] * page_size + pos % page_size
    return torch.where(held, slots, -1)
