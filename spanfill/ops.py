"""The public ops: check arguments, pick the kernel or the reference, allocate, launch.

Every check runs before anything is written, so bad input leaves the KV cache
bit-for-bit unchanged.

Backends come from :mod:`spanfill.backends`: ``"triton"`` runs the portable Triton
kernels (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before
spanfill was imported); ``"reference"`` runs :mod:`spanfill.reference`; ``"auto"``
(default, or the ``SPANFILL_BACKEND`` environment variable) takes the first in the
registry's order that supports the call. Every op runs the same steps: check,
describe the call (:class:`~spanfill.backends.AttentionProblem`), select the backend
and its :class:`~spanfill.backends.LaunchConfig`, plan (cached on the layout), run.

The kernel path has no backward pass: rather than return outputs that silently
carry no gradient, an op on it raises ``NotImplementedError`` when grad mode is on
and an input requires grad (use ``torch.no_grad()``/``torch.inference_mode()``, or
``backend="reference"``, which autograd differentiates).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from . import reference
from .reference import FP8_DTYPES
from .backends import dense_problem, paged_problem, select_backend
from .layout import PaddedLayout, SpanLayout, VarlenLayout
from .layout.reuse import TensorMemo
from .layout.validation import check_int_vector

__all__ = ["padded_prefill", "varlen_prefill", "span_prefill", "append_kv", "resolve_backend"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256

# Layouts built from raw valid_lens / cu_seqlens, reused while the same tensor comes
# back unmodified (every layer of a model passes the same one): checked and planned once.
_PADDED_LAYOUTS: TensorMemo[PaddedLayout] = TensorMemo()
_VARLEN_LAYOUTS: TensorMemo[VarlenLayout] = TensorMemo()


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The name of the backend an op takes for tensors on ``device`` (``"triton"`` or
    ``"reference"``), by the registry's selection (:func:`spanfill.backends.select_backend`)."""
    return select_backend(device, backend)[0].name


# ----------------------------------------------------------------------------- checks

def _check_tensor(name: str, t: object, ndim: int, kv: bool = False) -> torch.Tensor:
    """Type, dtype (``kv``: fp8 too), rank and a contiguous last dim."""
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES and not (kv and t.dtype in FP8_DTYPES):
        kinds = "float16, bfloat16, float32, float8_e4m3fn or float8_e5m2" if kv \
            else "float16, bfloat16 or float32"
        raise TypeError(f"{name} must be {kinds}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    return t


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: Sequence[str]) -> None:
    """Shared checks of q against a K/V pair: dtype, device, heads, head dim."""
    qn, kn, vn = names
    for name, t in ((kn, k), (vn, v)):
        if t.dtype != q.dtype and t.dtype not in FP8_DTYPES:  # fp8 KV: any q dtype
            raise TypeError(f"{name} has dtype {t.dtype} but {qn} has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but {qn} is on {q.device}")
    if v.dtype != k.dtype:
        raise TypeError(f"{vn} has dtype {v.dtype} but {kn} has {k.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{kn} has shape {tuple(k.shape)} but {vn} has {tuple(v.shape)}")
    head_dim, num_q_heads, num_kv_heads = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"{kn} has head dim {k.shape[-1]} but {qn} has {head_dim}")
    if num_q_heads == 0 or num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"{qn} has {num_q_heads} heads (dim -2) and {kn} has {num_kv_heads}: the number of "
            f"q heads must be a positive multiple of the number of kv heads"
        )
    if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0):
        raise ValueError(
            f"head dim {head_dim} of {qn} is not supported: it must be a multiple of 8 in "
            f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
        )


