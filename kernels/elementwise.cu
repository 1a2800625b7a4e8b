// elementwise.cu — the element-wise and row-gather ops of the CUDA backend.
//
// What: bias add and its gradient, residual add (`add_assign`), scale, embedding gather and its
// scatter-add, the split of a stacked Q/K/V projection with its bias and rotary embedding (HF
// rotate-half) and its backward, SwiGLU on a stacked gate/up projection and GELU (erf and tanh)
// forward and backward, f32 → bf16 conversion, and the random fills the benchmarks and tests
// create their inputs with on the device.
//
// Shapes: flat bf16 buffers of `n` elements (`long long`: the fused-head logits pass 2^31); row
// ops take `[rows, dim]`; the Q/K/V ops `[T, q_dim + 2·kv_dim]` (heads of head_dim, one RoPE
// position per token), SwiGLU `[R, 2·inter]`.
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

// W consecutive bf16 at p as floats into x[0 .. W), and back: one 16-byte access when W = 8 (p
// aligned), one 2-byte access when W = 1. The row kernels below pick W once for the whole launch.
template <int W>
__device__ __forceinline__ void load_bf16(const bf16* p, float (&x)[8]) {
    if constexpr (W == 8) {
        unpack_bf16x8(*reinterpret_cast<const uint4*>(p), x);
    } else {
        x[0] = f(*p);
    }
}

template <int W>
__device__ __forceinline__ void store_bf16(bf16* p, const float (&y)[8]) {
    if constexpr (W == 8) {
        *reinterpret_cast<uint4*>(p) = pack_bf16x8(y);
    } else {
        *p = b(y[0]);
    }
}

// RoPE's (cos, sign·sin) of pairs i0 .. i0 + W − 1 at position pos: angle pos·θ^(−2i/D) in double.
template <int W>
__device__ __forceinline__ void rope_angles(unsigned pos, int i0, int head_dim, double theta, float sign, float (&cf)[W],
                                            float (&sf)[W]) {
    for (int e = 0; e < W; ++e) {
        double inv_freq = pow(theta, -(double)(2 * (i0 + e)) / (double)head_dim);
        double s, c;
        sincos((double)pos * inv_freq, &s, &c);
        cf[e] = (float)c;
        sf[e] = (float)(sign * s);
    }
}

// Adds W consecutive bias values at p (none when p is null) to x[0 .. W).
template <int W>
__device__ __forceinline__ void add_bias_values(const bf16* p, float (&x)[8]) {
    if (p == nullptr) return;
    float bv[8];
    load_bf16<W>(p, bv);
    for (int e = 0; e < W; ++e) x[e] += bv[e];
}

// One head's pairs (x[i], x[i + D/2]), i = i0 .. i0 + W − 1, of src plus the same columns of
// `bias` (null: none), rotated by (cf, sf) (or, with `rotate` false, copied) into the same places
// of dst. src, bias and dst point at the head's first column.
template <int W>
__device__ __forceinline__ void rope_head_pairs(const bf16* src, const bf16* bias, bf16* dst, int half, int i0, bool rotate,
                                                const float (&cf)[W], const float (&sf)[W]) {
    float x1[8], x2[8], y1[8], y2[8];
    load_bf16<W>(src + i0, x1);
    load_bf16<W>(src + i0 + half, x2);
    add_bias_values<W>(bias ? bias + i0 : nullptr, x1);
    add_bias_values<W>(bias ? bias + i0 + half : nullptr, x2);
    for (int e = 0; e < W; ++e) {
        y1[e] = rotate ? x1[e] * cf[e] - x2[e] * sf[e] : x1[e];
        y2[e] = rotate ? x2[e] * cf[e] + x1[e] * sf[e] : x2[e];
    }
    store_bf16<W>(dst + i0, y1);
    store_bf16<W>(dst + i0 + half, y2);
}

