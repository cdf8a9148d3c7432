"""Tile waste: the work spanfill's kernel does on a plan against the work the FLOPs count.

The effective TFLOP/s of every row count exact FLOPs: each valid query row times the
KV positions it sees. The kernel does more: a tile computes all its ``block_q`` token
slots (a short span or a sample's last tile leaves some empty) against every
``BLOCK_N``-wide KV step its rows need (the causal diagonal and the KV edge are
masked inside the step, not skipped). :func:`tile_work` replays the kernel's
per-tile loop bounds (``_attn_fwd_kernel``) on the host and returns the ratio, so
a row's shortfall can be split into tile waste and the rate of the work done.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TileWork", "tile_work"]


@dataclass(frozen=True)
class TileWork:
    """Work of one launch, per q head (every head does the same).

    Attributes
    ----------
    tile_slots : sum over computing tiles of ``block_q`` x KV positions visited
    counted : sum over valid rows of the KV positions the row sees (what FLOPs count)
    row_fill : valid rows / (computing tiles x ``block_q``)
    tiles : computing tiles (padding entries excluded)
    """

    tile_slots: int
    counted: int
    row_fill: float
    tiles: int

    @property
    def ratio(self) -> float:
        """Work done / work counted (1.0: no waste)."""
        return self.tile_slots / max(self.counted, 1)


def _host(x: torch.Tensor | None) -> np.ndarray | None:
    return None if x is None else x.detach().to("cpu", torch.int64).numpy()


def tile_work(plan: object, block_n: int, causal: bool, positions: torch.Tensor | None = None,
              window_left: int = -1) -> TileWork:
    """The kernel's work on ``plan``, replaying its loop bounds (reads the plan to the host).

    Parameters
    ----------
    plan : :class:`spanfill.layout.TilePlan` (``tile_req``/``tile_row0``/``tile_row_end``
        [num_tiles] int32; ``q_start``/``q_len``/``kv_len`` [B] int32; ``block_q``)
    block_n : the launch's KV step (``AttentionConfig.block_n``)
    causal : a row at ``pos`` sees positions ``<= pos``
    positions : [T] int or None (rows at ``0, 1, ...`` within a request)
    window_left : if >= 0, a row at ``pos`` sees no position below ``pos - window_left``
    """
    req, row0, row_end = (_host(t) for t in (plan.tile_req, plan.tile_row0, plan.tile_row_end))
    q_start, q_len, kv_len = (_host(t) for t in (plan.q_start, plan.q_len, plan.kv_len))
    pos_all = _host(positions)
    block_q = int(plan.block_q)
    slots = counted = valid_rows = tiles = 0
    for b, r0, r1 in zip(req, row0, row_end):
        if b < 0:
            continue
        lo, hi = max(r0, q_start[b]), min(r1, q_start[b] + q_len[b])
        if hi <= lo:  # a padding entry: zeros, no attention
            continue
        rows = np.arange(lo, hi)
        pos = pos_all[rows] if pos_all is not None else rows - q_start[b]
        n_kv = int(kv_len[b])
        # Visible positions per row, as counted.
        top = np.minimum(pos + 1, n_kv) if causal else np.full_like(pos, n_kv)
        bottom = np.maximum(pos - window_left, 0) if window_left >= 0 else np.zeros_like(pos)
        counted += int(np.maximum(top - bottom, 0).sum())
        # The kernel's range: [kv_begin floored to block_n, kv_end), whole steps.
        kv_end = min(int(pos.max()) + 1, n_kv) if causal else n_kv
        kv_begin = max(int(pos.min()) - window_left, 0) if window_left >= 0 else 0
        kv_begin -= kv_begin % block_n
        steps = max(-(-(kv_end - kv_begin) // block_n), 0)
        slots += block_q * steps * block_n
        valid_rows += hi - lo
        tiles += 1
    return TileWork(slots, counted, valid_rows / max(tiles * block_q, 1), tiles)
