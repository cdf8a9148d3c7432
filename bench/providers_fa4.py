"""FlashAttention-4 peers (``flash_attn.cute``, CuTe DSL; imported only when
``import flash_attn.cute`` works).

Both call ``flash_attn.cute.flash_attn_varlen_func``. Its arguments are passed by
keyword: newer FA4 versions insert ``qv`` as the fourth positional argument. It
returns ``(out, lse)`` (``lse`` is None unless ``return_lse``); :func:`_out` also
accepts a bare tensor, in case a version returns only ``out``.

* ``span_entries``: like FlashInfer's ``span_entries``, every span is its own batch
  entry: its q rows (packed, ``cu_seqlens_q`` over spans), the request's pages of
  spanfill's own cache ``[num_pages, page_size, Hk, D]`` (NHD) through
  ``page_table`` (the request's block-table row, once per span) and
  ``seqused_k`` = the span's stop. FA4's causal mask is bottom-right aligned (row
  ``i`` of an entry with ``n`` rows and ``seqused_k`` keys sees ``j <= i +
  seqused_k - n``), so a span row at position ``p`` sees ``[0, p]``. FA4's paged
  path takes ``page_table`` + ``seqused_k``; ``cu_seqlens_k`` must be None with it.
  A sliding window is ``window_size=(window_left, 0)``, relative to that same
  diagonal (= the row's position, each entry's KV starting at position 0).
* ``dense``: the dense causal ceiling in FA4 (like ``sdpa_cudnn_dense``): contiguous
  ``[1, n, Hq, D]`` q, k and v of the prompt length ``n``, ``causal=True``; issue 16
  measures a whole-prompt span against its rate.
* ``padded``: the ``[B, S, H, D]`` batch as it is, ``seqused_q = seqused_k =
  valid_lens`` (right padding, the only padding the workloads have). The rows past
  ``valid_lens`` are left unwritten (``torch.empty``); the check compares only the
  valid rows (``bench.check``), so nothing is zeroed and the timed call is FA4's
  call alone.

FA4 has no separate planning step here (its optional ``scheduler_metadata`` is not
used): ``plan`` is None, and the CuTe DSL compile of the first call is in the
first-call time of the note. Per-layout metadata (``cu_seqlens_q``, the page table,
``seqused_k``) is built once, untimed, as for FlashInfer.
"""

from __future__ import annotations

import numpy as np
import torch

from .check import dense_causal_check
from .providers_base import Prepared, dense_ceiling_inputs, window_of
from .workloads import PaddedTensors, PaddedWorkload, SegmentedTensors, SegmentedWorkload

__all__ = ["available", "span_entries", "dense", "padded"]


def available() -> tuple[bool, str]:
    """Whether ``import flash_attn.cute`` works, and a one-line reason/version."""
    try:
        import flash_attn.cute as fa4
    except Exception as exc:  # any import failure means: skip these providers
        return False, f"{type(exc).__name__}: {exc}"
    return True, f"flash_attn.cute {getattr(fa4, '__version__', '?')}"


def _i32(values: list[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int32), device=device)


def _out(result: object) -> torch.Tensor:
    """``out`` of FA4's ``(out, lse)`` (or of a bare ``out``)."""
    return result[0] if isinstance(result, (tuple, list)) else result


def _first_call(run, what: str) -> None:  # noqa: ANN001 - a zero-argument callable
    """Run once at prepare time so that FA4 refusing the shape (its argument checks
    are asserts) becomes an error row that says which shape, not a bare assert."""
    try:
        run()
    except (AssertionError, NotImplementedError, ValueError) as exc:
        raise RuntimeError(f"FA4 refused {what}: {type(exc).__name__}: {exc}") from exc


