"""Time to fill a prompt's KV holes: spanfill (eager, and replayed as a CUDA graph) vs
full recompute vs one forward per span.

Llama-3.2-1B-shaped random model in bf16; EPIC-style layout (first 16 tokens of
each 512-token chunk missing) and CacheBlend-style layout (15% of tokens, in
spans of 1-32 tokens), 8k and 32k prompts; the last 64 tokens (the question) are
always recomputed (at n = 8256 the EPIC layout is the demo's: 320 tokens in 17 spans).
Each path gets its wall time (``time``) and, from one profiled call, the device time
of its kernels (``gpu_time``). Writes bench/results/fill_holes.csv.

    python scripts/bench_fill_holes.py [--lengths 8256,32768] [--reps 5]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402

from _results import RESULTS, quantiles, write_rows  # noqa: E402
from spanfill.demo import epic_spans, poison_holes, time_path  # noqa: E402
from spanfill.integrations.holes import (  # noqa: E402
    fill_holes, fill_holes_per_span, make_cache, prefill_cache,
)
from spanfill.integrations.holes_graphs import HoleGraphRunner  # noqa: E402
from spanfill.testing import rel_err  # noqa: E402

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                tie_word_embeddings=True, max_position_embeddings=131072)
QUESTION = 64


def cacheblend(n: int, share: float = 0.15, seed: int = 0) -> list[tuple[int, int]]:
    """About ``share`` of the prompt in random spans of 1..32 tokens, plus the question."""
    rng = random.Random(seed)
    body, spans, pos, want = n - QUESTION, [], 0, int(share * n) - QUESTION
    gap_mean = (body - want) / max(1, want / 16.5)
    while pos < body and want > 0:
        pos += max(1, int(rng.expovariate(1 / gap_mean)))
        length = min(rng.randint(1, 32), want, body - pos)
        if length <= 0:
            break
        spans.append((pos, pos + length))
        pos += length
        want -= length
    return spans + [(body, n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8256,32768")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "fill_holes.csv"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**LLAMA_1B)
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, config.vocab_size, (n,), device="cuda")
        for name, spans in (("epic", epic_spans(n, question=QUESTION)),
                            ("cacheblend15", cacheblend(n))):
            cache = make_cache(model, n, page_size=16)
            want = prefill_cache(model, ids, cache)
            recomputed = sum(e - s for s, e in spans)
            poison = lambda: poison_holes(cache, 0, spans)  # noqa: E731
            poison()
            got = fill_holes(model, ids, cache, spans)
            rel = rel_err(got, want)
            runner = HoleGraphRunner(model, cache, max_seq_len=n, max_requests=1,
                                     buckets=(-(-recomputed // 64) * 64,))
            poison()
            rel_graph = rel_err(runner.fill_holes(ids, spans), want)
            with torch.no_grad():
                providers = {
                    "spanfill": (lambda: fill_holes(model, ids, cache, spans), poison),
                    "spanfill_graph": (lambda: runner.fill_holes(ids, spans), poison),
                    "full_recompute": (lambda: model(input_ids=ids[None], use_cache=False,
                                                     logits_to_keep=1), None),
                    "forward_per_span": (lambda: fill_holes_per_span(model, ids, cache, spans),
                                         poison),
                }
                workload = f"{name}_n{n}_spans{len(spans)}_recomputed{recomputed}"
                note = (f"Llama-3.2-1B shape, bf16, random weights; logits rel err vs full "
                        f"prefill: spanfill {rel:.2e}, spanfill_graph {rel_graph:.2e}")
                for provider, (fn, before) in providers.items():
                    fn()  # warm-up
                    t = time_path(fn, torch.device("cuda"), args.reps, before)
                    q = quantiles([1e3 * w for w in t.wall])
                    rows.append({"kernel": "fill_holes", "provider": provider, "workload": workload,
                                 "x": n, "metric": "time", "unit": "ms", **q, "note": note})
                    gpu = 1e3 * t.gpu
                    rows.append({"kernel": "fill_holes", "provider": provider, "workload": workload,
                                 "x": n, "metric": "gpu_time", "unit": "ms", "p50": gpu,
                                 "p20": gpu, "p80": gpu,
                                 "note": "device time of the kernels of one profiled call"})
                    print(f"{workload:<48} {provider:<17} {q['p50']:9.2f} ms wall "
                          f"{gpu:9.2f} ms GPU")
            del cache
            torch.cuda.empty_cache()
    path = write_rows(Path(args.out), rows)
    print("wrote", path, plot(rows, path.with_suffix(".png")))


def plot(rows: list[dict], path: Path) -> Path:
    """Wall and GPU time of each path, one group of bars per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads), 4), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        for i, metric in enumerate(("time", "gpu_time")):
            vals = [next((r["p50"] for r in rows if r["workload"] == w and r["provider"] == p
                          and r["metric"] == metric), 0.0) for p in providers]
            ax.bar([j + 0.4 * i for j in range(len(providers))], vals, width=0.4,
                   label="wall" if metric == "time" else "GPU (kernels)")
        ax.set_xticks([j + 0.2 for j in range(len(providers))], providers, rotation=30,
                      ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(w, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
