"""``scripts/ab_gluon.py --kernels NAME=PATH`` (host only): a copy of the Gluon kernel
file is loaded as a module of its own, and the registry's launches take its kernels for
the wrapped call only."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import ab_gluon  # noqa: E402
import spanfill.kernels_gluon.attention as current  # noqa: E402


def _launchers(module) -> tuple:
    return module.attention_fwd_dense, module.attention_fwd_paged


def test_copy_loads_as_its_own_module(tmp_path: Path) -> None:
    copy = tmp_path / "attention.py"
    copy.write_text((ROOT / "spanfill/kernels_gluon/attention.py").read_text()
                    + "\nMARKER = 'the copy'\n")
    name, module = ab_gluon._load_kernels(f"edited={copy}")
    assert name == "edited"
    assert module.MARKER == "the copy" and not hasattr(current, "MARKER")
    assert module.attention_fwd_dense is not current.attention_fwd_dense


def test_launches_are_swapped_for_the_call_only(tmp_path: Path) -> None:
    copy = tmp_path / "attention.py"
    copy.write_text((ROOT / "spanfill/kernels_gluon/attention.py").read_text())
    _, module = ab_gluon._load_kernels(f"copy={copy}")
    before = _launchers(current)
    seen = []

    def through_the_backend() -> int:
        # what GluonHopperBackend.attend does on every call
        from spanfill.kernels_gluon.attention import (attention_fwd_dense,
                                                      attention_fwd_paged)
        seen.append((attention_fwd_dense, attention_fwd_paged))
        return 7

    assert ab_gluon._with_kernels(module, through_the_backend)() == 7
    assert seen == [_launchers(module)]
    assert _launchers(current) == before

    def failing() -> None:
        raise RuntimeError("a launch error")

    with pytest.raises(RuntimeError, match="a launch error"):
        ab_gluon._with_kernels(module, failing)()
    assert _launchers(current) == before  # restored on the way out of an error too


@pytest.mark.parametrize("spec", ["no_equals_sign", "=x.py", "name=/no/such/file.py"])
def test_a_bad_spec_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="NAME=PATH"):
        ab_gluon._load_kernels(spec)


def test_explicit_forms_take_the_swapped_launcher() -> None:
    """``--kernels-forms``: a form's run (``_gluon_run``, built before the swap) looks the
    launcher up at each call, so the copy's kernels run inside ``_with_kernels`` and the
    checkout's outside it."""
    import types

    import torch

    b, s, h, d = 2, 8, 2, 64
    t = types.SimpleNamespace(q=torch.zeros(b, s, h, d), k=torch.zeros(b, s, h, d),
                              v=torch.zeros(b, s, h, d), valid_lens=torch.tensor([8, 3]))
    w = types.SimpleNamespace(causal=False)
    run, _ = ab_gluon._gluon_run(w, t, 128, True, True, 1, 0, None, None)
    seen = []
    fake = types.SimpleNamespace(attention_fwd_dense=lambda *a, **k: seen.append(k),
                                 attention_fwd_paged=current.attention_fwd_paged)
    ab_gluon._with_kernels(fake, run)()
    assert len(seen) == 1 and seen[0]["zero_fill"] and seen[0]["block_m"] == 128
    assert current.attention_fwd_dense is not fake.attention_fwd_dense


def test_kernels_forms_without_a_copy_is_refused(monkeypatch, capsys) -> None:
    """``--kernels-forms`` alone would time nothing more: refused, not ignored."""
    monkeypatch.setattr(sys, "argv", ["ab_gluon.py", "--kernels-forms"])
    with pytest.raises(SystemExit) as exc:
        ab_gluon.main()
    assert exc.value.code == 2
    assert "--kernels-forms times the forms with the --kernels copies" in capsys.readouterr().err
