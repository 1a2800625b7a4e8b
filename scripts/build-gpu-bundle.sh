#!/usr/bin/env bash
# Builds, HERE (a machine with Rust, no GPU needed), what the GPU machine runs: the release
# kd-engine and the CUDA test executable (tests/cuda_ops.rs), both with the kernels compiled by
# the pinned nvcc, stripped, plus the scripts, into device-bundle/ (git-ignored; under 64 MiB).
# Then run scripts/gpu-check.sh there with device-bundle carried (benches/RESULTS.md says how).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/nvcc-env.sh
echo "nvcc: $NVCC" >&2
export KD_REQUIRE_KERNELS=1
# The path of the executable cargo built for target NAME (from its JSON messages on stdin).
executable() {
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1"
}
bin=$(cargo build --release --bin kd-engine --message-format=json-render-diagnostics | executable kd-engine)
exe=$(cargo test --release --no-run --test cuda_ops --message-format=json-render-diagnostics | executable cuda_ops)
[ -n "$bin" ] && [ -n "$exe" ] || { echo "could not find the built kd-engine / cuda_ops executables" >&2; exit 1; }
rm -rf device-bundle
mkdir -p device-bundle
cp "$bin" device-bundle/kd-engine
cp "$exe" device-bundle/cuda_ops
strip device-bundle/kd-engine device-bundle/cuda_ops
cp scripts/gpu-check.sh benches/compare_torch.py device-bundle/
( cd device-bundle && sha256sum kd-engine cuda_ops > SHA256SUMS )
size=$(du -sm device-bundle | cut -f1)
ls -la device-bundle
echo "device-bundle: ${size} MiB (the device tool carries at most 64 MiB with the working tree)"
[ "$size" -lt 56 ] || { echo "device-bundle is too large to travel" >&2; exit 1; }
# The binaries must say they hold kernels (the GPU machine cannot rebuild them).
grep -q -a "flash_attn_fwd_bf16_d64" device-bundle/kd-engine && grep -q -a "flash_attn_fwd_bf16_d64" device-bundle/cuda_ops || { echo "the binaries were built without kernels" >&2; exit 1; }
