"""Property-based cases and checks shared by tests/test_fuzz.py (CPU, interpreter) and
scripts/fuzz_gpu.py (CUDA, larger sizes).

Hypothesis draws the *structure* of a case (requests, spans, page size, heads,
dtype, flags) and one integer seed; tensor values come from a torch generator
seeded with it, so drawing stays cheap and every case is reproducible from its
printed description.

Each ``check_*`` function runs a public op with ``backend="triton"`` against
:mod:`spanfill.reference` and raises ``AssertionError`` on any difference:

* outputs are allocated poisoned (NaN), so a row the kernel forgot is caught;
* every output row is compared (max abs error) and the whole tensor (relative error);
* lse: same -inf rows, close finite values;
* the KV cache after ``append_kv`` equals the reference's bit for bit (also when
  ``span_prefill`` appends in its own launch, ``k_new``/``v_new``), and every
  slot outside the written ones keeps its old bits;
* KV slots no request may see (spare pages, page tails, padding) hold NaN/inf,
  so any read outside a request's range poisons its output.

Span cases come in three shapes: ``mixed`` (many spans of every kind over short
prompts), ``few_rows`` (1-8 span tokens anywhere in long prompts: the launches
that split-KV splits) and ``single_row`` (T=1: one span token in the batch; on a
GPU Triton makes an integer argument equal to 1 a compile-time constant, which
the interpreter never does). Some cases force the split count
(``SPANFILL_SPLITS``). :func:`span_case_tags` names what a case covers, and
:func:`check_span_case` adds ``split`` when the attention launch split.
"""

from __future__ import annotations

import contextlib
import math
import os
import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
from hypothesis import strategies as st

import spanfill as sf
from spanfill import reference
from spanfill.testing import (assert_close, assert_lse_close, num_splits, recorded_launches,
                              reference_span)


@dataclass(frozen=True)
class Sizes:
    """Bounds of the drawn cases.

    On a GPU Triton compiles the kernel once per distinct combination of
    constexprs *and* of integer-argument specializations (== 1, divisible by 16:
    strides depend on the head counts), so there ``heads`` pins a few
    (dtype, D, Hq, Hk) combinations, ``always_lse`` keeps RETURN_LSE fixed, and
    span cases draw heads and page size (a constexpr) together from
    ``span_kernels``; split counts (a constexpr too) are the policy's or one of
    ``splits``. Without ``span_kernels``, page sizes are ``page_sizes`` or any
    in 1..128.

    ``max_long_seq_len`` bounds the prompts of the ``few_rows`` and ``single_row``
    shapes, which carry at most ``max_long_tokens`` span tokens. The split count
    the policy picks for them follows from the prompt length, so on a GPU
    ``long_seq_lens`` lists the lengths (each drawn less 0-15 tokens, which moves
    no split count); empty: any length up to ``max_long_seq_len``.
    """

    max_requests: int
    max_seq_len: int
    max_tokens: int
    max_q_heads: int
    head_dims: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    groups: tuple[int, ...]
    max_padded_len: int
    max_long_seq_len: int
    splits: tuple[int, ...]
    page_sizes: tuple[int, ...] = (1, 2, 16, 128, 256)
    max_long_tokens: int = 8
    long_seq_lens: tuple[int, ...] = ()
    heads: tuple[tuple[torch.dtype, int, int, int], ...] = ()
    span_kernels: tuple[tuple[torch.dtype, int, int, int, int], ...] = ()  # + page size
    always_lse: bool = False


CPU_SIZES = Sizes(max_requests=4, max_seq_len=80, max_tokens=40, max_q_heads=4,
                  head_dims=(16, 32, 64, 80), dtypes=(torch.float16, torch.float32),
                  groups=(1, 2, 3, 4), max_padded_len=24, max_long_seq_len=300,
                  splits=(2, 3, 7))
