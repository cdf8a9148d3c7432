"""Raw valid_lens / cu_seqlens are checked and planned once per tensor, not once per call.

A model passes the same lengths tensor to every layer; the ops keep the layout built
from it while that tensor lives unmodified (spanfill/layout/reuse.py).
"""

from __future__ import annotations

import pytest
import torch

import spanfill as sf
from spanfill import ops, reference
from spanfill.layout import PaddedLayout, VarlenLayout
from spanfill.layout.reuse import TensorMemo
from spanfill.testing import TOLERANCE, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32 = torch.float32


@pytest.fixture(autouse=True)
def _fresh_memos() -> None:
    ops._PADDED_LAYOUTS.clear()
    ops._VARLEN_LAYOUTS.clear()


def _count_builds(monkeypatch, cls) -> list[int]:
    calls: list[int] = []
    real = cls.build.__func__

    def counting(klass, *args, **kwargs):
        calls.append(1)
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "build", classmethod(counting))
    return calls


def _padded(seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(3, 21, h, 32, generator=gen).to(DEVICE, F32) for h in (4, 2, 2))


def test_padded_same_tensor_builds_once(monkeypatch) -> None:
    builds = _count_builds(monkeypatch, PaddedLayout)
    q, k, v = _padded()
    lens = torch.tensor([21, 0, 9], device=DEVICE)
    outs = [sf.padded_prefill(q, k, v, lens) for _ in range(4)]  # four "layers"
    assert len(builds) == 1
    ref, _ = reference.padded_prefill(q, k, v, lens, False, "right")
    for o in outs:
        assert rel_err(o, ref) <= TOLERANCE[F32]


def test_padded_in_place_change_rebuilds(monkeypatch) -> None:
    builds = _count_builds(monkeypatch, PaddedLayout)
    q, k, v = _padded(1)
    lens = torch.tensor([21, 5, 9], device=DEVICE)
    sf.padded_prefill(q, k, v, lens)
    lens[1] = 17  # the next batch, written into the same tensor
    o = sf.padded_prefill(q, k, v, lens)
    assert len(builds) == 2
    ref, _ = reference.padded_prefill(q, k, v, lens, False, "right")
    assert rel_err(o, ref) <= TOLERANCE[F32]


def test_padded_other_arguments_are_part_of_the_key(monkeypatch) -> None:
    builds = _count_builds(monkeypatch, PaddedLayout)
    q, k, v = _padded(2)
    lens = torch.tensor([21, 5, 9], device=DEVICE)
    sf.padded_prefill(q, k, v, lens, padding_side="right")
    o = sf.padded_prefill(q, k, v, lens, padding_side="left")
    assert len(builds) == 2
    ref, _ = reference.padded_prefill(q, k, v, lens, False, "left")
    assert rel_err(o, ref) <= TOLERANCE[F32]


def test_bad_lengths_raise_on_every_call() -> None:
    q, k, v = _padded(3)
    lens = torch.tensor([21, 22, 9], device=DEVICE)
    for _ in range(2):  # nothing is remembered from a failed check
        with pytest.raises(ValueError, match=r"valid_lens\[1\] = 22 is outside \[0, S=21\]"):
            sf.padded_prefill(q, k, v, lens)


def test_inference_tensors_are_not_memoised(monkeypatch) -> None:
    """No version counter: an in-place change could not be seen, so build every call."""
    builds = _count_builds(monkeypatch, PaddedLayout)
    q, k, v = _padded(4)
    with torch.inference_mode():
        lens = torch.tensor([21, 5, 9], device=DEVICE)
        sf.padded_prefill(q, k, v, lens)
        lens[1] = 2
        o = sf.padded_prefill(q, k, v, lens)
    assert len(builds) == 2
    ref, _ = reference.padded_prefill(q, k, v, lens.clone(), False, "right")
    assert rel_err(o, ref) <= TOLERANCE[F32]


def test_varlen_same_tensor_checks_once(monkeypatch) -> None:
    builds = _count_builds(monkeypatch, VarlenLayout)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(30, h, 32, generator=gen).to(DEVICE, F32) for h in (4, 1, 1))
    cu = torch.tensor([0, 1, 1, 30], device=DEVICE)
    outs = [sf.varlen_prefill(q, k, v, cu) for _ in range(3)]
    assert len(builds) == 1
    ref, _ = reference.varlen_prefill(q, k, v, cu, True)
    for o in outs:
        assert rel_err(o, ref) <= TOLERANCE[F32]
    cu[2] = 12  # in place: a new batch
    o = sf.varlen_prefill(q, k, v, cu)
    assert len(builds) == 2
    assert rel_err(o, reference.varlen_prefill(q, k, v, cu, True)[0]) <= TOLERANCE[F32]


def test_varlen_layout_object() -> None:
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(30, h, 32, generator=gen).to(DEVICE, F32) for h in (4, 2, 2))
    cu = torch.tensor([0, 7, 30], device=DEVICE)
    layout = VarlenLayout.build(cu, 30)
    o = sf.varlen_prefill(q, k, v, layout, causal=False)
    ref, _ = reference.varlen_prefill(q, k, v, cu, False)
    assert rel_err(o, ref) <= TOLERANCE[F32]
    with pytest.raises(ValueError, match="the VarlenLayout has T=30 rows but q has 29"):
        sf.varlen_prefill(q[:29], k[:29], v[:29], layout)
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0 and end at T=31"):
        VarlenLayout.build(cu, 31)


def test_memo_forgets_dead_tensors_and_keeps_capacity() -> None:
    memo: TensorMemo[int] = TensorMemo(capacity=2)
    built: list[int] = []

    def build() -> int:
        built.append(1)
        return len(built)

    a, b, c = (torch.tensor([i]) for i in range(3))
    assert memo.get(a, 0, build) == 1 and memo.get(a, 0, build) == 1
    memo.get(b, 0, build)
    memo.get(c, 0, build)  # evicts a, the least recently used
    assert memo.get(a, 0, build) == 4
    assert memo.get(a, 1, build) == 5  # another key
    del b
    fresh = torch.tensor([9])  # may reuse a dead tensor's id: must not hit its entry
    assert memo.get(fresh, 0, build) == 6
