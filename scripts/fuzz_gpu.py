"""Fuzz every public op on CUDA against spanfill.reference, at larger sizes.

    PYTHONPATH=. python3 scripts/fuzz_gpu.py --examples 5000
    PYTHONPATH=. python3 scripts/fuzz_gpu.py --examples 5000 --ops padded_gluon,varlen_gluon,span_gluon

The same properties as tests/test_fuzz.py (cases and checks from tests/fuzzing.py):
output rows poisoned with NaN, lse, the KV cache bit-for-bit against the
reference append, slots outside the written ones unchanged, NaN/inf in every
slot no request may read. Failures do not stop the run: each is printed with its
full case (enough to replay it), and the exit status is 1 if any was found.

Most of the time is Triton compiling kernel variants (a few seconds each, on one
CPU core), so the examples are shared out to ``--workers`` processes on the one
GPU, each drawing its own stream of cases (hypothesis seed = worker index, or
``--seed * 1000 +`` index); they share Triton's on-disk cache. ``--workers 1``
draws the one derandomized stream of earlier runs.

The log ends with how many span examples covered each edge case (T=1, split-KV
launches, page sizes 1 and 256, whole-prompt spans, requests with no span, ...),
counted from what each check returns.

A smoke run of this script without a GPU (the same GPU-sized cases, in Triton's
interpreter; slow, so few examples):

    TRITON_INTERPRET=1 PYTHONPATH=. python3 scripts/fuzz_gpu.py --device cpu --examples 40
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import traceback
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzzing import (  # noqa: E402
    GLUON_SIZES,
    GPU_SIZES,
    check_padded_case,
    check_span_case,
    check_varlen_case,
    padded_cases,
    span_cases,
    varlen_cases,
)

# Coverage lines of the summary: a check's tag, and what it means.
COVERAGE = {
    "T=1": "T=1 (one span token in the batch)",
    "split": "split-KV launch",
    "forced-splits": "forced split count (SPANFILL_SPLITS)",
    "few_rows": "1-8 span tokens over long prompts",
    "page1": "page_size 1",
    "page256": "page_size 256",
    "whole-prompt": "whole-prompt span (0, seq_len)",
    "no-span-request": "a request with no span",
}

# Share of the examples per op: span cases exercise append_kv and span_prefill.
def _gluon_covers(case) -> bool:
    """The cases the Gluon (Hopper) backend takes: fp16/bf16, D 64, 128 or 256 (and for
    span cases, pages of up to 256 rows, a power of two)."""
    pages = getattr(case, "page_size", 16)
    return (case.dtype in (torch.float16, torch.bfloat16) and case.head_dim in (64, 128, 256)
            and pages <= 256 and pages & (pages - 1) == 0)


OPS: dict[str, tuple[float, Callable[[], st.SearchStrategy], Callable]] = {
    "span": (0.5, lambda: span_cases(GPU_SIZES), check_span_case),
    "padded": (0.25, lambda: padded_cases(GPU_SIZES), check_padded_case),
    "varlen": (0.25, lambda: varlen_cases(GPU_SIZES), check_varlen_case),
    # The Hopper family through the registry (backend="gluon"), on the cases it covers.
    "padded_gluon": (0.0, lambda: padded_cases(GLUON_SIZES).filter(_gluon_covers),
                     lambda c, device: check_padded_case(c, device, backend="gluon")),
    "varlen_gluon": (0.0, lambda: varlen_cases(GLUON_SIZES).filter(_gluon_covers),
                     lambda c, device: check_varlen_case(c, device, backend="gluon")),
    "span_gluon": (0.0, lambda: span_cases(GLUON_SIZES).filter(_gluon_covers),
                   lambda c, device: check_span_case(c, device, backend="gluon")),
}


def fuzz_op(name: str, examples: int, strategy: st.SearchStrategy, check: Callable,
            seed: int | None, device: str, failures: list[tuple[str, str, str]],
            tags: Counter[str]) -> int:
    """Run ``check`` on ``examples`` drawn cases; record failures instead of raising,
    and count the tags of the cases that passed (a check may return a set of them).

    ``seed`` None draws the derandomized stream."""
    ran = 0
    start = time.perf_counter()

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(case) -> None:
        nonlocal ran
        ran += 1
        try:
            tags.update(check(case, device) or ())
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the run goes on
            failures.append((name, repr(case),
                             f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))
        if ran % 500 == 0:
            print(f"  {name}: {ran} examples, {time.perf_counter() - start:.0f} s", flush=True)

    if seed is not None:
        prop = hypothesis_seed(seed)(prop)
    prop()
    return ran


def examples_per_op(total: int, names: list[str]) -> dict[str, int]:
    """``total`` examples shared out by the ops' weights, at least one each."""
    # Ops of weight 0 (the Gluon ones, asked for by name) share as equals.
    weights = {n: OPS[n][0] or 0.25 for n in names}
    weight = sum(weights.values())
    return {n: max(1, round(total * weights[n] / weight)) for n in names}


