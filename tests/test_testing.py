"""spanfill.testing: the one relative error, its non-finite rule, the tolerances,
the assertion messages and the reference wrapper."""

from __future__ import annotations

import math

import pytest
import torch

import spanfill as sf
from spanfill import reference
from spanfill.testing import (
    ELEMENTWISE_TOLERANCE, LSE_TOLERANCE, TOLERANCE, assert_close, assert_lse_close, reference_span,
    rel_err, tolerance,
)
from tests.helpers import paged_setup

NAN, INF = float("nan"), float("inf")


def test_rel_err_is_the_norm_ratio() -> None:
    ref = torch.tensor([3.0, 4.0])
    assert rel_err(ref + torch.tensor([0.0, 0.5]), ref) == pytest.approx(0.1)
    assert rel_err(ref.half(), ref.double()) == 0.0


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_non_finite_output_over_finite_reference_is_inf(bad: float) -> None:
    ref = torch.ones(4)
    out = ref.clone()
    out[2] = bad
    assert rel_err(out, ref) == math.inf


def test_nan_never_passes_even_where_the_reference_is_nan() -> None:
    both = torch.tensor([1.0, NAN])
    assert rel_err(both, both) == math.inf


def test_matching_infinities_count_as_equal() -> None:
    ref = torch.tensor([-INF, 2.0, -INF])
    assert rel_err(torch.tensor([-INF, 2.0, -INF]), ref) == 0.0
    assert rel_err(torch.tensor([-INF, 2.2, -INF]), ref) == pytest.approx(0.1)
    assert rel_err(torch.tensor([5.0, 2.0, -INF]), ref) == math.inf
    assert rel_err(torch.tensor([INF, 2.0, -INF]), ref) == math.inf


def test_zero_reference() -> None:
    zero = torch.zeros(3, 2)
    assert rel_err(zero, zero) == 0.0
    assert rel_err(torch.empty(0, 4), torch.empty(0, 4)) == 0.0
    assert rel_err(torch.tensor([3.0, 4.0]), torch.zeros(2)) == 5.0  # the absolute error


def test_shape_mismatch_is_inf() -> None:
    assert rel_err(torch.ones(2, 3), torch.ones(3)) == math.inf


def test_tolerances() -> None:
    assert tolerance(torch.float32) == TOLERANCE[torch.float32] == 1e-5
    assert tolerance(torch.float16) == 5e-3
    assert tolerance(torch.bfloat16) == 1e-2
    assert tolerance(torch.bfloat16, LSE_TOLERANCE) == 2e-2
    assert tolerance(torch.float16, ELEMENTWISE_TOLERANCE) == 1e-2
    with pytest.raises(KeyError, match="no tolerance for torch.float64"):
        tolerance(torch.float64)


def test_assert_close_passes_within_tolerance() -> None:
    ref = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert_close(ref.half(), ref)  # dtype from out: fp16, 5e-3
    assert_close(ref + 1e-7, ref, torch.float32, elementwise=True)


def test_assert_close_message() -> None:
    ref = torch.ones(100)
    with pytest.raises(AssertionError, match=r"span o: relative error 0\.01 > tolerance 0\.005 "
                                             r"\(torch\.float16\)"):
        assert_close(ref * 1.01, ref, torch.float16, "span o")
    out = ref.clone()
    out[7] = NAN
    with pytest.raises(AssertionError, match=r"nan at \[7\] where the reference has 1\.0"):
        assert_close(out, ref)
    with pytest.raises(AssertionError, match=r"shape \(100,\) != reference \(10, 10\)"):
        assert_close(ref, ref.view(10, 10))
    out = ref.clone()
    out[3] += 0.05  # relative error 5e-3, within fp16's bound; one element off by 0.05
    with pytest.raises(AssertionError, match=r"max abs error 0\.05 > tolerance 0\.01 .* at \[3\]"):
        assert_close(out, ref, torch.float16, elementwise=True)


def test_assert_lse_close() -> None:
    ref = torch.tensor([[-INF, 1.0], [2.0, 3.0]])
    assert_lse_close(ref + torch.tensor([[0.0, 1e-3], [0.0, 0.0]]), ref, torch.float16)
    with pytest.raises(AssertionError, match=r"lse: -inf rows differ at \[0, 0\]"):
        assert_lse_close(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), ref, torch.float32)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_lse_close(torch.tensor([[-INF, NAN], [2.0, 3.0]]), ref, torch.float32)
    with pytest.raises(AssertionError, match=r"max abs error 0\.01 > tolerance 0\.005"):
        assert_lse_close(ref + torch.tensor([[0.0, 1e-2], [0.0, 0.0]]), ref, torch.float16)
    with pytest.raises(AssertionError, match="not torch.float32"):
        assert_lse_close(ref.double(), ref, torch.float32)


def test_reference_span_unpacks_the_layout() -> None:
    layout, k_cache, v_cache, q, _, _ = paged_setup([9, 5], [[(0, 2), (6, 9)], [(4, 5)]], 4, 4, 2, 16,
                                                    torch.float32, "cpu", spare_pages=1)
    shard = sf.SpanLayout.from_tensors(layout.positions, layout.query_start_loc, layout.seq_lens,
                                       layout.block_table, 4, kv_start=torch.tensor([0, 2]),
                                       kv_end=torch.tensor([7, 5]))
    want = reference.span_prefill(q, k_cache, v_cache, shard.positions, shard.query_start_loc,
                                  shard.seq_lens, shard.block_table, False, 0.3,
                                  kv_start=shard.kv_start, kv_end=shard.kv_end, window_left=3)
    got = reference_span(q, k_cache, v_cache, shard, False, 0.3, window_left=3)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    unsharded = reference_span(q, k_cache, v_cache, layout, False, 0.3, window_left=3)
    assert not torch.equal(unsharded[0], got[0]), "the shard bounds were not passed on"
