#!/usr/bin/env bash
# The GPU check, run ON the GPU machine (it has no Rust) from the repository root, after
# scripts/build-gpu-bundle.sh has put the binaries into device-bundle/ here:
#   1. the CUDA test executable (tests/cuda_ops.rs),   2. kd-engine selftest,
#   2b. the NCCL communicator with 1 rank (kd-engine selftest --nccl),
#   3. kd-engine bench-kernels,                         4. benches/compare_torch.py (PyTorch side),
#   5. decode speed (kd-engine generate --device cuda),
# each with its own timeout so one hang does not cost the rest, then one side-by-side table. When
# a CUDA test family fails, step 1b reruns each failed family alone (KD_CUDA_SYNC=1, and under
# compute-sanitizer memcheck if installed) in step 5's time.
# Everything is logged to $OUT (the device tool's folder that comes back; /tmp/kd-gpu-check
# elsewhere): gpu-check.log, selftest.json, bench.json, torch.json, table.txt.
# Usage: bash scripts/gpu-check.sh [--quick]     (--quick: smaller benchmark shapes)
set -u
cd "$(dirname "$0")/.."
B=${BUNDLE:-device-bundle}
OUT=${OUT:-/tmp/kd-gpu-check}
mkdir -p "$OUT"
QUICK=${1:-}
LOG="$OUT/gpu-check.log"
: >"$LOG"
source scripts/gpu-common.sh  # say, step, the GPU line
[ -x "$B/kd-engine" ] && [ -x "$B/cuda_ops" ] || { say "missing $B/kd-engine or $B/cuda_ops: run scripts/build-gpu-bundle.sh on the build machine and carry device-bundle"; exit 2; }

say "== 1. CUDA tests ($B/cuda_ops)"
step 90 "^test |test result|FAIL|panicked" "$B/cuda_ops" --test-threads 1 --nocapture
RC_TESTS=$RC; say "cuda_ops exit code $RC_TESTS"
# The failed tests, from libtest's closing "failures:" list (with --nocapture a test's "... FAILED"
# is not on the line of its name).
FAILED_FAMILIES=$(awk '/^failures:$/ {n = 0; next} /^    [a-z_]+$/ {names[n++] = $1} END {for (i = 0; i < n; i++) print names[i]}' "$TMP" | sort -u)
if [ "$RC_TESTS" != 0 ] && [ -n "$FAILED_FAMILIES" ]; then
  # A kernel fault poisons the context, so every family after it fails too: rerun each failed
  # family alone, synchronising after every launch (the fault is then reported at the launch that
  # caused it), and under compute-sanitizer memcheck where the machine has it. This takes the
  # decode-speed step's 100 s (step 5 is skipped), so the whole script still fits 580 s.
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  say "== 1b. failed families alone: $(echo $FAILED_FAMILIES) (sanitizer: ${SAN:-none})"
  END=$((SECONDS + 100))
  for fam in $FAILED_FAMILIES; do
    [ $((END - SECONDS)) -gt 10 ] || { say "(no time left for $fam)"; continue; }
    KD_CUDA_SYNC=1 step $(( (END - SECONDS) < 30 ? END - SECONDS : 30 )) "^test |FAIL|error|rel err" "$B/cuda_ops" --exact "$fam" --nocapture
    if [ -n "$SAN" ] && [ $((END - SECONDS)) -gt 10 ]; then
      step $((END - SECONDS)) "ERROR SUMMARY|Invalid|out of bounds|at 0x|by thread" "$SAN" --tool memcheck --print-limit 10 "$B/cuda_ops" --exact "$fam"
    fi
  done
  SKIP_DECODE=1
fi

say "== 2. kd-engine selftest"
step 60 "FAIL|passed, .* failed|skipped|^selftest|error" "$B/kd-engine" selftest --json "$OUT/selftest.json"
RC_SELF=$RC; say "selftest exit code $RC_SELF"

say "== 2b. NCCL communicator, 1 rank (kd-engine selftest --nccl)"
# cudarc opens libnccl.so; PyTorch's nvidia-nccl wheel ships only libnccl.so.2: link it in a
# folder of our own on LD_LIBRARY_PATH.
NCCL_LIB=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so/ {print $NF; exit}')
[ -n "$NCCL_LIB" ] || NCCL_LIB=$(python3 -c "import glob, site; print(next(iter(sorted(p for d in site.getsitepackages() for p in glob.glob(d + '/nvidia/**/libnccl.so*', recursive=True))), ''))" 2>/dev/null)
NCCL_DIR=$(mktemp -d)
[ -n "$NCCL_LIB" ] && ln -sf "$NCCL_LIB" "$NCCL_DIR/libnccl.so"
say "libnccl: ${NCCL_LIB:-not found}"
LD_LIBRARY_PATH="$NCCL_DIR:${LD_LIBRARY_PATH:-}" step 15 "^nccl|error|panicked" "$B/kd-engine" selftest --nccl
RC_NCCL=$RC; say "selftest --nccl exit code $RC_NCCL"

