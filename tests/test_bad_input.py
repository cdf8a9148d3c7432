"""The bad-input catalog (docs/bad_inputs.md): one test per rejected or special input.

Every rejection asserts the exception type, that the message names the argument
and the offending index, and that the KV cache (k_cache and v_cache) is
bit-for-bit unchanged afterwards. A failed layout build is checked the same way:
the test runs the whole step (build the layout, append_kv, span_prefill), so the
cache must come out untouched however far the step got.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

import spanfill as sf
from conftest import INTERPRETING, tensor_digest

P = 4  # page size of the standard case
HQ, HK, D = 4, 2, 32
SEQ_LENS = [10, 7]
SPANS = [[(1, 3), (6, 9)], [(0, 2)]]
NUM_PAGES = 8

# These tests use CPU tensors: the kernels can run on them only in the interpreter.
BACKENDS = ["reference"] + (["triton"] if INTERPRETING else [])


@dataclass
class Case:
    """A valid segmented-prefill step; tests break one piece of it."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    layout: sf.SpanLayout
    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor

    def digest(self) -> str:
        return tensor_digest(self.k_cache, self.v_cache)


@pytest.fixture
def case() -> Case:
    gen = torch.Generator().manual_seed(0)
    # Pages shuffled so that a wrong page id cannot pass by luck.
    perm = torch.randperm(NUM_PAGES, generator=gen).to(torch.int32)
    block_table = torch.full((2, 4), -1, dtype=torch.int32)
    block_table[0, :3] = perm[:3]
    block_table[1, :2] = perm[3:5]
    layout = sf.SpanLayout.build(SPANS, SEQ_LENS, block_table, P)
    t = layout.num_tokens
    return Case(
        k_cache=torch.randn(NUM_PAGES, P, HK, D, generator=gen),
        v_cache=torch.randn(NUM_PAGES, P, HK, D, generator=gen),
        block_table=block_table,
        layout=layout,
        q=torch.randn(t, HQ, D, generator=gen),
        k_new=torch.randn(t, HK, D, generator=gen),
        v_new=torch.randn(t, HK, D, generator=gen),
    )


def rejected(case: Case, exc: type[Exception], pattern: str, step: Callable[[], object]) -> None:
    """``step()`` raises ``exc`` matching ``pattern`` and leaves the cache unchanged."""
    before = case.digest()
    with pytest.raises(exc, match=pattern):
        step()
    assert case.digest() == before, "a rejected call changed the KV cache"


def full_step(case: Case, spans=SPANS, seq_lens=SEQ_LENS, block_table=None, page_size=P,
              backend: str = "reference") -> torch.Tensor:
    """Build a layout from Python spans, append the new K/V, attend: the whole job."""
    table = case.block_table if block_table is None else block_table
    layout = sf.SpanLayout.build(spans, seq_lens, table, page_size)
    sf.append_kv(case.k_new, case.v_new, case.k_cache, case.v_cache, layout, backend=backend)
    return sf.span_prefill(case.q, case.k_cache, case.v_cache, layout, backend=backend)


def tensor_step(case: Case, positions, qsl, seq_lens, block_table, page_size=P,
                slot_mapping=None, backend: str = "reference") -> torch.Tensor:
    """The same job from a serving engine's tensors."""
    layout = sf.SpanLayout.from_tensors(positions, qsl, seq_lens, block_table, page_size,
                                        slot_mapping=slot_mapping)
    k_new = torch.randn(layout.num_tokens, HK, D)
    sf.append_kv(k_new, k_new.clone(), case.k_cache, case.v_cache, layout, backend=backend)
    q = torch.randn(layout.num_tokens, HQ, D)
    return sf.span_prefill(q, case.k_cache, case.v_cache, layout, backend=backend)


def good_tensors(case: Case) -> dict[str, torch.Tensor]:
    """The standard case's metadata as tensors (int32), to be broken one at a time."""
    return dict(positions=case.layout.positions.clone(), qsl=case.layout.query_start_loc.clone(),
                seq_lens=case.layout.seq_lens.clone(), block_table=case.block_table.clone())


# ----------------------------------------------------------------------------- spans

@pytest.mark.parametrize("spans, pattern", [
    pytest.param([[(1, 5), (4, 8)], [(0, 2)]],
                 r"spans\[0\]\[1\] = \(4, 8\) overlaps or precedes spans\[0\]\[0\]", id="overlapping"),
    pytest.param([[(6, 9), (1, 3)], [(0, 2)]],
                 r"spans\[0\]\[1\] = \(1, 3\) overlaps or precedes spans\[0\]\[0\]", id="unsorted"),
    pytest.param([[(1, 3)], [(0, 2), (0, 2)]],
                 r"spans\[1\]\[1\] = \(0, 2\) overlaps", id="duplicate"),
    pytest.param([[(1, 3)], [(4, 4)]], r"spans\[1\]\[0\] = \(4, 4\) is empty", id="empty"),
    pytest.param([[(5, 2)], [(0, 2)]], r"spans\[0\]\[0\] = \(5, 2\) is empty", id="reversed"),
    pytest.param([[(1, 3), (8, 11)], [(0, 2)]],
                 r"spans\[0\]\[1\] = \(8, 11\) is outside \[0, seq_lens\[0\]=10\)", id="past-seq-len"),
    pytest.param([[(1, 3)], [(-1, 2)]],
                 r"spans\[1\]\[0\] = \(-1, 2\) is outside \[0, seq_lens\[1\]=7\)", id="negative-start"),
    pytest.param([[(1, 3)], [(0, 1, 2)]], r"spans\[1\]\[0\] must be a \(start, stop\) pair",
                 id="not-a-pair"),
    pytest.param([[(1, 3)]], r"spans has 1 requests but seq_lens has 2", id="wrong-batch"),
])
def test_bad_spans(case: Case, spans, pattern: str) -> None:
    rejected(case, ValueError, pattern, lambda: full_step(case, spans=spans))


