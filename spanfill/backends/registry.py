"""The backend registry: one selection order, one override, one reason.

Backends are tried in :data:`ORDER`; the first whose ``auto_selects(problem)`` and
``supports(problem)`` both say yes runs the call (``supports``: it can run it;
``auto_selects``: it is the one to take, as a family that is correct but measured
slower on a problem declines it). ``backend=`` on an op, or the ``SPANFILL_BACKEND``
environment variable, names one instead (``"auto"``: the order). Selection reads host-known
metadata only (see :mod:`spanfill.backends.problem`).
"""

from __future__ import annotations

import os
import warnings
from typing import Protocol

import torch

from .gluon import GluonHopperBackend
from .problem import AttentionProblem, LaunchConfig
from .reference import ReferenceBackend
from .triton import PortableTritonBackend

__all__ = ["AUTO", "Backend", "ORDER", "CHOICES", "get_backend", "select_backend",
           "requested_backend"]


class Backend(Protocol):
    """What every kernel family (and the reference) answers, from host metadata only."""

    name: str

    def supports_device(self, device: torch.device) -> tuple[bool, str]:
        """Whether it can run at all on ``device``, and why (planning asks this)."""

    def supports(self, problem: AttentionProblem) -> tuple[bool, str]:
        """Whether it runs ``problem``, and why (or why not)."""

    def auto_selects(self, problem: AttentionProblem | torch.device) -> tuple[bool, str]:
        """Whether the automatic choice takes it for a problem (or device) it supports."""

    def select_config(self, problem: AttentionProblem) -> LaunchConfig:
        """Tiles, splits and descriptors for ``problem``; no sync, no allocation."""


# The selection order: the Hopper family where it is the faster one (spans at D=128 and
# 256), the portable kernels where they run, the reference everywhere else.
ORDER: tuple[Backend, ...] = (GluonHopperBackend(), PortableTritonBackend(), ReferenceBackend())
AUTO = "auto"
CHOICES = (AUTO,) + tuple(b.name for b in ORDER)


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``."""
    for backend in ORDER:
        if backend.name == name:
            return backend
    raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")


def requested_backend(backend: str | None = None) -> str:
    """``backend``, else ``$SPANFILL_BACKEND``, else ``"auto"``; checked against :data:`CHOICES`."""
    choice = backend or os.environ.get("SPANFILL_BACKEND", AUTO)
    if choice not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {choice!r}")
    return choice


def select_backend(problem: AttentionProblem | torch.device,
                   backend: str | None = None) -> tuple[Backend, str]:
    """The backend that runs ``problem``, and the reason it was chosen.

    Parameters
    ----------
    problem : the call, or only a device (what planning knows)
    backend : a backend name or "auto"; None reads ``$SPANFILL_BACKEND``

    Raises
    ------
    ValueError
        for an unknown name, or a named backend that cannot run the problem.
    """
    choice = requested_backend(backend)

    def check(b: Backend) -> tuple[bool, str]:
        if isinstance(problem, torch.device):
            return b.supports_device(problem)
        return b.supports(problem)

    if choice != AUTO:
        chosen = get_backend(choice)
        ok, reason = check(chosen)
        if not ok:
            raise ValueError(f"backend={choice!r} cannot run here: {reason}")
        return chosen, f"asked for ({'backend=' if backend else 'SPANFILL_BACKEND='}{choice}): {reason}"
    refused = []
    for candidate in ORDER:
        # The preference first: it reads only the op and D, so a family that declines
        # costs every call almost nothing on the host.
        wanted, preference = candidate.auto_selects(problem)
        ok, reason = check(candidate) if wanted else (False, preference)
        if ok and preference:
            reason = preference
        if ok:
            why = f"{reason}" + (f" (not {'; not '.join(refused)})" if refused else "")
            if candidate.name == "reference" and isinstance(problem, AttentionProblem) \
                    and problem.device.type == "cuda":
                # Correct but far slower than a kernel: say so rather than fall back unseen.
                warnings.warn(f"spanfill runs {problem.op} on the reference path: {why}",
                              stacklevel=3)
            return candidate, why
        refused.append(f"{candidate.name}: {reason}")
    raise AssertionError("the reference backend supports every problem")
