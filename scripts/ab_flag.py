"""A/B a module-level switch of the kernels on the core bench workloads (GPU).

    python3 scripts/ab_flag.py spanfill.kernels.attention SOME_SWITCH [WORKLOAD ...]

(used for the lazy-rescaling A/B at commit 55cd019, where the kernel read
``attention.LAZY_RESCALE`` at launch and passed it as a constexpr;
bench/results/logs/kernel_ab_lazy_rescale_h100.log).

For each workload (built as the bench builds it): spanfill's kernel (``span_prefill``
on the prebuilt layout, or the attention kernel alone on the padded batch) with the
switch off (A) and on (B), timed alternately in two rounds (A first, then B first;
``bench.timing.time_device``, L2 flushed) and the lower p50 of each kept. Prints
both, their ratio, whether the outputs are bit-equal, and each variant's relative
error against the bench's reference check.
"""
import importlib
import sys

import torch

sys.path.insert(0, ".")
from bench.check import padded_checker, segmented_checker  # noqa: E402
from bench.providers_spanfill import spanfill_padded_kernel, spanfill_segmented  # noqa: E402
from bench.timing import time_device  # noqa: E402
from bench.workloads import PaddedWorkload, core_workloads  # noqa: E402


def main(module_name: str, flag: str, *names: str) -> None:
    module = importlib.import_module(module_name)
    device = torch.device("cuda")
    print(f"# {module_name}.{flag}: A = False, B = True; kernel p50 us (lower of 2 alternating "
          f"rounds); {torch.cuda.get_device_name()}")
    for w in core_workloads():
        if names and w.name not in names:
            continue
        t = w.make(device, torch.bfloat16)
        padded = isinstance(w, PaddedWorkload)
        check = (padded_checker if padded else segmented_checker)(w, t)
        prepared = (spanfill_padded_kernel if padded else spanfill_segmented)(w, t)
        best, outs, errs = {}, {}, {}
        for order in ((False, True), (True, False)):
            for value in order:
                setattr(module, flag, value)
                outs[value] = prepared.output().clone()
                errs[value] = check(outs[value])
                p50 = time_device(prepared.run, device).p50 * 1e3
                best[value] = min(best.get(value, float("inf")), p50)
        setattr(module, flag, False)
        equal = torch.equal(outs[False], outs[True])
        print(f"{w.name:14s} A {best[False]:8.1f} us  B {best[True]:8.1f} us  "
              f"B/A {best[True] / best[False]:.3f}  bit-equal {equal}  "
              f"relerr A {errs[False]:.2e} B {errs[True]:.2e}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
