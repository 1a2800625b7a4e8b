#!/usr/bin/env python3
"""The PyTorch side of `kd-engine bench-kernels`: the same SPEC §5 shapes, timed the same way.

Runs on the GPU machine (PyTorch with CUDA there; nothing to install). For each kernel kd-engine
benchmarks, the PyTorch forms the SPEC's anchors name: softmax-KL eager and torch.compile, relation
loss eager (bf16, and fp32 as upstream LLaVA-KD computes it), causal SDPA forward + backward, SDPA
of one query per row against a KV cache (decoding), fused AdamW (bf16 parameters and states: the
anchor; fp32 parameters and states for comparison). Also the two ceilings, measured the same way as kd-engine measures its own (device copy, bf16 GEMM on
random data). Timing: CUDA events around each run, warm-up first, median of the repeats (METHOD.md);
inputs random, never zero. Peak extra memory per case from torch.cuda.max_memory_allocated.

Prints JSON (keys shared with `kd-engine bench-kernels --json`) and writes it with --json FILE.
Each case is guarded: a failure is recorded as {"error": ...} and the others still run.
"""
import argparse
import json
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

DEV = "cuda"


def timed(fn, warmup=3, reps=20):
    """Median and min milliseconds of fn() with CUDA events around each run."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "reps": reps}


def with_memory(case):
    """Runs case() and adds the peak memory it allocated above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    r = case()
    torch.cuda.synchronize()
    r["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return r


def guard(name, fn, out):
    t0 = time.time()
    try:
        out[name] = fn()
    except Exception as e:  # record and go on: one failing case must not cost the others
        out[name] = {"error": f"{type(e).__name__}: {e}"}
        traceback.print_exc()
    torch.cuda.empty_cache()
    print(f"  {name}: {json.dumps(out[name])} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)


def ceilings(quick):
    n = 2**28 if quick else 2**30
    src = torch.rand(n, device=DEV, dtype=torch.bfloat16) + 0.5
    dst = torch.rand(n, device=DEV, dtype=torch.bfloat16) + 0.5
    t = timed(lambda: dst.copy_(src))
    copy = 2 * 2 * n / (t["median_ms"] * 1e-3) / 1e12
    del src, dst
    s = 4096 if quick else 8192
    a = torch.randn(s, s, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(s, s, device=DEV, dtype=torch.bfloat16)
    t = timed(lambda: a @ b.T)
    gemm = 2 * s**3 / (t["median_ms"] * 1e-3) / 1e12
    return copy, gemm


def kl_loss(s, t, tau=1.0):
    """KL(teacher || student), batchmean, τ² scaling: the SPEC §1 definition, as PyTorch users write it."""
    ls = F.log_softmax(s.float() / tau, dim=-1)
    lt = F.log_softmax(t.float() / tau, dim=-1)
    return F.kl_div(ls, lt, reduction="batchmean", log_target=True) * tau * tau


def softmax_kl_cases(quick, out):
    rows, v = (512, 151936) if quick else (4096, 151936)
    s = ((torch.rand(rows, v, device=DEV) * 16 - 8).to(torch.bfloat16)).requires_grad_(True)
    t = (torch.rand(rows, v, device=DEV) * 16 - 8).to(torch.bfloat16)

    def run(f):
        def step():
            s.grad = None
            f(s, t).backward()
        return step

    guard("eager", lambda: with_memory(lambda: timed(run(kl_loss))), out)
    compiled = torch.compile(kl_loss)
    guard("compile", lambda: with_memory(lambda: timed(run(compiled), warmup=5)), out)


def relation_loss(zs_list, zt_list, dtype):
    losses = []
    for zs, zt in zip(zs_list, zt_list):
        a, b = zs.to(dtype), zt.to(dtype)
        rs, rt = a @ a.T, b @ b.T
        losses.append(1 - F.cosine_similarity(rs.flatten(), rt.flatten(), dim=0))
    return torch.stack(losses).mean()


def relation_cases(quick, out):
    imgs, n, v = (2, 728, 32768) if quick else (4, 728, 151936)
    zs = ((torch.rand(imgs * n, v, device=DEV) * 16 - 8).to(torch.bfloat16)).requires_grad_(True)
    zt = (torch.rand(imgs * n, v, device=DEV) * 16 - 8).to(torch.bfloat16)

    def step(dtype):
        def f():
            zs.grad = None
            relation_loss(list(zs.split(n)), list(zt.split(n)), dtype).backward()
        return f

    guard("eager_bf16", lambda: with_memory(lambda: timed(step(torch.bfloat16))), out)
    guard("eager_fp32", lambda: with_memory(lambda: timed(step(torch.float32), reps=5)), out)


def attention_cases(b, h, s, d, out_fb, out_f, out_b):
    q = torch.randn(b, h, s, d, device=DEV, dtype=torch.bfloat16).requires_grad_(True)
    k = torch.randn(b, h, s, d, device=DEV, dtype=torch.bfloat16).requires_grad_(True)
    v = torch.randn(b, h, s, d, device=DEV, dtype=torch.bfloat16).requires_grad_(True)
    dout = torch.randn(b, h, s, d, device=DEV, dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)

    guard("sdpa", lambda: with_memory(lambda: timed(fwd_bwd)), out_fb)
    guard("sdpa", lambda: timed(fwd), out_f)
    # Backward alone = forward+backward − forward (SDPA's backward cannot run without its forward).
    if "median_ms" in out_fb.get("sdpa", {}) and "median_ms" in out_f.get("sdpa", {}):
        out_b["sdpa"] = {"median_ms": out_fb["sdpa"]["median_ms"] - out_f["sdpa"]["median_ms"], "derived": "fwd+bwd − fwd"}


def decode_cases(r, h, hkv, d, s, out):
    """One new query per row against an s-position KV cache (the decoding step): SDPA, no mask."""
    q = torch.randn(r, h, 1, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(r, hkv, s, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(r, hkv, s, d, device=DEV, dtype=torch.bfloat16)

    def run():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, enable_gqa=hkv != h)

    guard("sdpa", lambda: timed(run), out)


def adamw_cases(quick, out):
    n = 50_000_000 if quick else 494_000_000

    def case(dtype):
        p = torch.nn.Parameter((torch.rand(n, device=DEV) * 0.2 - 0.1).to(dtype))
        p.grad = (torch.rand(n, device=DEV) * 2e-2 - 1e-2).to(dtype)
        opt = torch.optim.AdamW([p], lr=1e-5, fused=True)
        opt.step()  # creates the states
        r = timed(opt.step)
        del opt, p
        return r

    guard("fused_bf16", lambda: with_memory(lambda: case(torch.bfloat16)), out)
    guard("fused_fp32", lambda: with_memory(lambda: case(torch.float32)), out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="the smaller shapes of bench-kernels --quick")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "kernels": {},
    }
    print(f"PyTorch {torch.__version__} on {res['device']}", file=sys.stderr, flush=True)
    try:
        res["copy_tb_s"], res["gemm_tflop_s"] = ceilings(args.quick)
    except Exception as e:
        res["ceilings_error"] = f"{type(e).__name__}: {e}"
    ks = res["kernels"]
    for key in ["softmax_kl", "relation", "adamw_494m"]:
        ks[key] = {}
    softmax_kl_cases(args.quick, ks["softmax_kl"])
    relation_cases(args.quick, ks["relation"])
    for (b, h, s, d) in [(8, 16, 2048, 64), (4, 20, 2048, 128)]:
        s = s // 4 if args.quick else s
        key = f"attn_b{b}h{h}s{s}d{d}"
        ks[key], ks[key + "_fwd"], ks[key + "_bwd"] = {}, {}, {}
        attention_cases(b, h, s, d, ks[key], ks[key + "_fwd"], ks[key + "_bwd"])
    for (r, h, hkv) in [(1, 16, 16), (8, 16, 16), (8, 16, 2)]:
        key = f"decode_r{r}h{h}kv{hkv}d128s4096"
        ks[key] = {}
        decode_cases(r, h, hkv, 128, 4096, ks[key])
    adamw_cases(args.quick, ks["adamw_494m"])
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