// Fused Q/K/V rows with RoPE, both directions. Part p (0 q, 1 k, 2 v) of token t is read at
// src[p] + t·src_stride[p] and written at dst[p] + t·dst_stride[p]; q has q_heads heads, k and v
// kv_heads, all of head_dim. bias[p] (null: none) is one row of part p, added to every token's
// row before q and k are rotated by (cos, sign·sin) of pos·θ^(−2i/D); v is copied.
// One thread per (token, head, W consecutive pairs i), the pairs fastest so neighbouring threads
// touch neighbouring 16-byte pieces: a thread per (token, pairs) looping over the heads gave
// T·D/16 threads (32 K at 4096 tokens and D = 128, under one wave of 256-thread blocks on 132 SMs:
// too few loads in flight for a memory-bound pass). A q-head thread rotates its q pairs; a k-head
// thread rotates its k pairs and copies the same columns of v, so every column is covered once.
// The angles are recomputed per head (double pow and sincos: cheap next to the memory traffic).
template <int W>
__device__ __forceinline__ void qkv_rope_rows(const bf16* const (&src)[3], const long long (&src_stride)[3],
                                              const bf16* const (&bias)[3], bf16* const (&dst)[3], const long long (&dst_stride)[3],
                                              const unsigned* pos, int T, int q_heads, int kv_heads, int head_dim, double theta,
                                              float sign) {
    const int half = head_dim / 2, chunks = half / W, heads = q_heads + kv_heads;
    const long long n = (long long)T * heads * chunks;
    GRID_STRIDE(idx, n) {
        const int i0 = (int)(idx % chunks) * W;
        const int h = (int)((idx / chunks) % heads);
        const long long t = idx / ((long long)chunks * heads);
        float cf[W], sf[W];
        rope_angles<W>(pos[t], i0, head_dim, theta, sign, cf, sf);
        // Selected by value, not by a runtime array index, so the arrays stay in registers.
        const bool is_q = h < q_heads;
        const long long col = (long long)(is_q ? h : h - q_heads) * head_dim;
        const bf16* s = is_q ? src[0] + t * src_stride[0] : src[1] + t * src_stride[1];
        const bf16* b = is_q ? bias[0] : bias[1];
        bf16* d = is_q ? dst[0] + t * dst_stride[0] : dst[1] + t * dst_stride[1];
        rope_head_pairs<W>(s + col, b ? b + col : nullptr, d + col, half, i0, true, cf, sf);
        if (!is_q)
            rope_head_pairs<W>(src[2] + t * src_stride[2] + col, bias[2] ? bias[2] + col : nullptr,
                               dst[2] + t * dst_stride[2] + col, half, i0, false, cf, sf);
    }
}

// q [T, q_dim], k [T, kv_dim], v [T, kv_dim] from qkv [T, q_dim + 2·kv_dim] (each row q | k | v),
// q and k rotated by HF rotate-half RoPE (the pair (x[i], x[i + D/2]) by pos·θ^(−2i/D); q_dim =
// q_heads·D, kv_dim = kv_heads·D), after adding the projection's bias [q_dim + 2·kv_dim] (null:
// none). The attention projection is one GEMM over the stacked weights; this one pass replaces the bias add, three column copies and two in-place
// RoPE launches (each of which read and wrote q, k or all three again). W = 8 when D/2 is a
// multiple of 8 and every buffer is aligned (the part offsets are then multiples of 16 elements),
// else W = 1.
extern "C" __global__ void qkv_split_rope_bf16(const bf16* qkv, const bf16* bias, const unsigned* pos, int T, int q_heads,
                                               int kv_heads, int head_dim, double theta, bf16* q, bf16* k, bf16* v) {
    const long long q_dim = (long long)q_heads * head_dim, kv_dim = (long long)kv_heads * head_dim, row = q_dim + 2 * kv_dim;
    const bf16* const src[3] = {qkv, qkv + q_dim, qkv + q_dim + kv_dim};
    const long long ss[3] = {row, row, row};
    const bf16* const bs[3] = {bias, bias ? bias + q_dim : nullptr, bias ? bias + q_dim + kv_dim : nullptr};
    bf16* const dst[3] = {q, k, v};
    const long long ds[3] = {q_dim, kv_dim, kv_dim};
    if ((head_dim / 2) % 8 == 0 && is_aligned16(qkv) && (!bias || is_aligned16(bias)) && is_aligned16(q) && is_aligned16(k) &&
        is_aligned16(v))
        qkv_rope_rows<8>(src, ss, bs, dst, ds, pos, T, q_heads, kv_heads, head_dim, theta, 1.f);
    else
        qkv_rope_rows<1>(src, ss, bs, dst, ds, pos, T, q_heads, kv_heads, head_dim, theta, 1.f);
}

