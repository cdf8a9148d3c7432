"""Compile the attention kernel for sm_90 on a machine without a GPU, at a git revision
and in the working tree, and say whether the Triton GPU IR is the same.

A refactor of ``spanfill/kernels/attention.py`` that leaves the TTGIR unchanged
cannot change speed or results; one that changes it needs the GPU (tests and a
``bench/`` run). Cases: paged causal (segmented, GQA 4, D=128) and dense
bidirectional zero-filled (padded, D=64 and D=128, with and without descriptors),
each with the tile shape ``pick_config`` gives on an H100.

Usage::

    python scripts/compare_kernel_ir.py [REV]      # REV defaults to HEAD
    python scripts/compare_kernel_ir.py --features # JSON: what each case compiles to

Run it as its own process, never inside one that imported Triton under
``TRITON_INTERPRET=1`` (the test suite): there ``tl.zeros`` and the other
``triton.language`` helpers are interpreted functions, and compiling a kernel that
is not in Triton's cache fails (``tests/test_compile_sm90.py`` runs it in a
subprocess with an empty cache).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# Triton 3.9 warns unless this is set; 1 is the behaviour of the Triton on the GPU machine.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if __name__ == "__main__":  # compiled mode from the start (the interpreter patches tl.*)
    os.environ["TRITON_INTERPRET"] = "0"
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spanfill.kernels.configs import pick_config  # noqa: E402

KERNEL = "spanfill/kernels/attention.py"


def load_kernel_module(rev: str | None, tmp: Path):
    """The kernel module at git revision ``rev`` (None: the working tree).

    Loaded from a copy with its relative imports made absolute. Compiled mode comes
    from this script running as its own process (``TRITON_INTERPRET=0`` is set
    before Triton is imported; see the module docstring).
    """
    if rev is None:
        text = (ROOT / KERNEL).read_text()
    else:
        text = subprocess.run(["git", "show", f"{rev}:{KERNEL}"], check=True, cwd=ROOT,
                              capture_output=True, text=True).stdout
    name = f"attention_at_{rev or 'worktree'}".replace("~", "_").replace("^", "_")
    path = tmp / f"{name}.py"
    path.write_text(re.sub(r"^from \.(\w+) import", r"from spanfill.kernels.\1 import", text,
                           flags=re.MULTILINE))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cases() -> dict[str, dict]:
    cases = {}
    for name, d, group, paged, tma in (("paged_causal_d128_gqa4", 128, 4, True, False),
                                       ("padded_d64", 64, 1, False, False),
                                       ("padded_d128_tma", 128, 1, False, True)):
        cfg = pick_config(d, torch.bfloat16, group, True, paged=paged, tma=tma)
        cases[name] = dict(
            constexprs=dict(GROUP=group, HEADS=cfg.heads, HEAD_DIM=d, BLOCK_M=cfg.block_m,
                            BLOCK_N=cfg.block_n, BLOCK_D=d, PAGE_SIZE=16 if paged else 1,
                            CAUSAL=paged, PAGED=paged, HAS_POSITIONS=paged, HAS_KV_LO=False,
                            HAS_WINDOW=False, SOFT_CAP=False, RETURN_LSE=not paged,
                            ZERO_FILL=not paged, IEEE_DOT=False, EVEN_D=True, USE_TMA=tma,
                            HEAD_GROUPS=8, BOUNDARY_STAGES=cfg.num_stages, NUM_SPLITS=1),
            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), d=d, tma=tma)
    return cases


def _signature(fn, case: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in case["constexprs"]:
            sig[name] = "constexpr"
        elif name in ("K", "V") and case["tma"]:
            sig[name] = f"tensordesc<bf16[{case['constexprs']['BLOCK_N']}, {case['d']}]>"
        elif name in ("Q", "K", "V", "O"):
            sig[name] = "*bf16"
        elif name == "LSE":
            sig[name] = "*fp32"
        elif name in ("qk_scale", "cap_scale"):
            sig[name] = "fp32"
        elif name[0].isupper():  # the plan's and the block table's int32 arrays
            sig[name] = "*i32"
        else:
            sig[name] = "i32"
    return sig


def ttgir(module, case: dict) -> str:
    """The kernel's TTGIR for sm_90 with source locations removed."""
    fn = module._attn_fwd_kernel
    consts = {(fn.arg_names.index(k),): v for k, v in case["constexprs"].items()
              if k in fn.arg_names}
    src = ASTSource(fn=fn, signature=_signature(fn, case), constexprs=consts)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=case["options"])
    text = re.sub(r" loc\(#loc\d*\)", "", kernel.asm["ttgir"])
    return "\n".join(line for line in text.splitlines() if not line.startswith("#loc"))


def features() -> dict[str, dict[str, bool]]:
    """For every case: whether the working tree's kernel compiles to Hopper's wgmma
    and to descriptor (TMA) loads."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        current = load_kernel_module(None, Path(tmp))
        for name, case in _cases().items():
            ir = ttgir(current, case)
            out[name] = {"wgmma": "ttng.warp_group_dot" in ir,
                         "tma": "ttng.async_tma_copy_global_to_local" in ir}
    return out


def main(rev: str = "HEAD") -> int:
    if rev == "--features":
        print(json.dumps(features()))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        old = load_kernel_module(rev, Path(tmp))
        current = load_kernel_module(None, Path(tmp))
        changed = 0
        for name, case in _cases().items():
            same = ttgir(old, case) == ttgir(current, case)
            changed += not same
            print(f"{name:26s} {'same TTGIR' if same else 'TTGIR DIFFERS'} ({rev} vs working tree)")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
