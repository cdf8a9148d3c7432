"""The command line: every subcommand runs and reports success on this machine."""

from __future__ import annotations

import pytest

from spanfill import cli


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for op in cli.OPS:
        assert op in out
    assert "torch" in out and "triton" in out


def test_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check"]) == 0
    assert "all ops match the reference" in capsys.readouterr().out


def test_demo_basic(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--basic"]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and out.count("MATCH") == 2


def test_bench_without_runner(monkeypatch: pytest.MonkeyPatch, tmp_path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "bench.run", None)  # import fails like a missing file
    assert cli.main(["bench", "--help"]) == 2
    assert "bench/run.py" in capsys.readouterr().err


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
    assert png.stat().st_size > 10_000
