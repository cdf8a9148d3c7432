"""Summarise where warps stall, from an ``ncu`` source page exported as CSV.

    ncu -i report.ncu-rep --page source --csv --print-source sass > report.sass.csv
    python3 scripts/ncu_stalls.py report.sass.csv
    python3 scripts/ncu_stalls.py --opcodes A.sass.csv[.gz] B.sass.csv[.gz]
    python3 scripts/ncu_stalls.py --hot-path A.sass.csv[.gz] [MIN_SHARE]

Prints the share of each stall reason over all sampled warp states, then the
instructions with the most samples and their two main reasons, each with the two
instructions before it: a warp stalled on a barrier is sampled at the instruction after
the one it waits in (a ``NOP`` after ``BAR.SYNC``, say), so the reason alone does not
name the barrier.

``--opcodes``: two kernels' pages side by side (the same work, e.g. FA4's kernel and
ours on one workload): for each opcode, the warp instructions executed (millions) and
the stall samples at it, most executed first. Counts that differ between two kernels
doing the same work point at instructions one of them spends and the other does not
(``PRMT`` half-swaps, extra shuffles or barriers).

``--hot-path``: the order of one kernel's hot loop, to set beside another's. It keeps
the instructions executed at least ``MIN_SHARE`` (0.5) times as often as the most
executed ``MUFU.EX2`` (an attention kernel's exponentials run once per KV step, so that
count is the steps' count), in address order. The synchronisation points (wgmmas and
their waits, barriers, mbarrier waits and arrivals, branches) get a line each with their
samples; the instructions between two of them collapse into one line, their opcodes
counted and their samples summed. It shows where a loop waits and how much work sits
between its waits (FA4's D=64 loop: the row max and 12 exponentials between the QK^T
and the PV wait).
"""
import csv
import gzip
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sass_overlap import opcode  # noqa: E402  (the SASS listing's parser: same mnemonics)


def _mnemonic(source: str) -> str:
    """An instruction's opcode up to its first dot (``HGMMA``, ``BAR``), predicate dropped."""
    return opcode(source.strip()).split(".")[0]


def _page(path: str) -> tuple[dict[str, int], list[list[str]]]:
    """An ncu source page: its columns by name and its instruction rows (``.gz``: read
    compressed, as the device's copies come back)."""
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        rows = list(csv.reader(f))
    header = next(r for r in rows if "Address" in r and "Source" in r)
    return ({h: i for i, h in enumerate(header)},
            [r for r in rows[rows.index(header) + 1:] if len(r) >= len(header)])


def opcode_counts(path: str) -> tuple[Counter, Counter]:
    """(warp instructions executed, stall samples) per opcode (the mnemonic before its
    first dot, predicate dropped) of an ncu source page."""
    col, rows = _page(path)
    executed, samples = Counter(), Counter()
    for r in rows:
        op = _mnemonic(r[col["Source"]])
        if not op:
            continue
        if "Instructions Executed" in col:
            executed[op] += int(r[col["Instructions Executed"]] or 0)
        if "Warp Stall Sampling (All Samples)" in col:
            samples[op] += int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
    return executed, samples


def compare_opcodes(a: str, b: str, top: int = 30) -> None:
    """Print :func:`opcode_counts` of ``a`` and ``b`` side by side."""
    (ea, sa), (eb, sb) = opcode_counts(a), opcode_counts(b)
    print(f"A: {a}\nB: {b}")
    print(f"{'opcode':12s} {'A exec (M)':>10s} {'B exec (M)':>10s} {'B - A':>8s} "
          f"{'A samples':>10s} {'B samples':>10s}")
    for op, _ in (ea + eb).most_common(top):
        print(f"{op:12s} {ea[op] / 1e6:10.2f} {eb[op] / 1e6:10.2f} "
              f"{(eb[op] - ea[op]) / 1e6:+8.2f} {sa[op]:10d} {sb[op]:10d}")
    print(f"{'total':12s} {sum(ea.values()) / 1e6:10.2f} {sum(eb.values()) / 1e6:10.2f} "
          f"{(sum(eb.values()) - sum(ea.values())) / 1e6:+8.2f} "
          f"{sum(sa.values()):10d} {sum(sb.values()):10d}")


_SYNC_OPS = ("HGMMA", "WARPGROUP", "BAR", "SYNCS", "MEMBAR", "FENCE", "BRA", "USETMAXREG")


def hot_path(path: str, min_share: float = 0.5) -> list[str]:
    """The lines ``--hot-path`` prints for ``path`` (see the module docstring)."""
    col, rows = _page(path)
    n_exec, n_samp = col["Instructions Executed"], col["Warp Stall Sampling (All Samples)"]
    insts = sorted((int(r[col["Address"]], 16), r[col["Source"]].strip(), int(r[n_exec] or 0),
                    int(r[n_samp] or 0)) for r in rows if r[col["Address"]].startswith("0x"))
    steps = max((e for _, src, e, _ in insts if opcode(src).startswith("MUFU.EX2")), default=0)
    if not steps:
        return ["no MUFU.EX2 was executed: no loop to follow"]
    lines = [f"hot path: instructions executed >= {min_share:g} x {steps} (the most executed "
             "MUFU.EX2); samples; executed / that count"]
    mix, mix_samples, skipped = Counter(), 0, False

    def flush() -> None:
        nonlocal mix, mix_samples
        if mix:
            ops = " ".join(f"{op}{n}" for op, n in mix.most_common())
            lines.append(f"    [{sum(mix.values())} ops: {ops}]  samples {mix_samples}")
        mix, mix_samples = Counter(), 0

    for _, src, executed, samples in insts:
        if executed < min_share * steps:
            skipped = True
            continue
        if skipped:
            flush()
            lines.append("  ..")
            skipped = False
        op = _mnemonic(src)
        if op in _SYNC_OPS:
            flush()
            lines.append(f"{src[:72]:72s} samples {samples:6d}  x{executed / steps:.2f}")
        else:
            mix[op] += 1
            mix_samples += samples
    flush()
    return lines


def main(path: str, top: int = 15) -> None:
    col, rows = _page(path)
    reasons = [h for h in col if h.startswith("stall_") and "Not Issued" not in h]
    totals = dict.fromkeys(reasons, 0)
    per_inst = []
    for r in rows:
        counts = {s: int(r[col[s]] or 0) for s in reasons}
        for s, n in counts.items():
            totals[s] += n
        per_inst.append((sum(counts.values()), r[col["Source"]].strip(), counts, len(per_inst)))
    total = sum(totals.values()) or 1
    print(f"{'stall reason':24s} {'samples':>8s} {'share':>6s}")
    for s, n in sorted(totals.items(), key=lambda x: -x[1])[:10]:
        print(f"{s:24s} {n:8d} {100 * n / total:5.1f}%")
    print(f"\ntop {top} instructions by samples")
    for n, src, counts, at in sorted(per_inst, key=lambda x: -x[0])[:top]:
        main2 = ", ".join(f"{k[6:]} {v}" for k, v in sorted(counts.items(), key=lambda x: -x[1])[:2])
        print(f"{n:6d}  {src[:60]:60s} {main2}")
        before = " | ".join(p[1][:40] for p in per_inst[max(0, at - 2):at])
        print(f"{'':8s}after: {before}")


if __name__ == "__main__":
    if sys.argv[1] == "--opcodes":
        compare_opcodes(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "--hot-path":
        print("\n".join(hot_path(sys.argv[2], *map(float, sys.argv[3:4]))))
    else:
        main(sys.argv[1])
