"""Micro-benchmarks: planning a 1,000-span layout, and append_kv's write bandwidth.

Planning = ``SpanLayout.from_tensors(..., validate=False)`` + ``tile_plan``, the
work a serving engine does once per batch. Three numbers:

* ``plan_time``: CUDA events around the eager calls (includes the host's launch
  gaps, since the GPU waits for each small launch);
* ``plan_graph_time``: the same calls captured in a CUDA graph and replayed, i.e.
  the GPU time alone (capture fails if planning syncs with the host; the GPU is
  kept busy while the host launches each replay, see ``time_device``);
* ``plan_host_sync``: 1 if the calls make the host wait on the device
  (``torch.cuda.set_sync_debug_mode("error")`` raised), else 0.

Append: ``sf.append_kv`` of T tokens' K and V into a shuffled page pool, rated by
the bytes it writes, next to a device-to-device ``copy_`` of the same number of
bytes measured in the same run.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

import spanfill as sf
from spanfill.testing import capture_cuda_graph

from .providers_base import spanfill_backend
from .providers_spanfill import block_q_for
from .timing import Stats, time_device
from .workloads import segmented_uniform

__all__ = ["micro_rows"]

Row = dict[str, object]


def _layout_inputs(num_requests: int, seq_len: int, spans_per_request: int, span_len: int,
                   page_size: int, device: torch.device) -> sf.SpanLayout:
    w = segmented_uniform("plan", num_requests, seq_len, spans_per_request, span_len,
                          page_size=page_size)
    pages = (seq_len + page_size - 1) // page_size
    perm = np.random.default_rng(0).permutation(num_requests * pages).astype(np.int32)
    table = torch.from_numpy(perm.reshape(num_requests, pages)).to(device)
    return sf.SpanLayout.build([list(s) for s in w.spans], list(w.seq_lens), table, page_size,
                               device=device)


def _plan_fn(layout: sf.SpanLayout, block_q: int) -> Callable[[], object]:
    def plan() -> object:
        fresh = sf.SpanLayout.from_tensors(layout.positions, layout.query_start_loc,
                                           layout.seq_lens, layout.block_table, layout.page_size,
                                           validate=False)
        return fresh.tile_plan(block_q, True)

    return plan


def _row(metric: str, unit: str, stats: Stats | None, value: float | None = None,
         **extra: object) -> Row:
    if stats is not None:
        return {"metric": metric, "unit": unit, "p50": stats.p50, "p20": stats.p20,
                "p80": stats.p80, **extra}
    return {"metric": metric, "unit": unit, "p50": value, **extra}


def _host_syncs(fn: Callable[[], object]) -> bool:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode(0)


def plan_rows(device: torch.device, small: bool, timing: dict) -> Iterator[Row]:
    """Rows for planning a layout of 1,000 spans (4 requests x 250 spans x 4 tokens)."""
    seq_len = 2048 if small else 8192
    layout = _layout_inputs(4, seq_len, 250, 4, 16, device)
    block_q = block_q_for(128, torch.bfloat16, 4, device, True)
    plan = _plan_fn(layout, block_q)
    base = {"provider": "spanfill", "workload": "plan_1000_spans",
            "note": f"from_tensors(validate=False) + tile_plan(block_q={block_q})"}
    # Eager: the launch gaps are part of what planning costs (report.py says so), so the
    # host's latency is timed, not covered.
    yield _row("plan_time", "ms", time_device(plan, device, flush_l2=False, cover_launch=False,
                                              **timing), **base)
    if device.type != "cuda":
        return
    synced = _host_syncs(plan)
    yield _row("plan_host_sync", "bool", None, float(synced), **base)
    if synced:  # a capture would fail; do not risk the CUDA context on it
        yield {**base, "metric": "error",
               "note": "plan_graph_time skipped: planning syncs the host"}
        return
    replay = capture_cuda_graph(plan)[0].replay
    yield _row("plan_graph_time", "ms", time_device(replay, device, flush_l2=False, **timing),
               **{**base, "note": base["note"] + "; CUDA graph replay = GPU time"})


def append_rows(device: torch.device, small: bool, timing: dict) -> Iterator[Row]:
    """Rows for append_kv bandwidth against a device-to-device copy of the same bytes."""
    if small:
        w = segmented_uniform("append", 2, 512, 8, 32, num_q_heads=4, num_kv_heads=2,
                              head_dim=32, page_size=4)
        dtype = torch.float32
    else:
        w = segmented_uniform("append", 4, 16384, 16, 512)
        dtype = torch.bfloat16
    t = w.make(device, dtype)
    written = 2 * t.k_new.numel() * t.k_new.element_size()
    src = torch.cat([t.k_new.reshape(-1), t.v_new.reshape(-1)])
    dst = torch.empty_like(src)
    gb = written / 1e9
    backend = spanfill_backend(device)

    def append() -> None:
        sf.append_kv(t.k_new, t.v_new, t.k_cache, t.v_cache, t.layout, backend=backend)

    note = (f"{w.num_tokens} tokens, Hk={w.num_kv_heads}, D={w.head_dim}, "
            f"{written / 1e6:.0f} MB written")
    for provider, fn in (("spanfill", append), ("torch_copy", lambda: dst.copy_(src))):
        stats = time_device(fn, device, **timing)
        base = {"provider": provider, "workload": "append_kv", "note": note}
        yield _row("kernel_time", "ms", stats, **base)
        # The fastest time gives the highest bandwidth: p20 of time is p80 of bandwidth.
        bw = Stats(gb / (stats.p50 * 1e-3), gb / (stats.p80 * 1e-3), gb / (stats.p20 * 1e-3),
                   stats.reps)
        yield _row("bandwidth", "GB/s", bw, **base)


def micro_rows(device: torch.device, small: bool, timing: dict) -> Iterator[tuple[str, Callable]]:
    """(name, generator factory) of each micro-benchmark, for the runner's progress bar."""
    yield "append_kv", lambda: append_rows(device, small, timing)
    yield "plan_1000_spans", lambda: plan_rows(device, small, timing)
