"""GPU tests at realistic sizes: the workloads of shared/BENCHMARKS.md in fp16 and bf16.

Run on a CUDA machine with ``python -m pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

import spanfill as sf
from spanfill import reference as ref
from spanfill.testing import TOLERANCE, reference_span, rel_err

pytestmark = pytest.mark.gpu

bench_workloads = pytest.importorskip("bench.workloads")
WORKLOADS = {w.name: w for w in bench_workloads.core_workloads()} if torch.cuda.is_available() else {}
SEGMENTED = ["few_big", "many_small", "scatter15", "long_32k"]
PADDED = ["bert_base_512", "enc_2k_d128"]


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", SEGMENTED)
def test_segmented_workload(name, dtype):
    t = WORKLOADS[name].make("cuda", dtype)
    k_cache, v_cache = t.k_cache.clone(), t.v_cache.clone()
    k_cache.view(-1, *k_cache.shape[2:])[t.layout.slot_mapping] = float("nan")  # holes: poison
    v_cache.view(-1, *v_cache.shape[2:])[t.layout.slot_mapping] = float("nan")
    sf.append_kv(t.k_new, t.v_new, k_cache, v_cache, t.layout)
    assert torch.equal(k_cache, t.k_cache) and torch.equal(v_cache, t.v_cache)
    o, lse = sf.span_prefill(t.q, k_cache, v_cache, t.layout, return_lse=True)
    ro, rlse = reference_span(t.q, t.k_cache, t.v_cache, t.layout)
    assert rel_err(o, ro) < TOLERANCE[dtype]
    assert torch.allclose(lse, rlse, atol=5e-2, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", PADDED)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_workload(name, dtype, padding_side):
    t = WORKLOADS[name].make("cuda", dtype)
    o, lse = sf.padded_prefill(t.q, t.k, t.v, t.valid_lens, padding_side=padding_side,
                               return_lse=True)
    ro, rlse = ref.padded_prefill(t.q, t.k, t.v, t.valid_lens, padding_side=padding_side)
    assert rel_err(o, ro) < TOLERANCE[dtype]
    pad = torch.isinf(rlse)
    assert (o[pad] == 0).all() and torch.isinf(lse[pad]).all()
    assert torch.allclose(lse[~pad], rlse[~pad].float(), atol=5e-2, rtol=1e-3)


# fp32 kernels take 10-20 s each to compile: fp32 runs a few head dims, the
# half-precision dtypes all of them.
DTYPE_DIMS = [(dt, d) for dt in (torch.float16, torch.bfloat16) for d in (32, 64, 80, 96, 128, 256)]
DTYPE_DIMS += [(torch.float32, d) for d in (32, 80, 128)]


@pytest.mark.parametrize("dtype,head_dim", DTYPE_DIMS, ids=lambda x: str(x).replace("torch.", ""))
def test_head_dims_and_dtypes(dtype, head_dim):
    """Every supported head dim and dtype, causal spans and a padded batch, GQA 4."""
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    seq_lens = [300, 77]
    spans = [[(0, 1), (40, 120), (299, 300)], [(10, 77)]]
    page = 16
    pages = [(n + page - 1) // page for n in seq_lens]
    perm = torch.randperm(sum(pages), device="cuda", generator=gen).to(torch.int32)
    table = torch.zeros(2, max(pages), dtype=torch.int32, device="cuda")
    table[0, :pages[0]], table[1, :pages[1]] = perm[:pages[0]], perm[pages[0]:]
    layout = sf.SpanLayout.build(spans, seq_lens, table, page)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen).to(dtype)  # noqa: E731
    k_cache, v_cache = rnd(sum(pages), page, 2, head_dim), rnd(sum(pages), page, 2, head_dim)
    q = rnd(layout.num_tokens, 8, head_dim)
    sf.append_kv(rnd(layout.num_tokens, 2, head_dim), rnd(layout.num_tokens, 2, head_dim),
                 k_cache, v_cache, layout)
    for causal in (True, False):
        o = sf.span_prefill(q, k_cache, v_cache, layout, causal=causal)
        ro, _ = reference_span(q, k_cache, v_cache, layout, causal)
        assert rel_err(o, ro) < TOLERANCE[dtype], (causal, rel_err(o, ro))
    qp, kp, vp = rnd(3, 150, 8, head_dim), rnd(3, 150, 2, head_dim), rnd(3, 150, 2, head_dim)
    valid = torch.tensor([0, 150, 61], device="cuda")
    o = sf.padded_prefill(qp, kp, vp, valid, causal=True)
    ro, _ = ref.padded_prefill(qp, kp, vp, valid, causal=True)
    assert rel_err(o, ro) < TOLERANCE[dtype]


def test_varlen_matches_padded_without_padding():
    """varlen over the valid tokens only gives the padded batch's valid rows."""
    t = WORKLOADS["bert_base_512"].make("cuda", torch.bfloat16)
    lens = t.valid_lens.long()
    valid_rows = torch.arange(t.q.shape[1], device="cuda")[None, :] < lens[:, None]
    cu = torch.zeros(lens.shape[0] + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.cumsum(lens, 0)
    packed = [x[valid_rows] for x in (t.q, t.k, t.v)]
    o_var = sf.varlen_prefill(*packed, cu, causal=False)
    o_pad = sf.padded_prefill(t.q, t.k, t.v, t.valid_lens)
    assert rel_err(o_var, o_pad[valid_rows]) < 1e-2
