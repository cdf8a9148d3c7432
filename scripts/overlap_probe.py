"""Whether an H200 SM runs one warp group's wgmmas and another's softmax at the same time.

    PYTHONPATH=. python3 scripts/overlap_probe.py [--steps N] [--out DIR]

``scripts/trace_steps.py`` found the D=128 ping-pong form's softmax adding its whole time
to the tensor cores' in every schedule tried. This probe takes the attention kernel out
of the question: one program per SM (shared memory padded so that no second one fits),
two partitions of one warp group each (``gl.warp_specialize``):

- ``tensor``: N steps of the D=128 loop's two wgmmas, ``S = Q K^T`` (Q [64, 128] and K
  [128, 128] from shared memory) and ``O += P V`` (P from registers, V from shared
  memory), both issued, then waited for;
- ``softmax``: N steps of the D=128 loop's softmax on a [64, 128] fp32 tile in the wgmma
  layout (a multiply-add, the row max, ``exp2`` of 64 values a thread, the row sum);
  or (``fma``) the same with a multiply-add in place of ``exp2`` (no MUFU); or (``exp2
  only``) nothing but the 64 exponentials and the subtraction feeding them.

The tensor partition runs with P in registers (the attention kernel's PV) or in shared
memory (no register operand), to tell register-file pressure from the rest.

Each partition stamps ``%clock64`` at its start and end (lane 0 of each warp group; the
stamps of all programs are averaged). Run alone (the other partition's step count 0)
and together: if the SM overlaps them, together takes as long as the longer alone.
Writes ``DIR/overlap_probe.csv`` (the bench's columns; metric ``cycles_per_step``) and
``DIR/overlap_probe.png``, and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import new_figure, quantiles, save_figure, write_rows  # noqa: E402

ROWS, COLS = 64, 128  # a consumer group's S tile at D=128; K and V tiles are [128, 128]


@gluon.jit
def _clock(anchor):
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [anchor],
                                     dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _stamp(CLK, slot):
    lanes: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    t = gl.arange(0, 128, layout=lanes)
    gl.store(CLK + gl.program_id(0) * 4 + slot + t * 0, _clock(t), mask=t == 0)


@gluon.jit
def _tensor_part(q_smem, k_smem, v_smem, p_smem, OUT, CLK, steps, P_IN_SMEM: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, 128, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    s = gl.zeros([64, 128], gl.float32, layout=s_layout)
    acc = gl.zeros([64, 128], gl.float32, layout=s_layout)
    p = gl.full([64, 128], 0.01, gl.bfloat16, layout=p_layout)
    _stamp(CLK, 0)
    for _ in range(steps):
        s = warpgroup_mma(q_smem, k_smem.permute((1, 0)), s, is_async=True)
        if P_IN_SMEM:  # both operands of PV from shared memory (no register operand)
            acc = warpgroup_mma(p_smem, v_smem, acc, is_async=True)
        else:  # P from registers, as the attention kernel issues PV
            acc = warpgroup_mma(p, v_smem, acc, is_async=True)
        s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s, acc))
    _stamp(CLK, 1)
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    gl.store(OUT + gl.program_id(0) * 128 + rows, gl.sum(s + acc, axis=1))


@gluon.jit
def _softmax_part(OUT, CLK, steps, KIND: gl.constexpr):
    """KIND 0: the softmax with exp2 (MUFU); 1: with a multiply-add in place of exp2;
    2: exp2 alone (MUFU and the subtraction feeding it, no max or sum)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, 128, 16])
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, 128, layout=gl.SliceLayout(0, s_layout))
    x = (rows[:, None] * 128 + cols[None, :]).to(gl.float32) * 0.001
    m = gl.full([64], -1.0e30, gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([64], gl.float32, layout=gl.SliceLayout(1, s_layout))
    _stamp(CLK, 2)
    for _ in range(steps):
        if KIND == 2:
            x = gl.exp2(x - 1.0)
        else:
            x = x * 0.999 + 0.001
            m = gl.maximum(m, gl.max(x, axis=1))
            if KIND == 0:
                p = gl.exp2(x - m[:, None])
            else:
                p = (x - m[:, None]) * 1.4426950408889634 + 1.0
            l_i = l_i * 0.5 + gl.sum(p, axis=1)
    if KIND == 2:
        l_i = gl.sum(x, axis=1)
    _stamp(CLK, 3)
    gl.store(OUT + gl.program_id(0) * 128 + 64 + rows, l_i + m)


@gluon.jit
def _probe_kernel(Q, K, V, OUT, CLK, tensor_steps, softmax_steps, KIND: gl.constexpr,
                  P_IN_SMEM: gl.constexpr):
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 128], gl.bfloat16)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, 128], gl.bfloat16)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [64, 128], q_layout)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [128, 128], kv_layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [128, 128], kv_layout)
    p_smem = gl.allocate_shared_memory(gl.bfloat16, [64, 128], q_layout)
    # Unused: 128 KiB more, so that no second program fits on an SM.
    pad = gl.allocate_shared_memory(gl.bfloat16, [4, 128, 128], kv_layout)
    r64 = gl.arange(0, 64, layout=gl.SliceLayout(1, ld))
    r128 = gl.arange(0, 128, layout=gl.SliceLayout(1, ld))
    c = gl.arange(0, 128, layout=gl.SliceLayout(0, ld))
    q_tile = gl.load(Q + r64[:, None] * 128 + c[None, :])
    q_smem.store(q_tile)
    p_smem.store(q_tile)
    k_smem.store(gl.load(K + r128[:, None] * 128 + c[None, :]))
    v_tile = gl.load(V + r128[:, None] * 128 + c[None, :])
    v_smem.store(v_tile)
    pad.index(0).store(v_tile)
    fence_async_shared()
    gl.warp_specialize([
        (_tensor_part, (q_smem, k_smem, v_smem, p_smem, OUT, CLK, tensor_steps, P_IN_SMEM)),
        (_softmax_part, (OUT, CLK, softmax_steps, KIND)),
    ], [4], [240])