def _check_kv_scales(kv: torch.Tensor, k_scale: object, v_scale: object
                     ) -> tuple[float | torch.Tensor | None, float | torch.Tensor | None]:
    """The scales of fp8 K/V (1.0 when not given, as in vLLM); None for other dtypes.

    A scale is a finite real > 0, or an fp32 tensor of shape [], [1] or [Hk] on the
    cache's device (its values are not scanned: that would sync).
    """
    if kv.dtype not in FP8_DTYPES:
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is not None:
                raise ValueError(f"{name} applies to fp8 K/V only, but they are {kv.dtype}")
        return None, None
    out = []
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            out.append(1.0)
        elif torch.is_tensor(scale):
            if scale.dtype != torch.float32:
                raise TypeError(f"{name} must be float32, got {scale.dtype}")
            if scale.device != kv.device:
                raise ValueError(f"{name} is on {scale.device} but the K/V are on {kv.device}")
            if scale.numel() not in (1, kv.shape[-2]) or scale.dim() > 1:
                raise ValueError(f"{name} must have shape [], [1] or [Hk]=[{kv.shape[-2]}], got "
                                 f"{tuple(scale.shape)}")
            out.append(scale)
        else:
            out.append(_positive_real(name, scale, "a real number or an fp32 tensor"))
    return out[0], out[1]


def _check_int_tensor(name: str, t: object, device: torch.device) -> torch.Tensor:
    check_int_vector(name, t)
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t


def _check_variant(window_left: int, logits_soft_cap: float) -> None:
    if isinstance(window_left, bool) or not isinstance(window_left, int) or window_left < -1:
        raise ValueError(f"window_left must be an int >= -1 (-1: no window), got {window_left!r}")
    if not isinstance(logits_soft_cap, (int, float)) or not 0 <= logits_soft_cap < math.inf:
        raise ValueError(f"logits_soft_cap must be a finite number >= 0 (0: off), got {logits_soft_cap!r}")


def _positive_real(name: str, value: object, kinds: str, default: str = "") -> float:
    """``value`` as a float, if it is a finite real number > 0 (``kinds`` names what the
    argument may be, for the TypeError; ``default`` what leaving it out means)."""
    # bool is an int, and float('0.1') would parse a string: neither is a scale.
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be {kinds}, got {type(value).__name__} {value!r}")
    if not 0 < float(value) < math.inf:
        raise ValueError(f"{name} must be a finite number > 0{default}, got {value!r}")
    return float(value)


def _scale(head_dim: int, sm_scale: float | None) -> float:
    """The softmax scale: ``sm_scale`` checked, or ``1/sqrt(head_dim)`` for None."""
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    return _positive_real("sm_scale", sm_scale, "None or a real number (int, float or numpy scalar)",
                          " (None: 1/sqrt(D))")


def _check_grad(op: str, path: str, **tensors: torch.Tensor) -> None:
    """Refuse to drop gradients: no kernel path has a backward pass."""
    if path == "reference" or not torch.is_grad_enabled():
        return
    needing = [name for name, t in tensors.items() if t is not None and t.requires_grad]
    if needing:
        raise NotImplementedError(
            f"{op} has no backward pass on the Triton kernel path, but {', '.join(needing)} "
            f"require{'s' if len(needing) == 1 else ''} grad: wrap the call in torch.no_grad() or "
            f"torch.inference_mode() if no gradient is wanted, or pass backend=\"reference\" "
            f"(which supports autograd)"
        )


def _result(o: torch.Tensor, lse: torch.Tensor, return_lse: bool):
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- padded

