"""Providers: each turns a workload's tensors into a call to time.

A provider is ``fn(workload, tensors) -> Prepared``. Everything that is per layout
but not the attention itself (gathering a request's KV into a dense tensor,
expanding K/V to ``Hq`` heads for SDPA, building a dense mask, packing a batch) is
done here, outside the timed call. Planning that a peer must redo for every new
layout (FlexAttention's ``create_block_mask``, FlashInfer's ``plan``) and spanfill's
own plan are returned separately as ``Prepared.plan`` and timed on their own.

SDPA providers get K/V expanded to ``Hq`` heads (once, untimed) because SDPA's GQA
support differs between its backends; they use SDPA's default backend choice.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .check import dense_causal_check, packed_valid_index
from .providers_base import (Prepared, Unsupported, dense_ceiling_inputs, spanfill_backend,
                             window_of)
from .providers_fp8 import FP8_FORMATS, spanfill_fp8
from .providers_fused import spanfill_append_attend, spanfill_fused_append
from .providers_spanfill import (
    spanfill_nopad,
    spanfill_padded_kernel,
    spanfill_gluon,
    spanfill_gluon_span,
    spanfill_portable_span,
    spanfill_padded,
    spanfill_raw_lens,
    spanfill_segmented,
    spanfill_varlen,
)
from .workloads import PaddedTensors, PaddedWorkload, SegmentedTensors, SegmentedWorkload

__all__ = ["Prepared", "Unsupported", "spanfill_backend", "spanfill_segmented", "spanfill_padded", "SEGMENTED",
           "PADDED", "CEILINGS", "FLASHINFER", "FA4", "SWEEP_PROVIDERS", "SMOKE_SKIP", "FP8",
           "HOME_WORKLOADS"]


# ----------------------------------------------------------------------------- helpers

def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[L, H, D] -> [1, H, L, D] contiguous."""
    return x.transpose(0, 1).unsqueeze(0).contiguous()


def _sdpa_kv(t: SegmentedTensors, request: int,
             num_q_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Request's K/V as [1, Hq, seq_len, D] (expanded to Hq heads), built once."""
    key = ("sdpa", request)
    if key not in t._dense:
        k, v = t.dense_kv(request)
        group = num_q_heads // k.shape[1]
        t._dense[key] = tuple(_heads_first(x.repeat_interleave(group, dim=1)) for x in (k, v))
    return t._dense[key]


def _request_rows(t: SegmentedTensors) -> list[tuple[int, int]]:
    qsl = t.layout.query_start_loc.tolist()
    return list(zip(qsl[:-1], qsl[1:]))


_flex_cache: dict[str, Callable] = {}


def _flex(device: torch.device) -> tuple[Callable, str]:
    """flex_attention compiled once (it recompiles per distinct shape); eager on a CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention, "eager flex_attention (CPU)"
    if "compiled" not in _flex_cache:
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        _flex_cache["compiled"] = torch.compile(flex_attention, dynamic=False)
    return _flex_cache["compiled"], "torch.compile(flex_attention), dense gathered KV"


# ----------------------------------------------------------------------------- segmented

def _dense_ceiling(backend: str) -> Callable[[SegmentedWorkload, SegmentedTensors], Prepared]:
    def provider(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
        """Dense causal SDPA 1 x Hq x n x D (n = the prompt length) on one backend."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v, flops = dense_ceiling_inputs(w, t)
        n, hq, d = q.shape
        # SDPA's [1, H, n, D], contiguous, made once here and not in the timed call.
        q4, k4, v4 = (x.transpose(0, 1).contiguous()[None] for x in (q, k, v))
        chosen = getattr(SDPBackend, backend)

        def run() -> torch.Tensor:
            with sdpa_kernel([chosen]):
                return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)

        def own_check() -> float:
            return dense_causal_check(run()[0].transpose(0, 1), q, k, v, w.seed)

        return Prepared(run, None, None, flops, own_check,
                        note=f"ceiling: dense causal SDPA {backend} 1x{hq}x{n}x{d}")

    return provider


def _window_mask(start: int, stop: int, lo: int, window: int,
                 device: torch.device) -> torch.Tensor:
    """[stop - start, stop - lo] bool: query at ``start + i`` sees key ``lo + j`` iff
    ``q_pos - window <= kv_pos <= q_pos``."""
    q_pos = torch.arange(start, stop, device=device)[:, None]
    kv_pos = torch.arange(lo, stop, device=device)[None, :]
    return (kv_pos <= q_pos) & (q_pos - kv_pos <= window)


