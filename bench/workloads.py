"""Seeded workloads: exactly those of shared/BENCHMARKS.md, a sweep, and tiny CPU versions.

A workload is a plain description (spans, lengths, shapes, seed); :meth:`make`
turns it into tensors on a device. The same seed gives the same spans and the same
tensors, so every provider sees identical inputs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

import spanfill as sf
from spanfill import reference

__all__ = [
    "SegmentedWorkload",
    "PaddedWorkload",
    "SegmentedTensors",
    "PaddedTensors",
    "Workload",
    "uniform_spans",
    "scatter_spans",
    "core_workloads",
    "sweep_workloads",
]

Spans = list[list[tuple[int, int]]]


# ----------------------------------------------------------------------------- span placement

def uniform_spans(rng: np.random.Generator, seq_len: int, num_spans: int,
                  span_len: int) -> list[tuple[int, int]]:
    """One span of ``span_len`` tokens at a random offset inside each of ``num_spans``
    equal slots of ``[0, seq_len)``."""
    slot = seq_len // num_spans
    if span_len > slot:
        raise ValueError(f"{num_spans} spans of {span_len} tokens do not fit in {seq_len} tokens")
    offsets = rng.integers(0, slot - span_len + 1, size=num_spans)
    return [(i * slot + int(o), i * slot + int(o) + span_len) for i, o in enumerate(offsets)]


def scatter_spans(rng: np.random.Generator, seq_len: int, fraction: float = 0.15,
                  max_len: int = 8) -> list[tuple[int, int]]:
    """Spans of uniform length ``1..max_len`` separated by exponential gaps, so that
    about ``fraction`` of the tokens are in spans.

    A gap is ``1 + floor(Exp(mean_gap - 0.5))`` (mean ``mean_gap``, never 0, so two
    spans never touch), with ``mean_gap = mean_len * (1 - fraction) / fraction``.
    """
    mean_len = (1 + max_len) / 2
    mean_gap = mean_len * (1 - fraction) / fraction
    spans: list[tuple[int, int]] = []
    pos = 0
    while True:
        start = pos + 1 + int(rng.exponential(mean_gap - 0.5))
        stop = start + int(rng.integers(1, max_len + 1))
        if stop > seq_len:
            return spans
        spans.append((start, stop))
        pos = stop


# ----------------------------------------------------------------------------- tensors

@dataclass
class SegmentedTensors:
    """Inputs of one segmented-prefill workload on a device.

    Attributes
    ----------
    q : [T, Hq, D], the span tokens request by request in position order
    k_new, v_new : [T, Hk, D], their new K/V (already written into the cache)
    k_cache, v_cache : [num_pages, page_size, Hk, D], every position of every request
        filled (cached tokens random, span tokens = k_new/v_new); page ids shuffled
    block_table : [B, max_pages] int32
    seq_lens : [B] int32
    layout : :class:`spanfill.SpanLayout`, validated and built once
    """

    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    layout: sf.SpanLayout
    _dense: dict = field(default_factory=dict, repr=False)

    def dense_kv(self, request: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Request ``request``'s K and V gathered from pages once: each [seq_len, Hk, D]."""
        if request not in self._dense:
            seq_len = int(self.seq_lens[request])
            self._dense[request] = (
                reference.gather_kv(self.k_cache, self.block_table, seq_len, request).contiguous(),
                reference.gather_kv(self.v_cache, self.block_table, seq_len, request).contiguous(),
            )
        return self._dense[request]


