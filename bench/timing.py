"""Timing: CUDA events on the GPU (like ``triton.testing.do_bench``), wall clock elsewhere.

GPU kernel timing: one call to settle, a 3-call estimate, warm-up calls for about
``warmup_ms``, then ``reps`` timed calls (at least ``min_reps``, as many as fit in
about ``target_ms``, at most ``max_reps``), each between its own pair of CUDA
events. Before every timed call the L2 cache is flushed by zeroing a 256 MB buffer
(outside the events), so no call reads the previous call's data from L2, and the GPU
then spins for about 0.5 ms, so the host has launched the call before the start event
fires: the events time the GPU's work, not the host's Python.

Planning that waits on the host (FlashInfer's ``plan``, FlexAttention's
``create_block_mask``) is timed with :func:`time_wall`: a device sync, then the
call, then a device sync, on the host clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = ["Stats", "median_of_rounds", "time_device", "time_interleaved", "time_wall",
           "L2_FLUSH_NOTE"]

L2_FLUSH_NOTE = ("CUDA events; L2 flushed (256 MB memset) and the launch covered (0.5 ms GPU "
                 "spin) before each timed rep")
_FLUSH_BYTES = 256 * 1024 * 1024
# About 0.5 ms of spinning at H100/H200 clocks: more than a slow host needs to launch a
# graph, a kernel or a public call (its checks, selection and launch), so the start event
# fires just before the timed work. The memset alone (~0.08 ms) did not cover the public
# calls: bert_base_512's padded_prefill spends ~0.16 ms of host time per call, and its
# kernel_time read 0.089 to 0.198 ms on different hosts for the same 0.089 ms kernel
# (docs/performance.md).
_COVER_CYCLES = 1_000_000
_flush_buffers: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class Stats:
    """Quantiles of one measurement, in milliseconds."""

    p50: float
    p20: float
    p80: float
    reps: int


def _stats(times_ms: list[float]) -> Stats:
    arr = np.asarray(times_ms, dtype=np.float64)
    p20, p50, p80 = np.percentile(arr, [20, 50, 80])
    return Stats(float(p50), float(p20), float(p80), len(times_ms))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flush(device: torch.device) -> None:
    buf = _flush_buffers.get(device)
    if buf is None:
        buf = _flush_buffers[device] = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device)
    buf.zero_()


def _rep_count(estimate_ms: float, target_ms: float, min_reps: int, max_reps: int) -> int:
    return int(min(max(target_ms / max(estimate_ms, 1e-3), min_reps), max_reps))


def time_device(
    fn: Callable[[], object],
    device: torch.device,
    min_reps: int = 20,
    max_reps: int = 200,
    target_ms: float = 100.0,
    warmup_ms: float = 25.0,
    flush_l2: bool = True,
    cover_launch: bool = True,
) -> Stats:
    """Time ``fn`` on ``device``: CUDA events on a GPU, the host clock on a CPU.

    Parameters
    ----------
    fn : the call to time; its result is discarded
    device : where ``fn`` runs
    min_reps, max_reps : bounds on the number of timed calls
    target_ms : about how long all timed calls together should take
    warmup_ms : about how long to warm up
    flush_l2 : zero a 256 MB buffer before each timed call (GPU only)
    cover_launch : keep the GPU busy (a spin of ~0.5 ms, after the flush) before each
        start event, so the host's time to launch ``fn`` is not counted. Without it a
        call whose host time outlasts the GPU's queue is timed with the host's latency:
        a CUDA graph replay (H100, planning 1,000 spans: p50 62.8 us, p80 169 us,
        against 32.8 us at p20), or a public call at ~0.1-0.3 ms of kernel (H200,
        many_small through ``span_prefill``: p50 0.318 ms, against 0.241 ms for the same
        launch timed in the next row). False: the host's latency is part of the time
    """
    if device.type != "cuda":
        return time_wall(fn, device, min_reps=min_reps, max_reps=max_reps, target_ms=target_ms)
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate = start.elapsed_time(end) / 3
    for _ in range(min(int(warmup_ms / max(estimate, 1e-3)), 100)):
        fn()
    reps = _rep_count(estimate, target_ms, min_reps, max_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush_l2:
            _flush(device)
        if cover_launch:
            torch.cuda._sleep(_COVER_CYCLES)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _stats([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_wall(
    fn: Callable[[], object],
    device: torch.device,
    min_reps: int = 20,
    max_reps: int = 200,
    target_ms: float = 100.0,
) -> Stats:
    """Host wall-clock time of ``fn`` including waiting for the device, in ms."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    estimate = (time.perf_counter() - t0) * 1e3
    reps = _rep_count(estimate, target_ms, min_reps, max_reps)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return _stats(times)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int,
    timer: Callable[[Callable[[], object], torch.device], Stats] = time_device,
) -> dict[str, list[Stats]]:
    """Time every callable of ``fns`` once per round, over ``rounds`` rounds, each round
    starting one place later in the list.

    One A/B run on the H200 read the same kernel at 0.894 and 1.019 ms a few minutes
    apart: the GPU's clock and temperature drift over a run, so whichever variant is
    timed while the drift is low wins. Interleaving spreads each variant's samples over
    the whole run; the median over rounds of each round's p50 is then comparable.

    Parameters
    ----------
    fns : name -> the call to time (its result is discarded)
    device : where the calls run
    rounds : how many times each is timed (>= 1)
    timer : how one timing is taken (:func:`time_device`)

    Returns
    -------
    name -> one :class:`Stats` per round, in round order.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(fns)
    out: dict[str, list[Stats]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            out[name].append(timer(fns[name], device))
    return out


def median_of_rounds(stats: list[Stats]) -> Stats:
    """The median over rounds of each quantile (``reps``: the sum of all rounds')."""
    arr = np.asarray([(s.p50, s.p20, s.p80) for s in stats], dtype=np.float64)
    p50, p20, p80 = np.median(arr, axis=0)
    return Stats(float(p50), float(p20), float(p80), sum(s.reps for s in stats))
