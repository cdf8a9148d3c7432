"""Every kernel (Triton interpreter on the CPU, compiled on a GPU) against the reference.

Outputs are poisoned with NaN before each run (``torch.empty`` on the kernel side
and the checks below treat NaN as a failure), sizes are odd on purpose.
"""

from __future__ import annotations

import random

import pytest
import torch

import spanfill as sf
from spanfill import reference as ref
from spanfill.testing import TOLERANCE, reference_span, rel_err
from tests.fuzzing import poisoned_allocations
from tests.helpers import paged_setup, random_spans

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 dot products are wrong in the CPU interpreter; bf16 is covered by the GPU tests.
DTYPES = [torch.float16, torch.float32] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]


def _check_lse(lse: torch.Tensor, ref_lse: torch.Tensor) -> None:
    assert not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite].float(), atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("d,hq,hk", [(32, 4, 4), (80, 4, 1), (128, 8, 2)], ids=["d32-mha", "d80-mqa", "d128-gqa4"])
def test_padded_prefill(dtype, causal, padding_side, d, hq, hk):
    torch.manual_seed(d + hq)
    b, s = 4, 37
    q = torch.randn(b, s, hq, d, dtype=dtype, device=DEVICE)
    k = torch.randn(b, s, hk, d, dtype=dtype, device=DEVICE)
    v = torch.randn(b, s, hk, d, dtype=dtype, device=DEVICE)
    valid_lens = torch.tensor([0, s, 1, 23], device=DEVICE)  # empty, full, one token, partial
    with poisoned_allocations() as count:  # padding-only runs of several tiles must be written
        o, lse = sf.padded_prefill(q, k, v, valid_lens, causal=causal, padding_side=padding_side,
                                   return_lse=True, backend="triton")
    assert count[0] >= 2
    ro, rlse = ref.padded_prefill(q, k, v, valid_lens, causal, padding_side)
    assert o.dtype == dtype and o.shape == q.shape
    assert rel_err(o, ro) < TOLERANCE[dtype]
    _check_lse(lse, rlse)
    pad = torch.isinf(rlse)
    assert (o[pad] == 0).all(), "padded rows must be exactly zero"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_prefill_torch_plan(causal, padding_side, monkeypatch):
    """The torch-built padded plan (plans too big for the one-program sort): same
    results, padded rows 0."""
    import spanfill.kernels

    monkeypatch.setattr(spanfill.kernels, "MAX_PLAN_TILES", 0)

    def no_launch(*args, **kwargs):
        raise AssertionError("the one-program plan ran")

    monkeypatch.setattr(spanfill.kernels, "plan_packed_launch", no_launch)
    torch.manual_seed(11)
    b, s, hq, hk, d = 4, 37, 4, 2, 32
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float16, device=DEVICE) for h in (hq, hk, hk))
    valid_lens = torch.tensor([0, s, 1, 23], device=DEVICE)
    layout = sf.PaddedLayout.build(valid_lens, s, padding_side)
    with poisoned_allocations():
        o, lse = sf.padded_prefill(q, k, v, layout, causal=causal, return_lse=True,
                                   backend="triton")
    ro, rlse = ref.padded_prefill(q, k, v, valid_lens, causal, padding_side)
    assert rel_err(o, ro) < TOLERANCE[torch.float16]
    _check_lse(lse, rlse)
    assert (o[torch.isinf(rlse)] == 0).all()


