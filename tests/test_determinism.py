"""Same inputs, same bits: every op run 20 times gives bitwise-identical results.

A server replays prompts and compares logits across replicas; any run-to-run
difference (atomics, racy writes, unordered reductions) would show up here.
"""

from __future__ import annotations

import pytest
import torch

import spanfill as sf
from conftest import INTERPRETING, tensor_digest

RUNS = 20


def _span_step(device: str, t_scale: int, d: int, dtype: torch.dtype, page_size: int):
    """A fixed segmented-prefill step: returns a function that runs it on a fresh cache copy."""
    gen = torch.Generator().manual_seed(7)
    seq_lens = [37 * t_scale, 5, 64 * t_scale, 1]
    spans = [[(0, 3), (10, 11), (20, 37 * t_scale)], [(4, 5)], [(1, 2), (63, 64 * t_scale)], []]
    pages = [(n + page_size - 1) // page_size for n in seq_lens]
    perm = torch.randperm(sum(pages) + 2, generator=gen).to(torch.int32)
    table = torch.full((4, max(pages)), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[used:used + n]
        used += n
    layout = sf.SpanLayout.build(spans, seq_lens, table.to(device), page_size)
    t, hq, hk = layout.num_tokens, 8, 2
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    k0, v0 = rnd(perm.numel(), page_size, hk, d), rnd(perm.numel(), page_size, hk, d)
    q, k_new, v_new = rnd(t, hq, d), rnd(t, hk, d), rnd(t, hk, d)

    def run() -> str:
        k_cache, v_cache = k0.clone(), v0.clone()
        sf.append_kv(k_new, v_new, k_cache, v_cache, layout, backend="triton")
        outs = []
        for causal in (True, False):
            outs += list(sf.span_prefill(q, k_cache, v_cache, layout, causal=causal,
                                         return_lse=True, backend="triton"))
        return tensor_digest(k_cache, v_cache, *outs)

    return run


def _dense_step(device: str, s: int, d: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(8)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = rnd(3, s, 8, d), rnd(3, s, 2, d), rnd(3, s, 2, d)
    lens = torch.tensor([s, 0, s // 2 + 1], device=device)
    cu = torch.tensor([0, s, s + 1, 3 * s], device=device)

    def run() -> str:
        outs = []
        for causal in (True, False):
            for side in ("right", "left"):
                outs += list(sf.padded_prefill(q, k, v, lens, causal=causal, padding_side=side,
                                               return_lse=True, backend="triton"))
            outs += list(sf.varlen_prefill(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu,
                                           causal=causal, return_lse=True, backend="triton"))
        return tensor_digest(*outs)

    return run


def _assert_deterministic(run) -> None:
    first = run()
    for i in range(1, RUNS):
        assert run() == first, f"run {i} differs from run 0"


@pytest.mark.skipif(not INTERPRETING, reason="CPU version runs in the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_span_deterministic_cpu(dtype: torch.dtype) -> None:
    _assert_deterministic(_span_step("cpu", 1, 32, dtype, page_size=16))


@pytest.mark.skipif(not INTERPRETING, reason="CPU version runs in the Triton interpreter")
def test_dense_deterministic_cpu() -> None:
    _assert_deterministic(_dense_step("cpu", 19, 32, torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_span_deterministic_gpu(dtype: torch.dtype) -> None:
    _assert_deterministic(_span_step("cuda", 40, 128, dtype, page_size=16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_dense_deterministic_gpu(dtype: torch.dtype) -> None:
    _assert_deterministic(_dense_step("cuda", 1023, 128, dtype))
