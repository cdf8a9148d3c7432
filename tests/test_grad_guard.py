"""The kernel path has no backward pass: it must refuse inputs that require grad.

An op on the kernel path (CUDA tensors, or CPU tensors in Triton's interpreter)
with grad enabled and an input that requires grad raises ``NotImplementedError``
before anything is written, instead of returning an output that silently carries
no gradient. ``torch.no_grad()``/``torch.inference_mode()`` make the same call work;
``backend="reference"`` is differentiated by autograd.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

import spanfill as sf
from spanfill.testing import TOLERANCE, rel_err
from conftest import INTERPRETING, tensor_digest
from helpers import paged_setup

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not (DEVICE == "cuda" or INTERPRETING),
                                reason="the kernel path needs CUDA or TRITON_INTERPRET=1")

HQ, HK, D, P = 4, 2, 32, 4
OPS_AND_INPUTS = [
    ("padded_prefill", "q"), ("padded_prefill", "k"), ("padded_prefill", "v"),
    ("varlen_prefill", "q"), ("varlen_prefill", "v"),
    ("span_prefill", "q"), ("span_prefill", "k_cache"), ("span_prefill", "v_cache"),
    ("append_kv", "k_new"), ("append_kv", "v_new"), ("append_kv", "k_cache"),
]


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend=None must mean the kernel path here, whatever the environment says."""
    monkeypatch.delenv("SPANFILL_BACKEND", raising=False)


def make_inputs(op: str) -> dict[str, object]:
    """Valid inputs of ``op`` on DEVICE, fp32, none requiring grad."""
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    if op == "padded_prefill":
        return dict(q=rnd(2, 5, HQ, D), k=rnd(2, 5, HK, D), v=rnd(2, 5, HK, D),
                    valid_lens=torch.tensor([5, 3], device=DEVICE))
    if op == "varlen_prefill":
        return dict(q=rnd(7, HQ, D), k=rnd(7, HK, D), v=rnd(7, HK, D),
                    cu_seqlens=torch.tensor([0, 4, 7], device=DEVICE))
    layout, k_cache, v_cache, q, k_new, v_new = paged_setup(
        [10, 7], [[(1, 3), (6, 9)], [(0, 2)]], P, HQ, HK, D, torch.float32, DEVICE)
    if op == "span_prefill":
        return dict(q=q, k_cache=k_cache, v_cache=v_cache, layout=layout)
    return dict(k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, layout=layout)


def call(op: str, args: dict[str, object], **kw) -> Callable[[], object]:
    return lambda: getattr(sf, op)(**args, **kw)


def _caches(args: dict[str, object]) -> list[torch.Tensor]:
    return [args[name] for name in ("k_cache", "v_cache") if name in args]


@pytest.mark.parametrize("backend", [None, "triton"], ids=["default-backend", "backend-triton"])
@pytest.mark.parametrize("op, needs_grad", OPS_AND_INPUTS,
                         ids=[f"{op}-{name}" for op, name in OPS_AND_INPUTS])
def test_kernel_path_refuses_inputs_that_require_grad(op: str, needs_grad: str,
                                                      backend: str | None) -> None:
    args = make_inputs(op)
    args[needs_grad].requires_grad_(True)
    caches = _caches(args)
    before = tensor_digest(*caches) if caches else None
    pattern = (rf"{op} has no backward pass on the Triton kernel path, but {needs_grad} requires "
               r"grad: wrap the call in torch\.no_grad\(\) or torch\.inference_mode\(\) if no "
               r"gradient is wanted, or pass backend=\"reference\" \(which supports autograd\)")
    with pytest.raises(NotImplementedError, match=pattern):
        call(op, args, backend=backend)()
    if caches:
        assert tensor_digest(*caches) == before, "a refused call changed the KV cache"


def test_refusal_is_a_runtime_error_and_names_every_input() -> None:
    """NotImplementedError subclasses RuntimeError, which callers may already catch."""
    args = make_inputs("span_prefill")
    for name in ("q", "v_cache"):
        args[name].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"but q, v_cache require grad"):
        sf.span_prefill(**args)


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode],
                         ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("op, needs_grad", OPS_AND_INPUTS,
                         ids=[f"{op}-{name}" for op, name in OPS_AND_INPUTS])
