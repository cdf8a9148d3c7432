"""CUDA graphs for encoder batches: a transformers model's forward replayed per padded shape.

An embedding server runs many small batches through a small model (all-MiniLM-L6-v2:
six layers), where transformers' eager Python and the per-layer launches cost more
than the GPU work. :class:`EncoderGraphRunner` captures ``model(input_ids)`` once per
bucket of padded shape ``[B_cap, S_cap]`` and replays it: a batch ``[b, s]`` is
copied into the bucket's static buffers, padded on the right (more padding tokens per
sample, and samples of length 0), and its valid lengths go in a static ``[B_cap]``
tensor that every layer's ``padded_prefill`` reads through one :class:`PaddedLayout`
built inside the graph (``validate=False``: no sync). The attention mask is checked
on the host before anything is copied; the model sees none (padded keys are the
layout's business), so transformers builds no mask inside the graph.

Right padding only (BERT-style tokenizers): the real tokens keep their positions.
"""

from __future__ import annotations

import bisect
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch

from ..layout import PaddedLayout, VarlenLayout
from . import transformers as _spanfill_attention

__all__ = ["EncoderGraphRunner", "check_buckets"]


def check_buckets(name: str, caps: Sequence[int]) -> list[int]:
    """``caps`` as a list, if they are ascending positive ints (else ValueError)."""
    caps = list(caps)
    if not caps or any(not isinstance(c, int) or c < 1 for c in caps) \
            or caps != sorted(set(caps)):
        raise ValueError(f"{name} must be ascending positive ints, got {caps!r}")
    return caps


@dataclass
class _Bucket:
    batch: int
    seq_len: int
    input_ids: torch.Tensor            # [B_cap, S_cap] int64
    token_type_ids: torch.Tensor       # [B_cap, S_cap] int64
    valid_lens: torch.Tensor           # [B_cap] int32
    graph: torch.cuda.CUDAGraph | None = None
    hidden: torch.Tensor | None = None  # [B_cap, S_cap, H], rewritten by every replay


