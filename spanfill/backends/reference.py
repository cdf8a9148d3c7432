"""The reference backend: :mod:`spanfill.reference` in plain PyTorch, on any device.

It is the semantics, not a fast path: it differentiates with autograd and runs
where no kernel does (CPU tensors without Triton's interpreter).
"""

from __future__ import annotations

import torch

from .problem import AttentionProblem, LaunchConfig

__all__ = ["ReferenceBackend"]


class ReferenceBackend:
    """Plain PyTorch (``spanfill/reference.py``): supports every problem."""

    name = "reference"

    def supports_device(self, device: torch.device) -> tuple[bool, str]:
        return True, "plain PyTorch (spanfill/reference.py) runs on any device"

    def supports(self, problem: AttentionProblem) -> tuple[bool, str]:
        return self.supports_device(problem.device)

    def auto_selects(self, problem: AttentionProblem | torch.device) -> tuple[bool, str]:
        return True, ""  # wherever it runs

    def select_config(self, problem: AttentionProblem) -> LaunchConfig:
        return LaunchConfig(tile=None)
