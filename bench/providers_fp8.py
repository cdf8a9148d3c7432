"""spanfill over an fp8 KV cache: the same span prefill as ``spanfill``, cache in fp8.

The workload's cache (bf16 on a GPU, fp32 in ``--smoke``) is quantized once, before
anything is timed, with one scale per cache (``amax / finfo(fp8).max``, so the
largest value lands on the format's largest finite value and nothing saturates),
kept as an fp32 ``[1]`` tensor on the device as vLLM keeps ``k_scale``/``v_scale``.
The timed call is the public ``sf.span_prefill`` on the fp8 caches with the same
prebuilt layout as the ``spanfill`` row, so the two rows differ only in the cache.

The check compares the output with the reference on the *dequantized* cache (the
usual tolerance: it judges the kernel, not the format); the runner also writes the
error against the workload's own reference (the bf16 cache) as a ``quant_relerr``
row: what storing the cache in fp8 costs in accuracy.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

import spanfill as sf
from spanfill import reference
from spanfill.backends import paged_problem, select_backend

from .check import segmented_checker
from .providers_base import Prepared, spanfill_backend, window_of
from .workloads import SegmentedTensors, SegmentedWorkload

__all__ = ["FP8_FORMATS", "quantize_cache", "spanfill_fp8"]

# Provider name suffix -> fp8 format; the names are ``spanfill_fp8_<suffix>``.
FP8_FORMATS: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def quantize_cache(cache: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One cache in fp8 with its per-tensor scale (untimed setup).

    Parameters
    ----------
    cache : [num_pages, page_size, Hk, D] fp16|bf16|fp32
    dtype : torch.float8_e4m3fn | torch.float8_e5m2

    Returns
    -------
    stored : [num_pages, page_size, Hk, D] ``dtype``, :func:`spanfill.reference.quantize_kv`
    scale : [1] fp32 on the cache's device, ``amax(|cache|) / finfo(dtype).max``
    """
    amax = cache.abs().amax().float().reshape(1)
    # An all-zero cache would give scale 0, which the API rightly refuses.
    scale = (amax / torch.finfo(dtype).max).clamp_min(torch.finfo(torch.float32).tiny)
    return reference.quantize_kv(cache, scale, dtype), scale


def _path_note(t: SegmentedTensors, k_cache: torch.Tensor, backend: str | None,
               window: int) -> str:
    """Which spanfill backend runs the fp8 call and why, so a reference-path time is
    never read as the kernel's."""
    problem = paged_problem(t.q, k_cache, t.layout.num_requests, t.layout.block_table.shape[1],
                            True, window)
    with warnings.catch_warnings():
        # The CUDA reference-path warning says what this note already records.
        warnings.simplefilter("ignore")
        chosen, reason = select_backend(problem, backend)
    return f"{chosen.name} path ({reason})"


def spanfill_fp8(dtype: torch.dtype) -> Callable[[SegmentedWorkload, SegmentedTensors], Prepared]:
    """The provider for one fp8 format (``FP8_FORMATS``' values)."""

    def provider(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
        """sf.span_prefill on the prebuilt layout over fp8 copies of the workload's caches."""
        k_cache, k_scale = quantize_cache(t.k_cache, dtype)
        v_cache, v_scale = quantize_cache(t.v_cache, dtype)
        backend = spanfill_backend(t.q.device)
        window = window_of(w)
        extra = {"window_left": window} if window >= 0 else {}

        def run() -> torch.Tensor:
            return sf.span_prefill(t.q, k_cache, v_cache, t.layout, backend=backend,
                                   k_scale=k_scale, v_scale=v_scale, **extra)

        # Same rows (same seed) as the workload's checker, so the check and the
        # quant_relerr row compare one output at one set of rows.
        checker = segmented_checker(w, t, caches=(reference.dequantize_kv(k_cache, k_scale),
                                                  reference.dequantize_kv(v_cache, v_scale)))
        name = str(dtype).removeprefix("torch.")
        note = (f"{name} KV cache, per-tensor fp32 [1] scales amax/{torch.finfo(dtype).max:g} "
                f"(k {k_scale.item():.3g}, v {v_scale.item():.3g}), quantized once, untimed; "
                f"checked against the reference on the dequantized cache; "
                f"{_path_note(t, k_cache, backend, window)}")
        return Prepared(run, run, note=note, checker=checker)

    return provider
