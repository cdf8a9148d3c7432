"""Reliability on a CUDA GPU: torch.compile with inductor, CUDA-graph capture of a
whole step (layout planning + append + attention), and a page pool of more than
2**31 elements (int64 addressing). All tests are marked ``gpu`` (skipped without CUDA).
"""

from __future__ import annotations

import math

import pytest
import torch

import spanfill as sf
from spanfill import custom_ops, reference
from spanfill.testing import TOLERANCE, capture_cuda_graph, reference_span, rel_err

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
# Offsets computed in 32 bits wrap modulo this; the large-pool test straddles it.
WRAP = 2**32

def random_metadata(gen: torch.Generator, num_req: int, num_tokens: int, max_seq_len: int,
                    page_size: int, width: int, num_pages: int):
    """Random requests with exactly ``num_tokens`` span tokens in all, fixed shapes.

    Returns (positions [T] int32, query_start_loc [B+1] int32, seq_lens [B] int32,
    block_table [B, width] int32) on the CPU; the tokens of a request sit at a sorted
    random subset of its positions (spans of every length, holes anywhere).
    """
    seq_lens = torch.randint(num_tokens // num_req + 1, max_seq_len + 1, (num_req,), generator=gen)
    # Split num_tokens over the requests without exceeding any seq_len.
    counts = torch.zeros(num_req, dtype=torch.int64)
    left = num_tokens
    while left:
        b = int(torch.randint(num_req, (1,), generator=gen))
        room = int(seq_lens[b] - counts[b])
        take = min(left, room, int(torch.randint(1, 64, (1,), generator=gen)))
        counts[b] += take
        left -= take
        if take == 0 and int((seq_lens - counts).sum()) == 0:
            raise ValueError("num_tokens larger than the batch")
    positions = torch.cat([
        torch.sort(torch.randperm(int(n), generator=gen)[: int(c)]).values
        for n, c in zip(seq_lens, counts)
    ])
    qsl = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    pages = torch.randperm(num_pages, generator=gen)[: num_req * width].view(num_req, width)
    return positions.int(), qsl.int(), seq_lens.int(), pages.int()


# ----------------------------------------------------------------------------- torch.compile

def test_torch_compile_inductor_fullgraph() -> None:
    """A layer with projections around append_kv + span_prefill, compiled by inductor."""
    gen = torch.Generator().manual_seed(0)
    page_size, hq, hk, d, num_pages = 16, 8, 2, 128, 64
    positions, qsl, seq_lens, table = random_metadata(gen, 3, 100, 150, page_size, 10, num_pages)
    meta = [t.to(DEVICE) for t in (positions, qsl, seq_lens, table)]
    w_q = (torch.randn(d, hq * d, generator=gen) / d**0.5).to(DEVICE).half()
    w_o = (torch.randn(hq * d, d, generator=gen) / (hq * d) ** 0.5).to(DEVICE).half()

    def layer(x, k_new, v_new, k_cache, v_cache, positions, qsl, seq_lens, table):
        q = (x @ w_q).view(x.shape[0], hq, d)
        custom_ops.append_kv(k_new, v_new, k_cache, v_cache, positions, qsl, seq_lens, table, page_size)
        o = custom_ops.span_prefill(q, k_cache, v_cache, positions, qsl, seq_lens, table, page_size)
        return o.flatten(1) @ w_o

    def args():
        g = torch.Generator().manual_seed(1)
        r = lambda *s: torch.randn(*s, generator=g).to(DEVICE).half()  # noqa: E731
        return [r(100, d), r(100, hk, d), r(100, hk, d), r(num_pages, page_size, hk, d),
                r(num_pages, page_size, hk, d), *meta]

    eager_args, compiled_args = args(), args()
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    with torch.no_grad():
        expected = layer(*eager_args)
        got = compiled(*compiled_args)
        got2 = compiled(*compiled_args)  # second call: cache already holds the tokens
    assert rel_err(got, expected) < TOLERANCE[torch.float16]
    assert rel_err(got2, expected) < TOLERANCE[torch.float16]
    assert torch.equal(compiled_args[3], eager_args[3]) and torch.equal(compiled_args[4], eager_args[4])


# ----------------------------------------------------------------------------- CUDA graphs

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("splits", [None, "3"], ids=["policy", "split3"])
@pytest.mark.parametrize("num_req, num_tokens", [(5, 333), (1, 1)], ids=["333-rows", "one-row"])
def test_cuda_graph_layout_append_attention(num_req: int, num_tokens: int, dtype: torch.dtype,
                                            causal: bool, splits, monkeypatch) -> None:
    """Capture from_tensors(validate=False) + tile plan + append_kv + span_prefill once,
    replay with new metadata and data of the same sizes, compare with the reference.
    With split-KV forced, every replay must re-zero the split counters it captured;
    one row (a decode step) is the launch whose row count Triton makes a constant."""
    if splits is not None:
        monkeypatch.setenv("SPANFILL_SPLITS", splits)
    max_seq_len, page_size, width = 700, 16, 44
    num_pages, hq, hk, d = num_req * width + 7, 8, 2, 128
    gen = torch.Generator().manual_seed(2)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, dtype)  # noqa: E731

    def new_meta():
        return [t.to(DEVICE) for t in random_metadata(gen, num_req, num_tokens, max_seq_len,
                                                   page_size, width, num_pages)]

    static_meta = new_meta()
    q, k_new, v_new = rnd(num_tokens, hq, d), rnd(num_tokens, hk, d), rnd(num_tokens, hk, d)
    k_cache, v_cache = rnd(num_pages, page_size, hk, d), rnd(num_pages, page_size, hk, d)

    def step():
        layout = sf.SpanLayout.from_tensors(*static_meta, page_size, validate=False)
        sf.append_kv(k_new, v_new, k_cache, v_cache, layout)
        return sf.span_prefill(q, k_cache, v_cache, layout, causal=causal, return_lse=True)

    graph, (o, lse) = capture_cuda_graph(step)

    for _ in range(3):
        for static, fresh in zip(static_meta, new_meta()):
            static.copy_(fresh)
        for t in (q, k_new, v_new, k_cache, v_cache):
            t.copy_(rnd(*t.shape))
        checked = sf.SpanLayout.from_tensors(*[t.clone() for t in static_meta], page_size)
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        graph.replay()
        torch.cuda.synchronize()
        reference.append_kv(k_new, v_new, ref_k, ref_v, checked.slot_mapping)
        assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
        o_ref, lse_ref = reference_span(q, ref_k, ref_v, checked, causal, 1 / math.sqrt(d))
        assert rel_err(o, o_ref) < TOLERANCE[dtype]
        assert float((lse - lse_ref).abs().max()) < 2e-2


