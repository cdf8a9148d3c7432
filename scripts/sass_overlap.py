"""Whether the overlapped KV loop's softmax runs under the PV wgmma, read from the SASS.

    python scripts/sass_overlap.py [CASE ...] [--json]

For Gluon compile cases of ``scripts/compile_sm90.py`` (default: every one whose name
has ``pingpong``), compiles the kernel for sm_90a on this machine, disassembles it with
the ``nvdisasm`` that ships with Triton, and finds each innermost loop that issues a PV
wgmma (``HGMMA ... R, R, gdesc``: P from registers). In such a loop the overlapped form
means to run the softmax (its ``MUFU.EX2``) between the wait for QK^T and the wait for
PV (``WARPGROUP.DEPBAR.LE gsb0, 0x0``); the script counts the exponentials that come
before that wait, and the row max's compares (``FMNMX``) too. ptxas decides the order,
not the source: on Triton 3.6 it puts all of them after the wait unless ``pin_softmax``
is set (``_kv_loop_overlapped``; ``pin_softmax="max"`` moves the compares only). It
also counts the exponentials between that wait and the release of PV's ring stage (the
first mbarrier arrival after it), which delay the producer's next copy into the stage
(``pin_softmax="max_reload"`` leaves none there).

Each loop's synchronisation is counted too (static counts: an instruction in a branch
counts once): warp-group barriers (``BAR.SYNC``), named-barrier arrivals (``BAR.ARV``),
``MEMBAR``, mbarrier waits and arrivals (``SYNCS.*``).

    python scripts/sass_overlap.py --sass FILE.sass [--sass ...] [--events]

reads disassemblies instead (``nvdisasm -c`` output), e.g. FlashAttention-4's SM90
kernel, dumped on the GPU machine with ``CUTE_DSL_KEEP=cubin CUTE_DSL_DUMP_DIR=DIR``
and disassembled by the ``nvdisasm`` in Triton's ``backends/nvidia/bin``.
``--events`` lists each loop's wgmma, wait and synchronisation instructions in order,
with the exponentials issued before each.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
    return _instructions(text)


def read_sass(path: Path) -> list[str]:
    """The SASS instructions and labels of an ``nvdisasm -c`` listing, as :func:`sass_of`."""
    return _instructions(path.read_text())


def _instructions(listing: str) -> list[str]:
    """An ``nvdisasm -c`` listing's instructions and labels, addresses and comments
    dropped."""
    lines = (re.sub(r"/\*[0-9a-f]*\*/", "", line).strip() for line in listing.splitlines())
    return [line for line in lines if line and not line.startswith("//")]


EVENT = re.compile(r"HGMMA.*gsb0|WARPGROUP\.DEPBAR|BAR\.(SYNC|ARV)|MEMBAR|SYNCS\.")


def opcode(line: str) -> str:
    """The opcode of an instruction, its predicate (``@P0``, ``@!UP1``) dropped."""
    words = re.sub(r"^@!?U?P\w+\s+", "", line).split()
    return words[0] if words else ""


def pv_loops(sass: list[str], events: bool = False) -> list[dict]:
    """Each innermost loop (a label and the backward branch to it, with no other loop
    inside) that issues a PV wgmma: its length, its exponentials, how many of them
    come before its first wait for every wgmma (``DEPBAR.LE gsb0, 0x0``), and its
    synchronisation instructions by kind. ``events``: also ``"events"``, each wgmma group
    end, wait and synchronisation instruction in order as ``(index, instruction,
    exponentials before it)``."""
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
        pv_wait = waits[0] if waits else -1  # (no wait: nothing counts as before it)
        ops = [opcode(line) for line in body]
        ex2 = [k for k, op in enumerate(ops) if op.startswith("MUFU.EX2")]
        # the row max's compares (the mask's branch has none: it selects)
        fmnmx = [k for k, op in enumerate(ops) if op.startswith("FMNMX")]
        # the release of PV's ring stage: the first mbarrier arrival after the PV wait
        # (none: nothing after the wait counts)
        release = next((k for k, op in enumerate(ops) if k > pv_wait >= 0
                        and op.startswith("SYNCS.ARRIVE")), pv_wait)
        loop = {"instructions": len(body), "exp2": len(ex2),
                "exp2_before_pv_wait": sum(k < pv_wait for k in ex2),
                "exp2_between_pv_wait_and_release": sum(pv_wait < k < release for k in ex2),
                "fmnmx": len(fmnmx),
                "fmnmx_before_pv_wait": sum(k < pv_wait for k in fmnmx),
                "bar_sync": sum(op.startswith("BAR.SYNC") for op in ops),
                "bar_arrive": sum(op.startswith("BAR.ARV") for op in ops),
                "membar": sum(op.startswith("MEMBAR") for op in ops),
                "mbarrier_ops": sum(op.startswith("SYNCS.") for op in ops)}
        if events:
            loop["events"] = [(k, line, sum(1 for e in ex2 if e < k))
                              for k, line in enumerate(body) if EVENT.search(line)]
        out.append(loop)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sass", action="append", default=[], metavar="FILE",
                        help="read this nvdisasm -c listing instead of compiling cases")
    parser.add_argument("--events", action="store_true",
                        help="list each loop's wgmma, wait and synchronisation instructions")
    args = parser.parse_args()
    # Compiling for sm_90 takes the real compiler, not the interpreter; set before
    # compile_sm90 imports spanfill (importing this module for its parsers leaves the
    # environment alone: tests/test_sass_overlap.py).
    os.environ["TRITON_INTERPRET"] = "0"
    from compile_sm90 import CASES, compile_attention

    rows = []
    for path in args.sass:
        rows.append({"case": Path(path).name, "loops": pv_loops(read_sass(Path(path)),
                                                                 args.events)})
    for case in args.cases or ([] if args.sass else [c for c in CASES if "pingpong" in c]):
        entry = compile_attention(CASES[case][0])
        rows.append({"case": case, "loops": pv_loops(sass_of(entry["ptx"]), args.events)})
    if args.json:
        print(json.dumps(rows))
        return
    import triton

    print(f"triton {triton.__version__}\n")
    print("| case | loop | instructions | exp2 | exp2 before the PV wait "
          "| exp2 between the PV wait and the release | FMNMX "
          "| FMNMX before the PV wait | BAR.SYNC | BAR.ARV | MEMBAR | mbarrier ops |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for i, loop in enumerate(r["loops"]):
            print(f"| {r['case']} | {i} | {loop['instructions']} | {loop['exp2']} "
                  f"| {loop['exp2_before_pv_wait']} "
                  f"| {loop['exp2_between_pv_wait_and_release']} | {loop['fmnmx']} "
                  f"| {loop['fmnmx_before_pv_wait']} | {loop['bar_sync']} "
                  f"| {loop['bar_arrive']} | {loop['membar']} | {loop['mbarrier_ops']} |")
    for r in rows:
        for i, loop in enumerate(r["loops"]):
            if "events" in loop:
                print(f"\n{r['case']}, loop {i}: index, instruction, exponentials before it")
                for k, line, before in loop["events"]:
                    print(f"{k:5d}  {line}  [{before}]")


if __name__ == "__main__":
    main()
