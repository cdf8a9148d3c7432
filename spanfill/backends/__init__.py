"""Kernel families behind one registry.

Each backend answers ``supports(problem) -> (ok, reason)`` and
``select_config(problem) -> LaunchConfig`` from host-known metadata only; the ops
take the first backend of :data:`ORDER` that supports a call (or the one that
``backend=``/``SPANFILL_BACKEND`` names) and launch with its config. Today: the
Hopper family (:mod:`spanfill.kernels_gluon`, ``"gluon"``), which the automatic choice
takes only where it is the faster one (``backends/gluon.py``), the portable Triton
kernels (:mod:`spanfill.kernels`) and the reference.
"""

from .problem import AttentionProblem, LaunchConfig, dense_problem, paged_problem
from .registry import (
    AUTO, CHOICES, ORDER, Backend, get_backend, requested_backend, select_backend,
)
from .triton import interpreting, packed_tile_bound

__all__ = ["AUTO", "AttentionProblem", "Backend", "CHOICES", "LaunchConfig", "ORDER",
           "dense_problem", "get_backend", "interpreting", "packed_tile_bound", "paged_problem",
           "requested_backend", "select_backend"]
