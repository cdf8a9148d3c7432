"""Triton kernels. Nothing outside this package contains Triton code."""

from .append import append_kv_launch
from .attention import attention_fwd, dense_kv_uses_tma
from .configs import AttentionConfig, pick_config, pick_num_splits
from .merge import merge_states_launch, merge_two_launch
from .plan import MAX_PLAN_TILES, plan_packed_launch

__all__ = [
    "append_kv_launch", "attention_fwd", "dense_kv_uses_tma", "AttentionConfig", "pick_config",
    "pick_num_splits", "MAX_PLAN_TILES", "plan_packed_launch", "merge_states_launch",
    "merge_two_launch",
]
