"""Triton kernels. Nothing outside this package contains Triton code."""

from .append import append_kv_launch
from .attention import attention_fwd
from .configs import AttentionConfig, pick_config

__all__ = ["append_kv_launch", "attention_fwd", "AttentionConfig", "pick_config"]
