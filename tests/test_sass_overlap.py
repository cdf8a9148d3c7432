"""``scripts/sass_overlap.py`` on a hand-made listing (host only): which loops it reads,
where the exponentials and the row max's compares fall against the PV wait, and its
synchronisation counts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import sass_overlap  # noqa: E402

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING R10, 0x100 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR28], R88, gsb0 ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, R176, gdesc[UR12].tnspB, R24, gsb0 ;
        /*0040*/                   BAR.ARV R10, 0x100 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0060*/                   MUFU.EX2 R88, R88 ;
        /*0068*/                   FMNMX R4, R88, R89, !PT ;
        /*0070*/              @!P0 SYNCS.ARRIVE.TRANS64.A1T0 RZ, [UR21+0x20], RZ ;
        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0090*/                   MEMBAR.ALL.CTA ;
        /*00a0*/                   MUFU.EX2 R89, R89 ;
        /*00a4*/              @!P0 SYNCS.ARRIVE.TRANS64.A1T0 RZ, [UR21+0x28], RZ ;
        /*00a8*/               @P3 FMNMX R5, R4, R90, !PT ;
        /*00b0*/                   MUFU.EX2 R90, R90 ;
        /*00c0*/               @P1 BRA `(.L_x_1) ;
.L_x_2:
        /*00d0*/                   FADD R2, R2, R3 ;
        /*00e0*/               @P2 BRA `(.L_x_2) ;
        /*00f0*/                   EXIT ;
"""


def test_importing_leaves_the_interpreter_setting_alone() -> None:
    """The suite imports this module on the CPU, where the portable kernels need
    ``TRITON_INTERPRET=1``; only ``main()`` switches it off, to compile for sm_90."""
    code = ("import os, sys; sys.path.insert(0, 'scripts'); import sass_overlap; "
            "print(os.environ['TRITON_INTERPRET'], 'spanfill' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=120)
    assert done.stdout.split() == ["1", "False"], done.stderr[-2000:]


def test_a_listing_s_pv_loop_counts(tmp_path: Path) -> None:
    path = tmp_path / "k.sass"
    path.write_text(LISTING)
    loops = sass_overlap.pv_loops(sass_overlap.read_sass(path), events=True)
    assert len(loops) == 1  # the second loop issues no PV wgmma
    loop = loops[0]
    assert loop["instructions"] == 16 and loop["exp2"] == 3
    assert loop["exp2_before_pv_wait"] == 1
    # the release is the first arrival after the PV wait (not the one before it)
    assert loop["exp2_between_pv_wait_and_release"] == 1
    assert (loop["fmnmx"], loop["fmnmx_before_pv_wait"]) == (2, 1)  # (predicated too)
    assert (loop["bar_sync"], loop["bar_arrive"], loop["membar"], loop["mbarrier_ops"]) == \
        (1, 1, 1, 2)
    # the barrier, both wgmma groups, the arrival, both waits, the mbarrier arrival, MEMBAR,
    # the release
    assert [sass_overlap.opcode(line) for _, line, _ in loop["events"]] == [
        "BAR.SYNC.DEFER_BLOCKING", "HGMMA.64x128x16.F32.BF16", "HGMMA.64x128x16.F32.BF16",
        "BAR.ARV", "WARPGROUP.DEPBAR.LE", "SYNCS.ARRIVE.TRANS64.A1T0", "WARPGROUP.DEPBAR.LE",
        "MEMBAR.ALL.CTA", "SYNCS.ARRIVE.TRANS64.A1T0"]
    assert [before for _, _, before in loop["events"]] == [0, 0, 0, 0, 0, 1, 1, 1, 2]
