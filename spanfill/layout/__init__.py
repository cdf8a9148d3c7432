"""Layouts (where the query rows and their KV live), their checks and their tile plans.

``layouts``: :class:`PaddedLayout`, :class:`VarlenLayout` and :class:`SpanLayout`
(``reuse``: the memo of layouts built from raw lengths); ``planning``: the
device-side :class:`TilePlan`; ``validation``: the metadata checks.
"""

from .layouts import PaddedLayout, SpanLayout, VarlenLayout, compute_slot_mapping
from .planning import TilePlan, plan_packed, plan_padded

__all__ = ["PaddedLayout", "SpanLayout", "TilePlan", "VarlenLayout", "compute_slot_mapping",
           "plan_packed", "plan_padded"]
