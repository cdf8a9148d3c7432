"""PackedEncoderGraphRunner: a transformers encoder on the real tokens only, as CUDA graphs.

The tiny random BERT of test_encoder_graphs with ``attn_implementation="spanfill"``:
the runner's hidden states on the real tokens equal the eager padded model's, and the
padded slots are 0, for batches through the same bucket and through several. On a CPU
the step runs eagerly in place of the replay (packing, positions, the spare sentence
and the layout the layers share are the same code); on a GPU it is captured.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from spanfill.integrations.encoder_graphs import check_buckets  # noqa: E402
from spanfill.integrations.encoder_packed import (  # noqa: E402
    PackedEncoderGraphRunner, default_token_buckets,
)

from tests.helpers import EagerReplay  # noqa: E402
from tests.test_encoder_graphs import BATCHES, DEVICE, _batch, tiny_bert  # noqa: E402


class _EagerReplay(PackedEncoderGraphRunner):
    """The runner with its graph replaced by running the captured step eagerly."""

    def __init__(self, model, batch_buckets=(2, 4, 8), token_buckets=(16, 32, 64, 128)):
        self.model, self.device = model, next(model.parameters()).device
        self._batch_caps, self._token_caps = list(batch_buckets), list(token_buckets)
        self.pad_token_id, self._segments = 0, True
        self._max_positions = model.config.max_position_embeddings
        self._packed = {}

    def _capture(self, bucket):
        bucket.graph = EagerReplay(self._step, bucket, "hidden")


def _check(runner, model, lens, s, seed, tol=1e-4, segments=False):
    ids, mask = _batch(lens, s, seed)
    types = (torch.arange(s, device=DEVICE)[None, :] % 2).expand_as(ids) if segments else None
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    got = runner(ids, mask, types)
    assert got.shape == want.shape
    for b, n in enumerate(lens):
        assert (got[b, :n] - want[b, :n]).abs().max().item() <= tol, (lens, b)
        assert (got[b, n:] == 0).all()


def test_packed_batches_equal_the_padded_eager_model() -> None:
    model = tiny_bert()
    runner = _EagerReplay(model)
    for lens, s, seed in BATCHES:
        _check(runner, model, lens, s, seed)
    _check(runner, model, [3, 11], 11, 5, segments=True)
    # totals 20, 16, 14, 59, 4, 14 (+1 for the spare) over sentence counts 3, 1, 2, 5, 1, 2
    assert sorted(runner._packed) == [(2, 16), (2, 32), (4, 32), (8, 64)]


def test_a_bucket_replays_other_batches_of_its_size() -> None:
    """The spare sentence and the empty sentence slots change from call to call."""
    model = tiny_bert()
    runner = _EagerReplay(model, batch_buckets=(8,), token_buckets=(64,))
    for lens, s, seed in [([30, 1, 17, 2, 9], 30, 3), ([1], 1, 4), ([20, 20, 20], 20, 5)]:
        _check(runner, model, lens, s, seed)
    assert list(runner._packed) == [(8, 64)]


def test_bad_batches_are_refused() -> None:
    runner = _EagerReplay(tiny_bert())
    ids, mask = _batch([5, 3], 8, 0)
    with pytest.raises(ValueError, match=r"attention_mask\[0\] is not right padding"):
        runner(ids, mask.flip(1))
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        runner(*_batch([60, 60, 60], 60, 0))  # 180 tokens > 127
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        runner(*_batch([5], 129, 0))
    with pytest.raises(ValueError, match="must be a \\[b, s\\]"):
        runner(ids[0], mask[0])


def test_default_token_buckets_step_by_at_most_an_eighth() -> None:
    caps = default_token_buckets()
    assert caps[0] == 64 and caps[-1] >= 65536 and all(c % 64 == 0 for c in caps)
    assert all(a < b <= max(a + 64, 1.125 * a + 64) for a, b in zip(caps, caps[1:]))
    for bad in [(64, 32), (), (0, 64), (64, 64), (64.0,)]:
        with pytest.raises(ValueError, match="token_buckets must be ascending positive ints"):
            check_buckets("token_buckets", bad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_graph_replays_equal_the_padded_eager_model(dtype: torch.dtype) -> None:
    model = tiny_bert().to(dtype)
    runner = PackedEncoderGraphRunner(model, batch_buckets=(2, 4, 8),
                                      token_buckets=(16, 32, 64, 128))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for lens, s, seed in BATCHES:
        _check(runner, model, lens, s, seed, tol)
    assert all(b.graph is not None for b in runner._packed.values())
