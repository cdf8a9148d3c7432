"""Single query rows and few rows over long prompts: the split-KV path, T=1 included.

A launch of few tiles over long KV splits each tile's KV range
(:func:`spanfill.backends.triton_config.pick_num_splits`). With ONE query row the kernel's
row-count argument is 1, which Triton turns into a compile-time constant on the
GPU (never in the interpreter): that crashed the split path at compile time, and
nothing caught it. These tests run T=1 at 1k-32k KV positions for the policy's
split count and forced ones (``SPANFILL_SPLITS``), a batch of 64 one-hole
requests, and ``integrations.holes.decode_step``, each against
:mod:`spanfill.reference` with poisoned outputs and NaN/inf in every KV slot the
rows may not read.

Each GPU grid shares its helper with a ``*_small`` test, which the interpreter
runs on a CPU (fp32 and fp16) with forced splits.
"""

from __future__ import annotations

import random
from typing import Iterator

import pytest
import torch

import spanfill as sf
from spanfill import reference
from spanfill.testing import (assert_close, assert_lse_close, num_splits, recorded_launches,
                              reference_span)
from tests.fuzzing import bits, poisoned_allocations
from tests.helpers import paged_setup

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
HEADS = {"mqa8": (8, 1), "gqa32/8": (32, 8), "mqa4": (4, 1), "gqa4/2": (4, 2)}


@pytest.fixture
def launches() -> Iterator[list[int]]:
    """The ``num_splits`` of every attention launch the test makes.

    Also proves the kernel ran: a test that finds no launch took another path.
    """
    with recorded_launches(attention_fwd=num_splits) as recorded:
        yield recorded["attention_fwd"]


