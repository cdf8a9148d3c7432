"""CUDA graphs for hole filling and decoding: the whole model step replayed per batch.

:func:`spanfill.integrations.holes.fill_holes` runs transformers' eager forward: per
layer a dozen small launches plus spanfill's host work, so a few hundred hole tokens
are host-bound. :class:`HoleGraphRunner` captures the step (embeddings, every layer's
projections, RoPE, ``append_kv``, ``span_prefill``, MLP, norm and ``lm_head``) once
per token bucket and replays it with the new batch's metadata copied into static
buffers. Layout and tile plan are built inside the graph from those buffers
(``SpanLayout.from_tensors(..., validate=False)`` plans on the device without a sync),
so each replay plans its own batch.

Unused rows follow docs/captured_batches.md: they belong to a spare request with
``seq_lens`` 0 (slot -1: they write no K/V and read nothing). The runner therefore
keeps one request slot spare: a bucket holds up to ``max_requests`` real requests.
The metadata is checked on the host (the same checks as :meth:`SpanLayout.build`)
before anything is copied or replayed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import torch

from ..cache import PagedKVCache
from ..layout import SpanLayout
from ..layout.validation import check_spans
from .holes import Spans, _run, hole_batch, hole_tokens

__all__ = ["DEFAULT_BUCKETS", "HoleGraphRunner"]

# Token capacities: steps of at most 1.5x, so a batch runs at most 1.5x its rows (the
# padding rows go through the projections and MLP too: on the H200 the demo's 320 rows
# padded to 512 took 6.3 ms of GPU time against 4.3 ms eager). Each bucket used holds
# one graph and its activations.
DEFAULT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072,
                   4096)


@dataclass
class _Bucket:
    """One captured step: ``capacity`` token rows in ``max_requests + 1`` request slots."""

    capacity: int
    token_ids: torch.Tensor        # [capacity] int64
    positions: torch.Tensor        # [capacity] int64
    query_start_loc: torch.Tensor  # [R + 1] int32 (R = max_requests + 1 slots)
    seq_lens: torch.Tensor         # [R] int32
    block_table: torch.Tensor      # [R, W] int32
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [R, V] fp32, rewritten by every replay


class HoleGraphRunner:
    """``fill_holes`` and ``decode_step`` of one model and cache, as replayed CUDA graphs.

    Parameters
    ----------
    model : LlamaForCausalLM / Qwen2ForCausalLM on CUDA, as for ``fill_holes``
    cache : the model's :class:`~spanfill.PagedKVCache` (CUDA)
    max_seq_len : the longest prompt (plus decoded tokens) a request may reach; sizes
        the static block table (``ceil(max_seq_len / page_size)`` pages per request)
    max_requests : requests per call (one more slot is kept spare for padding rows)
    buckets : token capacities to capture, ascending; a call takes the smallest that
        holds its rows (a graph is captured on a bucket's first use)

    Notes
    -----
    Outputs of :meth:`fill_holes` / :meth:`decode_step` are fresh tensors (copies of the
    graph's static logits). The model's weights and the cache's pools must stay where
    they were at capture (same tensors, updated in place).
    """

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, max_seq_len: int,
                 max_requests: int = 8, buckets: Sequence[int] = DEFAULT_BUCKETS):
        if cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA cache, got {cache.device}")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        if isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1:
            raise ValueError(f"max_requests must be a positive int, got {max_requests!r}")
        caps = list(buckets)
        if not caps or any(not isinstance(c, int) or c < 1 for c in caps) or caps != sorted(set(caps)):
            raise ValueError(f"buckets must be ascending positive ints, got {buckets!r}")
        self.model, self.cache = model, cache
        self.max_requests = max_requests
        self.width = -(-max_seq_len // cache.page_size)
        self.max_seq_len = max_seq_len
        self._caps = caps
        self._buckets: dict[int, _Bucket] = {}

    # ------------------------------------------------------------------ public steps

    def fill_holes(self, input_ids: torch.Tensor | Sequence[torch.Tensor],
                   spans: Spans | Sequence[Spans], requests: Sequence[Hashable] = (0,)
                   ) -> torch.Tensor:
        """:func:`spanfill.integrations.holes.fill_holes`, replayed; [B, V] fp32 logits."""
        prompts, per_request, seq_lens = hole_batch(input_ids, self.cache, spans, requests)
        starts, stops, span_req = self._check(per_request, seq_lens, requests)
        self._bucket(int((stops - starts).sum()))
        tokens, positions, counts = hole_tokens(prompts, starts, stops, span_req)
        return self._replay(tokens, positions, counts, seq_lens, requests)

    def decode_step(self, token_ids: torch.Tensor, requests: Sequence[Hashable] = (0,)
                    ) -> torch.Tensor:
        """:func:`spanfill.integrations.holes.decode_step`, replayed; [B, V] fp32 logits."""
        tokens = token_ids.reshape(-1)
        if tokens.shape[0] != len(requests):
            raise ValueError(f"got {tokens.shape[0]} tokens for {len(requests)} requests")
        seq_lens = [self.cache.seq_len(r) + 1 for r in requests]
        if max(seq_lens, default=0) > self.max_seq_len:
            raise ValueError(f"a request would reach {max(seq_lens)} tokens, past "
                             f"max_seq_len={self.max_seq_len}")
        self._check_requests(requests)
        self._bucket(len(requests))  # a batch no bucket holds fails before the cache grows
        for req, n in zip(requests, seq_lens):
            self.cache.grow(req, n)
        return self._replay(tokens, np.asarray(seq_lens, dtype=np.int64) - 1,
                            np.ones(len(requests), dtype=np.int64), seq_lens, requests)

    # ------------------------------------------------------------------ internals

    def _check_requests(self, requests: Sequence[Hashable]) -> None:
        if not 1 <= len(requests) <= self.max_requests:
            raise ValueError(f"{len(requests)} requests, but the runner holds 1 to "
                             f"max_requests={self.max_requests}")
        if len(set(requests)) != len(requests):
            raise ValueError(f"requests must be distinct, got {list(requests)}")

    def _check(self, per_request: list[list[tuple[int, int]]], seq_lens: list[int],
               requests: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host checks of the batch (as SpanLayout.build's); every span's bounds and request,
        as ``[num_spans]`` int64 arrays."""
        self._check_requests(requests)
        if max(seq_lens) > self.max_seq_len:
            raise ValueError(f"a prompt has {max(seq_lens)} tokens, past "
                             f"max_seq_len={self.max_seq_len}")
        # (the block table is the cache's own, checked by it: only its type is looked at)
        _, starts, stops, counts = check_spans(per_request, seq_lens,
                                               torch.empty(0, dtype=torch.int32))
        span_req = np.repeat(np.arange(len(counts)), counts)
        return (np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64), span_req)

    def _bucket(self, rows: int) -> _Bucket:
        i = bisect.bisect_left(self._caps, rows)
        if i == len(self._caps):
            raise ValueError(f"{rows} token rows, more than the largest bucket {self._caps[-1]}")
        cap = self._caps[i]
        if cap not in self._buckets:
            dev, slots = self.cache.device, self.max_requests + 1
            self._buckets[cap] = _Bucket(
                cap, torch.zeros(cap, dtype=torch.long, device=dev),
                torch.zeros(cap, dtype=torch.long, device=dev),
                torch.zeros(slots + 1, dtype=torch.int32, device=dev),
                torch.zeros(slots, dtype=torch.int32, device=dev),
                torch.full((slots, self.width), -1, dtype=torch.int32, device=dev))
        return self._buckets[cap]

    def _fill(self, bucket: _Bucket, tokens: torch.Tensor, positions: np.ndarray,
              counts: np.ndarray, seq_lens: list[int], requests: Sequence[Hashable]) -> None:
        """Copy one batch into the bucket's static buffers, padding as the convention says.

        ``positions``: [rows] int64, the rows' positions; ``counts``: [B] rows per request.
        """
        rows, slots = len(positions), self.max_requests + 1
        num = len(requests)
        qsl = np.full(slots + 1, bucket.capacity, dtype=np.int32)  # the spare request: the rest
        qsl[0] = 0
        qsl[1:num + 1] = np.cumsum(counts)
        table = torch.full((slots, self.width), -1, dtype=torch.int32)
        for b, req in enumerate(requests):
            pages = self.cache.pages(req)[:self.width]  # pages past max_seq_len: never read
            table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        host = np.zeros(bucket.capacity, dtype=np.int64)
        host[:rows] = positions
        bucket.positions.copy_(torch.from_numpy(host), non_blocking=True)
        bucket.query_start_loc.copy_(torch.from_numpy(qsl), non_blocking=True)
        bucket.seq_lens.copy_(torch.tensor(seq_lens + [0] * (slots - num), dtype=torch.int32),
                              non_blocking=True)
        bucket.block_table.copy_(table, non_blocking=True)
        bucket.token_ids[:rows].copy_(tokens.to(bucket.token_ids.device, torch.long))
        bucket.token_ids[rows:].zero_()

    def _step(self, bucket: _Bucket) -> torch.Tensor:
        layout = SpanLayout.from_tensors(bucket.positions, bucket.query_start_loc,
                                         bucket.seq_lens, bucket.block_table,
                                         self.cache.page_size, validate=False)
        return _run(self.model, self.cache, (), bucket.token_ids, layout)

    def _replay(self, tokens: torch.Tensor, positions: np.ndarray, counts: np.ndarray,
                seq_lens: list[int], requests: Sequence[Hashable]) -> torch.Tensor:
        bucket = self._bucket(len(positions))
        self._fill(bucket, tokens, positions, counts, seq_lens, requests)
        if bucket.graph is None:
            self._capture(bucket)
        bucket.graph.replay()
        return bucket.logits[:len(requests)].clone()

    @torch.no_grad()
    def _capture(self, bucket: _Bucket) -> None:
        """Warm up on a side stream (Triton compiles, the allocator settles), then capture.

        The warm-up runs the step for real on the batch just filled in: it writes the
        hole tokens' K/V, which the replay that follows writes again, identically.
        """
        side = torch.cuda.Stream(self.cache.device)
        side.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(bucket)
        torch.cuda.current_stream(self.cache.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            bucket.logits = self._step(bucket)
        bucket.graph = graph
