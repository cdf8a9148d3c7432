"""Registers and spills of each Gluon (Hopper) launch form, from ptxas.

    python scripts/ptxas_usage.py [--json]

Compiles the forms ``scripts/ab_gluon.py`` times (64 or 128 rows per program, the
softmax in sequence or under the previous tile's PV, with or without the producer
warp; D 64, 128 and 256 over a paged cache of 16-row pages, GQA 4) for sm_90 on this
machine, as ``scripts/compile_sm90.py`` does, and runs the ``ptxas -v`` that Triton
itself assembles sm_90 code with on each one's PTX: the static side of a profile (a
form that spills, or the register cap that decides how many programs fit on an SM),
available without a GPU. Run it with the Triton the GPU machine has
(``PYTHONPATH=<triton 3.6 site>``) to see what the H200 ran.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from compile_sm90 import compile_attention, gluon_paged_case  # noqa: E402

# (rows per program, overlap, producer warp): the forms of scripts/ab_gluon.py.
FORMS = list(itertools.product((64, 128), (False, True), (False, True)))


def ptxas_usage(ptx: str) -> dict[str, int]:
    """``ptxas -v`` of one kernel's PTX for sm_90a: registers (for a warp-specialized
    kernel, the cap every warp starts with) and spill bytes. (Shared memory is dynamic,
    sized at launch, so ptxas does not see it.)"""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the one Triton itself assembles sm_90 code with
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(src), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    text = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(text[-2000:])

    def grab(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {"registers": grab(r"Used (\d+) registers"),
            "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for d, (block_m, overlap, producer) in itertools.product((64, 128, 256), FORMS):
        entry = compile_attention(gluon_paged_case(100, 16, 24, 8, 2, d,
                                                   warp_specialize=producer,
                                                   block_m=block_m, overlap=overlap))
        rows.append({"d": d, "block_m": block_m, "overlap": overlap, "producer": producer,
                     **ptxas_usage(entry["ptx"])})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"triton {triton.__version__}\n")
    print("| D | rows | softmax | copies | registers | spill stores | spill loads |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['d']} | {r['block_m']} | {'under PV' if r['overlap'] else 'in sequence'} "
              f"| {'producer warp' if r['producer'] else 'warp group'} | {r['registers']} "
              f"| {r['spill_stores']} | {r['spill_loads']} |")


if __name__ == "__main__":
    main()