def test_same_call_works_without_grad(op: str, needs_grad: str, no_grad) -> None:
    """The way out the message names: the kernel runs and matches the reference."""
    args = make_inputs(op)
    args[needs_grad].requires_grad_(True)
    with no_grad():
        if op == "append_kv":
            ref = {name: t.clone() for name, t in args.items() if name in ("k_cache", "v_cache")}
            sf.append_kv(**{**args, **ref}, backend="reference")
            sf.append_kv(**args)
            assert torch.equal(args["k_cache"], ref["k_cache"])
            assert torch.equal(args["v_cache"], ref["v_cache"])
            return
        out = call(op, args)()
        want = call(op, args, backend="reference")()
    assert not out.requires_grad
    assert rel_err(out, want) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("op", ["padded_prefill", "varlen_prefill", "span_prefill", "append_kv"])
def test_grad_mode_without_grad_inputs_is_fine(op: str) -> None:
    """Plain inference with grad mode on (no input requires grad) is not refused."""
    assert torch.is_grad_enabled()
    call(op, make_inputs(op))()


@pytest.mark.parametrize("op, needs_grad", [(op, name) for op, name in OPS_AND_INPUTS
                                            if op != "append_kv"],
                         ids=[f"{op}-{name}" for op, name in OPS_AND_INPUTS if op != "append_kv"])
def test_reference_path_passes_gradients(op: str, needs_grad: str) -> None:
    args = make_inputs(op)
    args[needs_grad].requires_grad_(True)
    out = call(op, args, backend="reference")()
    out.square().sum().backward()
    grad = args[needs_grad].grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0


def test_reference_path_gradients_reach_new_kv_through_the_cache() -> None:
    """append_kv then span_prefill, both on the reference path: k_new/v_new get gradients."""
    args = make_inputs("append_kv")
    q = torch.randn(args["layout"].num_tokens, HQ, D, device=DEVICE)
    k_new, v_new = (args[n].requires_grad_(True) for n in ("k_new", "v_new"))
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    sf.append_kv(k_new, v_new, k_cache, v_cache, args["layout"], backend="reference")
    out = sf.span_prefill(q, k_cache, v_cache, args["layout"], backend="reference")
    out.square().sum().backward()
    for t in (k_new, v_new):
        assert t.grad is not None and t.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- transformers

def _tiny_bert(attention_dropout: float = 0.1):
    transformers = pytest.importorskip("transformers")
    from spanfill.integrations import transformers as _sft  # noqa: F401 - registers "spanfill"

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=96,
                                  attention_probs_dropout_prob=attention_dropout)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    model.config._attn_implementation = "spanfill"
    keep = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    ids = torch.randint(1, 50, keep.shape) * keep
    return model.to(DEVICE), ids.to(DEVICE), keep.to(DEVICE)


FIX = (r"For inference call model\.eval\(\) and run the model under torch\.no_grad\(\) or "
       r"torch\.inference_mode\(\); to train, load it with attn_implementation=\"sdpa\" or \"eager\"")


def test_transformers_training_mode_is_refused() -> None:
    model, ids, keep = _tiny_bert()
    model.train()
    with pytest.raises(NotImplementedError,
                       match=r"attn_implementation=\"spanfill\" has no backward pass \(its Triton "
                             r"kernels are forward only\), but the model is in training mode with "
                             r"grad enabled\. " + FIX):
        model(input_ids=ids, attention_mask=keep)


def test_transformers_eval_with_grad_is_refused() -> None:
    """eval() alone still builds a graph through weights that require grad."""
    model, ids, keep = _tiny_bert()
    model.eval()
    with pytest.raises(NotImplementedError, match=r"but its inputs require grad \(grad is enabled\)\. "
                                                  + FIX):
        model(input_ids=ids, attention_mask=keep)


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode],
                         ids=["no_grad", "inference_mode"])
def test_transformers_eval_without_grad_works(no_grad) -> None:
    model, ids, keep = _tiny_bert()
    model.eval()
    with no_grad():
        got = model(input_ids=ids, attention_mask=keep).last_hidden_state
        model.config._attn_implementation = "eager"
        want = model(input_ids=ids, attention_mask=keep).last_hidden_state
    real = keep.bool()
    assert (got - want).abs()[real].max().item() < 1e-4


def test_transformers_reference_path_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal is about the kernels: on the reference path a training step gets gradients."""
    monkeypatch.setenv("SPANFILL_BACKEND", "reference")
    model, ids, keep = _tiny_bert(attention_dropout=0.0)
    model.train()
    model(input_ids=ids, attention_mask=keep).last_hidden_state.square().sum().backward()
    grad = model.encoder.layer[0].attention.self.query.weight.grad
    assert grad is not None and grad.abs().sum() > 0