def test_request_without_spans_is_fine(case: Case) -> None:
    """A request with no holes has nothing to do; the others still run."""
    spans = [[], [(0, 2)]]
    layout = sf.SpanLayout.build(spans, SEQ_LENS, case.block_table, P)
    assert layout.num_tokens == 2
    assert layout.query_start_loc.tolist() == [0, 0, 2]


PER_REQUEST = r"spans is per request, e\.g\. spans=\[\[\(0, 4\), \(6, 8\)\]\]"


@pytest.mark.parametrize("spans, pattern", [
    pytest.param([(1, 3), (0, 2)],
                 r"spans\[0\] = \(1, 3\) must be a list of \(start, stop\) pairs, not a pair: "
                 + PER_REQUEST, id="flat-pairs"),
    pytest.param([1, 3], r"spans\[0\] must be a list of \(start, stop\) pairs, got int 1: "
                 + PER_REQUEST, id="flat-ints"),
    pytest.param({0: [(1, 3)], 1: [(0, 2)]},
                 r"spans must be a list of lists of \(start, stop\) pairs, got dict: " + PER_REQUEST,
                 id="dict"),
    pytest.param("0:3", r"spans must be a list of lists of \(start, stop\) pairs, got str",
                 id="string"),
    pytest.param(([(1, 3)], [(0, 2)]).__iter__(),
                 r"spans must be a list of lists of \(start, stop\) pairs, got tuple_iterator",
                 id="iterator"),
    pytest.param([[(1, 3)], [None]], r"spans\[1\]\[0\] must be a \(start, stop\) pair, got NoneType None",
                 id="span-none"),
    pytest.param([[(1, 3.0)], [(0, 2)]],
                 r"spans\[0\]\[0\] = \(1, 3\.0\) must hold ints \(Python or numpy integers\), got float 3\.0",
                 id="float-stop"),
    pytest.param([[(1, 3)], [(0.5, 2)]],
                 r"spans\[1\]\[0\] = \(0\.5, 2\) must hold ints \(Python or numpy integers\), got float 0\.5",
                 id="fractional-start"),
    pytest.param([[(1, 3), (True, 9)], [(0, 2)]],
                 r"spans\[0\]\[1\] = \(True, 9\) must hold ints \(Python or numpy integers\), got bool True",
                 id="bool-start"),
])
def test_spans_of_wrong_type(case: Case, spans, pattern: str) -> None:
    """Before: ``object of type 'int' has no len()`` for a flat list, and int(0.5) == 0."""
    rejected(case, TypeError, pattern, lambda: full_step(case, spans=spans))


def test_numpy_int_spans_are_accepted(case: Case) -> None:
    spans = [[(np.int64(1), np.int32(3)), (np.int16(6), 9)], np.array([[0, 2]])]
    built = sf.SpanLayout.build(spans, np.array(SEQ_LENS), case.block_table, P)
    assert built.positions.tolist() == case.layout.positions.tolist()
    assert built.query_start_loc.tolist() == case.layout.query_start_loc.tolist()


@pytest.mark.parametrize("seq_lens, exc, pattern", [
    pytest.param(10, TypeError, r"seq_lens must be a list of ints or a 1-D int tensor, got int",
                 id="scalar"),
    pytest.param([10.0, 7], TypeError, r"seq_lens\[0\] must be an int, got float 10\.0", id="float"),
    pytest.param(torch.tensor([10.0, 7.0]), TypeError, r"seq_lens must be int32 or int64, got torch\.float32",
                 id="float-tensor"),
    pytest.param(torch.tensor([[10], [7]]), ValueError, r"seq_lens must be 1-D, got shape \(2, 1\)",
                 id="2d-tensor"),
])
def test_seq_lens_of_wrong_type(case: Case, seq_lens, exc: type[Exception], pattern: str) -> None:
    rejected(case, exc, pattern, lambda: full_step(case, seq_lens=seq_lens))


@pytest.mark.parametrize("kind", ["list", "ndarray"])
def test_block_table_not_a_tensor(case: Case, kind: str) -> None:
    """Before: AttributeError 'list' object has no attribute 'device'."""
    table = case.block_table.tolist() if kind == "list" else case.block_table.numpy()
    rejected(case, TypeError,
             rf"block_table must be a torch\.Tensor \(\[B, max_pages\] int32\), got {kind}",
             lambda: full_step(case, block_table=table))


# ----------------------------------------------------------------------------- metadata tensors

def test_positions_not_increasing(case: Case) -> None:
    m = good_tensors(case)
    m["positions"][2] = m["positions"][1]  # request 0: 1, 2, 2, 7, 8
    rejected(case, ValueError,
             r"positions must be strictly increasing within a request: positions\[2\]=2 <= "
             r"positions\[1\]=2 in request 0", lambda: tensor_step(case, **m))


def test_positions_decreasing(case: Case) -> None:
    m = good_tensors(case)
    m["positions"][5:7] = torch.tensor([1, 0], dtype=torch.int32)  # request 1
    rejected(case, ValueError, r"positions\[6\]=0 <= positions\[5\]=1 in request 1",
             lambda: tensor_step(case, **m))


def test_positions_negative(case: Case) -> None:
    m = good_tensors(case)
    m["positions"][5] = -3
    rejected(case, ValueError, r"positions\[5\] = -3 is negative \(request 1\)",
             lambda: tensor_step(case, **m))


