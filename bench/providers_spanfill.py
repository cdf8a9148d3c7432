"""spanfill's own providers: kernel time on a prebuilt layout, planning timed apart.

The layout and its tile plan are built once per batch and reused by every layer,
so the kernel is timed on a prebuilt layout and the planning (what a new batch
costs: ``from_tensors(validate=False)`` or ``PaddedLayout.build(validate=False)``
plus ``tile_plan``) is a separate row. The plan's tile size is read from the
layout after one real call, so the timed plan is the one the kernel used.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

import spanfill as sf
from spanfill.backends import (AttentionProblem, LaunchConfig, dense_problem, get_backend,
                               paged_problem, select_backend)

from .check import packed_valid_index
from .providers_base import Prepared, Unsupported, spanfill_backend, window_of
from .tile_work import TileWork, tile_work
from .workloads import PaddedTensors, PaddedWorkload, SegmentedTensors, SegmentedWorkload

__all__ = ["block_q_for", "spanfill_segmented", "spanfill_padded", "spanfill_padded_kernel",
           "spanfill_nopad", "spanfill_raw_lens", "spanfill_varlen", "spanfill_gluon",
           "spanfill_gluon_span", "spanfill_portable_span"]


def _kernel_config(problem: AttentionProblem) -> LaunchConfig:
    """The config the ops launch ``problem`` with: the automatic choice's on a GPU (the
    Gluon family for D=256 spans, else the portable kernels), the portable kernels'
    elsewhere (the CPU rows run the reference; this gives their tile work)."""
    if problem.device.type == "cuda":
        chosen, _ = select_backend(problem, "auto")
        if chosen.name != "reference":
            return chosen.select_config(problem)
    return get_backend("triton").select_config(problem)


def block_q_for(head_dim: int, dtype: torch.dtype, group: int, device: torch.device,
                paged: bool) -> int:
    """Query tokens per tile of the kernels' config for one request of that shape."""
    q = torch.empty(1, group, head_dim, dtype=dtype, device=device)
    if paged:
        k_cache = torch.empty(1, 16, 1, head_dim, dtype=dtype, device=device)
        problem = paged_problem(q, k_cache, 1, 1, True)
    else:
        kv = torch.empty(1, 1, head_dim, dtype=dtype, device=device)
        problem = dense_problem("padded", q, kv, kv, 1, 1, False)
    return _kernel_config(problem).block_q


def _plan_key(layout: object, fallback: Callable[[], int], causal: bool) -> tuple[int, bool]:
    """(block_q, causal) of the plan the kernel built on ``layout``, else the table's."""
    used = list(getattr(layout, "_plans", None) or {})
    return used[0] if used else (fallback(), causal)


