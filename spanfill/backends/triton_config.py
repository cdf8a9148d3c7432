"""Every launch decision of the portable Triton kernels, in one module.

Tiles (a fixed table), split-KV, tensor descriptors for dense K/V, the pipelining
of the masked boundary loops and the interpreter's exact dots are decided here and
only here, from host-known metadata, and handed to the kernel as one
:class:`~spanfill.backends.LaunchConfig` (:func:`launch_config`).

The table is keyed on what changes the best tile shape (head dim, dtype, GQA
group, device) and was tuned on an H100 with ``scripts/tune.py`` (2026-11-23:
128x128/8 warps/3 stages was best for D=128 on every segmented workload, 6-15%
ahead of 128x64; Triton's warp specialization gained nothing and failed to
compile for some shapes; two fp16 exponentials per special-function instruction
(``ex2.approx.f16x2``) ran 2-10% slower, so the exponential is not the bottleneck;
with the block-table read-ahead, 128x128/3 stages still led 128x64/4 stages by
13-16%, and 64-row tiles with two programs per SM lost 5-15%). Serving never
autotunes on the hot path.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from .problem import LaunchConfig


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes of one attention launch.

    Attributes
    ----------
    block_m : rows of the query block: ``block_q`` tokens times ``heads`` q heads
    block_n : KV positions per inner-loop step
    heads : the q heads of one GQA group stacked into the query block (the kernel's
        ``STACKED_HEADS``; a GQA group of ``Hq // Hk`` heads is covered by
        ``group // heads`` programs)
    num_warps, num_stages : Triton launch settings
    """

    block_m: int
    block_n: int
    heads: int
    num_warps: int
    num_stages: int

    @property
    def block_q(self) -> int:
        return self.block_m // self.heads


def _stacked_heads(group: int, block_m: int, min_tokens: int) -> int:
    """Largest divisor of the GQA group that leaves at least ``min_tokens`` per tile."""
    best = 1
    for h in range(1, group + 1):
        if group % h == 0 and block_m // h >= min_tokens:
            best = h
    return best


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    # Cached: this sits on every launch's host path, where each microsecond shows.
    return torch.cuda.get_device_capability(index)[0]


def has_tma(device: torch.device) -> bool:
    """Whether a device is a GPU with Hopper's tensor-memory copy engine."""
    if device.type != "cuda":
        return False
    return _capability_major(device.index if device.index is not None
                             else torch.cuda.current_device()) >= 9


def pick_config(
    head_dim: int, dtype: torch.dtype, group: int, on_gpu: bool, paged: bool = True,
    tma: bool = False,
) -> AttentionConfig:
    """Tile sizes for a launch.

    Parameters
    ----------
    head_dim : D
    dtype : q dtype
    group : ``Hq // Hk``
    on_gpu : False under the Triton interpreter, where small blocks run faster
    paged : KV in pages (span prefill) rather than dense rows (padded, varlen)
    tma : dense KV goes through tensor descriptors (see :func:`dense_kv_uses_tma`)
    """
    if not on_gpu:
        block_m, block_n, warps, stages = 32, 16, 4, 1
    elif dtype == torch.float32:
        block_m, block_n, warps, stages = (64, 32, 4, 2) if head_dim <= 128 else (32, 32, 4, 1)
    elif head_dim <= 64:
        # Dense (padded encoder) rows: 64-row tiles keep more programs per short
        # sample (bert_base_512: 0.103 ms vs 0.101 ms for 128x32 with plain loads,
        # 0.097 ms vs 0.105 ms through descriptors, on the H100).
        block_m, block_n, warps, stages = (128, 32, 4, 3) if paged else (64, 32, 4, 3)
    elif head_dim <= 128:
        # Paged KV reads the block table once per step, so the longer step wins.
        # Dense KV: the longer step wins only through tensor descriptors (Hopper,
        # power-of-two D; enc_2k_d128 0.475 ms vs 0.492 ms for 128x64), with plain
        # pointer loads 128x64 does (0.526 ms vs 0.560 ms).
        block_m, block_n, warps, stages = 128, 128 if paged or tma else 64, 8, 3
    else:
        block_m, block_n, warps, stages = 64, 64, 4, 2
    heads = _stacked_heads(group, block_m, min_tokens=16 if on_gpu else 8)
    return AttentionConfig(block_m, block_n, heads, warps, stages)