GPU_SIZES = Sizes(max_requests=8, max_seq_len=1200, max_tokens=600, max_q_heads=16,
                  head_dims=(64, 80, 128), dtypes=(torch.float16, torch.bfloat16),
                  groups=(1, 4, 8), max_padded_len=300, max_long_seq_len=32768,
                  splits=(1, 7), long_seq_lens=(1, 700, 2048, 8192, 32768),
                  heads=((torch.float16, 128, 8, 2), (torch.bfloat16, 128, 8, 8),
                         (torch.float16, 64, 8, 1), (torch.bfloat16, 80, 4, 4)),
                  span_kernels=((torch.float16, 128, 8, 2, 16), (torch.bfloat16, 128, 8, 8, 1),
                                (torch.float16, 64, 8, 1, 256), (torch.bfloat16, 80, 4, 4, 48),
                                # D=256: the automatic choice runs the Gluon family here
                                (torch.bfloat16, 256, 4, 2, 64)),
                  always_lse=True)
# The Hopper (Gluon) family's cases: the shapes it takes (D 64, 128, 256; pages of a
# power of two up to 256), one pinned head layout per (dtype, D) as on the GPU.
GLUON_SIZES = dataclasses.replace(
    GPU_SIZES, head_dims=(64, 128, 256),
    heads=((torch.float16, 128, 8, 2), (torch.bfloat16, 128, 8, 8), (torch.float16, 64, 8, 1),
           (torch.bfloat16, 256, 4, 2)),
    span_kernels=((torch.float16, 128, 8, 2, 16), (torch.bfloat16, 128, 8, 8, 1),
                  (torch.float16, 64, 8, 1, 256), (torch.bfloat16, 256, 4, 2, 64),
                  (torch.float16, 256, 16, 2, 4)))


# ----------------------------------------------------------------------------- poison

