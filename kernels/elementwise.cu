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
// Why this way: every op here is memory-bound with nothing to reuse, so each is one pass over its
// operands (grid-stride loops, so any launch size is valid), fp32 arithmetic on bf16 loads and
// stores, in 16-byte accesses: a thread takes 8 consecutive elements (one uint4 per bf16 operand)
// where scalar 2-byte accesses would need 8 load instructions and leave most of each memory
// transaction to coalescing. The last n % 8 elements go one per thread; so does everything when an
// operand is not 16-byte aligned. That check is made in the kernel, on the pointers it was given,
// not by the launchers: no launch can take the vector path with a misaligned view, and the results
// are the same bits either way (the same fp32 arithmetic and round-to-nearest-even per element). The two reductions over rows (bias gradient, and in norm.cu the RMSNorm
// weight gradient) are column sums in two launches: blocks of 32 columns × a slice of the rows
// (8 thread rows, combined in shared memory) write f32 partial sums [slices, dim], then
// `column_partials_add_bf16` adds each column's partials in slice order to the bf16 gradient.
// Deterministic (no atomics; a fixed slice count gives fixed bits), and the row slices give the
// grid enough blocks: one block per 32 columns over all rows filled 32 of 132 SMs at hidden 1024. The embedding scatter-add is
// deterministic too: the host groups the positions by token id (it has the ids), and one block
// sums each id's rows in fp32 before a single read-modify-write of the table row. RoPE computes
// its angles in double (positions reach tens of thousands and θ 1e6: an fp32 angle would be off
// by ~1e-3 rad), once per (token, frequency) and applies them to every head.

#include "common.cuh"  // under KD_HOST_SIM, the CPU emulation (kernels/sim/): the simulated device runs this file too

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 b(float x) { return __float2bfloat16(x); }

#define GRID_STRIDE(i, n)                                                          \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

// out[k][e] = body(in[.][e]) over n elements of NI bf16 inputs and NO bf16 outputs (an output may
// be an input: each chunk is read before it is written). `body(i0, x, y, m)` computes y[k][e] from
// x[k][e] for the m elements i0 .. i0 + m − 1 (m = 8 on the 16-byte path, 1 on the scalar one).
template <int NI, int NO, class Body>
__device__ __forceinline__ void map_bf16(const bf16* const (&in)[NI], bf16* const (&out)[NO], long long n, Body body) {
    bool vec = true;
#pragma unroll
    for (int k = 0; k < NI; ++k) vec = vec && is_aligned16(in[k]);
#pragma unroll
    for (int k = 0; k < NO; ++k) vec = vec && is_aligned16(out[k]);
    const long long n8 = vec ? n / 8 : 0;
    float x[NI][8], y[NO][8];
    GRID_STRIDE(c, n8) {
#pragma unroll
        for (int k = 0; k < NI; ++k) unpack_bf16x8(*reinterpret_cast<const uint4*>(in[k] + c * 8), x[k]);
        body(c * 8, x, y, 8);
#pragma unroll
        for (int k = 0; k < NO; ++k) *reinterpret_cast<uint4*>(out[k] + c * 8) = pack_bf16x8(y[k]);
    }
    GRID_STRIDE(j, n - n8 * 8) {
        const long long i = n8 * 8 + j;
#pragma unroll
        for (int k = 0; k < NI; ++k) x[k][0] = f(in[k][i]);
        body(i, x, y, 1);
#pragma unroll
        for (int k = 0; k < NO; ++k) out[k][i] = b(y[k][0]);
    }
}

// x[r, c] += bias[c]
extern "C" __global__ void add_bias_bf16(bf16* x, const bf16* bias, long long rows, int dim) {
    map_bf16<1, 1>({x}, {x}, rows * dim, [&](long long i0, const float (&v)[1][8], float (&o)[1][8], int m) {
        int c = (int)(i0 % dim);  // one division per chunk; the column then wraps at dim
        for (int e = 0; e < m; ++e) {
            o[0][e] = v[0][e] + f(bias[c]);
            c = c + 1 == dim ? 0 : c + 1;
        }
    });
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
    map_bf16<2, 1>({dst, src}, {dst}, n, [](long long, const float (&v)[2][8], float (&o)[1][8], int m) {
        for (int e = 0; e < m; ++e) o[0][e] = v[0][e] + v[1][e];
    });
}

// x *= s
extern "C" __global__ void scale_bf16(bf16* x, float s, long long n) {
    map_bf16<1, 1>({x}, {x}, n, [&](long long, const float (&v)[1][8], float (&o)[1][8], int m) {
        for (int e = 0; e < m; ++e) o[0][e] = v[0][e] * s;
    });
}

// out[i] = bf16(in[i]) (round to nearest even); 32 bytes in, 16 out per 8 elements when aligned.
extern "C" __global__ void f32_to_bf16(const float* in, bf16* out, long long n) {
    const long long n8 = is_aligned16(in) && is_aligned16(out) ? n / 8 : 0;
    GRID_STRIDE(c, n8) {
        const float4 lo = *reinterpret_cast<const float4*>(in + c * 8), hi = *reinterpret_cast<const float4*>(in + c * 8 + 4);
        const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        *reinterpret_cast<uint4*>(out + c * 8) = pack_bf16x8(v);
    }
    GRID_STRIDE(j, n - n8 * 8) { out[n8 * 8 + j] = b(in[n8 * 8 + j]); }
}

// out[t, :] = table[ids[t], :]; ids were range-checked on the host. Grid T, block ≤ 256. Rows are
// copied 8 elements (16 bytes) at a time when dim is a multiple of 8 and both buffers are aligned.
extern "C" __global__ void embedding_fwd_bf16(const bf16* table, const unsigned* ids, int dim, bf16* out) {
    long long t = blockIdx.x;
    const bf16* row = table + (long long)ids[t] * dim;
    bf16* dst = out + t * dim;
    if (dim % 8 == 0 && is_aligned16(table) && is_aligned16(out)) {
        for (int c = threadIdx.x * 8; c < dim; c += blockDim.x * 8)
            *reinterpret_cast<uint4*>(dst + c) = *reinterpret_cast<const uint4*>(row + c);
    } else {
        for (int c = threadIdx.x; c < dim; c += blockDim.x) dst[c] = row[c];
    }
}

// dtable[uid[u], :] += Σ_{p in group u} dout[order[p], :], groups given by offsets[u]..offsets[u+1].
// Grid n_unique, block ≤ 256. Each table row is written by exactly one block. W columns per thread:
// 8 (16-byte accesses) when dim is a multiple of 8 and both buffers are aligned, else 1; each
// column's sum runs over the positions in the same order either way.
template <int W>
__device__ __forceinline__ void embedding_bwd_cols(const bf16* dout, const int* order, int p0, int p1, int dim, bf16* row) {
    for (int c = threadIdx.x * W; c < dim; c += blockDim.x * W) {
        float s[W] = {}, v[8];
        for (int p = p0; p < p1; p++) {
            const bf16* src = dout + (long long)order[p] * dim + c;
            if constexpr (W == 8) {
                unpack_bf16x8(*reinterpret_cast<const uint4*>(src), v);
            } else {
                v[0] = f(src[0]);
            }
            for (int e = 0; e < W; ++e) s[e] += v[e];
        }
        if constexpr (W == 8) {
            unpack_bf16x8(*reinterpret_cast<const uint4*>(row + c), v);
            for (int e = 0; e < 8; ++e) v[e] += s[e];
            *reinterpret_cast<uint4*>(row + c) = pack_bf16x8(v);
        } else {
            row[c] = b(f(row[c]) + s[0]);
        }
    }
}

extern "C" __global__ void embedding_bwd_bf16(const bf16* dout, const int* uid, const int* offsets, const int* order,
                                              int dim, bf16* dtable) {
    int u = blockIdx.x;
    int p0 = offsets[u], p1 = offsets[u + 1];
    bf16* row = dtable + (long long)uid[u] * dim;
    if (dim % 8 == 0 && is_aligned16(dout) && is_aligned16(dtable))
        embedding_bwd_cols<8>(dout, order, p0, p1, dim, row);
    else
        embedding_bwd_cols<1>(dout, order, p0, p1, dim, row);
}

// HF rotate-half RoPE in place on x [T, heads, head_dim]: for i < D/2 the pair (x[i], x[i+D/2])
// rotates by pos·θ^(−2i/D) (sign −1: the inverse rotation). One thread per (token, W consecutive
// i), all heads: W = 8 (16-byte accesses to both halves) when D/2 is a multiple of 8 and x is
// aligned (head dims 64, 80, 128), else W = 1.
template <int W>
__device__ __forceinline__ void rope_rows(bf16* x, const unsigned* pos, int T, int heads, int head_dim, double theta, float sign) {
    const int half = head_dim / 2, chunks = half / W;
    const long long n = (long long)T * chunks;
    GRID_STRIDE(idx, n) {
        const int t = (int)(idx / chunks), i0 = (int)(idx % chunks) * W;
        float cf[W], sf[W], x1[8], x2[8];
        for (int e = 0; e < W; ++e) {
            double inv_freq = pow(theta, -(double)(2 * (i0 + e)) / (double)head_dim);
            double s, c;
            sincos((double)pos[t] * inv_freq, &s, &c);
            cf[e] = (float)c;
            sf[e] = (float)(sign * s);
        }
        bf16* row = x + (long long)t * heads * head_dim;
        for (int h = 0; h < heads; h++) {
            bf16* p1 = row + h * head_dim + i0;
            bf16* p2 = p1 + half;
            if constexpr (W == 8) {
                unpack_bf16x8(*reinterpret_cast<const uint4*>(p1), x1);
                unpack_bf16x8(*reinterpret_cast<const uint4*>(p2), x2);
            } else {
                x1[0] = f(*p1);
                x2[0] = f(*p2);
            }
            float y1[8], y2[8];
            for (int e = 0; e < W; ++e) {
                y1[e] = x1[e] * cf[e] - x2[e] * sf[e];
                y2[e] = x2[e] * cf[e] + x1[e] * sf[e];
            }
            if constexpr (W == 8) {
                *reinterpret_cast<uint4*>(p1) = pack_bf16x8(y1);
                *reinterpret_cast<uint4*>(p2) = pack_bf16x8(y2);
            } else {
                *p1 = b(y1[0]);
                *p2 = b(y2[0]);
            }
        }
    }
}

extern "C" __global__ void rope_bf16(bf16* x, const unsigned* pos, int T, int heads, int head_dim, double theta,
                                     float sign) {
    if ((head_dim / 2) % 8 == 0 && is_aligned16(x))
        rope_rows<8>(x, pos, T, heads, head_dim, theta, sign);
    else
        rope_rows<1>(x, pos, T, heads, head_dim, theta, sign);
}

__device__ __forceinline__ float sigmoidf_(float g) { return 1.f / (1.f + __expf(-g)); }

// out = silu(gate) · up
extern "C" __global__ void swiglu_fwd_bf16(const bf16* gate, const bf16* up, bf16* out, long long n) {
    map_bf16<2, 1>({gate, up}, {out}, n, [](long long, const float (&v)[2][8], float (&o)[1][8], int m) {
        for (int e = 0; e < m; ++e) o[0][e] = v[0][e] * sigmoidf_(v[0][e]) * v[1][e];
    });
}

// dgate = dout·up·σ(g)·(1 + g·(1 − σ(g))), dup = dout·silu(g)
extern "C" __global__ void swiglu_bwd_bf16(const bf16* gate, const bf16* up, const bf16* dout, bf16* dgate, bf16* dup,
                                           long long n) {
    map_bf16<3, 2>({gate, up, dout}, {dgate, dup}, n, [](long long, const float (&v)[3][8], float (&o)[2][8], int m) {
        for (int e = 0; e < m; ++e) {
            const float g = v[0][e], u = v[1][e], d = v[2][e], s = sigmoidf_(g);
            o[0][e] = d * u * s * (1.f + g * (1.f - s));
            o[1][e] = d * g * s;
        }
    });
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
    map_bf16<1, 1>({x}, {out}, n, [&](long long, const float (&v)[1][8], float (&o)[1][8], int m) {
        for (int e = 0; e < m; ++e) o[0][e] = gelu_value(v[0][e], kind);
    });
}

extern "C" __global__ void gelu_bwd_bf16(const bf16* x, const bf16* dout, bf16* dx, long long n, int kind) {
    map_bf16<2, 1>({x, dout}, {dx}, n, [&](long long, const float (&v)[2][8], float (&o)[1][8], int m) {
        for (int e = 0; e < m; ++e) o[0][e] = v[1][e] * gelu_derivative(v[0][e], kind);
    });
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
