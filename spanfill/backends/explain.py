"""What ``spanfill info`` prints: for typical calls of each op, the backend, its
launch config, and why.

The calls are described by shape only: their tensors are broadcast views of one
small allocation, or a one-page cache, which is all selection reads (shapes, strides,
pointers).
"""

from __future__ import annotations

import torch

from .problem import AttentionProblem, dense_problem, paged_problem
from .registry import select_backend

__all__ = ["example_problems", "explain"]


def _rows(rows: int, heads: int, head_dim: int, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """A ``[rows, heads, head_dim]`` view of one row: the metadata of a real tensor."""
    return torch.empty(1, heads, head_dim, dtype=dtype, device=device).expand(rows, heads, head_dim)


def example_problems(device: torch.device) -> list[tuple[str, AttentionProblem]]:
    """Typical calls of each op on ``device`` (bf16 on a GPU, fp32 elsewhere)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # One real page each (the pool's page count is not read; its strides are: whole NHD
    # pages, as a real cache has them).
    cache = torch.empty(1, 16, 8, 128, dtype=dtype, device=device)
    bert = [_rows(64 * 512, 12, 64, dtype, device)] * 3
    enc = [_rows(16 * 2048, 16, 128, dtype, device)] * 3
    cache_d256 = torch.empty(1, 16, 8, 256, dtype=dtype, device=device)
    return [
        ("span_prefill  1 token of an 8k prompt (GQA 32/8, D=128, page 16)",
         paged_problem(_rows(1, 32, 128, dtype, device), cache, 1, 512, True)),
        ("span_prefill  4 x 512 span tokens over 2 x 8k (GQA 32/8, D=128)",
         paged_problem(_rows(2048, 32, 128, dtype, device), cache, 2, 512, True)),
        ("span_prefill  8 x 256 span tokens over 2 x 8k (GQA 16/8, D=256)",
         paged_problem(_rows(4096, 16, 256, dtype, device), cache_d256, 2, 512, True)),
        ("padded_prefill B64 x S512, 12 heads, D=64 (bert-base)",
         dense_problem("padded", *bert, 64, 512, False)),
        ("padded_prefill B16 x S2048, 16 heads, D=128",
         dense_problem("padded", *enc, 16, 2048, False)),
        ("varlen_prefill 16 sequences, 32k tokens, causal, D=128",
         dense_problem("varlen", *enc, 16, 16 * 2048, True)),
    ]


def explain(problem: AttentionProblem, backend: str | None = None) -> str:
    """``backend  config  (why)`` for one call, as the ops would choose."""
    try:
        chosen, reason = select_backend(problem, backend)
    except ValueError as err:
        return f"error: {err}"
    return f"{chosen.name:<9} {chosen.select_config(problem).describe()}\n{'':18}why: {reason}"
