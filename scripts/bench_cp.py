"""Context-parallel segmented prefill vs one GPU: a long prompt with a few holes.

One request of ``--seq-len`` tokens (default 256k) with ``--hole-frac`` of them (1%)
missing, in random spans of 1..``--max-span`` tokens; Llama-3-8B-shaped attention
(32 q heads, 8 kv heads, head dim 128, bf16, pages of 16). Each rank holds one
contiguous range of positions:

* ``equal``: ``seq_len / R`` positions each (the memory split);
* ``work``: causal work balanced, rank ``r`` starting at ``n (1 - sqrt(1 - r/R))``.

Times (slowest rank, CUDA events, p50/p20/p80 over ``--reps``): append + attention
on GPU 0 alone over the whole cache, and :func:`spanfill.distributed.span_prefill_cp`
(append + partial attention + merge) with each merge method. Rank 0 writes
``bench/results/cp_<gpu>_<date>.csv`` (bench/report.py columns) with a
``check_relerr`` row per method against the one-GPU output.

    torchrun --standalone --nproc-per-node 2 scripts/bench_cp.py [--seq-len 262144]
        [--hole-frac 0.01] [--reps 10] [--splits equal,work] [--methods allgather,reduce_scatter]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import random
import sys
from pathlib import Path

# A machine rule for these hosts: NVLink multicast (NVLS) stays off.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import RESULTS, quantiles, write_rows  # noqa: E402

import spanfill as sf  # noqa: E402
from spanfill.distributed import shard_layout, span_prefill_cp  # noqa: E402
from spanfill.testing import rel_err  # noqa: E402

HQ, HK, D, PAGE = 32, 8, 128, 16


def hole_spans(n: int, frac: float, max_span: int, seed: int) -> list[tuple[int, int]]:
    """Random disjoint spans of 1..max_span tokens covering about ``frac`` of ``[0, n)``."""
    rng = random.Random(seed)
    want, spans, pos = int(frac * n), [], 0
    mean_len = (1 + max_span) / 2
    # Gaps 10% shorter than an even spread, so the holes are all placed before the end.
    gap = max(1, int(0.9 * (n - want) / max(1.0, want / mean_len)))
    while want > 0:
        pos += rng.randint(1, 2 * gap)
        length = min(rng.randint(1, max_span), want, n - pos)
        if length <= 0:
            break
        spans.append((pos, pos + length))
        pos += length
        want -= length
    return spans


def cuts(n: int, world: int, split: str) -> list[int]:
    """Range boundaries ``c_0 = 0 < ... < c_R = n``, page aligned."""
    if split == "equal":
        raw = [n * r / world for r in range(world + 1)]
    else:  # keys [0, c) carry a share 2c/n - (c/n)^2 of the causal work of uniform holes
        raw = [n * (1 - math.sqrt(1 - r / world)) for r in range(world + 1)]
    return [min(n, int(round(c / PAGE)) * PAGE) for c in raw[:-1]] + [n]


def timed(fn, reps: int, warmup: int) -> list[float]:
    """Milliseconds per call of the slowest rank (an all-reduce max per rep)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        ms = torch.tensor([start.elapsed_time(end)], device="cuda")
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        out.append(float(ms))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=262144)
    ap.add_argument("--hole-frac", type=float, default=0.01)
    ap.add_argument("--max-span", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--splits", default="equal,work")
    ap.add_argument("--methods", default="allgather,reduce_scatter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    dev, dtype, n = torch.device("cuda"), torch.bfloat16, args.seq_len
    n_pages = -(-n // PAGE)

    spans = hole_spans(n, args.hole_frac, args.max_span, args.seed)
    full_table = torch.arange(n_pages, dtype=torch.int32, device=dev)[None]
    layout = sf.SpanLayout.build([spans], [n], full_table, PAGE)
    t = layout.num_tokens
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=dev, dtype=dtype)  # noqa: E731
    q, k_new, v_new = rnd(t, HQ, D), rnd(t, HK, D), rnd(t, HK, D)
    # Every rank draws the whole cache with the same generator, then keeps its pages.
    k_full, v_full = rnd(n_pages, PAGE, HK, D), rnd(n_pages, PAGE, HK, D)
    workload = f"cp:{n // 1024}k-{args.hole_frac:g}holes"
    shape_note = f"T={t} spans={len(spans)} Hq={HQ} Hk={HK} D={D} page={PAGE} bf16 ranks={world}"
    rows: list[dict] = []

    def row(provider: str, metric: str, unit: str, values: list[float], note: str = "") -> None:
        rows.append(dict(kernel="span_prefill_cp", provider=provider, workload=workload, x=n,
                         metric=metric, unit=unit, note=f"{shape_note} {note}".strip(),
                         **quantiles(values)))

    ref_o = None
    if rank == 0:
        k_one, v_one = k_full.clone(), v_full.clone()

        def one_gpu():
            sf.append_kv(k_new, v_new, k_one, v_one, layout)
            return sf.span_prefill(q, k_one, v_one, layout)

        ref_o = one_gpu()
        dist.barrier()  # the other ranks wait in their first barrier of timed()
        times = []
        for _ in range(args.warmup + args.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            one_gpu()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        row("1gpu", "time", "ms", times[args.warmup:])
        del k_one, v_one
    else:
        dist.barrier()
    dist.barrier()

    for split in args.splits.split(","):
        c = cuts(n, world, split)
        lo, hi = c[rank], c[rank + 1]
        first, stop = lo // PAGE, -(-hi // PAGE)
        table = torch.full((1, n_pages), -1, dtype=torch.int32, device=dev)
        table[0, first:stop] = torch.arange(stop - first, dtype=torch.int32, device=dev)
        k_cache, v_cache = k_full[first:stop].clone(), v_full[first:stop].clone()
        kv = lambda x: torch.tensor([x], dtype=torch.int32, device=dev)  # noqa: E731
        shard = shard_layout(layout.positions, layout.query_start_loc, layout.seq_lens, table,
                             PAGE, kv(lo), kv(hi))
        for method in args.methods.split(","):
            provider = f"cp{world}-{method}-{split}"
            run = lambda: span_prefill_cp(q, k_new, v_new, k_cache, v_cache, shard,  # noqa: E731
                                          method=method)
            try:
                o = run()
                times = timed(run, args.reps, args.warmup)
            except torch.cuda.OutOfMemoryError as exc:
                row(provider, "error", "", [float("nan")], f"OOM: {str(exc)[:80]}")
                continue
            row(provider, "time", "ms", times, f"rank0 holds [{c[0]}, {c[1]})")
            if rank == 0:
                err = rel_err(o, ref_o)
                row(provider, "check_relerr", "", [err], "PASS" if err <= 1e-2 else "FAIL")
        del k_cache, v_cache

    if rank == 0:
        gpu = torch.cuda.get_device_name().lower().replace(" ", "-")
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = write_rows(args.out or RESULTS / f"cp_{gpu}_{stamp}.csv", rows)
        for r in rows:
            print(f"{r['provider']:32s} {r['metric']:13s} p50={r['p50']:.4g} {r['unit']} {r['note']}")
        print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
