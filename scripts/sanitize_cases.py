"""Small CUDA cases for compute-sanitizer: every kernel variant once, checked against
the reference (run by scripts/sanitize.sh; the sanitizer makes each launch slow).

    python3 scripts/sanitize_cases.py             # all ops, small sizes; exit 1 on a mismatch
    python3 scripts/sanitize_cases.py --planted   # deliberately out of bounds (memcheck must object)
    python3 scripts/sanitize_cases.py --split-t1  # one query row over long KV: the split-KV path

``--planted`` calls the kernel launchers directly, bypassing the public checks:
append_kv with a slot past the end of the pool, and attention with a block table
entry past the last page. It is there to show that memcheck catches such a bug.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

import spanfill as sf
from spanfill import reference
from spanfill.testing import TOLERANCE, reference_span, rel_err

CASES_PAGED = [  # (dtype, head_dim, hq, hk, page_size)
    (torch.float16, 64, 4, 1, 16),
    (torch.bfloat16, 128, 8, 2, 5),
    (torch.float32, 80, 2, 2, 1),
    (torch.float16, 256, 4, 4, 64),
]


def span_case(dtype: torch.dtype, d: int, hq: int, hk: int, page_size: int, causal: bool) -> float:
    gen = torch.Generator().manual_seed(d + page_size)
    seq_lens = [70, 1, 33, 0]
    spans = [[(0, 1), (5, 40), (69, 70)], [(0, 1)], [(10, 12), (12, 33)], []]
    pages = [(n + page_size - 1) // page_size for n in seq_lens]
    # The pool is exactly as large as the pages in use: any read past a request's
    # pages would leave the allocation, which is what memcheck watches.
    num_pages = sum(pages)
    perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
    table = torch.full((4, max(pages)), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[used:used + n]
        used += n
    layout = sf.SpanLayout.build(spans, seq_lens, table.cuda(), page_size)
    rnd = lambda *s: torch.randn(*s, generator=gen).to("cuda", dtype)  # noqa: E731
    t = layout.num_tokens
    k_cache, v_cache = rnd(num_pages, page_size, hk, d), rnd(num_pages, page_size, hk, d)
    q, k_new, v_new = rnd(t, hq, d), rnd(t, hk, d), rnd(t, hk, d)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    sf.append_kv(k_new, v_new, k_cache, v_cache, layout)
    reference.append_kv(k_new, v_new, ref_k, ref_v, layout.slot_mapping)
    if not (torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)):
        return math.inf
    o = sf.span_prefill(q, k_cache, v_cache, layout, causal=causal, return_lse=True)[0]
    o_ref, _ = reference_span(q, ref_k, ref_v, layout, causal, 1 / math.sqrt(d))
    return rel_err(o, o_ref)


def dense_case(dtype: torch.dtype, d: int, hq: int, hk: int, causal: bool, side: str) -> float:
    gen = torch.Generator().manual_seed(d)
    rnd = lambda *s: torch.randn(*s, generator=gen).to("cuda", dtype)  # noqa: E731
    b, s = 3, 77
    q, k, v = rnd(b, s, hq, d), rnd(b, s, hk, d), rnd(b, s, hk, d)
    lens = torch.tensor([77, 0, 30], device="cuda")
    o = sf.padded_prefill(q, k, v, lens, causal=causal, padding_side=side)
    o_ref, _ = reference.padded_prefill(q, k, v, lens, causal, side)
    err = rel_err(o, o_ref)
    cu = torch.tensor([0, 50, 51, 231], device="cuda")
    o = sf.varlen_prefill(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, causal=causal)
    o_ref, _ = reference.varlen_prefill(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, causal)
    return max(err, rel_err(o, o_ref))


def planted() -> None:
    """Out-of-bounds launches that the public API would reject."""
    from spanfill.backends.triton_config import launch_config, pick_config
    from spanfill.kernels import append_kv_launch, attention_fwd

    page_size, hk, d, num_pages = 16, 2, 64, 4
    k_cache = torch.zeros(num_pages, page_size, hk, d, dtype=torch.float16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    k_new = torch.ones(2, hk, d, dtype=torch.float16, device="cuda")
    # Slot num_pages * page_size + 5: five rows past the end of the pool.
    slots = torch.tensor([3, num_pages * page_size + 5], dtype=torch.int64, device="cuda")
    append_kv_launch(k_new, k_new, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    print("planted append_kv: wrote slot", int(slots[1]), "of a pool of", num_pages * page_size)

    # Attention reading page num_pages + 3 (past the pool) for request 0.
    table = torch.tensor([[0, num_pages + 3]], dtype=torch.int32, device="cuda")
    layout = sf.SpanLayout.from_tensors(
        torch.tensor([20], device="cuda"), torch.tensor([0, 1], device="cuda"),
        torch.tensor([32], device="cuda"), table, page_size, validate=False)
    q = torch.ones(1, hk, d, dtype=torch.float16, device="cuda")
    cfg = pick_config(d, q.dtype, 1, True)
    out = torch.empty_like(q)
    attention_fwd(q, k_cache, v_cache, out, None, layout.tile_plan(cfg.block_q, False),
                  launch_config(cfg, q.dtype, d), 1 / math.sqrt(d), False, positions=layout.positions, block_table=layout.block_table)
    torch.cuda.synchronize()
    print("planted attention: read page", num_pages + 3, "of a pool of", num_pages)


def split_t1_case(dtype: torch.dtype, d: int, hq: int, hk: int, seq_len: int, pos: int,
                  splits: str | None) -> float:
    """One span token at ``pos`` of a ``seq_len`` prompt (T=1: Triton makes the row count
    a compile-time 1), with ``splits`` forced through SPANFILL_SPLITS or, for None, the
    count the policy picks. Returns the relative error against the reference."""
    from spanfill.backends.triton_config import pick_config, pick_num_splits

    page_size = 16
    gen = torch.Generator().manual_seed(seq_len + pos)
    pages = -(-seq_len // page_size)
    num_pages = pages  # exactly the pages in use: a read past them leaves the allocation
    table = torch.randperm(num_pages, generator=gen).to(torch.int32)[None, :].cuda()
    layout = sf.SpanLayout.build([[(pos, pos + 1)]], [seq_len], table, page_size)
    rnd = lambda *s: torch.randn(*s, generator=gen).to("cuda", dtype)  # noqa: E731
    k_cache, v_cache = rnd(num_pages, page_size, hk, d), rnd(num_pages, page_size, hk, d)
    q = rnd(1, hq, d)
    if splits is None:
        os.environ.pop("SPANFILL_SPLITS", None)
        cfg = pick_config(d, dtype, hq // hk, True)
        chosen = pick_num_splits(hq // cfg.heads, table.shape[1] * page_size, cfg, q.device)
        assert chosen > 1, f"the policy did not split (T=1, {seq_len} KV): {chosen}"
    else:
        os.environ["SPANFILL_SPLITS"] = splits
    try:
        o, lse = sf.span_prefill(q, k_cache, v_cache, layout, return_lse=True)
    finally:
        os.environ.pop("SPANFILL_SPLITS", None)
    torch.cuda.synchronize()
    o_ref, _ = reference_span(q, k_cache, v_cache, layout, True, 1 / math.sqrt(d))
    return rel_err(o, o_ref)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--planted", action="store_true", help="run the out-of-bounds cases")
    parser.add_argument("--split-t1", action="store_true",
                        help="only one-row launches over long KV (the split-KV path)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_cases.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.planted:
        planted()
        return 0
    results = []  # one bool per case: matched the reference

    def report(label: str, dtype: torch.dtype, err: float) -> None:
        ok = err <= TOLERANCE[dtype]
        results.append(ok)
        print(f"{label} relerr={err:.2e} {'ok' if ok else 'FAIL'}")

    if args.split_t1:
        for dtype, d, hq, hk, seq_len, pos, splits in (
                (torch.bfloat16, 128, 32, 8, 8192, 8191, None),
                (torch.float16, 64, 8, 1, 4096, 4095, None),
                (torch.bfloat16, 128, 32, 8, 1024, 700, "3"),
                (torch.float16, 256, 4, 4, 2048, 2047, "7")):
            report(f"split T=1 {str(dtype):15} D={d:3} Hq={hq} Hk={hk} KV={seq_len:5} "
                   f"pos={pos} splits={splits or 'policy'}", dtype,
                   split_t1_case(dtype, d, hq, hk, seq_len, pos, splits))
        bad = results.count(False)
        print(f"{len(results) - bad}/{len(results)} cases match the reference")
        return 1 if bad else 0
    for dtype, d, hq, hk, page_size in CASES_PAGED:
        for causal in (True, False):
            report(f"span   {str(dtype):15} D={d:3} Hq={hq} Hk={hk} P={page_size:2} "
                   f"causal={causal!s:5}", dtype, span_case(dtype, d, hq, hk, page_size, causal))
    for dtype, d, hq, hk, _ in CASES_PAGED[:3]:
        for causal, side in ((True, "right"), (False, "left")):
            report(f"dense  {str(dtype):15} D={d:3} Hq={hq} Hk={hk} {side:5} causal={causal!s:5}",
                   dtype, dense_case(dtype, d, hq, hk, causal, side))
    bad = results.count(False)
    print(f"{len(results) - bad}/{len(results)} cases match the reference")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
