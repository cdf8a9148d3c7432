"""fp8 KV caches (float8_e4m3fn, float8_e5m2) with k_scale/v_scale, per tensor or per KV head.

The semantics are the reference's (dequantize, then fp32 math; new values stored as
``x / scale`` saturated to the format, rounded to nearest even). The Triton kernels
widen fp8 K/V to q's dtype after each load and fold the scales into the score scale
and the output; the append kernel quantizes bit-for-bit like the reference. Every
test runs on the kernels (the interpreter on a CPU) and, where it says so, on the
reference too; outputs are allocated poisoned (NaN).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import spanfill as sf
from spanfill import backends, reference
from spanfill.testing import TOLERANCE, rel_err

from tests.conftest import tensor_digest
from tests.fuzzing import poisoned_allocations
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


def _fp8_span_case(dtype: torch.dtype, scale, q_dtype: torch.dtype = torch.float32):
    layout, k32, v32, q, k_new, v_new = paged_setup([70, 33], [[(0, 1), (5, 40)], [(10, 33)]],
                                                     16, 4, 2, 64, torch.float32, DEVICE)
    k_cache = reference.quantize_kv(k32, scale, dtype)
    v_cache = reference.quantize_kv(v32, scale, dtype)
    return layout, k32, v32, k_cache, v_cache, q.to(q_dtype), k_new.to(q_dtype), v_new.to(q_dtype)


# q dtypes the kernels run with an fp8 cache; bf16 runs in the interpreter too (its
# dots in fp32: spanfill.backends.triton_config.ieee_dot).
Q_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
Q_IDS = ["q-fp32", "q-fp16", "q-bf16"]


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("per_head", [False, True], ids=["scale-per-tensor", "scale-per-head"])
@pytest.mark.parametrize("q_dtype", Q_DTYPES, ids=Q_IDS)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_append_and_span_prefill_on_fp8_cache(dtype: torch.dtype, per_head: bool,
                                              q_dtype: torch.dtype, backend: str) -> None:
    scale = torch.tensor([0.5, 2.0], device=DEVICE) if per_head else 0.5
    layout, k32, v32, k_cache, v_cache, q, k_new, v_new = _fp8_span_case(dtype, scale, q_dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference.append_kv(k_new, v_new, ref_k, ref_v, layout.slot_mapping, scale, scale)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*reference path.*")
        sf.append_kv(k_new, v_new, k_cache, v_cache, layout, k_scale=scale, v_scale=scale,
                     backend=backend)
    assert tensor_digest(k_cache, v_cache) == tensor_digest(ref_k, ref_v)  # bit for bit
    written = layout.slot_mapping
    flat = k_cache.view(-1, 2, 64).float()
    want = reference.quantize_kv(k_new, scale, dtype).float()
    assert torch.equal(flat[written], want)

    with warnings.catch_warnings(), poisoned_allocations():
        warnings.filterwarnings("error", message=".*reference path.*")
        o, lse = sf.span_prefill(q, k_cache, v_cache, layout, return_lse=True, k_scale=scale,
                                 v_scale=scale, backend=backend)
    ref_o, ref_lse = reference.span_prefill(
        q.float(), reference.dequantize_kv(k_cache, scale),
        reference.dequantize_kv(v_cache, scale), layout.positions, layout.query_start_loc,
        layout.seq_lens, layout.block_table, True, None)
    tol = TOLERANCE[q_dtype]
    assert o.dtype == q_dtype and rel_err(o, ref_o) <= tol and rel_err(lse, ref_lse) <= tol
    # Against the unquantized values: the quantization error alone (documented).
    k_full, v_full = k32.clone(), v32.clone()
    reference.append_kv(k_new.float(), v_new.float(), k_full, v_full, layout.slot_mapping)
    exact, _ = reference.span_prefill(q.float(), k_full, v_full, layout.positions,
                                      layout.query_start_loc, layout.seq_lens,
                                      layout.block_table, True, None)
    assert rel_err(o, exact) <= FP8_ERROR[dtype] + tol


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
def test_append_kernel_rounds_like_torch(dtype: torch.dtype) -> None:
    """Every binade of the format, ties (to even), subnormals, saturation and signed
    zeros: the append kernel stores exactly torch's ``(x / scale).clamp().to(fp8)``."""
    limit = torch.finfo(dtype).max
    grid = reference.quantize_kv(torch.linspace(-limit, limit, 4099)[None, None], 1.0, dtype)
    representable = torch.unique(grid.float())
    mids = (representable[1:] + representable[:-1]) / 2  # exact ties between neighbours
    gen = torch.Generator().manual_seed(7)
    values = torch.cat([
        representable, mids, torch.nextafter(mids, torch.tensor(float("inf"))),
        torch.nextafter(mids, torch.tensor(float("-inf"))),
        torch.tensor([0.0, -0.0, limit * 1.01, -limit * 3, 1e30, 2.0 ** -30, -(2.0 ** -30),
                      float("nan"), float("inf"), float("-inf")]),
        torch.randn(4096, generator=gen) * 10 ** torch.randint(-6, 5, (4096,), generator=gen),
    ])
    hk, d = 2, 64
    rows = -(-values.numel() // (hk * d))
    x = torch.zeros(rows * hk * d)
    x[:values.numel()] = values
    x = x.view(rows, hk, d).to(DEVICE)
    page_size = 16
    pages = -(-rows // page_size)
    layout = sf.SpanLayout.build([[(0, rows)]], [rows],
                                 torch.arange(pages, dtype=torch.int32, device=DEVICE)[None],
                                 page_size)
    for scale in (1.0, torch.tensor([1.0, 0.375], device=DEVICE)):
        k_cache = torch.zeros(pages, page_size, hk, d, dtype=dtype, device=DEVICE)
        v_cache = torch.zeros_like(k_cache)
        sf.append_kv(x, x, k_cache, v_cache, layout, k_scale=scale, v_scale=scale,
                     backend="triton")
        want = reference.quantize_kv(x, scale, dtype)
        got = k_cache.view(-1, hk, d)[:rows]
        # Bit for bit, except that any NaN encoding is a NaN.
        diff = (got.view(torch.uint8) != want.view(torch.uint8)) & \
            ~(got.float().isnan() & want.float().isnan())
        assert not diff.any(), (f"{int(diff.sum())} values differ, e.g. x={x[diff][:4].tolist()}"
                                f" -> {got[diff][:4].float().tolist()} vs "
                                f"{want[diff][:4].float().tolist()}")


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
def test_fp8_split_kv_soft_cap_and_window(dtype: torch.dtype, monkeypatch) -> None:
    """The scales folded into the score scale (and inside tanh with a soft cap), and
    applied to the partial outputs of a split launch, match the dequantized reference."""
    monkeypatch.setenv("SPANFILL_SPLITS", "3")
    scale = torch.tensor([0.3, 0.7], device=DEVICE)
    layout, _, _, k_cache, v_cache, q, _, _ = _fp8_span_case(dtype, scale, torch.float16)
    for variant in (dict(logits_soft_cap=5.0), dict(window_left=9), {}):
        with poisoned_allocations():
            o, lse = sf.span_prefill(q, k_cache, v_cache, layout, return_lse=True,
                                     k_scale=scale, v_scale=scale * 2, backend="triton",
                                     **variant)
        ref_o, ref_lse = reference.span_prefill(
            q.float(), reference.dequantize_kv(k_cache, scale),
            reference.dequantize_kv(v_cache, scale * 2), layout.positions,
            layout.query_start_loc, layout.seq_lens, layout.block_table, True, None, **variant)
        assert rel_err(o, ref_o) <= TOLERANCE[torch.float16], variant
        assert rel_err(lse, ref_lse) <= TOLERANCE[torch.float16], variant


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("q_dtype", Q_DTYPES, ids=Q_IDS)
def test_padded_and_varlen_with_fp8_kv(dtype: torch.dtype, q_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 17, 4, 32, generator=gen).to(DEVICE, q_dtype)
    k32, v32 = (torch.randn(2, 17, 2, 32, generator=gen).to(DEVICE) for _ in range(2))
    k8, v8 = reference.quantize_kv(k32, 0.25, dtype), reference.quantize_kv(v32, 0.5, dtype)
    lens = torch.tensor([17, 6], device=DEVICE)
    tol = TOLERANCE[q_dtype]
    with warnings.catch_warnings(), poisoned_allocations():
        warnings.filterwarnings("error", message=".*reference path.*")
        o = sf.padded_prefill(q, k8, v8, lens, k_scale=0.25, v_scale=0.5)
    ref, _ = reference.padded_prefill(q.float(), reference.dequantize_kv(k8, 0.25),
                                      reference.dequantize_kv(v8, 0.5), lens)
    assert rel_err(o, ref) <= tol and o[1, 6:].eq(0).all()
    cu = torch.tensor([0, 17, 34], device=DEVICE)
    flat = [x.reshape(34, x.shape[2], 32) for x in (q, k8, v8)]
    per_head = torch.tensor([0.25, 0.25], device=DEVICE)
    with warnings.catch_warnings(), poisoned_allocations():
        warnings.filterwarnings("error", message=".*reference path.*")
        o = sf.varlen_prefill(*flat, cu, causal=True, k_scale=per_head, v_scale=0.5)
    ref, _ = reference.varlen_prefill(flat[0].float(), reference.dequantize_kv(flat[1], 0.25),
                                      reference.dequantize_kv(flat[2], 0.5), cu, causal=True)
    assert rel_err(o, ref) <= tol


def test_registry_sends_fp8_to_the_kernels_without_descriptors(monkeypatch) -> None:
    q = torch.zeros(1, 4, 64, device=DEVICE)  # CUDA, or the CPU with the interpreter
    cache = torch.zeros(4, 16, 2, 64, dtype=torch.float8_e4m3fn, device=DEVICE)
    problem = backends.paged_problem(q, cache, 1, 4, True)
    ok, reason = backends.get_backend("triton").supports(problem)
    assert ok, reason
    from spanfill.backends.triton_config import dense_kv_uses_tma

    monkeypatch.setenv("SPANFILL_TMA", "force")
    q16 = torch.zeros(64, 4, 128, dtype=torch.float16)
    kv16 = torch.zeros(64, 2, 128, dtype=torch.float16)
    assert dense_kv_uses_tma(q16, kv16, kv16, 1)
    kv8 = kv16.to(torch.float8_e4m3fn)
    assert not dense_kv_uses_tma(q16, kv8, kv8, 1)  # fp8 rows: plain loads, widened


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(k_scale=0.0), ValueError, r"k_scale must be a finite number > 0, got 0.0"),
    (dict(v_scale=float("nan")), ValueError, r"v_scale must be a finite number > 0, got nan"),
    (dict(k_scale="1"), TypeError, r"k_scale must be a real number or an fp32 tensor, got str"),
    (dict(k_scale=True), TypeError, r"k_scale must be a real number or an fp32 tensor, got bool"),
    (dict(k_scale=torch.tensor([1.0, 2.0, 3.0])), ValueError,
     r"k_scale must have shape \[\], \[1\] or \[Hk\]=\[2\], got \(3,\)"),
    (dict(k_scale=torch.tensor(1.0, dtype=torch.float64)), TypeError,
     r"k_scale must be float32, got torch.float64"),
    (dict(k_scale=torch.tensor([1.0, 2.0], device="meta")), ValueError,
     r"k_scale is on meta but the K/V are on"),
], ids=["zero", "nan", "string", "bool", "wrong-shape", "fp64-tensor", "other-device"])
def test_bad_fp8_arguments_leave_the_cache_unchanged(kwargs, error, pattern) -> None:
    layout, _, _, k_cache, v_cache, q, k_new, v_new = _fp8_span_case(torch.float8_e4m3fn, 1.0)
    if "k_scale" in kwargs and torch.is_tensor(kwargs["k_scale"]) \
            and kwargs["k_scale"].device.type != "meta":
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
