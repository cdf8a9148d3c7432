"""Padded rows of a captured batch (CUDA graphs): slot -1, no K/V written, output 0.

The convention (docs/captured_batches.md): a batch captured at a fixed capacity
of ``T_cap`` rows and ``B_cap`` requests puts its unused rows in a spare request
whose ``seq_lens`` is 0, inside ``query_start_loc`` (``query_start_loc[-1] ==
T_cap``); the spare block-table rows may hold anything (stale pages of other
requests, -1). Padded rows must write no K/V, read nothing, and come out exactly
0 with lse -inf; real rows must match the reference run on the real rows alone.

Every replayed batch is checked by :func:`check_batch`; the CUDA-graph test and
its eager CPU twin share :func:`run_batches`, so the interpreter runs the same
metadata updates the graph replays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import spanfill as sf
from spanfill import reference
from spanfill.layout import compute_slot_mapping
from spanfill.testing import assert_close, assert_lse_close, capture_cuda_graph, reference_span
from tests.fuzzing import bits, poisoned_allocations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class RealBatch:
    """The real rows of one batch, request by request: all the reference sees."""

    positions: torch.Tensor  # [n] int32
    query_start_loc: torch.Tensor  # [R+1] int32
    seq_lens: torch.Tensor  # [R] int32
    block_table: torch.Tensor  # [R, width] int32

    @property
    def num_rows(self) -> int:
        return self.positions.shape[0]

    @property
    def num_requests(self) -> int:
        return self.seq_lens.shape[0]

    def layout(self, page_size: int) -> sf.SpanLayout:
        """The validated layout of the real rows alone."""
        return sf.SpanLayout.from_tensors(self.positions, self.query_start_loc, self.seq_lens,
                                          self.block_table, page_size)


def random_batch(gen: torch.Generator, num_rows: int, num_req: int, page_size: int, width: int,
                 num_pages: int, device: str) -> RealBatch:
    """``num_rows`` rows spread over ``num_req`` requests (each at least one row), at
    sorted random positions of random prompts; pages drawn from the whole pool."""
    cuts = torch.randperm(num_rows - 1, generator=gen)[: num_req - 1] + 1
    bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([num_rows])])
    counts = bounds[1:] - bounds[:-1]
    max_len = width * page_size
    seq_lens = torch.stack([torch.randint(int(c), max_len + 1, (), generator=gen) for c in counts])
    positions = torch.cat([torch.randperm(int(n), generator=gen)[: int(c)].sort().values
                           for n, c in zip(seq_lens, counts)])
    table = torch.randperm(num_pages, generator=gen)[: num_req * width].view(num_req, width)
    return RealBatch(*(t.to(device=device, dtype=torch.int32)
                       for t in (positions, bounds, seq_lens, table)))


@dataclass
class StaticMeta:
    """Metadata buffers of a fixed capacity that every batch is copied into."""

    positions: torch.Tensor  # [T_cap]
    query_start_loc: torch.Tensor  # [B_cap+1]
    seq_lens: torch.Tensor  # [B_cap]
    block_table: torch.Tensor  # [B_cap, width]

    @classmethod
    def empty(cls, t_cap: int, b_cap: int, width: int, device: str) -> "StaticMeta":
        i32 = dict(dtype=torch.int32, device=device)
        return cls(torch.zeros(t_cap, **i32), torch.zeros(b_cap + 1, **i32),
                   torch.zeros(b_cap, **i32), torch.zeros(b_cap, width, **i32))

    def load(self, real: RealBatch, pad_positions: torch.Tensor,
             spare_table: torch.Tensor | None) -> None:
        """Copy ``real`` in and pad the rest by the convention, in place.

        Rows past the real ones go to spare request ``R`` (seq_len 0); requests past
        it are empty. Spare block-table rows keep what the previous batch left there,
        and spare request ``R``'s row becomes ``spare_table`` when given.
        """
        n, r = real.num_rows, real.num_requests
        t_cap, b_cap = self.positions.shape[0], self.seq_lens.shape[0]
        assert n == t_cap or r < b_cap, "padded rows need a spare request slot"
        self.positions[:n] = real.positions
        self.positions[n:] = pad_positions[: t_cap - n]
        self.query_start_loc[: r + 1] = real.query_start_loc
        self.query_start_loc[r + 1:] = t_cap
        self.seq_lens[:r] = real.seq_lens
        self.seq_lens[r:] = 0
        self.block_table[:r] = real.block_table
        if spare_table is not None and r < b_cap:
            self.block_table[r] = spare_table

    def tensors(self) -> list[torch.Tensor]:
        return [self.positions, self.query_start_loc, self.seq_lens, self.block_table]


def check_batch(real: RealBatch, page_size: int, q: torch.Tensor, k_new: torch.Tensor,
                v_new: torch.Tensor, k_before: torch.Tensor, v_before: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, o: torch.Tensor,
                lse: torch.Tensor) -> None:
    """One padded step against the reference run of its real rows alone.

    The cache must equal ``k_before``/``v_before`` with only the real rows appended,
    bit for bit everywhere; real rows match the reference, padded rows are exactly
    0 with lse -inf.
    """
    n, dtype = real.num_rows, q.dtype
    layout = real.layout(page_size)
    ref_k, ref_v = k_before.clone(), v_before.clone()
    reference.append_kv(k_new[:n], v_new[:n], ref_k, ref_v, layout.slot_mapping)
    for name, got, want in (("k_cache", k_cache, ref_k), ("v_cache", v_cache, ref_v)):
        assert torch.equal(bits(got), bits(want)), f"{name}: a padded row wrote or a real row was lost"
    o_ref, lse_ref = reference_span(q[:n], ref_k, ref_v, layout, True, 1 / math.sqrt(q.shape[-1]))
    assert_close(o[:n], o_ref, dtype, "real rows' o")
    assert_lse_close(lse[:n], lse_ref, dtype, "real rows' lse")
    assert bool((o[n:] == 0).all()), "a padded row's output is not exactly 0"
    assert bool(torch.isneginf(lse[n:]).all()), "a padded row's lse is not -inf"


# ----------------------------------------------------------------------------- slot mapping

def test_padded_rows_get_no_slot() -> None:
    """Rows of a seq_len-0 request, rows past their request's seq_len and rows past
    query_start_loc[-1] get -1, whatever their block-table row and position hold;
    a position far past the table's width reads nothing out of range."""
    positions = torch.tensor([3, 69, 0, 20, 39, 0, 3, 1000, 0, 5])
    qsl = torch.tensor([0, 2, 5, 8])  # rows 8, 9: past qsl[-1], in no request
    seq_lens = torch.tensor([70, 40, 0])
    table = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, -1, -1], [5, 6, 7, -1, -1]])
    slots = compute_slot_mapping(positions, qsl, seq_lens, table, 16)
    assert slots.tolist() == [3, 69, 80, 100, 119, -1, -1, -1, -1, -1]
    no_seq_lens, no_table = torch.zeros(0, dtype=torch.int64), torch.zeros(0, 5, dtype=torch.int64)
    empty = compute_slot_mapping(positions[:3], torch.tensor([0]), no_seq_lens, no_table, 16)
    assert empty.tolist() == [-1, -1, -1], "a batch with no request: every row is padding"