def test_positions_past_seq_len(case: Case) -> None:
    m = good_tensors(case)
    m["positions"][6] = 7  # seq_lens[1] = 7
    rejected(case, ValueError, r"positions\[6\] = 7 is outside \[0, seq_lens\[1\]=7\)",
             lambda: tensor_step(case, **m))


@pytest.mark.parametrize("qsl, pattern", [
    pytest.param([1, 5, 7], r"query_start_loc\[0\] must be 0, got 1", id="start"),
    pytest.param([0, 5, 6], r"query_start_loc\[-1\]=6 must equal positions.shape\[0\]=7", id="end"),
    pytest.param([0, 8, 7], r"query_start_loc\[2\] < query_start_loc\[1\]", id="decreasing"),
    pytest.param([0, 7], r"query_start_loc has 2 entries, expected B\+1=3", id="length"),
])
def test_bad_query_start_loc(case: Case, qsl: list[int], pattern: str) -> None:
    m = good_tensors(case)
    m["qsl"] = torch.tensor(qsl, dtype=torch.int32)
    rejected(case, ValueError, pattern, lambda: tensor_step(case, **m))


def test_seq_lens_negative(case: Case) -> None:
    m = good_tensors(case)
    m["seq_lens"][1] = -1
    rejected(case, ValueError, r"seq_lens\[1\] = -1 is negative", lambda: tensor_step(case, **m))


@pytest.mark.parametrize("how", ["tensors", "spans"])
def test_seq_lens_beyond_block_table(case: Case, how: str) -> None:
    """Request 1 claims 17 positions; its block table row covers 4 pages of 4."""
    pattern = r"seq_lens\[1\] = 17 is larger than block_table covers \(4 pages x page_size 4\)"
    if how == "spans":
        rejected(case, ValueError, pattern, lambda: full_step(case, seq_lens=[10, 17]))
    else:
        m = good_tensors(case)
        m["seq_lens"][1] = 17
        rejected(case, ValueError, pattern, lambda: tensor_step(case, **m))


def test_block_table_hole_inside_seq_len(case: Case) -> None:
    """-1 marks "no page"; request 0 needs its page 1 for positions 4..7."""
    table = case.block_table.clone()
    table[0, 1] = -1
    rejected(case, ValueError, r"block_table\[0, 1\] = -1 is not a page, but request 0 needs it",
             lambda: full_step(case, block_table=table))


def test_block_table_minus_one_past_seq_len_is_fine(case: Case) -> None:
    """Entries past ceil(seq_len / page_size) are never read: -1 or garbage is accepted."""
    table = case.block_table.clone()
    table[1, 2:] = torch.tensor([-1, 10**6], dtype=torch.int32)
    full_step(case, block_table=table)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["append_kv", "span_prefill"])
def test_page_id_outside_pool(case: Case, op: str, backend: str) -> None:
    """The layout is valid on its own; the pool it is used with has only 8 pages."""
    table = case.block_table.clone()
    table[1, 1] = NUM_PAGES  # one past the last page
    layout = sf.SpanLayout.build(SPANS, SEQ_LENS, table, P)
    pattern = (r"block_table\[1, 1\] = 8 is not a page of the pool \(num_pages=8\); "
               r"request 1 needs it for seq_lens\[1\]=7")
    if op == "append_kv":
        call = lambda: sf.append_kv(case.k_new, case.v_new, case.k_cache, case.v_cache, layout,  # noqa: E731
                                    backend=backend)
    else:
        call = lambda: sf.span_prefill(case.q, case.k_cache, case.v_cache, layout,  # noqa: E731
                                       backend=backend)
    rejected(case, ValueError, pattern, call)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slot_mapping_outside_pool(case: Case, backend: str) -> None:
    m = good_tensors(case)
    slots = case.layout.slot_mapping.clone()
    slots[3] = NUM_PAGES * P
    rejected(case, ValueError,
             r"slot_mapping\[3\] = 32 is outside the pool \[0, num_pages\*page_size=32\) and is not -1",
             lambda: tensor_step(case, **m, slot_mapping=slots, backend=backend))


def test_slot_mapping_float(case: Case) -> None:
    m = good_tensors(case)
    slots = case.layout.slot_mapping.double() + 0.5
    rejected(case, TypeError, r"slot_mapping must be an int32 or int64 tensor, got torch.float64",
             lambda: tensor_step(case, **m, slot_mapping=slots))


@pytest.mark.parametrize("page_size", [0, -4, 2.0, True, None])
def test_bad_page_size(case: Case, page_size) -> None:
    rejected(case, ValueError, r"page_size must be an int >= 1, got " + re.escape(repr(page_size)),
             lambda: full_step(case, page_size=page_size))


def test_page_size_differs_from_cache(case: Case) -> None:
    """A layout for pages of 2 used with a cache of pages of 4."""
    table = torch.arange(16, dtype=torch.int32).reshape(2, 8)
    rejected(case, ValueError,
             r"k_cache has page_size 4 \(dim 1\) but layout.page_size is 2",
             lambda: full_step(case, block_table=table, page_size=2))


@pytest.mark.parametrize("name", ["positions", "qsl", "seq_lens", "block_table"])
def test_metadata_float_dtype(case: Case, name: str) -> None:
    m = good_tensors(case)
    m[name] = m[name].float()
    label = "query_start_loc" if name == "qsl" else name
    rejected(case, TypeError, rf"{label} must be int32 or int64, got torch.float32",
             lambda: tensor_step(case, **m))


