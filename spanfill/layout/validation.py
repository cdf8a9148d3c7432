"""Checks of layout metadata: Python spans on the host, tensors with one host sync.

Every check runs before anything is written, and each error names the argument
and the index at fault (docs/bad_inputs.md lists them).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

Spans = Sequence[Sequence[tuple[int, int]]]


def check_spans(
    spans: Spans, seq_lens: Sequence[int] | torch.Tensor, block_table: object,
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Check :meth:`SpanLayout.build`'s Python arguments; nothing touches a device.

    Returns
    -------
    lens : [B] the prompt lengths as ints
    starts, stops : every span's bounds, request by request
    counts : [B] the number of spans of each request

    Raises
    ------
    TypeError, ValueError
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
    return lens, starts, stops, counts


def pages_in_use(seq_lens: torch.Tensor, block_table: torch.Tensor, page_size: int,
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


def kv_bounds(kv_start: torch.Tensor | None, kv_end: torch.Tensor | None,
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


def check_meta_types(
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


def check_int32_range(**tensors: torch.Tensor) -> None:
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


def validate_meta(
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
        "table_neg": (pages_in_use(seq_lens, block_table, page_size, kv_start, kv_end)
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
    bad = pages_in_use(seq_lens, block_table, page_size, kv_start, kv_end) & (block_table < 0)
    b, j = (int(x) for x in torch.nonzero(bad)[0])
    raise ValueError(
        f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a page, but request {b} needs it "
        f"for seq_lens[{b}]={int(seq_lens[b])}"
    )


def check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> None:
    """Raise unless ``cu_seqlens`` runs from 0 to ``num_tokens`` without decreasing (one
    host sync for the verdict; details only on failure)."""
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must have at least one entry (0)")
    steps = cu_seqlens[1:] - cu_seqlens[:-1]
    flags = torch.stack([cu_seqlens[0] != 0, cu_seqlens[-1] != num_tokens,
                         (steps < 0).any() if steps.numel() else cu_seqlens[0] != cu_seqlens[0]])
    if not bool(flags.any()):
        return
    if bool(flags[0]) or bool(flags[1]):
        raise ValueError(
            f"cu_seqlens must start at 0 and end at T={num_tokens}, got "
            f"{int(cu_seqlens[0])}..{int(cu_seqlens[-1])}"
        )
    i = int(torch.nonzero(steps < 0)[0, 0])
    raise ValueError(f"cu_seqlens must be non-decreasing: cu_seqlens[{i + 1}] < cu_seqlens[{i}]")


def check_int_vector(name: str, t: object) -> torch.Tensor:
    """Raise unless ``t`` is a 1-D int32/int64 tensor (lengths, offsets)."""
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t
