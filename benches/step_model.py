#!/usr/bin/env python3
"""The modelled time of one training step on an H200, from the operations kd-engine really issues.

Input: the simulated CUDA device's trace of `bench-step` at the anchor's full sizes, taken without
computing anything (KD_SIM_COUNT_ONLY=1: every launch, GEMM, memset and copy is checked, counted
and traced, no kernel runs, device memory is untouched address space):

    mkdir -p /tmp/anchor-trace
    KD_CUDA_SIM=1 KD_SIM_COUNT_ONLY=1 KD_SIM_DEVICE_MEMORY_MIB=143360 KD_SIM_TRACE=/tmp/anchor-trace \
        ./target/release/kd-engine bench-step --device cuda --no-phase-sync --steps 1 --warmup 1
    python3 benches/step_model.py /tmp/anchor-trace/*.trace

Each operation of the timed step costs max(bytes / 4.0 TB/s, FLOPs / 600 TFLOP/s) (SPEC §5's H200
ceilings; a roofline: every kernel at the ceiling it is bound by, no launch gaps). What counts:

- GEMM: A and B read once, C written (read too when beta != 0), 2·m·n·k FLOPs (the trace's own).
- Flash attention: the trace's buffer bytes; FLOPs 4·L²·d per head and sequence forward (QKᵀ, PV),
  10·L²·d backward (five products), halved when causal, with L the launch's max_seqlen (every
  sequence of the anchor batch is full length).
- Kernels whose traffic the buffers alone misstate get their own count from their arguments:
  AdamW reads and writes the parameter and both moments and reads the gradient (22 B per element,
  30 with f32 master weights), in-place kernels (residual and bias adds, RoPE) read and write their
  first buffer, sum-of-squares and the dQ conversion read their n elements through views. Every other kernel: each buffer it is handed,
  once (`bytes=` in the trace; a view is charged to its buffer's end, listed below).
- Memsets write their bytes; device-to-device copies read and write them.

It is a model, not a measurement: real kernels reach a fraction of the ceilings (benches/METHOD
and `kd-engine bench-kernels` measure that fraction on a GPU), and launches cost ~2–4 µs of CPU
each, hidden only while the GPU queue is ahead of the host.
"""
import collections
import re
import sys

BW = 4.0e12  # B/s, H200 HBM3e (SPEC §5)
PEAK = 600e12  # FLOP/s, dense bf16 achievable (SPEC §5)
TORCH_MS = 214.6  # SPEC §5: PyTorch's anchor DFT step on the H200
# Kernels that update their first buffer in place (read and written).
IN_PLACE = {"add_assign_bf16", "add_bias_bf16", "scale_bf16"}


def parse_args(s):
    """The launch's arguments: buffers as (bytes, is_view), numbers as floats."""
    out = []
    for a in s.split(","):
        if a.startswith("@"):
            out.append((int(a[1:].rstrip("v")), a.endswith("v")))
        else:
            try:
                out.append(float(a))
            except ValueError:
                out.append(None)
    return out


def launch_cost(name, handed, args):
    """(bytes, flops, counted_from) for one launch."""
    m = re.match(r"flash_attn_(fwd|bwd)_bf16_d(\d+)$", name)
    if m:
        # (q, k, v, o|dout, ..., cu_seqlens, n_seqs, max_seqlen, n_heads, n_kv_heads, causal, scale)
        n_seqs, L, heads, _kv, causal = args[-6:-1]
        d = int(m.group(2))
        per = (4 if m.group(1) == "fwd" else 10) * L * L * d * heads * n_seqs
        return handed, per * (0.5 if causal else 1.0), "buffers"
    if name == "adamw_bf16":
        n = args[5]
        master = args[4][0] > 0
        return (30 if master else 22) * n, 0.0, "formula"
    if name == "sum_squares_bf16":
        return 2 * args[1], 0.0, "formula"
    if name == "flash_attn_dq_to_bf16":
        return 6 * args[2], 0.0, "formula"
    if name in IN_PLACE:
        return handed + args[0][0], 0.0, "formula"  # the first buffer is read and written
    return handed, 0.0, "buffers"


