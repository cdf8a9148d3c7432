"""Fill the KV holes of a decoder prompt with spanfill, then decode from the cache.

A Llama/Qwen2-architecture transformers model (``model.model`` with decoder
layers, rotary embedding and final norm, ``model.lm_head``) runs only on the
hole tokens, each at its original position: the model's own forward does the
embeddings, norms, q/k/v projections, RoPE, o_proj and MLP, and its attention
calls are routed to spanfill through an attention function registered as
``"spanfill_holes"`` that, per layer,

writes the new K/V of the hole tokens into that layer's pages and attends over cached
plus new KV, for all spans, in one launch (``span_prefill`` with ``k_new``/``v_new``;
``fused_append=False``: ``append_kv`` then ``span_prefill``, two launches).

All requests' hole tokens are packed into one ``[1, T]`` row; only attention
mixes tokens, and it reads the request boundaries from the :class:`SpanLayout`.

The cache is a :class:`spanfill.PagedKVCache` with ``num_layers`` = the model's
layer count, ``num_kv_heads`` and ``head_dim`` of the model, in the model's dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Hashable, Iterator, Sequence

import numpy as np
import torch

from ..cache import PagedKVCache
from ..layout import SpanLayout
from ..ops import append_kv, span_prefill

__all__ = ["NAME", "fill_holes", "fill_holes_per_span", "decode_step", "prefill_cache",
           "make_cache", "transformers_kv"]

NAME = "spanfill_holes"
Spans = Sequence[tuple[int, int]]


@dataclass
class _Step:
    cache: PagedKVCache
    layout: SpanLayout
    fused_append: bool = True


_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("spanfill_step", default=None)


def _holes_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                     dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention contract for one packed row of hole tokens.

    query [1, Hq, T, D], key/value [1, Hk, T, D] (RoPE applied at the tokens' original
    positions) -> [1, T, Hq, D]. The mask is ignored: the layout defines visibility.
    """
    step = _STEP.get()
    if step is None:
        raise RuntimeError(f"attn_implementation {NAME!r} only runs inside spanfill's fill_holes/decode_step")
    if getattr(module, "sliding_window", None):
        raise ValueError("sliding-window attention layers are not supported by span_prefill")
    if query.shape[0] != 1 or query.shape[2] != step.layout.num_tokens:
        raise ValueError(f"expected query [1, Hq, T={step.layout.num_tokens}, D], got {tuple(query.shape)}")
    k_cache, v_cache = step.cache.layer(module.layer_idx)
    q = query[0].transpose(0, 1).contiguous()  # [T, Hq, D]
    k_new = key[0].transpose(0, 1).to(k_cache.dtype).contiguous()  # [T, Hk, D]
    v_new = value[0].transpose(0, 1).to(v_cache.dtype).contiguous()
    if step.fused_append:
        out = span_prefill(q.to(k_cache.dtype), k_cache, v_cache, step.layout, causal=True,
                           sm_scale=scaling, k_new=k_new, v_new=v_new)
    else:
        append_kv(k_new, v_new, k_cache, v_cache, step.layout)
        out = span_prefill(q.to(k_cache.dtype), k_cache, v_cache, step.layout, causal=True,
                           sm_scale=scaling)
    return out.to(query.dtype)[None], None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, _holes_attention)


@contextlib.contextmanager
def _routed(model: torch.nn.Module, step: _Step) -> Iterator[None]:
    """Run ``model`` with its attention routed to spanfill for the duration."""
    _register()
    config = model.config
    previous = config._attn_implementation
    token = _STEP.set(step)
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _STEP.reset(token)