say "== 3. kd-engine bench-kernels $QUICK"
step 140 "error|panicked" "$B/kd-engine" bench-kernels --json "$OUT/bench.json" $QUICK
RC_BENCH=$RC; say "bench-kernels exit code $RC_BENCH"

say "== 4. PyTorch side (benches/compare_torch.py $QUICK)"
PYTHONUNBUFFERED=1 step 175 "Error|error|Traceback" python3 benches/compare_torch.py --json "$OUT/torch.json" $QUICK
RC_TORCH=$RC; say "compare_torch exit code $RC_TORCH"

if [ -n "${SKIP_DECODE:-}" ]; then
  say "== 5. decode speed: skipped (its time went to step 1b)"
  RC_DECODE=skipped
else
  say "== 5. decode speed: kd-engine generate on a random Qwen1.5-0.5B (bf16), 512-token prompt, 256 new tokens"
  # Issue 7's GPU figure: the KV-cache decode path with the CUDA decode-attention kernel. The model
  # goes to /tmp (1 GB), not $OUT (which comes back).
  M=/tmp/kd-qwen1.5-0.5b
  rm -rf "$M"
  step 40 "error" "$B/kd-engine" init --preset qwen1.5-0.5b --out "$M"
  step 60 "prefill|decode|error|panicked" "$B/kd-engine" generate --model "$M" --device cuda --input-ids "$(seq -s, 1 512)" --max-new-tokens 256 --json
  RC_DECODE=$RC; say "generate exit code $RC_DECODE"
fi
rm -f "$TMP"

say "== side by side"
python3 - "$OUT/bench.json" "$OUT/torch.json" <<'PY' 2>&1 | tee "$OUT/table.txt" | tee -a "$LOG"
import json, sys
def load(p):
    try:
        return json.load(open(p))
    except Exception as e:
        print(f"({p}: {e})")
        return None
kd, pt = load(sys.argv[1]), load(sys.argv[2])
if kd:
    print(f"kd-engine: {kd['device']}; ceilings copy {kd['copy_tb_s']:.2f} TB/s, bf16 GEMM {kd['gemm_tflop_s']:.0f} TFLOP/s")
if pt:
    c, g = pt.get("copy_tb_s"), pt.get("gemm_tflop_s")
    print(f"PyTorch {pt.get('torch')}: {pt.get('device')}; ceilings copy {c and round(c, 2)} TB/s, bf16 GEMM {g and round(g)} TFLOP/s")
if not kd:
    sys.exit(0)
tk = (pt or {}).get("kernels", {})
print(f"{'kernel':<24} {'kd ms':>9} {'rate':>15} {'of ceil':>7}  {'PyTorch ms (variant)':<44} {'speedup':>7}  target")
for k in kd["kernels"]:
    key = k["key"]
    variants = {n: v["median_ms"] for n, v in tk.get(key, {}).items() if isinstance(v, dict) and "median_ms" in v}
    errors = [n for n, v in tk.get(key, {}).items() if isinstance(v, dict) and "error" in v]
    best = min(variants.items(), key=lambda x: x[1]) if variants else None
    torch_txt = ", ".join(f"{n} {ms:.3f}" for n, ms in variants.items()) + (f" [failed: {', '.join(errors)}]" if errors else "")
    speed = f"{best[1] / k['median_ms']:.2f}x" if best else "-"
    target = f"<= {k['target_ms']} ms: {'met' if k['median_ms'] <= k['target_ms'] else 'NOT met'}" if k.get("target_ms") else ""
    if key.startswith("attn_") and not key.endswith(("_fwd", "_bwd")) and "sdpa" in variants:
        r = variants["sdpa"] / k["median_ms"]
        target = f">= 0.6x SDPA: {'met' if r >= 0.6 else 'NOT met'} ({r:.2f}x)"
    if key == "adamw_494m":
        target = f">= 85% of copy: {'met' if k['fraction'] >= 0.85 else 'NOT met'}"
    rate = f"{k['rate']:.2f} {k['unit']}"
    print(f"{key:<24} {k['median_ms']:>9.3f} {rate:>15} {100 * k['fraction']:>6.0f}%  {torch_txt[:44]:<44} {speed:>7}  {target}")
print("speedup = fastest PyTorch variant's median / kd-engine's median (> 1: kd-engine faster)")
PY

say "== summary: cuda_ops $RC_TESTS, selftest $RC_SELF, nccl $RC_NCCL, bench-kernels $RC_BENCH, compare_torch $RC_TORCH, generate $RC_DECODE (0 = ok, 124 = timed out)"
[ "$RC_TESTS" = 0 ] && [ "$RC_SELF" = 0 ] && [ "$RC_NCCL" = 0 ] && [ "$RC_BENCH" = 0 ] && [ "$RC_TORCH" = 0 ] && [ "$RC_DECODE" = 0 ]
