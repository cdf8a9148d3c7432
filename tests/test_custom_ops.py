"""spanfill as torch.library custom ops: fake kernels agree with the real ones, and a
layer calling append_kv + span_prefill compiles with fullgraph=True (no graph break)."""

from __future__ import annotations

import pytest
import torch

import spanfill as sf
from spanfill import library, reference
from conftest import INTERPRETING

P, HQ, HK, D = 4, 4, 2, 32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _metadata(device: str = DEVICE):
    table = torch.tensor([[5, 2, 7, -1], [0, 3, -1, -1]], dtype=torch.int32, device=device)
    layout = sf.SpanLayout.build([[(1, 3), (6, 9)], [(0, 2)]], [10, 7], table, P)
    return layout


def _inputs(layout: sf.SpanLayout, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device=layout.device, dtype=dtype)  # noqa: E731
    t = layout.num_tokens
    return rnd(8, P, HK, D), rnd(8, P, HK, D), rnd(t, HQ, D), rnd(t, HK, D), rnd(t, HK, D)


class SpanLayer(torch.nn.Module):
    """One attention layer step over a paged cache with holes: project, append, attend."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.wq = torch.nn.Parameter(torch.randn(D, D, generator=gen) / D**0.5)
        self.wo = torch.nn.Parameter(torch.randn(D, D, generator=gen) / D**0.5)

    def forward(self, q, k_new, v_new, k_cache, v_cache, positions, qsl, seq_lens, block_table):
        q = q @ self.wq
        library.append_kv(k_new, v_new, k_cache, v_cache, positions, qsl, seq_lens, block_table, P)
        o, lse = library.span_prefill(q, k_cache, v_cache, positions, qsl, seq_lens, block_table, P,
                                      causal=True, return_lse=True)
        return (o @ self.wo).float().sum(-1), lse


def _layer_args(layout: sf.SpanLayout, seed: int = 0):
    k_cache, v_cache, q, k_new, v_new = _inputs(layout, seed=seed)
    return (q, k_new, v_new, k_cache, v_cache, layout.positions, layout.query_start_loc,
            layout.seq_lens, layout.block_table)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_no_graph_break(backend: str) -> None:
    layout = _metadata()
    layer = SpanLayer().to(DEVICE)
    eager_args, compiled_args = _layer_args(layout), _layer_args(layout)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)  # raises on a graph break
    # The ops are forward-only (prefill serves inference): no autograd formula.
    with torch.no_grad():
        expected = layer(*eager_args)
        got = compiled(*compiled_args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The cache was mutated in place through the compiled graph, as in eager.
    assert torch.equal(compiled_args[3], eager_args[3]) and torch.equal(compiled_args[4], eager_args[4])
    with torch.no_grad():
        explain = torch._dynamo.explain(layer)(*_layer_args(layout))
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_custom_ops_match_the_public_api() -> None:
    layout = _metadata()
    k_cache, v_cache, q, k_new, v_new = _inputs(layout)
    k2, v2 = k_cache.clone(), v_cache.clone()
    library.append_kv(k_new, v_new, k_cache, v_cache, layout.positions, layout.query_start_loc,
                      layout.seq_lens, layout.block_table, P)
    reference.append_kv(k_new, v_new, k2, v2, layout.slot_mapping)
    assert torch.equal(k_cache, k2) and torch.equal(v_cache, v2)
    o, lse = library.span_prefill(q, k_cache, v_cache, layout.positions, layout.query_start_loc,
                                  layout.seq_lens, layout.block_table, P, return_lse=True)
    o2, lse2 = sf.span_prefill(q, k_cache, v_cache, layout, return_lse=True)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    assert torch.equal(library.span_prefill(q, k_cache, v_cache, layout.positions,
                                            layout.query_start_loc, layout.seq_lens,
                                            layout.block_table, P, causal=False),
                       sf.span_prefill(q, k_cache, v_cache, layout, causal=False))
    qp, kp = torch.randn(2, 5, HQ, D, device=DEVICE), torch.randn(2, 5, HK, D, device=DEVICE)
    lens = torch.tensor([5, 2], device=DEVICE)
    assert torch.equal(library.padded_prefill(qp, kp, kp, lens, padding_side="left"),
                       sf.padded_prefill(qp, kp, kp, lens, padding_side="left"))
    cu = torch.tensor([0, 3, 10], device=DEVICE)
    o, lse = library.varlen_prefill(qp.flatten(0, 1), kp.flatten(0, 1), kp.flatten(0, 1), cu,
                                    return_lse=True)
    o2, lse2 = sf.varlen_prefill(qp.flatten(0, 1), kp.flatten(0, 1), kp.flatten(0, 1), cu,
                                 return_lse=True)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)


@pytest.mark.parametrize("return_lse", [False, True])
def test_opcheck(return_lse: bool) -> None:
    """torch.library.opcheck: schema, fake kernels and autograd registration agree."""
    layout = _metadata()
    k_cache, v_cache, q, k_new, v_new = _inputs(layout)
    meta = (layout.positions, layout.query_start_loc, layout.seq_lens, layout.block_table, P)
    torch.library.opcheck(torch.ops.spanfill.append_kv.default, (k_new, v_new, k_cache, v_cache, *meta))
    torch.library.opcheck(torch.ops.spanfill.span_prefill.default,
                          (q, k_cache, v_cache, *meta, True, None, return_lse))
    qp, kp = torch.randn(2, 5, HQ, D, device=DEVICE), torch.randn(2, 5, HK, D, device=DEVICE)
    torch.library.opcheck(torch.ops.spanfill.padded_prefill.default,
                          (qp, kp, kp, torch.tensor([5, 2], device=DEVICE), False, "right", None,
                           return_lse))
    torch.library.opcheck(torch.ops.spanfill.varlen_prefill.default,
                          (qp.flatten(0, 1), kp.flatten(0, 1), kp.flatten(0, 1),
                           torch.tensor([0, 3, 10], device=DEVICE), True, 0.3, return_lse))


@pytest.mark.skipif(not INTERPRETING and DEVICE == "cpu", reason="needs the kernels")
def test_custom_op_runs_the_kernels() -> None:
    """On CUDA (or under the interpreter) the ops dispatch to Triton, not the reference."""
    assert sf.resolve_backend(torch.device(DEVICE)) == "triton"
