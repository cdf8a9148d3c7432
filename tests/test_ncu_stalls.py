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


def test_hot_path_follows_the_loop_and_collapses_work_between_sync_points(tmp_path: Path) -> None:
    head = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"\n')
    page = tmp_path / "k.sass.csv"
    page.write_text(head
                    + '"0x00","MOV R1, R2","5","10"\n'          # before the loop: cold
                    + '"0x10","WARPGROUP.DEPBAR.LE gsb0, 0x1","40","1000"\n'
                    + '"0x20","FMNMX R3, R3, R4","7","1000"\n'
                    + '"0x30","MUFU.EX2 R5, R5","9","1000"\n'
                    + '"0x40","FMNMX R3, R3, R6","1","1000"\n'
                    + '"0x50","FSEL R7, R7, RZ","3","20"\n'      # a tail-tile branch: cold
                    + '"0x60","WARPGROUP.DEPBAR.LE gsb0, 0x0","2","1000"\n'
                    + '"0x70","MUFU.EX2 R8, R8","11","1000"\n'
                    + '"0x80","@P0 BRA 0x10","1","990"\n')
    out = subprocess.run([sys.executable, str(SCRIPT), "--hot-path", str(page)], check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0].startswith("hot path: instructions executed >= 0.5 x 1000")
    body = [line.split() for line in out[1:]]
    # cold code is marked, not listed; each sync point keeps its samples and its count
    assert body[0] == [".."]
    assert body[1][:2] == ["WARPGROUP.DEPBAR.LE", "gsb0,"] and body[1][-3:] == ["samples", "40", "x1.00"]
    # the work between two sync points is one line: its opcodes counted, samples summed
    assert body[2] == ["[3", "ops:", "FMNMX2", "MUFU1]", "samples", "17"]
    assert body[3] == [".."]
    assert body[4][-3:] == ["samples", "2", "x1.00"]
    assert body[5] == ["[1", "ops:", "MUFU1]", "samples", "11"]
    assert body[6][:3] == ["@P0", "BRA", "0x10"] and body[6][-1] == "x0.99"
    # a share of 1 keeps only what runs every step
    strict = subprocess.run([sys.executable, str(SCRIPT), "--hot-path", str(page), "1"],
                            check=True, capture_output=True, text=True).stdout
    assert "BRA 0x10" not in strict and "MUFU1" in strict