def spanfill_segmented(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
    """sf.span_prefill on the prebuilt layout; plan = from_tensors(validate=False) + tile_plan."""
    layout = t.layout
    backend = spanfill_backend(t.q.device)
    window = window_of(w)
    # Only passed when on, so the unwindowed rows call exactly what they always did.
    extra = {"window_left": window} if window >= 0 else {}

    def run() -> torch.Tensor:
        return sf.span_prefill(t.q, t.k_cache, t.v_cache, layout, backend=backend, **extra)

    run()
    problem = paged_problem(t.q, t.k_cache, layout.num_requests, layout.block_table.shape[1], True,
                            window)
    key = _plan_key(layout, lambda: _kernel_config(problem).block_q, True)

    def plan() -> object:
        fresh = sf.SpanLayout.from_tensors(
            layout.positions, layout.query_start_loc, layout.seq_lens, layout.block_table,
            layout.page_size, validate=False,
        )
        return fresh.tile_plan(*key)

    note = f"prebuilt SpanLayout; plan block_q={key[0]}"
    if window >= 0:
        note += f"; window_left={window}"

    def work() -> TileWork:
        # On a CPU the reference ran; this is the kernel's work with the CPU tile sizes.
        block_n = _kernel_config(problem).tile.block_n
        return tile_work(layout.tile_plan(*key), block_n, True, layout.positions, window)

    return Prepared(run, run, plan, note=note, tile_work=work)


def spanfill_padded(w: PaddedWorkload, t: PaddedTensors) -> Prepared:
    """sf.padded_prefill on [B, S, H, D] with a prebuilt PaddedLayout (when the API has it)."""
    idx = packed_valid_index(t.valid_lens, w.seq_len)
    backend = spanfill_backend(t.q.device)
    layout_cls = getattr(sf, "PaddedLayout", None)
    lens_or_layout = t.valid_lens if layout_cls is None else \
        layout_cls.build(t.valid_lens, w.seq_len)

    def run() -> torch.Tensor:
        return sf.padded_prefill(t.q, t.k, t.v, lens_or_layout, causal=w.causal, backend=backend)

    run()
    plan = None
    note = "valid_lens (no PaddedLayout in this spanfill)"
    if layout_cls is not None:
        key = _plan_key(lens_or_layout,
                        lambda: block_q_for(w.head_dim, t.q.dtype, 1, t.q.device, False),
                        w.causal)

        def plan() -> object:
            return layout_cls.build(t.valid_lens, w.seq_len, validate=False).tile_plan(*key)

        note = f"prebuilt PaddedLayout; plan block_q={key[0]}"
    return Prepared(run, lambda: run().reshape(-1, w.num_heads, w.head_dim)[idx], plan, note=note)


def spanfill_raw_lens(w: PaddedWorkload, t: PaddedTensors) -> Prepared:
    """sf.padded_prefill with the raw ``valid_lens`` tensor, the same one every call, as a
    model passing it to every layer does: checked and planned on the first call, reused
    on the next ones (issue 17, item 2; ``spanfill`` is the prebuilt-layout partner)."""
    idx = packed_valid_index(t.valid_lens, w.seq_len)
    backend = spanfill_backend(t.q.device)

    def run() -> torch.Tensor:
        return sf.padded_prefill(t.q, t.k, t.v, t.valid_lens, causal=w.causal, backend=backend)

    run()
    return Prepared(run, lambda: run().reshape(-1, w.num_heads, w.head_dim)[idx],
                    note="raw valid_lens, the same tensor every call (memoised layout)")


def spanfill_padded_kernel(w: PaddedWorkload, t: PaddedTensors) -> Prepared:
    """The attention kernel alone on the padded batch, plan prebuilt, launched exactly as
    sf.padded_prefill launches it: the like-for-like partner of ``spanfill_nopad`` for
    "padded rows cost nothing" (both without the public call's argument checks)."""
    if t.q.device.type != "cuda" or getattr(sf, "PaddedLayout", None) is None:
        return spanfill_padded(w, t)
    idx = packed_valid_index(t.valid_lens, w.seq_len)
    b, s, h, d = t.q.shape
    qr, kr, vr = (x.reshape(b * s, x.shape[2], d) for x in (t.q, t.k, t.v))
    try:
        problem = dense_problem("padded", qr, kr, vr, b, s, w.causal)
        chosen, _ = select_backend(problem, "triton")
        cfg = chosen.select_config(problem)
        plan = sf.PaddedLayout.build(t.valid_lens, s).tile_plan(cfg.block_q, w.causal)
        scale = 1.0 / math.sqrt(d)

        def run() -> torch.Tensor:
            return chosen.attend(cfg, plan, qr, kr, vr, scale, w.causal, False, zero_fill=True)[0]

        run()
    except Exception as exc:  # an older spanfill: the public call instead
        prepared = spanfill_padded(w, t)
        prepared.note += f"; kernel-only path failed ({type(exc).__name__}: {exc})"
        return prepared
    return Prepared(run, lambda: run()[idx], note="attention kernel on the padded batch, plan "
                                                   "prebuilt, zero-filled padding (spanfill "
                                                   "internals, as padded_prefill calls them)",
                    tile_work=lambda: tile_work(plan, cfg.tile.block_n, w.causal))


def _pack(w: PaddedWorkload, t: PaddedTensors) -> tuple[torch.Tensor, ...]:
    idx = packed_valid_index(t.valid_lens, w.seq_len)
    qp, kp, vp = (x.reshape(-1, w.num_heads, w.head_dim)[idx].contiguous() for x in (t.q, t.k, t.v))
    cu = torch.zeros(len(w.valid_lens) + 1, dtype=torch.int32, device=t.q.device)
    cu[1:] = torch.cumsum(t.valid_lens, 0)
    return qp, kp, vp, cu


def spanfill_varlen(w: PaddedWorkload, t: PaddedTensors) -> Prepared:
    """Public sf.varlen_prefill over the valid tokens only (checks and plans every call)."""
    qp, kp, vp, cu = _pack(w, t)
    backend = spanfill_backend(t.q.device)

    def run() -> torch.Tensor:
        return sf.varlen_prefill(qp, kp, vp, cu, causal=w.causal, backend=backend)

    return Prepared(run, run, note="varlen_prefill, padding removed (untimed); "
                                   "per-call validation (host sync) and planning included")


def spanfill_nopad(w: PaddedWorkload, t: PaddedTensors) -> Prepared:
    """The varlen kernel alone on the valid tokens, plan prebuilt: the "padded rows cost
    nothing" baseline. Uses spanfill's internals as varlen_prefill does; falls back to
    the public call (plan and host sync included) if they are not there."""
    if t.q.device.type != "cuda":
        return spanfill_varlen(w, t)
    qp, kp, vp, cu = _pack(w, t)
    try:
        from spanfill.layout import plan_packed

        problem = dense_problem("varlen", qp, kp, vp, len(w.valid_lens), qp.shape[0], w.causal)
        chosen, _ = select_backend(problem, "triton")
        cfg = chosen.select_config(problem)
        plan = plan_packed(cu, (cu[1:] - cu[:-1]).to(torch.int32), qp.shape[0], cfg.block_q,
                           w.causal, kv_row0=cu[:-1].contiguous())
        scale = 1.0 / math.sqrt(w.head_dim)

        def run() -> torch.Tensor:
            return chosen.attend(cfg, plan, qp, kp, vp, scale, w.causal, False)[0]

        run()
    except Exception as exc:
        prepared = spanfill_varlen(w, t)
        prepared.note += f"; kernel-only path failed ({type(exc).__name__}: {exc})"
        return prepared
    return Prepared(run, run, note="varlen attention kernel on the valid tokens, plan prebuilt "
                                   "(spanfill internals, as varlen_prefill calls them)")


def _gluon_first_call(run: Callable[[], torch.Tensor]) -> None:
    """The first call; the backend refusing the workload (a window, D=32, not a Hopper
    GPU) becomes a ``skipped`` row with its reason, not an error row."""
    try:
        run()
    except ValueError as exc:
        if "cannot run here" in str(exc):
            raise Unsupported(str(exc)) from exc
        raise


def spanfill_portable_span(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
    """sf.span_prefill with ``backend="triton"``: the portable kernel, also where the
    automatic choice (``spanfill``) takes the Gluon family, so both are in one run."""
    extra = {"window_left": window_of(w)} if window_of(w) >= 0 else {}

    def run() -> torch.Tensor:
        return sf.span_prefill(t.q, t.k_cache, t.v_cache, t.layout, backend="triton", **extra)

    run()
    return Prepared(run, run, note="prebuilt SpanLayout; backend=triton (the portable kernel)")


def spanfill_gluon_span(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
    """sf.span_prefill with ``backend="gluon"`` on the prebuilt layout: the Hopper family
    over the page pool (a skipped row where it does not run: a window...)."""
    extra = {"window_left": window_of(w)} if window_of(w) >= 0 else {}

    def run() -> torch.Tensor:
        return sf.span_prefill(t.q, t.k_cache, t.v_cache, t.layout, backend="gluon", **extra)

    _gluon_first_call(run)
    return Prepared(run, run, note="prebuilt SpanLayout; backend=gluon (TMA per page + wgmma)")


def spanfill_gluon(w: PaddedWorkload, t: PaddedTensors) -> Prepared:
    """sf.padded_prefill with ``backend="gluon"``: the Hopper (Gluon) family, also where
    the automatic choice does not take it (a skipped row where it does not run: not
    Hopper, or a shape it refuses)."""
    idx = packed_valid_index(t.valid_lens, w.seq_len)
    layout = sf.PaddedLayout.build(t.valid_lens, w.seq_len)

    def run() -> torch.Tensor:
        return sf.padded_prefill(t.q, t.k, t.v, layout, causal=w.causal, backend="gluon")

    _gluon_first_call(run)
    return Prepared(run, lambda: run().reshape(-1, w.num_heads, w.head_dim)[idx],
                    note="prebuilt PaddedLayout; backend=gluon (TMA + wgmma)")