@contextlib.contextmanager
def poisoned_allocations() -> Iterator[list[int]]:
    """Make ``torch.empty``/``torch.empty_like`` return NaN-filled float tensors.

    The ops allocate their outputs themselves; filling those allocations with NaN
    is the only way a test can see an element the kernel never wrote. Yields a
    one-element list counting the poisoned allocations.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like
    count = [0]

    def _poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            count[0] += 1
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **kw: _poison(real_empty(*a, **kw))  # type: ignore[assignment]
    torch.empty_like = lambda *a, **kw: _poison(real_empty_like(*a, **kw))  # type: ignore[assignment]
    try:
        yield count
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


@contextlib.contextmanager
def forced_splits(splits: int | None) -> Iterator[None]:
    """Set ``SPANFILL_SPLITS`` (read at each call) to ``splits`` for the duration,
    then restore what was there; None leaves the policy (or the caller's setting)."""
    if splits is None:
        yield
        return
    before = os.environ.get("SPANFILL_SPLITS")
    os.environ["SPANFILL_SPLITS"] = str(splits)
    try:
        yield
    finally:
        if before is None:
            del os.environ["SPANFILL_SPLITS"]
        else:
            os.environ["SPANFILL_SPLITS"] = before


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so NaN == NaN in comparisons."""
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


# ----------------------------------------------------------------------------- strategies

@st.composite
def heads_and_dims(draw: st.DrawFn, sizes: Sizes) -> tuple[int, int, int, torch.dtype]:
    """(Hq, Hk, D, dtype)."""
    if sizes.heads:
        dtype, d, hq, hk = draw(st.sampled_from(sizes.heads))
        return hq, hk, d, dtype
    group = draw(st.sampled_from([g for g in sizes.groups if g <= sizes.max_q_heads]))
    hk = draw(st.integers(1, max(1, sizes.max_q_heads // group)))
    return hk * group, hk, draw(st.sampled_from(sizes.head_dims)), draw(st.sampled_from(sizes.dtypes))


@st.composite
def request_spans(draw: st.DrawFn, seq_len: int) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-empty spans in [0, seq_len), biased to the edge cases:
    none, one-token, touching 0, touching seq_len - 1, adjacent-but-disjoint, all."""
    if seq_len == 0:
        return []
    kind = draw(st.sampled_from(["none", "pieces", "pieces", "pieces", "all", "edges"]))
    if kind == "none":
        return []
    if kind == "all":
        return [(0, seq_len)]
    if kind == "edges":
        return sorted({(0, 1), (seq_len - 1, seq_len)})
    # (gap before, length) pairs: gap 0 gives a span touching 0 or adjacent to the
    # previous one; length 1 a one-token span.
    pieces = draw(st.lists(st.tuples(st.sampled_from([0, 0, 1, 2, 3, 5, 9, 17, 40]),
                                     st.sampled_from([1, 1, 2, 3, 5, 8, 16, 33])),
                           min_size=1, max_size=6))
    spans, cursor = [], 0
    for gap, length in pieces:
        start = cursor + gap
        if start >= seq_len:
            break
        stop = min(seq_len, start + length)
        spans.append((start, stop))
        cursor = stop
    if draw(st.booleans()) and spans and spans[-1][1] < seq_len:
        spans[-1] = (spans[-1][0], seq_len)  # touch seq_len - 1
    return spans


@st.composite
def sparse_spans(draw: st.DrawFn, seq_len: int, max_tokens: int) -> list[tuple[int, int]]:
    """1-3 short spans anywhere in a (long) prompt, often at its last position, of at
    most ``max_tokens`` tokens in all: causal rows far into the prompt see long KV."""
    if seq_len == 0 or max_tokens <= 0:
        return []
    anywhere = st.integers(0, seq_len - 1) | st.just(seq_len - 1)
    starts = sorted(set(draw(st.lists(anywhere, min_size=1, max_size=3))))
    spans, budget = [], max_tokens
    for i, start in enumerate(starts):
        # Stop before the next start: the spans stay disjoint and sorted.
        limit = starts[i + 1] if i + 1 < len(starts) else seq_len
        stop = min(limit, start + draw(st.integers(1, 4)), start + budget)
        spans.append((start, stop))
        budget -= stop - start
        if budget == 0:
            break
    return spans


@dataclass
class SpanCase:
    seq_lens: list[int]
    spans: list[list[tuple[int, int]]]
    page_size: int
    spare_pages: int
    hq: int
    hk: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    return_lse: bool
    sm_scale: float | None
    skip_slots: bool
    int64_meta: bool
    seed: int
    shape: str = "mixed"
    splits: int | None = None  # forced through SPANFILL_SPLITS; None: the policy


def _long_seq_lens(draw: st.DrawFn, sizes: Sizes, num_req: int) -> list[int]:
    """Prompt lengths of the long shapes: mostly long, sometimes the bound or 1."""
    top = sizes.max_long_seq_len
    if sizes.long_seq_lens:
        lengths = st.builds(lambda n, less: max(1, n - less), st.sampled_from(sizes.long_seq_lens),
                            st.integers(0, 15))
    else:
        lengths = st.integers(top // 4, top) | st.integers(1, top) | st.sampled_from([1, top])
    return draw(st.lists(lengths, min_size=num_req, max_size=num_req))


@st.composite
def span_cases(draw: st.DrawFn, sizes: Sizes) -> SpanCase:
    shape = draw(st.sampled_from(["mixed", "mixed", "mixed", "few_rows", "single_row"]))
    if shape == "mixed":
        num_req = draw(st.integers(1, sizes.max_requests) | st.just(0))
        seq_lens = draw(st.lists(st.integers(0, sizes.max_seq_len)
                                 | st.sampled_from([1, sizes.max_seq_len]),
                                 min_size=num_req, max_size=num_req))
        spans = [draw(request_spans(n)) for n in seq_lens]
        # Cut spans so the batch stays within max_tokens (keeps the interpreter fast).
        budget = sizes.max_tokens
        for b, req in enumerate(spans):
            kept = []
            for start, stop in req:
                if budget <= 0:
                    break
                stop = min(stop, start + budget)
                kept.append((start, stop))
                budget -= stop - start
            spans[b] = kept
    elif shape == "few_rows":
        num_req = draw(st.integers(1, min(3, sizes.max_requests)))
        seq_lens = _long_seq_lens(draw, sizes, num_req)
        budget = draw(st.integers(1, sizes.max_long_tokens))
        spans = []
        for n in seq_lens:
            spans.append(draw(sparse_spans(n, budget)) if draw(st.integers(0, 3)) else [])
            budget -= sum(stop - start for start, stop in spans[-1])
    else:  # single_row: one span token in the whole batch, T = 1
        num_req = draw(st.integers(1, min(3, sizes.max_requests)))
        seq_lens = _long_seq_lens(draw, sizes, num_req)
        owner = draw(st.integers(0, num_req - 1))
        n = seq_lens[owner]
        pos = draw(st.sampled_from([0, n - 1]) | st.integers(0, n - 1))
        spans = [[(pos, pos + 1)] if b == owner else [] for b in range(num_req)]
    if sizes.span_kernels:
        dtype, d, hq, hk, page_size = draw(st.sampled_from(sizes.span_kernels))
    else:
        hq, hk, d, dtype = draw(heads_and_dims(sizes))
        page_size = draw(st.sampled_from(sizes.page_sizes) | st.integers(1, 128))
    return SpanCase(
        seq_lens=seq_lens, spans=spans, page_size=page_size,
        spare_pages=draw(st.integers(0, 3)), hq=hq, hk=hk, head_dim=d, dtype=dtype,
        causal=draw(st.booleans()),
        return_lse=sizes.always_lse or draw(st.booleans() | st.just(True)),
        sm_scale=draw(st.none() | st.floats(0.01, 2.0)),
        skip_slots=draw(st.integers(0, 7)) == 0, int64_meta=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)), shape=shape,
        splits=draw(st.none() | st.none() | st.sampled_from(sizes.splits)),
    )


