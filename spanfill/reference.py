"""The semantics of every spanfill op in plain PyTorch: the single source of truth.

Every kernel, test, fuzz run and benchmark is checked against these functions.
They are written for clarity, not speed: one dense score matrix per request,
computed in fp32 (or fp64 with ``compute_dtype=torch.float64``).

The rule shared by all of them (DESIGN.md): a query row of request ``b`` at
position ``pos`` sees the KV positions

* causal:        ``[0, pos]``
* bidirectional: ``[0, kv_len[b])``

and a row that sees no key at all gives ``o = 0`` and ``lse = -inf``.
``lse`` is the natural log of the softmax denominator of the scaled scores.

fp8 KV (``float8_e4m3fn``, ``float8_e5m2``) carries a float scale per tensor or per
KV head, as in vLLM and FlashInfer: a stored value ``s`` means ``s * scale``
(:func:`dequantize_kv`, then fp32 math), and a new value ``x`` is stored as
``x / scale`` rounded to the format, saturated at its largest finite value
(:func:`quantize_kv`).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "FP8_DTYPES",
    "attend",
    "dequantize_kv",
    "quantize_kv",
    "padded_prefill",
    "varlen_prefill",
    "span_prefill",
    "append_kv",
    "gather_kv",
]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    causal: bool,
    sm_scale: float,
    compute_dtype: torch.dtype = torch.float32,
    kv_start: int = 0,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one request's query rows over its ``kv_len`` keys.

    Parameters
    ----------
    q : [Tq, Hq, D] any float dtype
    k, v : [kv_len, Hk, D] any float dtype; ``Hq % Hk == 0``
    q_positions : [Tq] int, the position of each query row
    causal : row at ``pos`` sees keys ``[0, pos]`` if True, all ``kv_len`` keys if False
    sm_scale : scale applied to ``q @ k^T``
    compute_dtype : fp32 or fp64
    kv_start : keys below this position are not seen (a KV shard or window)
    window_left : if >= 0, a row at ``pos`` sees no key below ``pos - window_left``
    logits_soft_cap : if > 0, scores become ``cap * tanh(score / cap)`` before softmax

    Returns
    -------
    o : [Tq, Hq, D] compute_dtype
    lse : [Tq, Hq] compute_dtype, natural log, -inf for rows that see no key
    """
    tq, hq, d = q.shape
    kv_len, hk = k.shape[0], k.shape[1]
    group = hq // hk
    qf = q.to(compute_dtype)
    kf = k.to(compute_dtype).repeat_interleave(group, dim=1)
    vf = v.to(compute_dtype).repeat_interleave(group, dim=1)
    key_pos = torch.arange(kv_len, device=q.device)
    pos = q_positions.to(q.device).long()[:, None]
    visible = (key_pos[None, :] >= kv_start).expand(tq, kv_len)
    if causal:
        visible = visible & (key_pos[None, :] <= pos)
    if window_left >= 0:
        visible = visible & (key_pos[None, :] >= pos - window_left)
    # Keys nobody sees may hold anything (another shard's pages, NaN): zero them so
    # 0 * NaN cannot leak through the weighted sum.
    seen_key = visible.any(0)[:, None, None]
    kf = torch.where(seen_key, kf, torch.zeros((), dtype=compute_dtype, device=q.device))
    vf = torch.where(seen_key, vf, torch.zeros((), dtype=compute_dtype, device=q.device))
    scores = torch.einsum("thd,shd->hts", qf, kf) * sm_scale  # [Hq, Tq, kv_len]
    if logits_soft_cap > 0:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    scores = scores.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Tq]
    # exp(-inf - -inf) would be NaN: rows that see nothing get weight 0 instead.
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse[..., None])
    o = torch.einsum("hts,shd->thd", probs, vf)
    return o, lse.transpose(0, 1).contiguous()


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _kv_scale(scale: float | torch.Tensor, num_heads: int, device: torch.device) -> torch.Tensor:
    """A scale broadcastable over ``[..., Hk, D]``: a scalar, or ``[Hk, 1]`` per KV head."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=device)
    if s.numel() == num_heads and s.dim() == 1 and num_heads > 1:
        return s[:, None]
    return s.reshape(())


def quantize_kv(x: torch.Tensor, scale: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` in an fp8 ``dtype``, saturated at the format's largest finite value.

    Parameters
    ----------
    x : [..., Hk, D] float
    scale : a float, or a [] / [1] / [Hk] fp32 tensor
    dtype : torch.float8_e4m3fn | torch.float8_e5m2
    """
    limit = torch.finfo(dtype).max
    scaled = x.float() / _kv_scale(scale, x.shape[-2], x.device)
    return scaled.clamp(-limit, limit).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """fp8 ``x`` ([..., Hk, D]) times its scale, in fp32."""
    return x.float() * _kv_scale(scale, x.shape[-2], x.device)


