"""Append and attention in one launch against two (issue 17): ``spanfill_fused_append``
and ``spanfill_append_attend``.

Both write the span tokens' K/V into the cache and attend. The workload's cache
already holds those K/V (``SegmentedTensors``: span tokens = ``k_new``/``v_new``), so
every rep writes the same bytes back and the output is the plain ``spanfill`` row's.
Each gets a ``host_time`` row too: the host's time per call with nothing waiting on
the device, what a serving loop pays per layer before the GPU runs.
"""

from __future__ import annotations

import spanfill as sf

from .providers_base import Prepared, spanfill_backend, window_of
from .workloads import SegmentedTensors, SegmentedWorkload

__all__ = ["spanfill_append_attend", "spanfill_fused_append"]


def _extra(w: SegmentedWorkload) -> dict:
    window = window_of(w)
    return {"window_left": window} if window >= 0 else {}


def spanfill_fused_append(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
    """``sf.span_prefill(..., k_new=, v_new=)``: one launch writes and attends."""
    backend, extra = spanfill_backend(t.q.device), _extra(w)

    def run():
        return sf.span_prefill(t.q, t.k_cache, t.v_cache, t.layout, backend=backend,
                               k_new=t.k_new, v_new=t.v_new, **extra)

    run()
    return Prepared(run, run, host=run, note="prebuilt SpanLayout; append inside attention, "
                                             "one launch")


def spanfill_append_attend(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
    """``sf.append_kv`` then ``sf.span_prefill``: two launches, as fill_holes did."""
    backend, extra = spanfill_backend(t.q.device), _extra(w)

    def run():
        sf.append_kv(t.k_new, t.v_new, t.k_cache, t.v_cache, t.layout, backend=backend)
        return sf.span_prefill(t.q, t.k_cache, t.v_cache, t.layout, backend=backend, **extra)

    run()
    return Prepared(run, run, host=run, note="prebuilt SpanLayout; append_kv + span_prefill, "
                                             "two launches")
