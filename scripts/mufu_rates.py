"""How many base-2 exponentials an SM computes a cycle, by PTX form (sm_90 GPU).

    PYTHONPATH=. python3 scripts/mufu_rates.py [--out DIR]
    python3 scripts/mufu_rates.py --compile-check     # no GPU: compile here, count MUFU.EX2

The D=64 padded workloads are bound by the exponentials as much as by the tensor cores
(``docs/performance.md``): an H200 SM does 16 ``MUFU.EX2`` lanes a cycle, the same time
per score as the wgmmas at D=64. This measures whether a packed half-precision form
(``ex2.approx.f16x2``, ``ex2.approx.ftz.bf16x2``) gets more exponentials a cycle than
``ex2.approx.ftz.f32``, which the kernels use. Each thread runs 16 independent chains of
``x = -ex2(x)`` (the negation keeps ``x`` in [-1, -0.5]) for 2048 iterations, in 8 warps
a program and 4 programs per SM; elements a cycle per SM are elements over the time,
the SM count and the SM clock (``nvidia-smi``, read while 100 launches queued back to
back run; seven such repeats).

Writes ``DIR/mufu_rates.csv`` (the bench's columns; ``metric`` ``exp2_per_sm_clock``,
quantiles over the seven repeats) and ``DIR/mufu_rates.png``.
"""

from __future__ import annotations

import argparse
import subprocess
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
                           tl.float32, 1),
    "ex2.approx.f16x2": ("{ ex2.approx.f16x2 $0, $1; neg.f16x2 $0, $0; }", "=r,r",
                         tl.float16, 2),
    "ex2.approx.ftz.bf16x2": ("{ ex2.approx.ftz.bf16x2 $0, $1; neg.bf16x2 $0, $0; }", "=r,r",
                              tl.bfloat16, 2),
}
TORCH_DTYPE = {tl.float32: torch.float32, tl.float16: torch.float16,
               tl.bfloat16: torch.bfloat16}
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


def _sm_clock_mhz() -> float | None:
    """The SM clock now (``nvidia-smi``), or None where it cannot be read."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm",
                              "--format=csv,noheader,nounits",
                              f"--id={torch.cuda.current_device()}"], capture_output=True,
                             text=True, timeout=10).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def compile_check() -> dict[str, int]:
    """Each form compiled for sm_90 here: how many ``MUFU.EX2`` its SASS has (one
    iteration's worth per element a thread holds, the loop kept rolled)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sass_overlap import sass_of

    counts = {}
    for name, (asm, cons, dt, pack) in FORMS.items():
        ptr = {tl.float32: "*fp32", tl.float16: "*fp16", tl.bfloat16: "*bf16"}[dt]
        src = ASTSource(fn=_chains, signature={"X": ptr, "ITERS": "constexpr",
                                               "ASM": "constexpr", "CONSTRAINTS": "constexpr",
                                               "PACK": "constexpr", "BLOCK": "constexpr"},
                        constexprs={"ITERS": 4, "ASM": asm, "CONSTRAINTS": cons, "PACK": pack,
                                    "BLOCK": BLOCK})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        counts[name] = sum(line.startswith("MUFU.EX2") for line in sass_of(kernel.asm["ptx"]))
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
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = BLOCK * sms * WAVES
    rows, table = [], []
    for name, (asm, cons, dt, pack) in FORMS.items():
        x = torch.full((n,), -0.5, device="cuda", dtype=TORCH_DTYPE[dt])

        def run() -> None:
            _chains[(n // BLOCK,)](x, ITERS, asm, cons, pack, BLOCK, num_warps=8)

        run()
        torch.cuda.synchronize()
        rates, clocks = [], []
        for _ in range(REPEATS):
            start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            for _ in range(LAUNCHES):
                run()
            stop.record()
            clocks.append(_sm_clock_mhz())  # read while the queued launches run
            torch.cuda.synchronize()
            seconds = start.elapsed_time(stop) * 1e-3
            # elements a cycle per SM (per ns per SM without a clock reading)
            rates.append(n * ITERS * LAUNCHES / seconds / sms / ((clocks[-1] or 1e3) * 1e6))
        if not torch.isfinite(x.float()).all():
            raise SystemExit(f"{name}: the chains left non-finite values")
        q = quantiles(rates)
        known = [c for c in clocks if c]
        note = (f"{ITERS} rounds of x = -ex2(x), 16 chains a thread, 8 warps a program, "
                f"{WAVES} programs an SM; SM clock {sorted(known)[len(known) // 2]:.0f} MHz "
                "(nvidia-smi, median)" if known else "no clock reading: elements per ns per SM")
        rows.append({"kernel": "mufu_ex2", "provider": name, "workload": "chains",
                     "metric": "exp2_per_sm_clock",
                     "unit": "elements/SM/cycle" if known else "elements/SM/ns", **q,
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
