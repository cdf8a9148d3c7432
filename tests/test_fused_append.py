"""``span_prefill(..., k_new=, v_new=)``: append and attention in one launch.

Against the two-launch semantics (``append_kv`` then ``span_prefill``, on the reference):
the outputs, and the cache bit for bit. The cache's hole positions are poisoned (NaN)
before the call, so a program that read a new token's K/V from the cache instead of
from ``k_new`` (another program of the same launch may not have written it yet) would
show. Runs on the kernels: the interpreter on a CPU, the GPU where there is one.
"""

from __future__ import annotations

import pytest
import torch

import spanfill as sf
from spanfill import reference
from spanfill.testing import TOLERANCE, rel_err

from tests.conftest import tensor_digest
from tests.fuzzing import poisoned_allocations
from tests.helpers import paged_setup

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {
    # name: (lens, spans per request, page_size, Hq, Hk, D, variants)
    "two-requests": ([70, 33], [[(0, 1), (5, 40)], [(10, 33)]], 16, 4, 2, 64, {}),
    "many-spans-gqa4": ([300], [[(3, 9), (100, 180), (250, 251), (299, 300)]], 16, 8, 2, 64, {}),
    "window": ([300], [[(3, 9), (100, 180), (250, 251), (299, 300)]], 16, 4, 2, 64,
               dict(window_left=37)),
    "soft-cap-mqa": ([140, 20], [[(60, 61), (120, 140)], [(0, 20)]], 16, 4, 1, 32,
                     dict(logits_soft_cap=5.0)),
    "whole-prompt-page1": ([130], [[(0, 130)]], 1, 2, 2, 64, {}),
    "request-without-spans": ([50, 64, 40], [[(7, 9)], [], [(39, 40)]], 16, 4, 2, 64, {}),
    "single-row": ([257], [[(256, 257)]], 16, 4, 2, 64, {}),
}


def _poisoned_case(name: str, dtype: torch.dtype):
    lens, spans, page, hq, hk, d, variants = CASES[name]
    layout, k_cache, v_cache, q, k_new, v_new = paged_setup(lens, spans, page, hq, hk, d, dtype,
                                                            DEVICE)
    for cache in (k_cache, v_cache):  # the holes hold garbage until this launch fills them
        cache.view(-1, hk, d)[layout.slot_mapping] = float("nan")
    return layout, k_cache, v_cache, q, k_new, v_new, variants


def _two_launches(layout, k_cache, v_cache, q, k_new, v_new, variants, **scales):
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    sf.append_kv(k_new, v_new, k_ref, v_ref, layout, backend="reference", **scales)
    o, lse = sf.span_prefill(q, k_ref, v_ref, layout, return_lse=True, backend="reference",
                             **scales, **variants)
    return k_ref, v_ref, o, lse


