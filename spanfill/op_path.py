"""Which device a command runs on and which path the ops take there.

Shared by the command line, the demo and the self-check; it imports only
:mod:`spanfill.ops` (lazily), so none of them has to import another.
"""

from __future__ import annotations

import torch

__all__ = ["pick_device", "path_name"]


def pick_device(name: str | None) -> torch.device:
    """``torch.device(name)``, or ``cuda`` when a GPU is visible and ``cpu`` otherwise."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def path_name(device: torch.device) -> str:
    """``kernel``, ``interpreter`` or ``reference``: what the ops run on ``device``."""
    from .ops import resolve_backend

    try:
        path = resolve_backend(device)
    except ValueError as err:
        return f"error: {err}"
    if path == "reference":
        return "reference"
    return "kernel" if device.type == "cuda" else "interpreter"
