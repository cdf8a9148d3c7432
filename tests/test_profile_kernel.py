"""``scripts/profile_kernel.py --form NAME`` (host only): the form is looked up among
``scripts/ab_gluon.py``'s forms for the workload and launched as ab_gluon launches it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import ab_gluon  # noqa: E402
import profile_kernel  # noqa: E402
from bench.workloads import core_workloads  # noqa: E402


def _docs_small():
    w = next(x for x in core_workloads(small=True) if x.name == "docs_8k_d64")
    return w, w.make(torch.device("cpu"), torch.float16)


def test_a_form_runs_as_ab_gluon_launches_it(monkeypatch) -> None:
    w, t = _docs_small()
    calls = []

    def fake_run(w_, t_, *variant):
        calls.append(variant)
        return (lambda: calls.append("launch")), None

    monkeypatch.setattr(ab_gluon, "_gluon_run", fake_run)
    name = "gluon_m128_pingpong_persistent_stagger_tmastore_earlyq_pinmax_fill2"
    run = profile_kernel._form_runner(w, t, name)
    assert ab_gluon._name(*calls[0]) == name and calls[1] == "launch"  # compiled once
    run()
    assert calls[2:] == ["launch"]


def test_an_unknown_form_is_refused_with_the_known_ones() -> None:
    w, t = _docs_small()
    with pytest.raises(SystemExit, match="no form 'gluon_m999' on docs_8k_d64; one of .*fill2"):
        profile_kernel._form_runner(w, t, "gluon_m999")


def test_the_default_profiles_the_automatic_choice() -> None:
    # ncu_profile.sh's logs say "as the automatic choice runs it": padded rows go through
    # padded_prefill (the registry takes the Gluon kernel for docs_8k_d64 on Hopper), and
    # the portable padded kernel alone only with --portable.
    from bench import providers_spanfill as p

    assert profile_kernel._provider(padded=True) is p.spanfill_padded
    assert profile_kernel._provider(padded=False) is p.spanfill_segmented
    assert profile_kernel._provider(padded=True, portable=True) is p.spanfill_padded_kernel
    assert profile_kernel._provider(padded=True, gluon=True) is p.spanfill_gluon
    with pytest.raises(SystemExit, match="--portable is for padded rows"):
        profile_kernel._provider(padded=False, portable=True)
