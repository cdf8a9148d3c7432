"""What the page table costs the Gluon kernel: one span over a whole prompt, paged and dense.

    PYTHONPATH=. python3 scripts/ab_paging.py [--rounds R] [--out DIR]

Issue 16 measures ``whole_8k`` (one span over an 8,192-token prompt, GQA 32/8, D=128,
bf16, pages of 16 rows shuffled in the pool) against FlashAttention-4's *dense* causal
rate. This times, on an sm_90 GPU, interleaved over ``R`` rounds (median of the rounds'
p50, the range of the rounds):

- ``span_pageN``: ``sf.span_prefill`` (the registry's choice) on that layout over pages
  of N rows (16: the bench's; 64; 128: one TMA box per 128-row KV tile; 256), the pages
  shuffled as ``bench/`` shuffles them;
- ``varlen_dense``: ``sf.varlen_prefill(..., causal=True, backend="gluon")`` on the same
  q with dense K/V of the same shapes: the Gluon kernel without a page table;
- ``varlen_dense_portable``: the same through the portable kernel (``backend="triton"``).

Every output is checked against the bench's reference first. Writes
``DIR/ab_paging.csv`` (the bench's columns) and ``DIR/ab_paging.png``, and prints a
table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import spanfill as sf  # noqa: E402
from _results import new_figure, save_figure, write_rows  # noqa: E402
from bench.check import segmented_checker, tolerance  # noqa: E402
from bench.timing import median_of_rounds, time_interleaved  # noqa: E402
from bench.workloads import core_workloads  # noqa: E402
from spanfill import reference  # noqa: E402
from spanfill.testing import rel_err  # noqa: E402

PAGE_SIZES = (16, 64, 128, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit("needs a Hopper (sm_90) GPU")
    device = torch.device("cuda")
    base = next(w for w in core_workloads() if w.name == "whole_8k")
    cases, checks = {}, {}
    for page in PAGE_SIZES:
        w = dataclasses.replace(base, name=f"span_page{page}", page_size=page)
        t = w.make(device, torch.bfloat16)
        check = segmented_checker(w, t)
        # (bound now: the loop variable is rebound next round)
        run = (lambda t=t: sf.span_prefill(t.q, t.k_cache, t.v_cache, t.layout))
        cases[w.name] = run
        checks[w.name] = lambda run=run, check=check: check(run())
    # Dense K/V of the same shapes: one causal sequence, no page table.
    gen = torch.Generator(device="cpu").manual_seed(base.seed)
    n, hq, hk, d = base.seq_lens[0], base.num_q_heads, base.num_kv_heads, base.head_dim
    q, k, v = (torch.randn(n, h, d, generator=gen).to(device, torch.bfloat16)
               for h in (hq, hk, hk))
    cu = torch.tensor([0, n], device=device, dtype=torch.int32)
    layout = sf.VarlenLayout.build(cu, n)
    ref, _ = reference.varlen_prefill(q.float(), k.float(), v.float(), cu, causal=True)
    for name, backend in (("varlen_dense", "gluon"), ("varlen_dense_portable", "triton")):
        run = (lambda backend=backend: sf.varlen_prefill(q, k, v, layout, causal=True,
                                                         backend=backend))
        cases[name] = run
        checks[name] = lambda run=run: rel_err(run().float(), ref)
    tol = tolerance(torch.bfloat16)
    for name in list(cases):
        err = checks[name]()
        print(f"{name:24s} rel err {err:.1e}", flush=True)
        if not err <= tol:
            print(f"{name}: FAILED check ({err:.2e} > {tol:.0e}); not timed")
            del cases[name]
    per_round = time_interleaved(cases, device, args.rounds)
    flops = 4.0 * hq * d * n * (n + 1) / 2  # causal: QK^T and PV over the lower triangle
    rows, table = [], []
    for name, stats in per_round.items():
        st = median_of_rounds(stats)
        p50s = [s.p50 for s in stats]
        rows.append({"kernel": "span_prefill" if name.startswith("span") else "varlen_prefill",
                     "provider": "spanfill", "workload": f"whole_8k_{name}",
                     "metric": "kernel_time", "unit": "ms", "p50": st.p50, "p20": st.p20,
                     "p80": st.p80, "tflops": flops / st.p50 / 1e9,
                     "note": f"median of {args.rounds} interleaved rounds; p50 per round "
                             + " ".join(f"{x:.4f}" for x in p50s)})
        table.append(f"| {name} | {st.p50:.3f} [{min(p50s):.3f}-{max(p50s):.3f}] | "
                     f"{flops / st.p50 / 1e9:.0f} |")
    out = Path(args.out)
    print("wrote", write_rows(out / "ab_paging.csv", rows), plot(rows, out / "ab_paging.png"))
    print("\n| case | ms [rounds] | TFLOP/s |\n|---|---|---|")
    print("\n".join(table))


def plot(rows: list[dict], path: Path) -> Path:
    """Kernel time of each case (bars) with the range of its rounds' p50 (whiskers)."""
    names = [r["workload"].removeprefix("whole_8k_") for r in rows]
    p50 = [float(r["p50"]) for r in rows]
    spans = [[float(x) for x in r["note"].split("p50 per round ")[1].split()] for r in rows]
    err = [[p - min(s) for p, s in zip(p50, spans)], [max(s) - p for p, s in zip(p50, spans)]]
    fig, ax = new_figure(6, 3.5)
    ax.bar(range(len(rows)), p50, yerr=err, capsize=3)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ms (median of rounds)")
    ax.set_title("whole_8k: paged (page rows) against dense K/V", fontsize=9)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
