"""Say whether every kernel compiles to the same Triton GPU IR at a git revision and in
the working tree, on a machine without a GPU.

A refactor of ``spanfill/kernels/`` that leaves the TTGIR unchanged cannot change
speed or results; one that changes it needs the GPU (tests and a ``bench/`` run). Where
the TTGIR differs, the PTX is compared too (without debug information,
:func:`compile_sm90.canonical_ptx`): TTGIR keeps jit helpers as functions until LLVM
inlines them, so code moved into or out of a helper reads "same PTX", which is the
same GPU program.
Both sides run ``scripts/compile_sm90.py --dump-ttgir`` (each revision's own host
launchers, so a changed kernel signature is compared by what it compiles to) over the
same cases: split and unsplit span launches, padded zero-fill with and without
descriptors, varlen, append, merge and plan. The TTGIR is compared in canonical form
(:func:`compile_sm90.canonical_ttgir`: no locations, values renumbered, constants by
value).

Usage::

    python scripts/compare_kernel_ir.py [REV]      # REV defaults to HEAD; exit 1 if any differs

REV must have ``compile_sm90.py --dump-ttgir`` (commit bda1f7e or later). Run with the
Triton to compare under (``PYTHONPATH=<site with triton 3.6>`` for the GPU machine's).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def dump(checkout: Path, out: Path) -> None:
    """Run ``checkout``'s compile_sm90.py --dump-ttgir into ``out`` (its own process)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(checkout)) if p)
    result = subprocess.run([sys.executable, str(checkout / "scripts" / "compile_sm90.py"),
                             "--dump-ttgir", str(out)], cwd=checkout, env=env,
                            capture_output=True, text=True)
    if not any(out.glob("*.ttgir")):
        raise SystemExit(f"{checkout}: compile_sm90.py wrote no TTGIR\n{result.stdout}\n"
                         f"{result.stderr[-3000:]}")


def main(rev: str = "HEAD") -> int:
    from compile_sm90 import canonical_ttgir

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        old_tree = tmp_path / "rev"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old_tree), rev],
                       cwd=ROOT, check=True)
        try:
            dump(old_tree, tmp_path / "old")
            dump(ROOT, tmp_path / "new")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT,
                           check=False)
        old = {p.name: canonical_ttgir(p.read_text()) for p in (tmp_path / "old").glob("*.ttgir")}
        new = {p.name: canonical_ttgir(p.read_text()) for p in (tmp_path / "new").glob("*.ttgir")}

        def ptx(side: str, name: str) -> str | None:
            path = tmp_path / side / name.replace(".ttgir", ".ptx")
            return path.read_text() if path.exists() else None

        changed = 0
        for name in sorted(old.keys() | new.keys()):
            if name not in old or name not in new:
                verdict = "only in " + ("the working tree" if name in new else rev)
            elif old[name] == new[name]:
                verdict = "same TTGIR"
            elif ptx("old", name) is not None and ptx("old", name) == ptx("new", name):
                verdict = "same PTX"  # (helpers moved; the same program after inlining)
            else:
                verdict = "TTGIR DIFFERS"
            changed += verdict not in ("same TTGIR", "same PTX")
            print(f"{name:62s} {verdict}")
    print(f"{len(old | new)} launches, {changed} differ ({rev} vs working tree)")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
