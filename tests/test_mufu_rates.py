"""``scripts/mufu_rates.py`` compiles for sm_90 on a machine without a GPU (host only: its
runs are for the H200), and each PTX form of the exponential issues one ``MUFU.EX2`` an
element: the packed half-precision forms split into one per half."""
from __future__ import annotations

import ast

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU-only, as tests/test_compile_sm90.py: on a GPU, run the script")
def test_every_form_issues_one_mufu_an_element() -> None:
    from tests.helpers import compile_check

    counts = ast.literal_eval(compile_check("mufu_rates.py").split("mufu:")[1].strip())
    # 16 elements a thread, the compile check's 4 rounds unrolled
    assert counts == {"ex2.approx.ftz.f32": 64, "ex2.approx.f16x2": 64,
                      "ex2.approx.ftz.bf16x2": 64}