def run_worker(index: int, workers: int, per_op: dict[str, int], seed: int | None,
               device: str) -> dict:
    """Worker ``index`` of ``workers``: its share of each op's examples.

    Returns a picklable report: examples run and seconds per op, tag counts, and
    failures as ``(op, repr(case), error)``.
    """
    if workers > 1:
        seed = (seed or 0) * 1000 + index
    label = f"[worker {index}] " if workers > 1 else ""
    failures: list[tuple[str, str, str]] = []
    tags: Counter[str] = Counter()
    counts: dict[str, int] = {}
    for name, total in per_op.items():
        n = total // workers + (index < total % workers)
        if n == 0:
            continue
        _, strategy, check = OPS[name]
        t0 = time.perf_counter()
        counts[name] = fuzz_op(name, n, strategy(), check, seed, device, failures, tags)
        print(f"{label}{name}: {counts[name]} examples in {time.perf_counter() - t0:.1f} s, "
              f"{sum(1 for f in failures if f[0] == name)} failures", flush=True)
    return {"counts": counts, "tags": dict(tags), "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="total examples over all ops")
    parser.add_argument("--ops", default="span,padded,varlen",
                        help="comma-separated subset of " + ",".join(OPS) +
                             " (*_gluon: backend='gluon' named, on every case it takes)")
    parser.add_argument("--seed", type=int, default=None,
                        help="draw a different stream of cases (default: derandomized)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes sharing the examples (default: one per CPU core, at "
                             "most 16, on cuda; 1 on cpu)")
    parser.add_argument("--show", type=int, default=20, help="failures to print in full")
    parser.add_argument("--device", default="cuda",
                        help="cuda, or cpu for a smoke run of this script "
                             "(needs TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fuzz_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    workers = args.workers or (min(16, os.cpu_count() or 1) if args.device == "cuda" else 1)
    per_op = examples_per_op(args.examples, [n.strip() for n in args.ops.split(",") if n.strip()])
    label = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"device: {label}  torch {torch.__version__}  workers: {workers}", flush=True)
    start = time.perf_counter()
    if workers == 1:
        reports = [run_worker(0, 1, per_op, args.seed, args.device)]
    else:
        # spawn, not fork: a forked child cannot use the parent's CUDA state.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(run_worker, i, workers, per_op, args.seed, args.device)
                    for i in range(workers)]
            reports = [job.result() for job in jobs]
    counts: Counter[str] = Counter()
    tags: Counter[str] = Counter()
    failures = []
    for report in reports:
        counts.update(report["counts"])
        tags.update(report["tags"])
        failures += report["failures"]
    print(f"\n{sum(counts.values())} examples ({', '.join(f'{k} {v}' for k, v in counts.items())}) "
          f"in {time.perf_counter() - start:.1f} s; {len(failures)} failures")
    if "span" in counts:
        print(f"span coverage (of {counts['span']} examples, passed ones counted):")
        for tag, what in COVERAGE.items():
            print(f"  {tags[tag]:6d}  {what}")
    for name, case, err in failures[: args.show]:
        print(f"\n--- {name} failure\n{case}\n{err}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