def test_explicit_slot_mapping_is_kept() -> None:
    """A caller's slot_mapping is used as given (padded rows must carry -1 there)."""
    positions, qsl = torch.tensor([0, 1, 0]), torch.tensor([0, 2, 3])
    seq_lens, table = torch.tensor([2, 0]), torch.tensor([[4], [4]])
    slots = torch.tensor([64, 65, 66])
    layout = sf.SpanLayout.from_tensors(positions, qsl, seq_lens, table, 16, slot_mapping=slots,
                                        validate=False)
    assert layout.slot_mapping.tolist() == [64, 65, 66]


# ----------------------------------------------------------------------------- the bug's batch

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("spare_table", ["stale", "minus-one"])
def test_padded_rows_leave_other_requests_alone(dtype: torch.dtype, spare_table: str) -> None:
    """T=8 rows of which 5 are real (2 requests); the 3 padded rows sit in spare
    request 2 (seq_len 0) whose block-table row is request 1's (stale) or -1. Before
    the convention they were given slot 80, request 1's position 0, and append_kv
    overwrote its cached K/V."""
    page_size, hq, hk, d, num_pages = 16, 4, 2, 32, 10
    gen = torch.Generator().manual_seed(0)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    real = RealBatch(torch.tensor([3, 69, 0, 20, 39], **i32), torch.tensor([0, 2, 5], **i32),
                     torch.tensor([70, 40], **i32),
                     torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, -1, -1]], **i32))
    static = StaticMeta.empty(8, 3, 5, DEVICE)
    spare = real.block_table[1]
    if spare_table == "minus-one":
        spare = torch.full_like(spare, -1)
    static.load(real, torch.tensor([0, 3, 1000], dtype=torch.int32, device=DEVICE), spare)
    layout = sf.SpanLayout.from_tensors(*static.tensors(), page_size, validate=False)
    assert layout.slot_mapping[5:].tolist() == [-1, -1, -1]

    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, dtype)  # noqa: E731
    k_cache, v_cache = rnd(num_pages, page_size, hk, d), rnd(num_pages, page_size, hk, d)
    q, k_new, v_new = rnd(8, hq, d), rnd(8, hk, d), rnd(8, hk, d)
    for t in (q, k_new, v_new):
        t[5:] = float("nan")  # a padded row that leaks anywhere shows up
    k_before, v_before = k_cache.clone(), v_cache.clone()
    sf.append_kv(k_new, v_new, k_cache, v_cache, layout, backend="triton")
    with poisoned_allocations():
        o, lse = sf.span_prefill(q, k_cache, v_cache, layout, return_lse=True, backend="triton")
    check_batch(real, page_size, q, k_new, v_new, k_before, v_before, k_cache, v_cache, o, lse)


