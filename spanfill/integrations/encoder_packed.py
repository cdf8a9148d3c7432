"""Packed encoder batches: the whole forward on the real tokens only, as CUDA graphs.

:class:`~spanfill.integrations.encoder_graphs.EncoderGraphRunner` keeps the padded
shape ``[B, S]``: attention skips the padding, but the embeddings, projections and
MLPs still run on every padded slot, and in a batch of sentences of very different
lengths most slots are padding (60% in ``scripts/bench_minilm.py``). This runner
removes the padding before the model instead, as FlashAttention's varlen users do
for BERT: the ``T`` real tokens of a batch go back to back into one row ``[1, T]``,
with each token's position inside its sentence as ``position_ids``, and every
layer's attention runs :func:`spanfill.varlen_prefill` over the sentences'
``cu_seqlens`` (a :class:`~spanfill.VarlenLayout` built inside the graph from static
buffers, no sync). The model is captured once per bucket ``(B_cap, T_cap)`` of
sentence count and token count and replayed.

The bucket's unused rows ``[T, T_cap)`` are one spare sentence at position 0 (as
``docs/captured_batches.md`` does with a spare request): they attend only to each
other, so they cannot reach a real token, and the token buckets step by at most
1/8, so the spare stays small.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..layout import VarlenLayout
from .encoder_graphs import EncoderGraphRunner, check_buckets

__all__ = ["PackedEncoderGraphRunner", "default_token_buckets"]


def default_token_buckets(largest: int = 65536, step: float = 1.125, align: int = 64) -> list[int]:
    """Token capacities from ``align`` up to at least ``largest``, each at most ``step``
    times the last (rounded up to ``align``): the spare rows of a bucket stay a small
    share of it."""
    caps, cap = [], align
    while True:
        caps.append(cap)
        if cap >= largest:
            return caps
        cap = max(cap + align, -(-int(cap * step) // align) * align)


@dataclass
class _PackedBucket:
    batch: int                         # sentence capacity B_cap
    tokens: int                        # token capacity T_cap
    input_ids: torch.Tensor            # [1, T_cap] int64
    token_type_ids: torch.Tensor       # [1, T_cap] int64
    position_ids: torch.Tensor         # [1, T_cap] int64
    cu_seqlens: torch.Tensor           # [B_cap + 2] int32: B_cap sentences, then the spare
    graph: torch.cuda.CUDAGraph | None = None
    hidden: torch.Tensor | None = None  # [1, T_cap, H], rewritten by every replay


class PackedEncoderGraphRunner(EncoderGraphRunner):
    """``model(input_ids, attention_mask).last_hidden_state`` on the real tokens only,
    replayed as CUDA graphs.

    Parameters
    ----------
    model : a transformers encoder (BERT-style: takes ``position_ids``) on CUDA, loaded
        with ``attn_implementation="spanfill"``, in eval mode
    batch_buckets : ascending sentence capacities
    token_buckets : ascending token capacities (default :func:`default_token_buckets`); a batch
        takes the smallest ``B_cap >= b`` and ``T_cap >= T`` (captured on first use)
    pad_token_id : the id of the spare rows

    Notes
    -----
    Takes right-padded batches, as :class:`EncoderGraphRunner` does, and returns fresh
    ``[b, s, H]`` hidden states with exact zeros on the padded slots.
    """

    def __init__(self, model: torch.nn.Module,
                 batch_buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
                 token_buckets: Sequence[int] | None = None, pad_token_id: int = 0):
        super().__init__(model, batch_buckets=batch_buckets, pad_token_id=pad_token_id)
        self._token_caps = check_buckets(
            "token_buckets", default_token_buckets() if token_buckets is None else token_buckets)
        self._packed: dict[tuple[int, int], _PackedBucket] = {}

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states ``[b, s, H]`` of a right-padded batch (padded slots 0).

        Parameters
        ----------
        input_ids : [b, s] int
        attention_mask : [b, s] 0/1 right-padding mask, or None (no padding)
        token_type_ids : [b, s] int or None (zeros)
        """
        b, s, valid_lens = self._checked(input_ids, attention_mask, token_type_ids)
        lens = valid_lens.numpy().astype(np.int64)
        total = int(lens.sum())
        bucket = self._bucket_for(b, total)
        # Where each real token sits in the padded batch, and its position: host numpy
        # over the (already synced) lengths, one copy each to the device.
        starts = np.concatenate([[0], np.cumsum(lens)])
        positions = np.arange(total) - np.repeat(starts[:-1], lens)
        flat = torch.from_numpy(np.repeat(np.arange(b) * s, lens) + positions).to(self.device)
        bucket.input_ids[0, :total] = input_ids.reshape(-1)[flat]
        bucket.input_ids[0, total:] = self.pad_token_id
        bucket.token_type_ids.zero_()
        if token_type_ids is not None:
            bucket.token_type_ids[0, :total] = token_type_ids.reshape(-1)[flat]
        bucket.position_ids.zero_()  # the spare rows: position 0
        bucket.position_ids[0, :total].copy_(torch.from_numpy(positions))
        # Sentences b..B_cap-1 are empty; the spare holds rows [total, T_cap).
        cu = np.concatenate([starts, np.full(bucket.batch - b, total), [bucket.tokens]])
        bucket.cu_seqlens.copy_(torch.from_numpy(cu.astype(np.int32)))
        if bucket.graph is None:
            self._capture(bucket)
        bucket.graph.replay()
        hidden = bucket.hidden
        out = hidden.new_zeros(b * s, hidden.shape[-1])
        out[flat] = hidden[0, :total]
        return out.view(b, s, -1)

    def _bucket_for(self, b: int, total: int) -> _PackedBucket:
        i = bisect.bisect_left(self._batch_caps, b)
        j = bisect.bisect_left(self._token_caps, total + 1)  # + 1: room for the spare
        if i == len(self._batch_caps) or j == len(self._token_caps):
            raise ValueError(f"a batch of {b} sentences and {total} tokens is larger than the "
                             f"largest bucket ({self._batch_caps[-1]} sentences, "
                             f"{self._token_caps[-1] - 1} tokens)")
        key = (self._batch_caps[i], self._token_caps[j])
        if key not in self._packed:
            row = lambda: torch.zeros(1, key[1], dtype=torch.long, device=self.device)  # noqa: E731
            self._packed[key] = _PackedBucket(
                *key, row(), row(), row(),
                torch.zeros(key[0] + 2, dtype=torch.int32, device=self.device))
        return self._packed[key]

    def _step(self, bucket: _PackedBucket) -> torch.Tensor:
        layout = VarlenLayout.build(bucket.cu_seqlens, bucket.tokens, validate=False)
        return self._forward(layout, bucket.input_ids, bucket.token_type_ids,
                             position_ids=bucket.position_ids)
