"""What ``torch.compile`` does for a decoder step that goes through spanfill's custom ops.

A hand-written Llama-like decoder stack in plain PyTorch (no transformers): per layer
RMSNorm -> fused QKV projection -> a rotary rotation at the tokens' positions ->
``torch.ops.spanfill.span_prefill_append`` (through :func:`spanfill.custom_ops.span_prefill`
with ``k_new``/``v_new``: the layer's new K/V written into its paged cache and attended,
in one launch) -> O projection -> residual -> RMSNorm -> SwiGLU MLP -> residual, and a
final RMSNorm. Default shape: the demo's model (Llama-3.2-1B: hidden 2048, 32 q heads,
8 KV heads, head_dim 64, intermediate 8192, 16 layers), bf16, random weights, page size 16,
no embedding or LM head (the step starts from the hole tokens' hidden states).

Workload: one request with a prompt of ``--tokens`` tokens (default 8256) whose KV is in
the cache (random values) except the EPIC layout's holes (the first 16 tokens of every
512-token chunk, plus the last 64 tokens: at 8256, 320 tokens in 17 spans, as in
``scripts/bench_fill_holes.py`` and the demo). One step computes the hole tokens.

Providers, each timed as wall time per step between ``torch.cuda.synchronize()`` calls
(p50/p20/p80 over ``--reps``) and as the device time of the kernels of one profiled step:

- ``eager``: the stack called directly under ``torch.no_grad()``;
- ``compile``: ``torch.compile(stack, fullgraph=True)`` (inductor, default mode); its first
  call (trace, compile, Triton JIT; whatever the caches on the machine hold) is a
  ``compile_time`` row;
- ``compile_cudagraphs``: the same with ``mode="reduce-overhead"`` (inductor's CUDA graph
  trees; the per-layer caches are module buffers, i.e. static inputs that cudagraphs may
  mutate);
- ``cuda_graph``: the eager stack captured by hand in a ``torch.cuda.CUDAGraph`` (static
  inputs) and replayed.

Each provider is checked against eager after the hole slots of every layer's cache are
set to NaN: its output's relative error, and that its hole K/V were written (finite and
close to eager's). A provider that raises (say a graph break under ``fullgraph=True``)
gets an ``error`` row and no timing; the script goes on.

Rows
----
Kernel ``decoder_step``, the columns of ``scripts/_results.py``, written to ``--out``
with a bar plot next to it (.png); per provider, metrics ``time`` and ``gpu_time`` (ms),
``kernels`` (device kernels, copies and fills of one profiled step), ``check_relerr``
(output rel err vs eager; note: ``ok``/``FAIL`` and the hole K/V's rel err),
``compile_time`` (s, compiled providers' first call) or ``capture_time`` (s,
``cuda_graph``), or a single ``error`` row.

Usage
-----
Needs a CUDA GPU (``--help`` works anywhere). Most of a run is the two inductor compiles
of the whole stack (``--providers`` runs a subset, ``--layers`` a shorter stack)::

    PYTHONPATH=. python3 scripts/bench_compile.py --out bench/results/compile.csv
    PYTHONPATH=. python3 scripts/bench_compile.py --layers 4 --tokens 4160 --reps 20 \\
        --providers eager,compile
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import RESULTS, quantiles, write_rows  # noqa: E402
from spanfill import custom_ops  # noqa: E402
from spanfill.cache import PagedKVCache  # noqa: E402
from spanfill.demo import epic_spans, poison_holes, time_path  # noqa: E402
from spanfill.layout import SpanLayout  # noqa: E402
from spanfill.testing import capture_cuda_graph, rel_err  # noqa: E402

PROVIDERS = ("eager", "compile", "compile_cudagraphs", "cuda_graph")
QUESTION = 64  # tokens at the end of the prompt that are always recomputed
# Compiled vs eager in bf16 through every layer: inductor keeps fp32 where eager rounds
# to bf16 (fused SiLU*up, norms), so outputs drift by bf16 rounding per layer. A kernel
# that read a stale or unwritten row gives NaN (the holes are poisoned) or O(1) errors.
MAX_REL_ERR = 5e-2


@dataclass(frozen=True)
class Shape:
    """Sizes of the decoder stack (defaults: the demo's Llama-3.2-1B shape)."""

    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 64
    intermediate: int = 8192
    layers: int = 16
    page_size: int = 16
    rope_theta: float = 500000.0

    def describe(self) -> str:
        return (f"hidden {self.hidden}, {self.heads}q/{self.kv_heads}kv heads x {self.head_dim}, "
                f"mlp {self.intermediate}, {self.layers} layers, page {self.page_size}")


# ----------------------------------------------------------------------------- the model

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    # Statistics in fp32, as Llama's norm does; bf16 sums of 2048 squares lose digits.
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half) of ``x`` [T, H, D] with ``cos``/``sin`` [T, D/2]:
    elementwise work that eager runs as several kernels and inductor can fuse."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class DecoderLayer(nn.Module):
    """One Llama-like layer whose attention is spanfill's fused append + span prefill.

    The layer's paged K/V pools are non-persistent buffers (as serving engines attach a
    cache to each attention layer): for CUDA graph trees a module buffer is a static
    input, which the graph may mutate; a mutated plain argument would make inductor skip
    cudagraphs.
    """

    def __init__(self, shape: Shape, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = shape
        kw = dict(bias=False, device=device, dtype=dtype)
        q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        self.qkv = nn.Linear(shape.hidden, q_dim + 2 * kv_dim, **kw)
        self.o_proj = nn.Linear(q_dim, shape.hidden, **kw)
        self.gate_up = nn.Linear(shape.hidden, 2 * shape.intermediate, **kw)
        self.down = nn.Linear(shape.intermediate, shape.hidden, **kw)
        self.attn_norm = nn.Parameter(torch.ones(shape.hidden, device=device, dtype=dtype))
        self.mlp_norm = nn.Parameter(torch.ones(shape.hidden, device=device, dtype=dtype))
        self.register_buffer("k_cache", k_cache, persistent=False)
        self.register_buffer("v_cache", v_cache, persistent=False)

    def new_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k_new and v_new [T, Hk, D] of the tokens ``x`` [T, hidden]."""
        s = self.shape
        qkv = self.qkv(rms_norm(x, self.attn_norm))
        q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                             s.kv_heads * s.head_dim], dim=-1)
        q = rotate(q.unflatten(-1, (s.heads, s.head_dim)), cos, sin)
        k = rotate(k.unflatten(-1, (s.kv_heads, s.head_dim)), cos, sin)
        # v stays a strided view of qkv: the kernels take any strides with a contiguous
        # last dim, so no copy is needed.
        return q, k, v.unflatten(-1, (s.kv_heads, s.head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                block_table: torch.Tensor) -> torch.Tensor:
        q, k, v = self.new_qkv(x, cos, sin)
        o = custom_ops.span_prefill(q, self.k_cache, self.v_cache, positions, query_start_loc,
                                    seq_lens, block_table, self.shape.page_size, k_new=k,
                                    v_new=v)
        x = x + self.o_proj(o.flatten(1))
        gate, up = self.gate_up(rms_norm(x, self.mlp_norm)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class DecoderStack(nn.Module):
    """``shape.layers`` decoder layers and a final norm: hole tokens' hidden states
    [T, hidden] plus the span metadata tensors -> [T, hidden]."""

    def __init__(self, shape: Shape, caches: list[PagedKVCache], device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(shape, c.k_cache, c.v_cache, device, dtype)
                                    for c in caches)
        self.norm = nn.Parameter(torch.ones(shape.hidden, device=device, dtype=dtype))
        half = torch.arange(0, shape.head_dim, 2, device=device, dtype=torch.float32)
        self.register_buffer("inv_freq", shape.rope_theta ** (-half / shape.head_dim),
                             persistent=False)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D/2] fp32 at the tokens' original positions (once for all layers)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos(), freqs.sin()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, query_start_loc: torch.Tensor,
                seq_lens: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, query_start_loc, seq_lens, block_table)
        return rms_norm(x, self.norm)


@dataclass
class Problem:
    """The stack, its inputs and where the holes' K/V go."""

    shape: Shape
    stack: DecoderStack
    caches: list[PagedKVCache]
    spans: list[tuple[int, int]]
    tokens: int
    x: torch.Tensor  # [T, hidden], the hole tokens' hidden states
    meta: tuple[torch.Tensor, ...]  # positions, query_start_loc, seq_lens, block_table
    slots: torch.Tensor  # [T] int64, the hole tokens' cache slots

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.x, *self.meta)

    @property
    def dtype_name(self) -> str:
        return str(self.x.dtype).removeprefix("torch.")

    @property
    def workload(self) -> str:
        return (f"epic_n{self.tokens}_spans{len(self.spans)}_holes{self.x.shape[0]}"
                f"_L{self.shape.layers}")

    def poison(self) -> None:
        """NaN the hole slots of every layer, so that an unwritten or stale row shows."""
        for cache in self.caches:
            poison_holes(cache, 0, self.spans)

    def hole_kv(self) -> torch.Tensor:
        """[2 * layers, T, Hk, D]: the K and V each layer's cache holds at the holes."""
        return torch.stack([pool.view(-1, *pool.shape[2:])[self.slots]
                            for cache in self.caches for pool in (cache.k_cache, cache.v_cache)])


