"""Launch spanfill's attention kernel on one core bench workload a few times, for ``ncu``.

Usage (on the GPU machine)::

    ncu --kernel-name regex:_attn_fwd --launch-skip 2 --launch-count 1 --set full \\
        -o report python3 scripts/profile_kernel.py scatter15

Workloads: the names of :func:`bench.workloads.core_workloads` (few_big, many_small,
scatter15, long_32k, few_big_swa, bert_base_512, enc_2k_d128), built exactly as the
bench builds them (same seed, same span placement). Segmented rows launch
``span_prefill`` on the prebuilt layout, padded rows ``padded_prefill`` on the prebuilt
``PaddedLayout`` (the bench's ``spanfill`` providers): the kernel the automatic choice
takes, as ``scripts/ncu_profile.sh`` names it. Layouts and plans are built before the
first launch, so every launch the profiler sees is the attention kernel's.

``--gluon`` (after the name): ``backend="gluon"`` (the bench's ``spanfill_gluon``
providers), for the Hopper family where the automatic choice takes the portable kernel
(bert_base_512). ``--portable``: the portable padded kernel alone (the bench's
``spanfill_kernel``) for padded rows, where the automatic choice takes the Gluon one.

``--fa4`` (after the name): FlashAttention-4 instead, as the bench's ``fa4_padded`` and
``fa4_span_entries`` providers call it (``flash_attn.cute`` must import), so that one
workload's two profiles, ours and the peer's, sit side by side. Its kernel's name is not
``_attn_fwd``: ``scripts/ncu_profile.sh`` takes ``PROFILE_ARGS=--fa4`` and filters on
FA4's forward kernel instead.

``--form NAME`` (after the name): one form of the Gluon kernel as ``scripts/ab_gluon.py``
names and launches it (e.g. ``gluon_m192_pingpong_persistent_stagger_named_turns_earlyq``
and the same with ``_fill2``), for profiles of two forms the registry does not both take.
"""
import sys

import torch

sys.path.insert(0, ".")
from bench.providers_spanfill import (spanfill_gluon, spanfill_gluon_span,  # noqa: E402
                                      spanfill_padded, spanfill_padded_kernel,
                                      spanfill_segmented)
from bench.workloads import PaddedWorkload, core_workloads  # noqa: E402


def _form_runner(w, tensors, form: str):
    """The launch of ``scripts/ab_gluon.py``'s form ``form`` on the workload (the form
    must be one ab_gluon runs there)."""
    sys.path.insert(0, "scripts")
    import ab_gluon

    variants = ab_gluon._forms_on(w, tensors, [(None, None)])
    if form not in variants:
        raise SystemExit(f"no form {form!r} on {w.name}; one of {sorted(variants)}")
    run, _ = ab_gluon._form_run(w, tensors, variants[form])
    run()  # the first launch compiles, as the providers' preparation does
    return run


def _provider(padded: bool, gluon: bool = False, fa4: bool = False,
              portable: bool = False):
    """The bench provider whose launches are profiled (see the module's docstring)."""
    if fa4:
        from bench import providers_fa4

        return providers_fa4.padded if padded else providers_fa4.span_entries
    if gluon:
        return spanfill_gluon if padded else spanfill_gluon_span
    if portable and padded:
        return spanfill_padded_kernel
    if portable:
        raise SystemExit("--portable is for padded rows (span rows: the automatic choice)")
    return spanfill_padded if padded else spanfill_segmented


def main(name: str, gluon: bool = False, fa4: bool = False, launches: int = 4,
         form: str | None = None, portable: bool = False) -> None:
    device = torch.device("cuda")
    by_name = {w.name: w for w in core_workloads()}
    if name not in by_name:
        raise SystemExit(f"unknown workload {name!r}; one of {sorted(by_name)}")
    w = by_name[name]
    tensors = w.make(device, torch.bfloat16)
    padded = isinstance(w, PaddedWorkload)
    if form is not None:
        run = _form_runner(w, tensors, form)
    else:
        prepare = _provider(padded, gluon, fa4, portable)
        run = prepare(w, tensors).run  # (preparing launches once: the first compiles)
    for _ in range(launches):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    argv = sys.argv[1:]
    form = None
    if "--form" in argv:
        i = argv.index("--form")
        if i + 1 >= len(argv):
            raise SystemExit("--form takes a form's name (scripts/ab_gluon.py's)")
        form = argv[i + 1]
        del argv[i:i + 2]
    args = [a for a in argv if a not in ("--gluon", "--fa4", "--portable")]
    gluon, fa4, portable = "--gluon" in argv, "--fa4" in argv, "--portable" in argv
    if sum((gluon, fa4, portable, form is not None)) > 1:
        raise SystemExit("--gluon, --fa4, --portable and --form name different kernels: "
                         "give one")
    main(args[0] if args else "few_big", gluon=gluon, fa4=fa4, form=form, portable=portable)