def hide_unreadable(layout: sf.SpanLayout, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """NaN in K and inf in V at every slot no request may read (page tails past
    seq_len, spare pages), so any read outside a request's range poisons its row."""
    num_pages, page_size = k_cache.shape[:2]
    visible = torch.zeros(num_pages * page_size, dtype=torch.bool, device=k_cache.device)
    for b, n in enumerate(layout.seq_lens.tolist()):
        pos = torch.arange(n, device=k_cache.device)
        pages = layout.block_table[b].long()[pos // page_size]
        visible[pages * page_size + pos % page_size] = True
    hidden = ~visible.view(num_pages, page_size)
    k_cache[hidden] = float("nan")
    v_cache[hidden] = float("inf")


def check_step(layout: sf.SpanLayout, k_cache: torch.Tensor, v_cache: torch.Tensor,
               q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               causal: bool = True) -> None:
    """append_kv + span_prefill through the kernels vs the reference.

    The cache must equal the reference append bit for bit; o and lse (allocated
    poisoned) must match the reference run on that cache.
    """
    dtype = q.dtype
    hide_unreadable(layout, k_cache, v_cache)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    sf.append_kv(k_new, v_new, k_cache, v_cache, layout, backend="triton")
    reference.append_kv(k_new, v_new, ref_k, ref_v, layout.slot_mapping)
    assert torch.equal(bits(k_cache), bits(ref_k)), "append_kv: k_cache differs from the reference"
    assert torch.equal(bits(v_cache), bits(ref_v)), "append_kv: v_cache differs from the reference"
    with poisoned_allocations():
        o, lse = sf.span_prefill(q, k_cache, v_cache, layout, causal=causal, return_lse=True,
                                 backend="triton")
    o_ref, lse_ref = reference_span(q, ref_k, ref_v, layout, causal)
    assert_close(o, o_ref, dtype, "o")
    assert_lse_close(lse, lse_ref, dtype)


def single_row(seq_len: int, where: str, page_size: int, heads: str, head_dim: int,
               dtype: torch.dtype, causal: bool = True) -> None:
    """One request of ``seq_len`` positions with one hole token at its ``where``
    ("first", "middle" or "last") position: a T=1 batch."""
    pos = {"first": 0, "middle": seq_len // 2 + 3, "last": seq_len - 1}[where]
    hq, hk = HEADS[heads]
    setup = paged_setup([seq_len], [[(pos, pos + 1)]], page_size, hq, hk, head_dim, dtype,
                        DEVICE, seed=seq_len + pos)
    assert setup[0].num_tokens == 1
    check_step(*setup, causal=causal)


def one_hole_per_request(num_req: int, min_len: int, max_len: int, page_size: int, heads: str,
                         head_dim: int, dtype: torch.dtype, seed: int = 0) -> None:
    """``num_req`` prompts of ``min_len..max_len`` tokens, each with exactly one hole
    of 1-8 tokens at a random position."""
    rng = random.Random(seed)
    seq_lens = [rng.randint(min_len, max_len) for _ in range(num_req)]
    spans = []
    for n in seq_lens:
        length = rng.randint(1, 8)
        start = rng.randint(0, n - length)
        spans.append([(start, start + length)])
    hq, hk = HEADS[heads]
    check_step(*paged_setup(seq_lens, spans, page_size, hq, hk, head_dim, dtype, DEVICE,
                            seed=seed))


def forced(monkeypatch: pytest.MonkeyPatch, splits: int | None) -> None:
    """Force ``splits`` split-KV programs per tile (None: the policy decides)."""
    if splits is None:
        monkeypatch.delenv("SPANFILL_SPLITS", raising=False)
    else:
        monkeypatch.setenv("SPANFILL_SPLITS", str(splits))


def split_id(splits: int | None) -> str:
    return "policy" if splits is None else f"split{splits}"


# ----------------------------------------------------------------------------- small sizes
# (the interpreter on a CPU; the kernels where there is a GPU)

@pytest.mark.parametrize("seq_len, where, page_size, heads, head_dim, dtype", [
    pytest.param(100, "last", 16, "mqa4", 32, FP32, id="kv100-last-page16-mqa4-d32-fp32"),
    pytest.param(300, "middle", 16, "gqa4/2", 64, FP16, id="kv300-middle-page16-gqa4/2-d64-fp16"),
    pytest.param(257, "last", 1, "gqa4/2", 32, FP16, id="kv257-last-page1-gqa4/2-d32-fp16"),
    pytest.param(200, "first", 64, "mqa4", 32, FP16, id="kv200-first-page64-mqa4-d32-fp16"),
])
@pytest.mark.parametrize("splits", [3, 7], ids=split_id)
def test_single_row_small(seq_len: int, where: str, page_size: int, heads: str, head_dim: int,
                        dtype: torch.dtype, splits: int, launches: list[int],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    forced(monkeypatch, splits)
    single_row(seq_len, where, page_size, heads, head_dim, dtype)
    assert launches == [splits]


def test_single_row_bidirectional_small(launches: list[int],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    forced(monkeypatch, 3)
    single_row(150, "middle", 16, "gqa4/2", 32, FP16, causal=False)
    assert launches == [3]


def test_one_hole_per_request_small(launches: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    forced(monkeypatch, 3)
    one_hole_per_request(64, 30, 100, 16, "mqa4", 32, FP16)
    assert launches == [3]


# ----------------------------------------------------------------------------- GPU

def _dtype_id(dtype: torch.dtype) -> str:
    return {FP16: "fp16", BF16: "bf16", FP32: "fp32"}[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("heads", ["mqa8", "gqa32/8"])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=_dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128, 256], ids=lambda d: f"d{d}")
def test_single_row_8k_head_dims(head_dim: int, dtype: torch.dtype, heads: str,
                                 launches: list[int]) -> None:
    """T=1 at the last of 8192 positions, every head dim and dtype, MQA and GQA: the
    policy splits every one of them."""
    single_row(8192, "last", 16, heads, head_dim, dtype)
    assert len(launches) == 1 and launches[0] > 1, f"no split-KV: num_splits={launches}"


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 3, 7], ids=split_id)
@pytest.mark.parametrize("where", ["last", "middle"])
@pytest.mark.parametrize("seq_len", [1024, 8192, 32768], ids=lambda n: f"kv{n}")
def test_single_row_lengths(seq_len: int, where: str, splits: int | None, launches: list[int],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """T=1 over 1k-32k positions, D=128 bf16 GQA 32/8, the policy's split count and forced ones."""
    forced(monkeypatch, splits)
    single_row(seq_len, where, 16, "gqa32/8", 128, BF16)
    assert len(launches) == 1 and (launches[0] > 1 if splits is None else launches[0] == splits)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 3], ids=split_id)
@pytest.mark.parametrize("page_size", [1, 256], ids=lambda p: f"page{p}")
def test_single_row_page_sizes(page_size: int, splits: int | None, launches: list[int],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    forced(monkeypatch, splits)
    single_row(8192, "middle", page_size, "gqa32/8", 128, BF16)
    assert len(launches) == 1 and launches[0] > 1


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 7], ids=split_id)
def test_single_row_bidirectional(splits: int | None, launches: list[int],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A middle row that sees the whole prompt (causal=False)."""
    forced(monkeypatch, splits)
    single_row(8192, "middle", 16, "mqa8", 128, FP16, causal=False)
    assert len(launches) == 1 and launches[0] > 1


@pytest.mark.gpu
@pytest.mark.parametrize("heads, head_dim", [("gqa32/8", 128), ("mqa8", 64)],
                         ids=["gqa32/8-d128", "mqa8-d64"])
def test_policy_splits_single_row_8k(heads: str, head_dim: int, monkeypatch: pytest.MonkeyPatch
                                     ) -> None:
    """The policy itself (no SPANFILL_SPLITS): T=1 over 8k positions must split, so
    the tests above that rely on the policy really run the split path."""
    from spanfill.backends.triton_config import pick_config, pick_num_splits

    monkeypatch.delenv("SPANFILL_SPLITS", raising=False)
    hq, hk = HEADS[heads]
    cfg = pick_config(head_dim, BF16, hq // hk, on_gpu=True)
    layout = paged_setup([8192], [[(8191, 8192)]], 16, hq, hk, head_dim, BF16, DEVICE)[0]
    plan = layout.tile_plan(cfg.block_q, True)
    assert plan.num_tiles == 1
    max_kv_len = layout.block_table.shape[1] * layout.page_size
    splits = pick_num_splits(plan.num_tiles * (hq // cfg.heads), max_kv_len, cfg,
                             torch.device(DEVICE))
    assert splits > 1, f"T=1 over 8192 positions does not split ({cfg})"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, splits", [(BF16, None), (BF16, 3), (FP16, None)],
                         ids=["bf16-policy", "bf16-split3", "fp16-policy"])
def test_one_hole_per_request(dtype: torch.dtype, splits: int | None, launches: list[int],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """64 requests of 1000-4000 tokens, each with one hole of 1-8 tokens."""
    forced(monkeypatch, splits)
    one_hole_per_request(64, 1000, 4000, 16, "gqa32/8", 128, dtype)
    assert len(launches) == 1 and (splits is None or launches[0] == splits)


# ----------------------------------------------------------------------------- decode_step

def decode_against_transformers(prompt_lens: list[int], steps: int, page_size: int,
                                **shape: int) -> None:
    """``integrations.holes.decode_step`` (one token per request, T = B rows) follows
    transformers' own decoding, step after step, on a random fp32 Llama.

    The prompts' KV comes from a full prefill; every decode step appends one
    token per request through the kernels and must give transformers' logits.
    """
    transformers = pytest.importorskip("transformers")
    from spanfill.integrations.holes import decode_step, make_cache, prefill_cache

    torch.manual_seed(0)
    config = dict(vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    config.update(shape)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(DEVICE).eval()
    cache = make_cache(model, sum(prompt_lens) + steps * len(prompt_lens), page_size=page_size,
                       spare_pages=len(prompt_lens))
    gen = torch.Generator().manual_seed(1)
    pasts, tokens = [], []
    with torch.no_grad():
        for r, n in enumerate(prompt_lens):
            ids = torch.randint(0, config["vocab_size"], (n,), generator=gen).to(DEVICE)
            tokens.append(prefill_cache(model, ids, cache, request=r).argmax(-1))
            pasts.append(model(input_ids=ids[None], use_cache=True).past_key_values)
        token = torch.cat(tokens)
        for step in range(steps):
            ours = decode_step(model, token, cache, requests=list(range(len(prompt_lens))))
            theirs = []
            for r in range(len(prompt_lens)):
                out = model(input_ids=token[r].view(1, 1), past_key_values=pasts[r], use_cache=True)
                pasts[r] = out.past_key_values
                theirs.append(out.logits[:, -1].float())
            want = torch.cat(theirs)
            err = (ours - want).abs().max().item()
            assert err <= 1e-4, f"step {step}: logits differ by {err:.3g}"
            token = want.argmax(-1)


@pytest.mark.parametrize("prompt_lens", [[90], [40, 75, 23]], ids=["one-request", "three-requests"])
def test_decode_step_small(prompt_lens: list[int], launches: list[int],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    forced(monkeypatch, 3)
    decode_against_transformers(prompt_lens, steps=2, page_size=8)
    assert launches and set(launches) == {3}


@pytest.mark.gpu
@pytest.mark.parametrize("prompt_lens", [[4000], [3000, 4500, 17]],
                         ids=["one-request", "three-requests"])
def test_decode_step_long_prompt(prompt_lens: list[int], launches: list[int]) -> None:
    """Decode steps of 1 and 3 rows over prompts of thousands of tokens, head_dim 128:
    the policy splits every launch."""
    decode_against_transformers(prompt_lens, steps=4, page_size=16, hidden_size=512,
                                intermediate_size=768)
    assert launches and min(launches) > 1, f"num_splits of the launches: {sorted(set(launches))}"