def test_request_with_no_kv_sees_nothing() -> None:
    """The kernel on its own: rows of a seq_len-0 request output 0 and lse -inf, even
    with a block-table row full of live pages and NaN queries, split or not."""
    page_size, hq, hk, d = 16, 2, 1, 32
    gen = torch.Generator().manual_seed(1)
    layout = sf.SpanLayout.from_tensors(
        torch.tensor([0, 1, 2, 7], device=DEVICE), torch.tensor([0, 0, 4], device=DEVICE),
        torch.tensor([0, 0], device=DEVICE), torch.tensor([[0, 1], [1, 0]], device=DEVICE),
        page_size, validate=False)
    k_cache = torch.randn(2, page_size, hk, d, generator=gen).to(DEVICE, torch.float16)
    q = torch.full((4, hq, d), float("nan"), dtype=torch.float16, device=DEVICE)
    for splits in (None, "3"):
        with pytest.MonkeyPatch.context() as mp:
            if splits:
                mp.setenv("SPANFILL_SPLITS", splits)
            with poisoned_allocations():
                o, lse = sf.span_prefill(q, k_cache, k_cache, layout, return_lse=True,
                                         backend="triton")
        assert bool((o == 0).all()) and bool(torch.isneginf(lse).all()), f"splits={splits}"


# ----------------------------------------------------------------------------- captured batches

@dataclass(frozen=True)
class Capacity:
    t_cap: int
    b_cap: int
    width: int  # block-table columns
    page_size: int
    hq: int
    hk: int
    head_dim: int
    batches: tuple[tuple[int, int], ...]  # (real rows, real requests) per replay


