"""spanfill: attention for padded prefill and for segmented prefill over a paged KV
cache with holes, as Triton kernels on PyTorch tensors."""

from .cache import PagedKVCache
from .layout import PaddedLayout, SpanLayout, TilePlan, VarlenLayout
from .merge import merge_states, merge_states_n
from .ops import append_kv, padded_prefill, resolve_backend, span_prefill, varlen_prefill

__version__ = "0.1.0"

__all__ = [
    "PagedKVCache",
    "PaddedLayout",
    "SpanLayout",
    "TilePlan",
    "VarlenLayout",
    "append_kv",
    "merge_states",
    "merge_states_n",
    "padded_prefill",
    "resolve_backend",
    "span_prefill",
    "varlen_prefill",
]
