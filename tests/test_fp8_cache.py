"""fp8 KV caches (float8_e4m3fn, float8_e5m2) with k_scale/v_scale, per tensor or per KV head.

The semantics are the reference's (dequantize, then fp32 math; new values stored as
``x / scale`` saturated to the format). The Triton kernels do not dequantize fp8 yet:
the registry sends these calls to the reference path (with a warning on CUDA) and
refuses ``backend="triton"``. These tests pin the semantics and the API for the
kernels to meet.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import spanfill as sf
from spanfill import backends, reference
from spanfill.testing import rel_err

from tests.conftest import tensor_digest
from tests.helpers import paged_setup

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
FP8_IDS = ["e4m3", "e5m2"]
# Relative error of attention over an fp8 cache against the same values in fp32 (the
# quantization alone; measured on these N(0, 1) inputs, D=64, scales 0.5 and 0.05:
# e4m3 3.3e-2 to 3.4e-2, e5m2 6.3e-2 to 6.6e-2; a bf16 cache gives about 4e-3).
FP8_ERROR = {torch.float8_e4m3fn: 4e-2, torch.float8_e5m2: 8e-2}


def test_quantize_saturates_and_dequantize_scales() -> None:
    x = torch.tensor([[[1.0, -1000.0, 1e6, float("nan")]]])  # [1, Hk=1, D=4]
    for dtype in FP8:
        stored = reference.quantize_kv(x, 2.0, dtype)
        limit = torch.finfo(dtype).max
        back = reference.dequantize_kv(stored, 2.0)
        assert back[0, 0, 0] == 1.0
        assert back[0, 0, 2] == 2.0 * limit  # saturated, not inf or NaN
        assert torch.isfinite(back[0, 0, :3]).all() and back[0, 0, 1] < 0
        assert torch.isnan(back[0, 0, 3])  # NaN stays visible


def test_per_head_scale_broadcasts_over_heads() -> None:
    x = torch.ones(3, 2, 8)
    stored = reference.quantize_kv(x, torch.tensor([1.0, 4.0]), torch.float8_e4m3fn)
    assert stored[:, 0].float().eq(1.0).all() and stored[:, 1].float().eq(0.25).all()
    assert reference.dequantize_kv(stored, torch.tensor([1.0, 4.0])).eq(1.0).all()


def _fp8_span_case(dtype: torch.dtype, scale):
    layout, k32, v32, q, k_new, v_new = paged_setup([70, 33], [[(0, 1), (5, 40)], [(10, 33)]],
                                                     16, 4, 2, 64, torch.float32, DEVICE)
    k_cache = reference.quantize_kv(k32, scale, dtype)
    v_cache = reference.quantize_kv(v32, scale, dtype)
    return layout, k32, v32, k_cache, v_cache, q, k_new, v_new


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("per_head", [False, True], ids=["scale-per-tensor", "scale-per-head"])
def test_append_and_span_prefill_on_fp8_cache(dtype: torch.dtype, per_head: bool) -> None:
    scale = torch.tensor([0.5, 2.0], device=DEVICE) if per_head else 0.5
    layout, k32, v32, k_cache, v_cache, q, k_new, v_new = _fp8_span_case(dtype, scale)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference.append_kv(k_new, v_new, ref_k, ref_v, layout.slot_mapping, scale, scale)
    with pytest.warns(UserWarning, match="reference path") if DEVICE == "cuda" else nullcontext():
        sf.append_kv(k_new, v_new, k_cache, v_cache, layout, k_scale=scale, v_scale=scale)
    assert tensor_digest(k_cache, v_cache) == tensor_digest(ref_k, ref_v)
    written = layout.slot_mapping
    flat = k_cache.view(-1, 2, 64).float()
    want = reference.quantize_kv(k_new, scale, dtype).float()
    assert torch.equal(flat[written], want)

    with pytest.warns(UserWarning, match="reference path") if DEVICE == "cuda" else nullcontext():
        o, lse = sf.span_prefill(q, k_cache, v_cache, layout, return_lse=True, k_scale=scale,
                                 v_scale=scale)
    ref_o, ref_lse = reference.span_prefill(
        q, reference.dequantize_kv(k_cache, scale), reference.dequantize_kv(v_cache, scale),
        layout.positions, layout.query_start_loc, layout.seq_lens, layout.block_table, True, None)
    assert rel_err(o, ref_o) <= 1e-5 and rel_err(lse, ref_lse) <= 1e-5
    # Against the unquantized values: the quantization error alone (documented).
    k_full, v_full = k32.clone(), v32.clone()
    reference.append_kv(k_new, v_new, k_full, v_full, layout.slot_mapping)
    exact, _ = reference.span_prefill(q, k_full, v_full, layout.positions,
                                      layout.query_start_loc, layout.seq_lens,
                                      layout.block_table, True, None)
    assert rel_err(o, exact) <= FP8_ERROR[dtype]


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
def test_padded_and_varlen_with_fp8_kv(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 17, 4, 32, generator=gen).to(DEVICE)
    k32, v32 = (torch.randn(2, 17, 2, 32, generator=gen).to(DEVICE) for _ in range(2))
    k8, v8 = reference.quantize_kv(k32, 0.25, dtype), reference.quantize_kv(v32, 0.25, dtype)
    lens = torch.tensor([17, 6], device=DEVICE)
    o = sf.padded_prefill(q, k8, v8, lens, k_scale=0.25, v_scale=0.25)
    ref, _ = reference.padded_prefill(q, reference.dequantize_kv(k8, 0.25),
                                      reference.dequantize_kv(v8, 0.25), lens)
    assert rel_err(o, ref) <= 1e-5 and o[1, 6:].eq(0).all()
    cu = torch.tensor([0, 17, 34], device=DEVICE)
    flat = [x.reshape(34, x.shape[2], 32) for x in (q, k8, v8)]
    o = sf.varlen_prefill(*flat, cu, k_scale=0.25, v_scale=0.25)
    ref, _ = reference.varlen_prefill(flat[0], reference.dequantize_kv(flat[1], 0.25),
                                      reference.dequantize_kv(flat[2], 0.25), cu)
    assert rel_err(o, ref) <= 1e-5


def test_registry_sends_fp8_to_the_reference_and_says_why() -> None:
    q = torch.zeros(1, 4, 64)
    cache = torch.zeros(4, 16, 2, 64, dtype=torch.float8_e4m3fn)
    problem = backends.paged_problem(q, cache, 1, 4, True)
    ok, reason = backends.get_backend("triton").supports(problem)
    assert not ok and "fp8" in reason


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(k_scale=0.0), ValueError, r"k_scale must be a finite number > 0, got 0.0"),
    (dict(v_scale=float("nan")), ValueError, r"v_scale must be a finite number > 0, got nan"),
    (dict(k_scale="1"), TypeError, r"k_scale must be a real number or an fp32 tensor, got str"),
    (dict(k_scale=True), TypeError, r"k_scale must be a real number or an fp32 tensor, got bool"),
    (dict(k_scale=torch.tensor([1.0, 2.0, 3.0])), ValueError,
     r"k_scale must have shape \[\], \[1\] or \[Hk\]=\[2\], got \(3,\)"),
    (dict(k_scale=torch.tensor(1.0, dtype=torch.float64)), TypeError,
     r"k_scale must be float32, got torch.float64"),
    (dict(backend="triton"), ValueError, r"backend='triton' cannot run here: .*fp8"),
], ids=["zero", "nan", "string", "bool", "wrong-shape", "fp64-tensor", "triton-asked"])
def test_bad_fp8_arguments_leave_the_cache_unchanged(kwargs, error, pattern) -> None:
    layout, _, _, k_cache, v_cache, q, k_new, v_new = _fp8_span_case(torch.float8_e4m3fn, 1.0)
    if "k_scale" in kwargs and torch.is_tensor(kwargs["k_scale"]):
        kwargs = dict(kwargs, k_scale=kwargs["k_scale"].to(DEVICE))
    before = tensor_digest(k_cache, v_cache)
    with pytest.raises(error, match=pattern):
        sf.append_kv(k_new, v_new, k_cache, v_cache, layout, **kwargs)
    with pytest.raises(error, match=pattern):
        sf.span_prefill(q, k_cache, v_cache, layout, **kwargs)
    assert tensor_digest(k_cache, v_cache) == before


def test_scale_with_a_non_fp8_cache_is_refused() -> None:
    layout, k_cache, v_cache, q, k_new, v_new = paged_setup([20], [[(3, 5)]], 16, 4, 2, 64,
                                                            torch.float32, DEVICE)
    before = tensor_digest(k_cache, v_cache)
    with pytest.raises(ValueError, match=r"k_scale applies to fp8 K/V only, but they are "
                                         r"torch.float32"):
        sf.append_kv(k_new, v_new, k_cache, v_cache, layout, k_scale=0.5)
    assert tensor_digest(k_cache, v_cache) == before



def test_custom_ops_carry_the_scales_under_torch_compile() -> None:
    """spanfill.custom_ops take k_scale/v_scale (numbers become 0-d fp32 tensors)."""
    from spanfill import custom_ops

    layout, _, _, k_cache, v_cache, q, k_new, v_new = _fp8_span_case(torch.float8_e5m2, 0.5)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference.append_kv(k_new, v_new, ref_k, ref_v, layout.slot_mapping, 0.5, 0.5)
    meta = (layout.positions, layout.query_start_loc, layout.seq_lens, layout.block_table,
            layout.page_size)

    def step(q, k_new, v_new, k_cache, v_cache):
        custom_ops.append_kv(k_new, v_new, k_cache, v_cache, *meta, k_scale=0.5, v_scale=0.5)
        return custom_ops.span_prefill(q, k_cache, v_cache, *meta, k_scale=0.5, v_scale=0.5)

    o = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k_new, v_new, k_cache,
                                                                 v_cache)
    assert tensor_digest(k_cache, v_cache) == tensor_digest(ref_k, ref_v)
    ref_o, _ = reference.span_prefill(
        q, reference.dequantize_kv(ref_k, 0.5), reference.dequantize_kv(ref_v, 0.5),
        layout.positions, layout.query_start_loc, layout.seq_lens, layout.block_table, True, None)
    assert rel_err(o, ref_o) <= 1e-5
