"""The cached direct launch (spanfill/kernels/launch.py) against Triton's own launch.

A launch that reuses a compiled kernel must only do so for arguments that
specialize the same way: a misaligned view or a stride that is no longer a
multiple of 16 needs its own kernel, and results must match Triton's path bit
for bit.
"""

from __future__ import annotations

import pytest
import torch

import spanfill as sf
from spanfill import reference as ref
from tests.helpers import TOLERANCE, relerr

pytestmark = pytest.mark.gpu


def _inputs(offset: int, width: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [B=3, S=70, H=4, D=64] as views into wider rows (``width`` >= 64 + offset)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    out = []
    for _ in range(3):
        buf = torch.randn(3, 70, 4, width, device="cuda", dtype=torch.float16, generator=gen)
        out.append(buf[..., offset:offset + 64])
    return tuple(out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cached_launch_matches_triton_launch(monkeypatch):
    from spanfill.kernels.attention import _launch_attn_fwd

    valid = torch.tensor([70, 1, 33], device="cuda")
    layout = sf.PaddedLayout.build(valid, 70)
    # aligned and contiguous; misaligned by 2 bytes; row stride not a multiple of 16
    cases = [(0, 64), (1, 72), (0, 72), (8, 80)]
    for round_ in range(2):  # the second round finds every kernel in the cache
        for offset, width in cases:
            q, k, v = _inputs(offset, width)
            fast = sf.padded_prefill(q, k, v, layout)
            monkeypatch.setenv("SPANFILL_FAST_LAUNCH", "0")
            slow = sf.padded_prefill(q, k, v, layout)
            monkeypatch.delenv("SPANFILL_FAST_LAUNCH")
            assert torch.equal(fast, slow), (offset, width)
            expect, _ = ref.padded_prefill(q, k, v, valid, False, "right")
            assert relerr(fast, expect) < TOLERANCE[torch.float16]
            if round_ == 1:
                assert len(_launch_attn_fwd._kernels) == cached, "a cache hit added a kernel"
        cached = len(_launch_attn_fwd._kernels)
    # the misaligned view and the odd strides specialize apart from the aligned case
    assert len({key[-1] for key in _launch_attn_fwd._kernels}) >= 3
