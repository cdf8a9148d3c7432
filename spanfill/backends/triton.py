"""The portable Triton backend: the ``tl`` kernels of :mod:`spanfill.kernels`.

They run on any CUDA GPU, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported). :meth:`select_config` is
the one place a launch's tiles, split count and descriptor use are decided.
"""

from __future__ import annotations

import torch

from .problem import AttentionProblem, LaunchConfig
from .triton_config import interpreting

__all__ = ["PortableTritonBackend", "interpreting", "packed_tile_bound"]


def packed_tile_bound(num_tokens: int, num_requests: int, block_q: int) -> int:
    """A host-known upper bound of the tiles of ``num_tokens`` rows in ``num_requests``.

    ``sum_b ceil(n_b / block_q) <= (T + B * (block_q - 1)) // block_q``, attained when
    every request ends one row into a tile. It sizes the grid and is the program count
    split-KV decides on, so it is kept tight (at least 1).
    """
    return max((num_tokens + num_requests * (block_q - 1)) // block_q, 1)


class PortableTritonBackend:
    """The portable Triton kernels (every GPU; the CPU through the interpreter)."""

    name = "triton"

    def supports_device(self, device: torch.device) -> tuple[bool, str]:
        if device.type == "cuda":
            return True, "CUDA tensors: the portable Triton kernels"
        if interpreting():
            return True, f"{device.type} tensors with TRITON_INTERPRET=1: the kernels in Triton's interpreter"
        return False, (f"{device.type} tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
                       "before importing spanfill")

    def supports(self, problem: AttentionProblem) -> tuple[bool, str]:
        return self.supports_device(problem.device)

    def auto_selects(self, problem: AttentionProblem | torch.device) -> tuple[bool, str]:
        return True, ""  # wherever it runs

    def select_config(self, problem: AttentionProblem) -> LaunchConfig:
        """Tiles from the tuned table, then split-KV for span launches of few tiles over
        long KV, and tensor descriptors for dense K/V where they pay."""
        from .triton_config import dense_kv_uses_tma, launch_config, pick_config, pick_num_splits

        on_gpu = problem.device.type == "cuda"
        variants = dict(window_left=problem.window_left, has_kv_start=problem.has_kv_bounds)
        if problem.paged:
            tile = pick_config(problem.head_dim, problem.dtype, problem.group, on_gpu, paged=True)
            tiles = packed_tile_bound(problem.num_tokens, problem.num_requests, tile.block_q)
            splits = pick_num_splits(tiles * (problem.num_q_heads // tile.heads),
                                     problem.max_kv_len, tile, problem.device)
            return launch_config(tile, problem.dtype, problem.head_dim, num_splits=splits,
                                 **variants)
        q, k, v = problem.dense_kv
        tma = dense_kv_uses_tma(q, k, v, problem.num_requests)
        tile = pick_config(problem.head_dim, problem.dtype, problem.group, on_gpu, paged=False,
                           tma=tma)
        return launch_config(tile, problem.dtype, problem.head_dim, use_tma=tma, **variants)

    def attend(
        self,
        config: LaunchConfig,
        plan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        sm_scale: float,
        causal: bool,
        return_lse: bool,
        **variants,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Allocate the outputs and launch: the run step every op shares.

        Parameters
        ----------
        config : from :meth:`select_config` for this call
        plan : :class:`spanfill.layout.TilePlan` built with ``config.block_q``
        q : [T, Hq, D]; k, v : dense ``[rows, Hk, D]`` or paged
            ``[num_pages, page_size, Hk, D]`` (with ``block_table``)
        sm_scale : softmax scale
        causal : a row at ``pos`` sees KV positions ``<= pos``
        return_lse : also allocate and write the [T, Hq] fp32 lse
        **variants : ``positions``, ``block_table``, ``zero_fill``, ``kv_start``,
            ``window_left``, ``logits_soft_cap``, passed to
            :func:`spanfill.kernels.attention_fwd` as they are

        Returns
        -------
        out : [T, Hq, D] q.dtype
        lse : [T, Hq] fp32, or None
        """
        from ..kernels import attention_fwd

        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device) \
            if return_lse else None
        attention_fwd(q, k, v, out, lse, plan, config, sm_scale, causal, **variants)
        return out, lse
