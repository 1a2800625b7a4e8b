#!/usr/bin/env bash
# Builds and runs the kernels under the CPU emulation (kernels/sim/host_sim.h): no GPU, no CUDA.
# Every case under the default schedule, then the kernels whose warps share shared memory
# (relation, softmax-KL, attention, decode) under the two warp-serial schedules, which turn a
# missing __syncthreads into a wrong result. `bash kernels/sim/run.sh quick` runs a shorter set.
set -euo pipefail
cd "$(dirname "$0")"
out="${TMPDIR:-/tmp}/kd_kernel_sim"
g++ -std=c++17 -O2 -ffp-contract=off -Wall -Wno-unused-function -Wno-unused-variable -Wno-unknown-pragmas -o "$out" sim_test.cpp
"$out" "$@"
for schedule in warps warps-reverse; do
  echo "== schedule $schedule: relation, softmax-KL, attention, decode"
  KD_SIM_SCHEDULE=$schedule "$out" attention
done