def run(tensor_steps: int, softmax_steps: int, kind: int, p_in_smem: bool, programs: int,
        device: torch.device) -> tuple[float, float]:
    """Mean cycles per step of each partition over the programs (nan: 0 steps)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = (torch.randn(64, 128, generator=gen) * 0.1).to(device, torch.bfloat16)
    k, v = ((torch.randn(128, 128, generator=gen) * 0.1).to(device, torch.bfloat16)
            for _ in range(2))
    out = torch.zeros(programs * 128, device=device)
    clk = torch.zeros(programs * 4, dtype=torch.int64, device=device)
    _probe_kernel[(programs,)](q, k, v, out, clk, tensor_steps, softmax_steps, kind, p_in_smem,
                               num_warps=4)
    torch.cuda.synchronize()
    c = clk.view(programs, 4).double()
    tensor = ((c[:, 1] - c[:, 0]).mean() / tensor_steps).item() if tensor_steps else float("nan")
    soft = ((c[:, 3] - c[:, 2]).mean() / softmax_steps).item() if softmax_steps else float("nan")
    return tensor, soft


def compile_check() -> dict[str, int]:
    """Compile the probe for sm_90 on this machine (no GPU), both softmax kinds, as
    ``scripts/compile_sm90.py`` compiles the kernels: its wgmma and MUFU counts."""
    import re

    from compile_sm90 import compile_instead_of_launch
    from sass_overlap import sass_of

    counts = {}
    cases = ((0, False, "exp2"), (1, True, "fma_p_smem"), (2, False, "exp2_only"))
    for kind, p_smem, name in cases:
        sink: list[dict] = []
        with compile_instead_of_launch(sink):
            q = torch.zeros(64, 128, dtype=torch.bfloat16)
            kv = torch.zeros(128, 128, dtype=torch.bfloat16)
            _probe_kernel[(2,)](q, kv, kv, torch.zeros(2 * 128), torch.zeros(8, dtype=torch.int64),
                                10, 10, kind, p_smem, num_warps=4)
        sass = sass_of(sink[-1]["ptx"])
        counts[f"{name}_hgmma"] = sum(bool(re.search(r"\bHGMMA", line)) for line in sass)
        counts[f"{name}_hgmma_register_a"] = sum(
            bool(re.search(r"\bHGMMA\S* R\d+, R\d+, gdesc", line)) for line in sass)
        counts[f"{name}_mufu"] = sum("MUFU.EX2" in line for line in sass)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--compile-check", action="store_true",
                        help="only compile the probe for sm_90 here (no GPU) and print its "
                             "wgmma and MUFU.EX2 counts")
    args = parser.parse_args()
    if args.compile_check:
        print("counts:", compile_check())
        return
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit("needs a Hopper (sm_90) GPU")
    device = torch.device("cuda")
    programs = torch.cuda.get_device_properties(device).multi_processor_count
    n = args.steps
    # (name, tensor steps, softmax steps, softmax kind, P from shared memory)
    configs = [("tensor (P in registers) alone", n, 0, 0, False),
               ("tensor (P in shared memory) alone", n, 0, 0, True)]
    for kind, what in ((0, "softmax (exp2)"), (1, "softmax (fma)"), (2, "exp2 only")):
        configs += [(f"{what} alone", 0, n, kind, False),
                    (f"tensor (P in registers) + {what}", n, n, kind, False),
                    (f"tensor (P in shared memory) + {what}", n, n, kind, True)]
    for name, t_steps, s_steps, kind, p_smem in configs:  # compile and warm up
        run(min(t_steps, 10), min(s_steps, 10), kind, p_smem, programs, device)
    rows, table = [], []
    for name, t_steps, s_steps, kind, p_smem in configs:
        tensor, soft = run(t_steps, s_steps, kind, p_smem, programs, device)
        for part, value in (("tensor", tensor), ("softmax", soft)):
            if value == value:  # not nan
                rows.append({"kernel": "overlap_probe", "provider": part, "workload": name,
                             "metric": "cycles_per_step", "unit": "cycles",
                             **quantiles([value]),
                             "note": f"{programs} programs x {n} steps, %clock64"})
        table.append(f"| {name} | {tensor:.0f} | {soft:.0f} |")
        print(table[-1], flush=True)
    out = Path(args.out)
    print("wrote", write_rows(out / "overlap_probe.csv", rows),
          plot(rows, out / "overlap_probe.png"))
    print("\n| run | tensor cycles/step | softmax cycles/step |\n|---|---|---|")
    print("\n".join(table))


def plot(rows: list[dict], path: Path) -> Path:
    """Cycles per step of each partition in each run (bars side by side)."""
    runs = list(dict.fromkeys(r["workload"] for r in rows))
    fig, ax = new_figure(max(6, 0.7 * len(runs)), 4)
    for k, part in enumerate(("tensor", "softmax")):
        vals = [next((float(r["p50"]) for r in rows
                      if r["workload"] == name and r["provider"] == part), 0.0) for name in runs]
        ax.bar([i + 0.4 * k for i in range(len(runs))], vals, width=0.4, label=part)
    ax.set_xticks([i + 0.2 for i in range(len(runs))], runs, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("cycles per step (%clock64)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
