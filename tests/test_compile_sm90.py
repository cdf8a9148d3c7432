"""The attention kernel compiles for Hopper (sm_90) on a machine without a GPU.

The Triton interpreter runs the kernels' Python; it does not type-check them the
way the compiler does (loop-carried values, constexpr branches, descriptor
loads). Compiling for sm_90 here catches those errors before a GPU run, and
``scripts/compare_kernel_ir.py`` uses the same path to show a refactor leaves
the GPU code unchanged.

The compile runs in a subprocess without ``TRITON_INTERPRET`` and with an empty
Triton cache: in this process Triton was imported in interpreter mode, where
compiling works only for kernels already in the cache (a fresh CI machine has none).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_kernel_ir.py"


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> dict[str, dict[str, bool]]:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    done = subprocess.run([sys.executable, str(SCRIPT), "--features"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["paged_causal_d128_gqa4", "padded_d64", "padded_d128_tma"])
def test_kernel_compiles_for_sm90(features, case):
    got = features[case]
    assert got["wgmma"]  # Hopper's wgmma, not the mma.sync fallback
    assert got["tma"] == case.endswith("_tma")  # descriptor loads only where asked for