def span_case_tags(c: SpanCase) -> set[str]:
    """The edge cases a span case covers, for coverage counts."""
    tokens = sum(stop - start for req in c.spans for start, stop in req)
    tags = {c.shape}
    if tokens == 1:
        tags.add("T=1")
    if c.page_size in (1, 256):
        tags.add(f"page{c.page_size}")
    if any(req == [(0, n)] for req, n in zip(c.spans, c.seq_lens) if n > 0):
        tags.add("whole-prompt")
    if any(not req for req in c.spans):
        tags.add("no-span-request")
    if c.splits is not None:
        tags.add("forced-splits")
    return tags


def check_span_case(c: SpanCase, device: str, backend: str = "triton") -> set[str]:
    """append_kv + span_prefill through the kernels vs the reference.

    ``backend`` runs the plain ``span_prefill`` (another family: ``"gluon"``); the append
    and the append inside attention always take the portable kernels. Returns the case's
    :func:`span_case_tags`, plus ``split`` when the attention launch ran split-KV.
    """
    gen = torch.Generator().manual_seed(c.seed)
    pages_per_req = [math.ceil(n / c.page_size) for n in c.seq_lens]
    num_pages = sum(pages_per_req) + c.spare_pages
    perm = torch.randperm(num_pages, generator=gen)  # shuffled pool: pages far from in order
    width = max(pages_per_req + [1]) + (c.seed % 2)  # sometimes unused columns
    block_table = torch.full((len(c.seq_lens), width), -1, dtype=torch.int64)
    used = 0
    for b, n in enumerate(pages_per_req):
        block_table[b, :n] = perm[used:used + n]
        used += n
    if not c.int64_meta:
        block_table = block_table.to(torch.int32)
    layout = sf.SpanLayout.build(c.spans, c.seq_lens, block_table.to(device), c.page_size)
    if c.skip_slots and layout.num_tokens:
        slots = layout.slot_mapping.clone()
        slots[torch.randperm(layout.num_tokens, generator=gen)[: layout.num_tokens // 2 + 1].to(device)] = -1
        meta = [layout.positions, layout.query_start_loc, layout.seq_lens, layout.block_table]
        if c.int64_meta:
            meta = [m.long() for m in meta]
        layout = sf.SpanLayout.from_tensors(*meta, c.page_size, slot_mapping=slots)
    t = layout.num_tokens
    # Values from a generator on the device: a long prompt's pool is drawn there
    # in microseconds, on the host in seconds.
    values = torch.Generator(device=device).manual_seed(c.seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=values, device=device).to(c.dtype)

    k_cache, v_cache = rnd(num_pages, c.page_size, c.hk, c.head_dim), rnd(num_pages, c.page_size, c.hk, c.head_dim)
    # Slots no request may read: NaN in K, inf in V. Any read there shows up.
    visible = torch.zeros(num_pages, c.page_size, dtype=torch.bool)
    for b, n in enumerate(c.seq_lens):
        pos = torch.arange(n)
        visible[block_table[b, pos // c.page_size].long(), pos % c.page_size] = True
    hidden = (~visible).to(device)
    k_cache[hidden] = float("nan")
    v_cache[hidden] = float("inf")
    q, k_new, v_new = rnd(t, c.hq, c.head_dim), rnd(t, c.hk, c.head_dim), rnd(t, c.hk, c.head_dim)
    before_k, before_v = bits(k_cache).clone(), bits(v_cache).clone()
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    fused_k, fused_v = k_cache.clone(), v_cache.clone()  # for the one-launch path below

    sf.append_kv(k_new, v_new, k_cache, v_cache, layout, backend="triton")
    reference.append_kv(k_new, v_new, ref_k, ref_v, layout.slot_mapping)
    assert torch.equal(bits(k_cache), bits(ref_k)), "append_kv: k_cache differs from the reference"
    assert torch.equal(bits(v_cache), bits(ref_v)), "append_kv: v_cache differs from the reference"
    written = torch.zeros(num_pages * c.page_size, dtype=torch.bool, device=device)
    slots = layout.slot_mapping[layout.slot_mapping >= 0]
    written[slots] = True
    written = written.view(num_pages, c.page_size)
    for name, now, before in (("k_cache", k_cache, before_k), ("v_cache", v_cache, before_v)):
        assert torch.equal(bits(now)[~written], before[~written]), f"append_kv wrote outside its slots in {name}"

    with poisoned_allocations(), forced_splits(c.splits), \
            recorded_launches(attention_fwd=num_splits) as recorded:
        res = sf.span_prefill(q, k_cache, v_cache, layout, causal=c.causal, sm_scale=c.sm_scale,
                              return_lse=c.return_lse, backend=backend)
    launches = recorded["attention_fwd"]
    # An empty batch takes the reference path; any other is one kernel launch (of the
    # portable kernel, which another family never calls).
    want = 1 if t and backend == "triton" else 0
    assert len(launches) == want, f"{len(launches)} portable attention launches for T={t}"
    o, lse = res if c.return_lse else (res, None)
    scale = 1.0 / math.sqrt(c.head_dim) if c.sm_scale is None else c.sm_scale
    o_ref, lse_ref = reference_span(q, ref_k, ref_v, layout, c.causal, scale)
    assert o.dtype == c.dtype
    assert_close(o, o_ref, c.dtype, "span_prefill o", elementwise=True)
    if lse is not None:
        assert_lse_close(lse, lse_ref, c.dtype)
    assert torch.equal(bits(k_cache), bits(ref_k)), "span_prefill changed k_cache"

    # Append inside attention (span_prefill with k_new/v_new), from the cache before
    # the append, its slots to be written poisoned: no program may read them back.
    stored = layout.slot_mapping[layout.slot_mapping >= 0]
    fused_k.view(-1, c.hk, c.head_dim)[stored] = float("nan")
    fused_v.view(-1, c.hk, c.head_dim)[stored] = float("nan")
    with poisoned_allocations(), forced_splits(c.splits):
        res = sf.span_prefill(q, fused_k, fused_v, layout, causal=c.causal, sm_scale=c.sm_scale,
                              return_lse=c.return_lse, backend="triton", k_new=k_new, v_new=v_new)
    o, lse = res if c.return_lse else (res, None)
    assert torch.equal(bits(fused_k), bits(ref_k)), "fused append: k_cache differs"
    assert torch.equal(bits(fused_v), bits(ref_v)), "fused append: v_cache differs"
    assert_close(o, o_ref, c.dtype, "span_prefill with k_new o", elementwise=True)
    if lse is not None:
        assert_lse_close(lse, lse_ref, c.dtype)
    return span_case_tags(c) | ({"split"} if launches and launches[0] > 1 else set())


@dataclass
class PaddedCase:
    valid_lens: list[int]
    seq_len: int
    hq: int
    hk: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    padding_side: str
    sm_scale: float | None
    seed: int


@st.composite
def padded_cases(draw: st.DrawFn, sizes: Sizes) -> PaddedCase:
    b = draw(st.integers(1, sizes.max_requests) | st.just(0))
    s = draw(st.integers(0, sizes.max_padded_len) | st.sampled_from([1, sizes.max_padded_len]))
    lens = draw(st.lists(st.sampled_from([0, s]) | st.integers(0, s), min_size=b, max_size=b))
    hq, hk, d, dtype = draw(heads_and_dims(sizes))
    return PaddedCase(lens, s, hq, hk, d, dtype, draw(st.booleans()),
                      draw(st.sampled_from(["right", "left"])), draw(st.none() | st.floats(0.01, 2.0)),
                      draw(st.integers(0, 2**31 - 1)))


def check_padded_case(c: PaddedCase, device: str, backend: str = "triton") -> None:
    """padded_prefill through the kernel vs the reference, with NaN/inf in the padding."""
    gen = torch.Generator().manual_seed(c.seed)
    b = len(c.valid_lens)

    def rnd(h: int) -> torch.Tensor:
        return torch.randn(b, c.seq_len, h, c.head_dim, generator=gen).to(device=device, dtype=c.dtype)

    q, k, v = rnd(c.hq), rnd(c.hk), rnd(c.hk)
    lens = torch.tensor(c.valid_lens, dtype=torch.int64, device=device)
    col = torch.arange(c.seq_len, device=device)[None, :]
    pad = col >= lens[:, None]
    if c.padding_side == "left":
        pad = pad.flip(1)
    q[pad], k[pad], v[pad] = float("nan"), float("inf"), float("nan")
    with poisoned_allocations():
        o, lse = sf.padded_prefill(q, k, v, lens.to(torch.int32), causal=c.causal,
                                   padding_side=c.padding_side, sm_scale=c.sm_scale,
                                   return_lse=True, backend=backend)
    scale = 1.0 / math.sqrt(c.head_dim) if c.sm_scale is None else c.sm_scale
    o_ref, lse_ref = reference.padded_prefill(q, k, v, lens, c.causal, c.padding_side, scale)
    assert bool((o[pad] == 0).all()), "padded rows are not exactly 0"
    assert_close(o, o_ref, c.dtype, "padded_prefill o", elementwise=True)
    assert_lse_close(lse, lse_ref, c.dtype)


@dataclass
class VarlenCase:
    lens: list[int]
    hq: int
    hk: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    seed: int


@st.composite
def varlen_cases(draw: st.DrawFn, sizes: Sizes) -> VarlenCase:
    per = max(1, sizes.max_tokens // 2)
    lens = draw(st.lists(st.integers(0, per) | st.sampled_from([0, 1]), min_size=0,
                         max_size=sizes.max_requests))
    while sum(lens) > sizes.max_tokens:
        lens.pop()
    hq, hk, d, dtype = draw(heads_and_dims(sizes))
    return VarlenCase(lens, hq, hk, d, dtype, draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))


def check_varlen_case(c: VarlenCase, device: str, backend: str = "triton") -> None:
    gen = torch.Generator().manual_seed(c.seed)
    t = sum(c.lens)

    def rnd(h: int) -> torch.Tensor:
        return torch.randn(t, h, c.head_dim, generator=gen).to(device=device, dtype=c.dtype)

    q, k, v = rnd(c.hq), rnd(c.hk), rnd(c.hk)
    cu = torch.tensor([0] + c.lens, device=device).cumsum(0).to(torch.int32)
    with poisoned_allocations():
        o, lse = sf.varlen_prefill(q, k, v, cu, causal=c.causal, return_lse=True, backend=backend)
    o_ref, lse_ref = reference.varlen_prefill(q, k, v, cu, c.causal)
    assert_close(o, o_ref, c.dtype, "varlen_prefill o", elementwise=True)
    assert_lse_close(lse, lse_ref, c.dtype)