class EncoderGraphRunner:
    """``model(input_ids, attention_mask).last_hidden_state``, replayed as CUDA graphs.

    Parameters
    ----------
    model : a transformers encoder on CUDA loaded with ``attn_implementation="spanfill"``
        (``import spanfill.integrations.transformers`` registers it), in eval mode
    batch_buckets, seq_buckets : ascending capacities; a batch ``[b, s]`` takes the
        smallest ``B_cap >= b`` and ``S_cap >= s`` (a graph is captured on first use)
    pad_token_id : the id written into padding positions (never attended)

    Notes
    -----
    Returns fresh tensors ``[b, s, H]`` (padded rows exactly 0 after attention, then
    whatever the layers after it make of them, as in the eager model).
    """

    def __init__(self, model: torch.nn.Module,
                 batch_buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
                 seq_buckets: Sequence[int] = (16, 32, 64, 96, 128, 192, 256, 384, 512),
                 pad_token_id: int = 0):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, got {device}")
        if getattr(model.config, "_attn_implementation", None) != _spanfill_attention.NAME:
            raise ValueError(f'the model must be loaded with attn_implementation='
                             f'"{_spanfill_attention.NAME}", got '
                             f'{getattr(model.config, "_attn_implementation", None)!r}')
        self.model, self.device = model, device
        self._batch_caps = check_buckets("batch_buckets", batch_buckets)
        self._seq_caps = check_buckets("seq_buckets", seq_buckets)
        self.pad_token_id = pad_token_id
        # BERT-style models take segment ids (zeros for one segment); others have none.
        self._segments = "token_type_ids" in inspect.signature(model.forward).parameters
        self._max_positions = getattr(model.config, "max_position_embeddings", None)
        self._buckets: dict[tuple[int, int], _Bucket] = {}

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states ``[b, s, H]`` of a right-padded batch.

        Parameters
        ----------
        input_ids : [b, s] int
        attention_mask : [b, s] 0/1 right-padding mask, or None (no padding)
        token_type_ids : [b, s] int or None (zeros)
        """
        b, s, valid_lens = self._checked(input_ids, attention_mask, token_type_ids)
        bucket = self._bucket(b, s)
        bucket.input_ids.fill_(self.pad_token_id)
        bucket.input_ids[:b, :s].copy_(input_ids)
        bucket.token_type_ids.zero_()
        if token_type_ids is not None:
            bucket.token_type_ids[:b, :s].copy_(token_type_ids)
        bucket.valid_lens.zero_()
        bucket.valid_lens[:b].copy_(valid_lens, non_blocking=True)
        if bucket.graph is None:
            self._capture(bucket)
        bucket.graph.replay()
        return bucket.hidden[:b, :s].clone()

    def _checked(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 token_type_ids: torch.Tensor | None) -> tuple[int, int, torch.Tensor]:
        """``(b, s, valid_lens)`` of a call, every argument checked before any buffer is
        written (``valid_lens``: [b] int32 on the host)."""
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [b, s] tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        b, s = input_ids.shape
        if self._max_positions is not None and s > self._max_positions:
            raise ValueError(f"input_ids has {s} positions, more than the model's "
                             f"max_position_embeddings={self._max_positions}")
        if token_type_ids is not None and not self._segments:
            raise ValueError("token_type_ids given, but the model takes none")
        return b, s, self._valid_lens(attention_mask, b, s)

    def _valid_lens(self, mask: torch.Tensor | None, b: int, s: int) -> torch.Tensor:
        """[b] int32 on the host, from a right-padding mask (checked: one host sync)."""
        if mask is None:
            return torch.full((b,), s, dtype=torch.int32)
        if not torch.is_tensor(mask) or tuple(mask.shape) != (b, s):
            raise ValueError(f"attention_mask must be a [b, s] = {(b, s)} tensor, got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        keep = mask.detach().to("cpu", torch.bool)
        lens = keep.sum(dim=1)
        right = keep == (torch.arange(s)[None, :] < lens[:, None])
        if not bool(right.all()):
            i = int(torch.nonzero(~right.all(dim=1))[0, 0])
            raise ValueError(f"attention_mask[{i}] is not right padding (one run of kept "
                             f"tokens from the start); the graph runner takes right-padded "
                             f"batches only")
        return lens.to(torch.int32)

    def _bucket(self, b: int, s: int) -> _Bucket:
        i, j = bisect.bisect_left(self._batch_caps, b), bisect.bisect_left(self._seq_caps, s)
        if i == len(self._batch_caps) or j == len(self._seq_caps):
            raise ValueError(f"a [{b}, {s}] batch is larger than the largest bucket "
                             f"[{self._batch_caps[-1]}, {self._seq_caps[-1]}]")
        key = (self._batch_caps[i], self._seq_caps[j])
        if key not in self._buckets:
            shape = key
            self._buckets[key] = _Bucket(
                *key, torch.zeros(shape, dtype=torch.long, device=self.device),
                torch.zeros(shape, dtype=torch.long, device=self.device),
                torch.zeros(key[0], dtype=torch.int32, device=self.device))
        return self._buckets[key]

    def _step(self, bucket: _Bucket) -> torch.Tensor:
        layout = PaddedLayout.build(bucket.valid_lens, bucket.seq_len, "right", validate=False)
        return self._forward(layout, bucket.input_ids, bucket.token_type_ids)

    def _forward(self, layout: PaddedLayout | VarlenLayout, input_ids: torch.Tensor,
                 token_type_ids: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """The model's last hidden state ``[rows, s, H]``, its attention layers planned
        by ``layout`` (set for the call, not a mask). ``input_ids``, ``token_type_ids``:
        [rows, s] int64 (segment ids go only to a model that takes them); ``inputs``:
        more model arguments (``position_ids``)."""
        token = _spanfill_attention.CAPTURED_LAYOUT.set(layout)
        try:
            segments = {"token_type_ids": token_type_ids} if self._segments else {}
            out = self.model(input_ids=input_ids, attention_mask=None, **inputs, **segments)
        finally:
            _spanfill_attention.CAPTURED_LAYOUT.reset(token)
        return out.last_hidden_state

    def _capture(self, bucket: _Bucket) -> None:
        """Warm up on a side stream (Triton compiles, the allocator settles), then capture."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            bucket.hidden = self._step(bucket)
        bucket.graph = graph
