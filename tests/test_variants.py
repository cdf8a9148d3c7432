"""Sliding windows, KV shards (kv_start/kv_end) and logit soft-capping: kernel vs reference."""

from __future__ import annotations

import random

import pytest
import torch

import spanfill as sf
from spanfill import reference as ref
from spanfill.testing import TOLERANCE, reference_span, rel_err
from tests.helpers import paged_setup, random_spans

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16


def _span_case(seed: int, page_size: int = 16):
    rng = random.Random(seed)
    seq_lens = [130, 77, 1]
    spans = [[(0, 3), (60, 90), (129, 130)], random_spans(rng, 77, 4, 10), [(0, 1)]]
    return paged_setup(seq_lens, spans, page_size, 4, 2, 64, DTYPE, DEVICE, seed=seed)


@pytest.mark.parametrize("window_left", [0, 5, 40, 200])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_span_sliding_window(window_left, causal):
    layout, kc, vc, q, kn, vn = _span_case(window_left)
    sf.append_kv(kn, vn, kc, vc, layout, backend="triton")
    o, lse = sf.span_prefill(q, kc, vc, layout, causal=causal, window_left=window_left,
                             return_lse=True, backend="triton")
    ro, rlse = reference_span(q, kc, vc, layout, causal, window_left=window_left)
    assert rel_err(o, ro) < TOLERANCE[DTYPE]
    assert torch.allclose(lse, rlse.float(), atol=2e-2)


@pytest.mark.parametrize("cap", [1.0, 30.0])
def test_span_soft_cap(cap):
    layout, kc, vc, q, kn, vn = _span_case(7)
    q = q * 4  # large scores, so the cap matters
    sf.append_kv(kn, vn, kc, vc, layout, backend="triton")
    o, lse = sf.span_prefill(q, kc, vc, layout, logits_soft_cap=cap, return_lse=True,
                             backend="triton")
    ro, rlse = reference_span(q, kc, vc, layout, True, logits_soft_cap=cap)
    assert rel_err(o, ro) < TOLERANCE[DTYPE]
    assert torch.allclose(lse, rlse.float(), atol=2e-2)
    plain = sf.span_prefill(q, kc, vc, layout, backend="triton")
    assert rel_err(plain, ro) > 4 * TOLERANCE[DTYPE], "the cap must change the result"