# Split-KV: a split gets at least this many BLOCK_N steps (below that, the
# prologue, epilogue and the merge cost more than the split saves), and at most
# this many splits per tile (the fp32 partial states grow with it).
SPLIT_MIN_STEPS = 4
MAX_SPLITS = 32


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pick_num_splits(num_programs: int, max_kv_len: int, cfg: AttentionConfig,
                    device: torch.device) -> int:
    """How many programs share each tile's KV range (1: no split-KV).

    A launch of few tiles over long KV (a handful of span tokens in a long prompt)
    leaves most SMs idle while each program walks its whole KV range alone.
    Splitting each range into equal runs fills one wave instead, and one merge
    launch combines the partial states. Decided from host-known sizes only (the
    plan's tile count and the block table's width), so no sync and a CUDA graph
    captures the same choice every replay.

    Parameters
    ----------
    num_programs : tiles x head groups of the unsplit launch (an upper bound)
    max_kv_len : upper bound of any request's KV length (block table width x page size)
    cfg : the launch's tile sizes
    device : where it runs; the CPU interpreter never splits unless asked

    ``SPANFILL_SPLITS=<n>`` forces ``n`` splits (tests and A/B runs).
    """
    forced = os.environ.get("SPANFILL_SPLITS")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"SPANFILL_SPLITS must be a positive integer, got {forced!r}")
        return int(forced)
    if device.type != "cuda" or num_programs <= 0:
        return 1
    # Programs resident per SM: one 8-warp D=128 program (240 registers a thread),
    # about two of the 4-warp configs.
    per_sm = 1 if cfg.num_warps >= 8 else 2
    slots = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        * per_sm
    steps = -(-max_kv_len // cfg.block_n)
    # floor, not ceil: the split launch stays within one wave.
    splits = min(slots // num_programs, steps // SPLIT_MIN_STEPS, MAX_SPLITS)
    return max(1, splits)


def interpreting() -> bool:
    """Whether Triton's interpreter was asked for (the kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Below this many multiply-adds (rows x mean KV length x Hq x D, an upper bound
# known without a sync) a launch takes dense KV through plain loads: the two
# descriptors cost ~20-40 us of host time per launch on the H100 machines, more
# than the ~6-8% of kernel time they save on launches that small (bert_base_512:
# 1.3e10, host-bound with descriptors; enc_2k_d128: 1.4e11, 8% faster with them).
TMA_MIN_WORK = 1 << 36


def dense_kv_uses_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      num_requests: int) -> bool:
    """Whether a launch over dense K/V should load them through tensor descriptors.

    The KV step length depends on it too (:func:`pick_config`'s ``tma``). Paged KV
    never does: a tile gathers rows of different pages, which one descriptor load
    cannot do.

    Needs: a Hopper-or-newer GPU, fp16/bf16, a power-of-two head dim (a descriptor
    tile of ``D`` columns must not reach into the next head), 16-byte aligned rows,
    a launch big enough to pay for the descriptors' host time, and no opt-out
    (``SPANFILL_TMA=0``; ``force`` skips the device and size checks).

    Parameters
    ----------
    q : [T, Hq, D] packed query rows
    k, v : [N, Hk, D] dense KV rows
    num_requests : B (a host int: the plan's request count)
    """
    mode = os.environ.get("SPANFILL_TMA", "1")
    head_dim = q.shape[-1]
    if mode == "0" or q.dtype == torch.float32 or k.dtype != q.dtype:  # fp32, or fp8 K/V
        return False
    work = q.shape[0] * (k.shape[0] // max(num_requests, 1)) * q.shape[1] * head_dim
    if mode != "force" and work < TMA_MIN_WORK:
        return False
    # "force" lets the interpreter tests run the descriptor path on the CPU.
    if mode != "force" and not has_tma(q.device):
        return False
    if head_dim & (head_dim - 1):  # not a power of two
        return False
    for t in (k, v):
        if t.stride(-1) != 1 or t.stride(-2) != head_dim or (t.stride(0) * t.element_size()) % 16 \
                or t.data_ptr() % 16:
            return False
    return True


def ieee_dot(dtype: torch.dtype) -> bool:
    """Whether the kernel's dots run on fp32 operands in IEEE precision.

    fp32 inputs always do (no TF32 rounding). bf16 does under Triton's interpreter:
    its bf16 ``tl.dot`` returns garbage (relative error ~1e9 seen on Triton 3.9), so
    there the bf16 tiles are widened to fp32 and only the softmax weights are rounded
    to bf16 first, as on the GPU. Compiled kernels keep bf16 tensor-core dots.
    """
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and interpreting()


def boundary_stages(tile: AttentionConfig, head_dim: int, window_left: int,
                    has_kv_start: bool) -> int:
    """Software-pipelining stages of the masked boundary loops (the main loop's: ``tile``).

    The masked boundary loops hold a tile or two each. Software-pipelined like the
    main loop, a third loop (window or shard lower bound) pushed the kernel to 255
    registers and cost the main loop: H100, few_big with window_left=4095 683 us
    pipelined vs 556 us not; D=256 2164 vs 2014 us. Without a lower bound the
    pipelined diagonal loop is 1-4% faster (bench/results/logs/kernel_ab_*).
    """
    if window_left >= 0 or has_kv_start or head_dim > 128:
        return 1
    return tile.num_stages


def launch_config(tile: AttentionConfig, dtype: torch.dtype, head_dim: int, *,
                  num_splits: int = 1, use_tma: bool = False, window_left: int = -1,
                  has_kv_start: bool = False) -> LaunchConfig:
    """A whole :class:`LaunchConfig` from the tiles and the call's variants.

    :meth:`PortableTritonBackend.select_config` builds its answer here; tests and
    scripts that pick tiles or splits by hand do too, so the rest (boundary stages,
    exact dots) is decided the same way for them.

    Parameters
    ----------
    tile : tile sizes
    dtype : q's dtype
    head_dim : D
    num_splits : programs sharing each tile's KV range (1: no split-KV)
    use_tma : dense K/V through tensor descriptors (never with paged KV)
    window_left : the call's sliding window (-1: none)
    has_kv_start : the call has a per-request KV lower bound (a shard)
    """
    return LaunchConfig(tile, num_splits=num_splits, use_tma=use_tma,
                        boundary_stages=boundary_stages(tile, head_dim, window_left, has_kv_start),
                        ieee_dot=ieee_dot(dtype))
