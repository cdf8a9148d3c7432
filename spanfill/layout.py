"""Span layouts and the device-side tile plan that the attention kernel walks.

A *tile* is up to ``block_q`` consecutive packed query rows of ONE request. The
plan lists the tiles, longest KV range first, so that the last wave of programs
is short. It is built with tensor ops only (no host sync, no Python loop over
tokens or spans), so it can be captured in a CUDA graph, and it is cached on the
layout so every layer of a model step reuses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

__all__ = ["PaddedLayout", "SpanLayout", "TilePlan", "plan_packed", "plan_padded"]

Spans = Sequence[Sequence[tuple[int, int]]]


@dataclass(frozen=True)
class TilePlan:
    """Which packed query rows each attention program handles.

    Attributes
    ----------
    tile_req : [num_tiles] int32, the request of each tile; -1 for an empty slot
        (the grid is sized from host-known shapes, so it has an upper bound of tiles)
    tile_row0 : [num_tiles] int32, first packed row of the tile
    tile_row_end : [num_tiles] int32, one past the last packed row of the tile (at
        most ``block_q`` rows past ``tile_row0``, except a padded plan's entry of a
        sample's padding rows: see :func:`plan_padded`)
    q_start : [B] int32, first packed row of each request's valid rows
    q_len : [B] int32, number of valid query rows of each request
    kv_row0 : [B] int32, row of each request's KV position 0 in a dense KV tensor
        (unused with paged KV)
    kv_len : [B] int32, number of valid KV positions of each request
    block_q : int, query tokens per tile
    """

    tile_req: torch.Tensor
    tile_row0: torch.Tensor
    tile_row_end: torch.Tensor
    q_start: torch.Tensor
    q_len: torch.Tensor
    kv_row0: torch.Tensor
    kv_len: torch.Tensor
    block_q: int

    @property
    def num_tiles(self) -> int:
        return self.tile_req.shape[0]


def _sorted_plan(
    tile_req: torch.Tensor,
    tile_row0: torch.Tensor,
    tile_row_end: torch.Tensor,
    work: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    kv_row0: torch.Tensor,
    kv_len: torch.Tensor,
    block_q: int,
) -> TilePlan:
    # Longest KV range first: programs are scheduled roughly in grid order, so the
    # short tiles fill the tail wave instead of one long tile running alone.
    order = torch.argsort(work, descending=True, stable=True)
    i32 = torch.int32
    return TilePlan(
        tile_req=tile_req[order].to(i32).contiguous(),
        tile_row0=tile_row0[order].to(i32).contiguous(),
        tile_row_end=tile_row_end[order].to(i32).contiguous(),
        q_start=q_start.to(i32).contiguous(),
        q_len=q_len.to(i32).contiguous(),
        kv_row0=kv_row0.to(i32).contiguous(),
        kv_len=kv_len.to(i32).contiguous(),
        block_q=block_q,
    )


def plan_packed(
    query_start_loc: torch.Tensor,
    kv_len: torch.Tensor,
    num_tokens: int,
    block_q: int,
    causal: bool,
    positions: torch.Tensor | None = None,
    kv_row0: torch.Tensor | None = None,
) -> TilePlan:
    """Tile plan for rows packed request by request (span and varlen layouts).

    Parameters
    ----------
    query_start_loc : [B+1] int32, request ``b`` owns packed rows ``[qsl[b], qsl[b+1])``
    kv_len : [B] int32, valid KV positions per request
    num_tokens : T, the number of packed rows (host int, from a shape)
    block_q : query tokens per tile
    causal : whether a tile's KV range ends at its last row's position
    positions : [T] int32 or None (rows of a request sit at ``0, 1, 2, ...``)
    kv_row0 : [B] int32 or None, row of each request's position 0 in a dense KV tensor
    """
    num_req = query_start_loc.shape[0] - 1
    qsl = query_start_loc.to(torch.int32).contiguous()
    # sum_b ceil(n_b / block_q) <= sum_b (n_b + block_q - 1) / block_q, an integer, so
    # <= (T + B * (block_q - 1)) // block_q: a host-known bound on the grid, and the
    # program count split-KV decides on (pick_num_splits), so kept tight.
    max_tiles = (num_tokens + num_req * (block_q - 1)) // block_q
    return _plan_rows(qsl[:-1], qsl[1:] - qsl[:-1], kv_len, max(max_tiles, 1), block_q, causal,
                      positions=positions, kv_row0=kv_row0, q_stop=qsl[1:])


def _plan_rows(
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    kv_len: torch.Tensor,
    max_tiles: int,
    block_q: int,
    causal: bool,
    positions: torch.Tensor | None = None,
    kv_row0: torch.Tensor | None = None,
    padded_seq_len: int = 0,
    q_stop: torch.Tensor | None = None,
) -> TilePlan:
    """The plan of every layout: request ``b`` owns rows ``[q_start[b], q_start[b] + q_len[b])``.

    One single-program launch where the kernels run (a GPU, or the interpreter);
    torch ops build the same plan elsewhere and when it has more slots than one
    program sorts. ``max_tiles`` bounds the tiles (the grid); ``padded_seq_len``
    = S adds one padding entry per sample after them (see :func:`plan_padded`);
    ``q_stop`` may pass ``q_start + q_len`` when the caller has it as a view.
    """
    num_req = q_start.shape[0]
    slots = max_tiles + (num_req if padded_seq_len > 0 else 0)
    on_kernel_device = q_start.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if on_kernel_device and num_req > 0:
        from .kernels import MAX_PLAN_TILES, plan_packed_launch

        if slots <= MAX_PLAN_TILES:
            i32 = torch.int32
            kv_len = kv_len.to(i32).contiguous()
            tile_req, tile_row0, tile_row_end = plan_packed_launch(
                q_start, q_start + q_len if q_stop is None else q_stop, kv_len,
                positions.to(i32).contiguous() if positions is not None else None,
                slots, block_q, causal, padded_seq_len)
            kv_row0 = torch.zeros_like(kv_len) if kv_row0 is None else kv_row0.to(i32).contiguous()
            return TilePlan(tile_req, tile_row0, tile_row_end, q_start, q_len, kv_row0, kv_len,
                            block_q)
    return _plan_rows_torch(q_start, q_len, kv_len, max_tiles, block_q, causal, positions,
                            kv_row0, padded_seq_len)


def _plan_rows_torch(
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    kv_len: torch.Tensor,
    max_tiles: int,
    block_q: int,
    causal: bool,
    positions: torch.Tensor | None = None,
    kv_row0: torch.Tensor | None = None,
    padded_seq_len: int = 0,
) -> TilePlan:
    """:func:`_plan_rows` with torch ops (the plan of ``plan_packed_launch``).

    Request ``b`` owns rows ``[q_start[b], q_start[b] + q_len[b])``; ``max_tiles``
    bounds its tiles. With ``padded_seq_len`` = S, one entry per sample with padding
    follows the tiles, as the kernel's: ``[b*S, q_start[b])`` or ``[q_stop[b], (b+1)*S)``.
    """
    device = q_start.device
    q_start, q_len = q_start.long(), q_len.long()
    num_req = q_start.shape[0]
    if kv_row0 is None:
        kv_row0 = torch.zeros_like(q_start)
    tile = torch.arange(max_tiles, device=device)
    if num_req == 0:
        empty = torch.full_like(tile, -1)
        return _sorted_plan(empty, tile * 0, tile * 0, empty, q_start, q_len, kv_row0, kv_len,
                            block_q)
    tiles_per_req = (q_len + block_q - 1) // block_q
    cum = torch.cumsum(tiles_per_req, 0)
    req = torch.searchsorted(cum, tile, right=True)
    valid = req < num_req
    req_c = req.clamp(max=num_req - 1)
    local = tile - (cum[req_c] - tiles_per_req[req_c])
    row0 = q_start[req_c] + local * block_q
    row_end = torch.minimum(row0 + block_q, q_start[req_c] + q_len[req_c])
    if causal:
        last = (row_end - 1).clamp(min=0)
        last_pos = positions.long()[last.clamp(max=max(positions.shape[0] - 1, 0))] \
            if positions is not None else last - q_start[req_c]
        work = last_pos + 1
    else:
        work = kv_len.long()[req_c]
    work = torch.where(valid, work, torch.full_like(work, -1))
    tile_req = torch.where(valid, req_c, torch.full_like(req_c, -1))
    if padded_seq_len > 0:
        # After every tile with rows (work >= 1), before the empty slots (-1).
        sample0 = torch.arange(num_req, device=device) * padded_seq_len
        left = q_start > sample0
        pad0 = torch.where(left, sample0, q_start + q_len)
        pad1 = torch.where(left, q_start, sample0 + padded_seq_len)
        has_pad = pad1 > pad0
        req_p = torch.arange(num_req, device=device)
        tile_req = torch.cat([tile_req, torch.where(has_pad, req_p, -1)])
        row0 = torch.cat([row0, pad0])
        row_end = torch.cat([row_end, pad1])
        work = torch.cat([work, has_pad.long() - 1])
    return _sorted_plan(tile_req, row0, row_end, work, q_start, q_len, kv_row0, kv_len,
                        block_q)


def plan_padded(
    valid_lens: torch.Tensor, seq_len: int, block_q: int, padding_side: str, causal: bool
) -> TilePlan:
    """Tile plan for a padded batch ``[B, S, ...]`` viewed as ``B*S`` packed rows.

    Each sample's valid rows are tiled from its first valid row, as packed rows
    would be, and ordered by KV range; after them comes one entry per sample that
    holds all its rows of padding (a prefix when padded on the left, a suffix on
    the right), which the kernel fills with zeros. One program per sample and head
    group for the padding costs far less than one per tile of padding.

    Parameters
    ----------
    valid_lens : [B] int, valid tokens per sample
    seq_len : S
    block_q : query tokens per tile
    padding_side : "right" or "left"
    causal : causal within the valid tokens
    """
    device = valid_lens.device
    num_req = valid_lens.shape[0]
    i32 = torch.int32
    lens = valid_lens.to(i32).contiguous()
    q_start = torch.arange(0, num_req * seq_len, seq_len, dtype=i32, device=device)
    if padding_side == "left":
        q_start = q_start + (seq_len - lens)
    # sum(ceil(valid_len / block_q)) <= B * ceil(S / block_q)
    max_tiles = max(num_req * ((seq_len + block_q - 1) // block_q), 1)
    return _plan_rows(q_start, lens, lens, max_tiles, block_q, causal, kv_row0=q_start,
                      padded_seq_len=seq_len)


@dataclass
class PaddedLayout:
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
        if not torch.is_tensor(valid_lens):
            raise TypeError(f"valid_lens must be a torch.Tensor, got {type(valid_lens).__name__}")
        if valid_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"valid_lens must be int32 or int64, got {valid_lens.dtype}")
        if valid_lens.dim() != 1:
            raise ValueError(f"valid_lens must be 1-D, got shape {tuple(valid_lens.shape)}")
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

    def tile_plan(self, block_q: int, causal: bool) -> TilePlan:
        """The (cached) tile plan for tiles of ``block_q`` tokens."""
        key = (block_q, causal)
        if key not in self._plans:
            self._plans[key] = plan_padded(self.valid_lens, self.seq_len, block_q,
                                           self.padding_side, causal)
        return self._plans[key]


@dataclass
class SpanLayout:
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
        def is_seq(x: object) -> bool:
            return isinstance(x, (Sequence, np.ndarray)) and not isinstance(x, (str, bytes))

        def is_int(x: object) -> bool:
            # int() would truncate 0.5 to 0 and take True for 1: only integers are bounds.
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        per_request = ("spans is per request, e.g. spans=[[(0, 4), (6, 8)]] for one request "
                       "with spans (0, 4) and (6, 8)")
        if not is_seq(spans):
            raise TypeError(f"spans must be a list of lists of (start, stop) pairs, got "
                            f"{type(spans).__name__}: {per_request}")
        if torch.is_tensor(seq_lens):
            if seq_lens.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"seq_lens must be int32 or int64, got {seq_lens.dtype}")
            if seq_lens.dim() != 1:
                raise ValueError(f"seq_lens must be 1-D, got shape {tuple(seq_lens.shape)}")
            lens = seq_lens.tolist()
        elif is_seq(seq_lens):
            lens = list(seq_lens)
            for b, n in enumerate(lens):
                if not is_int(n):
                    raise TypeError(f"seq_lens[{b}] must be an int, got {type(n).__name__} {n!r}")
            lens = [int(n) for n in lens]
        else:
            raise TypeError(f"seq_lens must be a list of ints or a 1-D int tensor, got "
                            f"{type(seq_lens).__name__}")
        if not torch.is_tensor(block_table):
            raise TypeError(f"block_table must be a torch.Tensor ([B, max_pages] int32), got "
                            f"{type(block_table).__name__}")
        # A flat [(0, 4), (6, 8)] (the per-request level forgotten) shows as ints here.
        for b, req_spans in enumerate(spans):
            if not is_seq(req_spans):
                raise TypeError(f"spans[{b}] must be a list of (start, stop) pairs, got "
                                f"{type(req_spans).__name__} {req_spans!r}: {per_request}")
            if any(is_int(x) for x in req_spans):
                raise TypeError(f"spans[{b}] = {req_spans!r} must be a list of (start, stop) "
                                f"pairs, not a pair: {per_request}")
        if len(spans) != len(lens):
            raise ValueError(f"spans has {len(spans)} requests but seq_lens has {len(lens)}")
        starts: list[int] = []
        stops: list[int] = []
        counts: list[int] = []
        for b, req_spans in enumerate(spans):
            prev_stop = 0
            for j, span in enumerate(req_spans):
                if not is_seq(span):
                    raise TypeError(f"spans[{b}][{j}] must be a (start, stop) pair, got "
                                    f"{type(span).__name__} {span!r}")
                if len(span) != 2:
                    raise ValueError(f"spans[{b}][{j}] must be a (start, stop) pair, got {span!r}")
                if not (is_int(span[0]) and is_int(span[1])):
                    bad = span[1] if is_int(span[0]) else span[0]
                    raise TypeError(f"spans[{b}][{j}] = {span!r} must hold ints (Python or numpy "
                                    f"integers), got {type(bad).__name__} {bad!r}")
                start, stop = int(span[0]), int(span[1])
                if start >= stop:
                    raise ValueError(f"spans[{b}][{j}] = ({start}, {stop}) is empty: start must be < stop")
                if start < 0 or stop > lens[b]:
                    raise ValueError(
                        f"spans[{b}][{j}] = ({start}, {stop}) is outside [0, seq_lens[{b}]={lens[b]})"
                    )
                if j > 0 and start < prev_stop:
                    raise ValueError(
                        f"spans[{b}][{j}] = ({start}, {stop}) overlaps or precedes spans[{b}][{j-1}]"
                        f" (ends at {prev_stop}): spans must be sorted and disjoint"
                    )
                prev_stop = stop
                starts.append(start)
                stops.append(stop)
            counts.append(len(req_spans))
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
        _check_meta_types(positions, query_start_loc, seq_lens, block_table, page_size)
        if slot_mapping is not None and (
            not torch.is_tensor(slot_mapping) or slot_mapping.dtype not in (torch.int32, torch.int64)
        ):
            raise TypeError(
                f"slot_mapping must be an int32 or int64 tensor, got "
                f"{getattr(slot_mapping, 'dtype', type(slot_mapping).__name__)}"
            )
        if validate:
            _check_int32_range(positions=positions, query_start_loc=query_start_loc,
                               seq_lens=seq_lens, block_table=block_table)
        device = positions.device
        positions = positions.to(device=device, dtype=torch.int32).contiguous()
        qsl = query_start_loc.to(device=device, dtype=torch.int32).contiguous()
        seq_lens = seq_lens.to(device=device, dtype=torch.int32).contiguous()
        block_table = block_table.to(device=device, dtype=torch.int32).contiguous()
        if kv_start is not None or kv_end is not None:
            kv_start, kv_end = _kv_bounds(kv_start, kv_end, seq_lens, validate)
        if validate:
            _validate_meta(positions, qsl, seq_lens, block_table, page_size, kv_start, kv_end)
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

    def tile_plan(self, block_q: int, causal: bool) -> TilePlan:
        """The (cached) tile plan for tiles of ``block_q`` tokens."""
        key = (block_q, causal)
        if key not in self._plans:
            self._plans[key] = plan_packed(
                self.query_start_loc, self.seq_lens if self.kv_end is None else self.kv_end,
                self.num_tokens, block_q, causal, positions=self.positions,
            )
        return self._plans[key]

    def check_pool(self, num_pages: int) -> None:
        """Raise if a page that covers a valid position is outside ``[0, num_pages)``.

        The check reads one number back from the device; it runs once per layout
        and pool size. A layout built with ``validate=False`` skips it: such a
        layout promises that it waits on nothing (so it can be captured in a CUDA
        graph), and its metadata is the caller's responsibility.
        """
        if not self.validated or num_pages in self._pools_checked:
            return
        needed = _pages_in_use(self.seq_lens, self.block_table, self.page_size,
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


def _pages_in_use(seq_lens: torch.Tensor, block_table: torch.Tensor, page_size: int,
                  kv_start: torch.Tensor | None = None,
                  kv_end: torch.Tensor | None = None) -> torch.Tensor:
    """[B, max_pages] bool: which block-table entries hold a position this cache keeps."""
    end = seq_lens.long() if kv_end is None else kv_end.long()
    pages_end = (end + page_size - 1) // page_size
    col = torch.arange(block_table.shape[1], device=block_table.device)
    needed = col[None, :] < pages_end[:, None]
    if kv_start is not None:
        # An empty window [s, s) needs no page, even when s sits inside one.
        needed &= (col[None, :] >= (kv_start.long() // page_size)[:, None]) \
            & (end > kv_start.long())[:, None]
    return needed


def _kv_bounds(kv_start: torch.Tensor | None, kv_end: torch.Tensor | None,
               seq_lens: torch.Tensor, validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both shard bounds as int32 [B] tensors, checked when ``validate``."""
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if t is not None and (not torch.is_tensor(t) or t.dtype not in (torch.int32, torch.int64)
                              or t.shape != seq_lens.shape):
            raise ValueError(f"{name} must be an int32/int64 tensor of shape [B]={tuple(seq_lens.shape)}")
    lo = torch.zeros_like(seq_lens) if kv_start is None else kv_start.to(seq_lens.device, torch.int32)
    hi = seq_lens.clone() if kv_end is None else kv_end.to(seq_lens.device, torch.int32)
    if validate:
        bad = (lo < 0) | (lo > hi) | (hi > seq_lens)
        if bool(bad.any()):
            b = int(torch.nonzero(bad)[0, 0])
            raise ValueError(
                f"kv_start[{b}]={int(lo[b])}, kv_end[{b}]={int(hi[b])} must satisfy "
                f"0 <= kv_start <= kv_end <= seq_lens[{b}]={int(seq_lens[b])}"
            )
    return lo.contiguous(), hi.contiguous()


def _check_meta_types(
    positions: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, page_size: int,
) -> None:
    for name, t, ndim in (("positions", positions, 1), ("query_start_loc", query_start_loc, 1),
                          ("seq_lens", seq_lens, 1), ("block_table", block_table, 2)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
        if t.device != positions.device:
            raise ValueError(f"{name} is on {t.device} but positions is on {positions.device}")
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
    num_req = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_req + 1:
        raise ValueError(
            f"query_start_loc has {query_start_loc.shape[0]} entries, expected B+1={num_req + 1}"
        )
    if block_table.shape[0] != num_req:
        raise ValueError(f"block_table has {block_table.shape[0]} rows, expected B={num_req}")


def _check_int32_range(**tensors: torch.Tensor) -> None:
    """Raise if an int64 tensor holds a value that would wrap when cast to int32.

    The layout stores its metadata as int32; without this check an int64 page id
    of ``2**32 + 5`` would silently become page 5 of another request.
    """
    lo, hi = torch.iinfo(torch.int32).min, torch.iinfo(torch.int32).max
    wide = {name: t for name, t in tensors.items() if t.dtype == torch.int64 and t.numel()}
    if not wide:
        return
    flags = torch.stack([((t < lo) | (t > hi)).any() for t in wide.values()]).cpu()
    for (name, t), flag in zip(wide.items(), flags.tolist()):
        if flag:
            bad = torch.nonzero((t < lo) | (t > hi))[0].tolist()
            index = ", ".join(str(i) for i in bad)
            raise ValueError(f"{name}[{index}] = {int(t[tuple(bad)])} does not fit in int32")


def _validate_meta(
    positions: torch.Tensor, qsl: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, page_size: int, kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
) -> None:
    """All checks on the device, one host sync for the verdict; details only on failure."""
    num_tokens = positions.shape[0]
    req_tokens = qsl[1:].long() - qsl[:-1].long()
    token = torch.arange(num_tokens, device=positions.device)
    req = torch.searchsorted(qsl[1:].long(), token, right=True).clamp(max=max(seq_lens.shape[0] - 1, 0))
    pos = positions.long()
    same_req = req[1:] == req[:-1]
    checks = {
        "qsl_start": qsl[0] != 0 if qsl.numel() else torch.tensor(False),
        "qsl_end": qsl[-1] != num_tokens if qsl.numel() else torch.tensor(False),
        "qsl_order": (req_tokens < 0).any(),
        "seq_lens": (seq_lens < 0).any(),
        "pos_neg": (pos < 0).any(),
        "pos_order": (same_req & (pos[1:] <= pos[:-1])).any(),
        "pos_range": (pos >= seq_lens.long()[req]).any() if num_tokens else torch.tensor(False),
        "table_cover": (seq_lens.long() > block_table.shape[1] * page_size).any(),
        "table_neg": (_pages_in_use(seq_lens, block_table, page_size, kv_start, kv_end)
                      & (block_table < 0)).any(),
    }
    flags = torch.stack([c.to(positions.device).reshape(()) for c in checks.values()]).cpu()
    if not bool(flags.any()):
        return
    failed = [name for name, flag in zip(checks, flags.tolist()) if flag][0]
    first = lambda m: int(torch.nonzero(m)[0, 0])  # noqa: E731 - only on the error path
    if failed == "qsl_start":
        raise ValueError(f"query_start_loc[0] must be 0, got {int(qsl[0])}")
    if failed == "qsl_end":
        raise ValueError(f"query_start_loc[-1]={int(qsl[-1])} must equal positions.shape[0]={num_tokens}")
    if failed == "qsl_order":
        b = first(req_tokens < 0)
        raise ValueError(f"query_start_loc must be non-decreasing: query_start_loc[{b + 1}] < query_start_loc[{b}]")
    if failed == "seq_lens":
        b = first(seq_lens < 0)
        raise ValueError(f"seq_lens[{b}] = {int(seq_lens[b])} is negative")
    if failed == "pos_neg":
        i = first(pos < 0)
        raise ValueError(f"positions[{i}] = {int(pos[i])} is negative (request {int(req[i])})")
    if failed == "pos_order":
        i = first(same_req & (pos[1:] <= pos[:-1])) + 1
        raise ValueError(
            f"positions must be strictly increasing within a request: positions[{i}]={int(pos[i])}"
            f" <= positions[{i - 1}]={int(pos[i - 1])} in request {int(req[i])}"
        )
    if failed == "pos_range":
        i = first(pos >= seq_lens.long()[req])
        b = int(req[i])
        raise ValueError(
            f"positions[{i}] = {int(pos[i])} is outside [0, seq_lens[{b}]={int(seq_lens[b])})"
        )
    if failed == "table_cover":
        b = first(seq_lens.long() > block_table.shape[1] * page_size)
        raise ValueError(
            f"seq_lens[{b}] = {int(seq_lens[b])} is larger than block_table covers "
            f"({block_table.shape[1]} pages x page_size {page_size})"
        )
    bad = _pages_in_use(seq_lens, block_table, page_size, kv_start, kv_end) & (block_table < 0)
    b, j = (int(x) for x in torch.nonzero(bad)[0])
    raise ValueError(
        f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a page, but request {b} needs it "
        f"for seq_lens[{b}]={int(seq_lens[b])}"
    )
