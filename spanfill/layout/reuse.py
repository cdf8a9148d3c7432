"""Reuse of what was built from a raw-lengths tensor when the same tensor comes again.

A model that passes ``valid_lens`` (or ``cu_seqlens``) to every layer hands the ops
the same tensor each time. Its layout (checked once, with one host sync, and planned
once) is kept while that tensor lives and is not modified: the memo holds a weak
reference to the tensor and its version counter, which every in-place write bumps.
A tensor without a version counter (made under ``torch.inference_mode()``) is not
memoised: nothing would tell that it changed. Build a layout yourself for those.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

import torch

__all__ = ["TensorMemo"]

T = TypeVar("T")


class TensorMemo(Generic[T]):
    """The last ``capacity`` values built from tensors, keyed by tensor identity.

    An entry is reused only for the very same tensor object (alive), at the same
    version, with the same ``key`` (the other arguments the value depends on).
    """

    def __init__(self, capacity: int = 4) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[int, tuple[weakref.ref, int, Hashable, T]] = OrderedDict()

    def get(self, tensor: torch.Tensor, key: Hashable, build: Callable[[], T]) -> T:
        """``build()``'s value for ``tensor`` and ``key``, built once while neither changes.

        ``build`` may raise (bad input): nothing is stored then, so the next call with
        the same tensor raises again.
        """
        if tensor.is_inference():
            return build()
        ident = id(tensor)
        entry = self._entries.get(ident)
        if entry is not None:
            ref, version, old_key, value = entry
            if ref() is tensor and version == tensor._version and old_key == key:
                self._entries.move_to_end(ident)
                return value
        value = build()
        self._entries[ident] = (weakref.ref(tensor), tensor._version, key, value)
        self._entries.move_to_end(ident)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
