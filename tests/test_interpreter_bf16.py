"""bf16 through the kernels under Triton's interpreter is right, not garbage.

The interpreter's bf16 ``tl.dot`` is wrong (relative errors ~1e9 on Triton 3.9), so
the attention kernel widens bf16 tiles to fp32 for its dots there
(``spanfill.kernels.attention._ieee_dot``). These tests run every op on the kernel
path in bf16 against the reference; on a GPU the compiled kernels run and the same
checks hold.
"""

from __future__ import annotations

import pytest
import torch

import spanfill as sf
from spanfill import reference
from spanfill.testing import TOLERANCE, reference_span, rel_err

from conftest import INTERPRETING
from helpers import paged_setup

BF16 = torch.bfloat16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETING,
                                reason="needs a GPU or TRITON_INTERPRET=1")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_padded_prefill_bf16(causal: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 37, h, 64, generator=gen).to(DEVICE, BF16) for h in (4, 2, 2))
    lens = torch.tensor([37, 1, 20], device=DEVICE)
    o, lse = sf.padded_prefill(q, k, v, lens, causal=causal, return_lse=True, backend="triton")
    ref, ref_lse = reference.padded_prefill(q, k, v, lens, causal, "right")
    assert rel_err(o, ref) < TOLERANCE[BF16]
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-2, rtol=0)


def test_varlen_prefill_bf16() -> None:
    gen = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 1, 30, 63], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(63, h, 32, generator=gen).to(DEVICE, BF16) for h in (8, 1, 1))
    o = sf.varlen_prefill(q, k, v, cu, causal=True, backend="triton")
    ref, _ = reference.varlen_prefill(q, k, v, cu, causal=True)
    assert rel_err(o, ref) < TOLERANCE[BF16]


@pytest.mark.parametrize("splits", ["1", "3"], ids=["unsplit", "split3"])
def test_span_prefill_bf16(splits: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPANFILL_SPLITS", splits)
    layout, k_cache, v_cache, q, k_new, v_new = paged_setup(
        [70, 33, 1], [[(0, 1), (5, 40), (69, 70)], [(10, 33)], [(0, 1)]], 16, 4, 2, 64, BF16,
        DEVICE)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    sf.append_kv(k_new, v_new, k_cache, v_cache, layout, backend="triton")
    reference.append_kv(k_new, v_new, ref_k, ref_v, layout.slot_mapping)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    o, lse = sf.span_prefill(q, k_cache, v_cache, layout, return_lse=True, backend="triton")
    ref, ref_lse = reference_span(q, ref_k, ref_v, layout, True, 64 ** -0.5)
    assert rel_err(o, ref) < TOLERANCE[BF16]
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-2, rtol=0)


def test_merge_states_bf16() -> None:
    gen = torch.Generator().manual_seed(5)
    o_a, o_b = (torch.randn(9, 4, 64, generator=gen).to(DEVICE, BF16) for _ in range(2))
    lse_a, lse_b = (torch.randn(9, 4, generator=gen).to(DEVICE) for _ in range(2))
    lse_b[0] = float("-inf")
    o, lse = sf.merge_states(o_a, lse_a, o_b, lse_b, backend="triton")
    ref, ref_lse = reference.merge_states(torch.stack([o_a, o_b], 1), torch.stack([lse_a, lse_b], 1))
    assert rel_err(o, ref) < TOLERANCE[BF16]
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)