@pytest.mark.parametrize("splits", [None, "1", "3"], ids=["policy", "split1", "split3"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_append_equals_append_then_attend(name: str, splits: str | None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    if splits:
        monkeypatch.setenv("SPANFILL_SPLITS", splits)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    layout, k_cache, v_cache, q, k_new, v_new, variants = _poisoned_case(name, dtype)
    k_ref, v_ref, ref_o, ref_lse = _two_launches(layout, k_cache, v_cache, q, k_new, v_new,
                                                 variants)
    with poisoned_allocations():
        o, lse = sf.span_prefill(q, k_cache, v_cache, layout, return_lse=True, backend="triton",
                                 k_new=k_new, v_new=v_new, **variants)
    # NaN compares unequal: the untouched poison of other positions is equal as bytes.
    assert tensor_digest(k_cache, v_cache) == tensor_digest(k_ref, v_ref)
    assert not o.isnan().any() and not lse.isnan().any()
    assert rel_err(o, ref_o) <= TOLERANCE[dtype] and rel_err(lse, ref_lse) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fused_append_half_precision(dtype: torch.dtype) -> None:
    layout, k_cache, v_cache, q, k_new, v_new, variants = _poisoned_case("many-spans-gqa4", dtype)
    k_ref, v_ref, ref_o, _ = _two_launches(layout, k_cache, v_cache, q, k_new, v_new, variants)
    o = sf.span_prefill(q, k_cache, v_cache, layout, backend="triton", k_new=k_new, v_new=v_new)
    assert tensor_digest(k_cache, v_cache) == tensor_digest(k_ref, v_ref)
    assert rel_err(o, ref_o) <= TOLERANCE[dtype]


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("splits", [None, "3"], ids=["policy", "split3"])
def test_fused_append_into_an_fp8_cache(fp8: torch.dtype, splits: str | None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The new K/V are quantized (bit for bit as append_kv) and attended as the cache
    will hold them, with per-KV-head scales."""
    if splits:
        monkeypatch.setenv("SPANFILL_SPLITS", splits)
    layout, k32, v32, q, k_new, v_new = paged_setup([70, 33], [[(0, 1), (5, 40)], [(10, 33)]],
                                                    16, 4, 2, 64, torch.float32, DEVICE)
    scales = dict(k_scale=torch.tensor([0.05, 0.09], device=DEVICE),
                  v_scale=torch.tensor([0.07, 0.04], device=DEVICE))
    k_cache = reference.quantize_kv(k32, scales["k_scale"], fp8)
    v_cache = reference.quantize_kv(v32, scales["v_scale"], fp8)
    k_cache.view(-1, 2, 64)[layout.slot_mapping] = float("nan")
    v_cache.view(-1, 2, 64)[layout.slot_mapping] = float("nan")
    k_ref, v_ref, ref_o, ref_lse = _two_launches(layout, k_cache, v_cache, q, k_new, v_new, {},
                                                 **scales)
    o, lse = sf.span_prefill(q, k_cache, v_cache, layout, return_lse=True, backend="triton",
                             k_new=k_new, v_new=v_new, **scales)
    assert tensor_digest(k_cache, v_cache) == tensor_digest(k_ref, v_ref)
    assert rel_err(o, ref_o) <= TOLERANCE[torch.float32]
    assert rel_err(lse, ref_lse) <= TOLERANCE[torch.float32]


def test_reference_path_appends_then_attends() -> None:
    layout, k_cache, v_cache, q, k_new, v_new, variants = _poisoned_case("two-requests",
                                                                         torch.float32)
    k_ref, v_ref, ref_o, _ = _two_launches(layout, k_cache, v_cache, q, k_new, v_new, variants)
    o = sf.span_prefill(q, k_cache, v_cache, layout, backend="reference", k_new=k_new,
                        v_new=v_new)
    assert tensor_digest(k_cache, v_cache) == tensor_digest(k_ref, v_ref)
    assert torch.equal(o, ref_o)


def test_hnd_pages_and_the_combined_pool() -> None:
    """The engines' layouts (no copies) take the fused append too."""
    layout, k_cache, v_cache, q, k_new, v_new, _ = _poisoned_case("two-requests", torch.float32)
    k_ref, v_ref, ref_o, _ = _two_launches(layout, k_cache, v_cache, q, k_new, v_new, {})
    hnd_k, hnd_v = (c.transpose(1, 2).contiguous() for c in (k_cache, v_cache))
    o = sf.span_prefill(q, hnd_k, hnd_v, layout, kv_layout="HND", backend="triton",
                        k_new=k_new, v_new=v_new)
    assert rel_err(o, ref_o) <= TOLERANCE[torch.float32]
    assert tensor_digest(hnd_k.transpose(1, 2)) == tensor_digest(k_ref)
    pool = torch.stack([k_cache, v_cache], dim=1)  # FlashInfer's [num_pages, 2, page, Hk, D]
    o = sf.span_prefill(q, pool, None, layout, backend="triton", k_new=k_new, v_new=v_new)
    assert rel_err(o, ref_o) <= TOLERANCE[torch.float32]
    assert tensor_digest(pool[:, 0], pool[:, 1]) == tensor_digest(k_ref, v_ref)


@pytest.mark.parametrize("case", ["k-without-v", "wrong-shape", "wrong-dtype", "wrong-device",
                                  "not-a-tensor", "bad-q"])
def test_bad_new_kv_is_refused_before_anything_is_written(case: str) -> None:
    layout, k_cache, v_cache, q, k_new, v_new, _ = _poisoned_case("two-requests", torch.float32)
    before = tensor_digest(k_cache, v_cache)
    kwargs = dict(k_new=k_new, v_new=v_new)
    if case == "k-without-v":
        kwargs = dict(k_new=k_new)
    elif case == "wrong-shape":
        kwargs["v_new"] = v_new[:-1]
    elif case == "wrong-dtype":
        kwargs["k_new"] = k_new.half()
    elif case == "wrong-device":
        kwargs["k_new"] = k_new.to("meta")
    elif case == "not-a-tensor":
        kwargs["v_new"] = v_new.tolist()
    else:
        q = q[:-1]
    with pytest.raises((ValueError, TypeError), match="k_new|v_new|q "):
        sf.span_prefill(q, k_cache, v_cache, layout, backend="triton", **kwargs)
    assert tensor_digest(k_cache, v_cache) == before


def test_fill_holes_launches_one_kernel_per_layer() -> None:
    """fill_holes writes and attends in one launch per layer; the two-launch path, still
    there with fused_append=False, gives the same logits and the same cache."""
    pytest.importorskip("transformers")
    from spanfill.demo import poison_holes
    from spanfill.integrations.holes import fill_holes, make_cache, prefill_cache
    from spanfill.testing import recorded_launches
    from tests.test_integrations_holes import tiny_model

    model = tiny_model("llama").to(DEVICE)
    ids = torch.randint(0, 256, (97,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    spans = [(3, 9), (50, 51), (90, 97)]
    results = {}
    for fused in (True, False):
        cache = make_cache(model, 97, page_size=16)
        prefill_cache(model, ids, cache)
        poison_holes(cache, 0, spans)
        with recorded_launches(attention_fwd=None, append_kv_launch=None) as launches:
            logits = fill_holes(model, ids, cache, spans, fused_append=fused)
        results[fused] = (logits, tensor_digest(cache.k_cache, cache.v_cache),
                          {k: len(v) for k, v in launches.items()})
    layers = model.config.num_hidden_layers
    assert results[True][2] == {"attention_fwd": layers, "append_kv_launch": 0}
    assert results[False][2] == {"attention_fwd": layers, "append_kv_launch": layers}
    assert (results[True][0] - results[False][0]).abs().max().item() <= 1e-4
    assert results[True][1] == results[False][1]
