"""Sentences per second embedding padded batches with all-MiniLM-L6-v2: spanfill vs sdpa.

The same model weights (fp16 or bf16) run with ``attn_implementation="spanfill"``
(eager; ``spanfill_graph``: the forward replayed as a CUDA graph per padded shape,
:class:`spanfill.integrations.encoder_graphs.EncoderGraphRunner`; ``spanfill_packed_graph``:
the real tokens only, back to back, replayed per token bucket,
:class:`spanfill.integrations.encoder_packed.PackedEncoderGraphRunner`) and with
transformers' ``"sdpa"`` (and ``"eager"``) on the same unsorted batches
of sentences of very different lengths, where padding wastes most work. Tokenizing
is done once beforehand and not timed. Writes bench/results/minilm_throughput.csv.

    python scripts/bench_minilm.py [--dtype fp16] [--sentences 4096] [--batch 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402

import spanfill.integrations.transformers  # noqa: E402,F401  (registers "spanfill")
from _results import RESULTS, quantiles, write_rows  # noqa: E402
from tests.sentences import mean_pool, minilm_dir, sample_sentences  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def batches(tokenizer, sentences: list[str], batch: int, device: str) -> list[dict]:
    tokenizer.padding_side = "right"
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=512,
                        return_tensors="pt")
        out.append({k: v.to(device) for k, v in enc.items()})
    return out


class GraphModel:
    """``model(**enc).last_hidden_state`` through an EncoderGraphRunner."""

    def __init__(self, runner):
        self.runner = runner

    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        class Out:
            pass

        out = Out()
        out.last_hidden_state = self.runner(input_ids, attention_mask, token_type_ids)
        return out


@torch.no_grad()
def run_all(model, encoded: list[dict]) -> None:
    for enc in encoded:
        mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    parser.add_argument("--sentences", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-words", type=int, default=300)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--providers",
                        default="spanfill,spanfill_graph,spanfill_packed_graph,sdpa,eager")
    parser.add_argument("--out", default=str(RESULTS / "minilm_throughput.csv"))
    args = parser.parse_args()
    path = minilm_dir()
    if path is None:
        raise SystemExit("all-MiniLM-L6-v2 not found: run scripts/export_minilm.py, carry .minilm/")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = sample_sentences(args.sentences, max_words=args.max_words, seed=7)
    encoded = batches(tokenizer, sentences, args.batch, device)
    real = sum(int(e["attention_mask"].sum()) for e in encoded)
    padded = sum(e["attention_mask"].numel() for e in encoded)
    workload = (f"minilm_{args.dtype}_n{args.sentences}_b{args.batch}_"
                f"pad{100 * (1 - real / padded):.0f}pct")
    print(f"{workload}: {real} real tokens in {padded} padded slots")
    rows = []
    for provider in args.providers.split(","):
        graph = provider in ("spanfill_graph", "spanfill_packed_graph")
        if graph and device != "cuda":
            print("  spanfill_graph skipped: CUDA graphs need a GPU")
            continue
        model = transformers.AutoModel.from_pretrained(
            path, attn_implementation="spanfill" if graph else provider,
            dtype=dtype).to(device).eval()
        if graph:
            from spanfill.integrations.encoder_graphs import EncoderGraphRunner
            from spanfill.integrations.encoder_packed import PackedEncoderGraphRunner

            runner = PackedEncoderGraphRunner if provider == "spanfill_packed_graph" \
                else EncoderGraphRunner
            model = GraphModel(runner(model, batch_buckets=(args.batch,)))
        run_all(model, encoded)  # warm-up: Triton compiles, cuBLAS picks algorithms (graphs
        #                          are captured here, one per padded shape)
        rates = []
        for _ in range(args.reps):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run_all(model, encoded)
            if device == "cuda":
                torch.cuda.synchronize()
            rates.append(len(sentences) / (time.perf_counter() - t0))
        q = quantiles(rates)
        rows.append({"kernel": "minilm_embed", "provider": provider, "workload": workload,
                     "x": args.batch, "metric": "throughput", "unit": "sentences/s", **q,
                     "note": f"{args.dtype}; {len(encoded)} batches; tokenization not timed"})
        print(f"  {provider:<9} {q['p50']:10.1f} sentences/s (p20 {q['p20']:.1f}, p80 {q['p80']:.1f})")
        del model
    path = write_rows(Path(args.out), rows)
    print("wrote", path, plot(rows, path.with_suffix(".png")))


def plot(rows: list[dict], path: Path) -> Path:
    """Sentences per second of each provider (p50, with the p20-p80 spread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["provider"] for r in rows]
    p50 = [float(r["p50"]) for r in rows]
    spread = [[p - float(r["p20"]) for p, r in zip(p50, rows)],
              [float(r["p80"]) - p for p, r in zip(p50, rows)]]
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 3.5))
    ax.bar(names, p50, yerr=spread, capsize=3)
    for i, v in enumerate(p50):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("sentences / s")
    ax.set_title(rows[0]["workload"] if rows else "", fontsize=8)
    ax.tick_params(axis="x", labelsize=7, rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