def span_entries(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
    """One FA4 batch entry per span over the request's pages, KV = ``[0, stop)``, causal.

    Parameters
    ----------
    w : the workload (spans, heads, ``page_size``, ``window_left``)
    t : its tensors: ``q`` [T, Hq, D] (span rows request by request), ``k_cache`` and
        ``v_cache`` [num_pages, page_size, Hk, D] (bf16/fp16), ``block_table``
        [B, max_pages] int32

    Returns
    -------
    Prepared whose ``run`` returns ``out`` [T, Hq, D] in q's row order (the
    canonical segmented rows).
    """
    from flash_attn.cute import flash_attn_varlen_func

    lens, stops, requests = [], [], []
    for b, spans in enumerate(w.spans):
        for start, stop in spans:
            lens.append(stop - start)
            stops.append(stop)
            requests.append(b)
    device = t.q.device
    cu_seqlens_q = _i32(np.concatenate([[0], np.cumsum(lens)]), device)
    seqused_k = _i32(stops, device)
    # One block-table row per entry: the request's pages, FA4 reads only the first
    # ceil(seqused_k / page_size) of them.
    page_table = t.block_table.to(torch.int32)[_i32(requests, device).long()].contiguous()
    window = window_of(w)
    extra = {"window_size": (window, 0)} if window >= 0 else {}
    # max_seqlen_q sizes FA4's grid (default: all of q); max_seqlen_k, the split
    # heuristic (default: the whole pool, num_pages * page_size).
    max_q, max_k = int(max(lens)), int(max(stops))

    def run() -> torch.Tensor:
        return _out(flash_attn_varlen_func(
            t.q, t.k_cache, t.v_cache, cu_seqlens_q=cu_seqlens_q, seqused_k=seqused_k,
            page_table=page_table, max_seqlen_q=max_q, max_seqlen_k=max_k, causal=True,
            softmax_scale=w.head_dim ** -0.5, **extra))

    _first_call(run, f"page_size={w.page_size} D={w.head_dim} Hq={w.num_q_heads} "
                     f"Hk={w.num_kv_heads} window_left={window}")
    note = (f"{len(lens)} batch entries, paged KV (page_table + seqused_k, "
            f"page_size={w.page_size}); no plan step")
    if window >= 0:
        note += f"; window_size=({window}, 0)"
    return Prepared(run, run, note=note)


def dense(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
    """FA4's dense causal attention over the longest prompt: a ceiling, not a peer.

    Parameters
    ----------
    w : the workload (``seq_lens``, heads, ``head_dim``, ``seed``)
    t : its tensors (only ``q``'s device and dtype are used)

    Returns
    -------
    Prepared with the ceiling's FLOPs (causal half of ``4 * Hq * D * n^2``) and its own
    check (sampled rows against :func:`spanfill.reference.attend`).
    """
    from flash_attn.cute import flash_attn_func

    q, k, v, flops = dense_ceiling_inputs(w, t)
    n, hq, d = q.shape

    def run() -> torch.Tensor:
        return _out(flash_attn_func(q[None], k[None], v[None], causal=True,
                                    softmax_scale=d ** -0.5))

    def own_check() -> float:
        return dense_causal_check(run()[0], q, k, v, w.seed)

    _first_call(run, f"dense causal 1x{n}x{hq}x{d}")
    return Prepared(run, None, None, flops, own_check,
                    note=f"ceiling: dense causal FA4 1x{n}x{hq}x{d} (flash_attn_func)")


def padded(w: PaddedWorkload, t: PaddedTensors) -> Prepared:
    """FA4 on the right-padded batch, ``seqused_q = seqused_k = valid_lens``.

    Parameters
    ----------
    w : the workload (``causal``, ``seq_len``)
    t : its tensors: ``q``, ``k``, ``v`` [B, S, H, D] (bf16/fp16), ``valid_lens`` [B]
        int32

    Returns
    -------
    Prepared whose ``run`` returns ``out`` [B, S, H, D] (rows past ``valid_lens``
    unwritten) and whose ``output`` returns the valid rows [sum(valid_lens), H, D].
    """
    from flash_attn.cute import flash_attn_varlen_func

    from .check import packed_valid_index

    idx = packed_valid_index(t.valid_lens, w.seq_len)
    valid = t.valid_lens.to(torch.int32).contiguous()

    def run() -> torch.Tensor:
        return _out(flash_attn_varlen_func(
            t.q, t.k, t.v, seqused_q=valid, seqused_k=valid, causal=w.causal,
            softmax_scale=w.head_dim ** -0.5))

    def output() -> torch.Tensor:
        o = run()
        return o.reshape(-1, o.shape[2], o.shape[3])[idx]

    _first_call(run, f"padded B={len(w.valid_lens)} S={w.seq_len} H={w.num_heads} "
                     f"D={w.head_dim} causal={w.causal}")
    return Prepared(run, output, note="seqused_q = seqused_k = valid_lens; padded rows "
                                      "unwritten and unchecked (no zeroing)")
