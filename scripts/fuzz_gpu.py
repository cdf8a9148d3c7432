"""Fuzz every public op on CUDA against spanfill.reference, at larger sizes.

    PYTHONPATH=. python3 scripts/fuzz_gpu.py --examples 5000

The same properties as tests/test_fuzz.py (cases and checks from tests/fuzzing.py):
output rows poisoned with NaN, lse, the KV cache bit-for-bit against the
reference append, slots outside the written ones unchanged, NaN/inf in every
slot no request may read. Failures do not stop the run: each is printed with its
full case (enough to replay it), and the exit status is 1 if any was found.
The first minute or two is Triton compiling the kernel variants.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzzing import (  # noqa: E402
    GPU_SIZES,
    check_padded_case,
    check_span_case,
    check_varlen_case,
    padded_cases,
    span_cases,
    varlen_cases,
)

# Share of the examples per op: span cases exercise append_kv and span_prefill.
OPS: dict[str, tuple[float, Callable[[], st.SearchStrategy], Callable]] = {
    "span": (0.5, lambda: span_cases(GPU_SIZES), check_span_case),
    "padded": (0.25, lambda: padded_cases(GPU_SIZES), check_padded_case),
    "varlen": (0.25, lambda: varlen_cases(GPU_SIZES), check_varlen_case),
}


def fuzz_op(name: str, examples: int, strategy: st.SearchStrategy, check: Callable,
            seed: int | None, device: str, failures: list[tuple[str, object, str]]) -> int:
    """Run ``check`` on ``examples`` drawn cases; record failures instead of raising."""
    ran = 0
    start = time.perf_counter()

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(case) -> None:
        nonlocal ran
        ran += 1
        try:
            check(case, device)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the run goes on
            failures.append((name, case, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))
        if ran % 500 == 0:
            print(f"  {name}: {ran} examples, {time.perf_counter() - start:.0f} s", flush=True)

    if seed is not None:
        prop = __import__("hypothesis").seed(seed)(prop)
    prop()
    return ran


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="total examples over all ops")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    parser.add_argument("--seed", type=int, default=None,
                        help="draw a different stream of cases (default: derandomized)")
    parser.add_argument("--show", type=int, default=20, help="failures to print in full")
    parser.add_argument("--device", default="cuda",
                        help="cuda, or cpu for a smoke run of this script (needs TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fuzz_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.ops.split(",") if n.strip()]
    total_share = sum(OPS[n][0] for n in names)
    label = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"device: {label}  torch {torch.__version__}", flush=True)
    failures: list[tuple[str, object, str]] = []
    counts: dict[str, int] = {}
    start = time.perf_counter()
    for name in names:
        share, strategy, check = OPS[name]
        n = max(1, round(args.examples * share / total_share))
        t0 = time.perf_counter()
        counts[name] = fuzz_op(name, n, strategy(), check, args.seed, args.device, failures)
        print(f"{name}: {counts[name]} examples in {time.perf_counter() - t0:.1f} s, "
              f"{sum(1 for f in failures if f[0] == name)} failures", flush=True)
    total = sum(counts.values())
    print(f"\n{total} examples ({', '.join(f'{k} {v}' for k, v in counts.items())}) in "
          f"{time.perf_counter() - start:.1f} s; {len(failures)} failures")
    for name, case, err in failures[: args.show]:
        print(f"\n--- {name} failure\n{case!r}\n{err}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
