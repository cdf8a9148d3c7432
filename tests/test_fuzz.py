"""Hypothesis property tests of every public op against spanfill.reference.

On the CPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), at small sizes; scripts/fuzz_gpu.py runs the same properties
at larger sizes on CUDA. The cases and checks live in tests/fuzzing.py.
Examples here: 260 span + 150 padded + 120 varlen = 530, derandomized so CI sees
the same cases every run.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from conftest import INTERPRETING
from fuzzing import (
    CPU_SIZES,
    PaddedCase,
    SpanCase,
    VarlenCase,
    check_padded_case,
    check_span_case,
    check_varlen_case,
    padded_cases,
    poisoned_allocations,
    span_cases,
    varlen_cases,
)

import spanfill as sf

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETING, reason="needs CUDA or TRITON_INTERPRET=1"
)


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@fuzz_settings(260)
@given(span_cases(CPU_SIZES))
def test_span_prefill_and_append_kv(case: SpanCase) -> None:
    check_span_case(case, DEVICE)


@fuzz_settings(150)
@given(padded_cases(CPU_SIZES))
def test_padded_prefill(case: PaddedCase) -> None:
    check_padded_case(case, DEVICE)


@fuzz_settings(120)
@given(varlen_cases(CPU_SIZES))
def test_varlen_prefill(case: VarlenCase) -> None:
    check_varlen_case(case, DEVICE)


def test_poison_reaches_the_outputs() -> None:
    """The fuzz tests poison outputs by patching torch.empty/empty_like; if the ops
    stop allocating through them the poison silently stops: this test says so."""
    q = torch.randn(3, 2, 32, device=DEVICE)
    with poisoned_allocations() as count:
        sf.varlen_prefill(q, q, q, torch.tensor([0, 3], device=DEVICE), return_lse=True,
                          backend="triton")
    assert count[0] >= 2, "outputs are no longer allocated with torch.empty/empty_like"
