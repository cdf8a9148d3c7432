"""The GPU's SM clock and power while one kernel runs back to back.

    PYTHONPATH=. python3 scripts/clock_under_load.py [--seconds S] [WORKLOAD ...]

A kernel's time depends on the clock it runs at, and an H200 lowers its clock when a
kernel draws near its power limit. For each core workload named (default: whole_8k and
enc_2k_d128), this runs the spanfill call the bench times (the registry's choice, and
``backend="gluon"`` for padded batches, where the registry takes the portable kernel),
the portable kernel, and FlashAttention-4 where it is installed (as ``bench/`` runs it:
one entry per span, its dense causal kernel, ``seqused`` for padded batches), each back
to back for S seconds while ``nvidia-smi`` is polled every 100 ms, and prints the
median SM clock, power draw and the throttle reasons seen. Writes
``DIR/clock_under_load.csv`` (the bench's columns: metric ``sm_clock`` in MHz and
``power`` in W, p50/p20/p80 over the samples) and ``DIR/clock_under_load.png``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import new_figure, quantiles, save_figure, write_rows  # noqa: E402
from bench.providers_spanfill import (spanfill_gluon, spanfill_padded_kernel,  # noqa: E402
                                     spanfill_portable_span)
from bench.workloads import PaddedWorkload, core_workloads  # noqa: E402
import spanfill as sf  # noqa: E402

QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"


def _poll(samples: list[tuple[float, float, str]], stop: threading.Event) -> None:
    while not stop.is_set():
        out = subprocess.run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True).stdout.strip()
        try:
            clock, power, reasons = (x.strip() for x in out.split(","))
            samples.append((float(clock), float(power), reasons))
        except ValueError:
            pass
        time.sleep(0.1)


def under_load(run, seconds: float) -> list[tuple[float, float, str]]:
    """``run()`` back to back for ``seconds`` (after a warm-up), with samples."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    samples: list[tuple[float, float, str]] = []
    stop = threading.Event()
    poller = threading.Thread(target=_poll, args=(samples, stop))
    t0 = time.perf_counter()
    poller.start()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            run()
        torch.cuda.synchronize()
    stop.set()
    poller.join()
    return samples[3:]  # the first polls may predate the load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("workloads", nargs="*", default=["whole_8k", "enc_2k_d128"])
    args = parser.parse_args()
    device = torch.device("cuda")
    rows, table = [], []
    idle = under_load(lambda: time.sleep(0.01), 1.0)
    cases = [("idle", "-", None)]
    # FlashAttention-4 too where it is installed (../shared/tools/peers.sh)
    from bench import providers_fa4

    fa4_ok, why = providers_fa4.available()
    print("FA4:", "in the run" if fa4_ok else why, flush=True)
    for w in core_workloads():
        if w.name not in args.workloads:
            continue
        t = w.make(device, torch.bfloat16)
        if isinstance(w, PaddedWorkload):
            cases += [(w.name, "gluon", spanfill_gluon(w, t).run),
                      (w.name, "portable", spanfill_padded_kernel(w, t).run)]
            if fa4_ok:
                cases.append((w.name, "fa4_padded", providers_fa4.padded(w, t).run))
        else:
            cases += [(w.name, "registry",
                       lambda t=t: sf.span_prefill(t.q, t.k_cache, t.v_cache, t.layout)),
                      (w.name, "portable", spanfill_portable_span(w, t).run)]
            if fa4_ok:
                cases += [(w.name, "fa4_span_entries", providers_fa4.span_entries(w, t).run),
                          (w.name, "fa4_dense", providers_fa4.dense(w, t).run)]
    for workload, provider, run in cases:
        samples = idle if run is None else under_load(run, args.seconds)
        clocks = np.array([s[0] for s in samples])
        power = np.array([s[1] for s in samples])
        reasons = sorted({s[2] for s in samples})
        for metric, unit, vals in (("sm_clock", "MHz", clocks), ("power", "W", power)):
            rows.append({"kernel": "clock_under_load", "provider": provider,
                         "workload": workload, "metric": metric, "unit": unit,
                         **quantiles(list(vals)),
                         "note": f"{len(vals)} nvidia-smi samples; throttle reasons "
                                 + " ".join(reasons)})
        table.append(f"| {workload} | {provider} | {np.median(clocks):.0f} | "
                     f"{np.median(power):.0f} | {' '.join(reasons)} |")
        print(table[-1], flush=True)
    out = Path(args.out)
    print("wrote", write_rows(out / "clock_under_load.csv", rows),
          plot(rows, out / "clock_under_load.png"))
    print("\n| workload | kernel | SM clock MHz (median) | power W | throttle reasons |\n"
          "|---|---|---|---|---|")
    print("\n".join(table))


def plot(rows: list[dict], path: Path) -> Path:
    """Median SM clock of each kernel under load (p20-p80 whiskers), per workload."""
    clocks = [r for r in rows if r["metric"] == "sm_clock"]
    labels = [f"{r['workload']}\n{r['provider']}" for r in clocks]
    p50 = [float(r["p50"]) for r in clocks]
    err = [[p - float(r["p20"]) for p, r in zip(p50, clocks)],
           [float(r["p80"]) - p for p, r in zip(p50, clocks)]]
    fig, ax = new_figure(max(6, 0.6 * len(clocks)), 4)
    ax.bar(range(len(clocks)), p50, yerr=err, capsize=3)
    ax.set_xticks(range(len(clocks)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(1000, 2100)
    ax.set_ylabel("SM clock, MHz (median of samples)")
    ax.set_title("SM clock with each kernel back to back (power-capped at ~690 W)", fontsize=9)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