def build(shape: Shape, tokens: int, device: torch.device | str,
          dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Problem:
    """Random weights, one request of ``tokens`` tokens with EPIC holes, a random paged cache
    per layer, and the span metadata (built and validated once, as an engine would)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    spans = epic_spans(tokens, question=QUESTION)
    pages = -(-tokens // shape.page_size)
    caches = []
    for _ in range(shape.layers):
        cache = PagedKVCache(pages, shape.page_size, shape.kv_heads, shape.head_dim,
                             dtype=dtype, device=device)
        cache.allocate(0, tokens)
        cache.k_cache.normal_()
        cache.v_cache.normal_()
        caches.append(cache)
    # Every layer's pool hands out the same pages, so one block table serves all layers,
    # as in an engine whose layers share the page ids.
    if any(c.pages(0) != caches[0].pages(0) for c in caches):
        raise RuntimeError("the per-layer caches allocated different pages")
    layout = SpanLayout.build([spans], [tokens], caches[0].block_table([0]), shape.page_size)
    stack = DecoderStack(shape, caches, device, dtype).eval().requires_grad_(False)
    x = torch.randn(layout.num_tokens, shape.hidden, device=device, dtype=dtype)
    meta = (layout.positions, layout.query_start_loc, layout.seq_lens, layout.block_table)
    return Problem(shape, stack, caches, spans, tokens, x, meta, layout.slot_mapping)


# ----------------------------------------------------------------------------- providers

def _cuda_graph(problem: Problem) -> Callable[[], torch.Tensor]:
    """The eager stack captured once on its static inputs (spanfill's helper warms it up
    on a side stream first, so no Triton JIT or allocator growth lands in the capture);
    the step is a replay."""
    graph, out = capture_cuda_graph(lambda: problem.stack(*problem.args))

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def _setup(provider: str, problem: Problem) -> tuple[Callable[[], torch.Tensor], dict]:
    """The step of ``provider`` (compiled or captured already) and what setting it up
    cost: {metric: seconds} for the rows, and a note."""
    stack, args = problem.stack, problem.args
    if provider == "eager":
        return (lambda: stack(*args)), {}
    if provider == "cuda_graph":
        t0 = time.perf_counter()
        step = _cuda_graph(problem)
        torch.cuda.synchronize()
        return step, {"capture_time": time.perf_counter() - t0,
                      "note": "2 eager warm-up steps + capture"}
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # no compiled code of another mode gets reused
    counters.clear()
    mode = "reduce-overhead" if provider == "compile_cudagraphs" else None
    compiled = torch.compile(stack, fullgraph=True, mode=mode)

    def step() -> torch.Tensor:
        if mode is not None:
            # A new step for CUDA graph trees: earlier outputs may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    inductor = counters["inductor"]
    note = (f"first call; FX graph cache hits {inductor['fxgraph_cache_hit']}, misses "
            f"{inductor['fxgraph_cache_miss']}")
    if mode is not None:
        note += f"; cudagraph skips {inductor['cudagraph_skips']}"
    return step, {"compile_time": seconds, "note": note}


def _kernel_count(fn: Callable[[], object]) -> int:
    """Kernels (and copies, fills) one ``fn()`` runs on the device, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.self_device_time_total > 0)


