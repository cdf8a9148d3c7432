"""Serving engines' own cache layouts, served without a copy.

- vLLM's combined ``[2, num_blocks, block_size, Hk, D]`` pool, passed as ``*kv_cache``;
- FlashInfer's combined ``[num_pages, 2, page_size, Hk, D]`` pool, passed whole with
  ``v_cache=None``;
- the HND page layout ``[num_pages, Hk, page_size, D]`` (``kv_layout="HND"``), alone and
  combined;
- block tables padded with trailing -1 or 0.

Each is checked against the reference on the NHD copy of the same pages, and the
write of ``append_kv`` must land in the engine's own tensor, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import spanfill as sf
from spanfill import reference
from spanfill.testing import TOLERANCE, assert_lse_close, rel_err

from tests.conftest import INTERPRETING, tensor_digest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETING,
                                reason="needs CUDA or TRITON_INTERPRET=1")

PAGE, HK, HQ, D = 8, 2, 4, 32
SEQ_LENS = [37, 1, 20]
SPANS = [[(0, 3), (30, 37)], [(0, 1)], [(5, 6), (19, 20)]]


def _layout(table_pad: int | None = -1) -> tuple[sf.SpanLayout, int]:
    """A layout over shuffled pages; the table's unused tail holds ``table_pad``."""
    gen = torch.Generator().manual_seed(0)
    pages = [-(-n // PAGE) for n in SEQ_LENS]
    num_pages = sum(pages) + 2
    perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
    table = torch.full((len(SEQ_LENS), max(pages) + 2), table_pad, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[used:used + n]
        used += n
    return sf.SpanLayout.build(SPANS, SEQ_LENS, table.to(DEVICE), PAGE), num_pages


def _new_tokens(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(t, h, D, generator=gen).to(DEVICE, DTYPE) for h in (HQ, HK, HK))


def _engine_pool(fmt: str, num_pages: int) -> torch.Tensor:
    """The engine's tensor, filled with random K/V."""
    shapes = {
        "vllm": (2, num_pages, PAGE, HK, D),
        "flashinfer": (num_pages, 2, PAGE, HK, D),
        "hnd": (2, num_pages, HK, PAGE, D),  # two separate HND pools, stacked for brevity
        "flashinfer_hnd": (num_pages, 2, HK, PAGE, D),
    }
    gen = torch.Generator().manual_seed(2)
    return torch.randn(shapes[fmt], generator=gen).to(DEVICE, DTYPE)


def _call_args(fmt: str, pool: torch.Tensor) -> tuple[tuple, dict]:
    """(k_cache, v_cache) as the engine's users pass them, and the kv_layout."""
    if fmt == "vllm":
        return (*pool,), {}
    if fmt == "flashinfer":
        return (pool, None), {}
    if fmt == "hnd":
        return (pool[0], pool[1]), {"kv_layout": "HND"}
    return (pool, None), {"kv_layout": "HND"}


def _nhd_copy(fmt: str, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous NHD copies of the same K and V pages (for the reference)."""
    if fmt == "vllm":
        k, v = pool[0], pool[1]
    elif fmt == "flashinfer":
        k, v = pool[:, 0], pool[:, 1]
    elif fmt == "hnd":
        k, v = pool[0].transpose(1, 2), pool[1].transpose(1, 2)
    else:
        k, v = pool[:, 0].transpose(1, 2), pool[:, 1].transpose(1, 2)
    return k.contiguous(), v.contiguous()


@pytest.mark.parametrize("fmt", ["vllm", "flashinfer", "hnd", "flashinfer_hnd"])
@pytest.mark.parametrize("table_pad", [-1, 0], ids=["table-pad-minus1", "table-pad-0"])
def test_engine_layout_append_and_attend(fmt: str, table_pad: int) -> None:
    layout, num_pages = _layout(table_pad)
    q, k_new, v_new = _new_tokens(layout.num_tokens)
    pool = _engine_pool(fmt, num_pages)
    storage = pool.data_ptr()
    ref_k, ref_v = _nhd_copy(fmt, pool)
    reference.append_kv(k_new, v_new, ref_k, ref_v, layout.slot_mapping)

    caches, kw = _call_args(fmt, pool)
    sf.append_kv(k_new, v_new, *caches, layout, backend="triton", **kw)
    got_k, got_v = _nhd_copy(fmt, pool)
    assert tensor_digest(got_k, got_v) == tensor_digest(ref_k, ref_v)  # written in place
    assert pool.data_ptr() == storage

    o, lse = sf.span_prefill(q, *caches, layout, return_lse=True, backend="triton", **kw)
    ref_o, ref_lse = reference.span_prefill(q, ref_k, ref_v, layout.positions,
                                            layout.query_start_loc, layout.seq_lens,
                                            layout.block_table, True, D ** -0.5)
    assert rel_err(o, ref_o) <= TOLERANCE[DTYPE]
    assert_lse_close(lse, ref_lse.float(), DTYPE)


def test_hnd_page_size_error_names_the_dim() -> None:
    layout, num_pages = _layout()
    q, k_new, v_new = _new_tokens(layout.num_tokens)
    pool = torch.zeros(num_pages, HK, PAGE + 1, D, device=DEVICE, dtype=DTYPE)
    before = tensor_digest(pool)
    with pytest.raises(ValueError, match=r"k_cache has page_size 9 \(dim 2, HND\) but layout"):
        sf.append_kv(k_new, v_new, pool, pool.clone(), layout, kv_layout="HND")
    assert tensor_digest(pool) == before


def test_bad_kv_layout_and_combined_pool_are_refused() -> None:
    layout, num_pages = _layout()
    q, k_new, v_new = _new_tokens(layout.num_tokens)
    pool = _engine_pool("vllm", num_pages)
    before = tensor_digest(pool)
    with pytest.raises(ValueError, match="kv_layout must be 'NHD' or 'HND', got 'NDH'"):
        sf.append_kv(k_new, v_new, pool[0], pool[1], layout, kv_layout="NDH")
    with pytest.raises(ValueError, match=r"with v_cache=None, k_cache must be the combined pool"):
        sf.span_prefill(q, pool, None, layout)  # vLLM's [2, N, ...] goes in as *kv_cache
    assert tensor_digest(pool) == before
