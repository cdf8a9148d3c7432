"""The fp8-KV-cache benchmark rows on the CPU: quantization, checks, workload choice, report."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from bench import providers as prov
from bench import run as bench_run
from bench.check import segmented_checker
from bench.providers_fp8 import FP8_FORMATS, quantize_cache
from bench.report import targets
from bench.workloads import core_workloads
from spanfill import reference
from spanfill.testing import rel_err

SMALL = {w.name: w for w in core_workloads(small=True)}
# Error of attention over the fp8 cache against the fp32 cache, on the smoke workloads'
# N(0, 1) inputs (measured 3.8e-2 to 4.0e-2 for e4m3, 7.4e-2 to 8.1e-2 for e5m2; the
# quantization error alone, see tests/test_fp8_cache.py's FP8_ERROR).
QUANT_ERROR = {"e4m3": (1e-2, 6e-2), "e5m2": (3e-2, 1.2e-1)}


@pytest.mark.parametrize("suffix", list(FP8_FORMATS))
def test_quantize_cache_maps_amax_to_the_format_max(suffix: str) -> None:
    dtype = FP8_FORMATS[suffix]
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn((5, 4, 2, 32), generator=gen) * 3.0
    stored, scale = quantize_cache(cache, dtype)
    assert stored.dtype == dtype and stored.shape == cache.shape
    assert scale.shape == (1,) and scale.dtype == torch.float32
    limit = torch.finfo(dtype).max
    assert torch.allclose(scale, cache.abs().amax() / limit)
    # The largest value lands on the format's largest finite value: nothing saturates.
    assert stored.float().abs().max().item() == limit
    assert rel_err(reference.dequantize_kv(stored, scale), cache) < QUANT_ERROR[suffix][1]
    _, zero_scale = quantize_cache(torch.zeros_like(cache), dtype)
    assert zero_scale.item() > 0, "an all-zero cache still needs a valid scale"


@pytest.mark.parametrize("suffix", list(FP8_FORMATS))
def test_fp8_provider_is_checked_on_the_dequantized_cache(suffix: str) -> None:
    w = SMALL["few_big"]
    t = w.make("cpu", torch.float32)
    prep = prov.SEGMENTED[f"spanfill_fp8_{suffix}"](w, t)
    out = prep.output()
    workload_check = segmented_checker(w, t)
    assert torch.equal(prep.checker.rows, workload_check.rows), "both errors on the same rows"
    assert prep.checker(out) < 1e-5
    low, high = QUANT_ERROR[suffix]
    # The provider really attends over fp8: its answer is off the fp32 cache's reference
    # by the quantization error ...
    assert low < workload_check(out) < high
    # ... and its checker really is the dequantized cache's: the fp32 answer fails it.
    plain = prov.spanfill_segmented(w, t).output()
    assert prep.checker(plain) > low


def _tasks(*argv: str) -> dict[str, list[str]]:
    tasks, _ = bench_run._plan_tasks(bench_run._parse(["--smoke", *argv]), False)
    return {w.name: names for w, names in tasks}


def test_fp8_providers_run_on_long_32k_and_few_big_unless_asked() -> None:
    home = {"long_32k", "few_big", "tail_32k"}  # tail_32k: the memory-bound case
    by_default = {name for name, names in _tasks().items() if prov.FP8 & set(names)}
    assert by_default == home
    for name, names in _tasks().items():
        assert ("spanfill_fp8_e4m3" in names) == (name in home), name
    assert set(_tasks("--only", "spanfill_fp8_e4m3")) == home
    assert "spanfill_fp8_e4m3" not in _tasks("--only", "many_small")["many_small"]
    assert _tasks("--only", "many_small,spanfill_fp8_e4m3") == {
        "many_small": ["spanfill_fp8_e4m3"]}
    assert not any(prov.FP8 & set(names) for names in _tasks("--suite", "sweep").values())


def test_run_writes_the_fp8_check_and_quant_relerr_rows(tmp_path: Path) -> None:
    only = "few_big,spanfill,spanfill_fp8_e4m3"
    assert bench_run.main(["--smoke", "--only", only, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("smoke_*.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    fp8 = {r["metric"]: r for r in rows if r["provider"] == "spanfill_fp8_e4m3"}
    assert {"check_relerr", "quant_relerr", "kernel_time"} <= set(fp8)
    assert fp8["check_relerr"]["note"].startswith("pass")
    assert "dequantized" in fp8["check_relerr"]["note"]
    low, high = QUANT_ERROR["e4m3"]
    assert low < float(fp8["quant_relerr"]["p50"]) < high
    assert not any(r["metric"] == "quant_relerr" for r in rows if r["provider"] == "spanfill")
    shown = {g[0].strip(): g[2] for g in targets(rows) if g[1] == "few_big"}
    assert "spanfill_fp8_e4m3 time / spanfill time (same layout, cache in fp8)" in shown
    error = shown["spanfill_fp8_e4m3 error vs the workload cache's reference"]
    assert low < float(error) < high


def test_fp8_row_is_never_the_fastest_peer() -> None:
    def row(provider: str, metric: str, p50: float) -> dict[str, object]:
        return {"kernel": "span_prefill", "workload": "long_32k", "provider": provider,
                "metric": metric, "p50": p50}

    rows = [row("spanfill", "kernel_time", 1.0), row("spanfill_fp8_e4m3", "kernel_time", 0.5),
            row("spanfill_fp8_e4m3", "quant_relerr", 0.04),
            row("sdpa_per_span", "kernel_time", 3.0)]
    goals = {g[0]: g[2] for g in targets(rows)}
    assert goals["vs fastest peer incl. its planning (sdpa_per_span)"] == "3.00x"
    assert goals["  spanfill_fp8_e4m3 time / spanfill time (same layout, cache in fp8)"] == "0.50x"
