"""The attention kernel compiles for Hopper (sm_90) on a machine without a GPU.

The Triton interpreter runs the kernels' Python; it does not type-check them the
way the compiler does (loop-carried values, constexpr branches, descriptor
loads). Compiling for sm_90 here catches those errors before a GPU run, and
``scripts/compare_kernel_ir.py`` uses the same path to show a refactor leaves
the GPU code unchanged.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_kernel_ir.py"


@pytest.fixture(scope="module")
def compare():
    pytest.importorskip("triton.backends.nvidia")
    spec = importlib.util.spec_from_file_location("compare_kernel_ir", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", ["paged_causal_d128_gqa4", "padded_d64", "padded_d128_tma"])
def test_kernel_compiles_for_sm90(compare, case, tmp_path):
    kernel = compare.load_kernel_module(None, tmp_path)
    ir = compare.ttgir(kernel, compare._cases()[case])
    assert "ttng.warp_group_dot" in ir  # Hopper's wgmma, not the mma.sync fallback
    if case.endswith("_tma"):
        assert "ttng.async_tma_copy_global_to_local" in ir  # descriptor loads
    else:
        assert "ttng.async_tma_copy_global_to_local" not in ir
