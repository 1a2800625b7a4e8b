// norm.cu — RMSNorm forward and backward, LayerNorm forward.
//
// What: `rmsnorm_fwd_bf16` writes out = x·rstd·w and saves rstd = 1/sqrt(mean(x²) + eps) per row
// (fp32); `rmsnorm_bwd_dx_bf16` writes dx = rstd·(g − x̂·mean(g·x̂)) with g = dout·w, x̂ = x·rstd;
// `rmsnorm_bwd_dw_partials_bf16` writes the partial sums of dw += Σ_rows dout·x̂ per row slice; `layernorm_fwd_bf16` writes
// (x − mean)·rstd·w + b with the biased variance (PyTorch), for the frozen vision tower.
//
// Shapes: x, out, dout, dx [rows, dim] bf16; w, b, dw [dim] bf16; rstd [rows] fp32.
//
// Why this way: rows are LLM/vision hidden sizes (≤ a few thousand), so one block of 256 threads
// per row reduces a row in registers + one shared-memory pass, with statistics in fp32 (the
// SPEC's fp32 norm statistics). LayerNorm takes the mean first and the variance of the centred
// values second (two reads of the row, the second from L1/L2), which is exact where the one-pass
// E[x²] − E[x]² cancels. The weight gradient is a column sum over rows, done like the bias
// gradient (elementwise.cu): partial sums per (32 columns, row slice), then
// `column_partials_add_bf16` in slice order; deterministic, no atomics.

#ifdef KD_HOST_SIM
#include "sim/host_sim.h"  // the CPU emulation (kernels/sim/): the simulated device runs this file too
#else
#include <cuda_bf16.h>
#endif

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 b(float x) { return __float2bfloat16(x); }

// Sum over the block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float warp_sums[32];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        float s = lane < nw ? warp_sums[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float r = total;
    __syncthreads();  // warp_sums/total may be reused by the next call
    return r;
}

// Grid rows, block 256.
extern "C" __global__ void rmsnorm_fwd_bf16(const bf16* x, const bf16* w, bf16* out, float* rstd, int dim, float eps) {
    long long r = blockIdx.x;
    const bf16* xr = x + r * dim;
    float ss = 0.f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float v = f(xr[c]);
        ss += v * v;
    }
    ss = block_sum(ss);
    float rs = rsqrtf(ss / (float)dim + eps);
    if (threadIdx.x == 0) rstd[r] = rs;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) out[r * dim + c] = b(f(xr[c]) * rs * f(w[c]));
}

// Grid rows, block 256. dx overwritten.
extern "C" __global__ void rmsnorm_bwd_dx_bf16(const bf16* dout, const bf16* x, const bf16* w, const float* rstd,
                                               bf16* dx, int dim) {
    long long r = blockIdx.x;
    const bf16* xr = x + r * dim;
    const bf16* gr = dout + r * dim;
    float rs = rstd[r];
    float dot = 0.f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) dot += f(gr[c]) * f(w[c]) * f(xr[c]) * rs;
    dot = block_sum(dot) / (float)dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float xv = f(xr[c]);
        dx[r * dim + c] = b(rs * (f(gr[c]) * f(w[c]) - xv * rs * dot));
    }
}

// dw[c] += Σ_r dout[r, c]·x[r, c]·rstd[r]. Block (32, 8), grid ceil(dim / 32).
extern "C" __global__ void rmsnorm_bwd_dw_partials_bf16(const bf16* dout, const bf16* x, const float* rstd, float* partials,
                                                        int rows, int dim, int rows_per_slice) {
    __shared__ float part[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    long long r0 = (long long)blockIdx.y * rows_per_slice;
    long long r1 = min((long long)rows, r0 + rows_per_slice);
    float s = 0.f;
    if (c < dim)
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) s += f(dout[r * dim + c]) * f(x[r * dim + c]) * rstd[r];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < dim) {
        float t = 0.f;
        for (int k = 0; k < 8; k++) t += part[k][threadIdx.x];
        partials[(long long)blockIdx.y * dim + c] = t;
    }
}

extern "C" __global__ void layernorm_fwd_bf16(const bf16* x, const bf16* w, const bf16* bias, bf16* out, int dim,
                                              float eps) {
    long long r = blockIdx.x;
    const bf16* xr = x + r * dim;
    float s = 0.f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) s += f(xr[c]);
    float mean = block_sum(s) / (float)dim;
    float v = 0.f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float d = f(xr[c]) - mean;
        v += d * d;
    }
    float rs = rsqrtf(block_sum(v) / (float)dim + eps);
    for (int c = threadIdx.x; c < dim; c += blockDim.x)
        out[r * dim + c] = b((f(xr[c]) - mean) * rs * f(w[c]) + f(bias[c]));
}
