"""The command line: every subcommand runs and reports success on this machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import spanfill
from conftest import INTERPRETING
from spanfill import cli
from spanfill.testing import recorded_launches


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for op in cli.OPS:
        assert op in out
    assert "torch" in out and "triton" in out


RESULT = re.compile(r"^  \[(ok|FAIL)\] (.+?) +(float32|float16|bfloat16) +(\w+) +(.*)$", re.M)


def _results(out: str) -> list[tuple[str, str, str, str, str]]:
    """(status, check, dtype, path, detail) of each result line of ``spanfill check``."""
    return RESULT.findall(out)


def _rel_errs(results, dtype: str) -> list[float]:
    return [float(re.match(r"rel err (\S+)", detail).group(1))
            for _, _, dt, _, detail in results if dt == dtype and detail.startswith("rel err")]


def test_check_runs_the_kernels(monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (conftest set TRITON_INTERPRET=1 on a CPU): every op launches a kernel."""
    monkeypatch.setenv("SPANFILL_BACKEND", "reference")  # check must not follow it
    with recorded_launches(attention_fwd=None, append_kv_launch=None) as recorded:
        assert cli.main(["check"]) == 0
    launches = {name: len(calls) for name, calls in recorded.items()}
    out = capsys.readouterr().out
    assert "all ops match the reference" in out
    results = _results(out)
    compiled = torch.cuda.is_available() and not INTERPRETING
    dtypes = ("float16", "bfloat16") if compiled else ("float32", "float16")
    assert sorted({r[2] for r in results}) == sorted(dtypes)
    assert len(results) == 8 * len(dtypes) and all(r[0] == "ok" and r[3] == "triton" for r in results)
    # Per dtype: 4 padded + 1 varlen + 2 span launches, and one append_kv per span case.
    assert launches == {"attention_fwd": 7 * len(dtypes), "append_kv_launch": 2 * len(dtypes)}
    if compiled:
        assert "path: triton kernels on " in out
    else:
        assert "path: triton kernels in Triton's interpreter (TRITON_INTERPRET=1)" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of spanfill check")
def test_check_on_cpu_runs_the_interpreter(tmp_path) -> None:
    """``spanfill check`` started without TRITON_INTERPRET re-runs itself in the interpreter.

    Before, it compared the reference with itself on a CPU (every rel err 0.00e+00).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(spanfill.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=root, SPANFILL_BACKEND="reference")
    proc = subprocess.run([sys.executable, "-m", "spanfill", "check"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "re-running in a subprocess with TRITON_INTERPRET=1" in out
    assert "path: triton kernels in Triton's interpreter (TRITON_INTERPRET=1), CPU" in out
    results = _results(out)
    assert len(results) == 16 and all(r[0] == "ok" and r[3] == "triton" for r in results)
    # fp32 kernels differ from the reference in the last bits; the reference against
    # itself would give exactly 0 everywhere.
    fp32 = _rel_errs(results, "float32")
    assert len(fp32) == 7 and max(fp32) > 0 and max(fp32) <= 1e-5
    assert "all ops match the reference" in out


def test_check_without_a_gpu_for_cuda(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["check", "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_demo_basic(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--basic"]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and out.count("MATCH") == 2


def test_no_bench_command(capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmarks are not in the installed package: the help points to a checkout."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err
    assert "python -m bench.run" in cli.build_parser().format_help()


def test_demo_main_job_quick(tmp_path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    if not __import__("torch").cuda.is_available():
        monkeypatch.setenv("SPANFILL_BACKEND", "reference")  # the interpreter would be slow
    png = tmp_path / "demo.png"
    assert cli.main(["demo", "--quick", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "MATCH" in out and "MISMATCH" not in out and "tokens recomputed" in out
    # both clocks, with the spread of the wall times (no GPU here: its column says so);
    # on a GPU a fourth path, the step replayed as a CUDA graph, checked against eager
    cuda = __import__("torch").cuda.is_available()
    assert len(re.findall(r"wall +[0-9.]+ ms \[[0-9.]+-[0-9.]+\]", out)) == (4 if cuda else 3)
    assert ("CUDA graph logits vs eager" in out) == cuda
    assert "reps; speed-up = full recompute / path" in out and "order (wall)" in out
    if not __import__("torch").cuda.is_available():
        assert out.count("GPU n/a") == 3
    assert png.stat().st_size > 10_000


def test_demo_timing_rows_and_plot_with_gpu_times(tmp_path) -> None:
    """The GPU column and the two-bar plot, drawn from given timings (no GPU needed)."""
    pytest.importorskip("matplotlib")
    from spanfill.demo import Timing, _time_row, draw, wall_order

    fill = Timing([0.010, 0.012, 0.011, 0.013, 0.011], gpu=0.004)
    full = Timing([0.050, 0.052, 0.051], gpu=0.040)
    assert fill.median == 0.011 and fill.spread() == (0.011, 0.013)
    row = _time_row(fill, full)
    assert row.startswith("wall     11.0 ms [11.0-13.0]") and "GPU     4.0 ms" in row
    assert "4.6x wall, 10.0x GPU" in row
    tie = Timing([0.012, 0.0125, 0.014], gpu=None)  # its spread overlaps fill's
    assert wall_order({"full": full, "fill": fill, "tie": tie}) == "fill ~ tie < full"
    png = tmp_path / "two_clocks.png"
    draw(str(png), 100, 20, [(0, 5)], {"spanfill": fill, "full recompute": full}, "test")
    assert png.stat().st_size > 10_000
