"""A/B of split-KV on every segmented bench workload (GPU): policy vs never split.

    python3 scripts/ab_splits.py [core|sweep|all] [WORKLOAD_OR_AXIS ...]

For each workload (built as the bench builds it), ``span_prefill`` on the prebuilt
layout with ``SPANFILL_SPLITS=1`` (A, no split) and with the split count the policy
picks (B), timed alternately in two rounds, lower p50 of each kept:

- GPU time: the call captured in a CUDA graph, replays timed with the launch
  covered (``time_device``'s default), so a slow host does not show;
- eager: the public call with the L2 flushed and the launch not covered
  (``cover_launch=False``), so the host's time shows where it outlasts the GPU's.

Prints the split count, both times of each variant, the GPU-time ratio and each
variant's relative error against the bench's reference check. ``AB_SPLITS_B=<n>``
makes B a forced split count instead of the policy's (to tune the policy).
"""
import os
import sys

import torch

sys.path.insert(0, ".")
from bench.check import segmented_checker  # noqa: E402
from bench.providers_spanfill import spanfill_segmented  # noqa: E402
from bench.timing import time_device  # noqa: E402
from bench.workloads import SegmentedWorkload, core_workloads, sweep_workloads  # noqa: E402
from spanfill.backends import get_backend, paged_problem  # noqa: E402
from spanfill.testing import capture_cuda_graph  # noqa: E402


def _set(value: str | None) -> None:
    if value is None and os.environ.get("AB_SPLITS_B"):
        os.environ["SPANFILL_SPLITS"] = os.environ["AB_SPLITS_B"]
    elif value is None:
        os.environ.pop("SPANFILL_SPLITS", None)
    else:
        os.environ["SPANFILL_SPLITS"] = value


def main(suite: str = "all", *names: str) -> None:
    device = torch.device("cuda")
    workloads = (core_workloads() if suite in ("core", "all") else []) + \
        (sweep_workloads() if suite in ("sweep", "all") else [])
    print(f"# split-KV: A = SPANFILL_SPLITS=1, B = policy; p50 us (lower of 2 "
          f"alternating rounds); {torch.cuda.get_device_name()}")
    for w in workloads:
        if not isinstance(w, SegmentedWorkload):
            continue
        if names and w.name not in names and w.name.split(":")[-1] not in names:
            continue
        os.environ.pop("SPANFILL_SPLITS", None)  # the policy's own choice, printed below
        t = w.make(device, torch.bfloat16)
        problem = paged_problem(t.q, t.k_cache, t.layout.num_requests,
                                t.layout.block_table.shape[1], True)
        splits = get_backend("triton").select_config(problem).num_splits
        check = segmented_checker(w, t)
        prepared = spanfill_segmented(w, t)
        gpu, eager, errs, graphs = {}, {}, {}, {}
        forced_b = os.environ.get("AB_SPLITS_B")
        if forced_b:
            splits = int(forced_b)
        for order in (("1", None), (None, "1")):
            for value in order:
                _set(value)
                errs[value] = check(prepared.output().clone())
                if value not in graphs:
                    # captured once: its split count is read while capturing
                    graphs[value] = capture_cuda_graph(prepared.run)[0]
                p50 = time_device(graphs[value].replay, device, flush_l2=False).p50 * 1e3
                gpu[value] = min(gpu.get(value, float("inf")), p50)
                p50 = time_device(prepared.run, device, cover_launch=False).p50 * 1e3
                eager[value] = min(eager.get(value, float("inf")), p50)
        _set(None)
        label = f"{w.name}{'' if w.x is None else '=' + str(w.x)}"
        print(f"{label:28s} splits {splits:2d}  GPU A {gpu['1']:8.1f} B {gpu[None]:8.1f} us "
              f"B/A {gpu[None] / gpu['1']:.3f}  eager A {eager['1']:8.1f} B {eager[None]:8.1f} us"
              f"  relerr A {errs['1']:.2e} B {errs[None]:.2e}", flush=True)
        del graphs


if __name__ == "__main__":
    main(*sys.argv[1:])
