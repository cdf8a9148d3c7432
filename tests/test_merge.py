"""merge_states / merge_states_n: the kernel against the reference, and merged
shard results against attention over the whole KV."""

from __future__ import annotations

import random

import pytest
import torch

import spanfill as sf
from spanfill import reference
from spanfill.kernels import merge_states_launch, merge_two_launch
from spanfill.testing import TOLERANCE, rel_err

from conftest import INTERPRETING, poison
from helpers import paged_setup, random_spans

NEG_INF = float("-inf")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETING,
                                  reason="needs CUDA or TRITON_INTERPRET=1")


def random_states(t: int, n: int, h: int, d: int, dtype: torch.dtype, seed: int):
    """States with whole -inf rows, single -inf states holding NaN garbage, and large lse."""
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(t, n, h, d, generator=gen)
    lse = torch.randn(t, n, h, generator=gen) * 20  # spreads of e^40: tests the max shift
    hit = torch.rand(t, n, h, generator=gen) < 0.3
    lse[hit] = NEG_INF
    o[hit] = float("nan")  # a state that saw nothing may hold anything
    lse[0] = NEG_INF  # a row that no state saw
    return o.to(DEVICE, dtype), lse.to(DEVICE)


def expected(o: torch.Tensor, lse: torch.Tensor):
    ref_o, ref_lse = reference.merge_states(o, lse, compute_dtype=torch.float64)
    return ref_o, ref_lse


def check(out, out_lse, ref_o, ref_lse, dtype):
    assert not torch.isnan(out).any() and not torch.isnan(out_lse).any()
    assert out.dtype == dtype and out_lse.dtype == torch.float32
    dead = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(out_lse), dead)
    assert (out[dead] == 0).all()
    assert rel_err(out, ref_o) <= TOLERANCE[dtype]
    assert rel_err(out_lse[~dead], ref_lse[~dead]) <= 1e-6


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("t,n,h,d", [(1, 1, 1, 32), (63, 2, 5, 80), (111, 3, 8, 128),
                                     (17, 4, 3, 256), (9, 7, 2, 64)],
                         ids=["T1-N1", "T63-N2-D80", "T111-N3", "T17-N4-D256", "T9-N7"])
def test_merge_n_kernel_matches_reference(dtype, t, n, h, d):
    o, lse = random_states(t, n, h, d, dtype, seed=t * 7 + n)
    out = poison(torch.empty(t, h, d, dtype=dtype, device=DEVICE))
    out_lse = poison(torch.empty(t, h, dtype=torch.float32, device=DEVICE))
    merge_states_launch(o, lse, out, out_lse)
    check(out, out_lse, *expected(o, lse), dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_merge_two_kernel_matches_reference(dtype):
    o, lse = random_states(63, 2, 5, 80, dtype, seed=3)
    out = poison(torch.empty(63, 5, 80, dtype=dtype, device=DEVICE))
    out_lse = poison(torch.empty(63, 5, dtype=torch.float32, device=DEVICE))
    merge_two_launch(o[:, 0], lse[:, 0], o[:, 1], lse[:, 1], out, out_lse)
    check(out, out_lse, *expected(o, lse), dtype)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernel)])
def test_public_ops_agree(backend):
    o, lse = random_states(40, 3, 4, 64, torch.float16, seed=11)
    ref_o, ref_lse = expected(o, lse)
    check(*sf.merge_states_n(o, lse, backend=backend), ref_o, ref_lse, torch.float16)
    two_o, two_lse = expected(o[:, :2], lse[:, :2])
    check(*sf.merge_states(o[:, 0], lse[:, 0], o[:, 1], lse[:, 1], backend=backend),
          two_o, two_lse, torch.float16)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernel)])
def test_stacked_states_go_in_transposed_without_copy(backend):
    o, lse = random_states(33, 4, 2, 32, torch.float32, seed=5)
    stack_o, stack_lse = o.transpose(0, 1).contiguous(), lse.transpose(0, 1).contiguous()
    out, out_lse = sf.merge_states_n(stack_o.transpose(0, 1), stack_lse.transpose(0, 1),
                                     backend=backend)
    check(out, out_lse, *expected(o, lse), torch.float32)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernel)])
def test_nan_lse_propagates(backend):
    o, lse = random_states(4, 2, 2, 32, torch.float32, seed=1)
    lse[2, 1, 0] = float("nan")
    out, out_lse = sf.merge_states_n(o, lse, backend=backend)
    assert torch.isnan(out_lse[2, 0]) and torch.isnan(out[2, 0]).all()
    assert not torch.isnan(out[3]).any()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernel)])