def _as_list(input_ids: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if torch.is_tensor(input_ids):
        return [input_ids.reshape(-1)]
    return [ids.reshape(-1) for ids in input_ids]


@torch.no_grad()
def _run(model: torch.nn.Module, cache: PagedKVCache, requests: Sequence[Hashable],
         token_ids: torch.Tensor, layout: SpanLayout, fused_append: bool = True) -> torch.Tensor:
    """Run the packed tokens; return the logits of each request's last packed token, [B, V]."""
    device = cache.device
    positions = layout.positions.to(device=device, dtype=torch.long)
    with _routed(model, _Step(cache, layout, fused_append)):
        hidden = model.model(input_ids=token_ids.to(device)[None], position_ids=positions[None],
                             use_cache=False).last_hidden_state[0]  # [T, hidden]
    last = layout.query_start_loc[1:].long() - 1
    return model.lm_head(hidden[last.clamp_min(0)]).float()


def fill_holes(
    model: torch.nn.Module,
    input_ids: torch.Tensor | Sequence[torch.Tensor],
    cache: PagedKVCache,
    spans: Spans | Sequence[Spans],
    requests: Sequence[Hashable] = (0,),
    fused_append: bool = True,
) -> torch.Tensor:
    """Recompute the holes of prompts whose KV is otherwise cached; last-token logits.

    Every layer's K/V of the hole tokens is written into ``cache``; the tokens
    attend causally to everything before them (cached KV and the new KV of earlier
    holes and of their own span), in one ``span_prefill`` launch per layer for all
    spans of all requests. The last prompt token is always run, since its logits
    are wanted: if no hole covers it, a one-token span is added for it.

    Parameters
    ----------
    model : LlamaForCausalLM / Qwen2ForCausalLM (any ``model.model`` + ``lm_head``
        decoder whose attention goes through transformers' attention interface)
    input_ids : [n] int64 prompt tokens, or a list of them (one per request)
    cache : PagedKVCache with ``num_layers`` = model layers; each request is
        allocated for its full prompt length ``n``
    spans : half-open ``(start, stop)`` holes of one request, or one list per request
    requests : the cache's request ids, in the order of ``input_ids``
    fused_append : write each layer's new K/V inside the attention launch (one launch
        per layer); False: ``append_kv`` then ``span_prefill``

    Returns
    -------
    [B, V] fp32 logits of each request's last prompt token
    """
    prompts, per_request, seq_lens = hole_batch(input_ids, cache, spans, requests)
    layout = SpanLayout.build(per_request, seq_lens, cache.block_table(list(requests)),
                              cache.page_size, device=cache.device)
    starts = np.asarray([s for spans_b in per_request for s, _ in spans_b], dtype=np.int64)
    stops = np.asarray([e for spans_b in per_request for _, e in spans_b], dtype=np.int64)
    span_req = np.repeat(np.arange(len(prompts)), [len(spans_b) for spans_b in per_request])
    tokens, _, _ = hole_tokens(prompts, starts, stops, span_req)
    return _run(model, cache, requests, tokens.to(cache.device), layout, fused_append)


def hole_batch(input_ids: torch.Tensor | Sequence[torch.Tensor], cache: PagedKVCache,
               spans: Spans | Sequence[Spans], requests: Sequence[Hashable]
               ) -> tuple[list[torch.Tensor], list[list[tuple[int, int]]], list[int]]:
    """The prompts, spans per request and prompt lengths of a :func:`fill_holes` call.

    Each request gets a one-token span for its last token if no hole covers it (its
    logits are wanted). Shared with the CUDA-graph runner
    (:mod:`spanfill.integrations.holes_graphs`).

    Raises
    ------
    ValueError
        if the counts of prompts, span lists and requests differ, or a request's
        cached length is not its prompt's.
    """
    prompts = _as_list(input_ids)
    per_request = [list(spans)] if prompts and len(prompts) == 1 and _is_flat(spans) else \
        [list(s) for s in spans]
    if len(per_request) != len(prompts) or len(requests) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts, {len(per_request)} span lists and "
                         f"{len(requests)} requests; they must match")
    seq_lens = []
    for b, (ids, req) in enumerate(zip(prompts, requests)):
        n = ids.shape[0]
        if cache.seq_len(req) != n:
            raise ValueError(f"request {req!r} holds {cache.seq_len(req)} positions but prompt {b} "
                             f"has {n} tokens")
        if not per_request[b] or per_request[b][-1][1] < n:
            per_request[b] = per_request[b] + [(n - 1, n)]  # its logits are wanted
        seq_lens.append(n)
    return prompts, per_request, seq_lens