def _default_scale(d: int, sm_scale: float | None) -> float:
    return 1.0 / math.sqrt(d) if sm_scale is None else sm_scale


def padded_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid_lens: torch.Tensor,
    causal: bool = False,
    padding_side: str = "right",
    sm_scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a padded batch where sample ``b`` has ``valid_lens[b]`` real tokens.

    Parameters
    ----------
    q : [B, S, Hq, D]
    k, v : [B, S, Hk, D]; fp8 with ``k_scale``/``v_scale`` (see the module docstring)
    valid_lens : [B] int, ``0 <= valid_lens[b] <= S``
    causal : causal within each sample's valid tokens
    padding_side : "right" (valid tokens first) or "left" (valid tokens last)

    Returns
    -------
    o : [B, S, Hq, D] compute_dtype, exactly 0 on padded rows
    lse : [B, S, Hq] compute_dtype, -inf on padded rows
    """
    b_sz, s, hq, d = q.shape
    scale = _default_scale(d, sm_scale)
    if k_scale is not None:
        k, v = dequantize_kv(k, k_scale), dequantize_kv(v, v_scale)
    o = torch.zeros(b_sz, s, hq, d, dtype=compute_dtype, device=q.device)
    lse = torch.full((b_sz, s, hq), float("-inf"), dtype=compute_dtype, device=q.device)
    for b in range(b_sz):
        n = int(valid_lens[b])
        if n == 0:
            continue
        rows = slice(0, n) if padding_side == "right" else slice(s - n, s)
        pos = torch.arange(n, device=q.device)
        o[b, rows], lse[b, rows] = attend(
            q[b, rows], k[b, rows], v[b, rows], pos, causal, scale, compute_dtype,
            window_left=window_left, logits_soft_cap=logits_soft_cap,
        )
    return o, lse


def varlen_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention over sequences packed back to back.

    Parameters
    ----------
    q : [T, Hq, D]
    k, v : [T, Hk, D]; fp8 with ``k_scale``/``v_scale``
    cu_seqlens : [B+1] int, sequence ``b`` is rows ``[cu_seqlens[b], cu_seqlens[b+1])``

    Returns
    -------
    o : [T, Hq, D] compute_dtype
    lse : [T, Hq] compute_dtype
    """
    t, hq, d = q.shape
    scale = _default_scale(d, sm_scale)
    if k_scale is not None:
        k, v = dequantize_kv(k, k_scale), dequantize_kv(v, v_scale)
    o = torch.zeros(t, hq, d, dtype=compute_dtype, device=q.device)
    lse = torch.full((t, hq), float("-inf"), dtype=compute_dtype, device=q.device)
    bounds = [int(x) for x in cu_seqlens]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop == start:
            continue
        pos = torch.arange(stop - start, device=q.device)
        o[start:stop], lse[start:stop] = attend(
            q[start:stop], k[start:stop], v[start:stop], pos, causal, scale, compute_dtype,
            window_left=window_left, logits_soft_cap=logits_soft_cap,
        )
    return o, lse


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, request: int
) -> torch.Tensor:
    """The first ``seq_len`` positions of one request's KV, gathered from pages.

    Positions whose block-table entry is negative (pages another shard holds) come
    back as zeros.

    Parameters
    ----------
    cache : [num_pages, page_size, Hk, D]
    block_table : [B, max_pages] int

    Returns
    -------
    [seq_len, Hk, D] cache.dtype
    """
    page_size = cache.shape[1]
    pos = torch.arange(seq_len, device=cache.device)
    pages = block_table[request].to(cache.device).long()[pos // page_size]
    rows = cache[pages.clamp(min=0), pos % page_size]
    return torch.where((pages >= 0)[:, None, None], rows, torch.zeros((), dtype=cache.dtype,
                                                                         device=cache.device))


def span_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the span (hole) tokens over each request's paged KV.

    The cache must already hold the span tokens' own K/V (see :func:`append_kv`).

    Parameters
    ----------
    q : [T, Hq, D], the span tokens of all requests, request by request
    k_cache, v_cache : [num_pages, page_size, Hk, D]
    positions : [T] int, the original position of each span token
    query_start_loc : [B+1] int, request ``b`` owns rows ``[qsl[b], qsl[b+1])``
    seq_lens : [B] int, KV positions ``[0, seq_lens[b])`` are valid
    block_table : [B, max_pages] int
    causal : row at ``pos`` sees ``[0, pos]`` if True, ``[0, seq_len)`` if False
    kv_start, kv_end : [B] int or None: only KV positions ``[kv_start[b], kv_end[b])``
        are held here (a shard of the cache by position); default ``[0, seq_len)``
    window_left : if >= 0, a row at ``pos`` sees no key below ``pos - window_left``
    logits_soft_cap : if > 0, scores become ``cap * tanh(score / cap)``
    k_scale, v_scale : for fp8 caches, the scales they are stored with (module docstring)

    Returns
    -------
    o : [T, Hq, D] compute_dtype
    lse : [T, Hq] compute_dtype
    """
    t, hq, d = q.shape
    scale = _default_scale(d, sm_scale)
    if k_scale is not None:
        k_cache, v_cache = dequantize_kv(k_cache, k_scale), dequantize_kv(v_cache, v_scale)
    o = torch.zeros(t, hq, d, dtype=compute_dtype, device=q.device)
    lse = torch.full((t, hq), float("-inf"), dtype=compute_dtype, device=q.device)
    bounds = [int(x) for x in query_start_loc]
    for b, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        if stop == start:
            continue
        seq_len = int(seq_lens[b]) if kv_end is None else min(int(kv_end[b]), int(seq_lens[b]))
        k = gather_kv(k_cache, block_table, seq_len, b)
        v = gather_kv(v_cache, block_table, seq_len, b)
        o[start:stop], lse[start:stop] = attend(
            q[start:stop], k, v, positions[start:stop], causal, scale, compute_dtype,
            kv_start=0 if kv_start is None else int(kv_start[b]), window_left=window_left,
            logits_soft_cap=logits_soft_cap,
        )
    return o, lse


def append_kv(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> None:
    """Write each new token's K/V into its cache slot, in place; slot -1 is skipped.

    Parameters
    ----------
    k_new, v_new : [T, Hk, D]
    k_cache, v_cache : [num_pages, page_size, Hk, D]; fp8 caches store
        :func:`quantize_kv` of the new values with ``k_scale``/``v_scale``
    slot_mapping : [T] int, ``slot = page * page_size + offset``, or -1
    """
    page_size = k_cache.shape[1]
    slots = slot_mapping.to(k_cache.device).long()
    keep = slots >= 0
    pages, offsets = slots[keep] // page_size, slots[keep] % page_size
    for cache, new, scale in ((k_cache, k_new, k_scale), (v_cache, v_new, v_scale)):
        if cache.dtype in FP8_DTYPES:
            cache[pages, offsets] = quantize_kv(new[keep], 1.0 if scale is None else scale,
                                                cache.dtype)
        else:
            cache[pages, offsets] = new[keep].to(cache.dtype)


def merge_states(
    o: torch.Tensor, lse: torch.Tensor, compute_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``N`` partial attention states of each row into one, exactly.

    State ``i`` of a row is attention over a KV subset ``S_i`` (the subsets
    disjoint); the merge is attention over their union:
    ``lse = logsumexp_i lse_i`` and ``o = sum_i exp(lse_i - lse) o_i``. States with
    ``lse_i = -inf`` (no key seen) are ignored, ``o_i`` included; a row where all are
    ``-inf`` gives ``o = 0`` and ``lse = -inf``.

    Parameters
    ----------
    o : [T, N, H, D] any float dtype
    lse : [T, N, H] any float dtype, natural log

    Returns
    -------
    o : [T, H, D] compute_dtype
    lse : [T, H] compute_dtype
    """
    of, lf = o.to(compute_dtype), lse.to(compute_dtype)
    merged = torch.logsumexp(lf, dim=1)  # [T, H]
    safe = torch.where(torch.isinf(merged) & (merged < 0), torch.zeros_like(merged), merged)
    weight = torch.exp(lf - safe[:, None])  # [T, N, H]; 0 where lse_i = -inf
    # `== 0` keeps NaN weights (NaN inputs) in, so NaN propagates instead of vanishing.
    zero = torch.zeros((), dtype=compute_dtype, device=o.device)
    terms = torch.where((weight == 0)[..., None], zero, weight[..., None] * of)
    return terms.sum(dim=1), merged