@dataclass
class PaddedTensors:
    """Inputs of one padded workload: q, k, v [B, S, H, D] right-padded, valid_lens [B]
    int32. Padded positions hold random values, as a real padded batch would."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    valid_lens: torch.Tensor


def _randn(shape: tuple[int, ...], gen: torch.Generator, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


# ----------------------------------------------------------------------------- workloads

@dataclass(frozen=True)
class SegmentedWorkload:
    """Prompts whose KV is cached except for ``spans``; the span tokens are recomputed.

    Attributes
    ----------
    name : table name (``few_big`` ...) or ``sweep:<axis>``
    spans : per request, sorted disjoint half-open ``(start, stop)`` pairs
    seq_lens : prompt length of each request
    num_q_heads, num_kv_heads, head_dim, page_size : shapes
    seed : seeds the tensors and the page shuffle
    x : the swept value (None for the core suite)
    window_left : sliding window (FlashInfer's convention): a row at ``pos`` sees keys
        ``[pos - window_left, pos]``; -1 = no window
    """

    name: str
    spans: tuple[tuple[tuple[int, int], ...], ...]
    seq_lens: tuple[int, ...]
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    seed: int = 0
    x: float | None = None
    window_left: int = -1
    kind: str = field(default="segmented", init=False)

    @property
    def num_spans(self) -> int:
        return sum(len(s) for s in self.spans)

    @cached_property
    def positions(self) -> np.ndarray:
        """[T] int64, the position of every span token, request by request."""
        parts = [np.arange(a, b) for req in self.spans for (a, b) in req]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def windowed(self) -> bool:
        return self.window_left >= 0

    @property
    def flops(self) -> float:
        """``4 * Hq * D * sum over span tokens of (keys seen)``: ``position + 1``, or
        ``min(position + 1, window_left + 1)`` with a sliding window."""
        seen = self.positions + 1
        if self.windowed:
            seen = np.minimum(seen, self.window_left + 1)
        return 4.0 * self.num_q_heads * self.head_dim * float(seen.sum())

    def describe(self) -> str:
        window = f" window_left={self.window_left}" if self.windowed else ""
        return (f"B={len(self.seq_lens)} seq={max(self.seq_lens)} spans={self.num_spans} "
                f"tokens={self.num_tokens} Hq={self.num_q_heads} Hk={self.num_kv_heads} "
                f"D={self.head_dim} page={self.page_size}{window}")

    def make(self, device: torch.device | str, dtype: torch.dtype) -> SegmentedTensors:
        """Tensors on ``device``: q and new K/V of the span tokens, a shuffled page pool
        holding every position, the block table and a validated layout."""
        device = torch.device(device)
        gen = _generator(self.seed, device)
        rng = np.random.default_rng(self.seed + 1)
        page = self.page_size
        pages_per_req = [math.ceil(n / page) for n in self.seq_lens]
        num_pages = sum(pages_per_req) + 1  # one spare page that no request owns
        pool = rng.permutation(num_pages)
        width = max(max(pages_per_req), 1)
        table = np.zeros((len(self.seq_lens), width), dtype=np.int32)
        used = 0
        for b, n in enumerate(pages_per_req):
            table[b, :n] = pool[used:used + n]
            used += n
        block_table = torch.from_numpy(table).to(device)
        hq, hk, d = self.num_q_heads, self.num_kv_heads, self.head_dim
        k_cache = _randn((num_pages, page, hk, d), gen, device, dtype)
        v_cache = _randn((num_pages, page, hk, d), gen, device, dtype)
        t = self.num_tokens
        q = _randn((t, hq, d), gen, device, dtype)
        k_new = _randn((t, hk, d), gen, device, dtype)
        v_new = _randn((t, hk, d), gen, device, dtype)
        spans = [list(s) for s in self.spans]
        layout = sf.SpanLayout.build(spans, list(self.seq_lens), block_table, page, device=device)
        # Plain indexing, not sf.append_kv: the inputs must not depend on the code under test.
        slots = layout.slot_mapping
        k_cache.view(-1, hk, d)[slots] = k_new
        v_cache.view(-1, hk, d)[slots] = v_new
        seq_lens = torch.tensor(self.seq_lens, dtype=torch.int32, device=device)
        return SegmentedTensors(q, k_new, v_new, k_cache, v_cache, block_table, seq_lens, layout)


@dataclass(frozen=True)
class PaddedWorkload:
    """A right-padded bidirectional batch ``[B, S, H, D]`` with per-sample valid lengths."""

    name: str
    valid_lens: tuple[int, ...]
    seq_len: int
    num_heads: int
    head_dim: int
    seed: int = 0
    x: float | None = None
    causal: bool = False
    kind: str = field(default="padded", init=False)

    @property
    def flops(self) -> float:
        """``4 * H * D * sum(valid_len^2)`` (bidirectional)."""
        return 4.0 * self.num_heads * self.head_dim * float(sum(n * n for n in self.valid_lens))

    @property
    def fill(self) -> float:
        return sum(self.valid_lens) / (len(self.valid_lens) * self.seq_len)

    def describe(self) -> str:
        return (f"B={len(self.valid_lens)} S={self.seq_len} H={self.num_heads} D={self.head_dim} "
                f"fill={self.fill:.0%}")

    def make(self, device: torch.device | str, dtype: torch.dtype) -> PaddedTensors:
        device = torch.device(device)
        gen = _generator(self.seed, device)
        shape = (len(self.valid_lens), self.seq_len, self.num_heads, self.head_dim)
        q, k, v = (_randn(shape, gen, device, dtype) for _ in range(3))
        valid = torch.tensor(self.valid_lens, dtype=torch.int32, device=device)
        return PaddedTensors(q, k, v, valid)


Workload = SegmentedWorkload | PaddedWorkload


# ----------------------------------------------------------------------------- builders

def _freeze(spans: Spans) -> tuple[tuple[tuple[int, int], ...], ...]:
    return tuple(tuple(s) for s in spans)


def segmented_uniform(name: str, num_requests: int, seq_len: int, num_spans: int, span_len: int,
                      seed: int = 0, x: float | None = None, **shapes: int) -> SegmentedWorkload:
    """``num_requests`` prompts of ``seq_len`` tokens, each with uniform spans."""
    rng = np.random.default_rng(seed)
    spans = [uniform_spans(rng, seq_len, num_spans, span_len) for _ in range(num_requests)]
    return SegmentedWorkload(name, _freeze(spans), (seq_len,) * num_requests, seed=seed, x=x,
                             **shapes)


def segmented_scatter(name: str, num_requests: int, seq_len: int, fraction: float = 0.15,
                      max_len: int = 8, seed: int = 0, **shapes: int) -> SegmentedWorkload:
    rng = np.random.default_rng(seed)
    spans = [scatter_spans(rng, seq_len, fraction, max_len) for _ in range(num_requests)]
    return SegmentedWorkload(name, _freeze(spans), (seq_len,) * num_requests, seed=seed, **shapes)


def padded_uniform(name: str, batch: int, seq_len: int, num_heads: int, head_dim: int,
                   low: int = 1, high: int | None = None, seed: int = 0,
                   x: float | None = None) -> PaddedWorkload:
    """valid_len uniform in ``low..high`` (inclusive, default ``1..S``)."""
    rng = np.random.default_rng(seed)
    high = seq_len if high is None else high
    lens = rng.integers(low, high + 1, size=batch)
    return PaddedWorkload(name, tuple(int(n) for n in lens), seq_len, num_heads, head_dim,
                          seed=seed, x=x)


def padded_fill(name: str, batch: int, seq_len: int, fill: float, num_heads: int, head_dim: int,
                seed: int = 0) -> PaddedWorkload:
    """valid_len uniform in ``[lo, hi]`` with mean ``fill * S`` (all ``S`` at fill 1)."""
    mean = max(1, round(fill * seq_len))
    high = min(seq_len, 2 * mean - 1)
    low = max(1, 2 * mean - high)
    return padded_uniform(name, batch, seq_len, num_heads, head_dim, low, high, seed, x=fill)


# Informational rows beyond BENCHMARKS.md's six (no targets): sliding window.
SWA_WINDOW_LEFT = 4095       # Mistral / Gemma-2 style 4k window
SWA_WINDOW_LEFT_SMALL = 47   # the smoke version's window (prompts of 256 tokens)


def with_window(w: SegmentedWorkload, name: str, window_left: int) -> SegmentedWorkload:
    """``w``'s shapes, spans and seed under a causal sliding window."""
    return dataclasses.replace(w, name=name, window_left=window_left)


def core_workloads(small: bool = False, seed: int = 0) -> list[SegmentedWorkload | PaddedWorkload]:
    """The six workloads of BENCHMARKS.md, issue 16's ``few_big_d256`` (GQA 16/8, D=256,
    2 x 8192 with 8 spans of 256), ``whole_8k`` (one span over a whole 8,192-token
    prompt) and ``docs_8k_d64`` (B4 x 8192, D=64, ~54% fill), plus
    two informational ones: ``few_big_swa``
    (few_big under a sliding window) and ``tail_32k`` (8 requests x 32768 tokens with one
    16-token hole each: 128 rows over long KV, memory-bound, where an fp8 cache's halved
    bytes can show); and ``minilm_b256_s128`` (B=256, S=128, 12 heads of D=32: issue 17's
    MiniLM-sized batch, where per-call host time shows); ``small`` gives tiny CPU-sized versions with the same names and the
    same placement rules."""
    if small:
        seg = dict(num_q_heads=4, num_kv_heads=2, head_dim=32, page_size=4)
        few_big = segmented_uniform("few_big", 2, 256, 4, 16, seed, **seg)
        return [
            few_big,
            segmented_uniform("many_small", 2, 512, 16, 4, seed, **seg),
            segmented_scatter("scatter15", 2, 512, seed=seed, **seg),
            segmented_uniform("long_32k", 1, 1024, 8, 16, seed, **seg),
            with_window(few_big, "few_big_swa", SWA_WINDOW_LEFT_SMALL),
            segmented_uniform("tail_32k", 2, 1024, 1, 4, seed, **seg),
            segmented_uniform("few_big_d256", 2, 256, 4, 16, seed, num_q_heads=4,
                              num_kv_heads=2, head_dim=64, page_size=4),
            segmented_uniform("whole_8k", 1, 256, 1, 256, seed, **seg),
            padded_uniform("bert_base_512", 4, 32, 2, 32, seed=seed),
            padded_uniform("enc_2k_d128", 2, 64, 2, 32, seed=seed),
            padded_fill("docs_8k_d64", 2, 64, 0.54, 2, 32, seed=seed),
            padded_uniform("minilm_b256_s128", 8, 16, 2, 32, seed=seed),
        ]
    few_big = segmented_uniform("few_big", 2, 8192, 4, 512, seed)
    return [
        few_big,
        segmented_uniform("many_small", 2, 8192, 64, 16, seed),
        segmented_scatter("scatter15", 2, 8192, seed=seed),
        segmented_uniform("long_32k", 1, 32768, 32, 64, seed),
        with_window(few_big, "few_big_swa", SWA_WINDOW_LEFT),
        segmented_uniform("tail_32k", 8, 32768, 1, 16, seed),
        # Issue 16's large-tile rows: GQA 16/8 at D=256, and long padded documents.
        segmented_uniform("few_big_d256", 2, 8192, 8, 256, seed, num_q_heads=16,
                          num_kv_heads=8, head_dim=256),
        # Issue 16: one span covering a whole 8,192-token prompt, against FA4's dense rate.
        segmented_uniform("whole_8k", 1, 8192, 1, 8192, seed),
        padded_uniform("bert_base_512", 64, 512, 12, 64, seed=seed),
        padded_uniform("enc_2k_d128", 16, 2048, 16, 128, seed=seed),
        padded_fill("docs_8k_d64", 4, 8192, 0.54, 12, 64, seed=seed),
        # Issue 17's MiniLM-sized batch: many short sentences, where host time shows.
        padded_uniform("minilm_b256_s128", 256, 128, 12, 32, seed=seed),
    ]


def sweep_workloads(small: bool = False, seed: int = 0) -> list[SegmentedWorkload | PaddedWorkload]:
    """One axis at a time, the others at a base point.

    Segmented base: 2 requests x 8192 tokens, Hq=32, Hk=8, D=128, page 16.
    Axes: ``spans_per_request`` (1..1024, 1/8 of the tokens recomputed),
    ``span_len`` (1..2048, 4 spans per request), ``context`` (2k..128k, 1 request,
    16 spans x 64), ``head_dim``, ``gqa`` (Hq/Hk with Hq=32), ``page_size``
    (16 spans x 64 per request). Padded base: B=16, S=2048, H=16, D=128; axes
    ``fill`` (mean valid_len / S) and ``padded_seq_len`` (B*S = 65536, valid_len
    uniform in 1..S).
    """
    out: list[SegmentedWorkload | PaddedWorkload] = []
    if small:
        n, shapes = 256, dict(num_q_heads=4, num_kv_heads=2, head_dim=32, page_size=4)
        spans_axis, len_axis, ctx_axis = (1, 8), (1, 16), (256, 512)
        dims, groups, pages = (32, 64), (1, 2), (1, 4)
        fills, pad_seqs, pad_tokens, pad_shape = (0.5, 1.0), (32, 64), 128, (2, 32)
    else:
        n, shapes = 8192, {}
        spans_axis, len_axis = (1, 4, 16, 64, 256, 1024), (1, 16, 128, 512, 2048)
        ctx_axis = (2048, 8192, 32768, 131072)
        dims, groups, pages = (64, 128, 256), (1, 4, 8), (1, 16, 64)
        fills, pad_seqs, pad_tokens, pad_shape = (0.1, 0.4, 0.7, 1.0), (128, 512, 2048, 8192), \
            65536, (16, 128)
    for k in spans_axis:
        out.append(segmented_uniform("sweep:spans_per_request", 2, n, k, n // 8 // k, seed, x=k,
                                     **shapes))
    for length in len_axis:
        out.append(segmented_uniform("sweep:span_len", 2, n, 4, length, seed, x=length, **shapes))
    ctx_spans, ctx_len = (16, 64) if not small else (4, 8)
    for ctx in ctx_axis:
        out.append(segmented_uniform("sweep:context", 1, ctx, ctx_spans, ctx_len, seed, x=ctx,
                                     **shapes))
    base_spans, base_len = (16, 64) if not small else (4, 8)
    hq = shapes.get("num_q_heads", 32)
    for d in dims:
        s = {**shapes, "head_dim": d}
        out.append(segmented_uniform("sweep:head_dim", 2, n, base_spans, base_len, seed, x=d, **s))
    for g in groups:
        s = {**shapes, "num_kv_heads": hq // g}
        out.append(segmented_uniform("sweep:gqa", 2, n, base_spans, base_len, seed, x=g, **s))
    for p in pages:
        s = {**shapes, "page_size": p}
        out.append(segmented_uniform("sweep:page_size", 2, n, base_spans, base_len, seed, x=p, **s))
    heads, dim = pad_shape
    pad_s = 64 if small else 2048
    for f in fills:
        out.append(padded_fill("sweep:fill", 16 if not small else 2, pad_s, f, heads, dim, seed))
    for s_len in pad_seqs:
        out.append(padded_uniform("sweep:padded_seq_len", max(1, pad_tokens // s_len), s_len,
                                  heads, dim, seed=seed, x=s_len))
    return out
