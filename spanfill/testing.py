"""Tolerances, relative error and reference wrappers for checking spanfill's ops.

The one place for these decisions: the tests, the fuzz (tests/fuzzing.py,
scripts/fuzz_gpu.py), the scripts, the benchmark's check and ``spanfill check``
(:mod:`spanfill.selfcheck`) all read them from here, as ``torch.testing`` does for
PyTorch. Every output is checked against :mod:`spanfill.reference` by its relative
error ``||out - ref|| / ||ref||`` (STYLE.md).

Non-finite values follow one rule everywhere (:func:`rel_err`): NaN never passes,
on either side, and an infinity passes only where the reference holds the same
infinity (the ``-inf`` lse of a row that sees no keys).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import torch

from . import reference

if TYPE_CHECKING:
    from .layout import SpanLayout

__all__ = ["ELEMENTWISE_TOLERANCE", "LSE_TOLERANCE", "TOLERANCE", "assert_close", "assert_lse_close",
           "capture_cuda_graph", "num_splits", "recorded_launches",
           "reference_span", "rel_err", "tolerance"]

# Largest relative error of an output, per dtype of the op's inputs (STYLE.md).
_T = TypeVar("_T")

TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
# Largest elementwise absolute error of an output of magnitude ~1 (inputs drawn N(0, 1)).
ELEMENTWISE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2,
}
# Largest absolute error of a finite lse (natural log), per dtype of the op's inputs.
LSE_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def tolerance(dtype: torch.dtype, table: dict[torch.dtype, float] = TOLERANCE) -> float:
    """The bound ``table`` gives inputs of ``dtype``.

    Parameters
    ----------
    dtype : the dtype the op ran in (fp32, fp16 or bf16)
    table : :data:`TOLERANCE` (default), :data:`ELEMENTWISE_TOLERANCE` or :data:`LSE_TOLERANCE`

    Raises
    ------
    KeyError naming ``dtype`` and the dtypes that have a bound.
    """
    try:
        return table[dtype]
    except KeyError:
        known = ", ".join(str(d) for d in table)
        raise KeyError(f"no tolerance for {dtype}; there are bounds for {known}") from None


def _nonfinite_mismatch(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Where ``out`` breaks the non-finite rule: NaN in either, a non-finite ``out``
    over a finite ``ref``, or an infinite ``ref`` that ``out`` does not equal."""
    ref_finite = torch.isfinite(ref)
    return (torch.isnan(out) | torch.isnan(ref) | (~torch.isfinite(out) & ref_finite)
            | (~ref_finite & (out != ref)))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64 over the elements where ``ref`` is finite.

    Parameters
    ----------
    out : [...] any float dtype, the op's output
    ref : [...] any float dtype, the reference, same shape as ``out``

    Returns
    -------
    float: 0 when both are all zero (or empty); ``||out - ref||`` itself when ``ref``
    is all zero; ``inf`` (which no tolerance passes) when the shapes differ, when
    either holds a NaN, when ``out`` is non-finite where ``ref`` is finite, or when
    ``ref`` is ``+-inf`` where ``out`` is not the same infinity. Elements where both
    hold the same infinity (an lse of ``-inf``) count as equal.
    """
    if out.shape != ref.shape:
        return math.inf
    out, ref = out.double(), ref.double()
    if bool(_nonfinite_mismatch(out, ref).any()):
        return math.inf
    finite = torch.isfinite(ref)
    out, ref = out[finite], ref[finite]
    diff = torch.linalg.vector_norm(out - ref).item()
    denom = torch.linalg.vector_norm(ref).item()
    return diff / denom if denom > 0 else diff


def _where(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask)[0].tolist()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
                 what: str = "", elementwise: bool = False) -> None:
    """Raise ``AssertionError`` unless ``rel_err(out, ref) <= TOLERANCE[dtype]``.

    Parameters
    ----------
    out : [...] fp16|bf16|fp32|fp64, the op's output
    ref : [...] any float dtype, the reference, same shape
    dtype : the dtype of the op's inputs, which picks the bound; defaults to ``out.dtype``
    what : names the compared tensor in the message, e.g. ``"span_prefill o"``
    elementwise : also bound every element's absolute error by
        ``ELEMENTWISE_TOLERANCE[dtype]`` (for outputs of magnitude ~1)

    The message gives the error, the bound and, for a non-finite or elementwise
    failure, the index of the first offending element.
    """
    dtype = out.dtype if dtype is None else dtype
    label = f"{what}: " if what else ""
    if out.shape != ref.shape:
        raise AssertionError(f"{label}shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    o, r = out.double(), ref.double()
    bad = _nonfinite_mismatch(o, r)
    if bool(bad.any()):
        idx = _where(bad)
        raise AssertionError(f"{label}{o[tuple(idx)].item()} at {idx} where the reference has "
                             f"{r[tuple(idx)].item()} (relative error inf; NaN never passes)")
    if elementwise and o.numel():
        bound = tolerance(dtype, ELEMENTWISE_TOLERANCE)
        err = torch.where(torch.isfinite(r), (o - r).abs(), 0.0)
        worst = float(err.max())
        if worst > bound:
            raise AssertionError(f"{label}max abs error {worst:.3g} > tolerance {bound:g} ({dtype}) "
                                 f"at {_where(err == worst)}")
    err, tol = rel_err(o, r), tolerance(dtype)
    if not err <= tol:
        raise AssertionError(f"{label}relative error {err:.3g} > tolerance {tol:g} ({dtype})")


def assert_lse_close(lse: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                     what: str = "lse") -> None:
    """Raise ``AssertionError`` unless ``lse`` is ``-inf`` exactly where ``ref`` is and
    every other element is within ``LSE_TOLERANCE[dtype]`` of it.

    Parameters
    ----------
    lse : [T, Hq] fp32 (or [B, S, H]), the op's log-sum-exp
    ref : same shape, the reference's
    dtype : the dtype of the op's inputs, which picks the bound
    what : names the compared tensor in the message
    """
    if lse.dtype != torch.float32:
        raise AssertionError(f"{what}: dtype {lse.dtype}, not torch.float32")
    if lse.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(lse.shape)} != reference {tuple(ref.shape)}")
    ninf, ref_ninf = torch.isneginf(lse), torch.isneginf(ref)
    if not torch.equal(ninf, ref_ninf):
        raise AssertionError(f"{what}: -inf rows differ at {_where(ninf != ref_ninf)}")
    keep = ~ref_ninf
    got, want = lse[keep].double(), ref[keep].double()
    bad = ~torch.isfinite(got) | ~torch.isfinite(want)
    if bool(bad.any()):
        raise AssertionError(f"{what}: non-finite value where a row sees keys "
                             f"({got[bad][0].item()} vs reference {want[bad][0].item()})")
    if got.numel():
        bound, worst = tolerance(dtype, LSE_TOLERANCE), float((got - want).abs().max())
        if worst > bound:
            raise AssertionError(f"{what}: max abs error {worst:.3g} > tolerance {bound:g} ({dtype})")


def reference_span(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   layout: SpanLayout, causal: bool = True, sm_scale: float | None = None,
                   **variants) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`spanfill.reference.span_prefill` on the tensors of ``layout``.

    Parameters
    ----------
    q : [T, Hq, D] fp16|bf16|fp32, the span tokens
    k_cache, v_cache : [num_pages, page_size, Hk, D], already holding the span tokens' K/V
    layout : its positions, query_start_loc, seq_lens, block_table and, when it
        holds a shard, kv_start/kv_end
    causal : row at position ``p`` sees KV positions ``<= p`` (True) or all of its request
    sm_scale : defaults to ``1/sqrt(D)``
    **variants : ``compute_dtype``, ``window_left``, ``logits_soft_cap``

    Returns
    -------
    o : [T, Hq, D] ``compute_dtype`` (default fp32)
    lse : [T, Hq] ``compute_dtype``
    """
    return reference.span_prefill(q, k_cache, v_cache, layout.positions, layout.query_start_loc,
                                  layout.seq_lens, layout.block_table, causal, sm_scale,
                                  kv_start=layout.kv_start, kv_end=layout.kv_end, **variants)