def family(name):
    """Kernels grouped by what they do (each size/variant of a kernel in one row)."""
    for prefix in ("flash_attn_fwd", "flash_attn_bwd", "rmsnorm", "layernorm", "softmax_kl", "softmax_div", "relation", "embedding",
                   "swiglu", "gelu", "bias_grad", "sum_"):
        if name.startswith(prefix):
            return prefix + "*"
    return name


def main(paths):
    lines = []
    for p in paths:
        with open(p) as f:
            lines += f.read().splitlines()
    starts = [i for i, l in enumerate(lines) if l.startswith("mark step ") and l.endswith("timed")]
    if not starts:
        sys.exit("no timed step in the trace (bench-step marks 'mark step N timed'; run it with KD_SIM_TRACE)")
    step = lines[starts[0] + 1 : starts[1] if len(starts) > 1 else len(lines)]
    phase = "vision"
    rows = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])  # family -> launches, bytes, flops, seconds
    phases = collections.defaultdict(lambda: [0.0, 0.0, 0.0])  # phase -> bytes, flops, seconds
    views = collections.Counter()
    n_launch = 0
    for l in step:
        w = l.split()
        kind = w[0]
        kv = dict(x.split("=", 1) for x in w[1:] if "=" in x)
        if kind == "mark":
            if w[1] == "end":
                phase = {"vision": "teacher_forward", "teacher_forward": "student_forward", "student_forward": "loss",
                         "loss": "backward", "backward": "optimizer"}.get(w[2], w[2])
            continue
        if kind == "launch":
            n_launch += 1
            args = parse_args(kv.get("args", ""))
            b, fl, how = launch_cost(w[1], float(kv["bytes"]), args)
            if how == "buffers" and any(isinstance(a, tuple) and a[1] for a in args):
                views[w[1]] += 1
            key = family(w[1])
        elif kind == "gemm":
            b, fl, key = float(kv["bytes"]), float(kv["flops"]), f"GEMM ({phase})"
        elif kind in ("memset", "htod", "dtoh", "dtod"):
            b, fl, key = float(kv["bytes"]) * (2 if kind == "dtod" else 1), 0.0, kind
            if kind in ("htod", "dtoh"):
                b = 0.0  # PCIe, overlapped or a few bytes: not HBM time
        else:
            continue  # events, stream waits
        t = max(b / BW, fl / PEAK)
        r = rows[key]
        r[0] += 1
        r[1] += b
        r[2] += fl
        r[3] += t
        p = phases[phase]
        p[0] += b
        p[1] += fl
        p[2] += t
    total = sum(r[3] for r in rows.values())
    print("| operation | count | GB | TFLOP | modelled ms | bound by |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for k, r in sorted(rows.items(), key=lambda kv: -kv[1][3]):
        bound = "FLOPs" if r[2] / PEAK > r[1] / BW else "bytes"
        print(f"| {k} | {r[0]} | {r[1] / 1e9:.2f} | {r[2] / 1e12:.2f} | {r[3] * 1e3:.2f} | {bound} |")
    print(f"| **step** | {sum(r[0] for r in rows.values())} | {sum(r[1] for r in rows.values()) / 1e9:.1f} | "
          f"{sum(r[2] for r in rows.values()) / 1e12:.1f} | **{total * 1e3:.1f}** | |")
    print()
    print("| phase | GB | TFLOP | modelled ms |")
    print("| --- | ---: | ---: | ---: |")
    for k, p in phases.items():
        print(f"| {k} | {p[0] / 1e9:.1f} | {p[1] / 1e12:.2f} | {p[2] * 1e3:.1f} |")
    print()
    print(f"{n_launch} launches; modelled step {total * 1e3:.1f} ms against PyTorch's {TORCH_MS} ms (SPEC §5): "
          f"{TORCH_MS / (total * 1e3):.2f}x at the roofline")
    if views:
        print("kernels charged for views to their buffers' ends (an overcount): " + ", ".join(f"{k} ×{n}" for k, n in sorted(views.items())))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
