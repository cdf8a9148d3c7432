"""Hypothesis property tests of every public op against spanfill.reference.

On the CPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), at small sizes; scripts/fuzz_gpu.py runs the same properties
at larger sizes on CUDA. The cases and checks live in tests/fuzzing.py.
Examples here: 260 span + 150 padded + 120 varlen = 530, derandomized so CI sees
the same cases every run. About half the span cases are T=1 or few rows over
long prompts, a fifth force split-KV (see tests/fuzzing.py);
test_span_cases_cover_the_edge_cases keeps it so.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from conftest import INTERPRETING
from fuzzing import (
    CPU_SIZES,
    GPU_SIZES,
    PaddedCase,
    SpanCase,
    VarlenCase,
    check_padded_case,
    check_span_case,
    check_varlen_case,
    padded_cases,
    poisoned_allocations,
    span_case_tags,
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


# Each edge case the span strategy must draw, in at least 1 example in 25.
EDGE_TAGS = ("T=1", "few_rows", "single_row", "page1", "page256", "whole-prompt",
             "no-span-request", "forced-splits")


@pytest.mark.parametrize("sizes", [CPU_SIZES, GPU_SIZES], ids=["cpu-sizes", "gpu-sizes"])
def test_span_cases_cover_the_edge_cases(sizes) -> None:
    """The cases that crashed on the GPU (T=1 on the split path) went undrawn for
    long; this draws the strategy's cases (running nothing) and counts them."""
    seen: Counter[str] = Counter()
    examples = 250

    @fuzz_settings(examples)
    @given(span_cases(sizes))
    def draw(case: SpanCase) -> None:
        seen.update(span_case_tags(case))

    draw()
    rare = {tag: seen[tag] for tag in EDGE_TAGS if seen[tag] < examples // 25}
    assert not rare, f"drawn too rarely in {examples} cases: {rare}"
