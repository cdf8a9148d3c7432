"""Check a provider's output against :mod:`spanfill.reference` on a subset of rows.

The reference keeps a dense fp32 score matrix per request, so on the big
workloads it is computed only for a seeded random subset of rows of each request
(at most ``2**27`` scores per request), on the same device as the inputs.

Every output is compared in a *canonical* row order:

* segmented: ``[T, Hq, D]``, the span tokens request by request (= q's rows);
* padded: ``[sum(valid_lens), H, D]``, the valid rows sample by sample.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from spanfill import reference
from spanfill.testing import rel_err

from .workloads import PaddedTensors, PaddedWorkload, SegmentedTensors, SegmentedWorkload

__all__ = ["Checker", "segmented_checker", "padded_checker", "packed_valid_index", "row_subset",
           "tolerance"]

_MAX_SCORES = 2**27


def tolerance(dtype: torch.dtype) -> float:
    """Largest accepted ``||out - ref|| / ||ref||``."""
    return {torch.bfloat16: 2e-2, torch.float16: 1e-2}.get(dtype, 1e-4)


class Checker:
    """Reference rows of one workload.

    Parameters
    ----------
    rows : [R] int64, indices into the canonical rows
    expected : [R, Hq, D] fp32, the reference output at those rows
    """

    def __init__(self, rows: torch.Tensor, expected: torch.Tensor) -> None:
        self.rows = rows
        self.expected = expected

    def __call__(self, out: torch.Tensor) -> float:
        """Relative error of ``out`` (canonical rows) at the checked rows."""
        return rel_err(out[self.rows.to(out.device)], self.expected)


def row_subset(rng: np.random.Generator, n: int, heads: int, kv_len: int) -> np.ndarray:
    limit = max(16, min(512, _MAX_SCORES // max(heads * kv_len, 1)))
    if n <= limit:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def segmented_checker(w: SegmentedWorkload, t: SegmentedTensors, seed: int = 0,
                      caches: tuple[torch.Tensor, torch.Tensor] | None = None) -> Checker:
    """Reference at a random subset of span rows of every request (under the
    workload's sliding window, if it has one).

    Parameters
    ----------
    caches : K and V caches [num_pages, page_size, Hk, D] to attend over instead of
        ``t``'s (e.g. an fp8 cache, dequantized: fp32), paged as ``t.block_table``
        says; the rows are the same as without them (same ``seed``)
    """
    rng = np.random.default_rng(seed)
    qsl = t.layout.query_start_loc.tolist()
    positions = t.layout.positions
    scale = 1.0 / math.sqrt(w.head_dim)
    rows, outs = [], []
    for b in range(len(w.seq_lens)):
        n = qsl[b + 1] - qsl[b]
        if n == 0:
            continue
        local = torch.from_numpy(row_subset(rng, n, w.num_q_heads, w.seq_lens[b])).to(t.q.device)
        idx = local + qsl[b]
        if caches is None:
            k, v = t.dense_kv(b)
        else:
            k, v = (reference.gather_kv(c, t.block_table, w.seq_lens[b], b) for c in caches)
        o, _ = reference.attend(t.q[idx], k, v, positions[idx], True, scale,
                                window_left=getattr(w, "window_left", -1))
        rows.append(idx)
        outs.append(o)
    return Checker(torch.cat(rows), torch.cat(outs))


def dense_causal_check(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       seed: int) -> float:
    """Relative error of a dense causal ceiling's output on sampled rows.

    Parameters
    ----------
    out, q, k, v : [n, H, D], the ceiling's output and inputs (one prompt, MHA)
    seed : picks the sampled rows (:func:`row_subset`)
    """
    n, heads, d = q.shape
    rows = torch.from_numpy(row_subset(np.random.default_rng(seed), n, heads, n)).to(q.device)
    ref, _ = reference.attend(q[rows], k, v, rows, True, 1.0 / math.sqrt(d))
    return rel_err(out[rows], ref)


def packed_valid_index(valid_lens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[sum(valid_lens)] int64: the flat ``b*S + i`` of every valid row, sample by sample."""
    lens = valid_lens.long()
    starts = torch.arange(lens.shape[0], device=lens.device) * seq_len
    offsets = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens)
    return offsets + torch.arange(int(lens.sum()), device=lens.device)


def padded_checker(w: PaddedWorkload, t: PaddedTensors, seed: int = 0,
                   max_samples: int = 4) -> Checker:
    """Reference at a random subset of the valid rows of up to ``max_samples`` samples."""
    rng = np.random.default_rng(seed)
    lens = list(w.valid_lens)
    cu = np.concatenate([[0], np.cumsum(lens)])
    samples = np.sort(rng.choice(len(lens), size=min(max_samples, len(lens)), replace=False))
    scale = 1.0 / math.sqrt(w.head_dim)
    rows, outs = [], []
    for b in samples.tolist():
        n = lens[b]
        if n == 0:
            continue
        local = torch.from_numpy(row_subset(rng, n, w.num_heads, n)).to(t.q.device)
        o, _ = reference.attend(t.q[b, local], t.k[b, :n], t.v[b, :n], local, w.causal, scale)
        rows.append(local + int(cu[b]))
        outs.append(o)
    return Checker(torch.cat(rows), torch.cat(outs))