def _check(step: Callable[[], torch.Tensor], problem: Problem, want: torch.Tensor,
           want_kv: torch.Tensor) -> tuple[float, float]:
    """Output and hole-K/V relative errors of one step run on poisoned holes."""
    problem.poison()
    out = step().clone()  # graph outputs are overwritten by the next replay
    return rel_err(out, want), rel_err(problem.hole_kv(), want_kv)


def _reference(problem: Problem) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Eager output and hole K/V (run on poisoned holes), and what checks eager itself:
    layer 0's written K/V against its own projection (layer 0's input is ``x`` itself),
    finiteness, and a second eager run (the kernels are deterministic)."""
    problem.poison()
    want = problem.stack(*problem.args).clone()
    want_kv = problem.hole_kv()
    cos, sin = problem.stack.rope(problem.meta[0])
    _, k0, v0 = problem.stack.layers[0].new_qkv(problem.x, cos, sin)
    rel0 = max(rel_err(want_kv[0], k0), rel_err(want_kv[1], v0))
    finite = bool(want.isfinite().all()) and bool(want_kv.isfinite().all())
    again, again_kv = _check(lambda: problem.stack(*problem.args), problem, want, want_kv)
    ok = finite and max(rel0, again, again_kv) <= MAX_REL_ERR
    note = (f"{'ok' if ok else 'FAIL'}: layer-0 hole K/V vs its projection {rel0:.2e}, "
            f"all finite {finite}, second run: out {again:.2e}, hole K/V {again_kv:.2e}")
    return want, want_kv, note


def run_provider(provider: str, problem: Problem, want: torch.Tensor, want_kv: torch.Tensor,
                 reps: int, base: dict, eager_note: str) -> list[dict]:
    """Set up, check and time one provider; its rows (raises what it raises)."""
    step, setup = _setup(provider, problem)
    setup_note = setup.pop("note", "")
    rows = [{**base, "provider": provider, "metric": metric, "unit": "s", "p50": sec,
             "p20": sec, "p80": sec, "note": setup_note} for metric, sec in setup.items()]
    for _ in range(3):  # CUDA graph trees warm up, then record, then replay
        step()
    if provider == "eager":
        rel, rel_kv, check_note = 0.0, 0.0, eager_note
    else:
        rel, rel_kv = _check(step, problem, want, want_kv)
        ok = max(rel, rel_kv) <= MAX_REL_ERR
        check_note = (f"{'ok' if ok else 'FAIL'}: vs eager, out {rel:.2e}, hole K/V "
                      f"{rel_kv:.2e} (bound {MAX_REL_ERR:g})")
    # p50 is the output's rel err; the note has the hole K/V's too.
    rows.append({**base, "provider": provider, "metric": "check_relerr", "unit": "rel",
                 "p50": rel, "p20": rel, "p80": rel, "note": check_note})
    t = time_path(step, torch.device("cuda"), reps)
    q = quantiles([1e3 * w for w in t.wall])
    gpu = 1e3 * t.gpu
    kernels = _kernel_count(step)
    note = (f"{problem.shape.describe()}, {problem.dtype_name}, random weights; rel err vs "
            f"eager: out {rel:.2e}, hole K/V {rel_kv:.2e}; {kernels} kernels per step")
    rows.append({**base, "provider": provider, "metric": "time", "unit": "ms", **q, "note": note})
    rows.append({**base, "provider": provider, "metric": "gpu_time", "unit": "ms", "p50": gpu,
                 "p20": gpu, "p80": gpu, "note": "device time of the kernels of one profiled step"})
    rows.append({**base, "provider": provider, "metric": "kernels", "unit": "count",
                 "p50": kernels, "p20": kernels, "p80": kernels,
                 "note": "kernels, copies and fills of one profiled step"})
    return rows


# ----------------------------------------------------------------------------- report

def _release() -> None:
    """Free the compiled graphs and their CUDA graph pools before the next provider; a
    CUDA error that outlived its provider is printed, not raised (the rows still go out)."""
    try:
        torch._dynamo.reset()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        print(f"cleanup after the provider: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _value(rows: list[dict], provider: str, metric: str, key: str = "p50") -> float | None:
    row = next((r for r in rows if r["provider"] == provider and r["metric"] == metric), None)
    return None if row is None or row.get(key) in (None, "") else float(row[key])


def table(rows: list[dict], providers: list[str]) -> str:
    """One line per provider: wall p50 (p20-p80), GPU time, kernels, setup, rel err."""
    head = (f"{'provider':<19} {'wall p50':>9} {'p20-p80':>15} {'GPU':>8} {'kernels':>7} "
            f"{'setup':>8}  check")
    lines = [head, "-" * len(head)]
    for p in providers:
        err = next((r for r in rows if r["provider"] == p and r["metric"] == "error"), None)
        if err is not None:
            lines.append(f"{p:<19} {err['note']}")
            continue
        wall, lo, hi = (_value(rows, p, "time", k) for k in ("p50", "p20", "p80"))
        gpu, kernels = _value(rows, p, "gpu_time"), _value(rows, p, "kernels")
        setup = _value(rows, p, "compile_time") or _value(rows, p, "capture_time")
        check = next(r for r in rows if r["provider"] == p and r["metric"] == "check_relerr")
        setup_text = "" if setup is None else f"{setup:6.1f} s"
        status = str(check["note"]).split(":")[0]  # ok | FAIL; the CSV note has the rest
        lines.append(f"{p:<19} {wall:6.2f} ms {lo:6.2f}-{hi:6.2f} ms {gpu:5.2f} ms "
                     f"{int(kernels):>7} {setup_text:>8}  {status} (out rel err "
                     f"{float(check['p50']):.1e})")
    return "\n".join(lines)


def plot(rows: list[dict], providers: list[str], path: Path) -> Path:
    """Wall and GPU p50 per provider (a failed one gets no bars and says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (metric, label) in enumerate((("time", "wall"), ("gpu_time", "GPU (kernels)"))):
        vals = [_value(rows, p, metric) or 0.0 for p in providers]
        ax.bar([j + 0.4 * i for j in range(len(providers))], vals, width=0.4, label=label)
    labels = []
    for p in providers:
        setup = _value(rows, p, "compile_time")
        failed = any(r["provider"] == p and r["metric"] == "error" for r in rows)
        labels.append(p + ("\n(failed)" if failed else "") +
                      ("" if setup is None else f"\ncompile {setup:.0f} s"))
    ax.set_xticks([j + 0.2 for j in range(len(providers))], labels, fontsize=7)
    ax.set_ylabel("ms per step")
    ax.set_title(str(rows[0]["workload"]) if rows else "", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Needs a CUDA GPU. Writes CSV rows to --out and a PNG plot next to it.")
    parser.add_argument("--layers", type=int, default=Shape.layers,
                        help="decoder layers (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=8256,
                        help="prompt length; EPIC holes: 16 of each 512 tokens plus the last "
                        f"{QUESTION} (default %(default)s: 320 hole tokens in 17 spans)")
    parser.add_argument("--reps", type=int, default=10,
                        help="timed steps per provider (default %(default)s)")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--out", default=str(RESULTS / "compile.csv"),
                        help="CSV path (default %(default)s)")
    args = parser.parse_args()
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {list(PROVIDERS)}")
    if args.tokens <= QUESTION or args.layers < 1 or args.reps < 1:
        parser.error(f"need --tokens > {QUESTION}, --layers >= 1 and --reps >= 1")
    if not torch.cuda.is_available():
        raise SystemExit("bench_compile.py times a decoder step on a CUDA GPU and none is "
                         "available here (--help works without one)")

    shape = Shape(layers=args.layers)
    t0 = time.perf_counter()
    problem = build(shape, args.tokens, "cuda")
    base = {"kernel": "decoder_step", "workload": problem.workload, "x": args.tokens}
    print(f"{problem.workload}: {problem.shape.describe()}, {problem.dtype_name} "
          f"(built in {time.perf_counter() - t0:.1f} s)")
    rows: list[dict] = []
    with torch.no_grad():
        # The eager step also JIT-compiles spanfill's Triton kernels before anything is timed.
        try:
            want, want_kv, eager_note = _reference(problem)
        except Exception as exc:  # noqa: BLE001 - nothing to check against: every row says so
            msg = _first_line(exc)
            print(f"eager reference step: FAILED {msg}")
            providers_left: list[str] = []
            rows = [{**base, "provider": p, "metric": "error",
                     "note": f"failed, not timed: the eager reference step raised {msg}"}
                    for p in providers]
        else:
            print(f"eager self-check: {eager_note}")
            providers_left = providers
        for provider in providers_left:
            t0 = time.perf_counter()
            try:
                rows += run_provider(provider, problem, want, want_kv, args.reps, base,
                                     eager_note)
            except Exception as exc:  # noqa: BLE001 - a failed provider is a result
                msg = _first_line(exc)
                print(f"{provider}: FAILED {msg}")
                rows.append({**base, "provider": provider, "metric": "error",
                             "note": f"failed, not timed: {msg}"})
            finally:
                _release()
            print(f"{provider}: done in {time.perf_counter() - t0:.1f} s")
    path = write_rows(Path(args.out), rows)
    png = plot(rows, providers, path.with_suffix(".png"))
    print()
    print(table(rows, providers))
    print("wrote", path, png)


if __name__ == "__main__":
    main()
