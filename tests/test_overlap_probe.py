"""``scripts/overlap_probe.py`` compiles for sm_90 on a machine without a GPU (host only:
its runs are for the H200): the tensor partition issues the D=128 loop's 16 wgmmas a
step (PV's P from registers, or from shared memory), the softmax partition 64
exponentials a step on MUFU, or none in its FMA form."""
from __future__ import annotations

import ast

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU-only, as tests/test_compile_sm90.py: on a GPU, run the probe")
def test_probe_compiles_for_sm90() -> None:
    from tests.helpers import compile_check

    counts = ast.literal_eval(compile_check("overlap_probe.py").split("counts:")[1].strip())
    assert counts == {
        # the softmax with exp2, PV's P from registers: 8 of the 16 wgmmas take it there
        "exp2_hgmma": 16, "exp2_hgmma_register_a": 8, "exp2_mufu": 64,
        # multiply-adds in place of exp2, P from shared memory: no register operand
        "fma_p_smem_hgmma": 16, "fma_p_smem_hgmma_register_a": 0, "fma_p_smem_mufu": 0,
        # the exponentials alone
        "exp2_only_hgmma": 16, "exp2_only_hgmma_register_a": 8, "exp2_only_mufu": 64,
    }
