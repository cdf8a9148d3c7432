"""Summarise where warps stall, from an ``ncu`` source page exported as CSV.

    ncu -i report.ncu-rep --page source --csv --print-source sass > report.sass.csv
    python3 scripts/ncu_stalls.py report.sass.csv

Prints the share of each stall reason over all sampled warp states, then the
instructions with the most samples and their two main reasons, each with the two
instructions before it: a warp stalled on a barrier is sampled at the instruction after
the one it waits in (a ``NOP`` after ``BAR.SYNC``, say), so the reason alone does not
name the barrier.
"""
import csv
import sys


def main(path: str, top: int = 15) -> None:
    rows = list(csv.reader(open(path)))
    header = next(r for r in rows if "Address" in r and "Source" in r)
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    totals = dict.fromkeys(reasons, 0)
    per_inst = []
    for r in rows[rows.index(header) + 1:]:
        if len(r) < len(header):
            continue
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
    main(sys.argv[1])
