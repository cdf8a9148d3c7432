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
