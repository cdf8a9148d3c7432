"""Context-parallel segmented prefill: 2 and 4 gloo ranks on the CPU (loopback only),
and 2 NCCL ranks on GPUs, each against the single-process result over the whole cache.

Each spawned rank rebuilds the same random case from its seed, so nothing but the
collectives under test crosses processes; a failing check raises in the rank and
``torch.multiprocessing.spawn`` re-raises it here.
"""

from __future__ import annotations

import datetime
import os
import random
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spanfill as sf
from spanfill import reference
from spanfill.distributed import row_range, shard_layout, span_prefill_cp
from spanfill.testing import rel_err


HQ, HK, D = 4, 2, 32


def normalise(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint spans: overlapping or touching ones are joined."""
    out: list[list[int]] = []
    for start, stop in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return [(a, b) for a, b in out]


def make_case(seed: int, world: int) -> dict:
    """Requests, spans, each rank's position range, and all K/V values (the same on every rank).

    Shard boundaries are random per request (some ranks hold nothing of a request,
    ranks are not in position order); spans straddle and touch the boundaries.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    page_size = rng.choice([1, 5, 16])
    seq_lens = [rng.randint(1, 90) for _ in range(3)] + [rng.choice([0, 1, 2 * page_size])]
    order = list(range(world))
    rng.shuffle(order)  # rank r holds the order[r]-th range of each request
    cuts, spans = [], []
    for s in seq_lens:
        c = sorted([0, s] + [rng.randint(0, s) for _ in range(world - 1)])
        cuts.append(c)
        near = [(max(0, x - rng.randint(0, 2)), min(s, x + rng.randint(1, 3))) for x in c[1:-1]]
        starts = [rng.randrange(s) for _ in range(rng.randint(0, 4) if s else 0)]
        rand = [(a, min(s, a + rng.randint(1, 6))) for a in starts]
        spans.append(normalise([p for p in near + rand if p[0] < p[1]]))
    full_len = [max(1, -(-s // page_size)) for s in seq_lens]
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    truth_k = [rnd(s, HK, D) for s in seq_lens]
    truth_v = [rnd(s, HK, D) for s in seq_lens]
    layout = sf.SpanLayout.build(spans, seq_lens,
                                 torch.zeros(len(seq_lens), max(full_len), dtype=torch.int32),
                                 page_size)
    t = layout.num_tokens
    return dict(seed=seed, page_size=page_size, seq_lens=seq_lens, spans=spans, order=order,
                cuts=cuts, truth_k=truth_k, truth_v=truth_v, width=max(full_len),
                positions=layout.positions, qsl=layout.query_start_loc,
                q=rnd(t, HQ, D), k_new=rnd(t, HK, D), v_new=rnd(t, HK, D))


def build_pool(case: dict, ranges: list[tuple[int, int]], dtype, device, seed: int):
    """A shuffled page pool holding the cached (non-span) positions of ``ranges`` and NaN
    everywhere else, and its block table (-1 for pages outside the ranges)."""
    p = case["page_size"]
    pages = [list(range(lo // p, -(-hi // p))) if hi > lo else [] for lo, hi in ranges]
    num_pages = sum(len(x) for x in pages) + 2
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).tolist()
    table = torch.full((len(ranges), case["width"]), -1, dtype=torch.int32)
    k_cache = torch.full((num_pages, p, HK, D), float("nan"))
    v_cache = k_cache.clone()
    for b, ((lo, hi), req_pages) in enumerate(zip(ranges, pages)):
        for j in req_pages:
            table[b, j] = perm.pop()
        in_span = torch.zeros(case["seq_lens"][b], dtype=torch.bool)
        for start, stop in case["spans"][b]:
            in_span[start:stop] = True
        for pos in range(lo, hi):
            if not in_span[pos]:
                k_cache[table[b, pos // p], pos % p] = case["truth_k"][b][pos]
                v_cache[table[b, pos // p], pos % p] = case["truth_v"][b][pos]
    return table.to(device), k_cache.to(device, dtype), v_cache.to(device, dtype)


def full_result(case: dict, causal: bool, dtype, device, kernel: bool):
    """Single-process span_prefill over the whole cache."""
    ranges = [(0, s) for s in case["seq_lens"]]
    table, k_cache, v_cache = build_pool(case, ranges, dtype, device, seed=-1)
    layout = sf.SpanLayout.build(case["spans"], case["seq_lens"], table, case["page_size"])
    q, k_new, v_new = (case[n].to(device, dtype) for n in ("q", "k_new", "v_new"))
    sf.append_kv(k_new, v_new, k_cache, v_cache, layout, backend="reference")
    if kernel:
        return sf.span_prefill(q, k_cache, v_cache, layout, causal, return_lse=True)
    meta = (layout.positions, layout.query_start_loc, layout.seq_lens, layout.block_table)
    return reference.span_prefill(q, k_cache, v_cache, *meta, causal)


def expected_cache(case, rank_range, table, before_k, before_v):
    """``before`` with exactly the span tokens this rank holds written (computed by hand)."""
    k, v = before_k.clone(), before_v.clone()
    p, t = case["page_size"], 0
    for b, req_spans in enumerate(case["spans"]):
        lo, hi = rank_range[b]
        for start, stop in req_spans:
            for pos in range(start, stop):
                if lo <= pos < hi:
                    k[table[b, pos // p], pos % p] = case["k_new"][t].to(k.dtype)
                    v[table[b, pos // p], pos % p] = case["v_new"][t].to(v.dtype)
                t += 1
    return k, v


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def init(rank: int, world: int, init_file: str, backend: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on the loopback
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))


def cpu_worker(rank: int, world: int, init_file: str, seeds: list[int]) -> None:
    init(rank, world, init_file, "gloo")
    torch.set_num_threads(1)
    try:
        for seed in seeds:
            # The first case runs the append, attention and merge kernels (the
            # interpreter on the CPU); the rest run the reference ops, which are faster
            # there.
            backend = "auto" if seed == seeds[0] else "reference"
            case = make_case(seed, world)
            mine = [(c[case["order"][rank]], c[case["order"][rank] + 1]) for c in case["cuts"]]
            table, k_cache, v_cache = build_pool(case, mine, torch.float32, "cpu", seed + rank)
            kv_start = torch.tensor([r[0] for r in mine], dtype=torch.int32)
            kv_end = torch.tensor([r[1] for r in mine], dtype=torch.int32)
            shard = shard_layout(case["positions"], case["qsl"], torch.tensor(case["seq_lens"]),
                                 table, case["page_size"], kv_start, kv_end)
            want_k, want_v = expected_cache(case, mine, table, k_cache, v_cache)
            for causal in (True, False):
                ref_o, ref_lse = full_result(case, causal, torch.float32, "cpu", kernel=False)
                for method in ("allgather", "reduce_scatter"):
                    for all_rows in (True, False):
                        o, lse = span_prefill_cp(case["q"], case["k_new"], case["v_new"], k_cache,
                                                 v_cache, shard, causal=causal, method=method,
                                                 all_rows=all_rows, return_lse=True,
                                                 backend=backend)
                        lo, hi = (0, ref_o.shape[0]) if all_rows else \
                            row_range(ref_o.shape[0], rank, world)
                        where = f"seed {seed} rank {rank} causal {causal} {method} all_rows {all_rows}"
                        torch.testing.assert_close(o, ref_o[lo:hi], atol=1e-5, rtol=1e-5, msg=where)
                        torch.testing.assert_close(lse, ref_lse[lo:hi], atol=1e-5, rtol=1e-5,
                                                   msg=where)
                        assert torch.equal(bits(k_cache), bits(want_k)), where
                        assert torch.equal(bits(v_cache), bits(want_v)), where
    finally:
        dist.destroy_process_group()


def spawn(worker, world: int, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "rendezvous"), *args), nprocs=world)


@pytest.mark.parametrize("world", [2, 4], ids=["2ranks", "4ranks"])
def test_cp_equals_single_process_gloo(world):
    spawn(cpu_worker, world, [0, 1, 2, 3] if world == 2 else [10, 11, 12])


def partition_worker(rank: int, world: int, init_file: str) -> None:
    init(rank, world, init_file, "gloo")
    try:
        case = make_case(5, world)
        mine = [(c[case["order"][rank]], c[case["order"][rank] + 1]) for c in case["cuts"]]
        mine[0] = (0, case["seq_lens"][0])  # this rank's pages cover all of request 0
        table, _, _ = build_pool(case, mine, torch.float32, "cpu", rank)
        kv_start = torch.tensor([r[0] for r in mine])
        kv_end = torch.tensor([r[1] for r in mine])
        # Every rank claims all of request 0 (overlap), then none of it (a gap).
        args = (case["positions"], case["qsl"], torch.tensor(case["seq_lens"]), table,
                case["page_size"])
        for end0 in (case["seq_lens"][0], 0):
            kv_end[0] = end0
            with pytest.raises(ValueError, match=r"must partition \[0, seq_lens\[0\]"):
                shard_layout(*args, kv_start, kv_end)
        # A valid partition, and a pool too small for this rank's pages.
        mine = [(c[case["order"][rank]], c[case["order"][rank] + 1]) for c in case["cuts"]]
        table, k_cache, v_cache = build_pool(case, mine, torch.float32, "cpu", rank)
        layout = shard_layout(case["positions"], case["qsl"], torch.tensor(case["seq_lens"]),
                              table, case["page_size"], torch.tensor([r[0] for r in mine]),
                              torch.tensor([r[1] for r in mine]))
        with pytest.raises(ValueError, match="is not a page of the pool"):
            span_prefill_cp(case["q"], case["k_new"], case["v_new"], k_cache[:1], v_cache[:1],
                            layout)
    finally:
        dist.destroy_process_group()


def test_overlapping_ranges_are_refused_on_every_rank():
    spawn(partition_worker, 2)


def test_bad_arguments_name_themselves():
    case = make_case(3, 1)
    seq_lens = torch.tensor(case["seq_lens"])
    table, k_cache, v_cache = build_pool(case, [(0, s) for s in case["seq_lens"]], torch.float32,
                                         "cpu", 0)
    start = torch.zeros(len(case["seq_lens"]), dtype=torch.int32)
    args = (case["positions"], case["qsl"], seq_lens, table, case["page_size"])
    # These checks run before the partition check, so one process can see them.
    with pytest.raises(ValueError, match="kv_start must be an int32/int64 tensor"):
        shard_layout(*args, start.float(), seq_lens)
    with pytest.raises(ValueError, match="kv_end must be an int32/int64 tensor of shape"):
        shard_layout(*args, start, seq_lens[:1])
    with pytest.raises(ValueError, match=r"kv_start\[0\]=3, kv_end\[0\]=2"):
        shard_layout(*args, start + 3, start + 2)
    shard = shard_layout(*args, start, seq_lens, validate=False)
    with pytest.raises(TypeError, match="build it with shard_layout"):
        span_prefill_cp(case["q"], case["k_new"], case["v_new"], k_cache, v_cache,
                        sf.SpanLayout.build(case["spans"], case["seq_lens"], table,
                                            case["page_size"]))
    with pytest.raises(ValueError, match="method must be one of"):
        span_prefill_cp(case["q"], case["k_new"], case["v_new"], k_cache, v_cache, shard,
                        method="ring")
    with pytest.raises(ValueError, match="rows but the layout has"):
        span_prefill_cp(case["q"][1:], case["k_new"], case["v_new"], k_cache, v_cache, shard)


# ------------------------------------------------------------------ GPUs

def gpu_worker(rank: int, world: int, init_file: str) -> None:
    torch.cuda.set_device(rank)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    init(rank, world, init_file, "nccl")
    try:
        dev = f"cuda:{rank}"
        for seed in (20, 21, 22):
            case = make_case(seed, world)
            mine = [(c[case["order"][rank]], c[case["order"][rank] + 1]) for c in case["cuts"]]
            table, k_cache, v_cache = build_pool(case, mine, torch.bfloat16, dev, seed + rank)
            kv_start = torch.tensor([r[0] for r in mine], dtype=torch.int32, device=dev)
            kv_end = torch.tensor([r[1] for r in mine], dtype=torch.int32, device=dev)
            shard = shard_layout(case["positions"].to(dev), case["qsl"].to(dev),
                                 torch.tensor(case["seq_lens"], device=dev), table,
                                 case["page_size"], kv_start, kv_end)
            q, k_new, v_new = (case[n].to(dev, torch.bfloat16) for n in ("q", "k_new", "v_new"))
            for causal in (True, False):
                want_o, want_lse = full_result(case, causal, torch.bfloat16, dev, kernel=True)
                for method in ("allgather", "reduce_scatter"):
                    o, lse = span_prefill_cp(q, k_new, v_new, k_cache, v_cache, shard,
                                             causal=causal, method=method, return_lse=True)
                    where = f"seed {seed} rank {rank} causal {causal} {method}"
                    assert rel_err(o, want_o) <= 1e-2, (where, rel_err(o, want_o))
                    alive = ~torch.isneginf(want_lse)
                    assert torch.equal(alive, ~torch.isneginf(lse)), where
                    assert rel_err(lse[alive], want_lse[alive]) <= 1e-2, where
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cp_equals_single_gpu_nccl_bf16():
    spawn(gpu_worker, 2)