def hole_tokens(prompts: Sequence[torch.Tensor], starts: np.ndarray, stops: np.ndarray,
                span_req: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The hole tokens of a batch, request by request in position order, gathered in one
    indexing op on the prompts' device (no host sync, no Python loop over tokens).

    Parameters
    ----------
    prompts : B tensors [n_b] int64
    starts, stops, span_req : [num_spans] int64, every span's bounds and its request

    Returns
    -------
    tokens : [T] int64 on the prompts' device
    positions : [T] int64 (host), each token's position in its prompt
    counts : [B] int64 (host), tokens per request
    """
    lens = stops - starts
    first_row = np.repeat(np.cumsum(lens) - lens, lens)
    positions = np.arange(int(lens.sum())) - first_row + np.repeat(starts, lens)
    counts = np.bincount(span_req, weights=lens, minlength=len(prompts)).astype(np.int64)
    offsets = np.cumsum([0] + [ids.shape[0] for ids in prompts[:-1]])
    flat = [ids.reshape(-1) for ids in prompts]
    prompt_tokens = flat[0] if len(flat) == 1 else torch.cat(flat)
    index = torch.from_numpy(positions + np.repeat(offsets[span_req], lens))
    return prompt_tokens[index.to(prompt_tokens.device, non_blocking=True)], positions, counts


def _is_flat(spans: Any) -> bool:
    """True for ``[(s, e), ...]``, False for ``[[(s, e), ...], ...]``."""
    return len(spans) == 0 or (len(spans[0]) == 2 and not isinstance(spans[0][0], (tuple, list)))


def fill_holes_per_span(model: torch.nn.Module, input_ids: torch.Tensor, cache: PagedKVCache,
                        spans: Spans, request: Hashable = 0) -> torch.Tensor:
    """The baseline: one model forward per span, in order (later spans need earlier ones).

    Same result as :func:`fill_holes` for one request; returns [1, V] last-token logits.
    """
    ids = input_ids.reshape(-1)
    n = ids.shape[0]
    todo = list(spans) if spans and spans[-1][1] == n else list(spans) + [(n - 1, n)]
    logits = None
    for span in todo:
        # KV past the span's end is never visible (causal); leave it out of the layout
        # so holes not filled yet are not even gathered.
        layout = SpanLayout.build([[span]], [span[1]], cache.block_table([request]),
                                  cache.page_size, device=cache.device)
        logits = _run(model, cache, [request], ids.to(cache.device)[span[0]:span[1]], layout)
    return logits


def decode_step(model: torch.nn.Module, token_ids: torch.Tensor, cache: PagedKVCache,
                requests: Sequence[Hashable] = (0,), fused_append: bool = True) -> torch.Tensor:
    """Append one token per request at the end of its sequence and run it.

    Parameters
    ----------
    token_ids : [B] int64, the next token of each request
    requests : the cache's request ids
    fused_append : as for :func:`fill_holes`

    Returns
    -------
    [B, V] fp32 logits of the new tokens
    """
    seq_lens = []
    for req in requests:
        n = cache.seq_len(req)
        cache.grow(req, n + 1)
        seq_lens.append(n + 1)
    spans = [[(n - 1, n)] for n in seq_lens]
    layout = SpanLayout.build(spans, seq_lens, cache.block_table(list(requests)), cache.page_size,
                              device=cache.device)
    return _run(model, cache, requests, token_ids.reshape(-1).to(cache.device), layout,
                fused_append)


# ----------------------------------------------------------------------------- cache helpers

def make_cache(model: torch.nn.Module, num_tokens: int, page_size: int = 16,
               device: torch.device | str | None = None, spare_pages: int = 0) -> PagedKVCache:
    """A PagedKVCache shaped for ``model`` with room for ``num_tokens`` tokens."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    param = next(model.parameters())
    pages = (num_tokens + page_size - 1) // page_size + spare_pages
    return PagedKVCache(pages, page_size, cfg.num_key_value_heads, head_dim, dtype=param.dtype,
                        device=device or param.device, num_layers=cfg.num_hidden_layers)


def transformers_kv(past_key_values: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer of a transformers cache, each [1, Hk, n, D]."""
    if hasattr(past_key_values, "layers"):
        entry = past_key_values.layers[layer]
        return entry.keys, entry.values
    return past_key_values[layer][0], past_key_values[layer][1]


@torch.no_grad()
def prefill_cache(model: torch.nn.Module, input_ids: torch.Tensor, cache: PagedKVCache,
                  request: Hashable = 0) -> torch.Tensor:
    """Full prefill with the model's own attention; copy every layer's K/V into the cache.

    Allocates ``request`` for the prompt. Returns the [1, V] fp32 logits of the last token.
    """
    ids = input_ids.reshape(1, -1).to(cache.device)
    n = ids.shape[1]
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache.allocate(request, n)
    slots = cache.slot_mapping(request, torch.arange(n))
    for layer in range(model.config.num_hidden_layers):
        k, v = transformers_kv(out.past_key_values, layer)
        k_pool, v_pool = cache.layer(layer)
        k_pool.view(-1, *k_pool.shape[2:])[slots] = k[0].transpose(0, 1).to(k_pool.dtype)
        v_pool.view(-1, *v_pool.shape[2:])[slots] = v[0].transpose(0, 1).to(v_pool.dtype)
    return out.logits[:, -1].float()
