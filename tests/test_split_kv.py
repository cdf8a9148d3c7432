"""Split-KV span prefill: each tile's KV range shared by several programs, then merged.

The split count is forced with ``SPANFILL_SPLITS`` (the interpreter never splits on
its own); every case is checked against the reference with NaN-poisoned outputs,
and against the unsplit kernel. Odd split counts leave some splits with no KV
steps at all (short tiles), whose empty partial states must merge away.
"""

from __future__ import annotations

import random

import pytest
import torch

import spanfill as sf
from spanfill.backends import get_backend, paged_problem
from spanfill import reference as ref
from spanfill.backends.triton_config import (
    MAX_SPLITS,
    SPLIT_MIN_STEPS,
    AttentionConfig,
    launch_config,
    pick_num_splits,
)
from spanfill.testing import TOLERANCE, reference_span, rel_err
from tests.fuzzing import poisoned_allocations
from tests.helpers import paged_setup, random_spans

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16


def _case(seed: int, page_size: int):
    rng = random.Random(seed)
    seq_lens = [203, 1, 64, 150]
    spans = [
        [(0, 1), (100, 104), (202, 203)],  # a row seeing one key, a long range, the last one
        [(0, 1)],
        [],                                # no span tokens
        random_spans(rng, 150, 5, 9),
    ]
    return paged_setup(seq_lens, spans, page_size, 4, 2, 32, DTYPE, DEVICE, seed=seed)


def _check(o, lse, ro, rlse):
    assert not torch.isnan(o).any(), "a row the merge never wrote"
    assert rel_err(o, ro) < TOLERANCE[DTYPE]
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    finite = torch.isfinite(rlse)
    assert torch.allclose(lse[finite], rlse[finite].float(), atol=2e-2)


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_split_matches_reference_and_unsplit(splits, causal, page_size, monkeypatch):
    layout, kc, vc, q, kn, vn = _case(splits * 10 + page_size, page_size)
    sf.append_kv(kn, vn, kc, vc, layout, backend="triton")
    whole, whole_lse = sf.span_prefill(q, kc, vc, layout, causal=causal, return_lse=True,
                                       backend="triton")
    monkeypatch.setenv("SPANFILL_SPLITS", str(splits))
    with poisoned_allocations() as count:
        o, lse = sf.span_prefill(q, kc, vc, layout, causal=causal, return_lse=True,
                                 backend="triton")
    assert count[0] >= 3, "output, lse and the partial states are poisoned"
    ro, rlse = reference_span(q, kc, vc, layout, causal)
    _check(o, lse, ro, rlse)
    assert rel_err(o, whole) < TOLERANCE[DTYPE]
    assert torch.allclose(lse, whole_lse, atol=1e-3)
    # Without return_lse the merge still needs somewhere to put it.
    with poisoned_allocations():
        o2 = sf.span_prefill(q, kc, vc, layout, causal=causal, backend="triton")
    assert torch.equal(o2, o)


@pytest.mark.parametrize("window_left", [0, 17, 90])
def test_split_with_window_and_cap(window_left, monkeypatch):
    layout, kc, vc, q, kn, vn = _case(window_left, 16)
    sf.append_kv(kn, vn, kc, vc, layout, backend="triton")
    monkeypatch.setenv("SPANFILL_SPLITS", "4")
    with poisoned_allocations():
        o, lse = sf.span_prefill(q * 3, kc, vc, layout, window_left=window_left,
                                 logits_soft_cap=20.0, return_lse=True, backend="triton")
    ro, rlse = reference_span(q * 3, kc, vc, layout, True, window_left=window_left, logits_soft_cap=20.0)
    _check(o, lse, ro, rlse)