def num_splits(args: tuple, kwargs: dict) -> int:
    """The split-KV count of one ``attention_fwd`` call (for :func:`recorded_launches`)."""
    launch = kwargs["launch"] if "launch" in kwargs else args[6]
    return launch.num_splits


@contextlib.contextmanager
def recorded_launches(**launchers: Callable[[tuple, dict], Any] | None
                      ) -> Iterator[dict[str, list[Any]]]:
    """Record every call of the named :mod:`spanfill.kernels` launchers made in the block.

    Each call still runs, so a test that finds its launch proves the kernel path ran (and
    one that finds none, that another path did). ``recorded_launches(attention_fwd=num_splits,
    append_kv_launch=None)`` yields ``{"attention_fwd": [splits, ...], "append_kv_launch":
    [(args, kwargs), ...]}``: each launcher's record is what its function returns for
    ``(args, kwargs)``, or the pair itself for None.
    """
    from . import kernels

    records: dict[str, list[Any]] = {name: [] for name in launchers}
    originals = {name: getattr(kernels, name) for name in launchers}

    def spy(name: str, keep: Callable[[tuple, dict], Any] | None) -> Callable:
        def launch(*args, **kwargs):
            records[name].append((args, kwargs) if keep is None else keep(args, kwargs))
            return originals[name](*args, **kwargs)
        return launch

    for name, keep in launchers.items():
        setattr(kernels, name, spy(name, keep))
    try:
        yield records
    finally:
        for name, original in originals.items():
            setattr(kernels, name, original)


def capture_cuda_graph(step: Callable[[], _T]) -> tuple[torch.cuda.CUDAGraph, _T]:
    """Capture ``step()`` in a CUDA graph; returns the graph and the captured outputs.

    ``step`` runs twice on a side stream first, so Triton compiles its kernels and the
    caching allocator holds its blocks before the capture (neither may happen inside).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs
