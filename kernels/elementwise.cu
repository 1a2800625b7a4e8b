// elementwise.cu — the element-wise and row-gather ops of the CUDA backend.
//
// What: bias add and its gradient, residual add (`add_assign`), scale, embedding gather and its
// scatter-add, rotary embedding (HF rotate-half), SwiGLU and GELU (erf and tanh) forward and
// backward, f32 → bf16 conversion, and the random fills the benchmarks and tests create their
// inputs with on the device.
//
// Shapes: flat bf16 buffers of `n` elements (`long long`: the fused-head logits pass 2^31); row
// ops take `[rows, dim]`; RoPE takes `x [T, heads, head_dim]` and one position per token.
//
// Why this way: every op here is memory-bound with nothing to reuse, so each is one pass with
// one element per thread (grid-stride loops, so any launch size is valid), fp32 arithmetic on
// bf16 loads and stores. The two reductions over rows (bias gradient, and in norm.cu the RMSNorm
// weight gradient) are column sums in two launches: blocks of 32 columns × a slice of the rows
// (8 thread rows, combined in shared memory) write f32 partial sums [slices, dim], then
// `column_partials_add_bf16` adds each column's partials in slice order to the bf16 gradient.
// Deterministic (no atomics; a fixed slice count gives fixed bits), and the row slices give the
// grid enough blocks: one block per 32 columns over all rows filled 32 of 132 SMs at hidden 1024. The embedding scatter-add is
// deterministic too: the host groups the positions by token id (it has the ids), and one block
// sums each id's rows in fp32 before a single read-modify-write of the table row. RoPE computes
// its angles in double (positions reach tens of thousands and θ 1e6: an fp32 angle would be off
// by ~1e-3 rad), once per (token, frequency) and applies them to every head.

#ifdef KD_HOST_SIM
#include "sim/host_sim.h"  // the CPU emulation (kernels/sim/): the simulated device runs this file too
#else
#include <cuda_bf16.h>
#endif

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 b(float x) { return __float2bfloat16(x); }

#define GRID_STRIDE(i, n)                                                          \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

// x[r, c] += bias[c]
extern "C" __global__ void add_bias_bf16(bf16* x, const bf16* bias, long long rows, int dim) {
    long long n = rows * dim;
    GRID_STRIDE(i, n) { x[i] = b(f(x[i]) + f(bias[i % dim])); }
}

// dbias[c] += Σ_r dy[r, c]. Block (32, 8): 32 columns, 8 thread rows; grid ceil(dim / 32).
// Partial column sums of dy [rows, dim] over the rows of slice blockIdx.y → partials[slice, dim].
extern "C" __global__ void bias_grad_partials_bf16(const bf16* dy, float* partials, long long rows, int dim,
                                                   long long rows_per_slice) {
    __shared__ float part[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    long long r0 = (long long)blockIdx.y * rows_per_slice;
    long long r1 = min(rows, r0 + rows_per_slice);
    float s = 0.f;
    if (c < dim)
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) s += f(dy[r * dim + c]);
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < dim) {
        float t = 0.f;
        for (int k = 0; k < 8; k++) t += part[k][threadIdx.x];
        partials[(long long)blockIdx.y * dim + c] = t;
    }
}

// out[c] += Σ_s partials[s, c], slices in order (the second half of both column sums).
extern "C" __global__ void column_partials_add_bf16(const float* partials, int slices, int dim, bf16* out) {
    GRID_STRIDE(c, dim) {
        float t = 0.f;
        for (int s = 0; s < slices; s++) t += partials[(long long)s * dim + c];
        out[c] = b(f(out[c]) + t);
    }
}

extern "C" __global__ void add_assign_bf16(bf16* dst, const bf16* src, long long n) {
    GRID_STRIDE(i, n) { dst[i] = b(f(dst[i]) + f(src[i])); }
}

// x *= s
extern "C" __global__ void scale_bf16(bf16* x, float s, long long n) {
    GRID_STRIDE(i, n) { x[i] = b(f(x[i]) * s); }
}

// out[i] = bf16(in[i]) (round to nearest even)
extern "C" __global__ void f32_to_bf16(const float* in, bf16* out, long long n) {
    GRID_STRIDE(i, n) { out[i] = b(in[i]); }
}

// out[t, :] = table[ids[t], :]; ids were range-checked on the host. Grid T, block ≤ 256.
extern "C" __global__ void embedding_fwd_bf16(const bf16* table, const unsigned* ids, int dim, bf16* out) {
    long long t = blockIdx.x;
    const bf16* row = table + (long long)ids[t] * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) out[t * dim + c] = row[c];
}

// dtable[uid[u], :] += Σ_{p in group u} dout[order[p], :], groups given by offsets[u]..offsets[u+1].
// Grid n_unique, block ≤ 256. Each table row is written by exactly one block.
extern "C" __global__ void embedding_bwd_bf16(const bf16* dout, const int* uid, const int* offsets, const int* order,
                                              int dim, bf16* dtable) {
    int u = blockIdx.x;
    int p0 = offsets[u], p1 = offsets[u + 1];
    bf16* row = dtable + (long long)uid[u] * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float s = 0.f;
        for (int p = p0; p < p1; p++) s += f(dout[(long long)order[p] * dim + c]);
        row[c] = b(f(row[c]) + s);
    }
}

// HF rotate-half RoPE in place on x [T, heads, head_dim]: for i < D/2 the pair (x[i], x[i+D/2])
// rotates by pos·θ^(−2i/D) (sign −1: the inverse rotation). One thread per (token, i), all heads.
extern "C" __global__ void rope_bf16(bf16* x, const unsigned* pos, int T, int heads, int head_dim, double theta,
                                     float sign) {
    int half = head_dim / 2;
    long long n = (long long)T * half;
    GRID_STRIDE(idx, n) {
        int t = (int)(idx / half), i = (int)(idx % half);
        double inv_freq = pow(theta, -(double)(2 * i) / (double)head_dim);
        double s, c;
        sincos((double)pos[t] * inv_freq, &s, &c);
        float cf = (float)c, sf = (float)(sign * s);
        bf16* row = x + (long long)t * heads * head_dim;
        for (int h = 0; h < heads; h++) {
            bf16* hp = row + h * head_dim;
            float x1 = f(hp[i]), x2 = f(hp[i + half]);
            hp[i] = b(x1 * cf - x2 * sf);
            hp[i + half] = b(x2 * cf + x1 * sf);
        }
    }
}

__device__ __forceinline__ float sigmoidf_(float g) { return 1.f / (1.f + __expf(-g)); }

// out = silu(gate) · up
extern "C" __global__ void swiglu_fwd_bf16(const bf16* gate, const bf16* up, bf16* out, long long n) {
    GRID_STRIDE(i, n) {
        float g = f(gate[i]);
        out[i] = b(g * sigmoidf_(g) * f(up[i]));
    }
}

// dgate = dout·up·σ(g)·(1 + g·(1 − σ(g))), dup = dout·silu(g)
extern "C" __global__ void swiglu_bwd_bf16(const bf16* gate, const bf16* up, const bf16* dout, bf16* dgate, bf16* dup,
                                           long long n) {
    GRID_STRIDE(i, n) {
        float g = f(gate[i]), u = f(up[i]), d = f(dout[i]);
        float s = sigmoidf_(g);
        dgate[i] = b(d * u * s * (1.f + g * (1.f - s)));
        dup[i] = b(d * g * s);
    }
}

#define SQRT_2_OVER_PI 0.7978845608028654f
#define INV_SQRT_2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f

// kind 0: exact (erf); kind 1: tanh approximation (gelu_pytorch_tanh)
__device__ __forceinline__ float gelu_value(float x, int kind) {
    if (kind == 0) return 0.5f * x * (1.f + erff(x * INV_SQRT_2));
    float inner = SQRT_2_OVER_PI * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.f + tanhf(inner));
}

__device__ __forceinline__ float gelu_derivative(float x, int kind) {
    if (kind == 0) {
        float cdf = 0.5f * (1.f + erff(x * INV_SQRT_2));
        float pdf = expf(-0.5f * x * x) * INV_SQRT_2PI;
        return cdf + x * pdf;
    }
    float th = tanhf(SQRT_2_OVER_PI * (x + 0.044715f * x * x * x));
    return 0.5f * (1.f + th) + 0.5f * x * (1.f - th * th) * SQRT_2_OVER_PI * (1.f + 3.f * 0.044715f * x * x);
}

extern "C" __global__ void gelu_fwd_bf16(const bf16* x, bf16* out, long long n, int kind) {
    GRID_STRIDE(i, n) { out[i] = b(gelu_value(f(x[i]), kind)); }
}

extern "C" __global__ void gelu_bwd_bf16(const bf16* x, const bf16* dout, bf16* dx, long long n, int kind) {
    GRID_STRIDE(i, n) { dx[i] = b(f(dout[i]) * gelu_derivative(f(x[i]), kind)); }
}

// A counter hash (splitmix64 finaliser) of (seed, index): the random fills are a pure function of
// their seed, so a benchmark's inputs are the same from run to run.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float uniform01(unsigned long long seed, long long i) {
    unsigned long long h = mix64(seed * 0x9E3779B97F4A7C15ull + (unsigned long long)i);
    return (float)(h >> 40) * (1.0f / 16777216.0f);  // 24 random bits → [0, 1)
}

// x[i] = lo + (hi − lo)·u, u uniform in [0, 1)
extern "C" __global__ void fill_uniform_bf16(bf16* x, long long n, unsigned long long seed, float lo, float hi) {
    GRID_STRIDE(i, n) { x[i] = b(lo + (hi - lo) * uniform01(seed, i)); }
}

extern "C" __global__ void fill_uniform_f32(float* x, long long n, unsigned long long seed, float lo, float hi) {
    GRID_STRIDE(i, n) { x[i] = lo + (hi - lo) * uniform01(seed, i); }
}
