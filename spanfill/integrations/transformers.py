"""spanfill as a Hugging Face transformers attention implementation.

After :func:`register` (or just importing this module), loading a model with
``attn_implementation="spanfill"`` makes its self-attention run through
:func:`spanfill.padded_prefill`: each sample's valid length comes from the
attention mask, so padded keys cost nothing and the work scales with
``sum(valid_len^2)``.

Two pieces are registered under the name ``"spanfill"``:

* a mask function (``AttentionMaskInterface``): transformers would otherwise hand a
  custom implementation no mask at all. Ours passes the 2-D ``[B, S]`` padding mask
  through instead of materialising a ``[B, 1, S, S]`` one; for masks it cannot
  express that way (custom ``or``/``and`` mask functions) it builds transformers'
  own boolean 4-D mask, which the attention function then checks.
* the attention function (``AttentionInterface``), which accepts the 2-D padding
  mask, a 4-D boolean mask or a 4-D additive float mask, derives ``valid_lens`` and
  the padding side, and raises ``ValueError`` for anything that is not a padding
  mask (plus causality, for decoders).

Padded query rows come out as exact zeros (transformers' eager path leaves finite
garbage there); pooling that follows the attention mask never reads them.

Inference only: on the kernel path, a model in training mode or inputs that
require grad (with grad enabled) raise ``NotImplementedError`` instead of
training nothing; use ``model.eval()`` with ``torch.no_grad()``, or ``"sdpa"`` /
``"eager"`` to train.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable

import torch

from ..layout import PaddedLayout, VarlenLayout
from ..layout.reuse import TensorMemo
from ..ops import padded_prefill, resolve_backend, varlen_prefill

__all__ = ["NAME", "register", "spanfill_attention_forward", "spanfill_mask",
           "padding_from_mask"]

NAME = "spanfill"

# Set by spanfill.integrations.encoder_graphs while it runs (and captures) a forward:
# the padded batch's layout, built from static valid lengths inside the CUDA graph, or
# (encoder_packed) the packed sentences' VarlenLayout, the model's input then being one
# row [1, T] of every sentence's real tokens back to back. The model gets no mask, and
# every layer uses this layout instead.
CAPTURED_LAYOUT: contextvars.ContextVar[PaddedLayout | VarlenLayout | None] = \
    contextvars.ContextVar("spanfill_captured_layout", default=None)


def _padding_side(keep: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Valid lengths and padding side of a ``[B, S]`` bool key mask.

    Every sample must keep one contiguous run touching the start (right padding)
    or the end (left padding) of the row; samples with no padding fit both.
    """
    b_sz, seq = keep.shape
    valid_lens = keep.sum(dim=1)
    idx = torch.arange(seq, device=keep.device)
    right = keep == (idx[None, :] < valid_lens[:, None])
    left = keep == (idx[None, :] >= seq - valid_lens[:, None])
    is_right, is_left = right.all(dim=1), left.all(dim=1)
    bad = ~(is_right | is_left)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"attention_mask[{b}] is not a padding mask: its kept tokens "
            f"{keep[b].int().tolist()} are not one run at the start or the end of the row"
        )
    if bool(is_right.all()):
        return valid_lens, "right"
    if bool(is_left.all()):
        return valid_lens, "left"
    b_r = int(torch.nonzero(~is_left)[0, 0])
    b_l = int(torch.nonzero(~is_right)[0, 0])
    raise ValueError(
        f"attention_mask mixes right padding (sample {b_r}) and left padding (sample {b_l}) "
        "in one batch; spanfill needs one padding side per batch"
    )


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D mask as bool 'may attend'; additive float masks must be 0 or very negative."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return mask != 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | blocked).all()):
        raise ValueError(
            "the additive attention_mask holds values other than 0 and -inf/min "
            "(a bias such as ALiBi?); spanfill supports padding masks only"
        )
    return ~blocked


def padding_from_mask(
    mask: torch.Tensor | None, batch_size: int, seq_len: int, causal: bool
) -> tuple[torch.Tensor, str]:
    """Per-sample valid lengths and the padding side of a transformers attention mask.

    Parameters
    ----------
    mask : None (no padding); ``[B, S]`` bool/int padding mask (1 = real token);
        ``[B, 1|H, S, S]`` bool (True = may attend) or additive float (0 / -inf)
    batch_size, seq_len : B and S of the query
    causal : whether the model attends causally (the 4-D mask must then be the
        causal mask restricted to the padding mask)

    Returns
    -------
    valid_lens : [B] int32 on the mask's device
    padding_side : "right" or "left"

    Raises
    ------
    ValueError
        if the mask is not of that form (the argument and sample are named).
    """
    if mask is None:
        return torch.full((batch_size,), seq_len, dtype=torch.int32), "right"
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch_size, seq_len):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}, expected [B, S] = {(batch_size, seq_len)}"
            )
        lens, side = _padding_side(mask.bool())
        return lens.to(torch.int32), side
    if mask.dim() != 4 or mask.shape[0] != batch_size or tuple(mask.shape[-2:]) != (seq_len, seq_len):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}; spanfill expects [B, S] or "
            f"[B, 1|H, S, S] with B={batch_size}, S={seq_len} (no KV cache)"
        )
    allowed = _allowed(mask)
    keep = allowed.any(dim=-2).all(dim=1)  # [B, S]: keys any row may see
    lens, side = _padding_side(keep)
    expected = keep[:, None, None, :].expand_as(allowed)
    if causal:
        idx = torch.arange(seq_len, device=mask.device)
        expected = expected & (idx[None, None, None, :] <= idx[None, None, :, None])
    # Padded query rows may be masked or not (mask builders differ); only real rows count.
    real_rows = keep[:, None, :, None].expand_as(allowed)
    diff = (allowed != expected) & real_rows
    if bool(diff.any()):
        b, h, i, j = (int(x) for x in torch.nonzero(diff)[0])
        kind = "causal padding" if causal else "padding"
        raise ValueError(
            f"attention_mask is not a {kind} mask: at sample {b}, head {h}, query {i}, key {j} "
            f"it says {bool(allowed[b, h, i, j])}"
        )
    return lens.to(torch.int32), side