def padded_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid_lens: torch.Tensor | PaddedLayout,
    causal: bool = False,
    padding_side: str | None = None,
    sm_scale: float | None = None,
    return_lse: bool = False,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    backend: str | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a padded batch with per-sample valid lengths.

    Sample ``b`` has ``n = valid_lens[b]`` real tokens: rows ``[0, n)`` with right
    padding, rows ``[S-n, S)`` with left padding, at positions ``0..n-1``. A valid
    row at position ``i`` sees the sample's valid keys ``j <= i`` (causal) or all
    ``n`` of them; padded keys are never seen. Work scales with ``sum(n^2)``.

    Parameters
    ----------
    q : [B, S, Hq, D] fp16|bf16|fp32
    k, v : [B, S, Hk, D] same dtype and device as q; ``Hq % Hk == 0``
    valid_lens : [B] int32|int64 on q's device, ``0 <= valid_lens[b] <= S``; or a
        :class:`spanfill.PaddedLayout` built once per batch and reused by every layer
        (no host sync per call). A raw tensor is checked and planned on its first call;
        later calls with the same tensor, unmodified, reuse that (not for tensors made
        under ``torch.inference_mode()``, which carry no version counter)
    causal : causal within each sample, default False (encoders)
    padding_side : "right" (default) or "left"; with a PaddedLayout, its own side
    sm_scale : a finite real number > 0 (int, float or numpy scalar); defaults to ``1/sqrt(D)``
    return_lse : also return the log-sum-exp of each row
    window_left : if >= 0, a row at position ``pos`` sees no key below
        ``pos - window_left`` (sliding window, FlashInfer's convention); -1: off
    logits_soft_cap : if > 0, scores become ``cap * tanh(score / cap)`` (Gemma-2)
    backend : "auto" | "triton" | "reference" (see module docstring)
    k_scale, v_scale : fp8 K/V only: the scale a stored value is multiplied by (a number,
        or an fp32 [], [1] or [Hk] tensor; default 1.0); see :mod:`spanfill.reference`

    Returns
    -------
    o : [B, S, Hq, D] q.dtype; padded rows are exactly 0
    lse : [B, S, Hq] fp32, natural log; -inf on padded rows (only if ``return_lse``)
    """
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4, kv=True)
    _check_tensor("v", v, 4, kv=True)
    _check_qkv(q, k, v, ("q", "k", "v"))
    k_scale, v_scale = _check_kv_scales(k, k_scale, v_scale)
    b_sz, seq_len = q.shape[0], q.shape[1]
    if k.shape[:2] != q.shape[:2]:
        raise ValueError(f"k has batch/seq shape {tuple(k.shape[:2])} but q has {tuple(q.shape[:2])}")
    if isinstance(valid_lens, PaddedLayout):
        layout = valid_lens
        if padding_side is not None and padding_side != layout.padding_side:
            raise ValueError(
                f"padding_side={padding_side!r} but the PaddedLayout was built with "
                f"{layout.padding_side!r}"
            )
        if layout.seq_len != seq_len:
            raise ValueError(f"the PaddedLayout has S={layout.seq_len} but q has S={seq_len}")
    else:
        _check_int_tensor("valid_lens", valid_lens, q.device)
        side = padding_side or "right"
        layout = _PADDED_LAYOUTS.get(valid_lens, (seq_len, side),
                                     lambda: PaddedLayout.build(valid_lens, seq_len, side))
    if layout.device != q.device:
        raise ValueError(f"valid_lens is on {layout.device} but q is on {q.device}")
    if layout.valid_lens.shape[0] != b_sz:
        raise ValueError(
            f"valid_lens has {layout.valid_lens.shape[0]} entries but the batch has B={b_sz}"
        )
    _check_variant(window_left, logits_soft_cap)
    scale = _scale(q.shape[-1], sm_scale)
    num_q_heads, head_dim = q.shape[2], q.shape[3]
    q_rows = q.reshape(b_sz * seq_len, num_q_heads, head_dim)  # a view for contiguous q
    k_rows = k.reshape(b_sz * seq_len, k.shape[2], head_dim)
    v_rows = v.reshape(b_sz * seq_len, v.shape[2], head_dim)
    problem = dense_problem("padded", q_rows, k_rows, v_rows, b_sz, seq_len, causal,
                            window_left, logits_soft_cap)
    chosen, _ = select_backend(problem, backend)
    _check_grad("padded_prefill", chosen.name, q=q, k=k, v=v)
    if chosen.name == "reference" or q.numel() == 0:
        o, lse = reference.padded_prefill(q, k, v, layout.valid_lens, causal,
                                          layout.padding_side, scale,
                                          window_left=window_left,
                                          logits_soft_cap=logits_soft_cap,
                                          k_scale=k_scale, v_scale=v_scale)
        return _result(o.to(q.dtype), lse.float(), return_lse)

    cfg = chosen.select_config(problem)
    plan = layout.tile_plan(cfg.block_q, causal)
    out, lse = chosen.attend(cfg, plan, q_rows, k_rows, v_rows, scale, causal, return_lse,
                             zero_fill=True, window_left=window_left,
                             logits_soft_cap=logits_soft_cap, k_scale=k_scale, v_scale=v_scale)
    out = out.view(q.shape)
    if return_lse:
        return out, lse.view(b_sz, seq_len, num_q_heads)
    return out


# ----------------------------------------------------------------------------- varlen

def varlen_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | VarlenLayout,
    causal: bool = True,
    sm_scale: float | None = None,
    return_lse: bool = False,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    backend: str | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Self-attention over sequences packed back to back (FlashAttention's varlen form).

    Sequence ``b`` is rows ``[cu_seqlens[b], cu_seqlens[b+1])`` of q, k and v, at
    positions ``0, 1, ...``; a row sees its own sequence's keys ``j <= i``
    (causal) or all of them.

    Parameters
    ----------
    q : [T, Hq, D] fp16|bf16|fp32
    k, v : [T, Hk, D] same dtype and device as q
    cu_seqlens : [B+1] int32|int64, non-decreasing, from 0 to T; or a
        :class:`spanfill.VarlenLayout`. As with ``valid_lens``, a raw tensor is checked
        and planned once while it comes back unmodified
    causal : default True
    sm_scale : a finite real number > 0 (int, float or numpy scalar); defaults to ``1/sqrt(D)``
    return_lse : also return the log-sum-exp of each row
    window_left : if >= 0, a row at position ``pos`` sees no key below
        ``pos - window_left`` (sliding window, FlashInfer's convention); -1: off
    logits_soft_cap : if > 0, scores become ``cap * tanh(score / cap)`` (Gemma-2)
    backend : "auto" | "triton" | "reference"
    k_scale, v_scale : fp8 K/V only: the scale a stored value is multiplied by (a number,
        or an fp32 [], [1] or [Hk] tensor; default 1.0); see :mod:`spanfill.reference`

    Returns
    -------
    o : [T, Hq, D] q.dtype
    lse : [T, Hq] fp32, natural log (only if ``return_lse``)
    """
    _check_tensor("q", q, 3)
    _check_tensor("k", k, 3, kv=True)
    _check_tensor("v", v, 3, kv=True)
    _check_qkv(q, k, v, ("q", "k", "v"))
    k_scale, v_scale = _check_kv_scales(k, k_scale, v_scale)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k has {k.shape[0]} rows but q has {q.shape[0]}")
    num_tokens = q.shape[0]
    if isinstance(cu_seqlens, VarlenLayout):
        layout = cu_seqlens
        if layout.num_tokens != num_tokens:
            raise ValueError(f"the VarlenLayout has T={layout.num_tokens} rows but q has {num_tokens}")
        if layout.device != q.device:
            raise ValueError(f"cu_seqlens is on {layout.device} but q is on {q.device}")
    else:
        _check_int_tensor("cu_seqlens", cu_seqlens, q.device)
        layout = _VARLEN_LAYOUTS.get(cu_seqlens, (num_tokens,),
                                     lambda: VarlenLayout.build(cu_seqlens, num_tokens))
    _check_variant(window_left, logits_soft_cap)
    scale = _scale(q.shape[-1], sm_scale)
    num_requests = layout.num_requests
    problem = dense_problem("varlen", q, k, v, num_requests, num_tokens, causal, window_left,
                            logits_soft_cap)
    chosen, _ = select_backend(problem, backend)
    _check_grad("varlen_prefill", chosen.name, q=q, k=k, v=v)
    if chosen.name == "reference" or num_tokens == 0 or num_requests == 0:
        o, lse = reference.varlen_prefill(q, k, v, layout.cu_seqlens, causal, scale,
                                          window_left=window_left,
                                          logits_soft_cap=logits_soft_cap,
                                          k_scale=k_scale, v_scale=v_scale)
        return _result(o.to(q.dtype), lse.float(), return_lse)

    cfg = chosen.select_config(problem)
    plan = layout.tile_plan(cfg.block_q, causal)
    out, lse = chosen.attend(cfg, plan, q, k, v, scale, causal, return_lse,
                             window_left=window_left, logits_soft_cap=logits_soft_cap,
                             k_scale=k_scale, v_scale=v_scale)
    return _result(out, lse, return_lse)


# ----------------------------------------------------------------------------- spans

def _check_same_device(**args: torch.Tensor | SpanLayout) -> None:
    """Raise naming the argument whose device differs from most of the others.

    The odd one out is the argument to move; on a tie the device of the first
    argument wins, so callers list the cache first.
    """
    devices = [t.device for t in args.values()]
    if all(d == devices[0] for d in devices):
        return
    common = max(devices, key=devices.count)  # first of the most frequent
    anchor = next(name for name, t in args.items() if t.device == common)
    name, t = next((name, t) for name, t in args.items() if t.device != common)
    raise ValueError(f"{name} is on {t.device} but {anchor} is on {common}")


KV_LAYOUTS = ("NHD", "HND")


def _nhd_pages(k_cache: torch.Tensor, v_cache: torch.Tensor | None,
               kv_layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V page pools as ``[num_pages, page_size, Hk, D]`` views, without a copy.

    Accepts separate pools or one combined pool ``[num_pages, 2, ...]`` (FlashInfer's
    single-tensor form, with ``v_cache=None``; vLLM's ``[2, num_blocks, ...]`` is passed
    as ``*kv_cache``), each page ``NHD`` ``[page_size, Hk, D]`` or ``HND``
    ``[Hk, page_size, D]``. The kernels take any strides, so a view serves as is.
    """
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
    if v_cache is None:
        if not torch.is_tensor(k_cache) or k_cache.dim() != 5 or k_cache.shape[1] != 2:
            raise ValueError(
                "with v_cache=None, k_cache must be the combined pool [num_pages, 2, ...] "
                f"(K at [:, 0], V at [:, 1]), got "
                f"{tuple(k_cache.shape) if torch.is_tensor(k_cache) else type(k_cache).__name__}"
            )
        k_cache, v_cache = k_cache[:, 0], k_cache[:, 1]
    if kv_layout == "HND":
        _check_tensor("k_cache", k_cache, 4, kv=True)
        _check_tensor("v_cache", v_cache, 4, kv=True)
        return k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    return k_cache, v_cache


def _check_cache(layout: SpanLayout, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 kv_layout: str = "NHD", **new: torch.Tensor) -> None:
    """Checks of the paged cache and the layout against each other and the ``new`` tensors
    (``q``, or ``k_new`` and ``v_new``), which must already be tensors."""
    _check_tensor("k_cache", k_cache, 4, kv=True)
    _check_tensor("v_cache", v_cache, 4, kv=True)
    if not isinstance(layout, SpanLayout):
        raise TypeError(f"layout must be a SpanLayout, got {type(layout).__name__}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)} but v_cache has {tuple(v_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache has dtype {v_cache.dtype} but k_cache has {k_cache.dtype}")
    _check_same_device(k_cache=k_cache, v_cache=v_cache, **new, layout=layout)
    if k_cache.shape[1] != layout.page_size:
        dim = "dim 1" if kv_layout == "NHD" else "dim 2, HND"
        raise ValueError(
            f"k_cache has page_size {k_cache.shape[1]} ({dim}) but layout.page_size is {layout.page_size}"
        )
    layout.check_pool(k_cache.shape[0])


def span_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    layout: SpanLayout,
    causal: bool = True,
    sm_scale: float | None = None,
    return_lse: bool = False,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    backend: str | None = None,
    kv_layout: str = "NHD",
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of the hole (span) tokens over each request's paged KV, one launch.

    Row ``i`` of request ``b`` at ``pos = layout.positions[i]`` sees KV positions
    ``[0, pos]`` (causal) or ``[0, seq_lens[b])`` of its request: cached tokens and
    the new tokens of every span, so call :func:`append_kv` first, or pass the new
    K/V here (``k_new``/``v_new``): they are written into the cache and attended in
    the same launch, every argument checked before anything is written.

    Parameters
    ----------
    q : [T, Hq, D] fp16|bf16|fp32, span tokens request by request in position order
    k_cache, v_cache : [num_pages, page_size, Hk, D] q.dtype (NHD, the default), or
        [num_pages, Hk, page_size, D] with ``kv_layout="HND"``; any strides with the last
        dim contiguous, so vLLM's combined ``[2, num_blocks, ...]`` pool goes in as
        ``*kv_cache``. ``v_cache=None``: ``k_cache`` is FlashInfer's combined
        ``[num_pages, 2, ...]`` pool (K at ``[:, 0]``, V at ``[:, 1]``). Never copied.
    layout : :class:`spanfill.SpanLayout` with ``layout.num_tokens == T``
    causal : default True
    sm_scale : a finite real number > 0 (int, float or numpy scalar); defaults to ``1/sqrt(D)``
    return_lse : also return the log-sum-exp of each row
    window_left : if >= 0, a row at position ``pos`` sees no key below
        ``pos - window_left`` (sliding window, FlashInfer's convention); -1: off
    logits_soft_cap : if > 0, scores become ``cap * tanh(score / cap)`` (Gemma-2)
    backend : "auto" | "triton" | "reference"
    kv_layout : "NHD" (default) or "HND", the order of a page's dims (FlashInfer's name)
    k_scale, v_scale : fp8 K/V only: the scale a stored value is multiplied by (a number,
        or an fp32 [], [1] or [Hk] tensor; default 1.0); see :mod:`spanfill.reference`
    k_new, v_new : [T, Hk, D], both or neither: the span tokens' new K/V, as
        :func:`append_kv` takes them, written into slot ``layout.slot_mapping[t]``
        (-1: not written) in the attention's own launch. One launch saves host time;
        on the GPU every tile writes the new rows it reads, so with thousands of new
        rows per request two launches are faster (H200: 1.4-1.9x at 1-2k rows, parity
        at 320; ``docs/performance.md``)

    Returns
    -------
    o : [T, Hq, D] q.dtype
    lse : [T, Hq] fp32, natural log (only if ``return_lse``)
    """
    _check_tensor("q", q, 3)
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new go together: pass both or neither")
    new = {} if k_new is None else dict(k_new=k_new, v_new=v_new)
    for name, t in new.items():
        _check_tensor(name, t, 3)
    k_cache, v_cache = _nhd_pages(k_cache, v_cache, kv_layout)
    _check_cache(layout, k_cache, v_cache, kv_layout, q=q, **new)
    if new:
        _check_new_kv(layout, k_new, v_new, k_cache)
    _check_qkv(q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    k_scale, v_scale = _check_kv_scales(k_cache, k_scale, v_scale)
    if q.shape[0] != layout.num_tokens:
        raise ValueError(f"q has {q.shape[0]} rows but layout has {layout.num_tokens} span tokens")
    _check_variant(window_left, logits_soft_cap)
    scale = _scale(q.shape[-1], sm_scale)
    problem = paged_problem(q, k_cache, layout.num_requests, layout.block_table.shape[1], causal,
                            window_left, logits_soft_cap, has_kv_bounds=layout.kv_start is not None,
                            v_cache=v_cache, appends=k_new is not None)
    chosen, _ = select_backend(problem, backend)
    _check_grad("span_prefill", chosen.name, q=q, k_cache=k_cache, v_cache=v_cache,
                k_new=k_new, v_new=v_new)
    if chosen.name == "reference" or q.shape[0] == 0:
        if k_new is not None:  # the semantics: append, then attend
            reference.append_kv(k_new, v_new, k_cache, v_cache, layout.slot_mapping, k_scale,
                                v_scale)
        o, lse = reference.span_prefill(
            q, k_cache, v_cache, layout.positions, layout.query_start_loc, layout.seq_lens,
            layout.block_table, causal, scale, kv_start=layout.kv_start, kv_end=layout.kv_end,
            window_left=window_left, logits_soft_cap=logits_soft_cap, k_scale=k_scale,
            v_scale=v_scale,
        )
        return _result(o.to(q.dtype), lse.float(), return_lse)

    # The config holds the split-KV count: few span tokens over a long prompt split
    # each tile's KV range (decided from host sizes only).
    cfg = chosen.select_config(problem)
    plan = layout.tile_plan(cfg.block_q, causal)
    out, lse = chosen.attend(cfg, plan, q, k_cache, v_cache, scale, causal, return_lse,
                             positions=layout.positions, block_table=layout.block_table,
                             kv_start=layout.kv_start, window_left=window_left,
                             logits_soft_cap=logits_soft_cap, k_scale=k_scale, v_scale=v_scale,
                             **({} if k_new is None else dict(
                                 k_new=k_new, v_new=v_new, slot_mapping=layout.slot_mapping)))
    return _result(out, lse, return_lse)


def _check_new_kv(layout: SpanLayout, k_new: torch.Tensor, v_new: torch.Tensor,
                  k_cache: torch.Tensor) -> None:
    """The span tokens' new K/V (tensors, already checked with the cache by
    :func:`_check_cache`) against the layout and the NHD cache: dtypes and shapes."""
    fp8 = k_cache.dtype in FP8_DTYPES
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.dtype != k_cache.dtype and not fp8:  # an fp8 cache quantizes any float
            raise TypeError(f"{name} has dtype {t.dtype} but k_cache has {k_cache.dtype}")
        expected = (layout.num_tokens, k_cache.shape[2], k_cache.shape[3])
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [T, Hk, D] = {expected}")
    if v_new.dtype != k_new.dtype:
        raise TypeError(f"v_new has dtype {v_new.dtype} but k_new has {k_new.dtype}")


def append_kv(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    layout: SpanLayout,
    backend: str | None = None,
    kv_layout: str = "NHD",
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> None:
    """Write the span tokens' new K/V into their cache slots, in place.

    Token ``t`` goes to slot ``layout.slot_mapping[t]`` (page
    ``slot // page_size``, row ``slot % page_size``); slot -1 is skipped.

    Parameters
    ----------
    k_new, v_new : [T, Hk, D] with the cache's dtype (any float dtype for an fp8 cache,
        which stores them quantized), ``T == layout.num_tokens``
    k_cache, v_cache : [num_pages, page_size, Hk, D], or HND / combined pools as in
        :func:`span_prefill`, written in place through the views
    layout : :class:`spanfill.SpanLayout`
    backend : "auto" | "triton" | "reference"
    kv_layout : "NHD" (default) or "HND"
    k_scale, v_scale : fp8 K/V only: the scale a stored value is multiplied by (a number,
        or an fp32 [], [1] or [Hk] tensor; default 1.0); see :mod:`spanfill.reference`
    """
    _check_tensor("k_new", k_new, 3)
    _check_tensor("v_new", v_new, 3)
    k_cache, v_cache = _nhd_pages(k_cache, v_cache, kv_layout)
    _check_cache(layout, k_cache, v_cache, kv_layout, k_new=k_new, v_new=v_new)
    _check_new_kv(layout, k_new, v_new, k_cache)
    k_scale, v_scale = _check_kv_scales(k_cache, k_scale, v_scale)
    # The same selection as attention: the registry knows which caches the kernels take.
    problem = paged_problem(k_new, k_cache, layout.num_requests, layout.block_table.shape[1],
                            False, op="append")
    path = select_backend(problem, backend)[0].name
    # The kernel writes the cache behind autograd's back: no gradient reaches k_new/v_new.
    _check_grad("append_kv", path, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache)
    if path == "reference":
        reference.append_kv(k_new, v_new, k_cache, v_cache, layout.slot_mapping, k_scale, v_scale)
        return

    from .kernels import append_kv_launch

    append_kv_launch(k_new, v_new, k_cache, v_cache, layout.slot_mapping, k_scale, v_scale)
