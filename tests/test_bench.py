"""The benchmark suite's own code on the CPU: workload rules, checks, CSV, plots, tables."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import providers as prov
from bench import run as bench_run
from bench.check import padded_checker, segmented_checker
from bench.report import COLUMNS, markdown, targets
from bench.workloads import (
    PaddedWorkload,
    SegmentedWorkload,
    core_workloads,
    scatter_spans,
    sweep_workloads,
    uniform_spans,
)

CORE = {w.name: w for w in core_workloads()}


def _assert_valid_spans(w: SegmentedWorkload) -> None:
    assert len(w.spans) == len(w.seq_lens)
    for spans, seq_len in zip(w.spans, w.seq_lens):
        prev = 0
        for start, stop in spans:
            assert 0 <= start < stop <= seq_len
            assert start >= prev, "spans must be sorted and disjoint"
            prev = stop


@pytest.mark.parametrize("w", core_workloads() + core_workloads(small=True) + sweep_workloads()
                         + sweep_workloads(small=True),
                         ids=lambda w: f"{w.name}-{w.x}")
def test_spans_sorted_disjoint_inside(w: SegmentedWorkload | PaddedWorkload) -> None:
    if isinstance(w, SegmentedWorkload):
        _assert_valid_spans(w)
        assert w.num_tokens == sum(b - a for spans in w.spans for a, b in spans)
    else:
        assert all(1 <= n <= w.seq_len for n in w.valid_lens)


@pytest.mark.parametrize("name, requests, seq_len, spans, span_len", [
    ("few_big", 2, 8192, 4, 512),
    ("many_small", 2, 8192, 64, 16),
    ("long_32k", 1, 32768, 32, 64),
])
def test_uniform_workloads_follow_benchmarks_md(name: str, requests: int, seq_len: int, spans: int,
                                               span_len: int) -> None:
    w = CORE[name]
    assert w.seq_lens == (seq_len,) * requests
    assert (w.num_q_heads, w.num_kv_heads, w.head_dim, w.page_size) == (32, 8, 128, 16)
    slot = seq_len // spans
    for req in w.spans:
        assert len(req) == spans
        for i, (start, stop) in enumerate(req):
            assert stop - start == span_len
            assert i * slot <= start and stop <= (i + 1) * slot, "one span inside each slot"


def test_scatter15_fraction_and_lengths() -> None:
    w = CORE["scatter15"]
    assert w.seq_lens == (8192, 8192)
    lengths = [b - a for req in w.spans for a, b in req]
    assert min(lengths) >= 1 and max(lengths) <= 8
    assert set(lengths) == set(range(1, 9))
    assert 0.13 <= w.num_tokens / sum(w.seq_lens) <= 0.17
    for seed in range(5):
        spans = scatter_spans(np.random.default_rng(seed), 8192)
        assert 0.12 <= sum(b - a for a, b in spans) / 8192 <= 0.18


def test_flops_match_benchmarks_md() -> None:
    # BENCHMARKS.md's GFLOP column; few_big depends on the random offsets the most.
    for name, gflop, tol in (("few_big", 281, 0.12), ("many_small", 137, 0.05),
                             ("scatter15", 161, 0.1), ("long_32k", 551, 0.05)):
        assert abs(CORE[name].flops / 1e9 - gflop) / gflop < tol, name
    bert = CORE["bert_base_512"]
    assert (len(bert.valid_lens), bert.seq_len, bert.num_heads, bert.head_dim) == (64, 512, 12, 64)
    enc = CORE["enc_2k_d128"]
    assert (len(enc.valid_lens), enc.seq_len, enc.num_heads, enc.head_dim) == (16, 2048, 16, 128)
    assert enc.flops == 4 * 16 * 128 * sum(n * n for n in enc.valid_lens)


def test_seeded_determinism() -> None:
    a, b = core_workloads(seed=3), core_workloads(seed=3)
    assert a == b
    assert core_workloads(seed=4)[0].spans != a[0].spans
    w = core_workloads(small=True)[0]
    t1, t2 = w.make("cpu", torch.float32), w.make("cpu", torch.float32)
    for name in ("q", "k_new", "k_cache", "v_cache", "block_table"):
        assert torch.equal(getattr(t1, name), getattr(t2, name)), name
    assert uniform_spans(np.random.default_rng(1), 64, 4, 4) == \
        uniform_spans(np.random.default_rng(1), 64, 4, 4)


def test_make_fills_cache_and_shuffles_pages() -> None:
    w = core_workloads(small=True)[1]
    t = w.make("cpu", torch.float32)
    assert t.q.shape == (w.num_tokens, w.num_q_heads, w.head_dim)
    assert t.k_new.shape == (w.num_tokens, w.num_kv_heads, w.head_dim)
    assert t.layout.num_tokens == w.num_tokens
    slots = t.layout.slot_mapping
    hk, d = w.num_kv_heads, w.head_dim
    assert torch.equal(t.k_cache.view(-1, hk, d)[slots], t.k_new)
    assert torch.equal(t.v_cache.view(-1, hk, d)[slots], t.v_new)
    pages = t.block_table.flatten().tolist()
    assert pages != sorted(pages), "page pool should be shuffled"
    k, _ = t.dense_kv(0)
    assert k.shape == (w.seq_lens[0], hk, d)


def test_sweep_has_every_axis() -> None:
    axes = {w.name for w in sweep_workloads()}
    assert axes == {f"sweep:{a}" for a in ("spans_per_request", "span_len", "context", "head_dim",
                                            "gqa", "page_size", "fill", "padded_seq_len")}
    by_axis: dict[str, list] = {}
    for w in sweep_workloads():
        by_axis.setdefault(w.name, []).append(w)
    spans = by_axis["sweep:spans_per_request"]
    assert {w.num_tokens for w in spans} == {2 * 1024}, "fixed recomputed fraction"
    assert {w.x for w in spans} >= {1, 1024}
    assert {w.x for w in by_axis["sweep:context"]} >= {2048, 131072}
    fills = {w.x: w.fill for w in by_axis["sweep:fill"]}
    for target, got in fills.items():
        assert abs(got - target) < 0.05


def test_checkers_accept_reference_and_reject_noise() -> None:
    for w in core_workloads(small=True):
        t = w.make("cpu", torch.float32)
        if isinstance(w, SegmentedWorkload):
            check = segmented_checker(w, t)
            out = prov.spanfill_segmented(w, t).output()
        else:
            check = padded_checker(w, t)
            out = prov.spanfill_padded(w, t).output()
        assert check(out) < 1e-5
        assert check(out + torch.randn_like(out)) > 0.1
        assert math.isinf(check(out * float("nan")))


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_smoke_run_writes_csv_plots_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    def broken(w: object, t: object) -> prov.Prepared:
        raise RuntimeError("provider exploded")

    monkeypatch.setitem(prov.SEGMENTED, "broken", broken)
    assert bench_run.main(["--smoke", "--suite", "all", "--out", str(tmp_path)]) == 0
    csvs = list(tmp_path.glob("smoke_*.csv"))
    assert len(csvs) == 1
    rows = _read(csvs[0])
    assert list(rows[0]) == COLUMNS
    checks = [r for r in rows if r["metric"] == "check_relerr"]
    failed = [r for r in checks if r["note"].startswith("FAIL")]
    assert not failed, failed
    timed = {(r["workload"], r["provider"]) for r in rows if r["metric"] == "kernel_time"}
    for w in ("few_big", "many_small", "scatter15", "long_32k"):
        for p in ("spanfill", "flex", "sdpa_per_span", "sdpa_dense_mask", "full_recompute"):
            assert (w, p) in timed, (w, p)
    for w in ("bert_base_512", "enc_2k_d128", "minilm_b256_s128"):
        for p in ("spanfill", "spanfill_kernel", "spanfill_nopad", "spanfill_raw_lens",
                  "sdpa_dense_mask", "sdpa_nomask", "flex"):
            assert (w, p) in timed, (w, p)
    for p in ("spanfill", "flex", "sdpa_per_span", "sdpa_dense_mask"):
        assert ("few_big_swa", p) in timed, p
    swa_checks = {r["provider"]: r for r in checks if r["workload"] == "few_big_swa"}
    assert {"spanfill", "flex", "sdpa_per_span", "sdpa_dense_mask"} <= set(swa_checks)
    assert all(r["note"].startswith("pass") and "window_left=" in r["note"]
               for r in swa_checks.values()), swa_checks
    skipped = [r for r in rows if r["metric"] == "skipped"]
    assert {(r["workload"], r["provider"]) for r in skipped} == {("few_big_swa", "full_recompute")}
    assert all("sliding window" in r["note"] for r in skipped)
    errors = [r for r in rows if r["metric"] == "error"]
    assert {r["provider"] for r in errors} == {"broken"}, errors
    assert all("provider exploded" in r["note"] for r in errors)
    assert any(r["metric"] == "plan_time" and r["provider"] == "flex" for r in rows)
    assert any(r["workload"] == "append_kv" and r["metric"] == "bandwidth" for r in rows)
    assert any(r["workload"] == "plan_1000_spans" and r["metric"] == "plan_time" for r in rows)
    assert any(r["workload"] == "sweep:context" and r["x"] for r in rows)
    pngs = {p.name.rsplit("_", 1)[-1] for p in tmp_path.glob("*.png")}
    assert {"core.png", "context.png", "fill.png"} <= pngs
    assert len(list(tmp_path.glob("*.png"))) == 1 + 8
    printed = capsys.readouterr().out
    assert "| few_big |" in printed and "Targets" in printed
    assert "| few_big_swa (info) |" in printed and "Skipped" in printed
    assert not any(g[1] == "few_big_swa" for g in targets(rows)), "informational: no targets"
    goals = {(g[0].split(" (")[0], g[1]) for g in targets(rows)}
    assert ("vs FlexAttention kernel alone", "scatter15") in goals
    assert ("padded kernel / same batch without padding", "bert_base_512") in goals
    assert ("raw valid_lens", "minilm_b256_s128") in goals
    assert "sweep:span_len" in markdown(rows)
    work = {r["workload"]: float(r["p50"]) for r in rows
            if r["metric"] == "tile_work" and r["provider"] == "spanfill"}
    assert {"few_big", "many_small", "scatter15", "long_32k"} <= set(work)
    assert all(v >= 1.0 for v in work.values()), work
    assert ("  tile work / counted work", "scatter15") in goals


def test_sliding_window_workload() -> None:
    few_big, swa = CORE["few_big"], CORE["few_big_swa"]
    assert swa.window_left == 4095 and few_big.window_left == -1
    assert (swa.spans, swa.seq_lens, swa.seed) == (few_big.spans, few_big.seq_lens, few_big.seed)
    seen = np.minimum(swa.positions + 1, 4096)
    assert swa.flops == 4 * 32 * 128 * float(seen.sum())
    assert swa.flops < few_big.flops
    small = {w.name: w for w in core_workloads(small=True)}["few_big_swa"]
    assert 0 <= small.window_left < max(small.positions), "the smoke window must bite"


def test_sliding_window_check_and_providers() -> None:
    w = {w.name: w for w in core_workloads(small=True)}["few_big_swa"]
    t = w.make("cpu", torch.float32)
    check = segmented_checker(w, t)
    assert check(prov.spanfill_segmented(w, t).output()) < 1e-5
    # The unwindowed answer must fail the windowed check: the window really is exercised.
    plain = {x.name: x for x in core_workloads(small=True)}["few_big"]
    assert check(prov.spanfill_segmented(plain, t).output()) > 1e-3
    for name in ("sdpa_per_span", "sdpa_dense_mask", "flex"):
        assert check(prov.SEGMENTED[name](w, t).output()) < 1e-4, name
    for name in ("full_recompute", "sdpa_cudnn_dense", "sdpa_flash_dense"):
        with pytest.raises(prov.Unsupported):
            prov.SEGMENTED[name](w, t)


def test_fa4_targets_of_issue_16() -> None:
    """spanfill's time against FA4's on the five layouts, and a whole-prompt span's rate
    against FA4's dense causal ceiling (which is no peer in "vs fastest peer")."""
    def row(w: str, p: str, ms: float, tflops: float | None = None,
            kernel: str = "span_prefill") -> dict:
        return {"kernel": kernel, "provider": p, "workload": w, "metric": "kernel_time",
                "unit": "ms", "p50": ms, "tflops": tflops}

    rows = [row("few_big", "spanfill", 0.5), row("few_big", "fa4_span_entries", 0.45),
            row("few_big", "fa4_dense", 0.1),
            row("enc_2k_d128", "spanfill", 0.3, kernel="padded_prefill"),
            row("enc_2k_d128", "fa4_padded", 0.4, kernel="padded_prefill"),
            row("whole_8k", "spanfill", 1.0, 570.0), row("whole_8k", "fa4_dense", 0.95, 600.0)]
    got = {(g[0], g[1]): (g[2], g[4]) for g in targets(rows)}
    assert got[("spanfill time / FA4 kernel time (fa4_span_entries)", "few_big")] == ("1.11x", "NO")
    assert got[("spanfill time / FA4 kernel time (fa4_padded)", "enc_2k_d128")] == ("0.75x", "yes")
    assert got[("whole-prompt span / FA4 dense causal rate", "whole_8k")] == ("95%", "yes")
    assert got[("vs fastest peer incl. its planning (fa4_span_entries)", "few_big")][0] == "0.90x"
    assert CORE["whole_8k"].spans == (((0, 8192),),)