def spanfill_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract, computed by :func:`spanfill.padded_prefill`.

    Parameters
    ----------
    module : the attention module (``module.is_causal`` says whether it is causal)
    query : [B, Hq, S, D] fp16|bf16|fp32
    key, value : [B, Hk, S, D]; ``Hq % Hk == 0``
    attention_mask : see :func:`padding_from_mask`
    scaling : softmax scale, defaults to ``1/sqrt(D)``
    dropout : must be 0 (inference only)
    kwargs : ``is_causal`` overrides ``module.is_causal``; others are ignored

    Returns
    -------
    attn_output : [B, S, Hq, D] query.dtype, exact zeros on padded rows
    attn_weights : None

    Raises
    ------
    NotImplementedError
        on the kernel path with grad enabled, when the module is in training mode
        or the inputs require grad: the kernels have no backward pass, and silently
        returning outputs without gradients would train nothing.
    """
    _check_inference(module, query, key, value)
    if dropout:
        raise ValueError("spanfill attention is inference-only: dropout must be 0 (call model.eval())")
    b_sz, _, seq_len, _ = query.shape
    if key.shape[2] != seq_len:
        raise ValueError(
            f"spanfill attention got {seq_len} queries but {key.shape[2]} keys: attention over a "
            "transformers KV cache is not supported (use spanfill.integrations.holes for decoding)"
        )
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    layout = CAPTURED_LAYOUT.get()
    if isinstance(layout, VarlenLayout):
        # Packed sentences: query [1, H, T, D] is a view of [T, H, D] rows.
        if attention_mask is not None or b_sz != 1 or seq_len != layout.num_tokens:
            raise ValueError(f"a packed encoder step runs one row of T={layout.num_tokens} "
                             f"tokens and no mask; got B={b_sz}, S={seq_len} and a mask: "
                             f"{attention_mask is not None}")
        out = varlen_prefill(query[0].transpose(0, 1), key[0].transpose(0, 1),
                             value[0].transpose(0, 1), layout, causal=causal, sm_scale=scaling)
        return out[None], None
    if layout is None:
        layout = _layout_for(attention_mask, b_sz, seq_len, causal, query.device)
    elif attention_mask is not None or layout.seq_len != seq_len \
            or layout.valid_lens.shape[0] != b_sz:
        raise ValueError(f"a captured encoder step runs with its own layout (B="
                         f"{layout.valid_lens.shape[0]}, S={layout.seq_len}) and no mask; got "
                         f"B={b_sz}, S={seq_len} and a mask: {attention_mask is not None}")
    # [B, H, S, D] views of [B, S, H, D] projections: transposing back costs no copy.
    out = padded_prefill(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        layout, causal=causal, sm_scale=scaling,
    )
    return out, None


def _check_inference(module: torch.nn.Module, *inputs: torch.Tensor) -> None:
    if not torch.is_grad_enabled() or resolve_backend(inputs[0].device) == "reference":
        return
    if module.training:
        why = "the model is in training mode with grad enabled"
    elif any(t.requires_grad for t in inputs):
        why = "its inputs require grad (grad is enabled)"
    else:
        return
    raise NotImplementedError(
        f'attn_implementation="spanfill" has no backward pass (its Triton kernels are forward '
        f'only), but {why}. For inference call model.eval() and run the model under '
        f'torch.no_grad() or torch.inference_mode(); to train, load it with '
        f'attn_implementation="sdpa" or "eager"'
    )


# Every layer of one forward gets the same mask object: parse, check and plan it once
# (again if it is modified in place, which bumps its version).
_MASK_LAYOUTS: TensorMemo[PaddedLayout] = TensorMemo(capacity=2)


def _layout_for(mask: torch.Tensor | None, b_sz: int, seq_len: int, causal: bool,
                device: torch.device) -> PaddedLayout:
    def build() -> PaddedLayout:
        valid_lens, side = padding_from_mask(mask, b_sz, seq_len, causal)
        return PaddedLayout.build(valid_lens.to(device), seq_len, side)

    if mask is None:
        return build()
    return _MASK_LAYOUTS.get(mask, (b_sz, seq_len, causal, device), build)


def spanfill_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask builder for ``"spanfill"``: the 2-D padding mask as is, ``[B, S]`` bool or None.

    Only plain causal or bidirectional masks are passed through this way (the
    attention function applies causality itself); anything else is materialised by
    transformers' own ``sdpa_mask`` and checked by the attention function.
    """
    from transformers import masking_utils as mu

    plain = mask_function in (mu.causal_mask_function, mu.bidirectional_mask_function)
    if plain and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        # A fresh tensor per forward, so the per-forward layout memo never sees a
        # mask that was edited in place since.
        return None if attention_mask is None else attention_mask.to(torch.bool, copy=True)
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                        q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                        attention_mask=attention_mask, **kwargs)


def register(name: str = NAME) -> str:
    """Register spanfill's attention and mask functions with transformers under ``name``.

    Returns the name, to pass as ``attn_implementation=``.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, spanfill_attention_forward)
    AttentionMaskInterface.register(name, spanfill_mask)
    return name


register()
