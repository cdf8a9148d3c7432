"""Lazy rescaling of the accumulator (``attention.LAZY_RESCALE``) against the reference.

With it on, an unmasked KV step moves the running max (and rescales) only when some
row's max grew by more than ``RESCALE_SLACK`` (log2 units); otherwise the step's
``p`` may reach ``2**RESCALE_SLACK``. The cases below make the max grow in small
steps (never rescaled, p up to the slack), in big steps (rescaled mid-loop), and
not at all, and check outputs and lse.
"""

from __future__ import annotations

import math

import pytest
import torch

import spanfill as sf
from spanfill import reference as ref
from spanfill.kernels import attention
from tests.helpers import TOLERANCE, relerr
from tests.test_kernels import DEVICE, DTYPES, _check_lse


@pytest.fixture(autouse=True)
def lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "LAZY_RESCALE", True)


def _growing_scores(b: int, s: int, h: int, d: int, log2_step: float, dtype: torch.dtype):
    """q, k, v where the score of every query with key j is about ``j * log2_step`` log2
    units (after the kernel's 1/sqrt(d) scale), plus noise."""
    g = torch.Generator().manual_seed(int(log2_step * 100) + s)
    q = torch.randn(b, s, h, d, generator=g) * 0.1
    q[..., 0] = 1.0
    k = torch.randn(b, s, h, d, generator=g) * 0.1
    slope = log2_step * math.sqrt(d) / math.log2(math.e)  # natural-log units per key
    k[..., 0] = slope * torch.arange(s, dtype=torch.float32)[None, :, None]
    v = torch.randn(b, s, h, d, generator=g)
    return (x.to(dtype).to(DEVICE) for x in (q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log2_step", [0.0, 0.3, 1.5], ids=["flat", "creeping", "jumping"])
def test_padded_bidirectional_growing_max(dtype, log2_step):
    # 0.3 per key: ~5 log2 units per 16-key step, under the slack: p grows to 2**8
    # before a rescale; 1.5 per key: ~24 per step, a rescale every step.
    b, s, h, d = 3, 101, 2, 32
    q, k, v = _growing_scores(b, s, h, d, log2_step, dtype)
    valid_lens = torch.tensor([s, 70, 17], device=DEVICE)
    o, lse = sf.padded_prefill(q, k, v, valid_lens, causal=False, return_lse=True,
                               backend="triton")
    ro, rlse = ref.padded_prefill(q, k, v, valid_lens, False, "right")
    assert relerr(o, ro) < TOLERANCE[dtype]
    _check_lse(lse, rlse)
    assert (o[torch.isinf(rlse)] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_varlen_random(dtype, causal):
    torch.manual_seed(11)
    cu_seqlens = torch.tensor([0, 1, 100, 100, 229], device=DEVICE)
    t, hq, hk, d = 229, 4, 2, 64
    q = torch.randn(t, hq, d, dtype=dtype, device=DEVICE) * 3  # sharp softmax
    k = torch.randn(t, hk, d, dtype=dtype, device=DEVICE)
    v = torch.randn(t, hk, d, dtype=dtype, device=DEVICE)
    o, lse = sf.varlen_prefill(q, k, v, cu_seqlens, causal=causal, return_lse=True,
                               backend="triton")
    ro, rlse = ref.varlen_prefill(q, k, v, cu_seqlens, causal)
    assert relerr(o, ro) < TOLERANCE[dtype]
    _check_lse(lse, rlse)


def test_nan_input_row_stays_nan():
    # A NaN score must not pass for "no rescale needed" and vanish.
    q, k, v = (torch.randn(1, 64, 1, 32, dtype=torch.float32, device=DEVICE) for _ in range(3))
    q[0, 5] = float("nan")
    o = sf.padded_prefill(q, k, v, torch.tensor([64], device=DEVICE), causal=False,
                          backend="triton")
    assert torch.isnan(o[0, 5]).all()
    assert not torch.isnan(o[0, :5]).any() and not torch.isnan(o[0, 6:]).any()
