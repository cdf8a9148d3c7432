"""The Gluon launcher's refusals of forms it cannot run, checked on the host (CPU
tensors: each is raised before anything is compiled or launched, so CI covers them
without a GPU). The forms themselves run in ``tests/test_gluon_gpu.py``."""
from __future__ import annotations

import pytest
import torch

import spanfill as sf

pytest.importorskip("triton.experimental.gluon")


def _launch(q: torch.Tensor, kv: torch.Tensor, block_q: int, **form) -> None:
    from spanfill.kernels_gluon.attention import attention_fwd_dense

    cu = torch.tensor([0, q.shape[0]])
    plan = sf.VarlenLayout.build(cu, q.shape[0]).tile_plan(block_q, True)
    attention_fwd_dense(q, kv, kv, torch.empty_like(q), None, plan, 0.125, True, **form)


def _zeros(heads: int, d: int = 64) -> torch.Tensor:
    return torch.zeros(192, heads, d, dtype=torch.float16)


@pytest.mark.parametrize("form", [
    dict(block_m=192), dict(block_m=192, pingpong=True, overlap=True, turns=True)],
    ids=["not-pingpong", "turns"])
def test_three_groups_take_the_pingpong_form(form: dict) -> None:
    with pytest.raises(ValueError, match="192-row programs take the pingpong form at D=64"):
        _launch(_zeros(6), _zeros(2), 192, **form)


def test_turns_take_true_or_named() -> None:
    with pytest.raises(ValueError, match="turns must be False, True or 'named', got 'fast'"):
        _launch(_zeros(6), _zeros(2), 128, block_m=128, pingpong=True, overlap=True,
                turns="fast")


def test_three_groups_take_d64_only() -> None:
    with pytest.raises(ValueError, match=r"192-row programs .* \(got pingpong=True, D=128"):
        _launch(_zeros(6, 128), _zeros(2, 128), 192, block_m=192, pingpong=True)


def test_three_groups_take_dense_kv_only() -> None:
    from spanfill.kernels_gluon.attention import attention_fwd_paged

    q, cache = _zeros(4)[:16], torch.zeros(4, 16, 2, 64, dtype=torch.float16)
    positions = torch.arange(48, 64, dtype=torch.int32)
    layout = sf.VarlenLayout.build(torch.tensor([0, 16]), 16)
    with pytest.raises(ValueError, match=r"192-row programs .* paged"):
        attention_fwd_paged(q, cache, cache, torch.empty_like(q), None,
                            layout.tile_plan(192, True), positions,
                            torch.arange(4, dtype=torch.int32)[None], 0.125, True,
                            block_m=192, pingpong=True)


