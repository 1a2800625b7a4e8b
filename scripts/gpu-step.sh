#!/usr/bin/env bash
# The DFT-step comparison (SPEC §5, last anchor row), run ON the GPU machine (it has no Rust) from
# the repository root, after scripts/build-gpu-bundle.sh has put the release kd-engine into
# device-bundle/ here. Each with its own timeout so one hang does not cost the rest:
#   1. kd-engine bench-step --device cuda                (fused head, identity relation: default)
#   2. kd-engine bench-step --device cuda --head direct  (full logits, as PyTorch computes them)
#   3. python3 benches/torch_dft_step.py --device cuda   (the same step in PyTorch + transformers,
#      relation Gram in fp32 without TF32 (upstream) and with TF32 (the SPEC's strongest form))
# then one side-by-side table: step time, tok/s, memory (SPEC §5 counting: allocator high-water
# mark; transient = peak − (weights + gradients + optimizer state)), ratios kd-engine / PyTorch and
# the SPEC §5 targets against the strongest PyTorch form.
# Timeouts: 150 + 150 + 200 = 500 s of commands (+ 5 s each to die if one must be killed), under
# 560 s with the rest, so one device call of 600 s holds it. Everything is logged to $OUT (the device tool's folder that comes back;
# /tmp/kd-gpu-step elsewhere): gpu-step.log, kd_fused.json, kd_direct.json, torch.json, table.txt.
# Usage: bash scripts/gpu-step.sh          (STEPS, WARMUP: timed / untimed steps, default 10 / 3)
set -u
cd "$(dirname "$0")/.."
B=${BUNDLE:-device-bundle}
OUT=${OUT:-/tmp/kd-gpu-step}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
mkdir -p "$OUT"
LOG="$OUT/gpu-step.log"
: >"$LOG"
source scripts/gpu-common.sh  # say, step, the GPU line

rm -f "$OUT/kd_fused.json" "$OUT/kd_direct.json" "$OUT/torch.json"
if [ -x "$B/kd-engine" ]; then
  say "== 1. kd-engine bench-step --device cuda (fused head, identity relation), $STEPS steps after $WARMUP"
  step 150 "bench-step|step |tokens/s|peak memory|loss|error|panicked" \
    "$B/kd-engine" bench-step --device cuda --steps "$STEPS" --warmup "$WARMUP" --json "$OUT/kd_fused.json"
  RC_FUSED=$RC; say "bench-step (fused) exit code $RC_FUSED"

  say "== 2. kd-engine bench-step --device cuda --head direct, $STEPS steps after $WARMUP"
  step 150 "bench-step|step |tokens/s|peak memory|loss|error|panicked" \
    "$B/kd-engine" bench-step --device cuda --head direct --steps "$STEPS" --warmup "$WARMUP" --json "$OUT/kd_direct.json"
  RC_DIRECT=$RC; say "bench-step (direct) exit code $RC_DIRECT"
else
  say "missing $B/kd-engine: run scripts/build-gpu-bundle.sh on the build machine and carry device-bundle (the PyTorch side still runs)"
  RC_FUSED=2; RC_DIRECT=2
fi

say "== 3. PyTorch side (benches/torch_dft_step.py --device cuda --gram both), $STEPS steps after $WARMUP"
step 200 "^PyTorch|^  setup|^  gram|^note|Error|error|Traceback" \
  env PYTHONUNBUFFERED=1 python3 benches/torch_dft_step.py --device cuda --gram both --steps "$STEPS" --warmup "$WARMUP" --json "$OUT/torch.json"
RC_TORCH=$RC; say "torch_dft_step exit code $RC_TORCH"
rm -f "$TMP"

say "== side by side"
python3 - "$OUT/kd_fused.json" "$OUT/kd_direct.json" "$OUT/torch.json" <<'PY' 2>&1 | tee "$OUT/table.txt" | tee -a "$LOG"
import json, sys

def load(p):
    try:
        return json.load(open(p))
    except Exception as e:
        print(f"({p}: {e})")
        return None

kf, kdir, pt = (load(p) for p in sys.argv[1:4])
PHASES = ["vision", "teacher_forward", "student_forward", "loss", "backward", "optimizer"]
GIB = 2**30
rows = []  # (name, step_ms, tok/s, memory dict, phases {name: ms}, loss total, note)
short = {}  # name -> column header of the phase table
for name, col, r in [("kd-engine fused/identity", "kd fused", kf), ("kd-engine direct", "kd direct", kdir)]:
    if r:
        short[name] = col
        rows.append((name, r["step_ms"], r["tokens_per_s"], r["memory"], {p: r["phases"][p]["ms"] for p in PHASES},
                     r["loss"]["total"], f"mean of {r['steps']}"))
pt_cases = {}
if pt:
    if "error" in pt:
        print(f"PyTorch setup failed: {pt['error']}")
    print(f"PyTorch {pt.get('torch')}, transformers {pt.get('transformers')} on {pt.get('device')}")
    for g, label, col in [("fp32", "PyTorch upstream (fp32 Gram)", "torch fp32"), ("tf32", "PyTorch strongest (TF32 Gram)", "torch tf32")]:
        short[label] = col
        c = pt.get("cases", {}).get(g)
        if c is None:
            continue
        if "error" in c:
            print(f"{label}: FAILED {c['error']}")
            continue
        pt_cases[g] = c
        rows.append((label, c["step_ms"], c["tokens_per_s"], c["memory"], {p: c["phases"][p]["ms"] for p in PHASES},
                     c["loss"]["total"], f"median of {pt['steps']} (mean {c['step_ms_mean']:.1f})"))
for r in (kf, kdir):
    if r:
        print(f"kd-engine: {r['device']}; {r['shapes']['batch']} x {r['shapes']['seq_len']} tokens, layout {r['shapes']['layout']}, "
              f"{r['tflop_per_step']:.4g} TFLOP/step ({r['head']} head)")
        break
if pt and "shapes" in pt:
    print(f"PyTorch:   {pt['shapes']['batch']} x {pt['shapes']['seq_len']} tokens, layout {pt['shapes']['layout']}, "
          f"{pt['tflop_per_step']:.4g} TFLOP/step (full logits, bench-step --head direct's count)")

g = lambda b: "-" if b is None else f"{b / GIB:.2f}"
print()
print(f"{'':<31} {'step ms':>9} {'tok/s':>9} {'peak':>7} {'weights':>7} {'grads':>6} {'optim':>6} {'transient':>9} {'loss':>8}  (GiB)")
for name, ms, tps, m, _, loss, note in rows:
    print(f"{name:<31} {ms:>9.1f} {tps:>9.0f} {g(m.get('peak_bytes')):>7} {g(m.get('weights_bytes')):>7} "
          f"{g(m.get('grads_bytes')):>6} {g(m.get('optimizer_bytes')):>6} {g(m.get('transient_bytes')):>9} {loss:>8.4f}  {note}")
print()
print(f"{'phase ms':<16}" + "".join(f"{short[n]:>12}" for n, *_ in rows))
for p in PHASES:
    print(f"{p:<16}" + "".join(f"{ph[p]:>12.2f}" for _, _, _, _, ph, _, _ in rows))
print("(kd-engine's loss phase includes the student LM head's backward; PyTorch's backward phase holds it)")

def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b

print()
print("ratios kd-engine / PyTorch (tok/s: > 1 is kd-engine faster; memory: < 1 is kd-engine smaller)")
for name, ms, tps, m, *_ in rows[: len(rows) - len(pt_cases)]:
    for gkey, c in pt_cases.items():
        t = ratio(tps, c["tokens_per_s"])
        pk = ratio(m.get("peak_bytes"), c["memory"]["peak_bytes"])
        tr = ratio(m.get("transient_bytes"), c["memory"]["transient_bytes"])
        f = lambda x: "-" if x is None else f"{x:.2f}x"
        line = f"  {name:<26} vs {gkey} Gram: tok/s {f(t):>7}, peak {f(pk):>7}, transient {f(tr):>7}"
        if gkey == "tf32":  # SPEC §5 targets are against the strongest form
            ok = lambda v, cond: "-" if v is None else ("met" if cond(v) else "NOT met")
            line += (f"   targets: tok/s >= 2x {ok(t, lambda v: v >= 2)}, peak <= 0.6x {ok(pk, lambda v: v <= 0.6)}, "
                     f"transient <= 0.3x {ok(tr, lambda v: v <= 0.3)}")
        print(line)
if not pt_cases or len(rows) == len(pt_cases):
    print("  (no ratio: one side has no result)")
PY

say "== summary: bench-step fused $RC_FUSED, bench-step direct $RC_DIRECT, torch_dft_step $RC_TORCH (0 = ok, 124/137 = timed out)"
[ "$RC_FUSED" = 0 ] && [ "$RC_DIRECT" = 0 ] && [ "$RC_TORCH" = 0 ]
