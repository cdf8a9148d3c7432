"""PagedKVCache: pages, free list, block tables, slot mapping."""

from __future__ import annotations

import pytest
import torch

import spanfill as sf


def test_allocate_grow_free_and_block_table():
    cache = sf.PagedKVCache(num_pages=6, page_size=4, num_kv_heads=2, head_dim=16,
                            dtype=torch.float32)
    assert cache.k_cache.shape == (6, 4, 2, 16)
    assert cache.allocate("a", 5) == [0, 1]
    assert cache.allocate("b", 1) == [2]
    assert cache.grow("a", 9) == [0, 1, 3]
    assert cache.num_free_pages == 2
    table = cache.block_table(["a", "b"])
    assert table.dtype == torch.int32 and table.tolist() == [[0, 1, 3], [2, -1, -1]]
    assert cache.seq_lens(["a", "b"]).tolist() == [9, 1]
    cache.free("a")
    assert cache.num_free_pages == 5
    assert cache.allocate("c", 12) == [0, 1, 3]  # freed pages are reused first


def test_slot_mapping_formula():
    cache = sf.PagedKVCache(8, 4, 1, 16, dtype=torch.float32)
    cache.allocate("x", 3)
    cache.allocate("y", 10)  # pages 1, 2, 3
    slots = cache.slot_mapping("y", torch.tensor([0, 3, 4, 9]))
    assert slots.tolist() == [4, 7, 8, 13]


def test_errors():
    cache = sf.PagedKVCache(2, 4, 1, 16)
    cache.allocate("a", 8)
    with pytest.raises(MemoryError):
        cache.allocate("b", 1)
    with pytest.raises(ValueError, match="already"):
        cache.allocate("a", 1)
    with pytest.raises(ValueError, match="shrink"):
        cache.grow("a", 2)
    with pytest.raises(ValueError, match="positions"):
        cache.slot_mapping("a", torch.tensor([8]))
    with pytest.raises(ValueError, match="page_size"):
        sf.PagedKVCache(2, 0, 1, 16)


def test_layers_and_use_with_ops():
    cache = sf.PagedKVCache(4, 4, 1, 16, dtype=torch.float32, num_layers=3)
    k0, v0 = cache.layer(0)
    assert k0.shape == (4, 4, 1, 16) and cache.k_cache.shape == (3, 4, 4, 1, 16)
    cache.allocate(7, 6)
    layout = sf.SpanLayout.build([[(2, 4)]], [6], cache.block_table([7]), cache.page_size)
    new = torch.ones(2, 1, 16)
    sf.append_kv(new, new, *cache.layer(1), layout)
    assert cache.k_cache[1].sum() == 32 and cache.k_cache[0].sum() == 0
