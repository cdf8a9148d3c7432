"""Compile every Triton kernel family for sm_90 on a machine without a GPU, with the
arguments specialised exactly as a real launch would specialise them.

Triton turns an integer argument equal to 1 into a compile-time constant and marks
integers and pointers divisible by 16; code that calls a tensor method on such an
argument (``num_rows.to(tl.int64)`` with one row) compiles at some values and not
at others. The interpreter never specialises, so only a compile shows it. Here each
case calls the real host launcher (``attention_fwd``, ``append_kv_launch``, the merge
and plan launchers) on small CPU tensors shaped so that the arguments take the values
Triton specialises (1 and multiples of 16: row counts, strides, page sizes); the launch is intercepted, the arguments go through Triton's own binder and
specialisation for an sm_90 target, and the kernel is compiled to a cubin.

Usage::

    python scripts/compile_sm90.py            # a table: case, compiled, specialised args
    python scripts/compile_sm90.py --json     # one JSON line per run (tests read it)
    python scripts/compile_sm90.py CASE ...   # only these cases
    python scripts/compile_sm90.py --json --shard 0/2   # every 2nd case from the 1st
    python scripts/compile_sm90.py --dump-ttgir DIR   # also write each launch's TTGIR

``--dump-ttgir`` writes ``DIR/<case>.<n>.<kernel>.ttgir`` in a canonical form (no source
locations, values renumbered: :func:`canonical_ttgir`), and the PTX beside it without
debug information (``.ptx``, :func:`canonical_ptx`):
run it at two revisions (a ``git worktree``) and ``diff -r`` the folders to show that a
refactor leaves the compiled kernels unchanged, whatever it did to their signatures.

Run it as its own process, never inside one that imported Triton under
``TRITON_INTERPRET=1`` (see ``scripts/compare_kernel_ir.py``).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spanfill.backends.triton_config import launch_config, pick_config  # noqa: E402
from spanfill.kernels import (  # noqa: E402
    append_kv_launch,
    attention_fwd,
    merge_states_launch,
    merge_two_launch,
    plan_packed_launch,
)
from spanfill.layout import plan_packed  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


@contextmanager
def compile_instead_of_launch(sink: list[dict]):
    """Replace every Triton launch with an sm_90 compile of what it would have run.

    Each launch appends ``{"kernel", "constexpr_ints", "ttgir", "ptx"}`` to ``sink``:
    ``constexpr_ints`` are the integer arguments Triton made compile-time constants.
    """
    backend = make_backend(TARGET)
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(
            backend, kwargs, bound_args, specialization, options)
        source = ASTSource
        if getattr(self, "is_gluon", lambda: False)():  # Gluon: its own front end
            from triton.experimental.gluon._runtime import GluonASTSource as source
        kernel = triton.compile(source(self, signature, constexprs, attrs), target=TARGET,
                                options=options.__dict__)
        names = list(bound_args)
        # A tuple argument's elements are named "arg[i]".
        specialised = {names[path[0]] + "".join(f"[{i}]" for i in path[1:]): value
                       for path, value in constexprs.items()
                       if not self.params[path[0]].is_constexpr and isinstance(value, int)}
        sink.append({"kernel": self.__name__, "constexpr_ints": specialised,
                     "ttgir": kernel.asm["ttgir"], "ptx": kernel.asm.get("ptx", "")})
        return kernel

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


def compile_attention(launch) -> dict:
    """The sm_90 compile of the attention kernel that ``launch()`` (a case of
    :data:`CASES`) would run: its :func:`compile_instead_of_launch` entry."""
    sink: list[dict] = []
    with compile_instead_of_launch(sink):
        launch()
    return next(e for e in sink if e["kernel"].startswith("_attn"))


def _rand(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def _packed_plan(q_lens: list[int], kv_lens: list[int], block_q: int, causal: bool,
                 positions: torch.Tensor | None = None, kv_row0: list[int] | None = None):
    """The public planner on CPU tensors (its torch path: no kernel runs in this process)."""
    qsl = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return plan_packed(qsl, torch.tensor(kv_lens, dtype=torch.int32), sum(q_lens), block_q, causal,
                       positions, torch.tensor(kv_row0, dtype=torch.int32) if kv_row0 else None)


def _fp8_scales(fp8: str | None, hk: int) -> dict:
    """K/V scales for an fp8 case: "float" (two numbers) or "head" (fp32 [Hk] tensors)."""
    if fp8 is None:
        return {}
    if fp8 == "float":
        return dict(k_scale=0.5, v_scale=0.25)
    return dict(k_scale=torch.full((hk,), 0.5), v_scale=torch.full((hk,), 0.25))


def span_case(rows: int, splits: int, page_size: int, hq: int, hk: int, d: int,
              pages_per_req: int = 1, return_lse: bool = True,
              variants: bool = False, fp8: str | None = None,
              kv_dtype: torch.dtype = torch.float8_e4m3fn,
              fused: bool = False) -> Callable[[], None]:
    """Paged (span) attention: one request, ``rows`` query rows at the prompt's end.

    ``variants``: a sliding window of 1, a KV lower bound (a shard) and a soft cap.
    ``fp8``: a ``kv_dtype`` cache with "float" or per-"head" scales. ``fused``: the
    rows' new K/V written and attended in the same launch (``k_new``/``v_new``).
    """
    def launch() -> None:
        seq_len = pages_per_req * page_size
        cfg = pick_config(d, torch.bfloat16, hq // hk, True, paged=True)
        num_pages = pages_per_req + 1
        k, v = _rand(num_pages, page_size, hk, d), _rand(num_pages, page_size, hk, d)
        if fp8:
            k, v = k.to(kv_dtype), v.to(kv_dtype)
        q = _rand(rows, hq, d)
        positions = torch.arange(seq_len - rows, seq_len, dtype=torch.int32)
        table = torch.arange(pages_per_req, dtype=torch.int32)[None, :]  # width 1: stride 1
        plan = _packed_plan([rows], [seq_len], cfg.block_q, True, positions)
        lse = torch.empty(rows, hq, dtype=torch.float32) if return_lse else None
        extra = dict(kv_start=torch.zeros(1, dtype=torch.int32), window_left=1,
                     logits_soft_cap=30.0) if variants else {}
        launch = launch_config(cfg, torch.bfloat16, d, num_splits=splits,
                               window_left=extra.get("window_left", -1),
                               has_kv_start="kv_start" in extra)
        if fused:
            extra.update(k_new=_rand(rows, hk, d), v_new=_rand(rows, hk, d),
                         slot_mapping=torch.arange(rows, dtype=torch.int64))
        attention_fwd(q, k, v, torch.empty_like(q), lse, plan, launch, d ** -0.5, True,
                      positions=positions, block_table=table, **extra, **_fp8_scales(fp8, hk))
    return launch


def dense_case(b: int, s: int, hq: int, hk: int, d: int, tma: bool, causal: bool,
               zero_fill: bool, splits: int = 1, fp8: str | None = None) -> Callable[[], None]:
    """Dense attention: a padded batch (zero-fill) or packed varlen rows (``fp8``: e5m2
    K/V with "float" or per-"head" scales)."""
    def launch() -> None:
        cfg = pick_config(d, torch.bfloat16, hq // hk, True, paged=False, tma=tma)
        q, k, v = _rand(b * s, hq, d), _rand(b * s, hk, d), _rand(b * s, hk, d)
        if fp8:
            k, v = k.to(torch.float8_e5m2), v.to(torch.float8_e5m2)
        starts = [i * s for i in range(b)]
        plan = _packed_plan([s] * b, [s] * b, cfg.block_q, causal, kv_row0=starts)
        lse = torch.empty(b * s, hq, dtype=torch.float32)
        launch = launch_config(cfg, torch.bfloat16, d, num_splits=splits, use_tma=tma)
        attention_fwd(q, k, v, torch.empty_like(q), lse, plan, launch, d ** -0.5, causal,
                      zero_fill=zero_fill, **_fp8_scales(fp8, hk))
    return launch


def gluon_dense_case(b: int, s: int, hq: int, hk: int, d: int, causal: bool,
                     zero_fill: bool, warp_specialize: bool = False,
                     block_m: int = 64, overlap: bool = False, stack: int = 1,
                     splits: int = 1, pingpong: bool = False,
                     **form: bool) -> Callable[[], None]:
    """The Gluon (Hopper) dense kernel of spanfill.kernels_gluon over a padded batch;
    ``form``: the ping-pong options (``stagger``, ``turns``, ``split_q``,
    ``rescale_early``)."""
    def launch() -> None:
        from spanfill.kernels_gluon.attention import attention_fwd_dense

        q, k, v = _rand(b * s, hq, d), _rand(b * s, hk, d), _rand(b * s, hk, d)
        starts = [i * s for i in range(b)]
        plan = _packed_plan([s - i for i in range(b)], [s - i for i in range(b)],
                            block_m // stack, causal, kv_row0=starts)
        lse = torch.empty(b * s, hq, dtype=torch.float32)
        attention_fwd_dense(q, k, v, torch.empty_like(q), lse, plan, d ** -0.5, causal,
                            zero_fill=zero_fill, warp_specialize=warp_specialize,
                            block_m=block_m, overlap=overlap, stack=stack,
                            num_splits=splits, pingpong=pingpong, **form)
    return launch


def gluon_paged_case(rows: int, page_size: int, pages_per_req: int, hq: int, hk: int, d: int,
                     warp_specialize: bool = False, block_m: int = 64,
                     overlap: bool = False, stack: int = 1,
                     splits: int = 1, pingpong: bool = False,
                     **form: bool) -> Callable[[], None]:
    """The Gluon (Hopper) kernel over a paged cache: one request, ``rows`` span rows at
    the prompt's end, TMA copies per page (or per tile of a larger page); ``form`` as in
    :func:`gluon_dense_case`."""
    def launch() -> None:
        from spanfill.kernels_gluon.attention import attention_fwd_paged

        seq_len = pages_per_req * page_size
        k, v = (_rand(pages_per_req + 1, page_size, hk, d) for _ in range(2))
        q = _rand(rows, hq, d)
        positions = torch.arange(seq_len - rows, seq_len, dtype=torch.int32)
        table = torch.arange(pages_per_req, dtype=torch.int32)[None, :]
        plan = _packed_plan([rows], [seq_len], block_m // stack, True, positions)
        lse = torch.empty(rows, hq, dtype=torch.float32)
        attention_fwd_paged(q, k, v, torch.empty_like(q), lse, plan, positions, table,
                            d ** -0.5, True, block_m=block_m, warp_specialize=warp_specialize,
                            overlap=overlap, stack=stack, num_splits=splits,
                            pingpong=pingpong, **form)
    return launch


def append_case(rows: int, page_size: int, hk: int, d: int, fp8: str | None = None,
                kv_dtype: torch.dtype = torch.float8_e4m3fn) -> Callable[[], None]:
    def launch() -> None:
        k_cache, v_cache = _rand(4, page_size, hk, d), _rand(4, page_size, hk, d)
        if fp8:
            k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
        slots = torch.arange(rows, dtype=torch.int64)
        append_kv_launch(_rand(rows, hk, d), _rand(rows, hk, d), k_cache, v_cache, slots,
                         **_fp8_scales(fp8, hk))
    return launch


def merge_case(rows: int, states: int, heads: int, d: int) -> Callable[[], None]:
    def launch() -> None:
        o = _rand(states, rows, heads, d).transpose(0, 1)
        lse = torch.randn(rows, states, heads)
        merge_states_launch(o, lse, _rand(rows, heads, d), torch.empty(rows, heads))
        merge_two_launch(o[:, 0], lse[:, 0], o[:, -1], lse[:, -1], _rand(rows, heads, d),
                         torch.empty(rows, heads))
    return launch


def plan_case(num_req: int, rows_per_req: int, padded_seq_len: int) -> Callable[[], None]:
    def launch() -> None:
        q_len = torch.full((num_req,), rows_per_req, dtype=torch.int32)
        step = padded_seq_len or rows_per_req
        q_start = torch.arange(num_req, dtype=torch.int32) * step
        tiles = num_req * -(-rows_per_req // 16) + (num_req if padded_seq_len else 0)
        plan_packed_launch(q_start, q_start + q_len, q_len.clone(),
                           None if padded_seq_len else torch.arange(num_req * rows_per_req,
                                                                    dtype=torch.int32),
                           tiles, 16, True, padded_seq_len)
    return launch


# name -> (launch, integer arguments that must come out as compile-time constants)
CASES: dict[str, tuple[Callable[[], None], tuple[str, ...]]] = {
    # split-KV with one row: num_rows == 1 (the crash of issue 14), MQA, table width 1
    "span_split_t1_mqa_d128": (span_case(1, 3, 16, 8, 1, 128, pages_per_req=1),
                               ("num_rows", "stride_bt")),
    "span_split_t1_gqa_d64_page1": (span_case(1, 7, 1, 32, 8, 64, pages_per_req=1),
                                    ("num_rows", "stride_bt")),
    "span_split_t16_d256_page256": (span_case(16, 2, 256, 4, 4, 256, pages_per_req=1), ()),
    "span_split_t1_window1_shard_softcap": (span_case(1, 3, 16, 8, 8, 64, variants=True),
                                            ("num_rows", "window_left")),
    "span_unsplit_t1_d128": (span_case(1, 1, 16, 32, 8, 128, pages_per_req=1),
                             ("stride_bt",)),
    "span_unsplit_t32_page16_nolse": (span_case(32, 1, 16, 8, 2, 128, pages_per_req=1,
                                                return_lse=False), ()),
    "padded_zero_fill_b1_d64": (dense_case(1, 16, 1, 1, 64, tma=False, causal=False,
                                           zero_fill=True), ()),
    "padded_zero_fill_tma_d128": (dense_case(2, 32, 4, 4, 128, tma=True, causal=False,
                                             zero_fill=True), ()),
    "varlen_dense_causal_split_d128": (dense_case(1, 16, 2, 1, 128, tma=False, causal=True,
                                                  zero_fill=False, splits=2), ()),
    # fp8 caches (issue 18): widened after the load, scales as floats or [Hk] pointers
    "span_fp8_e4m3_head_scales_split_t1": (span_case(1, 3, 16, 32, 8, 128, fp8="head"),
                                           ("num_rows", "scale_stride")),
    "span_fp8_e5m2_float_scales_t32": (span_case(32, 1, 16, 8, 2, 128, fp8="float",
                                                 kv_dtype=torch.float8_e5m2), ()),
    "padded_fp8_e5m2_head_scales_d64": (dense_case(2, 32, 4, 2, 64, tma=False, causal=False,
                                                   zero_fill=True, fp8="head"), ()),
    "append_fp8_e4m3_head_scales_t1": (append_case(1, 16, 2, 128, fp8="head"),
                                       ("scale_stride",)),
    "append_fp8_e5m2_float_scales": (append_case(16, 16, 8, 64, fp8="float",
                                                 kv_dtype=torch.float8_e5m2), ()),
    # append inside attention (issue 17): one launch writes and attends
    "span_fused_append_t1_split": (span_case(1, 3, 16, 32, 8, 128, fused=True),
                                   ("num_rows",)),
    "span_fused_append_t32_window_shard_softcap": (span_case(32, 1, 16, 8, 2, 64, variants=True,
                                                             fused=True), ()),
    "span_fused_append_fp8_e4m3_head_scales": (span_case(16, 2, 16, 8, 2, 128, fp8="head",
                                                         fused=True), ("scale_stride",)),
    # the Gluon family (issue 16): dense TMA + wgmma, first kernel
    "gluon_dense_padded_d128": (gluon_dense_case(2, 64, 4, 4, 128, causal=False,
                                                 zero_fill=True), ()),
    "gluon_dense_causal_gqa_d64": (gluon_dense_case(2, 64, 8, 2, 64, causal=True,
                                                    zero_fill=False), ()),
    "gluon_dense_warp_specialized_d128": (gluon_dense_case(2, 64, 4, 4, 128, causal=True,
                                                           zero_fill=True, warp_specialize=True),
                                          ()),
    "gluon_dense_two_warpgroups_d128": (gluon_dense_case(2, 128, 4, 2, 128, causal=True,
                                                         zero_fill=True, block_m=128), ()),
    "gluon_dense_two_warpgroups_producer_d64": (gluon_dense_case(
        2, 128, 4, 4, 64, causal=False, zero_fill=False, warp_specialize=True, block_m=128), ()),
    "gluon_dense_d256": (gluon_dense_case(2, 64, 4, 2, 256, causal=True, zero_fill=True), ()),
    # softmax under the previous tile's PV (FA3's intra-warpgroup overlap)
    "gluon_dense_overlap_d128": (gluon_dense_case(2, 64, 4, 2, 128, causal=True, zero_fill=True,
                                                  overlap=True), ()),
    "gluon_dense_overlap_producer_m128_d64": (gluon_dense_case(
        2, 128, 4, 4, 64, causal=False, zero_fill=False, warp_specialize=True, block_m=128,
        overlap=True), ()),
    "gluon_dense_overlap_d256": (gluon_dense_case(2, 64, 4, 2, 256, causal=True, zero_fill=True,
                                                  overlap=True), ()),
    # paged K/V: a TMA copy per page (page 16: 8 per tile) or per tile of a page of 256
    "gluon_paged_page16_d128": (gluon_paged_case(100, 16, 24, 8, 2, 128), ()),
    "gluon_paged_page256_overlap_producer_d64": (gluon_paged_case(
        64, 256, 2, 4, 4, 64, warp_specialize=True, overlap=True), ()),
    "gluon_paged_page64_m128_overlap_d128": (gluon_paged_case(
        200, 64, 8, 8, 2, 128, block_m=128, overlap=True), ()),
    # GQA head stacking: 4 q heads of a KV head in one block (32 tokens each at 128 rows)
    "gluon_paged_stack4_m128_overlap_producer_d128": (gluon_paged_case(
        100, 16, 24, 8, 2, 128, warp_specialize=True, block_m=128, overlap=True, stack=4), ()),
    "gluon_dense_stack2_padded_d64": (gluon_dense_case(2, 64, 8, 2, 64, causal=False,
                                                       zero_fill=True, stack=2), ()),
    # pages under 8 rows: cp.async gathers (by the warp group, or the producer warp)
    "gluon_paged_page1_gather_d128": (gluon_paged_case(40, 1, 300, 8, 2, 128), ()),
    "gluon_paged_page4_gather_overlap_producer_stack4_d64": (gluon_paged_case(
        40, 4, 80, 8, 2, 64, warp_specialize=True, overlap=True, stack=4), ()),
    # split-KV: partial states into a workspace, then the portable merge launch
    "gluon_dense_split3_varlen_d128": (gluon_dense_case(2, 64, 4, 4, 128, causal=True,
                                                        zero_fill=False, splits=3), ()),
    "gluon_paged_split2_page256_overlap_producer_d128": (gluon_paged_case(
        16, 256, 8, 8, 2, 128, warp_specialize=True, overlap=True, stack=4, splits=2), ()),
    # the forms the registry launches (backends/gluon.py choose_form): D=256 spans (the
    # automatic choice: two consumer partitions in sequence), GQA stacked, split
    "gluon_paged_registry_d256_page16_split4": (gluon_paged_case(
        16, 16, 200, 4, 2, 256, block_m=128, stack=2, splits=4, pingpong=True), ()),
    # the form the registry picks for D=128 spans with GQA 4: 128 rows, producer warp,
    # two consumer partitions each with the overlapped loop (three stages), four q heads
    # stacked
    "gluon_paged_registry_stack4_d128": (gluon_paged_case(
        100, 16, 24, 8, 2, 128, block_m=128, stack=4, overlap=True, pingpong=True), ()),
    "gluon_dense_registry_m128_producer_d128": (gluon_dense_case(
        2, 64, 4, 4, 128, causal=False, zero_fill=True, warp_specialize=True, block_m=128), ()),
    # two consumer partitions, each with the overlapped loop (three stages at D=128)
    "gluon_dense_pingpong_padded_d128": (gluon_dense_case(
        2, 64, 4, 4, 128, causal=False, zero_fill=True, block_m=128, overlap=True,
        pingpong=True), ()),
    "gluon_paged_pingpong_stack4_split2_d128": (gluon_paged_case(
        16, 16, 200, 8, 2, 128, block_m=128, stack=4, splits=2, overlap=True,
        pingpong=True), ()),
    "gluon_paged_pingpong_page4_gather_d64": (gluon_paged_case(
        40, 4, 80, 8, 2, 64, block_m=128, overlap=True, pingpong=True), ()),
    # two consumer partitions, each with the in-sequence loop
    "gluon_paged_split_consumers_stack4_d128": (gluon_paged_case(
        100, 16, 24, 8, 2, 128, block_m=128, stack=4, pingpong=True), ()),
    "gluon_paged_split_consumers_d256_page16_split4": (gluon_paged_case(
        16, 16, 200, 4, 2, 256, block_m=128, stack=2, splits=4, pingpong=True), ()),
    "gluon_dense_split_consumers_padded_d64": (gluon_dense_case(
        2, 64, 4, 4, 64, causal=True, zero_fill=True, block_m=128, pingpong=True), ()),
    # the second consumer group starting each item after the first one's first softmax
    "gluon_dense_pingpong_stagger_padded_d128": (gluon_dense_case(
        2, 64, 4, 4, 128, causal=False, zero_fill=True, block_m=128, overlap=True,
        pingpong=True, stagger=True), ()),
    "gluon_paged_split_consumers_stagger_stack4_split2_d128": (gluon_paged_case(
        16, 16, 200, 8, 2, 128, block_m=128, stack=4, splits=2, pingpong=True,
        stagger=True), ()),
    # the two consumer groups taking turns issuing each step's wgmmas (FA3/FA4)
    "gluon_paged_pingpong_turns_stack4_d128": (gluon_paged_case(
        100, 16, 24, 8, 2, 128, block_m=128, stack=4, overlap=True, pingpong=True,
        turns=True), ()),
    # the same turns through hardware named barriers (bar.sync / bar.arrive, FA3/FA4's)
    "gluon_dense_pingpong_stagger_named_turns_padded_d128": (gluon_dense_case(
        2, 64, 4, 4, 128, causal=False, zero_fill=True, block_m=128, overlap=True,
        pingpong=True, stagger=True, turns="named"), ()),
    "gluon_dense_three_groups_stagger_named_turns_padded_d64": (gluon_dense_case(
        2, 64, 4, 4, 64, causal=False, zero_fill=True, block_m=192, overlap=True,
        pingpong=True, stagger=True, turns="named"), ()),
    # each consumer group's half of Q copied and released on its own (boxes of 64 rows
    # from a one-head block, two boxes of 32 per half with four heads stacked, one head
    # per half with two), and the output rescaled under the QK^T wgmma (FA3's order)
    "gluon_dense_pingpong_stagger_splitq_padded_d128": (gluon_dense_case(
        2, 64, 4, 4, 128, causal=False, zero_fill=True, block_m=128, overlap=True,
        pingpong=True, stagger=True, split_q=True), ()),
    "gluon_paged_pingpong_splitq_early_stack4_d128": (gluon_paged_case(
        100, 16, 24, 8, 2, 128, block_m=128, stack=4, overlap=True, pingpong=True,
        stagger=True, split_q=True, rescale_early=True), ()),
    "gluon_paged_split_consumers_splitq_stack2_d256": (gluon_paged_case(
        16, 16, 200, 4, 2, 256, block_m=128, stack=2, splits=4, pingpong=True,
        split_q=True), ()),
    # the scratch store that keeps ptxas from scheduling the softmax after the PV wait
    "gluon_dense_pingpong_stagger_pin_padded_d128": (gluon_dense_case(
        2, 64, 4, 4, 128, causal=False, zero_fill=True, block_m=128, overlap=True,
        pingpong=True, stagger=True, pin_softmax=True), ()),
    "gluon_paged_pingpong_pin_splitq_stack4_d128": (gluon_paged_case(
        100, 16, 24, 8, 2, 128, block_m=128, stack=4, overlap=True, pingpong=True,
        stagger=True, split_q=True, pin_softmax=True), ()),
    # three consumer groups in 192-row blocks at D=64 (FA4's tile there): the whole block
    # in one Q box, or each group's rows on their own with the stagger chained
    "gluon_dense_three_groups_padded_d64": (gluon_dense_case(
        2, 64, 4, 4, 64, causal=False, zero_fill=True, block_m=192, overlap=True,
        pingpong=True), ()),
    "gluon_dense_three_groups_stagger_splitq_causal_d64": (gluon_dense_case(
        2, 64, 4, 4, 64, causal=True, zero_fill=True, block_m=192, overlap=True,
        pingpong=True, stagger=True, split_q=True, pin_softmax=True), ()),
    # the consumers' TMA-store epilogue (branch wip/tma-store-epilogue)
    "gluon_dense_pingpong_stagger_tmastore_padded_d128": (gluon_dense_case(
        2, 200, 4, 4, 128, causal=False, zero_fill=True, block_m=128, overlap=True,
        pingpong=True, stagger=True, tma_store=True), ()),
    "gluon_paged_pingpong_stagger_tmastore_stack2_d128": (gluon_paged_case(
        100, 16, 24, 8, 2, 128, block_m=128, stack=2, overlap=True, pingpong=True,
        stagger=True, tma_store=True), ()),
    # four heads of 32 rows stacked: two boxes per consumer group
    "gluon_paged_pingpong_stagger_tmastore_stack4_d128": (gluon_paged_case(
        100, 16, 24, 8, 2, 128, block_m=128, stack=4, overlap=True, pingpong=True,
        stagger=True, tma_store=True), ()),
    # Q released after each group's last QK^T (the next item's Q copied under the last PV)
    "gluon_dense_pingpong_stagger_early_q_padded_d128": (gluon_dense_case(
        2, 200, 4, 4, 128, causal=False, zero_fill=True, block_m=128, overlap=True,
        pingpong=True, stagger=True, early_q_release=True), ()),
    # both: the rows staged in the last K tile, that stage released after the store
    "gluon_dense_pingpong_stagger_tmastore_early_q_padded_d128": (gluon_dense_case(
        2, 200, 4, 4, 128, causal=False, zero_fill=True, block_m=128, overlap=True,
        pingpong=True, stagger=True, tma_store=True, early_q_release=True), ()),
    "gluon_paged_pingpong_stagger_tmastore_early_q_stack4_d128": (gluon_paged_case(
        100, 16, 24, 8, 2, 128, block_m=128, stack=4, overlap=True, pingpong=True,
        stagger=True, tma_store=True, early_q_release=True), ()),
    # the registry's D=128 forms with the softmax pinned ahead of the PV wait
    "gluon_dense_pingpong_stagger_tmastore_early_q_pin_padded_d128": (gluon_dense_case(
        2, 200, 4, 4, 128, causal=False, zero_fill=True, block_m=128, overlap=True,
        pingpong=True, stagger=True, tma_store=True, early_q_release=True,
        pin_softmax=True), ()),
    "gluon_paged_pingpong_stagger_tmastore_pin_stack4_d128": (gluon_paged_case(
        100, 16, 24, 8, 2, 128, block_m=128, stack=4, overlap=True, pingpong=True,
        stagger=True, tma_store=True, pin_softmax=True), ()),
    # the same with the row max only ahead of the PV wait (pin_softmax="max")
    "gluon_paged_pingpong_stagger_tmastore_pinmax_stack4_d128": (gluon_paged_case(
        100, 16, 24, 8, 2, 128, block_m=128, stack=4, overlap=True, pingpong=True,
        stagger=True, tma_store=True, pin_softmax="max"), ()),
    "gluon_dense_three_groups_named_turns_early_q_pinmax_padded_d64": (gluon_dense_case(
        2, 64, 4, 4, 64, causal=False, zero_fill=True, block_m=192, overlap=True,
        pingpong=True, stagger=True, turns="named", early_q_release=True,
        pin_softmax="max"), ()),
    # the same three registry forms with the maxima read back after PV's stage is released
    "gluon_paged_pingpong_stagger_tmastore_pinmax_reload_stack4_d128": (gluon_paged_case(
        100, 16, 24, 8, 2, 128, block_m=128, stack=4, overlap=True, pingpong=True,
        stagger=True, tma_store=True, pin_softmax="max_reload"), ()),
    "gluon_dense_pingpong_stagger_k_staged_pinmax_reload_padded_d128": (gluon_dense_case(
        2, 200, 4, 4, 128, causal=False, zero_fill=True, block_m=128, overlap=True,
        pingpong=True, stagger=True, tma_store=True, early_q_release=True,
        pin_softmax="max_reload"), ()),
    "gluon_dense_three_groups_named_turns_early_q_pinmax_reload_padded_d64": (
        gluon_dense_case(2, 64, 4, 4, 64, causal=False, zero_fill=True, block_m=192,
                         overlap=True, pingpong=True, stagger=True, turns="named",
                         early_q_release=True, pin_softmax="max_reload"), ()),
    # the padding zero-filled by its own partition (fill_warps): the registry's padded
    # D=128 and three-group D=64 forms, and one warp beside the in-sequence loop at D=256
    "gluon_dense_pingpong_k_staged_pinmax_fill2_padded_d128": (gluon_dense_case(
        2, 200, 4, 4, 128, causal=False, zero_fill=True, block_m=128, overlap=True,
        pingpong=True, stagger=True, tma_store=True, early_q_release=True,
        pin_softmax="max", fill_warps=2), ()),
    "gluon_dense_three_groups_named_turns_early_q_fill2_padded_d64": (gluon_dense_case(
        2, 64, 4, 4, 64, causal=False, zero_fill=True, block_m=192, overlap=True,
        pingpong=True, stagger=True, turns="named", early_q_release=True,
        fill_warps=2), ()),
    "gluon_dense_split_consumers_fill1_stack2_causal_d256": (gluon_dense_case(
        2, 100, 4, 2, 256, causal=True, zero_fill=True, block_m=128, stack=2,
        pingpong=True, fill_warps=1), ()),
    "gluon_dense_three_groups_early_q_padded_d64": (gluon_dense_case(
        2, 64, 4, 4, 64, causal=False, zero_fill=True, block_m=192, overlap=True,
        pingpong=True, stagger=True, turns="named", early_q_release=True), ()),
    "gluon_dense_pingpong_early_padded_d64": (gluon_dense_case(
        2, 64, 4, 4, 64, causal=True, zero_fill=True, block_m=128, overlap=True,
        pingpong=True, stagger=True, rescale_early=True), ()),
    "append_t1_page1_hk1": (append_case(1, 1, 1, 128), ("page_size", "num_heads")),
    "append_t16_page16": (append_case(16, 16, 8, 64), ()),
    "merge_one_state_one_head": (merge_case(1, 1, 1, 64), ("num_states", "num_heads")),
    "merge_16_rows": (merge_case(16, 2, 16, 128), ()),
    "plan_one_request": (plan_case(1, 1, 0), ("num_req", "num_tiles")),
    "plan_padded_16": (plan_case(16, 16, 32), ()),
}


def run_case(name: str, dump: Path | None = None) -> dict:
    """Compile one case; returns what compiled and whether the expected constants appeared.

    ``dump``: a folder to write each launch's TTGIR and PTX into (see the module
    docstring).
    """
    launch, expect_const = CASES[name]
    sink: list[dict] = []
    start = time.perf_counter()
    try:
        with compile_instead_of_launch(sink):
            launch()
    except Exception as exc:  # noqa: BLE001 - reported per case, the run goes on
        return {"case": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(limit=4)[-2000:]}
    if dump is not None:
        for n, entry in enumerate(sink):
            (dump / f"{name}.{n}.{entry['kernel']}.ttgir").write_text(
                canonical_ttgir(entry["ttgir"]))
            (dump / f"{name}.{n}.{entry['kernel']}.ptx").write_text(
                canonical_ptx(entry["ptx"]))
    consts = {k: v for entry in sink for k, v in entry["constexpr_ints"].items()}
    missing = [arg for arg in expect_const if consts.get(arg) != 1]
    return {
        "case": name, "ok": bool(sink) and not missing, "kernels": [e["kernel"] for e in sink],
        "constexpr_ints": consts, "missing_constexpr": missing,
        "wgmma": any("ttng.warp_group_dot" in e["ttgir"] for e in sink),
        "tma": any("ttng.async_tma_copy_global_to_local" in e["ttgir"] for e in sink),
        "seconds": round(time.perf_counter() - start, 1),
    }


def canonical_ptx(ptx: str) -> str:
    """PTX without its debug information: the instructions the GPU runs.

    TTGIR keeps each jit helper as a function until LLVM inlines it, so moving code into
    or out of a helper changes the TTGIR and not the program; the PTX, after inlining,
    shows whether the program changed. Dropped: the debug sections (they hold source
    paths and line tables), ``.loc``/``.file`` lines, the ``$L__tmp`` labels that only
    mark source lines, comments and blank lines.
    """
    cut = re.search(r"^\s*\.section\s+\.debug", ptx, flags=re.M)
    if cut:
        ptx = ptx[:cut.start()]
    lines = []
    for line in ptx.splitlines():
        line = line.split("//", 1)[0].strip()
        if not line or line.startswith((".loc", ".file")) or re.fullmatch(r"\$L__tmp\d+:", line):
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def canonical_ttgir(ttgir: str) -> str:
    """TTGIR with source locations removed, constants inlined and SSA values renumbered.

    Triton names values after the Python variables and arguments they come from, and
    materialises constants in the order the source first uses them, so a rename or an
    unpacked tuple changes the text but not the program; this form changes only when
    the program does. Functions are renamed in order of appearance too: a jit
    function's symbol spells out its constexpr arguments, so a new constexpr parameter
    renames every specialisation without changing one instruction.
    """
    text = re.sub(r' loc\((?:[^()]|\([^()]*\))*\)', "", ttgir)
    names: dict[str, str] = {}
    lines = []
    for line in text.splitlines():
        if line.startswith("#loc"):
            continue
        const = re.match(r"\s*(%[\w.]+) = arith\.constant (.+)$", line)
        if const:  # referred to by value below, wherever it was defined
            names[const.group(1)] = f"%const<{const.group(2)}>"
            continue
        lines.append(line)

    renamed = iter(range(1 << 30))

    def rename(m: re.Match) -> str:
        if m.group(0) not in names:
            names[m.group(0)] = f"%v{next(renamed)}"
        return names[m.group(0)]

    functions: dict[str, str] = {}

    def rename_function(m: re.Match) -> str:
        return functions.setdefault(m.group(0), f"@f{len(functions)}")

    # (%const<...> is this form's own constant: left alone, so the form is idempotent.)
    lines = [re.sub(r"%(?!const<)[A-Za-z_][\w.]*|%\d+(?:_\d+)?", rename, line)
             for line in lines]
    return "\n".join(re.sub(r'@"[^"]*"|@(?!f\d+\b)[A-Za-z_][\w.$]*', rename_function, line)
                     for line in lines) + "\n"


def main(argv: list[str]) -> int:
    argv = list(argv)
    dump = None
    if "--dump-ttgir" in argv:
        i = argv.index("--dump-ttgir")
        dump = Path(argv[i + 1])
        del argv[i:i + 2]
        dump.mkdir(parents=True, exist_ok=True)
    shard = None
    if "--shard" in argv:  # I/N: every N-th case from the I-th (parallel processes)
        i = argv.index("--shard")
        shard = tuple(int(x) for x in argv[i + 1].split("/"))
        del argv[i:i + 2]
    as_json = "--json" in argv
    names = [a for a in argv if not a.startswith("--")] or list(CASES)
    if shard is not None:
        names = names[shard[0]::shard[1]]
    results = [run_case(n, dump) for n in names]
    if as_json:
        print(json.dumps(results))
    else:
        for r in results:
            detail = r.get("error") or f"consts {r['constexpr_ints']} wgmma={r['wgmma']} " \
                                       f"tma={r['tma']} {r['seconds']} s"
            print(f"{r['case']:34s} {'ok  ' if r['ok'] else 'FAIL'} {detail}")
            if not r["ok"] and "trace" in r:
                print(r["trace"])
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