// The backward of qkv_split_rope_bf16: dqkv [T, q_dim + 2·kv_dim] ← each row dq and dk rotated
// back (the transposed rotation, sign −1) and dv; the same pass in the other direction, so the
// gradient of the fused projection needs no column copies either.
extern "C" __global__ void qkv_merge_rope_bwd_bf16(const bf16* dq, const bf16* dk, const bf16* dv, const unsigned* pos,
                                                   int T, int q_heads, int kv_heads, int head_dim, double theta,
                                                   bf16* dqkv) {
    const long long q_dim = (long long)q_heads * head_dim, kv_dim = (long long)kv_heads * head_dim, row = q_dim + 2 * kv_dim;
    const bf16* const src[3] = {dq, dk, dv};
    const long long ss[3] = {q_dim, kv_dim, kv_dim};
    bf16* const dst[3] = {dqkv, dqkv + q_dim, dqkv + q_dim + kv_dim};
    const long long ds[3] = {row, row, row};
    const bf16* const none[3] = {nullptr, nullptr, nullptr};
    if ((head_dim / 2) % 8 == 0 && is_aligned16(dq) && is_aligned16(dk) && is_aligned16(dv) && is_aligned16(dqkv))
        qkv_rope_rows<8>(src, ss, none, dst, ds, pos, T, q_heads, kv_heads, head_dim, theta, -1.f);
    else
        qkv_rope_rows<1>(src, ss, none, dst, ds, pos, T, q_heads, kv_heads, head_dim, theta, -1.f);
}

__device__ __forceinline__ float sigmoidf_(float g) { return 1.f / (1.f + __expf(-g)); }

// SwiGLU on a stacked gate/up projection: out [R, inter] = silu(gate)·up, gate_up [R, 2·inter]
// holding each row's gate then its up (the MLP's gate and up projections as one GEMM). Rows are
// not contiguous in both operands, so map_bf16's flat index does not apply: one thread per (row,
// W consecutive columns), W = 8 when inter is a multiple of 8 and both buffers are aligned (then
// every row's gate and up start aligned), else W = 1.
template <int W>
__device__ __forceinline__ void swiglu_fwd_rows(const bf16* gate_up, long long rows, int inter, bf16* out) {
    const int chunks = inter / W;
    GRID_STRIDE(idx, rows * chunks) {
        const long long r = idx / chunks;
        const int j = (int)(idx % chunks) * W;
        const bf16* g = gate_up + r * 2 * inter + j;
        float x[8], u[8], y[8];
        load_bf16<W>(g, x);
        load_bf16<W>(g + inter, u);
        for (int e = 0; e < W; ++e) y[e] = x[e] * sigmoidf_(x[e]) * u[e];
        store_bf16<W>(out + r * inter + j, y);
    }
}

extern "C" __global__ void swiglu_fwd_bf16(const bf16* gate_up, long long rows, int inter, bf16* out) {
    if (inter % 8 == 0 && is_aligned16(gate_up) && is_aligned16(out))
        swiglu_fwd_rows<8>(gate_up, rows, inter, out);
    else
        swiglu_fwd_rows<1>(gate_up, rows, inter, out);
}

// The backward: dgate_up [R, 2·inter] ← each row's dgate = dout·up·σ(g)·(1 + g·(1 − σ(g))) then
// dup = dout·silu(g), from gate_up [R, 2·inter] and dout [R, inter]; the layout and the choice of W
// as in the forward.
template <int W>
__device__ __forceinline__ void swiglu_bwd_rows(const bf16* gate_up, const bf16* dout, long long rows, int inter,
                                                        bf16* dgate_up) {
    const int chunks = inter / W;
    GRID_STRIDE(idx, rows * chunks) {
        const long long r = idx / chunks;
        const int j = (int)(idx % chunks) * W;
        const bf16* gu = gate_up + r * 2 * inter + j;
        bf16* dgu = dgate_up + r * 2 * inter + j;
        float gv[8], uv[8], dv[8], dg[8], du[8];
        load_bf16<W>(gu, gv);
        load_bf16<W>(gu + inter, uv);
        load_bf16<W>(dout + r * inter + j, dv);
        for (int e = 0; e < W; ++e) {
            const float g = gv[e], u = uv[e], d = dv[e], s = sigmoidf_(g);
            dg[e] = d * u * s * (1.f + g * (1.f - s));
            du[e] = d * g * s;
        }
        store_bf16<W>(dgu, dg);
        store_bf16<W>(dgu + inter, du);
    }
}

extern "C" __global__ void swiglu_bwd_bf16(const bf16* gate_up, const bf16* dout, long long rows, int inter,
                                                   bf16* dgate_up) {
    if (inter % 8 == 0 && is_aligned16(gate_up) && is_aligned16(dout) && is_aligned16(dgate_up))
        swiglu_bwd_rows<8>(gate_up, dout, rows, inter, dgate_up);
    else
        swiglu_bwd_rows<1>(gate_up, dout, rows, inter, dgate_up);
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
