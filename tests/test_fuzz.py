"""Hypothesis property tests of every public op against spanfill.reference.

On the CPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), at small sizes; scripts/fuzz_gpu.py runs the same properties
at larger sizes on CUDA. The cases and checks live in tests/fuzzing.py.
Examples here: 260 span + 150 padded + 120 varlen = 530, each op's in parts with
fixed seeds of their own (the same cases every run; on a GPU machine pytest-xdist
spreads the parts over its workers). About half the span cases are T=1 or few rows
over long prompts, a fifth force split-KV (see tests/fuzzing.py);
test_span_cases_cover_the_edge_cases keeps it so.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings

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


def _fuzz_part(strategy, check, examples: int, part: int):
    """One part of a fuzz test: ``examples`` cases from a fixed seed of its own.

    Each op's cases are split into parts (separate tests) so that pytest-xdist runs
    them in parallel on the GPU machine, where the span fuzz alone was the suite's
    longest test (225 s of a 323 s run on 2 x H200); on the CPU the total is the same.
    """
    @seed(7_919 * (part + 1) + examples)
    @settings(max_examples=examples, deadline=None, derandomize=False, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def run(case) -> None:
        check(case, DEVICE)

    return run


# 260 span + 150 padded + 120 varlen examples.
test_span_prefill_and_append_kv_part0 = _fuzz_part(span_cases(CPU_SIZES), check_span_case, 65, 0)
test_span_prefill_and_append_kv_part1 = _fuzz_part(span_cases(CPU_SIZES), check_span_case, 65, 1)
test_span_prefill_and_append_kv_part2 = _fuzz_part(span_cases(CPU_SIZES), check_span_case, 65, 2)
test_span_prefill_and_append_kv_part3 = _fuzz_part(span_cases(CPU_SIZES), check_span_case, 65, 3)
test_padded_prefill_part0 = _fuzz_part(padded_cases(CPU_SIZES), check_padded_case, 75, 0)
test_padded_prefill_part1 = _fuzz_part(padded_cases(CPU_SIZES), check_padded_case, 75, 1)
test_varlen_prefill_part0 = _fuzz_part(varlen_cases(CPU_SIZES), check_varlen_case, 40, 0)
test_varlen_prefill_part1 = _fuzz_part(varlen_cases(CPU_SIZES), check_varlen_case, 40, 1)
test_varlen_prefill_part2 = _fuzz_part(varlen_cases(CPU_SIZES), check_varlen_case, 40, 2)


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
