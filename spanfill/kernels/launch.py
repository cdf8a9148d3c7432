"""Launch a Triton kernel again without Triton's per-call argument binding.

``kernel[grid](...)`` binds and specializes every argument on every call and
looks the result up in Triton's cache: on the H100 machines that is most of the
~68 us Triton spends per launch of the attention kernel, about half of a
``padded_prefill`` call's host time (``scripts/profile_host.py``), which makes
small batches host-bound. Once a launch has compiled (or found) its kernel, a
later launch whose arguments specialize the same way can hand them straight to
that kernel, the way Triton's own launch finally does.

The key holds what Triton specializes a kernel on: the constexprs and launch
options, each tensor's dtype and 16-byte alignment, each integer's width and
whether it is 1 or a multiple of 16 (over-specifying only adds cache entries).
Anything else (a tensor descriptor, an unknown type) takes Triton's path.
``SPANFILL_FAST_LAUNCH=0`` turns the shortcut off.
"""

from __future__ import annotations

import os
from typing import Any

import torch

_INT32 = (-(1 << 31), 1 << 31)


def _arg_key(args: tuple) -> tuple | None:
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool):
            key.append(("b", a))
        elif isinstance(a, int):
            key.append((a == 1, a % 16 == 0, _INT32[0] <= a < _INT32[1]))
        elif isinstance(a, float):
            key.append("f")
        else:
            return None
    return tuple(key)


class CachedLauncher:
    """``launcher(grid, args, constexprs, num_warps=..., num_stages=...)``: a 1-D launch.

    Parameters
    ----------
    fn : a ``@triton.jit`` function; ``args`` are its non-constexpr parameters in
        order, ``constexprs`` its constexpr parameters by name (all of them)
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self._kernels: dict[tuple, Any] = {}
        params = getattr(fn, "params", None)  # None under the interpreter
        flags = [] if params is None else [p.is_constexpr for p in params]
        # Only for signatures whose constexprs all come last (see the launch below).
        trailing = bool(flags) and flags == sorted(flags)
        self._constexpr_names = [p.name for p in params if p.is_constexpr] if trailing else None

    def __call__(self, grid: int, args: tuple, constexprs: dict[str, Any], num_warps: int,
                 num_stages: int, device: torch.device) -> Any:
        key = None
        if (device.type == "cuda" and self._constexpr_names is not None
                and os.environ.get("SPANFILL_FAST_LAUNCH", "1") != "0"):
            arg_key = _arg_key(args)
            if arg_key is not None:
                key = (device.index, num_warps, num_stages,
                       tuple(constexprs[n] for n in self._constexpr_names), arg_key)
                kernel = self._kernels.get(key)
                if kernel is not None:
                    stream = torch.cuda.current_stream(device).cuda_stream
                    # All bound arguments in signature order, constexprs included,
                    # as Triton's launch passes them (the constexprs come last here).
                    kernel[(grid, 1, 1)](*args, *(constexprs[n] for n in self._constexpr_names),
                                         stream=stream)
                    return kernel
        kernel = self.fn[(grid,)](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        if key is not None and kernel is not None:
            self._kernels[key] = kernel
        return kernel
