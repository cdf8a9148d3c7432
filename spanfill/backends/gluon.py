"""The Hopper (Gluon) backend: :mod:`spanfill.kernels_gluon`, opt-in while it is slower.

It is registered, so ``backend="gluon"`` (or ``SPANFILL_BACKEND=gluon``) runs it where
it supports the call, but it is not in the selection order: its kernel is correct on
the H200 (``tests/test_gluon_gpu.py``) and still slower than the portable one
(``docs/performance.md``). Today it covers dense K/V (``padded_prefill``,
``varlen_prefill``) in fp16/bf16 with D 64 or 128, causal or not, without sliding
windows or soft caps, in 64-row programs (the kernel's 128-row and D=256 forms wait for
their first GPU run).
"""

from __future__ import annotations

import torch

from .problem import AttentionProblem, LaunchConfig

__all__ = ["GluonHopperBackend"]

# Tiles of the first kernel: 64 query rows (one warp group), 128 KV positions per
# step, a two-stage K/V ring.
BLOCK_M, BLOCK_N, STAGES = 64, 128, 2


class GluonHopperBackend:
    """The Gluon kernels for Hopper (sm_90) GPUs."""

    name = "gluon"

    def supports_device(self, device: torch.device) -> tuple[bool, str]:
        if device.type != "cuda":
            return False, f"{device.type} tensors: the Gluon kernels need a Hopper GPU"
        major = torch.cuda.get_device_capability(device)[0]
        if major != 9:
            return False, f"sm_{major}x GPU: the Gluon kernels are for Hopper (sm_90)"
        return True, "Hopper GPU: the Gluon kernels (TMA, wgmma)"

    def supports(self, problem: AttentionProblem) -> tuple[bool, str]:
        ok, reason = self.supports_device(problem.device)
        if not ok:
            return ok, reason
        if problem.paged:
            return False, "paged KV: not in the Gluon family yet (the portable kernel has it)"
        if problem.dtype not in (torch.float16, torch.bfloat16) or problem.kv_dtype != problem.dtype:
            return False, f"{problem.dtype} / {problem.kv_dtype}: fp16 or bf16 only"
        if problem.head_dim not in (64, 128):
            return False, f"D={problem.head_dim}: 64 or 128 only"
        if problem.window_left >= 0 or problem.logits_soft_cap > 0:
            return False, "sliding window / soft cap: not in the Gluon family yet"
        q, k, _ = problem.dense_kv
        for name, t in (("q", q), ("k", k)):
            if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1] or (t.stride(0) * t.element_size()) % 16:
                return False, f"{name} rows are not [H * D] contiguous with 16-byte row strides"
        return True, "dense fp16/bf16 K/V, D 64/128: the Gluon kernel (TMA, wgmma)"

    def select_config(self, problem: AttentionProblem) -> LaunchConfig:
        from .triton_config import AttentionConfig

        # The tile object says block_q (the plan's tile height) and the launch shape.
        return LaunchConfig(AttentionConfig(BLOCK_M, BLOCK_N, 1, 4, STAGES), use_tma=True)

    def attend(self, config: LaunchConfig, plan, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, sm_scale: float, causal: bool, return_lse: bool,
               zero_fill: bool = False, window_left: int = -1, logits_soft_cap: float = 0.0,
               k_scale=None, v_scale=None, **unsupported) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Allocate the outputs and launch (the same run step as the portable backend's).

        Parameters
        ----------
        q : [T, Hq, D]; k, v : [rows, Hk, D] dense
        plan : :class:`spanfill.layout.TilePlan` built with ``config.block_q``
        """
        from ..kernels_gluon.attention import attention_fwd_dense

        if window_left >= 0 or logits_soft_cap > 0 or k_scale is not None or unsupported:
            raise ValueError("the Gluon backend got a variant its supports() refuses")
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device) \
            if return_lse else None
        tile = config.tile
        attention_fwd_dense(q, k, v, out, lse, plan, sm_scale, causal, zero_fill=zero_fill,
                            block_m=tile.block_m, block_n=tile.block_n, stages=tile.num_stages)
        return out, lse