# ----------------------------------------------------------------------------- large pools

def test_page_pool_over_2_31_elements() -> None:
    """A fp16 pool of 2**21 + 96 pages of 16 x 1 x 128 (> 8 GiB, > 2**32 elements per
    pool) whose hole pages sit at the END of the pool: int32 offsets would wrap."""
    page_size, hk, d, hq = 16, 1, 128, 4
    page_elems = page_size * hk * d
    wrap_page = WRAP // page_elems  # first page whose offset needs more than 32 bits
    num_pages = wrap_page + 96
    assert num_pages * page_elems > WRAP
    if DEVICE == "cuda" and torch.cuda.mem_get_info()[0] < 2 * num_pages * page_elems * 2 + (2 << 30):
        pytest.skip("needs ~18 GiB of free GPU memory")
    k_cache = torch.zeros(num_pages, page_size, hk, d, dtype=torch.float16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    gen = torch.Generator().manual_seed(3)
    seq_lens = [600, 250]
    # Request 0: the last 38 pages, shuffled; request 1: pages on both sides of the
    # 2**31 and 2**32 element marks, and just below request 0's pages.
    last = torch.arange(num_pages - 38, num_pages)[torch.randperm(38, generator=gen)]
    half = wrap_page // 2
    straddle = torch.tensor([half - 1, half, wrap_page - 1, wrap_page, num_pages - 39, wrap_page + 1,
                             half + 7, num_pages - 40, wrap_page + 50, num_pages - 41, half + 9,
                             wrap_page + 20, num_pages - 42, wrap_page + 3, wrap_page + 4,
                             wrap_page + 5])
    used = torch.cat([last, straddle])
    assert torch.unique(used).numel() == used.numel()
    table = torch.full((2, 38), -1, dtype=torch.int64)
    table[0] = last
    table[1, :16] = straddle
    dev_used = used.to(DEVICE)
    # Cached KV in every page the requests use; append_kv then writes the holes.
    k_cache[dev_used] = torch.randn(len(used), page_size, hk, d, generator=gen).half().to(DEVICE)
    v_cache[dev_used] = torch.randn(len(used), page_size, hk, d, generator=gen).half().to(DEVICE)
    # Where a 32-bit (mod 2**32) offset of each used page would land instead.
    aliases = torch.unique((used * page_elems % WRAP) // page_elems)
    aliases = aliases[~torch.isin(aliases, used)].to(DEVICE)
    assert aliases.numel() > 0
    alias_before = (k_cache[aliases].clone(), v_cache[aliases].clone())

    spans = [[(0, 1), (100, 180), (590, 600)], [(0, 16), (240, 250)]]
    layout = sf.SpanLayout.build(spans, seq_lens, table.to(DEVICE), page_size)
    t = layout.num_tokens
    q = torch.randn(t, hq, d, generator=gen).half().to(DEVICE)
    k_new = torch.randn(t, hk, d, generator=gen).half().to(DEVICE)
    v_new = torch.randn(t, hk, d, generator=gen).half().to(DEVICE)
    ref_k, ref_v = k_cache[dev_used].clone(), v_cache[dev_used].clone()

    sf.append_kv(k_new, v_new, k_cache, v_cache, layout, backend="triton")
    o, lse = sf.span_prefill(q, k_cache, v_cache, layout, return_lse=True, backend="triton")
    assert torch.equal(k_cache[aliases], alias_before[0]), "append_kv wrote to an aliased page"
    assert torch.equal(v_cache[aliases], alias_before[1]), "append_kv wrote to an aliased page"

    # The reference on a compact copy of the used pages, renumbered 0..n-1.
    remap = torch.full((num_pages,), -1, dtype=torch.int64)
    remap[used] = torch.arange(len(used))
    small_table = torch.where(table >= 0, remap[table.clamp(min=0)], -1).to(DEVICE)
    small = sf.SpanLayout.build(spans, seq_lens, small_table, page_size)
    reference.append_kv(k_new, v_new, ref_k, ref_v, small.slot_mapping)
    assert torch.equal(k_cache[dev_used], ref_k) and torch.equal(v_cache[dev_used], ref_v)
    o_ref, lse_ref = reference_span(q, ref_k, ref_v, small, True, 1 / math.sqrt(d))
    assert rel_err(o, o_ref) < TOLERANCE[torch.float16]
    assert float((lse - lse_ref).abs().max()) < 1e-2
