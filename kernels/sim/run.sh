#!/usr/bin/env bash
# Builds and runs the kernels under the CPU emulation (kernels/sim/host_sim.h): no GPU, no CUDA.
# `bash kernels/sim/run.sh quick` runs a shorter attention set.
set -euo pipefail
cd "$(dirname "$0")"
out="${TMPDIR:-/tmp}/kd_kernel_sim"
g++ -std=c++17 -O2 -ffp-contract=off -Wall -Wno-unused-function -Wno-unused-variable -Wno-unknown-pragmas -o "$out" sim_test.cpp
"$out" "$@"
