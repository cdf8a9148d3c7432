"""HoleGraphRunner: fill_holes and decode_step replayed as CUDA graphs equal the eager steps.

Tiny random Llama/Qwen2 models in fp32: two caches prefilled alike, one filled by the
eager step and one by the runner; logits, greedy tokens and the written K/V must
agree, over several batches replayed through the same captured bucket (new metadata
each time) and a second bucket. On a GPU the step is captured and replayed; on a CPU
it runs eagerly in place of the replay (the bucketing, padding, static buffers and
host checks are the same code).
"""

from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from spanfill.demo import poison_holes  # noqa: E402
from spanfill.integrations.holes import (  # noqa: E402
    decode_step, fill_holes, make_cache, prefill_cache,
)
from spanfill.integrations.holes_graphs import HoleGraphRunner  # noqa: E402

from tests.conftest import tensor_digest  # noqa: E402
from tests.helpers import EagerReplay  # noqa: E402
from tests.test_integrations_holes import _kv_rows, random_spans, tiny_model  # noqa: E402

LENS = (160, 97, 130)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _EagerReplay(HoleGraphRunner):
    """The runner with its graph replaced by running the captured step eagerly (CPU)."""

    def __init__(self, model, cache, max_seq_len, max_requests=8, buckets=(16, 64)):
        self.model, self.cache = model, cache
        self.max_requests, self.max_seq_len = max_requests, max_seq_len
        self.width = -(-max_seq_len // cache.page_size)
        self._caps, self._buckets = list(buckets), {}

    def _capture(self, bucket):
        bucket.graph = EagerReplay(self._step, bucket, "logits")


def _runner(model, cache, **kw) -> HoleGraphRunner:
    return HoleGraphRunner(model, cache, **kw) if DEVICE == "cuda" else \
        _EagerReplay(model, cache, **kw)


def test_runner_refuses_a_cpu_cache() -> None:
    if DEVICE == "cuda":
        pytest.skip("the CPU refusal")
    model = tiny_model("llama")
    cache = make_cache(model, 64, page_size=16)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA cache"):
        HoleGraphRunner(model, cache, max_seq_len=64)


def _setup(arch: str):
    model = tiny_model(arch).to(DEVICE)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).to(DEVICE) for n in LENS]
    caches = []
    for _ in range(2):  # one for the eager step, one for the runner
        cache = make_cache(model, sum(LENS) + 64, page_size=16)
        for r, ids in enumerate(prompts):
            prefill_cache(model, ids, cache, request=r)
        caches.append(cache)
    return model, prompts, caches


def _assert_same_fill(model, prompts, eager_cache, graph_cache, runner, spans, requests):
    for r in requests:
        for cache in (eager_cache, graph_cache):
            poison_holes(cache, r, spans[r])
    ids = [prompts[r] for r in requests]
    want = fill_holes(model, ids, eager_cache, [spans[r] for r in requests], requests)
    got = runner.fill_holes(ids, [spans[r] for r in requests], requests)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for r in requests:
        for layer in range(2):
            for g, w in zip(_kv_rows(graph_cache, layer, r, LENS[r]),
                            _kv_rows(eager_cache, layer, r, LENS[r])):
                assert not g.isnan().any(), "a hole was not written"
                assert (g - w).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fill_holes_graph_equals_eager(arch: str) -> None:
    model, prompts, (eager_cache, graph_cache) = _setup(arch)
    runner = _runner(model, graph_cache, max_seq_len=256, max_requests=3, buckets=(32, 128))
    rng = random.Random(1)
    # Batches of different sizes and request sets through the same two buckets.
    batches = [
        ({0: [(3, 9), (70, 80)], 1: [(50, 51)]}, [0, 1]),                 # 19 rows: bucket 32
        ({2: [(0, 4), (100, 130)]}, [2]),                                  # 34 rows: bucket 128
        ({1: [(0, 20)], 0: [(150, 160)], 2: [(5, 6)]}, [1, 0, 2]),         # 33 rows: bucket 128
        ({r: random_spans(LENS[r], 6, rng, max_len=4) for r in range(3)}, [0, 1, 2]),
        ({0: []}, [0]),                                                    # only the last token
    ]
    for spans, requests in batches:
        _assert_same_fill(model, prompts, eager_cache, graph_cache, runner, spans, requests)
    assert sorted(runner._buckets) == [32, 128]  # captured once each, then replayed


def test_decode_step_graph_equals_eager() -> None:
    model, prompts, (eager_cache, graph_cache) = _setup("llama")
    runner = _runner(model, graph_cache, max_seq_len=256, max_requests=3, buckets=(4,))
    requests = [0, 2]
    tokens_e = torch.tensor([prompts[r][-1] for r in requests], device=DEVICE)
    tokens_g = tokens_e.clone()
    for _ in range(6):
        logits_e = decode_step(model, tokens_e, eager_cache, requests)
        logits_g = runner.decode_step(tokens_g, requests)
        assert (logits_g - logits_e).abs().max().item() <= 1e-4
        tokens_e, tokens_g = logits_e.argmax(-1), logits_g.argmax(-1)
        assert torch.equal(tokens_e, tokens_g)
    assert [graph_cache.seq_len(r) for r in requests] == [LENS[0] + 6, LENS[2] + 6]
    # One request only, through the same captured graph (a spare slot more).
    logits_e = decode_step(model, tokens_e[:1], eager_cache, [0])
    logits_g = runner.decode_step(tokens_g[:1], [0])
    assert (logits_g - logits_e).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["too-many-requests", "too-many-rows", "span-outside",
                                  "unsorted-spans", "past-max-seq-len", "duplicate-request"])
def test_bad_batches_are_refused_before_anything_changes(case: str) -> None:
    model, prompts, (_, cache) = _setup("llama")
    runner = _runner(model, cache, max_seq_len=160, max_requests=2, buckets=(16,))
    before = tensor_digest(cache.k_cache, cache.v_cache)
    lens = [cache.seq_len(r) for r in range(3)]
    with pytest.raises(ValueError):
        if case == "too-many-requests":
            runner.fill_holes(prompts, [[(0, 1)]] * 3, [0, 1, 2])
        elif case == "too-many-rows":
            runner.fill_holes([prompts[0]], [[(0, 40)]], [0])
        elif case == "span-outside":
            runner.fill_holes([prompts[1]], [[(90, 120)]], [1])
        elif case == "unsorted-spans":
            runner.fill_holes([prompts[0]], [[(10, 12), (3, 5)]], [0])
        elif case == "past-max-seq-len":
            runner.decode_step(torch.tensor([1], device=DEVICE), [0])  # 160 -> 161
        else:
            runner.decode_step(torch.tensor([1, 2], device=DEVICE), [1, 1])
    assert tensor_digest(cache.k_cache, cache.v_cache) == before
    assert [cache.seq_len(r) for r in range(3)] == lens
