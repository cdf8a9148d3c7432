"""SpanLayout, PaddedLayout and the tile plan."""

from __future__ import annotations

import pytest
import torch

import spanfill as sf
from spanfill.layout import plan_packed, plan_padded


def _table(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32)


def test_build_positions_and_slots():
    table = _table([[3, 0, 5], [1, 2]])
    layout = sf.SpanLayout.build([[(0, 2), (9, 10)], [(4, 6)]], [10, 8], table, page_size=4)
    assert layout.positions.tolist() == [0, 1, 9, 4, 5]
    assert layout.query_start_loc.tolist() == [0, 3, 5]
    # slot = block_table[b, pos // 4] * 4 + pos % 4
    assert layout.slot_mapping.tolist() == [12, 13, 21, 8, 9]
    assert layout.num_tokens == 5 and layout.num_requests == 2


def test_request_without_spans_and_empty_batch_of_spans():
    layout = sf.SpanLayout.build([[], [(0, 1)], []], [5, 5, 5], _table([[0, 1], [2, 3], [4, 5]]), 4)
    assert layout.query_start_loc.tolist() == [0, 0, 1, 1]
    empty = sf.SpanLayout.build([[], []], [5, 5], _table([[0, 1], [2, 3]]), 4)
    assert empty.num_tokens == 0


def test_from_tensors_matches_build():
    table = _table([[2, 0], [1, 3]])
    built = sf.SpanLayout.build([[(1, 3)], [(0, 1), (6, 8)]], [7, 8], table, 4)
    engine = sf.SpanLayout.from_tensors(
        positions=torch.tensor([1, 2, 0, 6, 7]), query_start_loc=torch.tensor([0, 2, 5]),
        seq_lens=torch.tensor([7, 8]), block_table=table.long(), page_size=4)
    for name in ("positions", "query_start_loc", "seq_lens", "block_table", "slot_mapping"):
        assert torch.equal(getattr(built, name), getattr(engine, name)), name


