"""Triton kernels. Nothing outside this package contains Triton code.

The kernels decide nothing: tiles, split-KV and descriptors come from the portable
backend (:mod:`spanfill.backends.triton_config`) as one ``LaunchConfig``.
"""

from .append import append_kv_launch
from .attention import attention_fwd
from .merge import merge_states_launch, merge_two_launch
from .plan import MAX_PLAN_TILES, plan_packed_launch

__all__ = [
    "append_kv_launch", "attention_fwd", "MAX_PLAN_TILES", "plan_packed_launch", "merge_states_launch",
    "merge_two_launch",
]
