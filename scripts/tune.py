"""Time the attention kernel over a grid of tile configs on the BENCHMARKS.md shapes.

Kernel time only (layouts and plans built outside the timed region). Used to fill
the table in spanfill/backends/triton_config.py; the benchmark suite (bench/) is what
the README quotes.
"""
import os
import random
import re
import sys

import torch
import triton

sys.path.insert(0, ".")
import spanfill as sf
from spanfill.backends.triton_config import AttentionConfig, _stacked_heads, launch_config
from spanfill.kernels import attention_fwd
from spanfill.testing import rel_err
from tests.helpers import paged_setup

dev, dtype = "cuda", torch.bfloat16
rng = random.Random(0)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median")


def span_workload(name, n, B, nspan, slen):
    spans = []
    for _ in range(B):
        if name == "scatter15":
            req, cur = [], 0
            while True:
                cur += int(rng.expovariate(1 / 25.0))
                ln = rng.randint(1, 8)
                if cur + ln > n:
                    break
                req.append((cur, cur + ln)); cur += ln + 1
            spans.append(req)
        else:
            slot = n // nspan
            spans.append([(i * slot + (s := rng.randint(0, slot - slen)), i * slot + s + slen) for i in range(nspan)])
    return paged_setup([n] * B, spans, 16, 32, 8, 128, dtype, dev)


cfgs_128 = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)]
cfgs_64 = [(128, 32, 4, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)]
if os.environ.get("TUNE_CONFIGS"):  # e.g. "128x128w8s3,64x64w4s2": one list for every head dim
    cfgs_128 = cfgs_64 = [tuple(int(x) for x in re.split("[xws]", c))
                          for c in os.environ["TUNE_CONFIGS"].split(",")]


def checked(out, expect, label):
    err = rel_err(out, expect)
    if not err < 2e-2:
        print("WRONG RESULT", label, err)
    return err
rows = []
only = sys.argv[1:] or None
for name, n, B, nspan, slen in (("few_big", 8192, 2, 4, 512), ("many_small", 8192, 2, 64, 16),
                                ("scatter15", 8192, 2, 0, 0), ("long_32k", 32768, 1, 32, 64)):
    if only and name not in only:
        continue
    lay, kc, vc, q, kn, vn = span_workload(name, n, B, nspan, slen)
    sf.append_kv(kn, vn, kc, vc, lay)
    flops = 4 * 32 * 128 * (lay.positions.long() + 1).sum().item()
    out = torch.empty_like(q)
    expect = sf.span_prefill(q, kc, vc, lay)
    for bm, bn, w, st in cfgs_128:
        cfg = AttentionConfig(bm, bn, _stacked_heads(4, bm, 16), w, st)
        plan = lay.tile_plan(cfg.block_q, True)
        try:
            handle = attention_fwd(q, kc, vc, out, None, plan, launch_config(cfg, dtype, 128), 128 ** -0.5, True,
                                   positions=lay.positions, block_table=lay.block_table)
            print(cfg, "regs", getattr(handle, "n_regs", "?"), "spills", getattr(handle, "n_spills", "?"),
                  "smem", getattr(getattr(handle, "metadata", None), "shared", "?"))
            t = bench(lambda: attention_fwd(q, kc, vc, out, None, plan, launch_config(cfg, dtype, 128), 128 ** -0.5, True,
                                            positions=lay.positions, block_table=lay.block_table))
        except Exception as e:  # a config that does not fit (shared memory) is skipped
            print(name, cfg, "failed:", type(e).__name__, str(e)[:80]); continue
        checked(out, expect, (name, cfg))
        rows.append((name, f"{bm}x{bn} w{w} s{st}", t, flops / t / 1e9))
        print(rows[-1], flush=True)

for name, B, S, H, D in (("bert_base_512", 64, 512, 12, 64), ("enc_2k_d128", 16, 2048, 16, 128)):
    if only and name not in only:
        continue
    g = torch.Generator().manual_seed(1)
    vl = torch.randint(1, S + 1, (B,), generator=g).to(dev)
    qq = torch.randn(B, S, H, D, device=dev, dtype=dtype); kk = torch.randn_like(qq); vv = torch.randn_like(qq)
    fl = 4 * H * D * (vl.long() ** 2).sum().item()
    layout = sf.PaddedLayout.build(vl, S)
    t_api = bench(lambda: sf.padded_prefill(qq, kk, vv, layout))
    rows.append((name, "api(default cfg)", t_api, fl / t_api / 1e9)); print(rows[-1], flush=True)
    qr, kr, vr = (x.reshape(B * S, H, D) for x in (qq, kk, vv))
    out = torch.empty_like(qr)
    expect = sf.padded_prefill(qq, kk, vv, layout).reshape(B * S, H, D)
    for bm, bn, w, st in (cfgs_64 if D == 64 else cfgs_128):
        cfg = AttentionConfig(bm, bn, 1, w, st)
        plan = layout.tile_plan(cfg.block_q, False)
        try:
            t = bench(lambda: attention_fwd(qr, kr, vr, out, None, plan, launch_config(cfg, dtype, D), D ** -0.5, False, zero_fill=True))
        except Exception as e:
            print(name, cfg, "failed:", type(e).__name__, str(e)[:80]); continue
        checked(out, expect, (name, cfg))
        rows.append((name, f"{bm}x{bn} w{w} s{st}", t, fl / t / 1e9)); print(rows[-1], flush=True)
    from torch.nn.attention import sdpa_kernel, SDPBackend
    qt, kt, vt = (x.transpose(1, 2) for x in (qq, kk, vv))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
    rows.append((name, "sdpa cudnn no mask (padded work)", t, fl / t / 1e9)); print(rows[-1])

print("\n| workload | config | ms | TF/s |\n|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.0f} |")
