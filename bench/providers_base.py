"""What every provider returns, and the backend spanfill's providers use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Prepared", "Unsupported", "spanfill_backend", "window_of"]


@dataclass
class Prepared:
    """What the runner needs from a provider.

    Attributes
    ----------
    run : the call to time (kernel time)
    output : runs the op once and returns it in canonical rows (see bench.check);
        None when ``own_check`` replaces the reference comparison
    plan : per-layout planning, timed separately, or None
    flops : FLOPs to rate ``run`` with, if not the workload's
    own_check : returns the relative error for a provider that solves a different
        problem (the dense ceilings)
    expect_wrong : the provider is known to compute something else; its error is
        recorded and it is timed anyway
    note : goes into the CSV
    tile_work : spanfill only: the kernel's work on its plan against the counted
        work (:func:`bench.tile_work.tile_work`), written as a ``tile_work`` row
    host : a call whose host time per call, with no device sync, becomes a
        ``host_time`` row (what a loop pays per call when the GPU keeps up)
    checker : checks ``output`` instead of the workload's checker, for a provider
        whose inputs differ from the workload's on purpose (an fp8 cache: the
        reference on the dequantized cache); the workload's checker then gives the
        ``quant_relerr`` row, what the different inputs cost in accuracy
    """

    run: Callable[[], object]
    output: Callable[[], torch.Tensor] | None = None
    plan: Callable[[], object] | None = None
    flops: float | None = None
    own_check: Callable[[], float] | None = None
    expect_wrong: bool = False
    note: str = ""
    tile_work: Callable[[], object] | None = None
    host: Callable[[], object] | None = None
    checker: Callable[[torch.Tensor], float] | None = None


def spanfill_backend(device: torch.device) -> str | None:
    """spanfill's own choice on a GPU; the reference on a CPU, even under
    ``TRITON_INTERPRET=1`` (the smoke run tests the suite, not the kernels)."""
    return None if device.type == "cuda" else "reference"


class Unsupported(Exception):
    """Raised by a provider that cannot compute this workload (e.g. a sliding window):
    the runner writes a ``skipped`` row with the message as its note, not an error."""


def window_of(w: object) -> int:
    """The workload's ``window_left`` (-1: none, also for workloads without the field)."""
    return int(getattr(w, "window_left", -1))


def dense_ceiling_inputs(w: object, t: object) -> tuple[torch.Tensor, ...]:
    """The inputs of a dense causal ceiling (``sdpa_*_dense``, ``fa4_dense``): one prompt
    as long as the workload's longest, MHA with its q heads, drawn from the workload's
    seed, so every ceiling of a workload times and checks the same tensors.

    Parameters
    ----------
    w : a segmented workload (``seq_lens``, ``num_q_heads``, ``head_dim``, ``seed``)
    t : its tensors (only ``q``'s device and dtype are used)

    Returns
    -------
    q, k, v : [n, Hq, D] in ``t.q``'s dtype, and the FLOPs of causal attention over them
    (the causal half of ``4 * Hq * D * n^2``).
    """
    if window_of(w) >= 0:
        raise Unsupported("dense causal ceiling has no sliding window: not comparable")
    device, n, hq, d = t.q.device, max(w.seq_lens), w.num_q_heads, w.head_dim
    gen = torch.Generator(device=device)
    gen.manual_seed(w.seed + 7)
    q, k, v = (torch.randn((n, hq, d), generator=gen, device=device).to(t.q.dtype)
               for _ in range(3))
    return q, k, v, 4.0 * hq * d * n * (n + 1) / 2