def test_split_on_a_kv_shard(monkeypatch):
    """A shard (kv_start/kv_end) whose lower bound cuts into the split runs; rows
    that see nothing in the shard stay 0 with lse -inf."""
    layout, kc, vc, q, kn, vn = _case(5, 16)
    sf.append_kv(kn, vn, kc, vc, layout, backend="triton")
    lo = torch.tensor([70, 0, 0, 33], dtype=torch.int32, device=DEVICE)
    shard = sf.SpanLayout.from_tensors(layout.positions, layout.query_start_loc, layout.seq_lens,
                                       layout.block_table, 16, kv_start=lo, kv_end=layout.seq_lens)
    monkeypatch.setenv("SPANFILL_SPLITS", "5")
    with poisoned_allocations():
        o, lse = sf.span_prefill(q, kc, vc, shard, return_lse=True, backend="triton")
    ro, rlse = reference_span(q, kc, vc, shard, True)
    _check(o, lse, ro, rlse)
    assert torch.isinf(rlse).any(), "the case must have rows that see nothing"
    assert (o[torch.isinf(rlse)] == 0).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_split_on_a_padded_plan(causal):
    """Splits on a zero-filled (padded) plan: padding entries and padded rows of
    attention tiles still come out 0, valid rows match the reference."""
    from spanfill.kernels import attention_fwd

    torch.manual_seed(2)
    b, s, h, d = 3, 45, 2, 32
    q, k, v = (torch.randn(b, s, h, d, dtype=DTYPE, device=DEVICE) for _ in range(3))
    valid_lens = torch.tensor([45, 0, 19], device=DEVICE)
    layout = sf.PaddedLayout.build(valid_lens, s)
    cfg = AttentionConfig(16, 16, 1, 4, 1)
    with poisoned_allocations():
        out = torch.empty(b * s, h, d, dtype=DTYPE, device=DEVICE)
        lse = torch.empty(b * s, h, dtype=torch.float32, device=DEVICE)
        attention_fwd(q.reshape(-1, h, d), k.reshape(-1, h, d), v.reshape(-1, h, d), out, lse,
                      layout.tile_plan(cfg.block_q, causal),
                      launch_config(cfg, DTYPE, d, num_splits=3), d ** -0.5, causal,
                      zero_fill=True)
    ro, rlse = ref.padded_prefill(q, k, v, valid_lens, causal)
    _check(out.view(b, s, h, d), lse.view(b, s, h), ro, rlse)
    assert (out.view(b, s, h, d)[torch.isinf(rlse)] == 0).all()


def test_pick_num_splits_policy(monkeypatch):
    cfg = AttentionConfig(128, 128, 4, 8, 3)
    monkeypatch.delenv("SPANFILL_SPLITS", raising=False)
    assert pick_num_splits(16, 8192, cfg, torch.device("cpu")) == 1, "no splits off the GPU"
    monkeypatch.setenv("SPANFILL_SPLITS", "6")
    assert pick_num_splits(10_000, 64, cfg, torch.device("cpu")) == 6, "forced"
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("SPANFILL_SPLITS", bad)
        with pytest.raises(ValueError, match="SPANFILL_SPLITS"):
            pick_num_splits(16, 8192, cfg, torch.device("cpu"))
    monkeypatch.delenv("SPANFILL_SPLITS")
    import spanfill.backends.triton_config as configs

    monkeypatch.setattr(configs, "_num_sms", lambda index: 132)
    gpu = torch.device("cuda", 0)
    # 16 programs over 8192 positions (64 steps): 8 splits fill one wave of 132.
    assert pick_num_splits(16, 8192, cfg, gpu) == 8
    # A full wave already: no split.
    assert pick_num_splits(132, 8192, cfg, gpu) == 1
    # Short KV: a split gets at least SPLIT_MIN_STEPS steps.
    assert pick_num_splits(2, 128 * 2 * SPLIT_MIN_STEPS, cfg, gpu) == 2
    assert pick_num_splits(2, 128 * (SPLIT_MIN_STEPS - 1), cfg, gpu) == 1
    # Capped.
    assert pick_num_splits(1, 1 << 20, cfg, gpu) == MAX_SPLITS
    # 4-warp configs fit about two programs per SM.
    assert pick_num_splits(16, 8192, AttentionConfig(128, 32, 1, 4, 3), gpu) == 16


@pytest.mark.gpu
def test_split_chosen_by_itself_on_the_gpu():
    """A few span tokens over a long prompt: the policy splits, results match."""
    seq_len = 8192
    layout, kc, vc, q, kn, vn = paged_setup([seq_len, seq_len], [[(7000, 7003)], [(8000, 8001)]],
                                            16, 32, 8, 128, torch.bfloat16, DEVICE, seed=1)
    problem = paged_problem(q, kc, layout.num_requests, layout.block_table.shape[1], True)
    assert get_backend("triton").select_config(problem).num_splits > 1
    sf.append_kv(kn, vn, kc, vc, layout)
    with poisoned_allocations():
        o, lse = sf.span_prefill(q, kc, vc, layout, return_lse=True)
    ro, rlse = reference_span(q, kc, vc, layout, True)
    assert rel_err(o, ro) < TOLERANCE[torch.bfloat16]
    assert torch.allclose(lse, rlse.float(), atol=2e-2)
