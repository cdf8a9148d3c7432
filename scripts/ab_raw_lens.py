"""Raw ``valid_lens`` against a prebuilt ``PaddedLayout``, paired, as a model's layers pay it.

    PYTHONPATH=. python3 scripts/ab_raw_lens.py [--reps N] [--calls K] [--out DIR]

Issue 17, item 2: ``padded_prefill`` called again with the same raw ``valid_lens``
tensor reuses its layout, so it should cost what the layout path costs. On the small
batches (minilm_b256_s128: 0.04 ms of kernel) one call is host-bound, and the bench's
one-call-after-an-L2-flush timing of the two providers, run minutes apart, swung from
0.51x to 1.14x between clean runs. This measures the pair the way a model runs them:
``K`` calls back to back (one per layer), the two paths alternating rep by rep (the
first of each pair swapped every rep), timed by CUDA events around the ``K`` calls
(the time the GPU stream takes, host gaps included) and by the host clock up to the
last launch. Writes ``DIR/ab_raw_lens.csv`` (the bench's columns; per-call ms) and
``DIR/ab_raw_lens.png``, and prints a table with the ratio of medians and the median
of the paired ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import spanfill as sf  # noqa: E402
from _results import quantiles, write_rows  # noqa: E402
from bench.workloads import core_workloads  # noqa: E402

WORKLOADS = ("bert_base_512", "minilm_b256_s128")


def _time_calls(call, calls: int) -> tuple[float, float]:
    """(stream ms, host ms) per call over ``calls`` back-to-back calls."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(calls):
        call()
    end.record()
    host = (time.perf_counter() - t0) * 1e3 / calls
    end.synchronize()
    return start.elapsed_time(end) / calls, host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--calls", type=int, default=12, help="back-to-back calls (layers)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    rows, table = [], []
    for w in core_workloads():
        if w.name not in WORKLOADS:
            continue
        t = w.make(device, torch.bfloat16)
        layout = sf.PaddedLayout.build(t.valid_lens, w.seq_len)
        paths = {
            "spanfill": lambda: sf.padded_prefill(t.q, t.k, t.v, layout, causal=w.causal),
            "spanfill_raw_lens": lambda: sf.padded_prefill(t.q, t.k, t.v, t.valid_lens,
                                                           causal=w.causal),
        }
        for call in paths.values():  # compile, plan, memoise
            for _ in range(3):
                call()
        stream = {name: [] for name in paths}
        host = {name: [] for name in paths}
        paired = []
        names = list(paths)
        for rep in range(args.reps):
            order = names if rep % 2 == 0 else names[::-1]
            got = {}
            for name in order:
                got[name] = _time_calls(paths[name], args.calls)
                stream[name].append(got[name][0])
                host[name].append(got[name][1])
            paired.append(got["spanfill_raw_lens"][0] / got["spanfill"][0])
        for name in names:
            for metric, values in (("stream_time_per_call", stream[name]),
                                   ("host_time_per_call", host[name])):
                rows.append({"kernel": "padded_prefill", "provider": name, "workload": w.name,
                             "metric": metric, "unit": "ms", **quantiles(values),
                             "note": f"{args.calls} calls back to back, {args.reps} reps, "
                                     "paths alternating"})
        layout_ms = statistics.median(stream["spanfill"])
        ratio = statistics.median(stream["spanfill_raw_lens"]) / layout_ms
        pair = statistics.median(paired)
        rows.append({"kernel": "padded_prefill", "provider": "spanfill_raw_lens",
                     "workload": w.name, "metric": "raw_over_layout", "unit": "x",
                     **quantiles(paired), "note": "per-rep paired ratio of stream times"})
        table.append((w.name, layout_ms,
                      statistics.median(stream["spanfill_raw_lens"]), ratio, pair,
                      statistics.median(host["spanfill"]),
                      statistics.median(host["spanfill_raw_lens"])))
    out = Path(args.out)
    path = write_rows(out / "ab_raw_lens.csv", rows)
    print("wrote", path, plot(table, out / "ab_raw_lens.png"))
    print("\n| workload | layout ms/call | raw ms/call | ratio of medians | median paired ratio "
          "| host layout | host raw |\n|---|---|---|---|---|---|---|")
    for name, a, b, r, p, ha, hb in table:
        print(f"| {name} | {a:.4f} | {b:.4f} | {r:.3f}x | {p:.3f}x | {ha:.4f} | {hb:.4f} |")


def plot(table: list[tuple], path: Path) -> Path:
    """Per-call stream time of the two paths, per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = range(len(table))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in table], 0.4, label="PaddedLayout")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in table], 0.4, label="raw valid_lens (reused)")
    ax.set_xticks(list(xs), [r[0] for r in table])
    ax.set_ylabel("ms per call (stream, back to back)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