@pytest.mark.parametrize("page_size", [1, 16])
def test_kv_shards_merge_to_the_whole(page_size):
    """Two shards of every request's KV by position, each with only its own pages."""
    layout, kc, vc, q, kn, vn = _span_case(11, page_size)
    sf.append_kv(kn, vn, kc, vc, layout, backend="triton")
    full_o, full_lse = sf.span_prefill(q, kc, vc, layout, return_lse=True, backend="triton")
    cut = torch.tensor([64, 30, 1], dtype=torch.int32, device=DEVICE)
    parts = []
    for lo, hi in ((torch.zeros_like(cut), cut), (cut, layout.seq_lens)):
        table = layout.block_table.clone()
        col = torch.arange(table.shape[1], device=DEVICE)[None, :]
        outside = (col < (lo[:, None] // page_size)) | (col >= (hi[:, None] + page_size - 1) // page_size)
        table[outside] = -1  # the other shard's pages do not exist here
        shard = sf.SpanLayout.from_tensors(layout.positions, layout.query_start_loc,
                                           layout.seq_lens, table, page_size, kv_start=lo,
                                           kv_end=hi)
        o, lse = sf.span_prefill(q, kc, vc, shard, return_lse=True, backend="triton")
        ro, rlse = reference_span(q, kc, vc, shard, True)
        assert rel_err(o, ro) < TOLERANCE[DTYPE]
        assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
        parts.append((o.float(), lse))
    (o_a, l_a), (o_b, l_b) = parts
    lse = torch.logaddexp(l_a, l_b)
    w_a = torch.exp(l_a - lse).nan_to_num(0.0)[..., None]
    w_b = torch.exp(l_b - lse).nan_to_num(0.0)[..., None]
    assert rel_err(w_a * o_a + w_b * o_b, full_o) < TOLERANCE[DTYPE]
    assert torch.allclose(lse, full_lse, atol=2e-2)


def test_shard_slot_mapping_skips_positions_held_elsewhere():
    layout, *_ = _span_case(3)
    lo = torch.tensor([64, 0, 0], dtype=torch.int32, device=DEVICE)
    shard = sf.SpanLayout.from_tensors(layout.positions, layout.query_start_loc, layout.seq_lens,
                                       layout.block_table, 16, kv_start=lo, kv_end=layout.seq_lens)
    owned = shard.slot_mapping >= 0
    expect = torch.ones_like(owned)
    expect[: int(layout.query_start_loc[1])] = layout.positions[: int(layout.query_start_loc[1])] >= 64
    assert torch.equal(owned, expect)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_window_and_cap(padding_side):
    torch.manual_seed(5)
    q = torch.randn(3, 41, 4, 32, dtype=DTYPE, device=DEVICE) * 3
    k, v = torch.randn_like(q), torch.randn_like(q)
    valid = torch.tensor([41, 0, 17], device=DEVICE)
    for causal in (True, False):
        o, lse = sf.padded_prefill(q, k, v, valid, causal=causal, padding_side=padding_side,
                                   window_left=6, logits_soft_cap=5.0, return_lse=True,
                                   backend="triton")
        ro, rlse = ref.padded_prefill(q, k, v, valid, causal, padding_side, window_left=6,
                                      logits_soft_cap=5.0)
        assert rel_err(o, ro) < TOLERANCE[DTYPE]
        assert torch.equal(torch.isinf(lse), torch.isinf(rlse))


def test_varlen_window():
    torch.manual_seed(6)
    cu = torch.tensor([0, 50, 51, 120], device=DEVICE)
    q = torch.randn(120, 4, 32, dtype=DTYPE, device=DEVICE)
    k, v = torch.randn(120, 1, 32, dtype=DTYPE, device=DEVICE), torch.randn(120, 1, 32, dtype=DTYPE, device=DEVICE)
    o = sf.varlen_prefill(q, k, v, cu, window_left=9, backend="triton")
    ro, _ = ref.varlen_prefill(q, k, v, cu, True, window_left=9)
    assert rel_err(o, ro) < TOLERANCE[DTYPE]


def test_bad_variant_arguments():
    layout, kc, vc, q, *_ = _span_case(1)
    with pytest.raises(ValueError, match="window_left"):
        sf.span_prefill(q, kc, vc, layout, window_left=-2)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        sf.span_prefill(q, kc, vc, layout, logits_soft_cap=-1.0)
    with pytest.raises(ValueError, match=r"kv_start\[0\]"):
        sf.SpanLayout.from_tensors(layout.positions, layout.query_start_loc, layout.seq_lens,
                                   layout.block_table, 16,
                                   kv_start=torch.tensor([100, 0, 0], device=DEVICE),
                                   kv_end=torch.tensor([50, 77, 1], device=DEVICE))


def test_empty_shard_inside_a_page_needs_no_page():
    i = lambda *v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    table = torch.full((1, 2), -1, dtype=torch.int32, device=DEVICE)
    shard = sf.SpanLayout.from_tensors(i(), i(0, 0), i(20), table, 16, kv_start=i(3), kv_end=i(3))
    shard.check_pool(4)
    assert shard.num_tokens == 0


def test_bad_variant_arguments_padded_varlen_and_shard_shapes():
    q = torch.randn(2, 8, 2, 32, dtype=DTYPE, device=DEVICE)
    valid = torch.tensor([8, 3], device=DEVICE)
    with pytest.raises(ValueError, match="window_left"):
        sf.padded_prefill(q, q, q, valid, window_left=1.5)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        sf.varlen_prefill(q[0], q[0], q[0], torch.tensor([0, 8], device=DEVICE),
                          logits_soft_cap=float("inf"))
    layout, *_ = _span_case(2)
    with pytest.raises(ValueError, match="kv_end must be an int32/int64 tensor"):
        sf.SpanLayout.from_tensors(layout.positions, layout.query_start_loc, layout.seq_lens,
                                   layout.block_table, 16, kv_end=torch.tensor([1, 2], device=DEVICE))
