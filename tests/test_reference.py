"""The reference against an independent naive computation: one dense mask in fp64.

The naive version builds a [T, N] visibility matrix over ALL keys of ALL requests
(block-diagonal by request), so it shares no indexing code with the reference.
"""

from __future__ import annotations

import random

import pytest
import torch

from spanfill import reference as ref
from tests.helpers import paged_setup, random_spans


def naive(q, keys, values, q_req, q_pos, k_req, k_pos, causal, scale):
    """q [T, Hq, D]; keys/values [N, Hk, D]; request and position of every row and key."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1)
    v = values.double().repeat_interleave(group, 1)
    scores = torch.einsum("thd,nhd->htn", q.double(), k) * scale
    visible = q_req[:, None] == k_req[None, :]
    if causal:
        visible &= k_pos[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float64)
    seen = visible.any(1)
    w = torch.softmax(scores[:, seen], -1)
    out[seen] = torch.einsum("htn,nhd->thd", w, v)
    lse[seen] = torch.logsumexp(scores[:, seen], -1).transpose(0, 1)
    return out, lse


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_span_reference_vs_naive(seed, causal):
    rng = random.Random(seed)
    seq_lens = [rng.randint(1, 60) for _ in range(3)]
    spans = [random_spans(rng, n, 4, 9) for n in seq_lens]
    layout, k_cache, v_cache, q, _, _ = paged_setup(seq_lens, spans, rng.choice([1, 4, 16]), 4, 2,
                                                    16, torch.float64, "cpu", seed=seed)
    o, lse = ref.span_prefill(q, k_cache, v_cache, layout.positions, layout.query_start_loc,
                              layout.seq_lens, layout.block_table, causal, 0.3, torch.float64)
    keys = torch.cat([ref.gather_kv(k_cache, layout.block_table, n, b) for b, n in enumerate(seq_lens)])
    vals = torch.cat([ref.gather_kv(v_cache, layout.block_table, n, b) for b, n in enumerate(seq_lens)])
    k_req = torch.cat([torch.full((n,), b) for b, n in enumerate(seq_lens)])
    k_pos = torch.cat([torch.arange(n) for n in seq_lens])
    counts = (layout.query_start_loc[1:] - layout.query_start_loc[:-1]).long()
    q_req = torch.repeat_interleave(torch.arange(3), counts)
    no, nlse = naive(q, keys, vals, q_req, layout.positions.long(), k_req, k_pos, causal, 0.3)
    assert torch.allclose(o, no, atol=1e-10)
    assert torch.allclose(lse, nlse, atol=1e-10)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_padded_reference_vs_naive(padding_side, causal):
    torch.manual_seed(1)
    b, s, hq, hk, d = 4, 13, 4, 1, 8
    q, k, v = torch.randn(b, s, hq, d), torch.randn(b, s, hk, d), torch.randn(b, s, hk, d)
    valid = torch.tensor([0, 13, 5, 1])
    o, lse = ref.padded_prefill(q, k, v, valid, causal, padding_side, compute_dtype=torch.float64)
    row = torch.arange(s)
    pad = (s - valid) if padding_side == "left" else torch.zeros_like(valid)
    is_valid = (row[None] >= pad[:, None]) & (row[None] < pad[:, None] + valid[:, None])  # [B, S]
    req = torch.arange(b)[:, None].expand(b, s)
    pos = row[None] - pad[:, None]
    # Padded keys get a request id of -1 so that no query sees them.
    k_req = torch.where(is_valid, req, torch.full_like(req, -1)).reshape(-1)
    no, nlse = naive(q.reshape(b * s, hq, d), k.reshape(b * s, hk, d), v.reshape(b * s, hk, d),
                     req.reshape(-1), pos.reshape(-1), k_req, pos.reshape(-1), causal, d ** -0.5)
    no = no.where(is_valid.reshape(-1)[:, None, None], torch.zeros(()))
    nlse = nlse.where(is_valid.reshape(-1)[:, None], torch.tensor(float("-inf"), dtype=torch.float64))
    assert torch.allclose(o.reshape(b * s, hq, d), no, atol=1e-10)
    assert torch.equal(torch.isinf(lse.reshape(b * s, hq)), torch.isinf(nlse))
    assert (o[~is_valid] == 0).all()


def test_varlen_reference_vs_naive():
    torch.manual_seed(2)
    cu = torch.tensor([0, 4, 4, 15])
    q, k, v = torch.randn(15, 2, 8), torch.randn(15, 2, 8), torch.randn(15, 2, 8)
    o, lse = ref.varlen_prefill(q, k, v, cu, True, compute_dtype=torch.float64)
    req = torch.repeat_interleave(torch.arange(3), cu[1:] - cu[:-1])
    pos = torch.arange(15) - cu[:-1][req]
    no, nlse = naive(q, k, v, req, pos, req, pos, True, 8 ** -0.5)
    assert torch.allclose(o, no, atol=1e-10) and torch.allclose(lse, nlse, atol=1e-10)


def test_rows_that_see_nothing_are_zero_not_nan():
    q = torch.randn(1, 3, 2, 8)
    o, lse = ref.padded_prefill(q, q, q, torch.tensor([0]))
    assert (o == 0).all() and torch.isinf(lse).all() and not torch.isnan(o).any()


def test_append_kv_reference_skips_minus_one():
    cache = torch.zeros(2, 4, 1, 8)
    new = torch.ones(3, 1, 8)
    ref.append_kv(new, new, cache, cache.clone(), torch.tensor([5, -1, 0]))
    assert cache[1, 1].eq(1).all() and cache[0, 0].eq(1).all() and cache.sum() == 16
