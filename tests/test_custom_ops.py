"""spanfill as torch.library custom ops (spanfill/custom_ops.py).

Every op with every option of its public function matches :mod:`spanfill.reference`
when compiled with ``torch.compile(fullgraph=True)``; the ops run the Triton kernels
(under the interpreter on a CPU), not the reference; the fake kernels agree with
the real ones (opcheck); a layer calling append_kv + span_prefill compiles without
a graph break.

The compiled tests use the ``aot_eager`` backend: it traces the ops through their
fake kernels as inductor does, without inductor's C++ compile of every graph on a
CPU (tests/test_reliability_gpu.py compiles with inductor on a GPU).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

import spanfill as sf
from conftest import INTERPRETING
from spanfill import custom_ops, reference
from spanfill.testing import assert_close, assert_lse_close, recorded_launches

P, HQ, HK, D = 4, 4, 2, 32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEQ_LENS = [10, 7]
SPANS = [[(1, 3), (6, 9)], [(0, 2)]]
COMPILE_BACKEND = "aot_eager"

pytestmark = pytest.mark.skipif(not INTERPRETING and DEVICE == "cpu",
                                reason="needs the kernels (a GPU, or TRITON_INTERPRET=1)")


def _metadata(device: str = DEVICE) -> sf.SpanLayout:
    table = torch.tensor([[5, 2, 7, -1], [0, 3, -1, -1]], dtype=torch.int32, device=device)
    return sf.SpanLayout.build(SPANS, SEQ_LENS, table, P)


def _inputs(layout: sf.SpanLayout, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device=layout.device, dtype=dtype)  # noqa: E731
    t = layout.num_tokens
    return rnd(8, P, HK, D), rnd(8, P, HK, D), rnd(t, HQ, D), rnd(t, HK, D), rnd(t, HK, D)


def _meta(layout: sf.SpanLayout) -> tuple:
    return (layout.positions, layout.query_start_loc, layout.seq_lens, layout.block_table, P)


def _shard(layout: sf.SpanLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_start, kv_end of a shard that cuts into both requests' spans."""
    lo = torch.tensor([2, 1], dtype=torch.int32, device=layout.device)
    hi = torch.tensor([8, 7], dtype=torch.int32, device=layout.device)
    return lo, hi


