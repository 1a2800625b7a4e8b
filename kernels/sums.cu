// sums.cu: adds a device array's sum into one f64 slot of a training step's loss sums.
//
// What it computes: out[0] += Σ_{i<n} in[i], in f64, for in = f32 (per-row losses of
// cross_entropy_bf16 and softmax_kl_bf16) or f64 (the per-block partials of sum_squares_bf16).
//
// Shapes: in [n] (n ≥ 0, 64-bit), out one double (a slot of the backend's sums buffer).
//
// Launch configuration: grid = (1, 1, 1), block = (SUMS_THREADS = 256, 1, 1), static shared
// memory 2 KB, dynamic 0.
//
// Why this way: a loss op used to read its per-row values back and sum them on the host, one host
// wait per op (~20 per training step). Summing on the device and reading all of a step's sums
// back once keeps the host from waiting on the GPU mid-step. One block: the arrays are short (a
// chunk's rows, ≤ ~1000 partials), so the launch, not the sum, is the cost, and a single block
// needs no second pass or atomics. The order is fixed (each thread sums a strided subset, then a
// shared-memory tree), so the result has the same bits every run.
#include "common.cuh"

#define SUMS_THREADS 256

template <typename T>
__device__ __forceinline__ void sum_into(const T* __restrict__ in, long long n, double* __restrict__ out) {
    __shared__ double sh[SUMS_THREADS];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += SUMS_THREADS) acc += (double)in[i];
    acc = block_sum_f64(acc, sh);
    if (threadIdx.x == 0) *out += acc;
}

extern "C" __global__ void __launch_bounds__(SUMS_THREADS) sum_into_f64_from_f32(const float* in, long long n, double* out) {
    sum_into(in, n, out);
}

extern "C" __global__ void __launch_bounds__(SUMS_THREADS) sum_into_f64_from_f64(const double* in, long long n, double* out) {
    sum_into(in, n, out);
}
