"""The tile plan in one single-program launch (packed rows, and padded batches).

Built with torch ops, the plan is ~35 tiny kernels (~120 us of GPU time and far
more of launch overhead for 1,000 spans); here it is one program: per-request
tile counts and their prefix sum, a binary search from tile to request, and a
bitonic sort of the tiles by KV length, longest first. A padded batch is the
same plan over each sample's valid rows, plus one entry per sample for its rows
of padding, which the attention kernel fills with zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _plan_packed_kernel(
    Q_START, Q_STOP, POSITIONS, KV_LEN, CUM, SCRATCH, TILE_REQ, TILE_ROW0, TILE_ROW_END,
    num_req, num_tiles, seq_len,
    BLOCK_Q: tl.constexpr, BLOCK_B: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    TILES: tl.constexpr, CAUSAL: tl.constexpr, HAS_POSITIONS: tl.constexpr,
    PADDING_ENTRIES: tl.constexpr,
):
    # Request b owns rows [Q_START[b], Q_STOP[b]) (for packed rows, Q_STOP = QSL + 1).
    # 1. inclusive prefix sum of tiles per request, chunk by chunk, into CUM.
    carry = tl.full([], 0, tl.int32)
    for b0 in range(0, num_req, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        in_b = b < num_req
        q_len = tl.load(Q_STOP + b, mask=in_b, other=0) - tl.load(Q_START + b, mask=in_b, other=0)
        cum = tl.cumsum((q_len + BLOCK_Q - 1) // BLOCK_Q, axis=0) + carry
        tl.store(CUM + b, cum, mask=in_b)
        carry = tl.max(tl.where(in_b, cum, 0), axis=0)
    tl.debug_barrier()  # CUM is read back below by other threads of this program

    # 2. tile -> request by binary search (first b with CUM[b] > tile), then rows and work.
    tile = tl.arange(0, TILES)
    lo = tl.zeros([TILES], dtype=tl.int32)
    hi = tl.zeros([TILES], dtype=tl.int32) + num_req
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go_right = tl.load(CUM + mid, mask=mid < hi, other=0) <= tile
        lo = tl.where((mid < hi) & go_right, mid + 1, lo)
        hi = tl.where((mid < hi) & ~go_right, mid, hi)
    valid = (tile < carry) & (tile < num_tiles)
    req = tl.where(valid, lo, 0)
    first_tile = tl.load(CUM + req - 1, mask=valid & (req > 0), other=0)
    q_start = tl.load(Q_START + req, mask=valid, other=0)
    q_stop = tl.load(Q_STOP + req, mask=valid, other=0)
    row0 = q_start + (tile - first_tile) * BLOCK_Q
    row_end = tl.minimum(row0 + BLOCK_Q, q_stop)
    if CAUSAL:
        if HAS_POSITIONS:
            work = tl.load(POSITIONS + row_end - 1, mask=valid, other=0) + 1
        else:
            work = row_end - q_start
    else:
        work = tl.load(KV_LEN + req, mask=valid, other=0)
    work = tl.where(valid, work, -1)

    # 3. sort by work, descending; ties keep tile order (the low bits hold the index).
    # work + 1 >= 0 keeps the key non-negative, so % recovers the index.
    key = (work + 1).to(tl.int64) * 4194304 + (4194303 - tile)
    key = tl.sort(key, descending=True)
    src = 4194303 - (key % 4194304).to(tl.int32)
    tl.store(SCRATCH + tile, tl.where(valid, req, -1))
    tl.store(SCRATCH + TILES + tile, row0)
    tl.store(SCRATCH + 2 * TILES + tile, row_end)
    tl.debug_barrier()
    out = tile < num_tiles
    out_req = tl.load(SCRATCH + src)
    out_row0 = tl.load(SCRATCH + TILES + src)
    out_row_end = tl.load(SCRATCH + 2 * TILES + src)
    if PADDING_ENTRIES:
        # 4. padded batch: after the sorted tiles, slot carry + b holds sample b's
        # padding rows, [b*S, Q_START[b]) when padded on the left, else
        # [Q_STOP[b], (b+1)*S); a sample without padding leaves its slot empty.
        b = tile - carry
        is_pad = (b >= 0) & (b < num_req)
        b = tl.where(is_pad, b, 0)
        first = tl.load(Q_START + b, mask=is_pad, other=0)
        stop = tl.load(Q_STOP + b, mask=is_pad, other=0)
        sample0 = b * seq_len
        left = first > sample0
        pad0 = tl.where(left, sample0, stop)
        pad1 = tl.where(left, first, sample0 + seq_len)
        has_pad = pad1 > pad0
        out_req = tl.where(is_pad, tl.where(has_pad, b, -1), out_req)
        out_row0 = tl.where(is_pad & has_pad, pad0, out_row0)
        out_row_end = tl.where(is_pad & has_pad, pad1, out_row_end)
    tl.store(TILE_REQ + tile, out_req, mask=out)
    tl.store(TILE_ROW0 + tile, out_row0, mask=out)
    tl.store(TILE_ROW_END + tile, out_row_end, mask=out)


# A single program sorts at most this many tiles (a 4096-token-per-tile-row bound
# far above the benchmarks); larger plans take the torch path.
MAX_PLAN_TILES = 8192


def plan_packed_launch(
    q_start: torch.Tensor,
    q_stop: torch.Tensor,
    kv_len: torch.Tensor,
    positions: torch.Tensor | None,
    num_tiles: int,
    block_q: int,
    causal: bool,
    padded_seq_len: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted tile plan of packed rows (or of a padded batch's valid rows).

    Parameters
    ----------
    q_start, q_stop : [B] int32, request ``b`` owns rows ``[q_start[b], q_stop[b])``
        (packed rows: the two views ``query_start_loc[:-1]`` and ``[1:]``)
    kv_len : [B] int32
    positions : [T] int32 or None (rows at 0, 1, ... within a request)
    num_tiles : host bound on the number of tiles (the grid size), <= MAX_PLAN_TILES;
        with ``padded_seq_len``, room for ``B`` padding entries too
    block_q : query tokens per tile
    causal : sort by the last row's position + 1 instead of by kv_len
    padded_seq_len : S > 0: the rows are a padded batch ``[B, S]``; after the sorted
        tiles come one entry per sample with its padding rows (request -1 if none)

    Returns
    -------
    tile_req, tile_row0, tile_row_end : [num_tiles] int32, longest KV range first;
        unused slots have ``tile_req == -1``
    """
    device = kv_len.device
    num_req = kv_len.shape[0]
    tiles = triton.next_power_of_2(max(num_tiles, 16))
    cum = torch.empty(max(num_req, 1), dtype=torch.int32, device=device)
    scratch = torch.empty(3 * tiles, dtype=torch.int32, device=device)
    out = torch.empty(3, num_tiles, dtype=torch.int32, device=device)
    _plan_packed_kernel[(1,)](
        q_start, q_stop, positions if positions is not None else q_start, kv_len,
        cum, scratch, out[0], out[1], out[2], num_req, num_tiles, padded_seq_len,
        BLOCK_Q=block_q, BLOCK_B=min(triton.next_power_of_2(max(num_req, 1)), 1024),
        SEARCH_STEPS=max(num_req, 1).bit_length(), TILES=tiles, CAUSAL=causal,
        HAS_POSITIONS=positions is not None, PADDING_ENTRIES=padded_seq_len > 0, num_warps=4,
    )
    return out[0], out[1], out[2]