@pytest.mark.parametrize("tma", ["default", "descriptor", "pointer"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_prefill_ignores_poisoned_padding(tma, padding_side, monkeypatch):
    """NaN/inf in the padded q/k/v rows never reach a valid row; padded rows are 0.

    Run through both dense-KV load paths: tensor descriptors (forced on the CPU
    interpreter, the default on Hopper) and pointer loads. A descriptor tile that
    crosses ``valid_len`` reads the padding (or the next sample) as well, so this
    is what keeps its V rows zeroed.
    """
    if tma != "default":
        monkeypatch.setenv("SPANFILL_TMA", "force" if tma == "descriptor" else "0")
    torch.manual_seed(5)
    b, s, hq, hk, d = 3, 45, 4, 2, 32
    dtype = torch.float16
    q = torch.randn(b, s, hq, d, dtype=dtype, device=DEVICE)
    k = torch.randn(b, s, hk, d, dtype=dtype, device=DEVICE)
    v = torch.randn(b, s, hk, d, dtype=dtype, device=DEVICE)
    valid_lens = torch.tensor([17, s, 30], device=DEVICE)
    pos = torch.arange(s, device=DEVICE)
    n = valid_lens[:, None]
    pad = pos[None, :] >= n if padding_side == "right" else pos[None, :] < s - n
    ro, rlse = ref.padded_prefill(q, k, v, valid_lens, True, padding_side)
    for x, poison in ((q, float("nan")), (k, float("inf")), (v, float("nan"))):
        x[pad] = poison
    o, lse = sf.padded_prefill(q, k, v, valid_lens, causal=True, padding_side=padding_side,
                               return_lse=True, backend="triton")
    assert rel_err(o, ro) < TOLERANCE[dtype]
    _check_lse(lse, rlse)
    assert (o[pad] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("d,hq,hk", [(32, 4, 4), (80, 4, 1), (128, 8, 1)], ids=["d32-mha", "d80-gqa4", "d128-gqa8"])
def test_span_prefill(dtype, causal, page_size, d, hq, hk):
    rng = random.Random(page_size * 7 + d)
    seq_lens = [111, 1, 64, 90]
    spans = [
        [(0, 1), (5, 9), (50, 63), (110, 111)],  # touches 0 and seq_len - 1, one-token spans
        [(0, 1)],                                # a one-token prompt
        [],                                      # request with no spans
        random_spans(rng, 90, 6, 12),
    ]
    layout, k_cache, v_cache, q, k_new, v_new = paged_setup(
        seq_lens, spans, page_size, hq, hk, d, dtype, DEVICE, seed=page_size + d)
    sf.append_kv(k_new, v_new, k_cache, v_cache, layout, backend="triton")
    o, lse = sf.span_prefill(q, k_cache, v_cache, layout, causal=causal, return_lse=True,
                             backend="triton")
    ro, rlse = reference_span(q, k_cache, v_cache, layout, causal)
    assert rel_err(o, ro) < TOLERANCE[dtype]
    _check_lse(lse, rlse)


@pytest.mark.parametrize("num_tokens", [1, 63, 111])
def test_span_prefill_token_counts(num_tokens):
    """T = 1, 63, 111 span tokens in one request of 150."""
    seq_len = 150
    start = seq_len - num_tokens - 3
    layout, k_cache, v_cache, q, k_new, v_new = paged_setup(
        [seq_len], [[(start, start + num_tokens)]], 16, 4, 2, 64, torch.float16, DEVICE, seed=num_tokens)
    assert layout.num_tokens == num_tokens
    sf.append_kv(k_new, v_new, k_cache, v_cache, layout, backend="triton")
    o = sf.span_prefill(q, k_cache, v_cache, layout, backend="triton")
    ro, _ = reference_span(q, k_cache, v_cache, layout, True)
    assert rel_err(o, ro) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_varlen_prefill(dtype, causal):
    torch.manual_seed(3)
    cu_seqlens = torch.tensor([0, 1, 1, 64, 175], device=DEVICE)  # 1 token, empty, 63, 111
    t, hq, hk, d = 175, 4, 2, 64
    q = torch.randn(t, hq, d, dtype=dtype, device=DEVICE)
    k = torch.randn(t, hk, d, dtype=dtype, device=DEVICE)
    v = torch.randn(t, hk, d, dtype=dtype, device=DEVICE)
    o, lse = sf.varlen_prefill(q, k, v, cu_seqlens, causal=causal, return_lse=True, backend="triton")
    ro, rlse = ref.varlen_prefill(q, k, v, cu_seqlens, causal)
    assert rel_err(o, ro) < TOLERANCE[dtype]
    _check_lse(lse, rlse)


def test_sm_scale_is_used():
    torch.manual_seed(4)
    q = torch.randn(2, 20, 2, 32, device=DEVICE, dtype=torch.float16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    valid_lens = torch.tensor([20, 11], device=DEVICE)
    o = sf.padded_prefill(q, k, v, valid_lens, sm_scale=0.3, backend="triton")
    ro, _ = ref.padded_prefill(q, k, v, valid_lens, sm_scale=0.3)
    assert rel_err(o, ro) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_append_kv_writes_only_its_slots(page_size):
    layout, k_cache, v_cache, _, k_new, v_new = paged_setup(
        [70, 33], [[(0, 2), (40, 70)], [(32, 33)]], page_size, 2, 2, 32, torch.float16, DEVICE,
        seed=page_size)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref.append_kv(k_new, v_new, k_ref, v_ref, layout.slot_mapping)
    sf.append_kv(k_new, v_new, k_cache, v_cache, layout, backend="triton")
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_append_kv_skips_slot_minus_one():
    layout, k_cache, v_cache, _, k_new, v_new = paged_setup(
        [40], [[(3, 9)]], 16, 2, 2, 32, torch.float16, DEVICE)
    slots = layout.slot_mapping.clone()
    slots[2] = -1
    skipping = sf.SpanLayout.from_tensors(layout.positions, layout.query_start_loc, layout.seq_lens,
                                          layout.block_table, 16, slot_mapping=slots)
    before = k_cache.clone()
    sf.append_kv(k_new, v_new, k_cache, v_cache, skipping, backend="triton")
    page, off = int(layout.slot_mapping[2]) // 16, int(layout.slot_mapping[2]) % 16
    assert torch.equal(k_cache[page, off], before[page, off])
    page, off = int(slots[3]) // 16, int(slots[3]) % 16
    assert torch.equal(k_cache[page, off], k_new[3])


def test_descriptor_choice_is_made_once(monkeypatch):
    """dense_kv_uses_tma decides both the KV step (pick_config) and the loads."""
    from spanfill.backends.triton_config import dense_kv_uses_tma, pick_config

    q = torch.zeros(64, 4, 128, dtype=torch.float16)
    kv = torch.zeros(64, 2, 128, dtype=torch.float16)
    assert not dense_kv_uses_tma(q, kv, kv, 1)  # no Hopper GPU here
    monkeypatch.setenv("SPANFILL_TMA", "force")
    assert dense_kv_uses_tma(q, kv, kv, 1)
    assert not dense_kv_uses_tma(q.float(), kv.float(), kv.float(), 1)  # fp32: plain loads
    odd = torch.zeros(64, 2, 80, dtype=torch.float16)
    assert not dense_kv_uses_tma(q[..., :80], odd, odd, 1)  # a D-wide tile would cross heads
    monkeypatch.setenv("SPANFILL_TMA", "0")
    assert not dense_kv_uses_tma(q, kv, kv, 1)
    assert pick_config(128, torch.bfloat16, 1, True, paged=False, tma=True).block_n == 128
    assert pick_config(128, torch.bfloat16, 1, True, paged=False, tma=False).block_n == 64