CPU_CAPACITY = Capacity(t_cap=16, b_cap=4, width=6, page_size=16, hq=2, hk=1, head_dim=32,
                        batches=((1, 1), (9, 2), (16, 4), (5, 3)))
GPU_CAPACITY = Capacity(t_cap=64, b_cap=8, width=40, page_size=16, hq=8, hk=2, head_dim=128,
                        batches=((1, 1), (17, 3), (64, 8), (40, 7), (5, 2)))


def run_batches(cap: Capacity, dtype: torch.dtype, capture: bool, seed: int = 0) -> None:
    """Build the step once on static buffers (inside one CUDA graph when ``capture``),
    then for each batch copy its metadata and data in, run the step, and check it.

    The step is ``from_tensors(..., validate=False)`` + ``append_kv`` + ``span_prefill``
    on the static buffers; outputs are allocated poisoned (NaN) inside the step, so a
    replayed graph re-poisons them before its kernels write.
    """
    gen = torch.Generator().manual_seed(seed)
    num_pages = cap.b_cap * cap.width + 5
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, dtype)  # noqa: E731
    static = StaticMeta.empty(cap.t_cap, cap.b_cap, cap.width, DEVICE)
    first = random_batch(gen, cap.t_cap // 2, 2, cap.page_size, cap.width, num_pages, DEVICE)
    static.load(first, torch.zeros(cap.t_cap, dtype=torch.int32, device=DEVICE), None)
    q, k_new, v_new = (rnd(cap.t_cap, h, cap.head_dim) for h in (cap.hq, cap.hk, cap.hk))
    k_cache, v_cache = (rnd(num_pages, cap.page_size, cap.hk, cap.head_dim) for _ in range(2))

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        layout = sf.SpanLayout.from_tensors(*static.tensors(), cap.page_size, validate=False)
        sf.append_kv(k_new, v_new, k_cache, v_cache, layout, backend="triton")
        with poisoned_allocations():
            return sf.span_prefill(q, k_cache, v_cache, layout, return_lse=True, backend="triton")

    if capture:
        graph, (o, lse) = capture_cuda_graph(step)

    for n, r in cap.batches:
        real = random_batch(gen, n, r, cap.page_size, cap.width, num_pages, DEVICE)
        # Padded rows at position 0 and beyond the table; spare request R's block-table
        # row points at a live request's pages (the bug's setup); later spares stay stale.
        pad_positions = torch.randint(0, 4 * cap.width * cap.page_size, (cap.t_cap,),
                                      generator=gen).to(DEVICE, torch.int32)
        pad_positions[0] = 0
        static.load(real, pad_positions, real.block_table[0])
        for t in (q, k_new, v_new):
            t.copy_(rnd(*t.shape))
            t[n:] = float("nan")
        k_before, v_before = k_cache.clone(), v_cache.clone()
        if capture:
            graph.replay()
            torch.cuda.synchronize()
        else:
            o, lse = step()
        check_batch(real, cap.page_size, q, k_new, v_new, k_before, v_before, k_cache, v_cache,
                    o, lse)


@pytest.mark.parametrize("splits", [None, "3"], ids=["policy", "split3"])
def test_padded_batches_eager(splits: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-graph test's batches, run eagerly on the same static buffers (the CPU
    interpreter runs this one)."""
    if splits is not None:
        monkeypatch.setenv("SPANFILL_SPLITS", splits)
    run_batches(CPU_CAPACITY, torch.float16, capture=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("splits", [None, "3"], ids=["policy", "split3"])
def test_one_graph_replayed_for_batches_of_any_size(dtype: torch.dtype, splits: str | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """One CUDA graph captured at 64 rows / 8 requests, replayed for 1, 17, 64, 40 and
    5 real rows over 1, 3, 8, 7 and 2 requests."""
    if splits is not None:
        monkeypatch.setenv("SPANFILL_SPLITS", splits)
    run_batches(GPU_CAPACITY, dtype, capture=True)