@pytest.mark.parametrize("name, index, pattern", [
    ("positions", (4,), r"positions\[4\] = 429496\d+ does not fit in int32"),
    ("block_table", (1, 0), r"block_table\[1, 0\] = 429496\d+ does not fit in int32"),
    ("seq_lens", (0,), r"seq_lens\[0\] = 429496\d+ does not fit in int32"),
])
def test_int64_metadata_out_of_int32_range(case: Case, name: str, index: tuple[int, ...],
                                           pattern: str) -> None:
    """Before the fix these wrapped silently (page 2**32 + p became page p)."""
    m = {k: v.long() for k, v in good_tensors(case).items()}
    m[name][index] += 2**32
    rejected(case, ValueError, pattern, lambda: tensor_step(case, **m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_metadata_is_accepted(case: Case, backend: str) -> None:
    """int64 and int32 metadata give bit-identical caches and outputs."""
    results = []
    for dtype in (torch.int32, torch.int64):
        m = {k: v.to(dtype) for k, v in good_tensors(case).items()}
        k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
        layout = sf.SpanLayout.from_tensors(m["positions"], m["qsl"], m["seq_lens"],
                                            m["block_table"], P)
        sf.append_kv(case.k_new, case.v_new, k_cache, v_cache, layout, backend=backend)
        o = sf.span_prefill(case.q, k_cache, v_cache, layout, backend=backend)
        results.append(tensor_digest(k_cache, v_cache, o))
    assert results[0] == results[1]


# ----------------------------------------------------------------------------- valid_lens

def padded_inputs(b: int = 2, s: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(b, s, HQ, D, generator=gen), torch.randn(b, s, HK, D, generator=gen),
            torch.randn(b, s, HK, D, generator=gen))


def padded_rejected(exc: type[Exception], pattern: str, q, k, v, valid_lens, **kw) -> None:
    """padded_prefill raises and leaves its inputs unchanged (meta tensors hold no data)."""
    readable = [t for t in (q, k, v) if t.device.type != "meta"]
    before = tensor_digest(*readable)
    with pytest.raises(exc, match=pattern):
        sf.padded_prefill(q, k, v, valid_lens, **kw)
    assert tensor_digest(*readable) == before


@pytest.mark.parametrize("lens, pattern", [
    pytest.param([3, -1], r"valid_lens\[1\] = -1 is outside \[0, S=6\]", id="negative"),
    pytest.param([7, 2], r"valid_lens\[0\] = 7 is outside \[0, S=6\]", id="above-S"),
])
def test_valid_lens_out_of_range(lens: list[int], pattern: str) -> None:
    padded_rejected(ValueError, pattern, *padded_inputs(), torch.tensor(lens))


def test_valid_lens_wrong_length() -> None:
    padded_rejected(ValueError, r"valid_lens has 3 entries but the batch has B=2",
                    *padded_inputs(), torch.tensor([1, 2, 3]))


def test_valid_lens_wrong_dtype_and_rank() -> None:
    q, k, v = padded_inputs()
    padded_rejected(TypeError, r"valid_lens must be int32 or int64, got torch.float32",
                    q, k, v, torch.tensor([1.0, 2.0]))
    padded_rejected(ValueError, r"valid_lens must be 1-D, got shape \(2, 1\)",
                    q, k, v, torch.tensor([[1], [2]]))


def test_padding_side() -> None:
    padded_rejected(ValueError, r"padding_side must be 'right' or 'left', got 'middle'",
                    *padded_inputs(), torch.tensor([1, 2]), padding_side="middle")


# ----------------------------------------------------------------------------- q / k / v / cache

@pytest.mark.parametrize("backend", BACKENDS)
def test_q_dtype_differs_from_cache(case: Case, backend: str) -> None:
    rejected(case, TypeError, r"k_cache has dtype torch.float32 but q has torch.float16",
             lambda: sf.span_prefill(case.q.half(), case.k_cache, case.v_cache, case.layout,
                                     backend=backend))


def test_k_cache_v_cache_differ(case: Case) -> None:
    rejected(case, TypeError, r"v_cache has dtype torch.float16 but k_cache has torch.float32",
             lambda: sf.append_kv(case.k_new, case.v_new, case.k_cache, case.v_cache.half(),
                                  case.layout))
    rejected(case, ValueError,
             r"k_cache has shape \(8, 4, 2, 32\) but v_cache has \(7, 4, 2, 32\)",
             lambda: sf.append_kv(case.k_new, case.v_new, case.k_cache, case.v_cache[:7],
                                  case.layout))


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_kv_dtype_differs_from_cache(case: Case, backend: str) -> None:
    rejected(case, TypeError, r"v_new has dtype torch.float16 but k_cache has torch.float32",
             lambda: sf.append_kv(case.k_new, case.v_new.half(), case.k_cache, case.v_cache,
                                  case.layout, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which, shape, pattern", [
    pytest.param("k_new", (6, HK, D), r"k_new has shape \(6, 2, 32\), expected \[T, Hk, D\] = \(7, 2, 32\)",
                 id="rows"),
    pytest.param("v_new", (7, 1, D), r"v_new has shape \(7, 1, 32\), expected", id="heads"),
    pytest.param("v_new", (7, HK, 64), r"v_new has shape \(7, 2, 64\), expected", id="head-dim"),
])
def test_new_kv_shape(case: Case, which: str, shape, pattern: str, backend: str) -> None:
    new = {"k_new": case.k_new, "v_new": case.v_new}
    new[which] = torch.randn(*shape)
    rejected(case, ValueError, pattern,
             lambda: sf.append_kv(new["k_new"], new["v_new"], case.k_cache, case.v_cache,
                                  case.layout, backend=backend))


def test_q_rows_differ_from_layout(case: Case) -> None:
    rejected(case, ValueError, r"q has 6 rows but layout has 7 span tokens",
             lambda: sf.span_prefill(case.q[:6], case.k_cache, case.v_cache, case.layout))


def test_q_head_dim_differs_from_cache(case: Case) -> None:
    q = torch.randn(7, HQ, 64)
    rejected(case, ValueError, r"k_cache has head dim 32 but q has 64",
             lambda: sf.span_prefill(q, case.k_cache, case.v_cache, case.layout))


@pytest.mark.parametrize("bad, pattern", [
    pytest.param("rank", r"q must have 3 dimensions, got shape \(7, 128\)", id="rank"),
    pytest.param("int", r"q must be float16, bfloat16 or float32, got torch.int64", id="int"),
    pytest.param("list", r"q must be a torch.Tensor, got list", id="not-a-tensor"),
])
def test_q_not_a_float_tensor(case: Case, bad: str, pattern: str) -> None:
    q = {"rank": case.q.reshape(7, -1), "int": case.q.long(), "list": case.q.tolist()}[bad]
    exc = ValueError if bad == "rank" else TypeError
    rejected(case, exc, pattern, lambda: sf.span_prefill(q, case.k_cache, case.v_cache, case.layout))


def test_layout_not_a_layout(case: Case) -> None:
    rejected(case, TypeError, r"layout must be a SpanLayout, got dict",
             lambda: sf.append_kv(case.k_new, case.v_new, case.k_cache, case.v_cache, {}))


def test_padded_shape_mismatches() -> None:
    q, k, v = padded_inputs()
    padded_rejected(ValueError, r"k has batch/seq shape \(2, 5\) but q has \(2, 6\)",
                    q, k[:, :5], v[:, :5], torch.tensor([1, 2]))
    padded_rejected(ValueError, r"k has shape \(2, 6, 2, 32\) but v has \(2, 6, 1, 32\)",
                    q, k, v[:, :, :1], torch.tensor([1, 2]))
    padded_rejected(TypeError, r"v has dtype torch.float16 but q has torch.float32",
                    q, k, v.half(), torch.tensor([1, 2]))


def test_varlen_bad_cu_seqlens() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(5, HQ, D, generator=gen), torch.randn(5, HK, D, generator=gen)
    for cu, pattern in (([0, 3], r"cu_seqlens must start at 0 and end at T=5, got 0..3"),
                        ([1, 5], r"cu_seqlens must start at 0 and end at T=5, got 1..5"),
                        ([0, 4, 2, 5], r"cu_seqlens\[2\] < cu_seqlens\[1\]")):
        with pytest.raises(ValueError, match=pattern):
            sf.varlen_prefill(q, k, k.clone(), torch.tensor(cu))
    with pytest.raises(ValueError, match=r"k has 4 rows but q has 5"):
        sf.varlen_prefill(q, k[:4], k[:4], torch.tensor([0, 5]))


@pytest.mark.parametrize("dtype, shown", [
    pytest.param(torch.int8, "torch.int8", id="int8"),
    pytest.param(torch.float64, "torch.float64", id="float64"),
    pytest.param(torch.float8_e4m3fnuz, "torch.float8_e4m3fnuz", id="float8-fnuz"),
    pytest.param("float16", "'float16'", id="string"),
    pytest.param(np.float16, "<class 'numpy.float16'>", id="numpy-type"),
])
def test_paged_kv_cache_dtype(dtype, shown: str) -> None:
    """Only the dtypes the ops take; before, the pool was built and every op call failed."""
    with pytest.raises(TypeError, match=r"dtype must be torch\.float16, torch\.bfloat16, "
                                        r"torch\.float32, torch\.float8_e4m3fn or "
                                        r"torch\.float8_e5m2, got " + re.escape(shown)):
        sf.PagedKVCache(4, 4, HK, D, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32,
                                   torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=["fp16", "bf16", "fp32", "fp8-e4m3", "fp8-e5m2"])
def test_paged_kv_cache_dtypes_accepted(dtype: torch.dtype) -> None:
    assert sf.PagedKVCache(4, 4, HK, D, dtype=dtype).k_cache.dtype == dtype


# ----------------------------------------------------------------------------- sm_scale

ATTENTION_OPS = ["padded_prefill", "varlen_prefill", "span_prefill"]


def attention_call(case: Case, op: str, **kw) -> Callable[[], torch.Tensor]:
    """One call of an attention op on the standard inputs (span_prefill on the case's cache)."""
    if op == "span_prefill":
        return lambda: sf.span_prefill(case.q, case.k_cache, case.v_cache, case.layout, **kw)
    if op == "varlen_prefill":
        q, k = case.q, case.k_new
        return lambda: sf.varlen_prefill(q, k, k.clone(), torch.tensor([0, 5, 7]), **kw)
    q, k, v = padded_inputs()
    return lambda: sf.padded_prefill(q, k, v, torch.tensor([6, 2]), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ATTENTION_OPS)
@pytest.mark.parametrize("sm_scale, exc, pattern", [
    pytest.param(float("nan"), ValueError,
                 r"sm_scale must be a finite number > 0 \(None: 1/sqrt\(D\)\), got nan", id="nan"),
    pytest.param(float("inf"), ValueError, r"sm_scale must be a finite number > 0 .*got inf", id="inf"),
    pytest.param(0, ValueError, r"sm_scale must be a finite number > 0 .*got 0$", id="zero"),
    pytest.param(-0.125, ValueError, r"sm_scale must be a finite number > 0 .*got -0\.125", id="negative"),
    pytest.param(np.float32("nan"), ValueError, r"sm_scale must be a finite number > 0", id="numpy-nan"),
    pytest.param(True, TypeError,
                 r"sm_scale must be None or a real number \(int, float or numpy scalar\), got bool True",
                 id="bool"),
    pytest.param("0.1", TypeError, r"sm_scale must be None or a real number .*got str '0\.1'", id="string"),
    pytest.param(torch.tensor(0.1), TypeError, r"sm_scale must be None or a real number .*got Tensor",
                 id="tensor"),
    pytest.param(1 + 0j, TypeError, r"sm_scale must be None or a real number .*got complex", id="complex"),
])
def test_bad_sm_scale(case: Case, op: str, sm_scale, exc: type[Exception], pattern: str,
                      backend: str) -> None:
    rejected(case, exc, pattern, attention_call(case, op, sm_scale=sm_scale, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ATTENTION_OPS)
@pytest.mark.parametrize("sm_scale, same_as", [
    pytest.param(1, 1.0, id="int"),
    pytest.param(np.float32(0.25), 0.25, id="numpy-float32"),
    pytest.param(np.float64(0.25), 0.25, id="numpy-float64"),
    pytest.param(np.int64(2), 2.0, id="numpy-int64"),
])
def test_sm_scale_numbers_are_accepted(case: Case, op: str, sm_scale, same_as: float,
                                       backend: str) -> None:
    got = attention_call(case, op, sm_scale=sm_scale, backend=backend)()
    want = attention_call(case, op, sm_scale=same_as, backend=backend)()
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- heads

@pytest.mark.parametrize("hq", [3, 0])
def test_q_heads_not_a_multiple_of_kv_heads(case: Case, hq: int) -> None:
    q = torch.randn(7, hq, D)
    rejected(case, ValueError, rf"q has {hq} heads \(dim -2\) and k_cache has 2: the number of q "
             r"heads must be a positive multiple", lambda: sf.span_prefill(q, case.k_cache,
                                                                            case.v_cache, case.layout))


def test_padded_heads_not_a_multiple() -> None:
    q, k, v = padded_inputs()
    padded_rejected(ValueError, r"q has 4 heads \(dim -2\) and k has 3", q, k[:, :, :1].expand(-1, -1, 3, -1),
                    v[:, :, :1].expand(-1, -1, 3, -1), torch.tensor([1, 2]))


@pytest.mark.parametrize("head_dim", [0, 8, 12, 100, 264, 512])
def test_unsupported_head_dim(head_dim: int) -> None:
    """Head dims must be multiples of 8 in [16, 256]."""
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(NUM_PAGES, P, HK, head_dim, generator=gen)
    v_cache = torch.randn(NUM_PAGES, P, HK, head_dim, generator=gen)
    layout = sf.SpanLayout.build(SPANS, SEQ_LENS, torch.arange(8, dtype=torch.int32).reshape(2, 4), P)
    before = tensor_digest(k_cache, v_cache)
    with pytest.raises(ValueError, match=rf"head dim {head_dim} of q is not supported"):
        sf.span_prefill(torch.randn(7, HQ, head_dim), k_cache, v_cache, layout)
    assert tensor_digest(k_cache, v_cache) == before


# ----------------------------------------------------------------------------- strides

def _strided_last(t: torch.Tensor) -> torch.Tensor:
    """The same values with last-dim stride 2 (a view of a wider tensor)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("which", ["q", "k_cache", "v_cache", "k_new", "v_new"])
def test_non_contiguous_last_dim(case: Case, which: str) -> None:
    args = {"q": case.q, "k_cache": case.k_cache, "v_cache": case.v_cache,
            "k_new": case.k_new, "v_new": case.v_new}
    args[which] = _strided_last(args[which])
    pattern = rf"{which} must be contiguous in its last dimension"

    def step() -> None:
        sf.append_kv(args["k_new"], args["v_new"], args["k_cache"], args["v_cache"], case.layout)
        sf.span_prefill(args["q"], args["k_cache"], args["v_cache"], case.layout)

    if which == "q":
        # append_kv has no q: it runs and writes, so compare against a run without q.
        with pytest.raises(ValueError, match=pattern):
            sf.span_prefill(args["q"], case.k_cache, case.v_cache, case.layout)
        return
    rejected(case, ValueError, pattern, step)
    # The written cache of a strided view is the view's base, also unchanged.
    if which in ("k_cache", "v_cache"):
        assert torch.equal(args[which], getattr(case, which))


def test_non_contiguous_other_dims_are_fine(case: Case) -> None:
    """Only the last dim must be dense: a head-sliced q is accepted and correct."""
    wide = torch.randn(7, 2 * HQ, D)
    q = wide[:, ::2]
    o = sf.span_prefill(q, case.k_cache, case.v_cache, case.layout)
    o_ref = sf.span_prefill(q.contiguous(), case.k_cache, case.v_cache, case.layout)
    assert torch.equal(o, o_ref)


# ----------------------------------------------------------------------------- devices

def test_k_on_another_device() -> None:
    """Device mismatches are checked before any data is touched: meta stands in for a GPU."""
    q, k, v = padded_inputs()
    padded_rejected(ValueError, r"k is on meta but q is on cpu", q, k.to("meta"), v,
                    torch.tensor([1, 2]))
    padded_rejected(ValueError, r"valid_lens is on meta but q is on cpu", q, k, v,
                    torch.tensor([1, 2], device="meta"))


def _meta_layout(case: Case) -> sf.SpanLayout:
    m = {k: v.to("meta") for k, v in good_tensors(case).items()}
    return sf.SpanLayout.from_tensors(m["positions"], m["qsl"], m["seq_lens"], m["block_table"],
                                      P, validate=False)


@pytest.mark.parametrize("op, moved, pattern", [
    pytest.param("span_prefill", ("q",), r"q is on meta but k_cache is on cpu", id="span-q"),
    pytest.param("span_prefill", ("k_cache",), r"k_cache is on meta but v_cache is on cpu",
                 id="span-k_cache"),
    pytest.param("span_prefill", ("v_cache",), r"v_cache is on meta but k_cache is on cpu",
                 id="span-v_cache"),
    pytest.param("span_prefill", ("layout",), r"layout is on meta but k_cache is on cpu",
                 id="span-layout"),
    pytest.param("append_kv", ("k_new",), r"k_new is on meta but k_cache is on cpu", id="append-k_new"),
    pytest.param("append_kv", ("v_new",), r"v_new is on meta but k_cache is on cpu", id="append-v_new"),
    pytest.param("append_kv", ("k_cache", "v_cache"), r"k_cache is on meta but k_new is on cpu",
                 id="append-both-caches"),
    pytest.param("append_kv", ("layout",), r"layout is on meta but k_cache is on cpu",
                 id="append-layout"),
])
def test_one_argument_on_another_device(case: Case, op: str, moved: tuple[str, ...],
                                        pattern: str) -> None:
    """The message names the argument that disagrees with the others, and where they are.

    (Before, q on another device than the cache read "k_cache is on cpu but the new
    tokens are on meta", blaming the cache.)
    """
    args = {"q": case.q, "k_new": case.k_new, "v_new": case.v_new, "k_cache": case.k_cache,
            "v_cache": case.v_cache, "layout": case.layout}
    for name in moved:
        args[name] = _meta_layout(case) if name == "layout" else args[name].to("meta")
    if op == "span_prefill":
        call = lambda: sf.span_prefill(args["q"], args["k_cache"], args["v_cache"],  # noqa: E731
                                       args["layout"])
    else:
        call = lambda: sf.append_kv(args["k_new"], args["v_new"], args["k_cache"],  # noqa: E731
                                    args["v_cache"], args["layout"])
    rejected(case, ValueError, pattern, call)


def test_metadata_on_mixed_devices(case: Case) -> None:
    m = good_tensors(case)
    m["block_table"] = m["block_table"].to("meta")
    rejected(case, ValueError, r"block_table is on meta but positions is on cpu",
             lambda: tensor_step(case, **m))


@pytest.mark.gpu
def test_cache_on_cpu_q_on_gpu(case: Case) -> None:
    layout = sf.SpanLayout.build(SPANS, SEQ_LENS, case.block_table.cuda(), P)
    rejected(case, ValueError, r"k_cache is on cpu but k_new is on cuda:0",
             lambda: sf.append_kv(case.k_new.cuda(), case.v_new.cuda(), case.k_cache,
                                  case.v_cache, layout))
    rejected(case, ValueError, r"q is on cuda:0 but k_cache is on cpu",
             lambda: sf.span_prefill(case.q.cuda(), case.k_cache, case.v_cache, layout))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cache_on_another_gpu(case: Case) -> None:
    layout = sf.SpanLayout.build(SPANS, SEQ_LENS, case.block_table.to("cuda:0"), P)
    k_cache, v_cache = case.k_cache.to("cuda:1"), case.v_cache.to("cuda:1")
    before = tensor_digest(k_cache, v_cache)
    with pytest.raises(ValueError, match=r"k_cache is on cuda:1 but k_new is on cuda:0"):
        sf.append_kv(case.k_new.cuda(), case.v_new.cuda(), k_cache, v_cache, layout)
    assert tensor_digest(k_cache, v_cache) == before


# ----------------------------------------------------------------------------- empty and zero-size

@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend: str) -> None:
    """B = 0 is accepted everywhere and gives empty outputs."""
    layout = sf.SpanLayout.build([], [], torch.zeros(0, 1, dtype=torch.int32), P)
    k_cache, v_cache = torch.randn(NUM_PAGES, P, HK, D), torch.randn(NUM_PAGES, P, HK, D)
    before = tensor_digest(k_cache, v_cache)
    empty_kv = torch.zeros(0, HK, D)
    sf.append_kv(empty_kv, empty_kv, k_cache, v_cache, layout, backend=backend)
    o, lse = sf.span_prefill(torch.zeros(0, HQ, D), k_cache, v_cache, layout, return_lse=True,
                             backend=backend)
    assert o.shape == (0, HQ, D) and lse.shape == (0, HQ)
    assert tensor_digest(k_cache, v_cache) == before
    o = sf.padded_prefill(torch.zeros(0, 5, HQ, D), torch.zeros(0, 5, HK, D),
                          torch.zeros(0, 5, HK, D), torch.zeros(0, dtype=torch.int32),
                          backend=backend)
    assert o.shape == (0, 5, HQ, D)
    o = sf.varlen_prefill(torch.zeros(0, HQ, D), empty_kv, empty_kv, torch.zeros(1, dtype=torch.int32),
                          backend=backend)
    assert o.shape == (0, HQ, D)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_span_tokens(case: Case, backend: str) -> None:
    """Requests with no holes at all: T = 0, nothing written, empty output."""
    layout = sf.SpanLayout.build([[], []], SEQ_LENS, case.block_table, P)
    before = case.digest()
    sf.append_kv(torch.zeros(0, HK, D), torch.zeros(0, HK, D), case.k_cache, case.v_cache, layout,
                 backend=backend)
    assert sf.span_prefill(torch.zeros(0, HQ, D), case.k_cache, case.v_cache, layout,
                           backend=backend).shape == (0, HQ, D)
    assert case.digest() == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_padded(backend: str) -> None:
    """S = 0 and valid_len = 0: outputs exist, padded rows are exactly 0, lse -inf."""
    o = sf.padded_prefill(torch.zeros(2, 0, HQ, D), torch.zeros(2, 0, HK, D),
                          torch.zeros(2, 0, HK, D), torch.zeros(2, dtype=torch.int32),
                          backend=backend)
    assert o.shape == (2, 0, HQ, D)
    q, k, v = padded_inputs()
    o, lse = sf.padded_prefill(q, k, v, torch.zeros(2, dtype=torch.int64), return_lse=True,
                               backend=backend)
    assert torch.equal(o, torch.zeros_like(o))
    assert bool(torch.isneginf(lse).all())


def test_empty_pool_with_empty_requests() -> None:
    """A pool of 0 pages is fine while no request needs a page."""
    layout = sf.SpanLayout.build([[]], [0], torch.full((1, 1), -1, dtype=torch.int32), P)
    empty = torch.zeros(0, P, HK, D)
    sf.append_kv(torch.zeros(0, HK, D), torch.zeros(0, HK, D), empty, empty.clone(), layout)


def test_empty_pool_with_a_request() -> None:
    layout = sf.SpanLayout.build([[(0, 1)]], [1], torch.zeros(1, 1, dtype=torch.int32), P)
    empty = torch.zeros(0, P, HK, D)
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = 0 is not a page of the pool \(num_pages=0\)"):
        sf.append_kv(torch.zeros(1, HK, D), torch.zeros(1, HK, D), empty, empty.clone(), layout)


# ----------------------------------------------------------------------------- NaN / inf policy

@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_outside_every_request_never_leaks(case: Case, backend: str) -> None:
    """NaN/inf in free pages and past seq_len (another user's data) must not reach any output.

    Inputs are not scanned for NaN (too slow); the promise is isolation: only the
    KV positions [0, seq_len) of a request's own pages can affect its rows.
    """
    used = _pages_in_use(case)
    poisoned = torch.ones(NUM_PAGES, P, dtype=torch.bool)
    for b, n in enumerate(SEQ_LENS):
        pos = torch.arange(n)
        poisoned[case.block_table[b, pos // P].long(), pos % P] = False
    assert used < NUM_PAGES and bool(poisoned.any())
    clean_k, clean_v = case.k_cache.clone(), case.v_cache.clone()
    case.k_cache[poisoned] = float("nan")
    case.v_cache[poisoned] = float("inf")
    sf.append_kv(case.k_new, case.v_new, case.k_cache, case.v_cache, case.layout, backend=backend)
    sf.append_kv(case.k_new, case.v_new, clean_k, clean_v, case.layout, backend=backend)
    for causal in (True, False):
        o, lse = sf.span_prefill(case.q, case.k_cache, case.v_cache, case.layout, causal=causal,
                                 return_lse=True, backend=backend)
        o_clean, lse_clean = sf.span_prefill(case.q, clean_k, clean_v, case.layout, causal=causal,
                                             return_lse=True, backend=backend)
        assert bool(torch.isfinite(o).all()) and bool(torch.isfinite(lse).all())
        assert torch.equal(o, o_clean) and torch.equal(lse, lse_clean)


def _pages_in_use(case: Case) -> int:
    return int((case.block_table >= 0).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_one_query_row_stays_in_that_row(case: Case, backend: str) -> None:
    q = case.q.clone()
    q[2, 1] = float("nan")  # token 2, q head 1
    sf.append_kv(case.k_new, case.v_new, case.k_cache, case.v_cache, case.layout, backend=backend)
    o = sf.span_prefill(q, case.k_cache, case.v_cache, case.layout, backend=backend)
    o_clean = sf.span_prefill(case.q, case.k_cache, case.v_cache, case.layout, backend=backend)
    bad = torch.zeros(o.shape[:2], dtype=torch.bool)
    bad[2, 1] = True
    assert bool(torch.isnan(o[bad]).all())
    assert torch.equal(o[~bad], o_clean[~bad])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_visible_kv_propagates(case: Case, backend: str) -> None:
    """A NaN in position 0 of request 1 is seen by all its rows: they are NaN, not hidden."""
    slot = int(case.block_table[1, 0]) * P
    case.k_cache[slot // P, 0] = float("nan")
    o = sf.span_prefill(case.q, case.k_cache, case.v_cache, case.layout, backend=backend)
    assert bool(torch.isnan(o[5:]).all())  # request 1 owns rows 5, 6
    assert bool(torch.isfinite(o[:5]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_nan_in_padding_never_leaks(backend: str, padding_side: str) -> None:
    """Padded q/k/v rows may hold anything: valid rows are unaffected, padded rows are 0."""
    q, k, v = padded_inputs()
    lens = torch.tensor([4, 0])
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0, :4] = False
    if padding_side == "left":
        pad = pad.flip(1)
    clean = sf.padded_prefill(q, k, v, lens, padding_side=padding_side, backend=backend)
    for t, value in ((q, float("nan")), (k, float("inf")), (v, float("nan"))):
        t[pad] = value
    o, lse = sf.padded_prefill(q, k, v, lens, padding_side=padding_side, return_lse=True,
                               backend=backend)
    assert torch.equal(o, clean)
    assert torch.equal(o[pad], torch.zeros_like(o[pad]))
    assert bool(torch.isneginf(lse[pad]).all()) and bool(torch.isfinite(lse[~pad]).all())


# ----------------------------------------------------------------------------- validate=False

def test_unvalidated_layout_skips_checks(case: Case) -> None:
    """validate=False promises no host sync: neither the metadata nor the pool is checked.

    Bad metadata is then undefined behaviour; this only pins down that no check
    runs (so a CUDA graph can capture the step).
    """
    m = good_tensors(case)
    m["positions"][2] = m["positions"][1]
    layout = sf.SpanLayout.from_tensors(m["positions"], m["qsl"], m["seq_lens"], m["block_table"],
                                        P, validate=False)
    assert not layout.validated
    layout.check_pool(1)  # would raise for a validated layout: pages 0..7 are not all < 1
