"""Launch the attention kernel on one BENCHMARKS.md workload a few times, for ``ncu``.

Usage (on the GPU machine)::

    ncu --kernel-name regex:_attn_fwd --launch-skip 2 --launch-count 1 --set full \\
        -o report python3 scripts/profile_kernel.py few_big

Workloads: few_big, many_small, long_32k (segmented, paged KV) and enc_2k_d128
(padded). Kernel launches only: layouts and plans are built before the first one.
"""
import random
import sys

import torch

sys.path.insert(0, ".")
import spanfill as sf  # noqa: E402
from tests.helpers import paged_setup  # noqa: E402

SEGMENTED = {"few_big": (8192, 2, 4, 512), "many_small": (8192, 2, 64, 16),
             "long_32k": (32768, 1, 32, 64)}


def main(name: str, launches: int = 4) -> None:
    dev, dtype = "cuda", torch.bfloat16
    rng = random.Random(0)
    if name in SEGMENTED:
        n, b, nspan, slen = SEGMENTED[name]
        slot = n // nspan
        spans = []
        for _ in range(b):
            starts = [i * slot + rng.randint(0, slot - slen) for i in range(nspan)]
            spans.append([(s, s + slen) for s in starts])
        lay, kc, vc, q, kn, vn = paged_setup([n] * b, spans, 16, 32, 8, 128, dtype, dev)
        sf.append_kv(kn, vn, kc, vc, lay)
        for _ in range(launches):
            sf.span_prefill(q, kc, vc, lay)
    else:
        b, s, h, d = 16, 2048, 16, 128
        vl = torch.randint(1, s + 1, (b,), generator=torch.Generator().manual_seed(1)).to(dev)
        qq, kk, vv = (torch.randn(b, s, h, d, device=dev, dtype=dtype) for _ in range(3))
        layout = sf.PaddedLayout.build(vl, s)
        for _ in range(launches):
            sf.padded_prefill(qq, kk, vv, layout)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "few_big")
