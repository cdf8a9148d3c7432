"""The backend registry: selection order, overrides, reasons, and one config per launch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import spanfill as sf
from spanfill import backends
from spanfill.backends import triton_config
from spanfill.backends import dense_problem, paged_problem, select_backend
from spanfill.layout import plan_packed
from spanfill.testing import recorded_launches

from tests.helpers import paged_setup

CPU = torch.device("cpu")


def _span_problem(t: int = 1, table_width: int = 64, page_size: int = 16,
                  window_left: int = -1) -> backends.AttentionProblem:
    q = torch.zeros(t, 8, 64)
    k_cache = torch.zeros(4, page_size, 2, 64)
    return paged_problem(q, k_cache, 1, table_width, causal=True, window_left=window_left)


def test_order_is_kernels_then_reference() -> None:
    assert [b.name for b in backends.ORDER] == ["gluon", "triton", "reference"]
    assert backends.CHOICES == ("auto", "gluon", "triton", "reference")


def test_cpu_without_interpreter_takes_reference_and_says_why(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("SPANFILL_BACKEND", raising=False)
    chosen, reason = select_backend(_span_problem())
    assert chosen.name == "reference"
    assert "not triton" in reason and "TRITON_INTERPRET=1" in reason


def test_cpu_with_interpreter_takes_kernels(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SPANFILL_BACKEND", raising=False)
    chosen, reason = select_backend(_span_problem())
    assert chosen.name == "triton" and "interpreter" in reason


def test_environment_and_argument_override(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPANFILL_BACKEND", "reference")
    chosen, reason = select_backend(_span_problem())
    assert chosen.name == "reference" and "SPANFILL_BACKEND=reference" in reason
    chosen, reason = select_backend(_span_problem(), "triton")  # the argument wins
    assert chosen.name == "triton" and "backend=triton" in reason


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'gluon', 'triton', 'reference'\)"):
        select_backend(CPU, "cuda-graphs")


def test_named_backend_that_cannot_run_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' cannot run here: .*TRITON_INTERPRET=1"):
        select_backend(_span_problem(), "triton")
    assert sf.resolve_backend(CPU, "reference") == "reference"


def test_span_config_is_the_tuned_tile_and_the_forced_split(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPANFILL_SPLITS", "3")
    triton = backends.get_backend("triton")
    cfg = triton.select_config(_span_problem())
    assert cfg.tile == triton_config.pick_config(64, torch.float32, 4, False, paged=True)
    assert cfg.num_splits == 3 and not cfg.use_tma
    assert "splits=3" in cfg.describe()
    monkeypatch.delenv("SPANFILL_SPLITS")
    assert triton.select_config(_span_problem()).num_splits == 1  # the CPU never splits unasked


def test_dense_config_has_no_descriptors_in_fp32() -> None:
    q = torch.zeros(40, 4, 64)
    kv = torch.zeros(40, 2, 64)
    cfg = backends.get_backend("triton").select_config(
        dense_problem("padded", q, kv, kv, 2, 20, causal=False))
    assert cfg.num_splits == 1 and not cfg.use_tma
    assert cfg.tile == triton_config.pick_config(64, torch.float32, 2, False, paged=False,
                                                 tma=False)


def test_launch_config_decides_boundary_stages_and_exact_dots(monkeypatch) -> None:
    """The two launch settings attention_fwd used to decide itself now come from the config."""
    tile = triton_config.AttentionConfig(128, 128, 4, 8, 3)
    plain = triton_config.launch_config(tile, torch.bfloat16, 128)
    assert plain.boundary_stages == 3  # pipelined like the main loop
    for variant in (dict(window_left=0), dict(has_kv_start=True)):
        assert triton_config.launch_config(tile, torch.bfloat16, 128, **variant).boundary_stages == 1
    assert triton_config.launch_config(tile, torch.bfloat16, 256).boundary_stages == 1
    assert triton_config.launch_config(tile, torch.float32, 64).ieee_dot
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_config.launch_config(tile, torch.bfloat16, 64).ieee_dot  # the interpreter's bf16 dot
    assert not triton_config.launch_config(tile, torch.float16, 64).ieee_dot
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_config.launch_config(tile, torch.bfloat16, 64).ieee_dot
    # select_config passes the call's variants through.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = backends.get_backend("triton").select_config(_span_problem(window_left=5))
    assert cfg.boundary_stages == 1 and cfg.ieee_dot  # fp32 q


def test_reference_has_no_tiles() -> None:
    cfg = backends.get_backend("reference").select_config(_span_problem())
    assert cfg.tile is None and cfg.describe() == "no tiles"


@pytest.mark.parametrize("tokens,requests,block_q", [(1, 1, 16), (17, 3, 16), (64, 64, 8)])
def test_tile_bound_is_the_plans_grid(tokens: int, requests: int, block_q: int) -> None:
    lens = [tokens // requests] * requests
    lens[-1] += tokens - sum(lens)
    qsl = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    plan = plan_packed(qsl, torch.tensor(lens, dtype=torch.int32) + 5, tokens, block_q, True)
    assert plan.num_tiles == backends.packed_tile_bound(tokens, requests, block_q)


def test_span_prefill_launches_with_the_selected_config(monkeypatch) -> None:
    """The op launches exactly what select_config decided (one decision point)."""
    if not backends.interpreting() and not torch.cuda.is_available():
        pytest.skip("needs the kernels")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("SPANFILL_SPLITS", "2")
    layout, k_cache, v_cache, q, _, _ = paged_setup([40], [[(3, 5)]], 16, 4, 2, 64,
                                                    torch.float32, device)
    with recorded_launches(attention_fwd=lambda args, kw: args[6]) as recorded:
        sf.span_prefill(q, k_cache, v_cache, layout, backend="triton")
    seen = recorded["attention_fwd"]
    problem = paged_problem(q, k_cache, 1, layout.block_table.shape[1], True)
    cfg = backends.get_backend("triton").select_config(problem)
    assert seen == [cfg] and cfg.num_splits == 2 and not cfg.use_tma


@pytest.mark.parametrize("interpret,kernel_plan", [("1", True), ("0", False)],
                         ids=["interpreter-plans-in-a-kernel", "no-interpreter-plans-in-torch"])
def test_planning_goes_through_the_registry(monkeypatch, interpret: str, kernel_plan: bool) -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU tensors only")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    qsl = torch.tensor([0, 3, 7], dtype=torch.int32)
    with recorded_launches(plan_packed_launch=None) as recorded:
        plan = plan_packed(qsl, torch.tensor([9, 9], dtype=torch.int32), 7, 4, True)
    calls = recorded["plan_packed_launch"]
    assert bool(calls) == kernel_plan
    assert int((plan.tile_req >= 0).sum()) == 2  # 3 and 4 rows: one 4-row tile each


@pytest.mark.gpu
def test_selection_never_syncs() -> None:
    """select_backend and select_config read host metadata only: with CUDA's sync
    debug mode set to error, any device-to-host wait would raise."""
    q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k_cache = torch.randn(512, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    rows = torch.randn(4096, 16, 128, device="cuda", dtype=torch.bfloat16)
    # D=128 spans and bidirectional padded batches take the Gluon family on Hopper, causal
    # varlen batches the portable kernel; D=64 padded documents the three-group form.
    hopper = "gluon" if torch.cuda.get_device_capability()[0] == 9 else "triton"
    docs = torch.randn(8192, 12, 64, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for problem, expected in ((paged_problem(q, k_cache, 1, 512, True), hopper),
                                  (dense_problem("padded", rows, rows, rows, 4, 1024, False),
                                   hopper),
                                  (dense_problem("varlen", rows, rows, rows, 4, 1024, True),
                                   "triton"),
                                  (dense_problem("padded", docs, docs, docs, 1, 8192, False),
                                   hopper)):
            chosen, _ = select_backend(problem)
            assert chosen.name == expected
            chosen.select_config(problem)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_info_explains_every_example(monkeypatch) -> None:
    """What `spanfill info` prints: a backend, its config and the reason, per example call."""
    from spanfill.backends.explain import example_problems, explain

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SPANFILL_BACKEND", raising=False)
    examples = example_problems(CPU)
    assert {p.op for _, p in examples} == {"span", "padded", "varlen"}
    for _, problem in examples:
        text = explain(problem)
        assert text.startswith("triton") and "BLOCK_M=" in text and "why: " in text
    assert explain(examples[0][1], "reference").startswith("reference no tiles")
    assert explain(examples[0][1], "nope").startswith("error: backend must be one of")


def test_info_on_hopper_names_the_gluon_form_for_spans(monkeypatch) -> None:
    """On an sm_90 GPU the span examples (D=128 and 256) and the bidirectional padded
    batch at D=128 take the Gluon family, and the line says its form; the other dense
    examples stay on the portable kernels with the Gluon refusal as reason."""
    from spanfill.backends.explain import example_problems, explain

    monkeypatch.delenv("SPANFILL_BACKEND", raising=False)
    monkeypatch.delenv("SPANFILL_SPLITS", raising=False)
    monkeypatch.setattr(triton_config, "_capability_major", lambda index: 9)
    monkeypatch.setattr(triton_config, "_num_sms", lambda index: 132)
    cuda = torch.device("cuda", 0)
    bf16 = dict(device=cuda, dtype=torch.bfloat16, kv_dtype=torch.bfloat16)
    lines = {name: explain(dataclasses.replace(problem, **bf16))
             for name, problem in example_problems(CPU)}
    d256 = next(text for name, text in lines.items() if "D=256" in name)
    assert d256.startswith("gluon") and "BLOCK_M=128" in d256, d256
    assert "producer_warp=yes softmax=in_sequence consumer_partitions=2" in d256, d256
    assert "why: D=256 span" in d256
    assert "persistent" not in d256, d256
    d128 = next(text for name, text in lines.items()
                if name.startswith("span_prefill") and "D=128" in name)
    assert "softmax=under_pv consumer_partitions=2 persistent=yes" in d128, d128
    for name, text in lines.items():
        if name.startswith("span_prefill") and ("D=128" in name or "D=256" in name):
            assert text.startswith("gluon") and "span prefill: the Gluon kernel" in text, text
        elif name.startswith("padded_prefill") and "D=128" in name:
            assert text.startswith("gluon") and "padded batch at D=128" in text, text
            assert "persistent=yes staggered=yes tma_store=yes early_q_release=yes" in text, text
        else:
            assert text.startswith("triton") and "not gluon:" in text, text


def test_gluon_is_chosen_where_faster_and_runs_when_named(monkeypatch) -> None:
    """The Hopper family comes first, but the automatic choice takes it only for span
    prefill at D=128 and 256 and padded batches of S >= 4096 at D=64 (where it measured
    faster); named, it runs what it supports and refuses the rest, saying why."""
    monkeypatch.delenv("SPANFILL_BACKEND", raising=False)
    gluon = backends.get_backend("gluon")
    ok, reason = gluon.supports_device(CPU)
    assert not ok and "Hopper" in reason
    with pytest.raises(ValueError, match="backend='gluon' cannot run here: .*Hopper"):
        select_backend(_span_problem(), "gluon")
    monkeypatch.setattr(triton_config, "_capability_major", lambda index: 9)
    monkeypatch.setattr(triton_config, "_num_sms", lambda index: 132)
    monkeypatch.delenv("SPANFILL_SPLITS", raising=False)
    cuda = torch.device("cuda", 0)
    assert select_backend(cuda)[0].name == "triton"  # planning: the choice is per call
    q = torch.empty(1, 12, 64, dtype=torch.bfloat16).expand(4096, 12, 64)
    kv = torch.empty(4096, 12, 64, dtype=torch.bfloat16)
    dense = dense_problem("padded", q, kv, kv, 8, 512, False)
    as_cuda = lambda p, **kw: dataclasses.replace(p, device=cuda, **kw)  # noqa: E731
    assert gluon.supports(as_cuda(dense))[0]
    chosen, reason = select_backend(as_cuda(dense))
    assert chosen.name == "triton" and "not gluon: padded at D=64: the portable kernel" in reason
    assert select_backend(as_cuda(dense), "gluon")[0] is gluon
    # Long bidirectional padded documents at D=64 (S >= 4096, measured faster there);
    # varlen and causal batches stay on the portable kernel at any length.
    from spanfill.backends.gluon import GLUON_PADDED_D64_MIN_SEQ_LEN as long_s
    from spanfill.backends.gluon import GLUON_PADDED_D64_THREE_GROUPS_MIN_SEQ_LEN as longer_s
    for max_s, name in ((long_s - 1, "triton"), (long_s, "gluon"), (8192, "gluon")):
        chosen, reason = select_backend(as_cuda(dense, max_kv_len=max_s))
        assert chosen.name == name, (max_s, reason)
    assert "S=8192 at D=64: the Gluon kernel" in select_backend(
        as_cuda(dense, max_kv_len=8192))[1]
    for change in (dict(op="varlen"), dict(causal=True)):
        assert select_backend(as_cuda(dense, max_kv_len=8192, **change))[0].name == "triton"
        assert select_backend(as_cuda(dense, head_dim=128, **change))[0].name == "triton"
    # Bidirectional padded batches at D=128: the Gluon kernel at any length.
    for max_s in (512, 2048, 8192):
        chosen, reason = select_backend(as_cuda(dense, head_dim=128, max_kv_len=max_s))
        assert chosen is gluon and "padded batch at D=128" in reason, reason
    # D=64: the first form (64 rows, in sequence), faster there than 128-row programs;
    # from S=8192, bidirectional padded batches take three consumer groups in 192-row
    # blocks with named turns (varlen and causal ones keep the first form).
    assert gluon.select_config(as_cuda(dense)).tile == backends.gluon.VALIDATED
    validated, three_groups = backends.gluon.VALIDATED, backends.gluon.THREE_GROUPS
    for max_s, tile in ((long_s, validated), (longer_s - 1, validated),
                        (longer_s, three_groups)):
        assert gluon.select_config(as_cuda(dense, max_kv_len=max_s)).tile == tile, max_s
    three = gluon.select_config(as_cuda(dense, max_kv_len=longer_s))
    assert three.block_q == 192 and three.tile.turns == "named" and three.tile.stagger
    assert three.tile.early_q_release and not three.tile.tma_store
    assert "early_q_release=yes" in three.tile.describe_form()
    assert "consumer_partitions=3" in three.tile.describe_form()
    assert "turns=named" in three.tile.describe_form()
    for change in (dict(op="varlen"), dict(causal=True)):
        config = gluon.select_config(as_cuda(dense, max_kv_len=longer_s, **change))
        assert config.tile == backends.gluon.VALIDATED, change
    # D=128, MHA: one head per 128-row program, the producer warp, 128 KV positions a step.
    config = gluon.select_config(as_cuda(dense, head_dim=128))
    assert (config.block_q, config.tile.producer, config.tile.overlap) == (128, True, True)
    assert config.tile.pingpong and config.tile.num_stages == 3 and config.tile.persistent
    assert config.tile.block_n == 128 and config.num_splits == 1
    for change, why in ((dict(head_dim=80), "D=80"), (dict(window_left=7), "sliding window"),
                        (dict(dtype=torch.float32), "fp16 or bf16"),
                        (dict(kv_dtype=torch.float8_e4m3fn), "fp16 or bf16")):
        ok, reason = gluon.supports(as_cuda(dense, **change))
        assert not ok and why in reason
        assert select_backend(as_cuda(dense, **change))[0].name == "triton"
    d256 = as_cuda(dense, head_dim=256)
    assert gluon.supports(d256)[0] and gluon.select_config(d256).tile.block_n == 64
    assert not gluon.select_config(d256).tile.persistent  # measured no faster at D=256
    assert select_backend(d256)[0].name == "triton"  # dense D=256: not measured faster
    monkeypatch.setattr(triton_config, "_capability_major", lambda index: 8)
    chosen, reason = select_backend(as_cuda(dense))
    assert chosen.name == "triton" and "not gluon: sm_8x GPU: the Gluon kernels are for Hopper" \
        in reason, reason
    monkeypatch.setattr(triton_config, "_capability_major", lambda index: 9)

    def paged(page_size: int = 16, hnd: bool = False, head_dim: int = 64,
              **kw) -> backends.AttentionProblem:
        q = torch.empty(100, 8, head_dim, dtype=torch.bfloat16)
        cache = torch.empty(4, page_size, 2, head_dim, dtype=torch.bfloat16)
        if hnd:  # FlashInfer's HND pages, seen through an NHD view: not whole-page rows
            cache = torch.empty(4, 2, page_size, head_dim, dtype=torch.bfloat16).transpose(1, 2)
        return as_cuda(paged_problem(q, cache, 2, 8, True, v_cache=cache, **kw))

    assert gluon.supports(paged())[0] and gluon.supports(paged(256))[0]
    ok, reason = gluon.supports(paged(1))
    assert ok and "cp.async" in reason
    for problem, why in ((paged(512), "page_size 512"), (paged(48), "page_size 48"),
                         (paged(hnd=True), "whole NHD pages"), (paged(appends=True), "append"),
                         (paged(has_kv_bounds=True), "KV shards")):
        ok, reason = gluon.supports(problem)
        assert not ok and why in reason, reason
        assert select_backend(problem)[0].name == "triton"
    # D=128, GQA 4 stacked in the 128-row program (32 query tokens per tile).
    d128 = gluon.select_config(paged(head_dim=128))
    assert d128.tile.heads == 4 and d128.block_q == 32 and d128.tile.producer
    chosen, reason = select_backend(paged())  # D=64 spans: not measured, the portable kernel
    assert chosen.name == "triton" and "span at D=64: not measured" in reason, reason
    assert select_backend(paged(head_dim=128))[0] is gluon
    assert select_backend(paged(head_dim=256))[0] is gluon
    assert select_backend(as_cuda(dense, head_dim=128))[0] is gluon  # bidirectional padded
    assert select_backend(paged(head_dim=256, window_left=3))[0].name == "triton"


def test_gluon_splits_few_tiles_over_long_kv(monkeypatch) -> None:
    """A handful of span rows over a long cache splits its KV range, as the portable
    kernel does; a full launch does not; ``SPANFILL_SPLITS`` forces a count."""
    monkeypatch.delenv("SPANFILL_SPLITS", raising=False)
    monkeypatch.setattr(triton_config, "_capability_major", lambda index: 9)
    monkeypatch.setattr(triton_config, "_num_sms", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gluon = backends.get_backend("gluon")
    cuda = torch.device("cuda", 0)

    def problem(tokens: int, table_width: int) -> backends.AttentionProblem:
        q = torch.empty(tokens, 16, 256, dtype=torch.bfloat16)
        cache = torch.empty(4, 16, 8, 256, dtype=torch.bfloat16)
        return dataclasses.replace(paged_problem(q, cache, 1, table_width, True, v_cache=cache),
                                   device=cuda)

    few = gluon.select_config(problem(16, 2048))  # 1 tile x 8 programs, 32k KV positions
    assert few.num_splits > 1 and few.tile.heads == 2
    assert gluon.select_config(problem(16384, 2048)).num_splits == 1
    monkeypatch.setenv("SPANFILL_SPLITS", "3")
    assert gluon.select_config(problem(16384, 2048)).num_splits == 3


def _hopper_problem(hq: int, hk: int, d: int = 128, tokens: int = 4096, paged: bool = True,
                    num_requests: int = 1, max_kv_len: int = 8192) -> backends.AttentionProblem:
    """A bf16 problem built as the registry builds it (``paged_problem``/``dense_problem``),
    on a stand-in CUDA device: causal span rows over a pool of whole 16-row pages, or
    (``paged=False``) a bidirectional padded batch over dense K/V. The query and dense K/V
    rows are broadcast views: only their shapes are read."""
    q = torch.empty(1, hq, d, dtype=torch.bfloat16).expand(tokens, hq, d)
    if paged:
        cache = torch.empty(1, 16, hk, d, dtype=torch.bfloat16)
        problem = paged_problem(q, cache, num_requests, max_kv_len // 16, True, v_cache=cache)
    else:
        kv = torch.empty(1, hk, d, dtype=torch.bfloat16).expand(tokens, hk, d)
        problem = dense_problem("padded", q, kv, kv, num_requests, max_kv_len, False)
    return dataclasses.replace(problem, device=torch.device("cuda", 0))


def test_gluon_form_takes_the_tma_store_with_whole_boxes_and_no_splits(monkeypatch) -> None:
    """At D=128 the registry's Gluon form stores by TMA: boxes of 64 rows of a head (MHA,
    GQA 2 stacked) or 32 (four heads stacked); not at D=256, and not when the launch
    splits the KV range (partial states go to the workspace)."""
    from spanfill.backends.gluon import choose_form

    monkeypatch.setattr(triton_config, "_capability_major", lambda index: 9)
    monkeypatch.setattr(triton_config, "_num_sms", lambda index: 132)
    problem = _hopper_problem

    assert choose_form(problem(32, 32)).tma_store
    assert choose_form(problem(16, 8)).tma_store and choose_form(problem(16, 8)).heads == 2
    assert choose_form(problem(32, 8)).tma_store and choose_form(problem(32, 8)).heads == 4
    assert not choose_form(problem(16, 8, d=256)).tma_store
    gluon = backends.get_backend("gluon")
    monkeypatch.setenv("SPANFILL_SPLITS", "1")
    assert gluon.select_config(problem(32, 32)).tile.tma_store
    monkeypatch.setenv("SPANFILL_SPLITS", "3")
    config = gluon.select_config(problem(32, 32, tokens=16))
    assert config.num_splits == 3 and not config.tile.tma_store
    assert "tma_store=yes" in choose_form(problem(32, 32)).describe_form()


def test_gluon_form_stages_dense_rows_in_the_last_k_tile(monkeypatch) -> None:
    """Over dense K/V at D=128 the TMA store combines with the early Q release (the rows
    staged in the last K tile); span launches over pages keep the TMA store alone, and a
    form without the TMA store has no early release either."""
    from spanfill.backends.gluon import choose_form

    monkeypatch.setattr(triton_config, "_capability_major", lambda index: 9)

    def problem(paged: bool, hq: int = 16, hk: int = 16):
        return _hopper_problem(hq, hk, paged=paged, num_requests=2, max_kv_len=2048)

    dense = choose_form(problem(False))
    assert dense.tma_store and dense.early_q_release
    assert "tma_store=yes early_q_release=yes" in dense.describe_form()
    paged = choose_form(problem(True, 32, 8))
    assert paged.tma_store and not paged.early_q_release


def test_gluon_form_pins_the_row_max_with_the_tma_store(monkeypatch) -> None:
    """The registry's D=128 forms with the TMA store (measured: MHA dense, four heads
    stacked over pages) compute the row max before the PV wait; split launches (no TMA
    store, unmeasured), D=64 and D=256 leave it off."""
    from spanfill.backends.gluon import choose_form

    monkeypatch.setattr(triton_config, "_capability_major", lambda index: 9)
    monkeypatch.setattr(triton_config, "_num_sms", lambda index: 132)
    problem = _hopper_problem

    assert choose_form(problem(16, 16, paged=False)).pin_softmax == "max"
    assert choose_form(problem(32, 8)).pin_softmax == "max"
    monkeypatch.setenv("SPANFILL_SPLITS", "3")
    split = backends.get_backend("gluon").select_config(problem(32, 8, tokens=16))
    assert split.num_splits == 3 and not split.tile.tma_store and not split.tile.pin_softmax
    assert not choose_form(problem(16, 8, d=256)).pin_softmax
    assert not choose_form(problem(16, 16, paged=False, d=64)).pin_softmax


def test_gluon_form_passes_pin_softmax_to_the_launch(monkeypatch) -> None:
    """A form's ``pin_softmax`` ("max": the row max ahead of the PV wait) reaches the
    kernel's launch keywords and ``spanfill info``'s description."""
    from spanfill.backends.gluon import choose_form
    from spanfill.backends.problem import LaunchConfig
    from spanfill.kernels_gluon import attention

    monkeypatch.setattr(triton_config, "_capability_major", lambda index: 9)
    monkeypatch.setattr(triton_config, "_num_sms", lambda index: 132)
    chosen = choose_form(_hopper_problem(16, 16, paged=False))
    assert "pin_softmax=max" in chosen.describe_form()
    assert "pin_softmax" not in dataclasses.replace(chosen, pin_softmax=False).describe_form()
    seen = {}
    monkeypatch.setattr(attention, "attention_fwd_dense",
                        lambda *args, **kwargs: seen.update(kwargs))
    q = torch.zeros(4, 16, 128, dtype=torch.bfloat16)
    backends.get_backend("gluon").attend(LaunchConfig(chosen), None, q, q, q, 0.1, False, False)
    assert seen["pin_softmax"] == "max" and seen["persistent"] == 132


def test_gluon_padded_forms_fill_the_padding_in_a_partition(monkeypatch) -> None:
    """Padded batches' D=128 form zero-fills the padding in a partition of two warps of
    its own (measured faster on enc_2k_d128), and the launch gets it with ``zero_fill``
    only; the three-group D=64 form (measured slower with it), span and varlen forms
    leave the padding to the first consumer group."""
    from spanfill.backends.gluon import THREE_GROUPS, choose_form
    from spanfill.backends.problem import LaunchConfig
    from spanfill.kernels_gluon import attention

    monkeypatch.setattr(triton_config, "_capability_major", lambda index: 9)
    monkeypatch.setattr(triton_config, "_num_sms", lambda index: 132)
    padded = choose_form(_hopper_problem(16, 16, paged=False))
    assert padded.fill_warps == 2 and THREE_GROUPS.fill_warps == 0
    assert "padding_warps=2" in padded.describe_form()
    assert choose_form(_hopper_problem(32, 8)).fill_warps == 0
    varlen = dataclasses.replace(_hopper_problem(16, 16, paged=False), op="varlen")
    assert choose_form(varlen).fill_warps == 0
    assert "padding_warps" not in choose_form(varlen).describe_form()
    seen = {}
    monkeypatch.setattr(attention, "attention_fwd_dense",
                        lambda *args, **kwargs: seen.update(kwargs))
    q = torch.zeros(4, 16, 128, dtype=torch.bfloat16)
    gluon = backends.get_backend("gluon")
    gluon.attend(LaunchConfig(padded), None, q, q, q, 0.1, False, False, zero_fill=True)
    assert seen["fill_warps"] == 2 and seen["zero_fill"]
    seen.clear()
    gluon.attend(LaunchConfig(padded), None, q, q, q, 0.1, False, False)
    assert "fill_warps" not in seen and not seen["zero_fill"]
