"""Shared test setup.

Without CUDA the kernels can only run in Triton's interpreter, and the interpreter
is chosen when triton is first imported: so ``TRITON_INTERPRET=1`` is set here,
before any test module imports spanfill (and with it triton). With CUDA the real
kernels run and the variable is left alone.
"""

from __future__ import annotations

import hashlib
import os

# On a machine with several GPUs, scripts/gpu_suite.sh sets SPANFILL_TEST_GPUS and
# pytest-xdist workers spread over them round-robin: each worker's "cuda:0" is another
# GPU, and the rest stay visible after it, so the multi-GPU tests still run. This must
# happen before torch first touches CUDA, which reads CUDA_VISIBLE_DEVICES once.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
_gpus = int(os.environ.get("SPANFILL_TEST_GPUS", "1") or "1")
if _gpus > 1 and _worker.startswith("gw"):
    _first = int(_worker[2:]) % _gpus
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str((_first + i) % _gpus) for i in range(_gpus))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (floats) or -7 (ints) in place, so an unwritten element fails loudly."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-7)


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A hash of the exact bytes of ``tensors``: equal digests mean bit-for-bit equal."""
    h = hashlib.sha256()
    for t in tensors:
        data = t.detach().contiguous().cpu()
        h.update(str((tuple(data.shape), data.dtype)).encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests when there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
