"""Quick GPU check of every op against the reference, plus rough timings (not the bench)."""
import random, sys, time
import torch, triton
sys.path.insert(0, ".")
import spanfill as sf
from spanfill import reference as ref
from tests.helpers import paged_setup, relerr, random_spans

dev = "cuda"
torch.manual_seed(0)
rng = random.Random(0)
fails = 0
# Each distinct (dtype, D, group, causal) compiles new kernels (~1-2 s each): keep it small.
FULL = "--full" in sys.argv
cases = [(dt, d, h, c) for dt in (torch.float16, torch.bfloat16, torch.float32)
         for d in ((32, 64, 80, 96, 128, 256) if FULL else (64, 128))
         for h in (((4, 4), (8, 2), (8, 1)) if FULL else ((8, 2),)) for c in (True, False)]
for dtype, d, (hq, hk), causal in cases:
                if "--perf-only" in sys.argv:
                    break
                t0 = time.time()
                seq = [rng.randint(1, 300) for _ in range(3)]
                spans = [random_spans(rng, s, 6, 40) for s in seq]
                lay, kc, vc, q, kn, vn = paged_setup(seq, spans, rng.choice([1, 16, 64]), hq, hk, d, dtype, dev)
                sf.append_kv(kn, vn, kc, vc, lay)
                o, l = sf.span_prefill(q, kc, vc, lay, causal=causal, return_lse=True)
                ro, rl = ref.span_prefill(q, kc, vc, lay.positions, lay.query_start_loc, lay.seq_lens, lay.block_table, causal)
                e = relerr(o, ro) if lay.num_tokens else 0.0
                tol = {torch.float16: 5e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
                B, S = 3, 200
                qq = torch.randn(B, S, hq, d, device=dev, dtype=dtype); kk = torch.randn(B, S, hk, d, device=dev, dtype=dtype); vv = torch.randn_like(kk)
                vl = torch.tensor([0, 200, 77], device=dev)
                side = rng.choice(["left", "right"])
                po, pl = sf.padded_prefill(qq, kk, vv, vl, causal=causal, padding_side=side, return_lse=True)
                rpo, rpl = ref.padded_prefill(qq, kk, vv, vl, causal, side)
                e2 = relerr(po, rpo)
                ok = e < tol and e2 < tol and (l - rl).abs().nan_to_num(0).max() < 1e-2
                if not ok:
                    fails += 1
                    print("FAIL", dtype, d, hq, hk, causal, e, e2)
                print(f"case {dtype} D={d} {hq}/{hk} causal={causal}: span {e:.1e} padded {e2:.1e} ({time.time() - t0:.1f}s)", flush=True)
print("correctness fails:", fails)

# rough timing: few_big-like and bert-like
def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

hq, hk, d, P = 32, 8, 128, 16
dtype = torch.bfloat16
for name, n, nspan, slen in (("few_big", 8192, 4, 512), ("many_small", 8192, 64, 16), ("long_32k", 32768, 32, 64)):
    B = 1 if n > 8192 else 2
    spans = []
    for b in range(B):
        slot = n // nspan
        spans.append([(i * slot + (s := rng.randint(0, slot - slen)), i * slot + s + slen) for i in range(nspan)])
    lay, kc, vc, q, kn, vn = paged_setup([n] * B, spans, P, hq, hk, d, dtype, dev)
    sf.append_kv(kn, vn, kc, vc, lay)
    flops = 4 * hq * d * (lay.positions.long() + 1).sum().item()
    t = bench(lambda: sf.span_prefill(q, kc, vc, lay))
    qd = torch.randn(1, hq, n, d, device=dev, dtype=dtype); kd = torch.randn(1, hq, n, d, device=dev, dtype=dtype)
    from torch.nn.attention import sdpa_kernel, SDPBackend
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        td = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, kd, is_causal=True))
    fd = 4 * hq * d * n * (n + 1) / 2
    print(f"{name}: spanfill {t:.3f} ms {flops/t/1e9:.0f} TF/s | cudnn dense causal {fd/td/1e9:.0f} TF/s")
for name, B, S, H, D in (("bert_base_512", 64, 512, 12, 64), ("enc_2k_d128", 16, 2048, 16, 128)):
    g = torch.Generator().manual_seed(1)
    vl = torch.randint(1, S + 1, (B,), generator=g).to(dev)
    qq = torch.randn(B, S, H, D, device=dev, dtype=dtype); kk = torch.randn_like(qq); vv = torch.randn_like(qq)
    t = bench(lambda: sf.padded_prefill(qq, kk, vv, vl))
    fl = 4 * H * D * (vl.long() ** 2).sum().item()
    print(f"{name}: spanfill {t:.3f} ms {fl/t/1e9:.0f} TF/s")
