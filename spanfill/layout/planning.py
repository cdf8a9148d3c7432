"""The tile plan that the attention kernel walks, built on the device.

A *tile* is up to ``block_q`` consecutive packed query rows of ONE request. The
plan lists the tiles, longest KV range first, so that the last wave of programs
is short. It is built with tensor ops only (no host sync, no Python loop over
tokens or spans), so it can be captured in a CUDA graph, and the layouts cache it
so every layer of a model step reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import AUTO, packed_tile_bound, select_backend

__all__ = ["TilePlan", "plan_packed", "plan_padded"]


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
    # The same bound the backend's split-KV decision counts programs with.
    max_tiles = packed_tile_bound(num_tokens, num_req, block_q)
    return _plan_rows(qsl[:-1], qsl[1:] - qsl[:-1], kv_len, max_tiles, block_q, causal,
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
    # The registry's choice for this device (not the caller's override: the plan is
    # cached on the layout and serves every op, and both paths build the same plan).
    planner, _ = select_backend(q_start.device, AUTO)
    if planner.name == "triton" and num_req > 0:
        from ..kernels import MAX_PLAN_TILES, plan_packed_launch

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
