"""Launch spanfill's attention kernel on one core bench workload a few times, for ``ncu``.

Usage (on the GPU machine)::

    ncu --kernel-name regex:_attn_fwd --launch-skip 2 --launch-count 1 --set full \\
        -o report python3 scripts/profile_kernel.py scatter15

Workloads: the names of :func:`bench.workloads.core_workloads` (few_big, many_small,
scatter15, long_32k, few_big_swa, bert_base_512, enc_2k_d128), built exactly as the
bench builds them (same seed, same span placement). Segmented rows launch
``span_prefill`` on the prebuilt layout; padded rows launch the attention kernel alone
(the bench's ``spanfill_kernel`` provider). Layouts and plans are built before the
first launch, so every launch the profiler sees is the attention kernel's.
"""
import sys

import torch

sys.path.insert(0, ".")
from bench.providers_spanfill import spanfill_padded_kernel, spanfill_segmented  # noqa: E402
from bench.workloads import PaddedWorkload, core_workloads  # noqa: E402


def main(name: str, launches: int = 4) -> None:
    device = torch.device("cuda")
    by_name = {w.name: w for w in core_workloads()}
    if name not in by_name:
        raise SystemExit(f"unknown workload {name!r}; one of {sorted(by_name)}")
    w = by_name[name]
    tensors = w.make(device, torch.bfloat16)
    prepare = spanfill_padded_kernel if isinstance(w, PaddedWorkload) else spanfill_segmented
    prepared = prepare(w, tensors)  # launches once (the first launch compiles)
    for _ in range(launches):
        prepared.run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "few_big")
