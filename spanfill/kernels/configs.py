"""Launch settings of the attention kernel, chosen from a fixed table.

The table is keyed on what changes the best tile shape (head dim, dtype, GQA
group, device) and was tuned on an H100 with ``bench/``; serving never autotunes
on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes of one attention launch.

    Attributes
    ----------
    block_m : rows of the query block: ``block_q`` tokens times ``heads`` q heads
    block_n : KV positions per inner-loop step
    heads : q heads of one GQA group stacked into the query block
    num_warps, num_stages : Triton launch settings
    """

    block_m: int
    block_n: int
    heads: int
    num_warps: int
    num_stages: int

    @property
    def block_q(self) -> int:
        return self.block_m // self.heads


def _stacked_heads(group: int, block_m: int, min_tokens: int) -> int:
    """Largest divisor of the GQA group that leaves at least ``min_tokens`` per tile."""
    best = 1
    for h in range(1, group + 1):
        if group % h == 0 and block_m // h >= min_tokens:
            best = h
    return best


def pick_config(head_dim: int, dtype: torch.dtype, group: int, on_gpu: bool) -> AttentionConfig:
    """Tile sizes for a launch.

    Parameters
    ----------
    head_dim : D
    dtype : q dtype
    group : ``Hq // Hk``
    on_gpu : False under the Triton interpreter, where small blocks run faster
    """
    if not on_gpu:
        block_m, block_n, warps, stages = 32, 16, 4, 1
    elif dtype == torch.float32:
        block_m, block_n, warps, stages = (64, 32, 4, 2) if head_dim <= 128 else (32, 32, 4, 1)
    elif head_dim <= 64:
        block_m, block_n, warps, stages = 128, 64, 4, 3
    elif head_dim <= 128:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    else:
        block_m, block_n, warps, stages = 64, 64, 4, 2
    heads = _stacked_heads(group, block_m, min_tokens=16 if on_gpu else 8)
    return AttentionConfig(block_m, block_n, heads, warps, stages)
