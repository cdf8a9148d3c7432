"""How evenly a persistent Gluon launch spreads a padded workload's items (host only).

    python3 scripts/schedule_balance.py [WORKLOAD] [--programs 132] [--rows 128] [--block-n 128]

A model, not a measurement: each work item (one block of ``--rows`` query rows of one
head, the plan's order, longest KV range first) costs its KV tiles of ``--block-n``
positions plus a fixed per-item overhead of
0, 1 or 2 tiles. The persistent launch deals the items in rounds, each round walked in
the other direction: the model calls the kernel's own ``_round_item``
(``spanfill/kernels_gluon/attention.py``, its plain Python function), so it deals them as
the kernel does; a
greedy dynamic order (the next item to the first free program, what a hardware block
scheduler does for a non-persistent launch) is the comparison. Prints the longest
program's load over the mean for both.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import PaddedWorkload, core_workloads  # noqa: E402
from spanfill.kernels_gluon.attention import _round_item  # noqa: E402


def item_costs(w: PaddedWorkload, rows: int, block_n: int, overhead: float) -> list[float]:
    """Every item's cost in KV tiles, longest first (the plan's order)."""
    costs = []
    for v in w.valid_lens:
        # bidirectional: every row block of a sample sees its whole valid length
        costs += [math.ceil(v / block_n) + overhead] * (math.ceil(v / rows) * w.num_heads)
    return sorted(costs, reverse=True)


def snake_makespan(costs: list[float], programs: int) -> float:
    """The longest program's load when items go out in rounds of alternating direction."""
    load = [0.0] * programs
    for r in range(math.ceil(len(costs) / programs)):
        for pid in range(programs):
            item = _round_item.fn(r, pid, programs)  # (the Gluon function's Python body)
            if item < len(costs):
                load[pid] += costs[item]
    return max(load)


def greedy_makespan(costs: list[float], programs: int) -> float:
    """The longest program's load when each item goes to the first program to be free."""
    free = [0.0] * programs
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", nargs="?", default="enc_2k_d128")
    parser.add_argument("--programs", type=int, default=132, help="SMs (H200: 132)")
    parser.add_argument("--rows", type=int, default=128, help="query rows an item (192: the "
                        "three-group form)")
    parser.add_argument("--block-n", type=int, default=128, help="KV positions a tile")
    args = parser.parse_args()
    w = next(x for x in core_workloads() if x.name == args.workload)
    if not isinstance(w, PaddedWorkload):
        raise SystemExit(f"{args.workload} is not a padded workload")
    for overhead in (0.0, 1.0, 2.0):
        costs = item_costs(w, args.rows, args.block_n, overhead)
        mean = sum(costs) / args.programs
        print(f"{w.name}: {len(costs)} items, overhead {overhead:.0f} tile(s): rounds "
              f"{snake_makespan(costs, args.programs) / mean:.3f}x the mean, greedy "
              f"{greedy_makespan(costs, args.programs) / mean:.3f}x")


if __name__ == "__main__":
    main()
