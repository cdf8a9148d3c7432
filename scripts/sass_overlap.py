"""Whether the overlapped KV loop's softmax runs under the PV wgmma, read from the SASS.

    python scripts/sass_overlap.py [CASE ...] [--json]

For Gluon compile cases of ``scripts/compile_sm90.py`` (default: every one whose name
has ``pingpong``), compiles the kernel for sm_90a on this machine, disassembles it with
the ``nvdisasm`` that ships with Triton, and finds each innermost loop that issues a PV
wgmma (``HGMMA ... R, R, gdesc``: P from registers). In such a loop the overlapped form
means to run the softmax (its ``MUFU.EX2``) between the wait for QK^T and the wait for
PV (``WARPGROUP.DEPBAR.LE gsb0, 0x0``); the script counts the exponentials that come
before that wait. ptxas decides the order, not the source: on Triton 3.6 it puts all of
them after the wait unless ``pin_softmax`` is set (``_kv_loop_overlapped``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compile_sm90 import CASES, compile_attention  # noqa: E402

PV_WGMMA = re.compile(r"HGMMA\S* R\d+, R\d+, gdesc")


def sass_of(ptx: str) -> list[str]:
    """The SASS instructions and labels of one kernel's PTX (sm_90a), comments dropped."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = Path(get_ptxas(90).path)
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        subprocess.run([str(ptxas), "--gpu-name", "sm_90a", str(src), "-o", str(cubin)],
                       check=True, capture_output=True)
        text = subprocess.run([str(ptxas.parent / "nvdisasm"), "-c", str(cubin)], check=True,
                              capture_output=True, text=True).stdout
    lines = (re.sub(r"/\*[0-9a-f]*\*/", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("//")]


def pv_loops(sass: list[str]) -> list[dict]:
    """Each innermost loop (a label and the backward branch to it, with no other loop
    inside) that issues a PV wgmma: its length, its exponentials, and how many of them
    come before its first wait for every wgmma (``DEPBAR.LE gsb0, 0x0``)."""
    labels = {line.rstrip(":"): i for i, line in enumerate(sass) if line.startswith(".L")}
    loops = []
    for end, line in enumerate(sass):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), end) < end:
            loops.append((labels[m.group(1)], end))
    out = []
    for start, end in loops:
        if any(s > start and e < end for s, e in loops):  # not innermost
            continue
        body = sass[start:end + 1]
        if not any(PV_WGMMA.search(line) for line in body):
            continue
        waits = [k for k, line in enumerate(body) if "DEPBAR.LE gsb0, 0x0" in line]
        ex2 = [k for k, line in enumerate(body) if "MUFU.EX2" in line]
        out.append({"instructions": len(body), "exp2": len(ex2),
                    "exp2_before_pv_wait": sum(1 for k in ex2 if waits and k < waits[0])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for case in args.cases or [c for c in CASES if "pingpong" in c]:
        entry = compile_attention(CASES[case][0])
        rows.append({"case": case, "loops": pv_loops(sass_of(entry["ptx"]))})
    if args.json:
        print(json.dumps(rows))
        return
    import triton

    print(f"triton {triton.__version__}\n")
    print("| case | loop | instructions | exp2 | exp2 before the PV wait |")
    print("|---|---|---|---|---|")
    for r in rows:
        for i, loop in enumerate(r["loops"]):
            print(f"| {r['case']} | {i} | {loop['instructions']} | {loop['exp2']} "
                  f"| {loop['exp2_before_pv_wait']} |")


if __name__ == "__main__":
    main()