@contextlib.contextmanager
def _kernels_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Count the kernel launches (the counts are there once the block ends); any call
    into spanfill.reference raises."""
    counts: dict[str, int] = {}
    with monkeypatch.context() as m, \
            recorded_launches(attention_fwd=None, append_kv_launch=None) as recorded:
        for name in ("attend", "padded_prefill", "varlen_prefill", "span_prefill", "append_kv"):
            def refuse(*args, _name=name, **kw):
                raise AssertionError(f"spanfill.reference.{_name} ran instead of the kernel")

            m.setattr(reference, name, refuse)
        yield counts
    counts.update({name: len(calls) for name, calls in recorded.items()})


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend=COMPILE_BACKEND, fullgraph=True)


# ----------------------------------------------------------------------------- every option

SPAN_OPTIONS = {
    "defaults": {},
    "bidirectional_scale": dict(causal=False, sm_scale=0.3),
    "window": dict(window_left=3),
    "soft_cap": dict(logits_soft_cap=2.0),
    "shard": dict(shard=True),
    "all": dict(causal=False, sm_scale=0.2, window_left=2, logits_soft_cap=3.0, shard=True,
                backend="triton"),
}


@pytest.mark.parametrize("fused", [False, True], ids=["two-launches", "one-launch"])
@pytest.mark.parametrize("options", SPAN_OPTIONS.values(), ids=SPAN_OPTIONS.keys())
def test_span_prefill_and_append_kv_every_option(options: dict, fused: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """append_kv then span_prefill (or span_prefill with k_new/v_new: one launch, no
    append launch), compiled, against the reference, on the kernels."""
    options = dict(options)
    layout = _metadata()
    k_cache, v_cache, q, k_new, v_new = _inputs(layout)
    lo, hi = _shard(layout) if options.pop("shard", False) else (None, None)
    causal, sm_scale = options.get("causal", True), options.get("sm_scale")
    variants = {k: options[k] for k in ("window_left", "logits_soft_cap") if k in options}

    # The reference: a token outside its request's shard [kv_start, kv_end) is not written.
    slots = layout.slot_mapping.clone()
    if lo is not None:
        req = torch.repeat_interleave(torch.arange(len(SEQ_LENS), device=DEVICE),
                                      layout.query_start_loc.diff().long())
        pos = layout.positions.long()
        slots[(pos < lo.long()[req]) | (pos >= hi.long()[req])] = -1
    k_want, v_want = k_cache.clone(), v_cache.clone()
    reference.append_kv(k_new, v_new, k_want, v_want, slots)
    o_want, lse_want = reference.span_prefill(q, k_want, v_want, *_meta(layout)[:4], causal,
                                              sm_scale, kv_start=lo, kv_end=hi, **variants)

    def step(q, k_new, v_new, k_cache, v_cache, positions, qsl, seq_lens, table, lo, hi):
        new = dict(k_new=k_new, v_new=v_new) if fused else {}
        if not fused:
            custom_ops.append_kv(k_new, v_new, k_cache, v_cache, positions, qsl, seq_lens, table,
                                 P, kv_start=lo, kv_end=hi, backend=options.get("backend"))
        return custom_ops.span_prefill(q, k_cache, v_cache, positions, qsl, seq_lens, table, P,
                                       return_lse=True, kv_start=lo, kv_end=hi, **new, **options)

    with _kernels_only(monkeypatch) as launches, torch.no_grad():
        o, lse = _compiled(step)(q, k_new, v_new, k_cache, v_cache, *_meta(layout)[:4], lo, hi)
    assert launches == {"attention_fwd": 1, "append_kv_launch": 0 if fused else 1}
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    assert_close(o, o_want, torch.float32, what="span_prefill o")
    assert_lse_close(lse, lse_want, torch.float32, what="span_prefill lse")


def test_append_kv_slot_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """A given slot_mapping is used as is (-1 skips the token)."""
    layout = _metadata()
    k_cache, v_cache, _, k_new, v_new = _inputs(layout)
    slots = layout.slot_mapping.clone()
    slots[::2] = -1
    k_want, v_want = k_cache.clone(), v_cache.clone()
    reference.append_kv(k_new, v_new, k_want, v_want, slots)

    def step(k_new, v_new, k_cache, v_cache, positions, qsl, seq_lens, table, slots):
        custom_ops.append_kv(k_new, v_new, k_cache, v_cache, positions, qsl, seq_lens, table, P,
                             slot_mapping=slots)

    with _kernels_only(monkeypatch) as launches:
        _compiled(step)(k_new, v_new, k_cache, v_cache, *_meta(layout)[:4], slots)
    assert launches == {"attention_fwd": 0, "append_kv_launch": 1}
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


DENSE_OPTIONS = {
    "defaults": {},
    "causal_scale": dict(causal=True, sm_scale=0.3),
    "window": dict(causal=True, window_left=2),
    "soft_cap": dict(logits_soft_cap=2.0),
    "all": dict(causal=True, sm_scale=0.2, window_left=3, logits_soft_cap=3.0, backend="triton"),
}


def _padded_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 9, h, D, generator=gen).to(DEVICE) for h in (HQ, HK, HK))
    return q, k, v, torch.tensor([9, 4, 0], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("options", DENSE_OPTIONS.values(), ids=DENSE_OPTIONS.keys())
def test_padded_prefill_every_option(options: dict, padding_side: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, valid = _padded_inputs()
    ref_opts = {key: val for key, val in options.items() if key != "backend"}
    o_want, lse_want = reference.padded_prefill(q, k, v, valid, padding_side=padding_side,
                                                **ref_opts)

    def run(q, k, v, valid):
        return custom_ops.padded_prefill(q, k, v, valid, padding_side=padding_side,
                                         return_lse=True, **options)

    with _kernels_only(monkeypatch) as launches:
        o, lse = _compiled(run)(q, k, v, valid)
    assert launches["attention_fwd"] == 1
    assert_close(o, o_want, torch.float32, what="padded_prefill o")
    assert_lse_close(lse, lse_want, torch.float32, what="padded_prefill lse")


@pytest.mark.parametrize("options", DENSE_OPTIONS.values(), ids=DENSE_OPTIONS.keys())
def test_varlen_prefill_every_option(options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(14, h, D, generator=gen).to(DEVICE) for h in (HQ, HK, HK))
    cu = torch.tensor([0, 3, 3, 14], dtype=torch.int32, device=DEVICE)
    options = {"causal": False, **options}
    ref_opts = {key: val for key, val in options.items() if key != "backend"}
    o_want, lse_want = reference.varlen_prefill(q, k, v, cu, **ref_opts)

    def run(q, k, v, cu):
        return custom_ops.varlen_prefill(q, k, v, cu, return_lse=True, **options)

    with _kernels_only(monkeypatch) as launches:
        o, lse = _compiled(run)(q, k, v, cu)
    assert launches["attention_fwd"] == 1
    assert_close(o, o_want, torch.float32, what="varlen_prefill o")
    assert_lse_close(lse, lse_want, torch.float32, what="varlen_prefill lse")


def test_backend_option_reaches_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend="reference" through the custom op runs the reference, not the kernels."""
    q, k, v, valid = _padded_inputs()
    with pytest.raises(AssertionError, match="reference.padded_prefill ran instead"), \
            _kernels_only(monkeypatch):
        custom_ops.padded_prefill(q, k, v, valid, backend="reference")


def test_return_lse_false_returns_o_only() -> None:
    q, k, v, valid = _padded_inputs()
    o = custom_ops.padded_prefill(q, k, v, valid, causal=True)
    assert torch.is_tensor(o) and torch.equal(o, sf.padded_prefill(q, k, v, valid, causal=True))


# ----------------------------------------------------------------------------- a layer