def test_empty_rows(backend):
    o = torch.empty(0, 2, 3, 32, device=DEVICE)
    out, out_lse = sf.merge_states_n(o, torch.empty(0, 2, 3, device=DEVICE), backend=backend)
    assert out.shape == (0, 3, 32) and out_lse.shape == (0, 3)


# ------------------------------------------------------------------ against attention

def shard_bounds(rng: random.Random, seq_lens: list[int], parts: int):
    """Per request, ``parts`` contiguous position ranges covering [0, seq_len) (some empty)."""
    cuts = [sorted([0, s] + [rng.randint(0, s) for _ in range(parts - 1)]) for s in seq_lens]
    return [(torch.tensor([c[i] for c in cuts], dtype=torch.int32),
             torch.tensor([c[i + 1] for c in cuts], dtype=torch.int32)) for i in range(parts)]


@pytest.mark.parametrize("parts", [2, 3, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("seed", [0, 1])
def test_merged_shards_equal_unsplit_attention(parts, causal, seed):
    rng = random.Random(seed * 10 + parts)
    seq_lens = [rng.randint(1, 90) for _ in range(3)] + [0]
    spans = [random_spans(rng, s, 3, 9) for s in seq_lens]
    layout, k_cache, v_cache, q, k_new, v_new = paged_setup(
        seq_lens, spans, page_size=16, hq=4, hk=2, d=32, dtype=torch.float64, device="cpu",
        seed=seed)
    reference.append_kv(k_new, v_new, k_cache, v_cache, layout.slot_mapping)
    meta = (layout.positions, layout.query_start_loc, layout.seq_lens, layout.block_table)
    full_o, full_lse = reference.span_prefill(q, k_cache, v_cache, *meta, causal,
                                              compute_dtype=torch.float64)
    pieces = [reference.span_prefill(q, k_cache, v_cache, *meta, causal,
                                     compute_dtype=torch.float64, kv_start=lo, kv_end=hi)
              for lo, hi in shard_bounds(rng, seq_lens, parts)]
    o = torch.stack([p[0] for p in pieces], 1)
    lse = torch.stack([p[1] for p in pieces], 1)

    merged_o, merged_lse = reference.merge_states(o, lse, compute_dtype=torch.float64)
    assert rel_err(merged_o, full_o) <= 1e-12
    assert torch.equal(torch.isneginf(merged_lse), torch.isneginf(full_lse))
    alive = ~torch.isneginf(full_lse)
    assert rel_err(merged_lse[alive], full_lse[alive]) <= 1e-12

    if DEVICE == "cpu" and not INTERPRETING:
        return
    for dtype in (torch.float32, torch.float16):
        out, out_lse = sf.merge_states_n(o.to(DEVICE, dtype), lse.to(DEVICE, torch.float32),
                                         backend="triton")
        assert rel_err(out.cpu(), full_o) <= TOLERANCE[dtype], dtype
        assert torch.equal(torch.isneginf(out_lse).cpu(), torch.isneginf(full_lse))


# ------------------------------------------------------------------ bad input

def test_bad_input_names_the_argument():
    o = torch.zeros(4, 2, 32)
    lse = torch.zeros(4, 2)
    with pytest.raises(TypeError, match="lse_b must be float32"):
        sf.merge_states(o, lse, o, lse.half())
    with pytest.raises(TypeError, match="o_b has dtype"):
        sf.merge_states(o, lse, o.half(), lse)
    with pytest.raises(ValueError, match="o_b has shape"):
        sf.merge_states(o, lse, o[:3], lse[:3])
    with pytest.raises(ValueError, match="lse_a has shape"):
        sf.merge_states(o, lse[:, :1], o, lse)
    with pytest.raises(ValueError, match="lse_a is on meta"):
        sf.merge_states(o, lse.to("meta"), o, lse)
    with pytest.raises(TypeError, match="o_a must be float16"):
        sf.merge_states(o.long(), lse, o, lse)
    with pytest.raises(TypeError, match="o_a must be a torch.Tensor"):
        sf.merge_states(None, lse, o, lse)
    with pytest.raises(ValueError, match="o must have 4 dimensions"):
        sf.merge_states_n(o, lse)
    with pytest.raises(ValueError, match="at least one state"):
        sf.merge_states_n(torch.zeros(4, 0, 2, 32), torch.zeros(4, 0, 2))
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        sf.merge_states_n(torch.zeros(4, 2, 32, 2).transpose(2, 3), torch.zeros(4, 2, 2))
