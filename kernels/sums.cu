// sums.cu: adds a device array's sum into one f64 slot of a training step's loss sums.
//
// What it computes: out[0] += Σ_{i<n} in[i], in f64, for in = f32 (per-row losses of
// cross_entropy_bf16 and softmax_kl_bf16) or f64 (the per-block partials of sum_squares_bf16);
// sum_terms_into_f64 does the same for the fused head's terms at once, each over the rows that
// belong to it (a bit mask per row).
//
// Shapes: in [n] (n ≥ 0, 64-bit), out one double (a slot of the backend's sums buffer).
//
// Launch configuration: grid = (1, 1, 1) (sum_terms_into_f64: (4, 1, 1)), block =
// (SUMS_THREADS = 256, 1, 1), static shared memory 2 KB, dynamic 0.
//
// Why this way: a loss op used to read its per-row values back and sum them on the host, one host
// wait per op (~20 per training step). Summing on the device and reading all of a step's sums
// back once keeps the host from waiting on the GPU mid-step. One block: the arrays are short (a
// chunk's rows, ≤ ~1000 partials), so the launch, not the sum, is the cost, and a single block
// needs no second pass or atomics. The order is fixed (each thread sums a strided subset, then a
// shared-memory tree), so the result has the same bits every run.
#include "common.cuh"

#define SUMS_THREADS 256

// *out += Σ in[i] over i < n with (bits == NULL or bits[i] has bit `bit`).
template <typename T>
__device__ __forceinline__ void sum_into(const T* __restrict__ in, const int* __restrict__ bits, int bit, long long n,
                                         double* __restrict__ out) {
    __shared__ double sh[SUMS_THREADS];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += SUMS_THREADS)
        if (bits == nullptr || (bits[i] >> bit) & 1) acc += (double)in[i];
    acc = block_sum_f64(acc, sh);
    if (threadIdx.x == 0) *out += acc;
}

extern "C" __global__ void __launch_bounds__(SUMS_THREADS) sum_into_f64_from_f32(const float* in, long long n, double* out) {
    sum_into(in, (const int*)nullptr, 0, n, out);
}

extern "C" __global__ void __launch_bounds__(SUMS_THREADS) sum_into_f64_from_f64(const double* in, long long n, double* out) {
    sum_into(in, (const int*)nullptr, 0, n, out);
}

// The fused head's per-term sums of one chunk launch (softmax_kl_bf16 over every row of the
// chunk): block b < 3 adds Σ kl[i] over the rows whose bits[i] has bit b (the KL terms: response,
// prompt, visual) to out[b], block 3 adds Σ ce[i] to out[3]; a null out[b] is skipped. Grid (4).
extern "C" __global__ void __launch_bounds__(SUMS_THREADS)
sum_terms_into_f64(const float* kl, const float* ce, const int* bits, long long n, double* out0, double* out1, double* out2,
                   double* out_ce) {
    const int b = blockIdx.x;
    // A select, not an indexed local array (which ptxas puts on the stack).
    double* out = b == 0 ? out0 : b == 1 ? out1 : b == 2 ? out2 : b == 3 ? out_ce : nullptr;
    if (out == nullptr) return;
    if (b == 3) sum_into(ce, (const int*)nullptr, 0, n, out);
    else sum_into(kl, bits, b, n, out);
}
