"""The Hopper (Gluon) backend: :mod:`spanfill.kernels_gluon`.

It takes fp16/bf16 calls with D 64, 128 or 256, causal or not, without sliding windows,
soft caps, KV shards, fp8 caches or append-inside-attention: dense K/V
(``padded_prefill``, ``varlen_prefill``) and span prefill over caches of whole NHD
pages of up to 256 rows (a power of two; TMA per page from 8 rows, cp.async gathers
below). Every form of the kernel passes ``tests/test_gluon_gpu.py`` on the H200.

It comes first in the registry's order, but the automatic choice takes it only where
it measured faster than the portable kernel (:meth:`GluonHopperBackend.auto_selects`):
span prefill at D=128 and 256, and bidirectional padded batches at D=128 and, from
S=4096, at D=64. For the other padded and varlen prefill, and spans at D=64 (not
measured), the portable kernel runs unless ``backend="gluon"`` (or
``SPANFILL_BACKEND=gluon``) asks for this one (``scripts/ab_gluon.py``,
``docs/performance.md``).

Which form of the kernel runs is decided here alone (:func:`choose_form`, and the split
count of :meth:`GluonHopperBackend.select_config`), from ``scripts/ab_gluon.py`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import triton_config
from .problem import AttentionProblem, LaunchConfig
from .triton_config import AttentionConfig

__all__ = ["GluonHopperBackend", "GluonTile", "THREE_GROUPS", "VALIDATED", "choose_form"]


@dataclass(frozen=True)
class GluonTile(AttentionConfig):
    """A Gluon launch form: the tiles (``heads`` q heads of one KV head stacked in the
    block), and the KV loop: ``overlap`` runs each tile's softmax under the previous
    tile's PV; ``producer`` has a producer warp issue the K/V copies; ``pingpong``
    (128 rows) makes the two warp groups separate consumer partitions (the form
    :func:`choose_form` picks at D 128 and 256), each with the loop ``overlap`` says;
    ``persistent`` (with ``pingpong``) launches one program per SM, each walking its
    share of the work items; ``stagger`` (with ``pingpong``) starts the second consumer
    group on each work item once the first has run its first tile's softmax;
    ``tma_store`` (128-row ``pingpong``, at least 32 rows a head, no KV splits) has each
    consumer group stage its rows in its share of the Q block and store them with TMA
    copies; ``turns="named"`` (``pingpong`` with ``overlap``) has the consumer groups take
    turns issuing each step's wgmmas, passed through hardware named barriers;
    ``early_q_release`` (``pingpong`` with ``overlap``, no ``tma_store``) has each
    consumer group release its Q rows after its last QK^T of a work item, so that the next
    item's Q is copied under the last PV and the stores; ``pin_softmax="max"``
    (``pingpong`` with ``overlap``) has each step's row max computed before the PV wait,
    under the PV wgmma (``"max_reload"``: and the exponentials after the release of PV's
    ring stage). ``fill_warps`` (``pingpong``, padded batches) gives the padding's zeros
    to a partition of that many warps of its own, which runs through the program's items
    without waiting, instead of the first consumer group at the end of the launch. A
    192-row ``pingpong`` form (D=64, dense K/V) has three consumer groups."""

    overlap: bool = False
    producer: bool = False
    pingpong: bool = False
    persistent: bool = False
    stagger: bool = False
    tma_store: bool = False
    turns: bool | str = False
    early_q_release: bool = False
    pin_softmax: bool | str = False
    fill_warps: int = 0

    def describe_form(self) -> str:
        """The loop form, for ``spanfill info``."""
        return (f" producer_warp={'yes' if self.producer else 'no'}"
                f" softmax={'under_pv' if self.overlap else 'in_sequence'}"
                + (f" consumer_partitions={self.block_m // 64}" if self.pingpong else "")
                + (" persistent=yes" if self.persistent else "")
                + (" staggered=yes" if self.stagger else "")
                + (" tma_store=yes" if self.tma_store else "")
                + (f" turns={_mode(self.turns)}" if self.turns else "")
                + (" early_q_release=yes" if self.early_q_release else "")
                + (f" pin_softmax={_mode(self.pin_softmax)}" if self.pin_softmax else "")
                + (f" padding_warps={self.fill_warps}" if self.fill_warps else ""))


def _mode(option: bool | str) -> str:
    """A set option of several modes (``turns``, ``pin_softmax``) as ``spanfill info``
    writes it: its mode (``named``, ``max``), or ``yes`` for True."""
    return option if isinstance(option, str) else "yes"


# Padded batches at D=64 take the Gluon kernel from this padded length S on (below it the
# portable kernel is as fast or faster: GluonHopperBackend.auto_selects).
GLUON_PADDED_D64_MIN_SEQ_LEN = 4096

# The first form the H200 ran correctly (the whole GPU suite at b68ef4e): 64-row programs
# of one q head, 128 KV positions per step, a two-stage ring, the two wgmmas in sequence.
# Every other form has passed the GPU tests since (2a43871); this one is the baseline
# ``scripts/ab_gluon.py`` and the tests compare against.
VALIDATED = GluonTile(block_m=64, block_n=128, heads=1, num_warps=4, num_stages=2)

# Bidirectional padded batches at D=64 take THREE_GROUPS from this padded length S on
# (choose_form); at S=4096 it was within 1-2% of VALIDATED either way.
GLUON_PADDED_D64_THREE_GROUPS_MIN_SEQ_LEN = 8192

# Three consumer groups of 64 rows (192-row blocks of one q head) behind the producer
# warp, each with the softmax under the previous PV, persistent and staggered, passing
# turns at the tensor cores through named barriers, each releasing its Q rows after its
# last QK^T of an item (choose_form). Its padding stays with the first consumer group: a
# padding partition made docs_8k_d64 slower (ab_gluon_fill_h200_8c6f42a_padded.csv).
THREE_GROUPS = GluonTile(block_m=192, block_n=128, heads=1, num_warps=12, num_stages=3,
                         overlap=True, producer=True, pingpong=True, persistent=True,
                         stagger=True, turns="named", early_q_release=True)

# The query rows a program covers for each q head it stacks: below 32 the stacked
# forms were not measured.
_MIN_ROWS_PER_HEAD = 32


def _bidirectional_padded(problem: AttentionProblem, head_dim: int) -> bool:
    """Whether ``problem`` is a bidirectional padded batch over dense K/V at ``head_dim``:
    the batches ``scripts/ab_gluon.py --padded-sweep`` measured."""
    return (problem.op == "padded" and problem.head_dim == head_dim and not problem.causal
            and not problem.paged)


def choose_form(problem: AttentionProblem) -> GluonTile:
    """The launch form for ``problem``.

    ``scripts/ab_gluon.py`` on the H200 at 2a43871 (``bench/results/ab_gluon_h200_2a43871.csv``,
    bf16): at D 128 and 256, 128-row programs (two consumer warp groups) fed by a producer
    warp were the fastest form on few_big (D=128, GQA 4), few_big_d256 (D=256, GQA 2) and
    enc_2k_d128 (dense, MHA): 0.653, 0.563 and 0.614 ms against 1.136, 0.826 and 0.712 ms
    for :data:`VALIDATED`. The softmax under the previous PV (``overlap``) helped the
    slower forms at D=128 (3-11% on few_big) but made the fastest one slower everywhere
    (few_big 0.653 -> 0.750 ms, few_big_d256 0.563 -> 0.670, enc_2k_d128 0.614 -> 0.635)
    and every D=256 form slower. Stacking the GQA group's heads gained up to 2%. D=256
    takes 64 KV positions per step, so that the fp32 accumulator and a two-stage ring fit.
    With the unmasked interior tiles (e8df284, ``ab_gluon_h200_e8df284.csv`` and
    ``ab_gluon_h200_e3fff25.csv``) the same form stays the fastest on every span
    workload measured: few_big 0.521 ms, few_big_d256 0.512, many_small 0.282 (stacked),
    long_32k 1.045, whole_8k 1.089.

    The two warp groups as separate consumer partitions, each in sequence (``pingpong``
    without ``overlap``), beat that form (``ab_gluon_pingpong_h200_d7ebbc6.csv``, same
    stacking): few_big 0.491 against 0.533 ms, few_big_d256 0.483 against 0.523,
    whole_8k 1.014 against 1.099. In the 8-warp form the two groups meet at two
    256-thread barriers every KV step; as partitions they share none, and each releases a
    ring stage itself. The groups taking turns at the tensor cores (FA3's ping-pong,
    ``overlap`` too) was slower than both (0.611, 0.675, 1.217 ms).

    At D=128 each partition runs the overlapped loop over three stages
    (``ab_gluon_overlap_noturns_h200_ae88b2c.csv``, against the in-sequence partitions in
    the same run): few_big 0.471 against 0.502 ms, whole_8k 0.974 against 1.049,
    enc_2k_d128 0.480 against 0.500. The overlapped loop holds two stages at once, so
    with two it had been slower in every form; D=256 has no room for a third.

    At D=128 the launch is persistent (``ab_gluon_persistent_h200_e3725bf.csv``, one
    program per work item against one per SM in the same run): few_big 0.465 -> 0.456 ms,
    whole_8k 0.982 -> 0.963, enc_2k_d128 0.493 -> 0.479, long_32k 0.959 -> 0.965 (within
    the run-to-run noise). At D=256 (the in-sequence partitions) it changed nothing
    measurable (few_big_d256 0.493 both ways, 0.490 stacked), so D=256 keeps one program
    per item. At D=64 the persistent overlapped partitions ran docs_8k_d64 in 0.760 ms
    against 0.784 for :data:`VALIDATED`; one run, and the short padded batches
    (bert_base_512) not measured in that form, so D=64 keeps :data:`VALIDATED`.

    At D=128 the second consumer group starts each item once the first has run its first
    tile's softmax (``stagger``; ``ab_gluon_stagger_h200_9f75240.csv``, against the same
    persistent form without it in one run): few_big 0.457 -> 0.449 ms, whole_8k 0.950 ->
    0.926, enc_2k_d128 0.478 -> 0.458. Both groups otherwise start every item on the same
    Q and first K tile, so their unoverlapped phases (an item's first QK^T and softmax,
    its last PV) coincide. Turns at the tensor cores (``turns``, FA3's order) gained less
    (0.466, 0.961, 0.458). At D=64 the staggered form tied :data:`VALIDATED` on
    docs_8k_d64 (0.768 ms both).

    At D=64 the 128-row form was slower on the padded batches (bert_base_512 0.178 ms,
    docs_8k_d64 1.289 ms at dc0020c, ``core_nvidia-h200_20261130-175657.csv``) than
    :data:`VALIDATED` had been (0.118 and 0.956 ms at e24d028,
    ``core_nvidia-h200_20261130-145539.csv``; its TTGIR is unchanged since), so D=64 keeps it.

    The ping-pong options ``split_q``, ``rescale_early``, ``pin_softmax`` and 192-row
    blocks are not taken (``ab_gluon_splitq_pin_m192_h200_8e3edd5.csv`` and its repeat
    ``ab_gluon_splitq_repeat_h200_8e3edd5.csv``, against this form in the same runs):
    ``pin_softmax`` was 7% slower with one q head per program (few_big 0.461 -> 0.492
    ms, whole_8k 0.969 -> 1.036; five interleaved rounds,
    ``ab_gluon_pin_rounds5_h200_7eb6b7d.csv``: 0.461 -> 0.496, 0.941 -> 1.014) and
    nowhere faster beyond the noise; ``split_q`` and ``rescale_early`` stayed within the
    runs' noise, and ``rescale_early`` alone slowed whole_8k (0.969 -> 1.165); three
    consumer groups at D=64 gained 2-4% on docs_8k_d64 (0.778 / 0.797 against 0.812 /
    0.808), too close to the noise without a padded sweep.

    At D=128 with one or two heads stacked, each consumer group writes its rows with one
    TMA store from its half of the Q block (``tma_store``). Against the same staggered
    form with one q head per program in two runs of five interleaved rounds
    (``ab_gluon_tmastore_h200_bb0fc0e.csv``, ``ab_gluon_named_turns_h200_021cac0.csv``):
    enc_2k_d128 0.477 -> 0.468 and 0.482 -> 0.466 ms, whole_8k 0.971 -> 0.964 and
    0.968 -> 0.951, docs_8k_d64 0.793 -> 0.787 and 0.794 -> 0.789, few_big 0.470 ->
    0.474 (the first run only). With four heads stacked (GQA 4, the span workloads of the
    bench) each consumer group stores two 32-row boxes, one per head: against the same
    form storing by registers, five interleaved rounds
    (``ab_gluon_tmastore_stack4_h200_9601e55.csv``): few_big 0.465 -> 0.457 ms, whole_8k
    0.955 -> 0.942, long_32k 0.924 -> 0.927 (the noise).
    Turns passed through hardware named barriers (``turns="named"``, FA3/FA4's
    ``bar.sync``/``bar.arrive``) stayed within the noise at D=128 in the second run
    (whole_8k 0.984 / staggered 0.988, enc_2k_d128 0.468 / 0.478, against 0.968 and 0.482
    for the staggered form without turns) and are not taken there.

    Bidirectional padded batches at D=64 of S >= 8192 (long documents) take three
    consumer groups in 192-row blocks, staggered, with named turns
    (:data:`THREE_GROUPS`). Two padded sweeps at D=64 (64k slots, valid_len uniform in
    1..S; ``ab_gluon_padded_sweep64_m192_h200_8e3edd5.csv`` and
    ``logs/ab_gluon_padded_sweep64_m192_named_turns_h200_9601e55.log``), against
    :data:`VALIDATED` in the same runs: at S=8192 0.794 against 0.852 ms (staggered) and
    0.785 against 0.821 (with named turns); at S=4096 within 1-2% either way (0.756 /
    0.744, 0.742 / 0.750); below it slower (S=512: 0.253 against 0.204). Each group
    releasing its Q rows after its last QK^T (``early_q_release``) took docs_8k_d64 from
    0.772 to 0.743 ms (``ab_gluon_early_q_h200_3855d12.csv``, five interleaved rounds).
    In the 128-row D=128 forms it gained nothing over the TMA store (enc_2k_d128 0.471
    against 0.451 ms; the span workloads within the rounds' spread), which needs the Q
    rows to stage the output, so those keep the TMA store.

    Over dense K/V at D=128 both combine (1104668): Q released early, and each group's
    rows staged in its rows of the item's last K tile, whose ring stage is held until the
    store. Five interleaved rounds against the TMA store alone
    (``ab_gluon_k_staged_h200_1104668_padded.csv``): enc_2k_d128 0.443 -> 0.430 ms (the
    rounds' ranges 0.442-0.445 and 0.430-0.431). On the span workloads it moved within
    1% either way (``ab_gluon_k_staged_h200_1104668_paged.csv``: whole_8k 0.866 -> 0.861,
    long_32k 0.848 -> 0.855, few_big 0.425 -> 0.424), so span launches keep the TMA
    store alone.

    At D=128 with the TMA store, each step's row max is computed before the PV wait
    (``pin_softmax="max"``, 2176e23), under the PV wgmma instead of after it. Five
    interleaved rounds against the same forms without it
    (``ab_gluon_pinmax_h200_2176e23.csv``): whole_8k 0.851 -> 0.817 ms, long_32k 0.832 ->
    0.800, few_big 0.419 -> 0.405 (four heads stacked), enc_2k_d128 0.421 -> 0.409 (Q
    released early, rows staged in K). The three-group D=64 form was slower with it
    (docs_8k_d64 0.672 -> 0.710), so it stays off there; split launches (no TMA store)
    were not measured and keep it off.

    With ``"max"``, ptxas put 9-12 exponentials between the PV wait and the release of
    PV's ring stage. ``pin_softmax="max_reload"`` (2d02156) reads the maxima back after
    the release, which leaves none there, and was slower everywhere in five interleaved
    rounds (``ab_gluon_pinmax_reload_h200_2d02156.csv``, against ``"max"`` in the same
    run): whole_8k 0.806 -> 0.835 ms, long_32k 0.788 -> 0.820, few_big 0.399 -> 0.413,
    enc_2k_d128 0.405 -> 0.417; docs_8k_d64's three-group form 0.707 with either, 0.669
    without a pin. The late release costs less than the extra barrier and load.

    The padded D=128 form zero-fills the padding in a partition of two warps of its own
    (``fill_warps=2``, 8c6f42a), under the consumers' work, instead of consumer group 0
    in the last rounds, where the plan puts the padding's entries. Five interleaved
    rounds (``ab_gluon_fill_h200_8c6f42a_padded.csv``): enc_2k_d128 0.402 -> 0.362 ms
    (one warp: 0.366). docs_8k_d64 was slower with it in both forms that ran it (the
    three-group form 0.674 -> 0.724, the 128-row form 0.736 -> 0.781), so
    :data:`THREE_GROUPS` leaves it off; why was not measured.

    :data:`THREE_GROUPS` keeps its 128-row KV tile and three stages: five interleaved
    rounds on docs_8k_d64 (``ab_gluon_tiles_m192_h200_555e6ef.csv``) gave 0.671 ms
    against 0.675 with four stages, 0.763 with two and 0.760-0.762 with 64-row tiles;
    without the stagger 0.683. No form computes exponentials by a polynomial on the FMA
    units: 1 in 8 of them that way made docs_8k_d64 0.676 -> 0.755 ms and every other
    registry form slower too (``ab_gluon_poly_exp2_h200_76c7cf6.csv``, reverted).

    Nor do the launches take any of these, each timed as a copy of the kernel file
    against the registry's form on docs_8k_d64 (e461a93, five interleaved rounds; the
    patches are in ``bench/results/ab_variants/``): ring stages released through hardware
    barriers instead of an mbarrier (0.677 against 0.673 ms), the row max as a tree
    (0.687 against 0.670, and no faster on any span workload), the padding zero-filled
    by all three groups (0.686 against 0.673), ptxas's ``--register-usage-level`` 0 or
    10 (0.676, 0.675 against 0.674), and one group's softmax at a time (1.074 against
    0.674). Nor, at 001fbd1-8331f5f (``docs/performance.md``, its section on FA4's order),
    FA4's order in the three-group form compiled without a loop spill (0.746 against
    0.670, and 0.749-0.751 with four or five stages), one program per work item (0.694
    against 0.673), or the groups without turns (0.665 against 0.666, both with P packed
    by pairs, in the kernel file since 86ce647).
    """
    from .triton_config import _stacked_heads

    if problem.head_dim <= 64:
        if (_bidirectional_padded(problem, 64)
                and problem.max_kv_len >= GLUON_PADDED_D64_THREE_GROUPS_MIN_SEQ_LEN):
            return THREE_GROUPS
        return VALIDATED
    stack = _stacked_heads(problem.group, 128, _MIN_ROWS_PER_HEAD)
    if problem.head_dim == 128:
        # The TMA store's boxes are 64 rows of one head, or 32 of each stacked head (the
        # stack leaves at least _MIN_ROWS_PER_HEAD = 32, so every form here stores by
        # TMA); over dense K/V the rows are staged in the last K tile and Q is released
        # early. Split launches drop the TMA store and the pinned max (select_config).
        return GluonTile(block_m=128, block_n=128, heads=stack, num_warps=8, num_stages=3,
                         overlap=True, producer=True, pingpong=True, persistent=True,
                         stagger=True, tma_store=True, early_q_release=not problem.paged,
                         pin_softmax="max", fill_warps=2 if problem.op == "padded" else 0)
    return GluonTile(block_m=128, block_n=64, heads=stack, num_warps=8, num_stages=2,
                     overlap=False, producer=True, pingpong=True)


class GluonHopperBackend:
    """The Gluon kernels for Hopper (sm_90) GPUs."""

    name = "gluon"

    def supports_device(self, device: torch.device) -> tuple[bool, str]:
        if device.type != "cuda":
            return False, f"{device.type} tensors: the Gluon kernels need a Hopper GPU"
        # The cached lookup the portable backend uses: supports() runs on every call the
        # automatic choice might give this family.
        major = triton_config._capability_major(
            device.index if device.index is not None else torch.cuda.current_device())
        if major != 9:
            return False, f"sm_{major}x GPU: the Gluon kernels are for Hopper (sm_90)"
        return True, "Hopper GPU: the Gluon kernels (TMA, wgmma)"

    def supports(self, problem: AttentionProblem) -> tuple[bool, str]:
        ok, reason = self.supports_device(problem.device)
        if not ok:
            return ok, reason
        if problem.dtype not in (torch.float16, torch.bfloat16) or problem.kv_dtype != problem.dtype:
            return False, f"{problem.dtype} / {problem.kv_dtype}: fp16 or bf16 only"
        if problem.head_dim not in (64, 128, 256):
            return False, f"D={problem.head_dim}: 64, 128 or 256 only"
        if problem.window_left >= 0 or problem.logits_soft_cap > 0:
            return False, "sliding window / soft cap: not in the Gluon family yet"
        if problem.has_kv_bounds or problem.appends:
            return False, "KV shards / append inside attention: not in the Gluon family yet"
        if problem.paged:
            p = problem.page_size
            if p > 256 or p & (p - 1):
                return False, f"page_size {p}: the Gluon kernel takes powers of two up to 256"
            if not problem.pages_contiguous:
                return False, "K/V pools that are not whole NHD pages one after the other"
            copies = "a TMA copy per page" if p >= 8 else "cp.async gathers"
            return True, f"paged fp16/bf16 K/V: the Gluon kernel ({copies}, wgmma)"
        q, k, _ = problem.dense_kv
        for name, t in (("q", q), ("k", k)):
            if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1] or (t.stride(0) * t.element_size()) % 16:
                return False, f"{name} rows are not [H * D] contiguous with 16-byte row strides"
        return True, "dense fp16/bf16 K/V: the Gluon kernel (TMA, wgmma)"

    def auto_selects(self, problem: AttentionProblem | torch.device) -> tuple[bool, str]:
        """Whether the automatic choice takes this backend for a problem it supports:
        only where it measured faster than the portable kernel on the H200.

        A device alone (what planning asks) gets no: the choice is made per call.
        """
        if isinstance(problem, torch.device):
            return False, "chosen per call, where faster than the portable kernel"
        on_hopper, why_not = self.supports_device(problem.device)
        if not on_hopper:  # the reason a caller off Hopper needs (a cached lookup)
            return on_hopper, why_not
        if problem.op == "span" and problem.head_dim in (128, 256):
            # ab_gluon_h200_e3fff25.csv, bf16, the chosen form against the portable kernel:
            # few_big 0.511 / 0.594 ms, many_small 0.286 / 0.329, scatter15 0.389 / 0.403,
            # long_32k 1.043 / 1.156, whole_8k 1.092 / 1.235; D=256 (few_big_d256,
            # ab_gluon_h200_e8df284.csv) 0.490 against 1.062 at dc0020c.
            return True, (f"D={problem.head_dim} span prefill: the Gluon kernel, faster than "
                          "the portable one on the H200 (scripts/ab_gluon.py)")
        if problem.op == "span":
            return False, (f"span at D={problem.head_dim}: not measured against the portable "
                           "kernel; backend='gluon' runs it anyway")
        if (_bidirectional_padded(problem, 64)
                and problem.max_kv_len >= GLUON_PADDED_D64_MIN_SEQ_LEN):
            # ab_gluon --padded-sweep 64 (ab_gluon_padded_sweep_h200_06ec03b.csv, 64k slots,
            # valid_len uniform in 1..S): the 64-row form against the portable kernel at
            # S=512/1024/2048/4096/8192: 0.204/0.271/0.441/0.756/0.835 against
            # 0.173/0.266/0.447/0.792/0.876 ms; docs_8k_d64 0.787 against 0.910.
            return True, (f"bidirectional padded batch of S={problem.max_kv_len} at D=64: the "
                          "Gluon kernel, faster than the portable one from S=4096 on the H200")
        if _bidirectional_padded(problem, 128):
            # ab_gluon --padded-sweep 128 (ab_gluon_padded_sweep128_tmastore_h200_9601e55.csv,
            # 64k slots, 16 heads, valid_len uniform in 1..S, three interleaved rounds): the
            # chosen form (persistent, staggered, TMA store) against the portable kernel at
            # S=512/1024/2048/4096/8192: 0.475/0.606/0.930/1.556/1.700 against
            # 0.520/0.649/0.990/1.714/1.726 ms; enc_2k_d128 0.445 against 0.482
            # (ab_gluon_tmastore_stack4_h200_9601e55.csv). Without the TMA store the form
            # had been 2-5% slower from S=4096 (ab_gluon_padded_sweep128_h200_a902294.csv).
            # With the rows staged in the last K tile (ab_gluon_padded_sweep128_k_staged_
            # h200_5b88b37.csv): 0.448/0.578/0.863/1.411/1.623 against
            # 0.523/0.646/0.976/1.576/1.610 ms, level at S=8192 (the rounds overlap).
            return True, ("bidirectional padded batch at D=128: the Gluon kernel, faster "
                          "than the portable one up to S=4096 on the H200 and level at 8192")
        # Other padded/varlen: the portable kernel at D=64 below S=4096 is faster; causal
        # padded batches and varlen were not measured (the sweeps are bidirectional).
        return False, (f"{problem.op} at D={problem.head_dim}: the portable kernel is faster "
                       "on the H200 (scripts/ab_gluon.py); backend='gluon' runs it anyway")

    def select_config(self, problem: AttentionProblem) -> LaunchConfig:
        """The form (:func:`choose_form`; its ``block_q`` is the plan's tile height), and
        split-KV for span launches of few tiles over long KV, as the portable kernel
        decides it (:func:`~spanfill.backends.triton_config.pick_num_splits`)."""
        from .triton import packed_tile_bound
        from .triton_config import pick_num_splits

        tile = choose_form(problem)
        splits = 1
        if problem.paged:
            tiles = packed_tile_bound(problem.num_tokens, problem.num_requests, tile.block_q)
            splits = pick_num_splits(tiles * (problem.num_q_heads // tile.heads),
                                     problem.max_kv_len, tile, problem.device)
        if splits > 1 and tile.tma_store:  # split partial states go to the workspace
            # (only paged launches split, and choose_form stages rows in a K tile, with
            # the early Q release, over dense K/V only); the pinned row max was measured
            # and tested with the TMA store only
            tile = replace(tile, tma_store=False, pin_softmax=False)
        return LaunchConfig(tile, num_splits=splits, use_tma=True)

    def attend(self, config: LaunchConfig, plan, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, sm_scale: float, causal: bool, return_lse: bool,
               zero_fill: bool = False, positions: torch.Tensor | None = None,
               block_table: torch.Tensor | None = None, kv_start: torch.Tensor | None = None,
               window_left: int = -1, logits_soft_cap: float = 0.0, k_scale=None, v_scale=None,
               **unsupported) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Allocate the outputs and launch (the same run step as the portable backend's).

        Parameters
        ----------
        q : [T, Hq, D]; k, v : [rows, Hk, D] dense, or [num_pages, page_size, Hk, D]
            with ``block_table`` (and ``positions``)
        plan : :class:`spanfill.layout.TilePlan` built with ``config.block_q``
        """
        from ..kernels_gluon.attention import attention_fwd_dense, attention_fwd_paged

        if window_left >= 0 or logits_soft_cap > 0 or k_scale is not None \
                or kv_start is not None or unsupported:
            raise ValueError("the Gluon backend got a variant its supports() refuses")
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device) \
            if return_lse else None
        t = config.tile
        form = dict(block_m=t.block_m, block_n=t.block_n, stages=t.num_stages,
                    warp_specialize=t.producer, overlap=t.overlap, stack=t.heads,
                    num_splits=config.num_splits, pingpong=t.pingpong,
                    persistent=triton_config._num_sms(q.device.index) if t.persistent else 0,
                    stagger=t.stagger, tma_store=t.tma_store, turns=t.turns,
                    early_q_release=t.early_q_release, pin_softmax=t.pin_softmax)
        if zero_fill:  # (the padding partition has nothing to fill without it)
            form["fill_warps"] = t.fill_warps
        if block_table is not None:
            attention_fwd_paged(q, k, v, out, lse, plan, positions, block_table, sm_scale,
                                causal, **form)
        else:
            attention_fwd_dense(q, k, v, out, lse, plan, sm_scale, causal, zero_fill=zero_fill,
                                **form)
        return out, lse