@pytest.mark.parametrize("block_q", [1, 4, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_plan_covers_every_row_once(block_q, causal):
    qsl = torch.tensor([0, 5, 5, 22, 23], dtype=torch.int32)
    positions = torch.cat([torch.arange(5), torch.arange(3, 20), torch.tensor([40])]).int()
    plan = plan_packed(qsl, torch.tensor([9, 3, 30, 41], dtype=torch.int32), 23, block_q, causal,
                       positions=positions)
    covered = torch.zeros(23, dtype=torch.int64)
    for req, r0, r1 in zip(plan.tile_req.tolist(), plan.tile_row0.tolist(), plan.tile_row_end.tolist()):
        if req < 0:
            continue
        assert qsl[req] <= r0 < r1 <= qsl[req + 1] and r1 - r0 <= block_q
        covered[r0:r1] += 1
    assert (covered == 1).all()
    # Longest KV range first: the tile holding position 40 comes first when causal.
    first = plan.tile_row0[0].item()
    assert (first == 22) if causal else plan.tile_req[0].item() == 3


# Padding entries of valid_lens [0, 7, 10, 3], S = 10, 4-row tiles: tiles start at
# each sample's first valid row, so one entry holds all of a sample's padding.
PADDING_ENTRIES = {"right": {0: (0, 10), 1: (17, 20), 3: (33, 40)},
                   "left": {0: (0, 10), 1: (10, 13), 3: (30, 37)}}


def _force_torch_plan(monkeypatch):
    import spanfill.kernels

    def no_launch(*args, **kwargs):
        raise AssertionError("the one-program plan ran")

    monkeypatch.setattr(spanfill.kernels, "MAX_PLAN_TILES", 0)
    monkeypatch.setattr(spanfill.kernels, "plan_packed_launch", no_launch)


@pytest.mark.parametrize("builder", ["kernel", "torch"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_plan_covers_whole_batch(padding_side, builder, monkeypatch):
    if builder == "torch":
        _force_torch_plan(monkeypatch)
    # The one-launch plan runs where the kernels do: a GPU, or the interpreter on the CPU.
    device = "cuda" if builder == "kernel" and torch.cuda.is_available() else "cpu"
    valid = torch.tensor([0, 7, 10, 3], device=device)
    plan = plan_padded(valid, 10, 4, padding_side, causal=False)
    covered = torch.zeros(40, dtype=torch.int64)
    for req, r0, r1 in zip(plan.tile_req.tolist(), plan.tile_row0.tolist(),
                           plan.tile_row_end.tolist()):
        if req >= 0:
            covered[r0:r1] += 1
    assert (covered == 1).all()  # padding too: those entries write the zeros
    pad = 10 - valid.cpu() if padding_side == "left" else torch.zeros(4, dtype=torch.int64)
    assert plan.q_start.tolist() == (torch.arange(4) * 10 + pad).tolist()
    # Each sample's padding rows are one entry, after every tile with valid rows.
    zero_entries, seen_zero = {}, False
    for req, r0, r1 in zip(plan.tile_req.tolist(), plan.tile_row0.tolist(),
                           plan.tile_row_end.tolist()):
        if req < 0:
            continue
        q0 = plan.q_start[req].item()
        q1 = q0 + plan.q_len[req].item()
        if r1 <= q0 or r0 >= q1:
            assert req not in zero_entries
            zero_entries[req] = (r0, r1)
            seen_zero = True
        else:
            assert not seen_zero, "a tile of valid rows after the padding entries"
            assert q0 <= r0 < r1 <= q1 and r1 - r0 <= 4
    assert zero_entries == PADDING_ENTRIES[padding_side]
    assert plan.tile_req[-1].item() == -1  # empty slots come last


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_plan_kernel_matches_torch_plan(causal, padding_side, monkeypatch):
    """The one-launch padded plan equals the torch-ops one, entry for entry (-1 slots
    aside: the kernel leaves a sample without padding an empty slot in place)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(7)
    valid = torch.randint(0, 70, (29,), generator=gen)
    valid[3], valid[4] = 0, 69
    valid = valid.to(device)
    fast = plan_padded(valid, 69, 16, padding_side, causal)
    _force_torch_plan(monkeypatch)
    slow = plan_padded(valid, 69, 16, padding_side, causal)
    assert fast.num_tiles == slow.num_tiles
    keep_f, keep_s = fast.tile_req >= 0, slow.tile_req >= 0
    for name in ("tile_req", "tile_row0", "tile_row_end"):
        assert torch.equal(getattr(fast, name)[keep_f].cpu(), getattr(slow, name)[keep_s].cpu()), name
    for name in ("q_start", "q_len", "kv_row0", "kv_len"):
        assert torch.equal(getattr(fast, name).cpu(), getattr(slow, name).cpu()), name


def test_tile_plan_is_cached():
    layout = sf.SpanLayout.build([[(0, 3)]], [3], _table([[0]]), 4)
    assert layout.tile_plan(16, True) is layout.tile_plan(16, True)
    padded = sf.PaddedLayout.build(torch.tensor([1, 2]), 4)
    assert padded.tile_plan(8, False) is padded.tile_plan(8, False)


@pytest.mark.gpu
def test_tensor_path_makes_no_host_sync():
    table = torch.arange(64, dtype=torch.int32, device="cuda").reshape(2, 32)
    positions = torch.tensor([0, 5, 6, 100, 3, 4], device="cuda")
    qsl = torch.tensor([0, 4, 6], device="cuda")
    seq_lens = torch.tensor([200, 10], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layout = sf.SpanLayout.from_tensors(positions, qsl, seq_lens, table, 16, validate=False)
        layout.tile_plan(32, True)
        sf.PaddedLayout.build(seq_lens, 200, validate=False).tile_plan(128, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_q", [4, 16])
def test_plan_kernel_matches_torch_plan(causal, block_q, monkeypatch):
    """The single-program Triton plan equals the torch-ops plan, tile for tile."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(block_q)
    counts = torch.randint(0, 40, (37,), generator=gen)
    counts[5] = 0
    qsl = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).int().to(device)
    num_tokens = int(counts.sum())
    positions = torch.cat([torch.sort(torch.randperm(200, generator=gen)[:n]).values for n in counts])
    kv_len = torch.randint(200, 300, (37,), generator=gen).int().to(device)
    positions = positions.int().to(device)
    fast = plan_packed(qsl, kv_len, num_tokens, block_q, causal, positions=positions)
    _force_torch_plan(monkeypatch)
    slow = plan_packed(qsl, kv_len, num_tokens, block_q, causal, positions=positions)
    assert torch.equal(fast.tile_req, slow.tile_req)
    valid = slow.tile_req >= 0  # unused slots (-1) carry no rows
    assert torch.equal(fast.tile_row0[valid], slow.tile_row0[valid])
    assert torch.equal(fast.tile_row_end[valid], slow.tile_row_end[valid])
    for name in ("q_start", "q_len", "kv_row0", "kv_len"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name


@pytest.mark.parametrize("block_q", [1, 5, 32])
def test_packed_plan_grid_bound_is_tight_and_safe(block_q):
    """The grid (num_tiles) is (T + B * (block_q - 1)) // block_q: never fewer slots than
    tiles, and exactly as many when every request ends one row into a tile."""
    gen = torch.Generator().manual_seed(block_q)
    for trial in range(20):
        lens = torch.randint(0, 3 * block_q + 2, (int(torch.randint(1, 9, (1,), generator=gen)),),
                             generator=gen)
        if trial == 0:  # the worst case: every request one row past a whole number of tiles
            lens = torch.tensor([block_q * k + 1 for k in range(4)])
        qsl = torch.zeros(lens.numel() + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(lens, 0)
        t = int(qsl[-1])
        plan = plan_packed(qsl, lens.to(torch.int32), t, block_q, False)
        needed = sum(-(-int(n) // block_q) for n in lens)
        assert plan.num_tiles == max((t + lens.numel() * (block_q - 1)) // block_q, 1)
        assert int((plan.tile_req >= 0).sum()) == needed <= plan.num_tiles
        if trial == 0:
            assert needed == plan.num_tiles
