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
