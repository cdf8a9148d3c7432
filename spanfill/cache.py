"""A small paged KV cache: a page pool, a free list, block tables, slot mapping."""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from .ops import FLOAT_DTYPES
from .reference import FP8_DTYPES

__all__ = ["PagedKVCache"]


class PagedKVCache:
    """K and V page pools shared by many requests (NHD layout, as FlashInfer and vLLM).

    Request ``r`` owns a list of pages; position ``pos`` of it lives in page
    ``pages[pos // page_size]`` at row ``pos % page_size``, i.e. in slot
    ``page * page_size + pos % page_size``.

    Parameters
    ----------
    num_pages : pages in the pool
    page_size : tokens per page, >= 1
    num_kv_heads : Hk
    head_dim : D
    dtype : torch.float16 | torch.bfloat16 | torch.float32, or fp8 (float8_e4m3fn,
        float8_e5m2: the ops take k_scale/v_scale with it); anything else: TypeError
    device : where the pools live
    num_layers : if > 1, ``k_cache``/``v_cache`` get a leading layer dimension and
        :meth:`layer` gives one layer's pools

    Attributes
    ----------
    k_cache, v_cache : [num_pages, page_size, Hk, D] (or [L, num_pages, page_size, Hk, D])
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        num_layers: int = 1,
    ) -> None:
        for name, val in (("num_pages", num_pages), ("page_size", page_size),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("num_layers", num_layers)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        # The ops take only these; a pool of another dtype would fail at every call.
        if dtype not in FLOAT_DTYPES + FP8_DTYPES:
            raise TypeError(
                "dtype must be torch.float16, torch.bfloat16, torch.float32, "
                f"torch.float8_e4m3fn or torch.float8_e5m2, got {dtype!r}"
            )
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        if num_layers > 1:
            shape = (num_layers,) + shape
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_layers = num_layers
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        # Pop from the end; lowest page ids are handed out first.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._pages: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}

    @property
    def device(self) -> torch.device:
        return self.k_cache.device

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V pools of one layer, each [num_pages, page_size, Hk, D]."""
        if self.num_layers == 1:
            if index != 0:
                raise IndexError(f"layer index {index} out of range for a 1-layer cache")
            return self.k_cache, self.v_cache
        return self.k_cache[index], self.v_cache[index]

    def _pages_for(self, num_tokens: int) -> int:
        return (num_tokens + self.page_size - 1) // self.page_size

    def allocate(self, request: Hashable, num_tokens: int) -> list[int]:
        """Give a new request enough pages for ``num_tokens`` tokens; returns its pages."""
        if request in self._pages:
            raise ValueError(f"request {request!r} already has pages; use grow()")
        self._pages[request] = []
        self._lens[request] = 0
        return self.grow(request, num_tokens)

    def grow(self, request: Hashable, num_tokens: int) -> list[int]:
        """Extend a request to ``num_tokens`` tokens in total; returns all its pages."""
        if request not in self._pages:
            raise KeyError(f"unknown request {request!r}")
        if num_tokens < self._lens[request]:
            raise ValueError(
                f"grow({request!r}, {num_tokens}) would shrink it from {self._lens[request]} tokens"
            )
        pages = self._pages[request]
        extra = self._pages_for(num_tokens) - len(pages)
        if extra > len(self._free):
            raise MemoryError(
                f"request {request!r} needs {extra} more pages but only {len(self._free)} are free"
            )
        pages.extend(self._free.pop() for _ in range(extra))
        self._lens[request] = num_tokens
        return list(pages)

    def free(self, request: Hashable) -> None:
        """Return a request's pages to the pool."""
        if request not in self._pages:
            raise KeyError(f"unknown request {request!r}")
        self._free.extend(reversed(self._pages.pop(request)))
        del self._lens[request]

    def seq_len(self, request: Hashable) -> int:
        return self._lens[request]

    def pages(self, request: Hashable) -> list[int]:
        """The page ids of a request, in position order (a copy)."""
        if request not in self._pages:
            raise KeyError(f"unknown request {request!r}")
        return list(self._pages[request])

    def block_table(self, requests: Sequence[Hashable]) -> torch.Tensor:
        """[B, max_pages] int32 on the cache's device; entries past a request's pages are -1."""
        rows = [self._pages[r] for r in requests]
        width = max((len(r) for r in rows), default=0)
        table = torch.full((len(rows), max(width, 1)), -1, dtype=torch.int32)
        for i, pages in enumerate(rows):
            table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return table.to(self.device)

    def seq_lens(self, requests: Sequence[Hashable]) -> torch.Tensor:
        """[B] int32 on the cache's device."""
        return torch.tensor([self._lens[r] for r in requests], dtype=torch.int32, device=self.device)

    def slot_mapping(self, request: Hashable, positions: torch.Tensor) -> torch.Tensor:
        """[N] int64 slots of ``positions`` of one request."""
        pos = positions.long().to(self.device)
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self._lens[request]):
            raise ValueError(
                f"positions must be inside [0, {self._lens[request]}) for request {request!r}"
            )
        pages = torch.tensor(self._pages[request], dtype=torch.int64, device=self.device)
        return pages[pos // self.page_size] * self.page_size + pos % self.page_size
