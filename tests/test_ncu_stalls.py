"""``scripts/ncu_stalls.py`` on a small hand-written ncu source-page CSV (no GPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ncu_stalls.py"


def test_top_instructions_name_the_two_before_them(tmp_path: Path) -> None:
    csv = tmp_path / "report.sass.csv"
    csv.write_text('"Address","Source","stall_barrier","stall_wait"\n'
                   '"0x0","BAR.SYNC.DEFER_BLOCKING 0x1","0","1"\n'
                   '"0x10","NOP","50","0"\n'
                   '"0x20","FFMA R1, R2, R3","0","5"\n')
    out = subprocess.run([sys.executable, str(SCRIPT), str(csv)], check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[1].split()[:2] == ["stall_barrier", "50"]
    top = out.index("top 15 instructions by samples")
    # The NOP holds the samples; the barrier it waits behind is the line before it.
    assert out[top + 1].split()[:2] == ["50", "NOP"]
    assert out[top + 2].strip() == "after: BAR.SYNC.DEFER_BLOCKING 0x1"
    assert out[top + 4].strip() == "after: BAR.SYNC.DEFER_BLOCKING 0x1 | NOP"


def test_opcodes_compares_two_pages_executed_and_sampled(tmp_path: Path) -> None:
    import gzip

    head = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
            '"stall_wait"\n')
    a = tmp_path / "a.sass.csv"
    a.write_text(head + '"0x0","MUFU.EX2 R1, R1","7","4000000","7"\n'
                 '"0x10","@!P0 BRA 0x0","1","1000000","1"\n')
    b = tmp_path / "b.sass.csv.gz"  # (the device's copies come back compressed)
    with gzip.open(b, "wt") as f:
        f.write(head + '"0x0","MUFU.EX2 R1, R1","3","4000000","3"\n'
                '"0x10","PRMT R1, R1, 0x5432, R1","2","1500000","2"\n'
                '"0x20","PRMT R2, R2, 0x5432, R2","0","1500000","0"\n')
    out = subprocess.run([sys.executable, str(SCRIPT), "--opcodes", str(a), str(b)],
                         check=True, capture_output=True, text=True).stdout.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out[3:]}
    # millions of warp instructions executed, the difference, and the samples; the
    # predicate is not the opcode, and every PRMT counts under one
    assert rows["MUFU"] == ["4.00", "4.00", "+0.00", "7", "3"]
    assert rows["PRMT"] == ["0.00", "3.00", "+3.00", "0", "2"]
    assert rows["BRA"] == ["1.00", "0.00", "-1.00", "1", "0"]
    assert rows["total"] == ["5.00", "7.00", "+2.00", "8", "5"]
    # most executed first
    assert [line.split()[0] for line in out[3:6]] == ["MUFU", "PRMT", "BRA"]
