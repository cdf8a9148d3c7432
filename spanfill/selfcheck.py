"""Small end-to-end runs of every op against :mod:`spanfill.reference`.

Used by ``spanfill demo --basic`` (prints what it computed, on whatever path the
ops take here) and ``spanfill check`` (the Triton kernels on the current device, or
in Triton's interpreter on a CPU). Each check compares the public op with the
reference computed in fp32 from an independent dense copy of the inputs.
"""

from __future__ import annotations

import torch

from . import reference
from .backends import interpreting
from .cache import PagedKVCache
from .layout import SpanLayout
from .ops import append_kv, padded_prefill, resolve_backend, span_prefill, varlen_prefill
from .testing import TOLERANCE, rel_err


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def kernel_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """The dtypes ``spanfill check`` runs the kernels in on ``device``.

    No bf16 in Triton's interpreter (any CPU run): there the kernels widen bf16 tiles
    to fp32 for their dots (its bf16 ``tl.dot`` is wrong), which the fp32 check covers.
    """
    if device.type == "cuda" and not interpreting():
        return torch.float16, torch.bfloat16
    return torch.float32, torch.float16


def _padded_case(device: torch.device, dtype: torch.dtype, causal: bool, side: str,
                 seed: int = 0, backend: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, ref, valid_lens) for a small padded batch."""
    gen = torch.Generator().manual_seed(seed)
    b_sz, seq, hq, hk, d = 4, 13, 4, 2, 32
    q, k, v = (torch.randn(b_sz, seq, h, d, generator=gen).to(device, dtype) for h in (hq, hk, hk))
    valid = torch.tensor([13, 7, 1, 0], dtype=torch.int32, device=device)
    out = padded_prefill(q, k, v, valid, causal=causal, padding_side=side, backend=backend)
    ref, _ = reference.padded_prefill(q, k, v, valid, causal=causal, padding_side=side)
    return out, ref, valid


def _varlen_case(device: torch.device, dtype: torch.dtype,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 5, 5, 22, 23], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(23, h, 64, generator=gen).to(device, dtype) for h in (8, 1, 1))
    out = varlen_prefill(q, k, v, cu, causal=True, backend=backend)
    ref, _ = reference.varlen_prefill(q, k, v, cu, causal=True)
    return out, ref


def span_case(device: torch.device, dtype: torch.dtype, causal: bool = True,
              backend: str | None = None) -> dict:
    """Two requests over a paged cache with holes: fill them, attend, compare.

    Returns a dict with the spans, the output, the reference output (from dense K/V
    that already hold the holes' new values) and whether the cache rows match.
    """
    gen = torch.Generator().manual_seed(2)
    hq, hk, d, page = 4, 2, 32, 4
    seq_lens = [19, 11]
    spans = [[(0, 3), (9, 10), (15, 19)], [(4, 8)]]
    cache = PagedKVCache(num_pages=16, page_size=page, num_kv_heads=hk, head_dim=d,
                         dtype=dtype, device=device)
    # Interleave the two requests' pages so the block table is not the identity.
    cache.allocate("a", 4)
    cache.allocate("b", 4)
    cache.grow("a", seq_lens[0])
    cache.grow("b", seq_lens[1])
    table = cache.block_table(["a", "b"])
    dense_k = [torch.randn(n, hk, d, generator=gen).to(device, dtype) for n in seq_lens]
    dense_v = [torch.randn(n, hk, d, generator=gen).to(device, dtype) for n in seq_lens]
    for name, kk, vv in zip(("a", "b"), dense_k, dense_v):
        slots = cache.slot_mapping(name, torch.arange(kk.shape[0]))
        cache.k_cache.view(-1, hk, d)[slots] = kk
        cache.v_cache.view(-1, hk, d)[slots] = vv
    layout = SpanLayout.build(spans, seq_lens, table, page)
    num_new = layout.num_tokens
    k_new, v_new = (torch.randn(num_new, hk, d, generator=gen).to(device, dtype) for _ in range(2))
    q = torch.randn(num_new, hq, d, generator=gen).to(device, dtype)
    # Poison the hole slots: a kernel reading stale rows would show up as NaN.
    cache.k_cache.view(-1, hk, d)[layout.slot_mapping] = float("nan")
    cache.v_cache.view(-1, hk, d)[layout.slot_mapping] = float("nan")
    append_kv(k_new, v_new, cache.k_cache, cache.v_cache, layout, backend=backend)
    out = span_prefill(q, cache.k_cache, cache.v_cache, layout, causal=causal, backend=backend)

    ref = torch.empty(num_new, hq, d, dtype=torch.float32, device=device)
    bounds = layout.query_start_loc.tolist()
    cache_ok = True
    for b in range(2):
        rows = slice(bounds[b], bounds[b + 1])
        pos = layout.positions[rows].long()
        kk, vv = dense_k[b].clone(), dense_v[b].clone()
        kk[pos], vv[pos] = k_new[rows], v_new[rows]
        ref[rows], _ = reference.attend(q[rows], kk, vv, pos, causal, d ** -0.5)
        slots = cache.slot_mapping("ab"[b], torch.arange(seq_lens[b]))
        cache_ok &= bool(torch.equal(cache.k_cache.view(-1, hk, d)[slots], kk))
        cache_ok &= bool(torch.equal(cache.v_cache.view(-1, hk, d)[slots], vv))
    return {"spans": spans, "seq_lens": seq_lens, "out": out, "ref": ref, "cache_ok": cache_ok,
            "num_tokens": num_new}


Result = tuple[str, bool, str, torch.dtype]  # name, passed, detail, input dtype


def _compared(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> Result:
    err, tol = rel_err(out, ref), TOLERANCE[dtype]
    ok = err <= tol
    return name, ok, f"rel err {err:.2e} (tol {tol:g})", dtype


def run_checks(device: torch.device, dtypes: tuple[torch.dtype, ...], backend: str | None = None,
               verbose: bool = False) -> int:
    """Run every op once per dtype against the reference; returns the number of failures.

    Parameters
    ----------
    device : where the inputs live
    dtypes : input dtypes, e.g. :func:`kernel_dtypes`
    backend : passed to every op ("auto" | "triton" | "reference", None: the ops'
        default); each printed line names the path it resolved to. With "triton",
        CPU tensors without the interpreter raise instead of running the reference.
    verbose : print one line per check
    """
    path = resolve_backend(device, backend)
    results: list[Result] = []
    for dtype in dtypes:
        for causal in (False, True):
            for side in ("right", "left"):
                out, ref, _ = _padded_case(device, dtype, causal, side, backend=backend)
                results.append(_compared(f"padded_prefill causal={causal} {side}", out, ref, dtype))
        out, ref = _varlen_case(device, dtype, backend)
        results.append(_compared("varlen_prefill causal GQA 8:1 D=64", out, ref, dtype))
        for causal in (True, False):
            case = span_case(device, dtype, causal, backend)
            results.append(_compared(f"span_prefill causal={causal}", case["out"], case["ref"], dtype))
        results.append(("append_kv (cache rows == dense K/V)", case["cache_ok"], "bit-exact", dtype))
    if verbose:
        for name, ok, detail, dtype in results:
            dtype_name = str(dtype).removeprefix("torch.")
            print(f"  [{'ok' if ok else 'FAIL'}] {name:<37} {dtype_name:<8} {path:<9} {detail}")
    return sum(not ok for _, ok, _, _ in results)


def basic_demo(device: torch.device) -> bool:
    """Print a small example of both jobs on ``device``; True when both match."""
    from .op_path import path_name

    dtype = _dtype(device)
    tol = TOLERANCE[dtype]
    print(f"== spanfill basic demo on {device} ({dtype}), ops take the {path_name(device)} path")
    out, ref, valid = _padded_case(device, dtype, causal=False, side="right")
    err = rel_err(out, ref)
    pad_zero = all(bool((out[b, int(n):] == 0).all()) for b, n in enumerate(valid.tolist()))
    ok1 = err <= tol and pad_zero
    print("1) padded_prefill: batch of 4 right-padded sequences, S=13, Hq=4, Hk=2, D=32")
    print(f"   valid_lens {valid.tolist()}; work ~ sum(n^2) = {sum(n * n for n in valid.tolist())}"
          f" score entries instead of B*S^2 = {4 * 13 * 13}")
    print(f"   padded rows exactly 0: {pad_zero}; rel err vs reference {err:.2e} -> "
          f"{'MATCH' if ok1 else 'MISMATCH'}")
    case = span_case(device, dtype)
    err = rel_err(case["out"], case["ref"])
    ok2 = err <= tol and case["cache_ok"]
    print("2) segmented prefill over a paged cache with holes (page_size 4)")
    for b, (n, sp) in enumerate(zip(case["seq_lens"], case["spans"])):
        picture = "".join("#" if any(s <= p < e for s, e in sp) else "." for p in range(n))
        print(f"   request {b}: {picture}  holes {sp}")
    print(f"   {case['num_tokens']} hole tokens: append_kv wrote their K/V "
          f"({'cache rows correct' if case['cache_ok'] else 'CACHE WRONG'}), span_prefill in one "
          f"launch: rel err vs reference {err:.2e} -> {'MATCH' if ok2 else 'MISMATCH'}")
    return ok1 and ok2
