"""FlashInfer peers (imported only when ``import flashinfer`` works).

Both read spanfill's paged cache directly (NHD, same page ids). FlashInfer's
causal mask in batch prefill is bottom-right aligned: row ``i`` of an entry with
``qo_len`` rows and ``kv_len`` keys sees keys ``j <= i + kv_len - qo_len``.

* ``span_entries``: every span is its own batch entry whose KV is the pages of
  ``[0, stop)``; causal, so a span row at position ``p`` sees ``[0, p]``.
* ``custom_mask``: one entry per request over its whole KV, with a dense
  ``[T_b, seq_len]`` mask ``key <= position`` (packed by ``plan``).

``plan`` (FlashInfer's per-layout scheduling, host side) is timed separately.

Sliding window (``window_left >= 0``): ``span_entries`` passes ``window_left`` to
``plan`` (FlashInfer's window is relative to the bottom-right aligned diagonal, which
is the span row's position here, since each entry's KV starts at position 0).
``custom_mask`` puts the window into its mask instead: its rows are not contiguous
positions, so FlashInfer's own window (relative to ``i + kv_len - qo_len``) would be
wrong there.
"""

from __future__ import annotations

import numpy as np
import torch

from .providers_base import Prepared, window_of
from .workloads import SegmentedTensors, SegmentedWorkload

__all__ = ["available", "span_entries", "custom_mask"]

_WORKSPACE_BYTES = 256 * 1024 * 1024
_workspaces: dict[torch.device, torch.Tensor] = {}


def available() -> tuple[bool, str]:
    """Whether ``import flashinfer`` works, and a one-line reason/version."""
    try:
        import flashinfer
    except Exception as exc:  # any import failure means: skip these providers
        return False, f"{type(exc).__name__}: {exc}"
    return True, f"flashinfer {getattr(flashinfer, '__version__', '?')}"


def _wrapper(device: torch.device):  # noqa: ANN202 - flashinfer type
    import flashinfer

    if device not in _workspaces:
        _workspaces[device] = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return flashinfer.BatchPrefillWithPagedKVCacheWrapper(_workspaces[device], "NHD")


def _i32(values: list[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int32), device=device)


def _entries(w: SegmentedWorkload, t: SegmentedTensors,
             kv_lens: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paged-KV metadata for entries ``(request, kv_len)``: indptr, indices, last_page_len."""
    table = t.block_table.cpu().numpy()
    page = w.page_size
    indptr, indices, last = [0], [], []
    for b, kv_len in kv_lens:
        pages = (kv_len + page - 1) // page
        indices.append(table[b, :pages])
        indptr.append(indptr[-1] + pages)
        last.append(kv_len - (pages - 1) * page)
    device = t.q.device
    return _i32(indptr, device), _i32(np.concatenate(indices), device), _i32(last, device)


def _prepared(w: SegmentedWorkload, t: SegmentedTensors, qo_indptr: torch.Tensor,
              kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor], note: str,
              **plan_args: object) -> Prepared:
    wrapper = _wrapper(t.q.device)
    kv_indptr, kv_indices, last_page_len = kv

    def plan() -> None:
        wrapper.plan(qo_indptr, kv_indptr, kv_indices, last_page_len, w.num_q_heads,
                     w.num_kv_heads, w.head_dim, w.page_size, q_data_type=t.q.dtype,
                     kv_data_type=t.k_cache.dtype, **plan_args)

    plan()

    def run() -> torch.Tensor:
        return wrapper.run(t.q, (t.k_cache, t.v_cache))

    return Prepared(run, run, plan, note=note)


def span_entries(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
    """One FlashInfer batch entry per span, KV = pages of [0, stop), causal."""
    lens, kv_lens = [], []
    for b, spans in enumerate(w.spans):
        for start, stop in spans:
            lens.append(stop - start)
            kv_lens.append((b, stop))
    qo_indptr = _i32(np.concatenate([[0], np.cumsum(lens)]), t.q.device)
    window = window_of(w)
    extra = {"window_left": window} if window >= 0 else {}
    note = f"{len(lens)} batch entries; plan = wrapper.plan"
    if window >= 0:
        note += f"; plan(window_left={window})"
    return _prepared(w, t, qo_indptr, _entries(w, t, kv_lens), note, causal=True, **extra)


def custom_mask(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
    """One FlashInfer batch entry per request over its whole KV, dense custom mask."""
    positions = t.layout.positions.long()
    qsl = t.layout.query_start_loc.tolist()
    window = window_of(w)
    masks = []
    for b, seq_len in enumerate(w.seq_lens):
        key = torch.arange(seq_len, device=t.q.device)[None, :]
        pos = positions[qsl[b]:qsl[b + 1], None]
        mask = key <= pos
        if window >= 0:
            mask = mask & (pos - key <= window)
        masks.append(mask.reshape(-1))
    mask = torch.cat(masks)
    kv = _entries(w, t, list(enumerate(w.seq_lens)))
    note = "one entry per request; plan = wrapper.plan incl. mask packing"
    if window >= 0:
        note += "; window in the custom mask"
    return _prepared(w, t, t.layout.query_start_loc, kv, note, custom_mask=mask)