def test_gluon_rows_are_skipped_where_the_backend_refuses() -> None:
    """A workload the Gluon backend does not take (here: CPU tensors) gives a skipped
    row with the backend's reason, not an error row."""
    from bench.providers_base import Unsupported

    small = {w.name: w for w in core_workloads(small=True)}
    for name, provider in (("few_big", prov.SEGMENTED["spanfill_gluon"]),
                           ("bert_base_512", prov.PADDED["spanfill_gluon"])):
        w = small[name]
        with pytest.raises(Unsupported, match="backend='gluon' cannot run here: .*Hopper"):
            provider(w, w.make(torch.device("cpu"), torch.float32))


def test_portable_kernel_row_against_the_automatic_choice() -> None:
    rows = [{"kernel": "span_prefill", "provider": p, "workload": "few_big_d256",
             "metric": "kernel_time", "unit": "ms", "p50": ms}
            for p, ms in (("spanfill", 0.55), ("spanfill_portable", 1.1))]
    got = {(g[0], g[1]): g[2] for g in targets(rows)}
    assert got[("  spanfill (automatic choice) / portable kernel", "few_big_d256")] == "0.50x"
    assert "spanfill_portable" in prov.SEGMENTED and "spanfill_portable" in prov.SMOKE_SKIP


def test_dense_causal_check_of_the_ceilings() -> None:
    """The check the dense ceilings (sdpa_cudnn_dense, fa4_dense) run on their output."""
    from bench.check import dense_causal_check

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 2, 16, generator=gen) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(0, 1) for x in (q, k, v)), is_causal=True).transpose(0, 1)
    assert dense_causal_check(out, q, k, v, seed=3) < 1e-5
    assert dense_causal_check(out.flip(0), q, k, v, seed=3) > 0.1


