"""EncoderGraphRunner: a transformers encoder's forward replayed per padded shape.

A tiny random BERT with ``attn_implementation="spanfill"``: the runner's hidden states
on the real tokens equal the eager model's, for batches of different sizes through the
same bucket and through several buckets. On a CPU the step runs eagerly in place of
the replay (the padding, the static valid lengths and the layout the layers share are
the same code); on a GPU it is captured and replayed.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import spanfill.integrations.transformers  # noqa: E402,F401  (registers "spanfill")
from spanfill.integrations import encoder_graphs  # noqa: E402
from spanfill.integrations.encoder_graphs import EncoderGraphRunner  # noqa: E402

from tests.helpers import EagerReplay  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_bert(attn: str = "spanfill") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128,
                                     max_position_embeddings=128)
    config._attn_implementation = attn
    return transformers.BertModel(config, add_pooling_layer=False).eval().to(DEVICE)


class _EagerReplay(EncoderGraphRunner):
    """The runner with its graph replaced by running the captured step eagerly."""

    def __init__(self, model, **kw):
        self.model, self.device = model, next(model.parameters()).device
        self._batch_caps = list(kw.get("batch_buckets", (2, 4, 8)))
        self._seq_caps = list(kw.get("seq_buckets", (16, 32, 64)))
        self.pad_token_id = 0
        self._segments = True
        self._max_positions = model.config.max_position_embeddings
        self._buckets = {}

    def _capture(self, bucket):
        bucket.graph = EagerReplay(self._step, bucket, "hidden")


def _batch(lens: list[int], s: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 300, (len(lens), s), generator=gen)
    mask = (torch.arange(s)[None, :] < torch.tensor(lens)[:, None]).long()
    return ids.to(DEVICE), mask.to(DEVICE)


def _check(runner, model, lens, s, seed):
    ids, mask = _batch(lens, s, seed)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = runner(ids, mask)
    assert got.shape == want.shape
    for b, n in enumerate(lens):  # real tokens only: padded rows are the model's business
        assert (got[b, :n] - want[b, :n]).abs().max().item() <= 1e-4, (lens, b)


BATCHES = [([5, 12, 3], 12, 0), ([16], 16, 1), ([7, 7], 9, 2), ([30, 1, 17, 2, 9], 30, 3),
           ([4], 4, 4)]


def test_buckets_equal_the_eager_model_without_graphs() -> None:
    model = tiny_bert()
    runner = _EagerReplay(model)
    for lens, s, seed in BATCHES:
        _check(runner, model, lens, s, seed)
    assert sorted(runner._buckets) == [(2, 16), (4, 16), (8, 32)]


def test_bad_batches_are_refused() -> None:
    runner = _EagerReplay(tiny_bert())
    ids, mask = _batch([5, 3], 8, 0)
    left = mask.clone()
    left[1] = mask[1].flip(0)  # sample 1 padded on the left
    with pytest.raises(ValueError, match=r"attention_mask\[1\] is not right padding"):
        runner(ids, left)
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        runner(*_batch([5] * 9, 8, 0))
    with pytest.raises(ValueError, match="must be a \\[b, s\\]"):
        runner(ids, mask[:, :4])


def test_runner_needs_a_cuda_spanfill_model() -> None:
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
            EncoderGraphRunner(tiny_bert())
    else:
        with pytest.raises(ValueError, match='attn_implementation="spanfill"'):
            EncoderGraphRunner(tiny_bert("sdpa"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_graph_replays_equal_the_eager_model(dtype: torch.dtype) -> None:
    model = tiny_bert().to(dtype)
    runner = EncoderGraphRunner(model, batch_buckets=(2, 4, 8), seq_buckets=(16, 32))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for lens, s, seed in BATCHES:
        ids, mask = _batch(lens, s, seed)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = runner(ids, mask)
        for b, n in enumerate(lens):
            assert (got[b, :n] - want[b, :n]).abs().max().item() <= tol
    assert all(b.graph is not None for b in runner._buckets.values())
    assert encoder_graphs  # the module under test
