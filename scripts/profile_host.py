"""Host time per call of the padded and span entry points (no device sync), for tuning.

Prints microseconds of host time per call for ``padded_prefill`` on bert_base_512
(through a PaddedLayout), for the bare ``attention_fwd`` launch it makes, and the
top of a cProfile of the entry point. A call whose host time exceeds its kernel
time makes back-to-back timing host-bound.
"""
import cProfile
import pstats
import sys
import time

import torch

sys.path.insert(0, ".")
import spanfill as sf  # noqa: E402
from spanfill.backends import dense_problem, select_backend  # noqa: E402
from spanfill.kernels import attention_fwd  # noqa: E402


def host_us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def main() -> None:
    dev, dtype = "cuda", torch.bfloat16
    b, s, h, d = 64, 512, 12, 64
    vl = torch.randint(1, s + 1, (b,), generator=torch.Generator().manual_seed(1)).to(dev)
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=dtype) for _ in range(3))
    layout = sf.PaddedLayout.build(vl, s)
    print(f"padded_prefill (PaddedLayout): {host_us(lambda: sf.padded_prefill(q, k, v, layout)):.1f} us")
    qr, kr, vr = (x.reshape(b * s, h, d) for x in (q, k, v))
    problem = dense_problem("padded", qr, kr, vr, b, s, False)
    chosen, _ = select_backend(problem)
    launch = chosen.select_config(problem)
    cfg = launch.tile
    plan = layout.tile_plan(cfg.block_q, False)
    out = torch.empty_like(qr)
    print(f"attention_fwd alone: {host_us(lambda: attention_fwd(qr, kr, vr, out, None, plan, launch, d ** -0.5, False, zero_fill=True)):.1f} us")
    print(f"torch.empty_like: {host_us(lambda: torch.empty_like(qr)):.1f} us")
    from spanfill import ops
    pieces = {
        "checks (3 tensors + qkv)": lambda: (ops._check_tensor("q", q, 4), ops._check_tensor("k", k, 4),
                                             ops._check_tensor("v", v, 4),
                                             ops._check_qkv(q, k, v, ("q", "k", "v"))),
        "layout.device != q.device": lambda: layout.device != q.device,
        "dense_problem + select_backend": lambda: select_backend(
            dense_problem("padded", qr, kr, vr, b, s, False)),
        "_check_variant + _scale": lambda: (ops._check_variant(-1, 0.0), ops._scale(d, None)),
        "3 reshapes": lambda: (q.reshape(b * s, h, d), k.reshape(b * s, h, d), v.reshape(b * s, h, d)),
        "select_config": lambda: chosen.select_config(problem),
        "tile_plan (cached)": lambda: layout.tile_plan(cfg.block_q, False),
        "out.view": lambda: out.view(q.shape),
    }
    import spanfill.kernels.attention as attn
    captured = {}
    real = attn._attn_fwd_kernel

    class Capture:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                captured.update(grid=grid, args=args, kwargs=kwargs)
                return real[grid](*args, **kwargs)
            return launch

    attn._attn_fwd_kernel = Capture()
    attention_fwd(qr, kr, vr, out, None, plan, launch, d ** -0.5, False, zero_fill=True)
    attn._attn_fwd_kernel = real
    pieces["bare Triton launch (args prebuilt)"] = lambda: real[captured["grid"]](
        *captured["args"], **captured["kwargs"])
    for label, fn in pieces.items():
        print(f"{label}: {host_us(fn, 2000):.2f} us")

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    attn._attn_fwd_kernel = NoLaunch()
    print(f"padded_prefill, launch stubbed out: {host_us(lambda: sf.padded_prefill(q, k, v, layout)):.1f} us")
    print(f"attention_fwd, launch stubbed out: {host_us(lambda: attention_fwd(qr, kr, vr, out, None, plan, launch, d ** -0.5, False, zero_fill=True)):.1f} us")
    attn._attn_fwd_kernel = real
    print(f"padded_prefill again: {host_us(lambda: sf.padded_prefill(q, k, v, layout)):.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        sf.padded_prefill(q, k, v, layout)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
