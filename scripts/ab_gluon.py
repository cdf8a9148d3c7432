"""Time the Gluon (Hopper) kernel's variants against the portable kernel (sm_90 GPU).

    PYTHONPATH=. python3 scripts/ab_gluon.py [--out DIR] [--forms REGEX] [WORKLOAD ...]

For each workload of the core bench the Gluon kernel covers (built as ``bench/`` builds
it, bf16; padded batches, and span layouts over pages of up to 256 rows without a
window): the portable kernel (plan prebuilt, as ``padded_prefill``/``span_prefill``
launch it) and every form of the Gluon kernel
(:func:`~spanfill.kernels_gluon.attention.attention_fwd_dense` / ``_paged``):
64- or 128-row programs, the softmax in sequence or under the previous tile's PV
(``overlap``), the warp group issuing its own copies or a producer warp, the 128-row
form whose two warp groups are separate consumer partitions, each with the overlapped
loop (``pingpong``) or in sequence (``split_consumers``), one program per work item or
one per SM walking the items (``_persistent``), and with GQA
one q head per program or the KV head's whole group stacked in it. Each is checked
against the bench's reference rows first (a failed check gets no time), then timed with
``bench.timing.time_device`` (L2 flushed). Writes ``DIR/ab_gluon.csv`` (the bench's
columns) and ``DIR/ab_gluon.png``, and prints a table: the data for choosing the Gluon
backend's launch form in ``spanfill/backends/gluon.py`` (``gluon_chosen``: the form and
split count it chooses, through ``backend="gluon"``; ``--forms``: only matching forms;
``--tiles``: each form also at other KV tile widths and ring depths, named ``_n64_s4``;
``--padded-sweep D``: padded batches from S=512 to 8192 at head dim D instead;
``--rounds R``: each workload's cases timed R times round-robin, the median reported,
so drift over the run reaches every case alike; ``--kernels NAME=PATH``: the chosen form
also with the Gluon kernels of another copy of the kernel file, e.g. ``git show
REV:spanfill/kernels_gluon/attention.py``, named ``gluon_chosen_NAME``: an A/B of a
kernel change without a launch option for it; with ``--kernels-forms`` every form
``--forms`` selects too, named ``FORM_NAME``).
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import spanfill as sf  # noqa: E402
from _results import write_rows  # noqa: E402
from bench.check import padded_checker, segmented_checker, tolerance  # noqa: E402
from bench.providers_base import window_of  # noqa: E402
from bench.providers_spanfill import (spanfill_gluon, spanfill_gluon_span,  # noqa: E402
                                     spanfill_padded_kernel, spanfill_portable_span)
from bench.timing import median_of_rounds, time_interleaved  # noqa: E402
from bench.workloads import PaddedWorkload, core_workloads, padded_uniform  # noqa: E402

# (rows per program, overlap, producer warp, ping-pong warp groups: 0 none, 1 one
# program per work item, PERSISTENT one program per SM walking the items)
PERSISTENT = 2
STAGGERED = 3  # persistent, the second consumer group starting each item a tile later
TURNS = 4  # persistent, the consumer groups taking turns issuing each step's wgmmas
SPLIT_Q = 5  # staggered, each consumer group's half of Q copied and released on its own
EARLY = 6  # staggered, the output rescaled under the QK^T wgmma (FA3's order)
SPLIT_Q_EARLY = 7  # both
PIN = 8  # staggered, a scratch store keeping the softmax ahead of the PV wait (ptxas)
SPLIT_Q_PIN = 9  # staggered, split_q and pin_softmax
TURNS_PIN = 10  # turns at the tensor cores with the softmax pinned under PV (FA3's order)
STAGGER_TURNS_PIN = 11  # the same, staggered
STAGGER_TMA_STORE = 12  # staggered, each consumer group's rows out by a TMA store
NAMED_TURNS = 13  # turns passed through hardware named barriers (FA3/FA4's mechanism)
STAGGER_NAMED_TURNS = 14  # the same, staggered
STAGGER_NAMED_TURNS_TMA_STORE = 15  # the same, with the TMA-store epilogue
STAGGER_EARLY_Q = 16  # staggered, Q released after each group's last QK^T (register stores)
STAGGER_NAMED_TURNS_EARLY_Q = 17  # staggered, named turns, Q released early
STAGGER_TMA_STORE_EARLY_Q = 18  # staggered, Q released early, the rows staged in a K tile
# The registry's forms (spans, padded D=128, padded D=64 in 192-row blocks), each with the
# scratch store that keeps the softmax ahead of the PV wait added to its options below (in
# their SASS on Triton 3.6 all 66 exponentials of a step then come before it, none without)
STAGGER_TMA_STORE_PIN = 19
STAGGER_TMA_STORE_EARLY_Q_PIN = 20
STAGGER_NAMED_TURNS_EARLY_Q_PIN = 21
# The same three with the row max only ahead of the PV wait (pin_softmax="max": its
# compares and shuffles under PV, the exponentials after the wait)
STAGGER_TMA_STORE_PINMAX = 22
STAGGER_TMA_STORE_EARLY_Q_PINMAX = 23
STAGGER_NAMED_TURNS_EARLY_Q_PINMAX = 24
# The same three with the maxima read back after PV's ring stage is released
# (pin_softmax="max_reload": no exponential between the PV wait and the release)
STAGGER_TMA_STORE_PINMAX_RELOAD = 25
STAGGER_TMA_STORE_EARLY_Q_PINMAX_RELOAD = 26
STAGGER_NAMED_TURNS_EARLY_Q_PINMAX_RELOAD = 27
# The registry's padded forms (D=128; D=64 in 192-row blocks) with the padding zero-filled
# by a partition of one or two warps of its own (fill_warps; padded batches only)
STAGGER_TMA_STORE_EARLY_Q_PINMAX_FILL1 = 28
STAGGER_TMA_STORE_EARLY_Q_PINMAX_FILL2 = 29
STAGGER_NAMED_TURNS_EARLY_Q_FILL2 = 30
NAMED_TURNS_EARLY_Q = 31  # the D=64 registry form (192-row blocks) without the stagger
# The ping-pong options of each persistent variant (attention_fwd_dense's keywords), in
# the order their names are suffixed.
VARIANT_OPTIONS = {PERSISTENT: {}, STAGGERED: {"stagger": True}, TURNS: {"turns": True},
                   SPLIT_Q: {"stagger": True, "split_q": True},
                   EARLY: {"stagger": True, "rescale_early": True},
                   SPLIT_Q_EARLY: {"stagger": True, "split_q": True, "rescale_early": True},
                   PIN: {"stagger": True, "pin_softmax": True},
                   SPLIT_Q_PIN: {"stagger": True, "split_q": True, "pin_softmax": True},
                   TURNS_PIN: {"turns": True, "pin_softmax": True},
                   STAGGER_TURNS_PIN: {"stagger": True, "turns": True, "pin_softmax": True},
                   STAGGER_TMA_STORE: {"stagger": True, "tma_store": True},
                   NAMED_TURNS: {"turns": "named"},
                   STAGGER_NAMED_TURNS: {"stagger": True, "turns": "named"},
                   STAGGER_NAMED_TURNS_TMA_STORE: {"stagger": True, "turns": "named",
                                                   "tma_store": True},
                   STAGGER_EARLY_Q: {"stagger": True, "early_q_release": True},
                   STAGGER_NAMED_TURNS_EARLY_Q: {"stagger": True, "turns": "named",
                                                 "early_q_release": True},
                   NAMED_TURNS_EARLY_Q: {"turns": "named", "early_q_release": True},
                   STAGGER_TMA_STORE_EARLY_Q: {"stagger": True, "tma_store": True,
                                               "early_q_release": True}}
for _pin, _pinned_forms in ((True, (STAGGER_TMA_STORE_PIN, STAGGER_TMA_STORE_EARLY_Q_PIN,
                                     STAGGER_NAMED_TURNS_EARLY_Q_PIN)),
                            ("max", (STAGGER_TMA_STORE_PINMAX, STAGGER_TMA_STORE_EARLY_Q_PINMAX,
                                     STAGGER_NAMED_TURNS_EARLY_Q_PINMAX)),
                            ("max_reload", (STAGGER_TMA_STORE_PINMAX_RELOAD,
                                            STAGGER_TMA_STORE_EARLY_Q_PINMAX_RELOAD,
                                            STAGGER_NAMED_TURNS_EARLY_Q_PINMAX_RELOAD))):
    for _pinned, _form in zip(_pinned_forms, (STAGGER_TMA_STORE, STAGGER_TMA_STORE_EARLY_Q,
                                              STAGGER_NAMED_TURNS_EARLY_Q)):
        VARIANT_OPTIONS[_pinned] = {**VARIANT_OPTIONS[_form], "pin_softmax": _pin}
for _filled, _form, _warps in ((STAGGER_TMA_STORE_EARLY_Q_PINMAX_FILL1,
                                STAGGER_TMA_STORE_EARLY_Q_PINMAX, 1),
                               (STAGGER_TMA_STORE_EARLY_Q_PINMAX_FILL2,
                                STAGGER_TMA_STORE_EARLY_Q_PINMAX, 2),
                               (STAGGER_NAMED_TURNS_EARLY_Q_FILL2, STAGGER_NAMED_TURNS_EARLY_Q, 2)):
    VARIANT_OPTIONS[_filled] = {**VARIANT_OPTIONS[_form], "fill_warps": _warps}
SUFFIX = {"stagger": "_stagger", "turns": "_turns", "split_q": "_splitq",
          "rescale_early": "_early", "pin_softmax": "_pin", "tma_store": "_tmastore",
          "early_q_release": "_earlyq", "fill_warps": "_fill"}
FORMS = [(m, o, p, 0) for m, o, p in itertools.product((64, 128), (False, True),
                                                       (False, True))]
FORMS.append((128, True, True, 1))  # two consumer partitions, each overlapped
FORMS.append((128, False, True, 1))  # two consumer partitions, each in sequence
FORMS.append((128, True, True, PERSISTENT))
FORMS.append((128, False, True, PERSISTENT))
FORMS.append((128, True, True, STAGGERED))
FORMS.append((128, False, True, STAGGERED))
FORMS.append((128, True, True, TURNS))
FORMS.append((128, True, True, SPLIT_Q))
FORMS.append((128, False, True, SPLIT_Q))
FORMS.append((128, True, True, EARLY))
FORMS.append((128, True, True, SPLIT_Q_EARLY))
FORMS.append((128, True, True, PIN))
FORMS.append((128, True, True, SPLIT_Q_PIN))
FORMS.append((128, True, True, TURNS_PIN))
FORMS.append((128, True, True, STAGGER_TURNS_PIN))
FORMS.append((128, True, True, STAGGER_TMA_STORE))
FORMS.append((128, True, True, NAMED_TURNS))
FORMS.append((128, True, True, STAGGER_NAMED_TURNS))
FORMS.append((128, True, True, STAGGER_NAMED_TURNS_TMA_STORE))
FORMS.append((128, True, True, STAGGER_EARLY_Q))
FORMS.append((128, True, True, STAGGER_NAMED_TURNS_EARLY_Q))
FORMS.append((128, True, True, STAGGER_TMA_STORE_EARLY_Q))
FORMS.append((128, True, True, STAGGER_TMA_STORE_PIN))
FORMS.append((128, True, True, STAGGER_TMA_STORE_EARLY_Q_PIN))
FORMS.append((128, True, True, STAGGER_TMA_STORE_PINMAX))
FORMS.append((128, True, True, STAGGER_TMA_STORE_EARLY_Q_PINMAX))
FORMS.append((128, True, True, STAGGER_TMA_STORE_PINMAX_RELOAD))
FORMS.append((128, True, True, STAGGER_TMA_STORE_EARLY_Q_PINMAX_RELOAD))
FORMS.append((128, True, True, STAGGER_TMA_STORE_EARLY_Q_PINMAX_FILL1))
FORMS.append((128, True, True, STAGGER_TMA_STORE_EARLY_Q_PINMAX_FILL2))
# Three consumer groups in 192-row blocks (D=64 over dense K/V only: padded batches)
FORMS.append((192, True, True, PERSISTENT))
FORMS.append((192, False, True, PERSISTENT))
FORMS.append((192, True, True, STAGGERED))
FORMS.append((192, True, True, SPLIT_Q))
FORMS.append((192, True, True, PIN))
FORMS.append((192, True, True, STAGGER_NAMED_TURNS))
FORMS.append((192, True, True, STAGGER_NAMED_TURNS_EARLY_Q))
FORMS.append((192, True, True, STAGGER_NAMED_TURNS_EARLY_Q_PIN))
FORMS.append((192, True, True, STAGGER_NAMED_TURNS_EARLY_Q_PINMAX))
FORMS.append((192, True, True, STAGGER_NAMED_TURNS_EARLY_Q_PINMAX_RELOAD))
FORMS.append((192, True, True, STAGGER_NAMED_TURNS_EARLY_Q_FILL2))
FORMS.append((192, True, True, NAMED_TURNS_EARLY_Q))


def _variants(group: int, tiles: list[tuple[int | None, int | None]], head_dim: int,
              padded: bool) -> list[tuple[int, bool, bool, int, int, int | None, int | None]]:
    """Every form, with one q head per program and (GQA) the whole group stacked, at each
    ``(block_n, stages)`` of ``tiles`` (``(None, None)``: the kernel's defaults); the
    192-row forms for padded batches at D=64 with a head's rows a multiple or a divisor
    of 64 (what the launcher takes); the forms with a padding partition for padded batches
    only."""
    def runs(m: int, st: int, pp: int) -> bool:
        if "fill_warps" in VARIANT_OPTIONS.get(pp, {}) and not padded:
            return False
        if m == 192:
            return padded and head_dim == 64 and ((m // st) % 64 == 0 or 64 % (m // st) == 0)
        return m // st >= 16

    return [(m, o, p, st, pp, bn, ns) for m, o, p, pp in FORMS for st in sorted({1, group})
            for bn, ns in tiles if runs(m, st, pp)]


def _suffix(option: str, value: bool | int | str) -> str:
    """An option's part of a form's name: ``_stagger``; a string or count joins it, "named"
    before (``_named_turns``), any other after (``_pinmax``, ``_fill2``)."""
    if value == "named":
        return "_named" + SUFFIX[option]
    return SUFFIX[option] + ("" if value is True else str(value))


def _name(block_m: int, overlap: bool, producer: bool, stack: int, pingpong: int,
          block_n: int | None = None, stages: int | None = None) -> str:
    if pingpong:
        name = (f"gluon_m{block_m}_" + ("pingpong" if overlap else "split_consumers")
                + ("_persistent" if pingpong >= PERSISTENT else "")
                + "".join(_suffix(o, v) for o, v in VARIANT_OPTIONS.get(pingpong, {}).items())
                + (f"_stack{stack}" if stack > 1 else ""))
    else:
        name = (f"gluon_m{block_m}" + ("_overlap" if overlap else "")
                + ("_producer" if producer else "") + (f"_stack{stack}" if stack > 1 else ""))
    return name + (f"_n{block_n}_s{stages}" if block_n else "")


def _pingpong_args(pingpong: int) -> dict:
    """The ping-pong keywords of a form: ``pingpong``, ``persistent`` (one program per
    SM, or 0) and the variant's options."""
    if pingpong < PERSISTENT:
        return dict(pingpong=bool(pingpong), persistent=0)
    from spanfill.backends.triton_config import _num_sms  # the backend's own SM count

    return dict(pingpong=True, persistent=_num_sms(torch.cuda.current_device()),
                **VARIANT_OPTIONS[pingpong])


def _tiles(spec: str) -> list[tuple[int | None, int | None]]:
    """``--tiles "64:4,128:2"``: the defaults plus each ``block_n:stages``."""
    extra = [tuple(int(x) for x in item.split(":")) for item in spec.split(",") if item]
    return [(None, None)] + extra


def _gluon_run(w: PaddedWorkload, t, block_m: int, overlap: bool, producer: bool, stack: int,
               pingpong: int, block_n: int | None, stages: int | None):
    """The Gluon kernel on the padded batch (zero-filled padding), and its valid rows. The
    launcher is looked up at each call, so :func:`_with_kernels` can swap it."""
    from bench.check import packed_valid_index

    b, s, h, d = t.q.shape
    q, k, v = (x.reshape(b * s, x.shape[2], d) for x in (t.q, t.k, t.v))
    plan = sf.PaddedLayout.build(t.valid_lens, s).tile_plan(block_m // stack, w.causal)
    out = torch.full_like(q, float("nan"))
    idx = packed_valid_index(t.valid_lens, s)

    def run() -> None:
        from spanfill.kernels_gluon.attention import attention_fwd_dense

        attention_fwd_dense(q, k, v, out, None, plan, d ** -0.5, w.causal, zero_fill=True,
                            block_m=block_m, warp_specialize=producer, overlap=overlap,
                            stack=stack, block_n=block_n, stages=stages,
                            **_pingpong_args(pingpong))

    return run, lambda: (run(), out[idx])[1]


def _gluon_paged_run(w, t, block_m: int, overlap: bool, producer: bool, stack: int,
                     pingpong: int, block_n: int | None, stages: int | None):
    """The Gluon kernel over the workload's page pool, and its output rows (the launcher
    looked up at each call, as in :func:`_gluon_run`)."""
    layout = t.layout
    plan = layout.tile_plan(block_m // stack, True)
    out = torch.full_like(t.q, float("nan"))

    def run() -> None:
        from spanfill.kernels_gluon.attention import attention_fwd_paged

        attention_fwd_paged(t.q, t.k_cache, t.v_cache, out, None, plan, layout.positions,
                            layout.block_table, t.q.shape[-1] ** -0.5, True, block_m=block_m,
                            warp_specialize=producer, overlap=overlap, stack=stack,
                            block_n=block_n, stages=stages, **_pingpong_args(pingpong))

    return run, lambda: (run(), out)[1]


def _forms_on(w, t, tiles: list[tuple[int | None, int | None]]) -> dict[str, tuple]:
    """Every form this script runs on workload ``w`` (its tensors ``t``), by name: the
    :func:`_variants` for its GQA group, head dim and kind."""
    padded = isinstance(w, PaddedWorkload)
    group = t.q.shape[-2] // (t.k if padded else t.k_cache).shape[-2]
    return {_name(*v): v for v in _variants(group, tiles, w.head_dim, padded)}


def _form_run(w, t, variant: tuple):
    """A form's ``(run, output)`` on the workload: :func:`_gluon_run` for padded batches,
    :func:`_gluon_paged_run` for span rows."""
    return (_gluon_run if isinstance(w, PaddedWorkload) else _gluon_paged_run)(w, t, *variant)


def _load_kernels(spec: str):
    """``NAME=PATH``: a copy of ``spanfill/kernels_gluon/attention.py`` (another commit's,
    or an edited one) loaded as a module of its own, and its name."""
    import importlib.util

    name, _, path = spec.partition("=")
    if not name or not path or not Path(path).is_file():
        raise ValueError(f"--kernels takes NAME=PATH with PATH a kernel file, got {spec!r}")
    mod_name = "spanfill.kernels_gluon._ab_" + re.sub(r"\W", "_", name)
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module  # (Gluon resolves a kernel's globals through it)
    module_spec.loader.exec_module(module)
    return name, module


def _with_kernels(module, fn):
    """``fn`` (a call through the registry, ``backend="gluon"``) with the Gluon backend's
    launches taken from ``module`` instead of the checkout's kernel file."""
    import spanfill.kernels_gluon.attention as current

    def call():
        saved = current.attention_fwd_dense, current.attention_fwd_paged
        current.attention_fwd_dense = module.attention_fwd_dense
        current.attention_fwd_paged = module.attention_fwd_paged
        try:
            return fn()
        finally:
            current.attention_fwd_dense, current.attention_fwd_paged = saved

    return call


def _covered(w) -> bool:
    """Whether the Gluon kernel has a form for this workload."""
    if w.head_dim not in (64, 128, 256):
        return False
    if isinstance(w, PaddedWorkload):
        return True
    return w.page_size <= 256 and window_of(w) < 0


def _padded_sweep(head_dim: int) -> list[PaddedWorkload]:
    """The bench's ``padded_seq_len`` axis (B * S = 65,536) at ``head_dim``: where the
    registry's choice between the kernel families for padded batches can turn."""
    heads = 12 if head_dim == 64 else 16
    return [padded_uniform(f"padded_s{s}_d{head_dim}", 65536 // s, s, heads, head_dim)
            for s in (512, 1024, 2048, 4096, 8192)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--forms", default="",
                        help="time only the Gluon forms whose names match this regex")
    parser.add_argument("--tiles", default="",
                        help="also each form at these block_n:stages, e.g. 64:4,128:2")
    parser.add_argument("--padded-sweep", type=int, default=0, metavar="D",
                        help="instead of the core workloads: padded batches of 64k slots at "
                             "head dim D, S from 512 to 8192 (valid_len uniform in 1..S)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time each case this many times, the cases interleaved, and "
                             "report the median of the rounds' p50s (default 1)")
    parser.add_argument("--kernels", action="append", default=[], metavar="NAME=PATH",
                        help="also the chosen form with the Gluon kernels of this copy of "
                             "spanfill/kernels_gluon/attention.py (e.g. another commit's), "
                             "named gluon_chosen_NAME; repeatable")
    parser.add_argument("--kernels-forms", action="store_true",
                        help="also every form --forms selects with each --kernels copy, "
                             "named FORM_NAME (an A/B of a kernel edit in a form the "
                             "registry does not choose)")
    parser.add_argument("workloads", nargs="*")
    args = parser.parse_args()
    if args.kernels_forms and not args.kernels:
        parser.error("--kernels-forms times the forms with the --kernels copies: give one")
    forms = re.compile(args.forms)
    kernels = [_load_kernels(spec) for spec in args.kernels]
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit("needs a Hopper (sm_90) GPU")
    device = torch.device("cuda")
    rows, table = [], []
    for w in _padded_sweep(args.padded_sweep) if args.padded_sweep else core_workloads():
        if not _covered(w) or (args.workloads and w.name not in args.workloads):
            continue
        t = w.make(device, torch.bfloat16)
        padded = isinstance(w, PaddedWorkload)
        check = (padded_checker if padded else segmented_checker)(w, t)
        tol = tolerance(torch.bfloat16)
        # The portable kernel, also where the automatic choice takes the Gluon family.
        portable = (spanfill_padded_kernel if padded else spanfill_portable_span)(w, t)
        # backend="gluon": the form (and split count) spanfill/backends/gluon.py chooses.
        chosen = (spanfill_gluon if padded else spanfill_gluon_span)(w, t)
        cases = [("portable", portable.run, portable.output),
                 ("gluon_chosen", chosen.run, chosen.output)]
        cases += [(f"gluon_chosen_{name}", _with_kernels(module, chosen.run),
                   _with_kernels(module, chosen.output)) for name, module in kernels]
        for form, v in _forms_on(w, t, _tiles(args.tiles)).items():
            if not forms.search(form):
                continue
            run, output = _form_run(w, t, v)
            cases.append((form, run, output))
            if args.kernels_forms:
                cases += [(f"{form}_{name}", _with_kernels(module, run),
                           _with_kernels(module, output)) for name, module in kernels]
        kernel = "padded_prefill" if padded else "span_prefill"
        timed = {}
        for name, run, output in cases:
            try:
                err = check(output())
            except Exception as exc:  # a compile or launch error: a row, not a crash
                table.append((w.name, name, f"error: {type(exc).__name__}: {exc}"[:90]))
                rows.append({"kernel": kernel, "provider": name, "workload": w.name,
                             "metric": "error", "unit": "", "note": str(exc)[:300]})
                continue
            rows.append({"kernel": kernel, "provider": name, "workload": w.name,
                         "metric": "check_relerr", "unit": "rel", "p50": err, "p20": err,
                         "p80": err})
            if not err <= tol:
                table.append((w.name, name, f"FAILED check: rel err {err:.2e} > {tol:.0e}"))
                continue
            timed[name] = (run, err)
        # Every checked case of the workload, timed round-robin (--rounds): drift over the
        # run then reaches all of them alike.
        per_round = time_interleaved({n: r for n, (r, _) in timed.items()}, device,
                                     args.rounds)
        base = None
        for name, (_, err) in timed.items():
            st = median_of_rounds(per_round[name])
            ms = {"p50": st.p50, "p20": st.p20, "p80": st.p80}
            note = ("" if args.rounds == 1 else f"median of {args.rounds} interleaved rounds; "
                    "p50 per round " + " ".join(f"{x.p50:.4f}" for x in per_round[name]))
            rows.append({"kernel": kernel, "provider": name, "workload": w.name,
                         "metric": "kernel_time", "unit": "ms", **ms, "note": note})
            base = ms["p50"] if name == "portable" else base
            ratio = f"{ms['p50'] / base:.2f}x portable" if base else ""
            spread = ""
            if args.rounds > 1:
                p50s = [x.p50 for x in per_round[name]]
                spread = f" [{min(p50s):.3f}-{max(p50s):.3f}]"
            table.append((w.name, name,
                          f"{ms['p50']:.3f} ms{spread}  {ratio}  (rel err {err:.1e})"))
            print(f"{w.name:16s} {name:28s} {table[-1][2]}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = write_rows(out / "ab_gluon.csv", rows)
    print("wrote", path, plot(rows, out / "ab_gluon.png"))
    print("\n| workload | kernel | result |\n|---|---|---|")
    for line in table:
        print("| " + " | ".join(line) + " |")


def plot(rows: list[dict], path: Path) -> Path:
    """Kernel time of each variant, relative to the portable kernel, per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["metric"] == "kernel_time"]
    workloads = list(dict.fromkeys(r["workload"] for r in timed))
    fig, axes = plt.subplots(1, max(1, len(workloads)), figsize=(4.5 * max(1, len(workloads)), 4),
                             squeeze=False)
    for ax, w in zip(axes[0], workloads):
        mine = [r for r in timed if r["workload"] == w]
        base = next((r["p50"] for r in mine if r["provider"] == "portable"), None)
        vals = [r["p50"] / base if base else r["p50"] for r in mine]
        ax.bar(range(len(mine)), vals)
        ax.set_xticks(range(len(mine)), [r["provider"] for r in mine], rotation=60, ha="right",
                      fontsize=6)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel("kernel time / portable" if base else "ms")
        ax.set_title(w, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