def test_dense_ceiling_inputs_and_the_sdpa_ceiling_on_cpu() -> None:
    """Every dense ceiling draws its inputs from one builder: [n, Hq, D] for the longest
    prompt, the same tensors each time; a window is refused; the SDPA ceiling (math
    backend here) passes its own check on them."""
    import dataclasses

    import bench.providers as prov
    from bench.providers_base import Unsupported, dense_ceiling_inputs
    from bench.workloads import core_workloads

    w = next(x for x in core_workloads(small=True) if x.name == "few_big")
    t = w.make(torch.device("cpu"), torch.float32)
    q, k, v, flops = dense_ceiling_inputs(w, t)
    n = max(w.seq_lens)
    assert q.shape == (n, w.num_q_heads, w.head_dim) and q.dtype == torch.float32
    assert flops == 4.0 * w.num_q_heads * w.head_dim * n * (n + 1) / 2
    assert torch.equal(dense_ceiling_inputs(w, t)[0], q) and not torch.equal(q, k)
    with pytest.raises(Unsupported, match="sliding window"):
        dense_ceiling_inputs(dataclasses.replace(w, window_left=3), t)
    prepared = prov._dense_ceiling("MATH")(w, t)
    assert prepared.flops == flops and prepared.own_check() < 1e-4
