"""How the kernels take fp8 K/V scales (host side, shared by attention and append)."""

from __future__ import annotations

import torch


def kv_scale_args(k_scale: float | torch.Tensor | None, v_scale: float | torch.Tensor | None):
    """``(KV_SCALES, k_scale, v_scale, scale_stride)`` as the kernels take them.

    None scales stay None: Triton makes a None argument a constant, so K/V without
    scales compile to the same kernel as before scales existed. A float pair passes
    as floats (no device tensor to allocate); tensors as pointers with the stride
    between KV heads (0 for one scale shared by every head).
    """
    if k_scale is None and v_scale is None:
        return 0, None, None, None
    if k_scale is None or v_scale is None:
        raise ValueError("k_scale and v_scale go together: pass both or neither")
    if not torch.is_tensor(k_scale) and not torch.is_tensor(v_scale):
        return 1, float(k_scale), float(v_scale), None
    k_t, v_t = (s if torch.is_tensor(s) else torch.full((1,), float(s), device=other.device)
                for s, other in ((k_scale, v_scale), (v_scale, k_scale)))
    k_t, v_t = k_t.reshape(-1).contiguous(), v_t.reshape(-1).contiguous()  # no copy if already
    if k_t.numel() != v_t.numel():  # one per head for both, or one for all for both
        n = max(k_t.numel(), v_t.numel())
        k_t, v_t = (t.expand(n).contiguous() if t.numel() == 1 else t for t in (k_t, v_t))
    return 2, k_t, v_t, (1 if k_t.numel() > 1 else 0)
