"""The Gluon (Hopper) kernel family against the reference, on an sm_90 GPU.

The first kernel (:mod:`spanfill.kernels_gluon.attention`: dense K/V, fp16/bf16,
D 64/128/256, 64 or 128 rows per program, the softmax in sequence or under the previous
tile's PV) over the same tile plans as the portable kernel: padded batches (zero-fill, right and left padding), varlen causal, GQA, odd
lengths, single-token samples, lse. Outputs are poisoned (NaN) first. CI compiles the
kernel for sm_90 on the CPU (``tests/test_compile_sm90.py``).
"""

from __future__ import annotations

import pytest
import torch

import spanfill as sf
from spanfill import reference
from spanfill.testing import TOLERANCE, assert_lse_close, rel_err

# A synchronisation bug in a new form hangs its kernel (an mbarrier never completes): the
# thread method ends that test's process after 90 s (xdist starts another), so the rest
# of the suite still runs. The slowest form compiles and runs in a few seconds.
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(90, method="thread")]


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(autouse=True)
def _needs_hopper():
    if not _hopper():
        pytest.skip("the Gluon kernels are for Hopper (sm_90)")


BLOCK_M = 64


# (head dim, rows per program): one warp group of 64 rows, two of 128 (8 warps), and
# D=256 (64 KV positions per step), in both.
SHAPES = [(64, 64), (128, 64), (64, 128), (128, 128), (256, 64), (256, 128)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d,block_m", SHAPES, ids=[f"d{d}-m{m}" for d, m in SHAPES])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("warp_specialize", [False, True], ids=["pipelined", "producer-warp"])
@pytest.mark.parametrize("overlap", [False, True], ids=["in-sequence", "overlap"])
def test_padded_batches(dtype: torch.dtype, d: int, block_m: int, side: str, causal: bool,
                        warp_specialize: bool, overlap: bool) -> None:
    from spanfill.kernels_gluon.attention import attention_fwd_dense

    gen = torch.Generator().manual_seed(d + causal)
    b, s, hq, hk = 5, 203, 4, 2
    q, k, v = (torch.randn(b, s, h, d, generator=gen).to("cuda", dtype) for h in (hq, hk, hk))
    valid_lens = torch.tensor([203, 1, 0, 77, 130], device="cuda")
    layout = sf.PaddedLayout.build(valid_lens, s, side)
    plan = layout.tile_plan(block_m, causal)
    out = torch.full((b * s, hq, d), float("nan"), dtype=dtype, device="cuda")
    lse = torch.full((b * s, hq), float("nan"), device="cuda")
    attention_fwd_dense(q.reshape(-1, hq, d), k.reshape(-1, hk, d), v.reshape(-1, hk, d), out,
                        lse, plan, d ** -0.5, causal, zero_fill=True, block_m=block_m,
                        warp_specialize=warp_specialize, overlap=overlap)
    ref_o, ref_lse = reference.padded_prefill(q, k, v, valid_lens, causal, side)
    out, lse = out.view(b, s, hq, d), lse.view(b, s, hq)
    assert not out.isnan().any(), "rows left unwritten"
    assert rel_err(out, ref_o) <= TOLERANCE[dtype]
    assert_lse_close(lse, ref_lse, dtype)
    assert (out[torch.isinf(ref_lse)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d,block_m", SHAPES, ids=[f"d{d}-m{m}" for d, m in SHAPES])
@pytest.mark.parametrize("warp_specialize", [False, True], ids=["pipelined", "producer-warp"])
@pytest.mark.parametrize("overlap", [False, True], ids=["in-sequence", "overlap"])
def test_varlen_causal(dtype: torch.dtype, d: int, block_m: int, warp_specialize: bool,
                       overlap: bool) -> None:
    from spanfill.kernels_gluon.attention import attention_fwd_dense

    gen = torch.Generator().manual_seed(3)
    lens = [1, 64, 65, 300, 17, 128, 129]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda")
    t, hq, hk = sum(lens), 8, 8
    q, k, v = (torch.randn(t, h, d, generator=gen).to("cuda", dtype) for h in (hq, hk, hk))
    layout = sf.VarlenLayout.build(cu, t)
    plan = layout.tile_plan(block_m, True)
    out = torch.full_like(q, float("nan"))
    attention_fwd_dense(q, k, v, out, None, plan, d ** -0.5, True, block_m=block_m,
                        warp_specialize=warp_specialize, overlap=overlap)
    ref_o, _ = reference.varlen_prefill(q, k, v, cu, causal=True)
    assert not out.isnan().any()
    assert rel_err(out, ref_o) <= TOLERANCE[dtype]


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("form", ["in-sequence", "overlap", "registry"])
def test_padding_keys_holding_nan_are_ignored(form: str, d: int) -> None:
    """Padded K/V rows may hold anything: NaN there must not reach a valid row
    (the kernel zeroes V past a request's keys before the PV product, as 32-bit words).
    ``registry``: the form ``backend="gluon"`` chooses (at D=128 the persistent
    ping-pong form, each consumer group zeroing the tail itself). Tails of 22, 61 and 3
    rows in 128-row KV tiles (64-row at D=256), and a sample of exactly one tile."""
    from spanfill.kernels_gluon.attention import attention_fwd_dense

    gen = torch.Generator().manual_seed(5 + d)
    b, s, h = 4, 150, 2
    q, k, v = (torch.randn(b, s, h, d, generator=gen).to("cuda", torch.bfloat16)
               for _ in range(3))
    valid_lens = torch.tensor([150, 61, 3, 128], device="cuda")
    for t in (k, v):
        for i, n in enumerate(valid_lens.tolist()):
            t[i, n:] = float("nan")
    layout = sf.PaddedLayout.build(valid_lens, s)
    if form == "registry":
        out = sf.padded_prefill(q, k, v, layout, backend="gluon")
    else:
        out = torch.full((b * s, h, d), float("nan"), dtype=torch.bfloat16, device="cuda")
        attention_fwd_dense(q.reshape(-1, h, d), k.reshape(-1, h, d), v.reshape(-1, h, d),
                            out, None, layout.tile_plan(BLOCK_M, False), d ** -0.5, False,
                            zero_fill=True, block_m=BLOCK_M, overlap=form == "overlap")
    ref_o, _ = reference.padded_prefill(q, k.nan_to_num(0.0), v.nan_to_num(0.0), valid_lens)
    out = out.view(b, s, h, d)
    assert not out.isnan().any()
    assert rel_err(out, ref_o) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("op", ["padded", "varlen", "span"])
def test_ops_run_it_when_asked(op: str) -> None:
    """backend="gluon" through the public ops: the registry's config, plan and launch."""
    from spanfill.testing import recorded_launches

    gen = torch.Generator().manual_seed(9)
    b, s, h, d = 4, 130, 8, 64
    q, k, v = (torch.randn(b, s, h, d, generator=gen).to("cuda", torch.float16) for _ in range(3))
    valid_lens = torch.tensor([130, 64, 1, 0], device="cuda")
    with recorded_launches(attention_fwd=None) as portable:
        if op == "padded":
            out = sf.padded_prefill(q, k, v, valid_lens, backend="gluon")
            ref_o, _ = reference.padded_prefill(q, k, v, valid_lens)
        elif op == "span":
            from spanfill.testing import reference_span
            from tests.helpers import paged_setup

            layout, k_cache, v_cache, q, _, _ = paged_setup(
                [300, 5, 1000], [[(0, 17), (200, 300)], [(4, 5)], [(0, 1), (500, 640)]], 16,
                8, 2, 128, torch.float16, "cuda")
            out = sf.span_prefill(q, k_cache, v_cache, layout, backend="gluon")
            ref_o, _ = reference_span(q, k_cache, v_cache, layout)
        else:
            cu = torch.tensor([0, 130, 260, 390, 520], device="cuda")
            flat = [x.reshape(b * s, h, d) for x in (q, k, v)]
            out = sf.varlen_prefill(*flat, cu, causal=True, backend="gluon")
            ref_o, _ = reference.varlen_prefill(*flat, cu, causal=True)
    assert portable["attention_fwd"] == []  # the Gluon kernel ran, not the portable one
    assert not out.isnan().any()
    assert rel_err(out, ref_o) <= TOLERANCE[torch.float16]


def _paged_spans(page_size: int, d: int, seed: int):
    """Four requests over a shuffled page pool (GQA 8/2, bf16, CUDA): random spans, a
    single-token span, a whole-prompt span, a one-token prompt. Returns
    ``(layout, k_cache, v_cache, q)``."""
    import random

    from tests.helpers import paged_setup, random_spans

    rng = random.Random(seed)
    seq_lens = [700, 1, 333, 1290]
    spans = [random_spans(rng, 700, 6, 90), [(0, 1)], [(0, 333)],
             [(5, 6)] + [(a, b) for a, b in random_spans(rng, 1290, 5, 200) if a > 6]]
    layout, k_cache, v_cache, q, _, _ = paged_setup(seq_lens, spans, page_size, 8, 2, d,
                                                    torch.bfloat16, "cuda", seed=page_size)
    return layout, k_cache, v_cache, q


def _check_paged_spans(page_size: int, d: int, seed: int, block_m: int, stack: int,
                       return_lse: bool = True, **form) -> None:
    """One launch of :func:`attention_fwd_paged` over :func:`_paged_spans`' pool
    (outputs poisoned), checked against the reference: every row written, output and
    (``return_lse``) lse within bf16 tolerance. ``form``: the launch's other keywords."""
    from spanfill.kernels_gluon.attention import attention_fwd_paged
    from spanfill.testing import reference_span

    layout, k_cache, v_cache, q = _paged_spans(page_size, d, seed)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device="cuda") if return_lse else None
    attention_fwd_paged(q, k_cache, v_cache, out, lse, layout.tile_plan(block_m // stack, True),
                        layout.positions, layout.block_table, d ** -0.5, True, block_m=block_m,
                        stack=stack, **form)
    ref_o, ref_lse = reference_span(q, k_cache, v_cache, layout)
    assert not out.isnan().any(), "rows left unwritten"
    assert rel_err(out, ref_o) <= TOLERANCE[torch.bfloat16]
    if return_lse:
        assert_lse_close(lse, ref_lse, torch.bfloat16)


PAGED = [(64, 64), (128, 64), (128, 128), (256, 64), (256, 128)]


@pytest.mark.parametrize("page_size", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("d,block_m", PAGED, ids=[f"d{d}-m{m}" for d, m in PAGED])
@pytest.mark.parametrize("warp_specialize", [False, True], ids=["pipelined", "producer-warp"])
@pytest.mark.parametrize("overlap", [False, True], ids=["in-sequence", "overlap"])
@pytest.mark.parametrize("stack", [1, 4], ids=["head-per-block", "stack4"])
def test_paged_spans(page_size: int, d: int, block_m: int, warp_specialize: bool,
                     overlap: bool, stack: int) -> None:
    """Span rows at their own positions over a shuffled page pool (GQA 8/2, lse), with a
    single-token span, a whole-prompt span and a one-token prompt; one q head per block,
    or the 4 of a KV head stacked in it."""
    _check_paged_spans(page_size, d, page_size + d + block_m, block_m, stack,
                       warp_specialize=warp_specialize, overlap=overlap)


@pytest.mark.parametrize("d,block_m", SHAPES, ids=[f"d{d}-m{m}" for d, m in SHAPES])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("overlap", [False, True], ids=["in-sequence", "overlap"])
def test_padded_batches_stacked_heads(d: int, block_m: int, causal: bool, overlap: bool) -> None:
    """GQA 4/2 with the 2 q heads of a KV head in one block, zero-filled padding."""
    from spanfill.kernels_gluon.attention import attention_fwd_dense

    gen = torch.Generator().manual_seed(d + block_m)
    b, s, hq, hk = 4, 150, 4, 2
    q, k, v = (torch.randn(b, s, h, d, generator=gen).to("cuda", torch.bfloat16)
               for h in (hq, hk, hk))
    valid_lens = torch.tensor([150, 1, 0, 97], device="cuda")
    plan = sf.PaddedLayout.build(valid_lens, s).tile_plan(block_m // 2, causal)
    out = torch.full((b * s, hq, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    lse = torch.full((b * s, hq), float("nan"), device="cuda")
    attention_fwd_dense(q.reshape(-1, hq, d), k.reshape(-1, hk, d), v.reshape(-1, hk, d), out,
                        lse, plan, d ** -0.5, causal, zero_fill=True, block_m=block_m,
                        overlap=overlap, stack=2)
    ref_o, ref_lse = reference.padded_prefill(q, k, v, valid_lens, causal)
    out, lse = out.view(b, s, hq, d), lse.view(b, s, hq)
    assert not out.isnan().any(), "rows left unwritten"
    assert rel_err(out, ref_o) <= TOLERANCE[torch.bfloat16]
    assert_lse_close(lse, ref_lse, torch.bfloat16)


def test_paged_refuses_what_it_cannot_copy() -> None:
    from spanfill.kernels_gluon.attention import attention_fwd_paged

    q = torch.zeros(4, 2, 64, device="cuda", dtype=torch.bfloat16)
    for page_size in (512, 24):
        k = torch.zeros(3, page_size, 2, 64, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="page_size must be a power of two from 1 to 256"):
            attention_fwd_paged(q, k, k, q, None, None, None, None, 0.125, True)
    k = torch.zeros(2, 3, 16, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # HND
    with pytest.raises(ValueError, match="k_cache pages are not contiguous"):
        attention_fwd_paged(q, k, k, q, None, None, None, None, 0.125, True)
    k = torch.zeros(3, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="stack must divide the GQA group"):
        attention_fwd_paged(q, k, k, q, None, None, None, None, 0.125, True, stack=3)


@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("form", ["plain", "overlap-producer-stack4"])
def test_split_kv_paged(page_size: int, num_splits: int, form: str) -> None:
    """Few span rows over long prompts, their KV range split over programs and merged:
    a 16-token hole at 3,000, one row at position 0, a whole 700-token prompt."""
    from spanfill.kernels_gluon.attention import attention_fwd_paged
    from spanfill.testing import reference_span
    from tests.helpers import paged_setup

    layout, k_cache, v_cache, q, _, _ = paged_setup(
        [3017, 1, 700], [[(3000, 3016)], [(0, 1)], [(0, 700)]], page_size, 8, 2, 128,
        torch.bfloat16, "cuda", seed=num_splits)
    extra = dict(overlap=True, warp_specialize=True, stack=4) if form != "plain" else {}
    plan = layout.tile_plan(64 // extra.get("stack", 1), True)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device="cuda")
    attention_fwd_paged(q, k_cache, v_cache, out, lse, plan, layout.positions,
                        layout.block_table, 128 ** -0.5, True, num_splits=num_splits, **extra)
    ref_o, ref_lse = reference_span(q, k_cache, v_cache, layout)
    assert not out.isnan().any(), "rows left unwritten"
    assert rel_err(out, ref_o) <= TOLERANCE[torch.bfloat16]
    assert_lse_close(lse, ref_lse, torch.bfloat16)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_split_kv_varlen(num_splits: int) -> None:
    from spanfill.kernels_gluon.attention import attention_fwd_dense

    gen = torch.Generator().manual_seed(11)
    lens = [2000, 1, 333]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda")
    q, k, v = (torch.randn(sum(lens), 4, 64, generator=gen).to("cuda", torch.float16)
               for _ in range(3))
    plan = sf.VarlenLayout.build(cu, sum(lens)).tile_plan(64, True)
    out = torch.full_like(q, float("nan"))
    attention_fwd_dense(q, k, v, out, None, plan, 0.125, True, num_splits=num_splits)
    ref_o, _ = reference.varlen_prefill(q, k, v, cu, causal=True, sm_scale=0.125)
    assert not out.isnan().any()
    assert rel_err(out, ref_o) <= TOLERANCE[torch.float16]
    with pytest.raises(ValueError, match="num_splits must be >= 1, and 1 with zero_fill"):
        attention_fwd_dense(q, k, v, out, None, plan, 0.125, True, zero_fill=True, num_splits=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("group", [1, 2, 8])
def test_automatic_choice_runs_it_for_d256_spans(dtype: torch.dtype, page_size: int,
                                                 group: int, monkeypatch) -> None:
    """span_prefill with no backend named: D=256 takes the Gluon kernel in the form
    :func:`choose_form` gives (128-row programs, producer warp, two consumer partitions,
    the GQA group stacked),
    split-KV where few tiles meet a long prompt (a 16-token hole at 3,000), with lse."""
    from spanfill.backends import get_backend, paged_problem
    from spanfill.testing import recorded_launches, reference_span
    from tests.helpers import paged_setup

    monkeypatch.delenv("SPANFILL_BACKEND", raising=False)
    monkeypatch.delenv("SPANFILL_SPLITS", raising=False)
    layout, k_cache, v_cache, q, _, _ = paged_setup(
        [3017, 1, 77], [[(3000, 3016)], [(0, 1)], [(0, 40), (60, 77)]], page_size,
        2 * group, 2, 256, dtype, "cuda", seed=page_size + group)
    problem = paged_problem(q, k_cache, 3, layout.block_table.shape[1], True, v_cache=v_cache)
    config = get_backend("gluon").select_config(problem)
    assert config.tile.block_m == 128 and config.tile.producer and config.tile.pingpong
    assert not config.tile.overlap and config.num_splits > 1
    with recorded_launches(attention_fwd=None) as portable:
        out, lse = sf.span_prefill(q, k_cache, v_cache, layout, return_lse=True)
    assert portable["attention_fwd"] == []  # the Gluon kernel ran, not the portable one
    ref_o, ref_lse = reference_span(q, k_cache, v_cache, layout)
    assert not out.isnan().any(), "rows left unwritten"
    assert rel_err(out, ref_o) <= TOLERANCE[dtype]
    assert_lse_close(lse, ref_lse, dtype)


# (head dim, padded length S, q heads, kv heads, valid lengths, the form's expected
# keywords): D=128 takes 128-row programs storing by TMA through the last K tile, Q
# released early (GQA 2: two heads of 64 rows stacked); D=64 from S=8192 takes 192-row
# blocks of three groups with named turns, each releasing its Q rows after its last QK^T.
AUTO_PADDED = {
    "d128": (128, 1031, 4, 2, [1031, 1, 0, 500, 64, 129],
             dict(block_m=128, stack=2, tma_store=True, stagger=True,
                  early_q_release=True)),
    "d64-s8192": (64, 8192, 2, 2, [8192, 1, 0, 4097, 6001],
                  dict(block_m=192, stack=1, turns="named", stagger=True,
                       early_q_release=True)),
}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", list(AUTO_PADDED))
def test_automatic_choice_runs_it_for_bidirectional_padded_batches(case: str, side: str,
                                                                   monkeypatch) -> None:
    """padded_prefill with no backend named: bidirectional batches at D=128, and at D=64
    from S=8192, take the Gluon kernel in the form :func:`choose_form` gives (a full
    sample, a one-token one, an empty one, odd lengths; NaN in the padded K/V rows, bf16,
    lse); padded rows come out exactly zero."""
    from spanfill.kernels_gluon import attention as gluon_attention
    from spanfill.testing import recorded_launches

    monkeypatch.delenv("SPANFILL_BACKEND", raising=False)
    d, s, hq, hk, valid_lens, expected = AUTO_PADDED[case]
    launched = []
    real = gluon_attention.attention_fwd_dense

    def spy(*args, **kwargs):
        launched.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(gluon_attention, "attention_fwd_dense", spy)
    gen = torch.Generator().manual_seed(d + s)
    b = len(valid_lens)
    q, k, v = (torch.randn(b, s, h, d, generator=gen).to("cuda", torch.bfloat16)
               for h in (hq, hk, hk))
    lens = torch.tensor(valid_lens, device="cuda")
    ref_o, ref_lse = reference.padded_prefill(q, k, v, lens, False, side)
    for i, n in enumerate(valid_lens):
        pad = slice(n, None) if side == "right" else slice(0, s - n)
        k[i, pad], v[i, pad] = float("nan"), float("nan")
    with recorded_launches(attention_fwd=None) as portable:
        out, lse = sf.padded_prefill(q, k, v, lens, padding_side=side, return_lse=True)
    assert portable["attention_fwd"] == []  # the Gluon kernel ran, not the portable one
    assert len(launched) == 1 and launched[0]["persistent"] > 0
    assert {key: launched[0][key] for key in expected} == expected, launched[0]
    assert not out.isnan().any(), "rows left unwritten"
    assert rel_err(out, ref_o) <= TOLERANCE[torch.bfloat16]
    assert_lse_close(lse, ref_lse, torch.bfloat16)
    assert (out[torch.isinf(ref_lse)] == 0).all()


# ----------------------------------------------------------------------------- ping-pong
# Two consumer warp groups of a 128-row program as separate partitions (``pingpong=True``):
# each with the overlapped loop over three stages (``overlap=True``) or in sequence. A
# hang here is a barrier bug, and the 90 s timeout above ends it.

OVERLAP = pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "in-sequence"])
# Persistent launches: 3 programs walk every work item in rounds, both directions, with
# ring slots and Q phases running on across items (and padding-only tiles in between).
# Staggered: the second consumer group starts each item after the first group's first tile;
# turns: the groups take turns issuing each step's wgmmas (with the overlapped loop only),
# passed through an mbarrier or (named) a hardware named barrier;
# split-q: each group's half of Q is copied and released on its own; early: the output
# is rescaled under the QK^T wgmma; pin: a scratch store keeps the softmax ahead of the PV
# wait, pin-max its row max only, pin-max-reload that max read back after PV's stage is
# released (early and pin with the overlapped loop only).
PERSISTENT = pytest.mark.parametrize("form", [
    dict(persistent=0), dict(persistent=3), dict(persistent=3, stagger=True),
    dict(persistent=3, turns=True), dict(persistent=3, stagger=True, split_q=True),
    dict(persistent=3, stagger=True, rescale_early=True),
    dict(persistent=3, stagger=True, split_q=True, pin_softmax=True),
    dict(persistent=0, turns="named"), dict(persistent=3, stagger=True, turns="named")],
    ids=["per-item", "persistent3", "persistent3-stagger", "persistent3-turns",
         "persistent3-stagger-splitq", "persistent3-stagger-early",
         "persistent3-stagger-splitq-pin", "per-item-named-turns",
         "persistent3-stagger-named-turns"])


# The options that take the overlapped loop (the launch refuses them with the in-sequence
# one: ``tests/test_gluon_launch_checks.py``).
OVERLAP_ONLY = frozenset({"turns", "rescale_early", "pin_softmax", "early_q_release"})


def _pingpong_form(form: dict, overlap: bool) -> dict:
    """A ``PERSISTENT`` form as launch keywords; skipped with the in-sequence loop where it
    has an option of the overlapped one (:data:`OVERLAP_ONLY`)."""
    if not overlap and OVERLAP_ONLY & form.keys():
        pytest.skip("an option of the overlapped loop")
    return form


def _check_pingpong_padded(valid_lens: list[int], s: int, hq: int, hk: int, d: int,
                           dtype: torch.dtype, side: str, causal: bool, stack: int,
                           block_m: int, seed: int, **form) -> None:
    """One ping-pong launch of :func:`attention_fwd_dense` over a padded batch of
    ``len(valid_lens)`` samples of ``s`` slots (NaN in the padded K/V rows, outputs
    poisoned), checked against the reference: every row written, output and lse within
    tolerance, fully masked rows exactly 0. ``form``: the launch's keywords."""
    from spanfill.kernels_gluon.attention import attention_fwd_dense

    gen = torch.Generator().manual_seed(seed)
    b = len(valid_lens)
    q, k, v = (torch.randn(b, s, h, d, generator=gen).to("cuda", dtype) for h in (hq, hk, hk))
    lens = torch.tensor(valid_lens, device="cuda")
    layout = sf.PaddedLayout.build(lens, s, side)
    ref_o, ref_lse = reference.padded_prefill(q, k, v, lens, causal, side)
    for i, n in enumerate(valid_lens):
        pad = slice(n, None) if side == "right" else slice(0, s - n)
        k[i, pad], v[i, pad] = float("nan"), float("nan")
    out = torch.full((b * s, hq, d), float("nan"), dtype=dtype, device="cuda")
    lse = torch.full((b * s, hq), float("nan"), device="cuda")
    attention_fwd_dense(q.reshape(-1, hq, d), k.reshape(-1, hk, d), v.reshape(-1, hk, d), out,
                        lse, layout.tile_plan(block_m // stack, causal), d ** -0.5, causal,
                        zero_fill=True, block_m=block_m, stack=stack, pingpong=True, **form)
    out, lse = out.view(b, s, hq, d), lse.view(b, s, hq)
    assert not out.isnan().any(), "rows left unwritten"
    assert rel_err(out, ref_o) <= TOLERANCE[dtype]
    assert_lse_close(lse, ref_lse, dtype)
    assert (out[torch.isinf(ref_lse)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("stack", [1, 2], ids=["head-per-block", "stack2"])
@OVERLAP
@PERSISTENT
def test_pingpong_padded_batches(dtype: torch.dtype, d: int, side: str, causal: bool,
                                 stack: int, overlap: bool, form: dict) -> None:
    """Padded batches (a full sample, a one-token one, an empty one, odd lengths) with
    NaN in the padded K/V rows, lse, zero-filled padding."""
    _check_pingpong_padded([203, 1, 0, 77, 130], 203, 4, 2, d, dtype, side, causal, stack,
                           128, d + causal + stack, overlap=overlap,
                           **_pingpong_form(form, overlap))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("stack", [1, 3], ids=["head-per-block", "stack3"])
@OVERLAP
@pytest.mark.parametrize("form", [
    dict(persistent=0), dict(persistent=3), dict(persistent=3, stagger=True),
    dict(persistent=3, stagger=True, split_q=True),
    dict(persistent=3, stagger=True, rescale_early=True),
    dict(persistent=3, stagger=True, pin_softmax=True),
    dict(persistent=0, turns="named"), dict(persistent=3, stagger=True, turns="named"),
    dict(persistent=3, stagger=True, turns="named", early_q_release=True),
    dict(persistent=3, stagger=True, turns="named", early_q_release=True,
         pin_softmax="max"),
    dict(persistent=3, stagger=True, turns="named", early_q_release=True,
         pin_softmax="max_reload"),
    dict(persistent=3, stagger=True, turns="named", early_q_release=True, fill_warps=2),
    dict(persistent=1, stagger=True, turns="named", early_q_release=True, fill_warps=1)],
    ids=["per-item", "persistent3", "persistent3-stagger", "persistent3-stagger-splitq",
         "persistent3-stagger-early", "persistent3-stagger-pin", "per-item-named-turns",
         "persistent3-stagger-named-turns", "persistent3-stagger-named-turns-early-q",
         "persistent3-stagger-named-turns-early-q-pin-max",
         "persistent3-stagger-named-turns-early-q-pin-max-reload",
         "persistent3-stagger-named-turns-early-q-fill2",
         "persistent1-stagger-named-turns-early-q-fill1"])
def test_three_groups_padded_batches(dtype: torch.dtype, side: str, causal: bool, stack: int,
                                     overlap: bool, form: dict) -> None:
    """192-row blocks of three consumer groups at D=64 (GQA 6/2, so three heads can
    stack): padded batches with NaN in the padded K/V rows, a full sample, a one-token
    and an empty one, lengths across the 64-row group boundaries; lse, zero-filled
    padding, the stagger chained over three groups, the named turns passed round the
    three."""
    _check_pingpong_padded([401, 1, 0, 65, 129, 192], 401, 6, 2, 64, dtype, side, causal,
                           stack, 192, stack + causal, overlap=overlap,
                           **_pingpong_form(form, overlap))


@pytest.mark.parametrize("page_size", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("stack", [1, 4], ids=["head-per-block", "stack4"])
@pytest.mark.parametrize("num_splits", [1, 3])
@OVERLAP
@PERSISTENT
def test_pingpong_paged_spans(page_size: int, d: int, stack: int, num_splits: int,
                              overlap: bool, form: dict) -> None:
    """Span rows at their own positions over a shuffled page pool (GQA 8/2, lse): a
    single-token span, a whole-prompt span, a one-token prompt; unsplit and split-KV."""
    _check_paged_spans(page_size, d, page_size + d + stack, 128, stack, num_splits=num_splits,
                       overlap=overlap, pingpong=True, **_pingpong_form(form, overlap))


@OVERLAP
@pytest.mark.parametrize("persistent,split_q", [(0, False), (1, False), (3, False),
                                                (1000, False), (3, True)],
                         ids=["per-item", "persistent1", "persistent3", "persistent1000",
                              "persistent3-splitq"])
def test_pingpong_varlen_causal(overlap: bool, persistent: int, split_q: bool) -> None:
    """Varlen causal, one-token and tile-boundary lengths; persistent with one program
    (every item in one program), three, and more programs than items; each group's half
    of Q on its own barriers without the stagger."""
    from spanfill.kernels_gluon.attention import attention_fwd_dense

    gen = torch.Generator().manual_seed(13)
    lens = [1, 64, 65, 300, 17, 128, 129]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda")
    t, h, d = sum(lens), 8, 128
    q, k, v = (torch.randn(t, h, d, generator=gen).to("cuda", torch.float16) for _ in range(3))
    out = torch.full_like(q, float("nan"))
    attention_fwd_dense(q, k, v, out, None, sf.VarlenLayout.build(cu, t).tile_plan(128, True),
                        d ** -0.5, True, block_m=128, overlap=overlap, pingpong=True,
                        persistent=persistent, split_q=split_q)
    ref_o, _ = reference.varlen_prefill(q, k, v, cu, causal=True)
    assert not out.isnan().any()
    assert rel_err(out, ref_o) <= TOLERANCE[torch.float16]


# The consumers' TMA-store epilogue: boxes of 64 rows where a group's rows fit one, the
# register stores at the tails of tiles (odd lengths), with and without lse. Then Q
# released after each group's last QK^T (early_q_release), with register stores; then
# both, the rows staged in the item's last K tile (that ring stage held until the store).
K_STAGED_FORMS = [dict(persistent=3, stagger=True, tma_store=True, early_q_release=True),
                  dict(persistent=1000, stagger=True, tma_store=True, early_q_release=True),
                  dict(persistent=0, tma_store=True, early_q_release=True)]
K_STAGED_IDS = ["persistent3-stagger-k-staged", "persistent1000-stagger-k-staged",
                "per-item-k-staged"]
TMA_STORE_FORMS = pytest.mark.parametrize("form", [
    dict(persistent=0, tma_store=True), dict(persistent=3, stagger=True, tma_store=True),
    dict(persistent=1000, stagger=True, tma_store=True),
    dict(persistent=3, stagger=True, early_q_release=True),
    dict(persistent=1000, stagger=True, early_q_release=True),
    dict(persistent=0, early_q_release=True), *K_STAGED_FORMS,
    # the registry's span and padded forms with the row max ahead of the PV wait
    dict(persistent=3, stagger=True, tma_store=True, pin_softmax="max"),
    dict(persistent=3, stagger=True, tma_store=True, early_q_release=True,
         pin_softmax="max"),
    # ... and the maxima read back after PV's stage is released
    dict(persistent=3, stagger=True, tma_store=True, pin_softmax="max_reload"),
    dict(persistent=3, stagger=True, tma_store=True, early_q_release=True,
         pin_softmax="max_reload")],
    ids=["per-item-tma-store", "persistent3-stagger-tma-store",
         "persistent1000-stagger-tma-store", "persistent3-stagger-early-q",
         "persistent1000-stagger-early-q", "per-item-early-q", *K_STAGED_IDS,
         "persistent3-stagger-tma-store-pin-max", "persistent3-stagger-k-staged-pin-max",
         "persistent3-stagger-tma-store-pin-max-reload",
         "persistent3-stagger-k-staged-pin-max-reload"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("stack", [1, 2, 4], ids=["head-per-block", "stack2", "stack4"])
@TMA_STORE_FORMS
def test_tma_store_padded_batches(dtype: torch.dtype, d: int, side: str, causal: bool,
                                  stack: int, form: dict) -> None:
    """Padded batches through the TMA-store epilogue: full boxes (64 rows of a head, or 32
    with four heads stacked) in the middle of samples, tails of odd lengths (left padding: the box over a sample's first rows holds
    zero-filled padding), a one-token and an empty sample; NaN in the padded K/V."""
    _check_pingpong_padded([203, 1, 0, 77, 130, 256], 256, 2 * max(stack, 2), 2, d, dtype,
                           side, causal, stack, 128, d + causal + stack + 7, overlap=True,
                           **form)


# The padding zero-filled by a partition of its own (fill_warps: one or two warps): the
# registry's padded D=128 form, over one program (every item), three, more programs than
# items, and one program per item; and the in-sequence consumers (D=256's loop).
FILL_FORMS = [
    dict(persistent=3, stagger=True, tma_store=True, early_q_release=True, pin_softmax="max",
         fill_warps=2),
    dict(persistent=1, stagger=True, tma_store=True, early_q_release=True, pin_softmax="max",
         fill_warps=1),
    dict(persistent=1000, stagger=True, tma_store=True, early_q_release=True,
         pin_softmax="max", fill_warps=2),
    dict(persistent=0, tma_store=True, early_q_release=True, fill_warps=2),
    dict(persistent=3, stagger=True, overlap=False, fill_warps=1)]
FILL_IDS = ["persistent3-k-staged-pin-max-fill2", "persistent1-k-staged-pin-max-fill1",
            "persistent1000-k-staged-pin-max-fill2", "per-item-k-staged-fill2",
            "persistent3-stagger-in-sequence-fill1"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("stack", [1, 2], ids=["head-per-block", "stack2"])
@pytest.mark.parametrize("form", FILL_FORMS, ids=FILL_IDS)
def test_padding_partition_padded_batches(dtype: torch.dtype, d: int, side: str,
                                          causal: bool, stack: int, form: dict) -> None:
    """Padded batches whose padding the padding partition fills (zeros, lse -inf) while
    the consumers run the valid tiles: a full sample, an empty one (its every row
    padding), a one-token one and odd lengths, NaN in the padded K/V rows, outputs
    poisoned. D=256 takes the in-sequence form only (its 64 KV positions a step hold no
    staged rows)."""
    form = dict(form)
    overlap = form.pop("overlap", True)
    if d == 256 and overlap:
        pytest.skip("D=256: the in-sequence consumers only")
    _check_pingpong_padded([203, 1, 0, 77, 130, 256], 256, 2 * max(stack, 2), 2, d, dtype,
                           side, causal, stack, 128, d + causal + stack + 11, overlap=overlap,
                           **form)


@pytest.mark.parametrize("stack", [1, 2, 4], ids=["head-per-block", "stack2", "stack4"])
@pytest.mark.parametrize("return_lse", [False, True], ids=["no-lse", "lse"])
@TMA_STORE_FORMS
def test_tma_store_varlen_and_spans(stack: int, return_lse: bool, form: dict) -> None:
    """Packed rows (varlen causal, and span rows over a paged pool): a box may only hold
    rows of its own request, so tiles cut short by a request's end store by registers;
    the next request's rows are never overwritten (checked: every row against the
    reference)."""
    from spanfill.kernels_gluon.attention import attention_fwd_dense

    gen = torch.Generator().manual_seed(17 + stack)
    lens = [1, 64, 65, 300, 17, 128, 129, 192]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda")
    t, hq, hk, d = sum(lens), 8, 8 // max(stack, 2), 128
    q = torch.randn(t, hq, d, generator=gen).to("cuda", torch.bfloat16)
    k, v = (torch.randn(t, hk, d, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((t, hq), float("nan"), device="cuda") if return_lse else None
    attention_fwd_dense(q, k, v, out, lse,
                        sf.VarlenLayout.build(cu, t).tile_plan(128 // stack, True), d ** -0.5,
                        True, block_m=128, stack=stack, overlap=True, pingpong=True, **form)
    ref_o, ref_lse = reference.varlen_prefill(q, k, v, cu, causal=True)
    assert not out.isnan().any()
    assert rel_err(out, ref_o) <= TOLERANCE[torch.bfloat16]
    if return_lse:
        assert_lse_close(lse, ref_lse, torch.bfloat16)

    _check_paged_spans(16, d, 3 + stack, 128, stack, return_lse, overlap=True, pingpong=True,
                       **form)


@pytest.mark.parametrize("page_size", [1, 4, 16, 256])
@pytest.mark.parametrize("stack", [1, 4], ids=["head-per-block", "stack4"])
@pytest.mark.parametrize("form", K_STAGED_FORMS[:2], ids=K_STAGED_IDS[:2])
def test_k_staged_tma_store_paged_spans(page_size: int, stack: int, form: dict) -> None:
    """The rows staged in the last K tile over paged pools whose stages are gathered by
    cp.async (pages of 1 and 4 rows) or copied by TMA per page: the held stage is the one
    the next item's third tile lands in, so a stage released too early shows as wrong
    rows (lse too, every row against the reference)."""
    _check_paged_spans(page_size, 128, page_size + stack + 5, 128, stack, overlap=True,
                       pingpong=True, **form)


def test_pingpong_refuses_64_rows() -> None:
    from spanfill.kernels_gluon.attention import attention_fwd_dense

    x = torch.zeros(64, 2, 64, dtype=torch.float16, device="cuda")
    plan = sf.VarlenLayout.build(torch.tensor([0, 64], device="cuda"), 64).tile_plan(64, True)
    with pytest.raises(ValueError, match="pingpong takes 128-row programs"):
        attention_fwd_dense(x, x, x, torch.empty_like(x), None, plan, 0.125, True, block_m=64,
                            pingpong=True)
    with pytest.raises(ValueError, match="persistent launches take the pingpong form"):
        attention_fwd_dense(x, x, x, torch.empty_like(x), None, plan, 0.125, True, block_m=128,
                            persistent=132)
    with pytest.raises(ValueError, match="turns take the pingpong form with overlap"):
        attention_fwd_dense(x, x, x, torch.empty_like(x), None, plan, 0.125, True, block_m=128,
                            pingpong=True, turns=True)
    with pytest.raises(ValueError, match="stagger takes the pingpong form"):
        attention_fwd_dense(x, x, x, torch.empty_like(x), None, plan, 0.125, True, block_m=128,
                            stagger=True)

    with pytest.raises(ValueError, match="persistent must be a program count >= 0"):
        attention_fwd_dense(x, x, x, torch.empty_like(x), None, plan, 0.125, True, block_m=128,
                            pingpong=True, persistent=-1)
