"""How many base-2 exponentials an SM computes a cycle, by PTX form (sm_90 GPU).

    PYTHONPATH=. python3 scripts/mufu_rates.py [--out DIR]
    python3 scripts/mufu_rates.py --compile-check     # no GPU: compile here, count MUFU.EX2

The D=64 padded workloads are bound by the exponentials as much as by the tensor cores
(``docs/performance.md``): an H200 SM does 16 ``MUFU.EX2`` lanes a cycle, the same time
per score as the wgmmas at D=64. This measures whether a packed half-precision form
(``ex2.approx.f16x2``, ``ex2.approx.ftz.bf16x2``) gets more exponentials a cycle than
``ex2.approx.ftz.f32``, which the kernels use. Each thread runs 16 independent chains of
``x = -ex2(x)`` (the negation keeps ``x`` in [-1, -0.5]) for 2048 iterations, in 8 warps
a program and 4 programs per SM; elements a cycle per SM are elements over the time
(seven repeats of 100 launches back to back), the SM count and the SM clock: the median
of ``scripts/clock_under_load.py``'s ``nvidia-smi`` samples over half a second of the
same launches.

Writes ``DIR/mufu_rates.csv`` (the bench's columns; ``metric`` ``exp2_per_sm_clock``,
quantiles over the seven repeats) and ``DIR/mufu_rates.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import environment, new_figure, quantiles, save_figure, write_rows  # noqa: E402

# name: (the asm of one packed element group, its constraints, element dtype, elements
# per asm call)
FORMS = {
    "ex2.approx.ftz.f32": ("{ ex2.approx.ftz.f32 $0, $1; neg.f32 $0, $0; }", "=r,r",
                           torch.float32, 1),
    "ex2.approx.f16x2": ("{ ex2.approx.f16x2 $0, $1; neg.f16x2 $0, $0; }", "=r,r",
                         torch.float16, 2),
    "ex2.approx.ftz.bf16x2": ("{ ex2.approx.ftz.bf16x2 $0, $1; neg.bf16x2 $0, $0; }", "=r,r",
                              torch.bfloat16, 2),
}
BLOCK = 256 * 16  # 8 warps of 32 threads, 16 elements (chains) a thread
ITERS = 2048
WAVES = 4  # programs per SM
LAUNCHES = 100  # back to back per timed repeat (about 0.1 s)
REPEATS = 7


@triton.jit
def _chains(X, ITERS: tl.constexpr, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
            PACK: tl.constexpr, BLOCK: tl.constexpr):
    """``ITERS`` rounds of ``x = -2**x`` on each of a program's ``BLOCK`` elements."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    for _ in range(ITERS):
        x = tl.inline_asm_elementwise(ASM, CONSTRAINTS, [x], dtype=x.dtype, is_pure=True,
                                      pack=PACK)
    tl.store(X + offs, x)


def compile_check() -> dict[str, int]:
    """Each form compiled for sm_90 here, as ``scripts/compile_sm90.py`` compiles a launch:
    how many ``MUFU.EX2`` its SASS has (4 rounds, unrolled, of 16 elements a thread)."""
    from compile_sm90 import compile_instead_of_launch
    from sass_overlap import sass_of

    counts = {}
    for name, (asm, cons, dtype, pack) in FORMS.items():
        sink: list[dict] = []
        with compile_instead_of_launch(sink):
            _chains[(1,)](torch.zeros(BLOCK, dtype=dtype), 4, asm, cons, pack, BLOCK,
                          num_warps=8)
        counts[name] = sum(line.startswith("MUFU.EX2") for line in sass_of(sink[-1]["ptx"]))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--compile-check", action="store_true",
                        help="only compile each form for sm_90 here and count its MUFU.EX2")
    args = parser.parse_args()
    if args.compile_check:
        print("mufu:", compile_check())
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from clock_under_load import under_load  # (it imports spanfill and bench: GPU runs only)

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = BLOCK * sms * WAVES
    rows, table = [], []
    for name, (asm, cons, dtype, pack) in FORMS.items():
        x = torch.full((n,), -0.5, device="cuda", dtype=dtype)

        def run() -> None:
            _chains[(n // BLOCK,)](x, ITERS, asm, cons, pack, BLOCK, num_warps=8)

        samples = under_load(run, 0.5)  # (it warms up first)
        known = sorted(clock for clock, _, _ in samples)
        mhz = known[len(known) // 2] if known else None
        rates = []
        for _ in range(REPEATS):
            start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            for _ in range(LAUNCHES):
                run()
            stop.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(stop) * 1e-3
            # elements a cycle per SM (per ns per SM without a clock reading)
            rates.append(n * ITERS * LAUNCHES / seconds / sms / ((mhz or 1e3) * 1e6))
        if not torch.isfinite(x.float()).all():
            raise SystemExit(f"{name}: the chains left non-finite values")
        q = quantiles(rates)
        note = (f"{ITERS} rounds of x = -ex2(x), 16 chains a thread, 8 warps a program, "
                f"{WAVES} programs an SM; SM clock {mhz:.0f} MHz (nvidia-smi, median)"
                if mhz else "no clock reading: elements per ns per SM")
        rows.append({"kernel": "mufu_ex2", "provider": name, "workload": "chains",
                     "metric": "exp2_per_sm_clock",
                     "unit": "elements/SM/cycle" if mhz else "elements/SM/ns", **q,
                     "note": note})
        table.append((name, q))
        print(f"{name:24s} {q['p50']:6.2f} elements/SM/cycle [{q['p20']:.2f}-{q['p80']:.2f}]",
              flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print("wrote", write_rows(out / "mufu_rates.csv", rows))
    fig, ax = new_figure(6, 2.6)
    ax.barh([n for n, _ in table], [q["p50"] for _, q in table], color="#1f77b4")
    ax.set_xlabel("base-2 exponentials per SM per cycle (p50)")
    ax.set_title(f"MUFU ex2 by PTX form, {env['gpu']}", fontsize=9)
    print("wrote", save_figure(fig, out / "mufu_rates.png"))


if __name__ == "__main__":
    main()