def sdpa_per_span(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
    """One SDPA call per span over KV [0, stop), bottom-right causal mask; with a
    sliding window, over the window's keys [max(0, start - window_left), stop) only,
    with an explicit boolean mask."""
    from torch.nn.attention.bias import causal_lower_right

    window = window_of(w)
    calls = []
    for b, (r0, r1) in enumerate(_request_rows(t)):
        if r1 == r0:
            continue
        kh, vh = _sdpa_kv(t, b, w.num_q_heads)
        qh = _heads_first(t.q[r0:r1])
        offset = 0
        for start, stop in w.spans[b]:
            n = stop - start
            if window >= 0:
                lo = max(0, start - window)
                mask = _window_mask(start, stop, lo, window, t.q.device)
            else:
                lo, mask = 0, causal_lower_right(n, stop)
            calls.append((qh[:, :, offset:offset + n], kh[:, :, lo:stop], vh[:, :, lo:stop],
                          mask))
            offset += n

    def run() -> list[torch.Tensor]:
        return [F.scaled_dot_product_attention(q, k, v, attn_mask=m) for q, k, v, m in calls]

    def output() -> torch.Tensor:
        return torch.cat([o[0].transpose(0, 1) for o in run()], 0)

    note = f"{len(calls)} SDPA calls; KV gathered once, untimed"
    if window >= 0:
        note += "; window's keys only, boolean mask (built once, untimed)"
    return Prepared(run, output, note=note)


def sdpa_dense_mask(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
    """One SDPA call per request with a dense [T_b, seq_len] boolean mask."""
    positions = t.layout.positions.long()
    rows = [(b, r0, r1) for b, (r0, r1) in enumerate(_request_rows(t)) if r1 > r0]
    window = window_of(w)

    def mask_of(b: int, r0: int, r1: int) -> torch.Tensor:
        key = torch.arange(w.seq_lens[b], device=t.q.device)[None, :]
        pos = positions[r0:r1, None]
        mask = key <= pos
        return mask & (pos - key <= window) if window >= 0 else mask

    def plan() -> list[torch.Tensor]:
        return [mask_of(b, r0, r1) for b, r0, r1 in rows]

    calls = [(_heads_first(t.q[r0:r1]), *_sdpa_kv(t, b, w.num_q_heads), mask)
             for (b, r0, r1), mask in zip(rows, plan())]

    def run() -> list[torch.Tensor]:
        return [F.scaled_dot_product_attention(q, k, v, attn_mask=m) for q, k, v, m in calls]

    def output() -> torch.Tensor:
        return torch.cat([o[0].transpose(0, 1) for o in run()], 0)

    note = "plan = building the dense masks"
    if window >= 0:
        note += f"; mask incl. q_pos - kv_pos <= {window}"
    return Prepared(run, output, plan, note=note)


def full_recompute(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
    """Dense causal SDPA over each whole prompt (the span rows carry the span q)."""
    if window_of(w) >= 0:
        raise Unsupported("is_causal dense SDPA has no sliding window (a dense mask is "
                          "sdpa_dense_mask's row)")
    gen = torch.Generator(device=t.q.device)
    gen.manual_seed(w.seed + 11)
    calls, picks = [], []
    positions = t.layout.positions.long()
    for b, (r0, r1) in enumerate(_request_rows(t)):
        kh, vh = _sdpa_kv(t, b, w.num_q_heads)
        q_full = torch.randn((w.seq_lens[b], w.num_q_heads, w.head_dim), generator=gen,
                             device=t.q.device).to(t.q.dtype)
        q_full[positions[r0:r1]] = t.q[r0:r1]
        calls.append((_heads_first(q_full), kh, vh))
        picks.append(positions[r0:r1])

    def run() -> list[torch.Tensor]:
        return [F.scaled_dot_product_attention(q, k, v, is_causal=True) for q, k, v in calls]

    def output() -> torch.Tensor:
        return torch.cat([o[0].transpose(0, 1)[p] for o, p in zip(run(), picks)], 0)

    return Prepared(run, output, note="all prompt tokens recomputed")


def flex_segmented(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
    """FlexAttention, batch = requests, q padded to the longest request, mask on position."""
    from torch.nn.attention.flex_attention import create_block_mask

    device, dtype = t.q.device, t.q.dtype
    rows = _request_rows(t)
    num_req, lq, lkv = len(rows), max(max(r1 - r0 for r0, r1 in rows), 1), max(w.seq_lens)
    hq, hk, d = w.num_q_heads, w.num_kv_heads, w.head_dim
    qf = torch.zeros((num_req, hq, lq, d), device=device, dtype=dtype)
    kf = torch.zeros((num_req, hk, lkv, d), device=device, dtype=dtype)
    vf = torch.zeros_like(kf)
    pos = torch.full((num_req, lq), -1, dtype=torch.int32, device=device)
    for b, (r0, r1) in enumerate(rows):
        k, v = t.dense_kv(b)
        qf[b, :, :r1 - r0] = t.q[r0:r1].transpose(0, 1)
        pos[b, :r1 - r0] = t.layout.positions[r0:r1]
        kf[b, :, :k.shape[0]] = k.transpose(0, 1)
        vf[b, :, :v.shape[0]] = v.transpose(0, 1)

    window = window_of(w)

    def causal_mod(b, h, q_idx, kv_idx):  # noqa: ANN001 - FlexAttention's signature
        return kv_idx <= pos[b, q_idx]

    def window_mod(b, h, q_idx, kv_idx):  # noqa: ANN001 - FlexAttention's signature
        q_pos = pos[b, q_idx]
        return (kv_idx <= q_pos) & (q_pos - kv_idx <= window)

    mask_mod = window_mod if window >= 0 else causal_mod

    def plan() -> object:
        return create_block_mask(mask_mod, num_req, None, lq, lkv, device=device)

    block_mask = plan()
    flex, how = _flex(device)

    def run() -> torch.Tensor:
        return flex(qf, kf, vf, block_mask=block_mask, enable_gqa=hq != hk)

    def output() -> torch.Tensor:
        o = run()
        return torch.cat([o[b, :, :r1 - r0].transpose(0, 1) for b, (r0, r1) in enumerate(rows)], 0)

    note = f"{how}; plan = create_block_mask"
    if window >= 0:
        note += f"; mask_mod with q_pos - kv_pos <= {window}"
    return Prepared(run, output, plan, note=note)


# ----------------------------------------------------------------------------- padded

def _padded_index(w: PaddedWorkload, t: PaddedTensors) -> torch.Tensor:
    return packed_valid_index(t.valid_lens, w.seq_len)


def _flat_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] -> [B*S, H, D]."""
    return x.reshape(-1, x.shape[2], x.shape[3])


def _bhsd(t: PaddedTensors) -> tuple[torch.Tensor, ...]:
    return tuple(x.transpose(1, 2).contiguous() for x in (t.q, t.k, t.v))


def sdpa_dense_mask_padded(w: PaddedWorkload, t: PaddedTensors) -> Prepared:
    """SDPA with a dense [B, 1, S, S] key-validity mask."""
    idx = _padded_index(w, t)
    q, k, v = _bhsd(t)
    s = w.seq_len

    def plan() -> torch.Tensor:
        key_ok = torch.arange(s, device=q.device)[None, :] < t.valid_lens[:, None]  # [B, S]
        mask = key_ok[:, None, None, :].expand(-1, 1, s, s).contiguous()
        if w.causal:
            mask &= torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        return mask

    mask = plan()

    def run() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return Prepared(run, lambda: _flat_rows(run().transpose(1, 2))[idx], plan,
                    note="plan = building the dense mask")


def sdpa_nomask_padded(w: PaddedWorkload, t: PaddedTensors) -> Prepared:
    """SDPA over the whole padded batch with no mask: WRONG (attends to padding)."""
    idx = _padded_index(w, t)
    q, k, v = _bhsd(t)

    def run() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=w.causal)

    return Prepared(run, lambda: _flat_rows(run().transpose(1, 2))[idx], expect_wrong=True,
                    note="WRONG output (attends to padded keys), B*S^2 work; timed as a bound")


def sdpa_nested_jagged(w: PaddedWorkload, t: PaddedTensors) -> Prepared:
    """SDPA on nested jagged tensors built (untimed) from the valid tokens."""
    idx = _padded_index(w, t)
    offsets = torch.zeros(len(w.valid_lens) + 1, dtype=torch.int64, device=t.q.device)
    offsets[1:] = torch.cumsum(t.valid_lens.long(), 0)
    q, k, v = (torch.nested.nested_tensor_from_jagged(_flat_rows(x)[idx].contiguous(), offsets)
               .transpose(1, 2) for x in (t.q, t.k, t.v))

    def run() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=w.causal)

    return Prepared(run, lambda: run().transpose(1, 2).values(),
                    note="nested jagged tensors built once, untimed")


def flex_padded(w: PaddedWorkload, t: PaddedTensors) -> Prepared:
    """FlexAttention with a block mask that skips padded query and key blocks."""
    from torch.nn.attention.flex_attention import create_block_mask

    idx = _padded_index(w, t)
    q, k, v = _bhsd(t)
    valid = t.valid_lens
    b_sz, s = len(w.valid_lens), w.seq_len

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001 - FlexAttention's signature
        ok = (q_idx < valid[b]) & (kv_idx < valid[b])
        return ok & (kv_idx <= q_idx) if w.causal else ok

    def plan() -> object:
        return create_block_mask(mask_mod, b_sz, None, s, s, device=q.device)

    block_mask = plan()
    flex, how = _flex(q.device)

    def run() -> torch.Tensor:
        return flex(q, k, v, block_mask=block_mask)

    return Prepared(run, lambda: _flat_rows(run().transpose(1, 2))[idx], plan,
                    note=f"{how}; plan = create_block_mask")


# ----------------------------------------------------------------------------- registry

def _flashinfer(name: str) -> Callable:
    def provider(w: SegmentedWorkload, t: SegmentedTensors) -> Prepared:
        from . import providers_flashinfer

        return getattr(providers_flashinfer, name)(w, t)

    return provider


def _fa4(name: str) -> Callable:
    def provider(w: SegmentedWorkload | PaddedWorkload,
                 t: SegmentedTensors | PaddedTensors) -> Prepared:
        from . import providers_fa4

        return getattr(providers_fa4, name)(w, t)

    return provider


# Most important first: a run cut short by a time limit keeps the rows written so far.
SEGMENTED: dict[str, Callable[[SegmentedWorkload, SegmentedTensors], Prepared]] = {
    "spanfill": spanfill_segmented,
    "sdpa_cudnn_dense": _dense_ceiling("CUDNN_ATTENTION"),
    "sdpa_flash_dense": _dense_ceiling("FLASH_ATTENTION"),
    "sdpa_per_span": sdpa_per_span,
    "sdpa_dense_mask": sdpa_dense_mask,
    "full_recompute": full_recompute,
    "flex": flex_segmented,
    **{f"spanfill_fp8_{suffix}": spanfill_fp8(dtype) for suffix, dtype in FP8_FORMATS.items()},
    "spanfill_fused_append": spanfill_fused_append,
    "spanfill_append_attend": spanfill_append_attend,
    "flashinfer_span_entries": _flashinfer("span_entries"),
    "flashinfer_custom_mask": _flashinfer("custom_mask"),
    "fa4_span_entries": _fa4("span_entries"),
    "fa4_dense": _fa4("dense"),
    "spanfill_portable": spanfill_portable_span,
    # Last: a first run of a new kernel family that could fault would end the process.
    "spanfill_gluon": spanfill_gluon_span,
}

PADDED: dict[str, Callable[[PaddedWorkload, PaddedTensors], Prepared]] = {
    "spanfill": spanfill_padded,
    "spanfill_kernel": spanfill_padded_kernel,
    "spanfill_raw_lens": spanfill_raw_lens,
    "spanfill_nopad": spanfill_nopad,
    "spanfill_varlen": spanfill_varlen,
    "sdpa_dense_mask": sdpa_dense_mask_padded,
    "sdpa_nomask": sdpa_nomask_padded,
    "sdpa_nested_jagged": sdpa_nested_jagged,
    "flex": flex_padded,
    "fa4_padded": _fa4("padded"),
    # Last: a first run of a new kernel family that could fault would end the process,
    # so every other row of the workload is written first.
    "spanfill_gluon": spanfill_gluon,
}

CEILINGS = frozenset({"sdpa_cudnn_dense", "sdpa_flash_dense", "fa4_dense"})
FLASHINFER = frozenset({"flashinfer_span_entries", "flashinfer_custom_mask"})
# FlashAttention-4 (flash_attn.cute): on by default, left out when it does not import.
FA4 = frozenset({"fa4_span_entries", "fa4_padded", "fa4_dense"})
FP8 = frozenset(f"spanfill_fp8_{suffix}" for suffix in FP8_FORMATS)

# Providers that run only on these workloads unless --only names both the provider and
# another workload (issue 18 asks for the fp8-vs-bf16 cache comparison on long_32k and
# few_big; tail_32k is the memory-bound case; elsewhere it would only lengthen the run).
HOME_WORKLOADS: dict[str, frozenset[str]] = {name: frozenset({"long_32k", "few_big", "tail_32k"})
                                             for name in FP8}

# FlexAttention compiles per shape and the sweep has ~30 shapes: left out by default.
SWEEP_PROVIDERS = frozenset({
    "spanfill", "sdpa_cudnn_dense", "sdpa_per_span", "sdpa_dense_mask", "full_recompute",
    "flashinfer_span_entries", "spanfill_kernel", "spanfill_nopad", "sdpa_nomask",
    "sdpa_nested_jagged",
})

# On a CPU the dense ceilings cannot run (cuDNN/flash backends), nor can the CUDA-only
# peers (FlashInfer, FA4); they are skipped there.
GLUON = frozenset({"spanfill_gluon"})
# A backend named outright: on a CPU only the interpreter runs it (the smoke run's rows
# are the reference), so the smoke run leaves it out.
NAMED_BACKEND = frozenset({"spanfill_portable"})
SMOKE_SKIP = CEILINGS | FLASHINFER | FA4 | GLUON | NAMED_BACKEND