class SpanLayer(torch.nn.Module):
    """One attention layer step over a paged cache with holes: project, append, attend."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.wq = torch.nn.Parameter(torch.randn(D, D, generator=gen) / D**0.5)
        self.wo = torch.nn.Parameter(torch.randn(D, D, generator=gen) / D**0.5)

    def forward(self, q, k_new, v_new, k_cache, v_cache, positions, qsl, seq_lens, block_table):
        q = q @ self.wq
        custom_ops.append_kv(k_new, v_new, k_cache, v_cache, positions, qsl, seq_lens, block_table, P)
        o, lse = custom_ops.span_prefill(q, k_cache, v_cache, positions, qsl, seq_lens, block_table,
                                         P, causal=True, return_lse=True)
        return (o @ self.wo).float().sum(-1), lse


def _layer_args(layout: sf.SpanLayout, seed: int = 0):
    k_cache, v_cache, q, k_new, v_new = _inputs(layout, seed=seed)
    return (q, k_new, v_new, k_cache, v_cache, *_meta(layout)[:4])


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
    custom_ops.append_kv(k_new, v_new, k_cache, v_cache, *_meta(layout))
    sf.append_kv(k_new, v_new, k2, v2, layout)
    assert torch.equal(k_cache, k2) and torch.equal(v_cache, v2)
    o, lse = custom_ops.span_prefill(q, k_cache, v_cache, *_meta(layout), return_lse=True)
    o2, lse2 = sf.span_prefill(q, k_cache, v_cache, layout, return_lse=True)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    assert torch.equal(custom_ops.span_prefill(q, k_cache, v_cache, *_meta(layout), causal=False),
                       sf.span_prefill(q, k_cache, v_cache, layout, causal=False))
    qp, kp = torch.randn(2, 5, HQ, D, device=DEVICE), torch.randn(2, 5, HK, D, device=DEVICE)
    lens = torch.tensor([5, 2], device=DEVICE)
    assert torch.equal(custom_ops.padded_prefill(qp, kp, kp, lens, padding_side="left"),
                       sf.padded_prefill(qp, kp, kp, lens, padding_side="left"))
    cu = torch.tensor([0, 3, 10], device=DEVICE)
    o, lse = custom_ops.varlen_prefill(qp.flatten(0, 1), kp.flatten(0, 1), kp.flatten(0, 1), cu,
                                       return_lse=True)
    o2, lse2 = sf.varlen_prefill(qp.flatten(0, 1), kp.flatten(0, 1), kp.flatten(0, 1), cu,
                                 return_lse=True)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)


# ----------------------------------------------------------------------------- fake kernels

@pytest.mark.parametrize("return_lse", [False, True])
def test_opcheck(return_lse: bool) -> None:
    """torch.library.opcheck: schema, fake kernels and autograd registration agree,
    with every option set away from its default."""
    layout = _metadata()
    k_cache, v_cache, q, k_new, v_new = _inputs(layout)
    lo, hi = _shard(layout)
    meta = _meta(layout)
    torch.library.opcheck(torch.ops.spanfill.append_kv.default, (k_new, v_new, k_cache, v_cache, *meta))
    torch.library.opcheck(torch.ops.spanfill.append_kv.default,
                          (k_new, v_new, k_cache, v_cache, *meta, layout.slot_mapping, lo, hi,
                           "triton"))
    torch.library.opcheck(torch.ops.spanfill.span_prefill.default,
                          (q, k_cache, v_cache, *meta, True, None, return_lse))
    torch.library.opcheck(torch.ops.spanfill.span_prefill.default,
                          (q, k_cache, v_cache, *meta, False, 0.3, return_lse, 2, 3.0, lo, hi,
                           "triton"))
    torch.library.opcheck(torch.ops.spanfill.span_prefill_append.default,
                          (q, k_new, v_new, k_cache, v_cache, *meta, True, None, return_lse))
    torch.library.opcheck(torch.ops.spanfill.span_prefill_append.default,
                          (q, k_new, v_new, k_cache, v_cache, *meta, False, 0.3, return_lse, 2,
                           3.0, lo, hi, "triton"))
    qp, kp = torch.randn(2, 5, HQ, D, device=DEVICE), torch.randn(2, 5, HK, D, device=DEVICE)
    lens = torch.tensor([5, 2], device=DEVICE)
    torch.library.opcheck(torch.ops.spanfill.padded_prefill.default,
                          (qp, kp, kp, lens, False, "right", None, return_lse))
    torch.library.opcheck(torch.ops.spanfill.padded_prefill.default,
                          (qp, kp, kp, lens, True, "left", 0.3, return_lse, 2, 3.0, "triton"))
    cu = torch.tensor([0, 3, 10], device=DEVICE)
    flat = (qp.flatten(0, 1), kp.flatten(0, 1), kp.flatten(0, 1), cu)
    torch.library.opcheck(torch.ops.spanfill.varlen_prefill.default, (*flat, True, 0.3, return_lse))
    torch.library.opcheck(torch.ops.spanfill.varlen_prefill.default,
                          (*flat, False, 0.3, return_lse, 2, 3.0, "triton"))