@pytest.mark.parametrize("block_m,stack", [(192, 2), (128, 1)], ids=["96-rows", "ok-128"])
def test_q_boxes_split_into_whole_groups(block_m: int, stack: int) -> None:
    """With ``split_q`` (and in every 192-row block) each consumer group's 64 rows come
    in whole boxes of one head: 96 rows per head (192 rows, two heads) cannot."""
    q, kv = _zeros(4), _zeros(2)
    if block_m == 192:
        with pytest.raises(ValueError, match="rows per head only as a multiple or a divisor"):
            _launch(q, kv, block_m // stack, block_m=block_m, stack=stack, pingpong=True)
    else:  # 128 rows of one head, two boxes of 64: the launcher's checks pass, and only
        # the launch itself fails (no GPU driver for the CPU tensors)
        if torch.cuda.is_available():
            pytest.skip("with a GPU the launch would run on CPU tensors")
        with pytest.raises(RuntimeError, match="active drivers"):
            _launch(q[:128], kv[:128], 128, block_m=128, pingpong=True, split_q=True)


@pytest.mark.parametrize("form,message", [
    (dict(block_m=128, split_q=True), "split_q takes the pingpong form"),
    (dict(block_m=128, pingpong=True, rescale_early=True),
     "rescale_early takes the pingpong form with overlap"),
    (dict(block_m=128, overlap=True, pin_softmax=True),
     "pin_softmax takes the pingpong form with overlap"),
    (dict(block_m=128, pingpong=True, pin_softmax="max"),
     "pin_softmax takes the pingpong form with overlap"),
    (dict(block_m=128, pingpong=True, pin_softmax="max_reload"),
     "pin_softmax takes the pingpong form with overlap"),
    (dict(block_m=128, pingpong=True, overlap=True, pin_softmax="sum"),
     "pin_softmax must be False, True, 'max' or 'max_reload', got 'sum'"),
    (dict(block_m=128, pingpong=True, overlap=True, split_q=True, turns=True),
     "split_q and turns do not combine"),
    (dict(block_m=128, pingpong=True, overlap=True, fill_warps=3),
     "fill_warps must be 0, 1 or 2, got 3"),
    (dict(block_m=128, pingpong=True, overlap=True, fill_warps=True),
     "fill_warps must be 0, 1 or 2, got True"),
    (dict(block_m=128, overlap=True, zero_fill=True, fill_warps=2),
     "fill_warps takes the pingpong form with zero_fill"),
    (dict(block_m=128, pingpong=True, overlap=True, fill_warps=1),
     "fill_warps takes the pingpong form with zero_fill"),
], ids=["split_q-alone", "rescale_early-in-sequence", "pin_softmax-one-group",
        "pin_max-in-sequence", "pin_max_reload-in-sequence", "pin_softmax-unknown",
        "split_q-turns", "fill_warps-three", "fill_warps-bool", "fill_warps-one-group",
        "fill_warps-no-padding"])
def test_pingpong_options_refused_outside_their_form(form: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _launch(_zeros(6)[:128], _zeros(2)[:128], 128, **form)


@pytest.mark.parametrize("form,message", [
    (dict(block_m=128, persistent=4), "persistent launches take the pingpong form"),
    (dict(block_m=192, persistent=4), "192-row programs take the pingpong form"),
    (dict(block_m=128, pingpong=True, persistent=-1), "persistent must be a program count"),
    (dict(block_m=128, persistent=-1), "persistent must be a program count"),
], ids=["persistent-alone", "persistent-192-alone", "negative", "negative-alone"])
def test_persistent_refused_outside_the_pingpong_form(form: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _launch(_zeros(6)[:128], _zeros(2)[:128], 128, **form)


@pytest.mark.parametrize("form", [
    dict(block_m=128, pingpong=True, overlap=True, persistent=4),
    dict(block_m=128, pingpong=True, overlap=True, persistent=4, stagger=True),
    dict(block_m=128, pingpong=True, overlap=True, persistent=4, stagger=True,
         pin_softmax=True, split_q=True),
    dict(block_m=192, pingpong=True, overlap=True, persistent=4, stagger=True),
    dict(block_m=128, pingpong=True, overlap=True, persistent=4, stagger=True,
         tma_store=True, pin_softmax="max"),
    dict(block_m=128, pingpong=True, overlap=True, persistent=4, stagger=True,
         tma_store=True, early_q_release=True, pin_softmax="max", zero_fill=True,
         fill_warps=2),
    dict(block_m=192, pingpong=True, overlap=True, persistent=4, stagger=True,
         turns="named", early_q_release=True, zero_fill=True, fill_warps=1),
], ids=["persistent", "stagger", "stagger-pin-splitq", "three-groups", "stagger-pin-max",
        "padded-fill2", "three-groups-fill1"])
def test_persistent_pingpong_forms_pass_the_checks(form: dict) -> None:
    """The registry's launch forms get past every refusal: only the launch itself fails
    here (no GPU driver for the CPU tensors). A misplaced refusal once rejected every
    persistent launch, and only the GPU suite saw it."""
    if torch.cuda.is_available():
        pytest.skip("with a GPU the launch would run on CPU tensors")
    rows = form["block_m"]
    with pytest.raises(RuntimeError, match="active drivers"):
        _launch(_zeros(6)[:rows], _zeros(2)[:rows], rows, **form)


@pytest.mark.parametrize("form,block_q", [
    (dict(block_m=128, overlap=True), 128),
    (dict(block_m=128, pingpong=True, overlap=True, stack=8), 16),
    (dict(block_m=128, pingpong=True, overlap=True, split_q=True), 128),
    (dict(block_m=192, pingpong=True, overlap=True), 192),
], ids=["not-pingpong", "16-rows-a-head", "split-q", "three-groups"])
def test_tma_store_takes_two_groups_of_whole_boxes(form: dict, block_q: int) -> None:
    """The TMA-store epilogue writes a consumer group's rows as boxes of 64 rows of one
    head, or 32 of each of two stacked heads: not outside the 128-row ping-pong form, not
    with 16 rows a head, not with split_q."""
    with pytest.raises(ValueError, match="tma_store takes the 128-row pingpong form"):
        _launch(_zeros(8), _zeros(1), block_q, tma_store=True, **form)


@pytest.mark.parametrize("form", [
    dict(block_m=128, overlap=True), dict(block_m=128, pingpong=True),
    dict(block_m=128, pingpong=True, overlap=True, split_q=True),
], ids=["not-pingpong", "not-overlapped", "split-q"])
def test_early_q_release_takes_the_overlapped_pingpong_form(form: dict) -> None:
    with pytest.raises(ValueError, match="early_q_release takes the pingpong form"):
        _launch(_zeros(6)[:128], _zeros(2)[:128], 128, early_q_release=True, **form)


def test_early_q_release_with_tma_store_takes_a_k_tile_of_the_block_rows() -> None:
    """Q's rows are released after the last QK^T, so the TMA store stages the block's
    128 rows in the last K tile instead: 64 KV positions a step do not hold them."""
    with pytest.raises(ValueError, match="block_n must be at least 128, got 64"):
        _launch(_zeros(6)[:128], _zeros(2)[:128], 128, block_m=128, block_n=64,
                pingpong=True, overlap=True, tma_store=True, early_q_release=True)


@pytest.mark.parametrize("tma_store", [False, True], ids=["register-stores", "tma-store"])
def test_early_q_release_forms_pass_the_checks(tma_store: bool) -> None:
    if torch.cuda.is_available():
        pytest.skip("with a GPU the launch would run on CPU tensors")
    with pytest.raises(RuntimeError, match="active drivers"):
        _launch(_zeros(6)[:128], _zeros(2)[:128], 128, block_m=128, pingpong=True,
                overlap=True, persistent=4, stagger=True, early_q_release=True,
                tma_store=tma_store)
