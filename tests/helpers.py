"""Shared test helpers: random layouts and CUDA-graph capture.

Tolerances, relative error and reference wrappers live in :mod:`spanfill.testing`.
"""

from __future__ import annotations

import random

import torch

import spanfill as sf



def random_spans(rng: random.Random, seq_len: int, max_spans: int, max_len: int) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-empty half-open spans inside [0, seq_len)."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for _ in range(rng.randint(0, max_spans)):
        if cursor >= seq_len:
            break
        start = rng.randint(cursor, min(seq_len - 1, cursor + 2 * max_len))
        stop = min(seq_len, start + rng.randint(1, max_len))
        spans.append((start, stop))
        cursor = stop + rng.randint(0, 1)  # adjacent-but-disjoint spans happen too
    return spans


def paged_setup(
    seq_lens: list[int], spans: list[list[tuple[int, int]]], page_size: int, hq: int, hk: int,
    d: int, dtype: torch.dtype, device: str, seed: int = 0, spare_pages: int = 3,
):
    """A shuffled page pool holding random KV, a block table and a validated layout.

    Returns (layout, k_cache, v_cache, q, k_new, v_new).
    """
    gen = torch.Generator().manual_seed(seed)
    pages_per_req = [(s + page_size - 1) // page_size for s in seq_lens]
    num_pages = sum(pages_per_req) + spare_pages
    perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
    width = max(max(pages_per_req, default=1), 1)
    block_table = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_per_req):
        block_table[b, :n] = perm[used:used + n]
        used += n
    layout = sf.SpanLayout.build(spans, seq_lens, block_table.to(device), page_size)
    t = layout.num_tokens
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    k_cache, v_cache = rnd(num_pages, page_size, hk, d), rnd(num_pages, page_size, hk, d)
    return layout, k_cache, v_cache, rnd(t, hq, d), rnd(t, hk, d), rnd(t, hk, d)



class EagerReplay:
    """Stands in for a captured ``torch.cuda.CUDAGraph`` where there is no GPU:
    ``replay()`` runs the step again, eagerly, and stores its output where the graph's
    static output would be (``setattr(bucket, attr, step(bucket))``)."""

    def __init__(self, step, bucket, attr: str):
        self._step, self._bucket, self._attr = step, bucket, attr

    def replay(self) -> None:
        setattr(self._bucket, self._attr, self._step(self._bucket))


def compile_check(script: str) -> str:
    """The output of ``scripts/SCRIPT --compile-check`` (a kernel compiled for sm_90 on
    this machine), run in a subprocess without ``TRITON_INTERPRET``: in the test process
    Triton was imported in interpreter mode, where it cannot compile (as
    ``tests/test_compile_sm90.py`` explains). Fails the test with the script's stderr if
    it fails."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(root / "scripts" / script), "--compile-check"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
