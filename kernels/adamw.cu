// adamw.cu: the bf16 AdamW step (fp32 moments, optional fp32 master weights, stochastic rounding
// without them) and the sum of squares of a bf16 gradient for the global-norm clip.
//
// What it computes (CPU reference: src/backend/cpu/elementwise.rs::adamw, PyTorch's single-tensor
// AdamW, operation for operation), per element j < n, all in fp32:
//     g  = grad[j] · grad_scale
//     p  = p · (1 − lr·weight_decay)                          decoupled weight decay
//     m  = m + (1 − β1)·(g − m)                               (torch: m.lerp_(g, 1 − β1))
//     v  = v·β2 + ((1 − β2)·g)·g
//     p  = p − (lr / bias_correction1) · (m / (sqrt(v) / bias_correction2_sqrt + eps))
//   where p is master[j] when master != NULL (then param[j] = bf16_rne(p), and the master keeps the
//   full precision), else p = f32(param[j]) and param[j] = stochastic_round_bf16(p, seed, step, j).
//   bias_correction1 = 1 − β1^step and bias_correction2_sqrt = sqrt(1 − β2^step), computed by the
//   launcher in f64 and passed as f32 (as the CPU reference does).
//   Every multiply/add/divide/sqrt above is an explicit IEEE round-to-nearest intrinsic
//   (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn, __fsqrt_rn): nvcc never contracts them into FMAs,
//   so the fp32 result is the one the CPU's f32 code gives (bit for bit, except for lr/bc1 which the
//   CPU divides in f64: here it is divided in f64 too, from the f32 bias_correction1). The scalar
//   constants 1 − lr·wd, 1 − β1, 1 − β2 are formed in f64 and rounded once, as on the CPU.
//
// Stochastic rounding (identical to src/backend/cpu/bf16.rs, which documents and tests it):
//   key      = mix64(seed + mix64(step + GOLDEN))                    (wrapping u64 arithmetic)
//   hash(j4) = mix64(key + (j4 + 1)·GOLDEN)        the j4-th output of a splitmix64 stream
//   noise(j) = bits [16·(j mod 4), 16·(j mod 4) + 16) of hash(j / 4)           (16 random bits)
//   bf16     = high 16 bits of (f32 bits of p + noise(j)), for finite p; NaN/±inf as RNE does.
//   mix64 is the splitmix64 finaliser: z ^= z>>30; z *= 0xBF58476D1CE4E5B9; z ^= z>>27;
//   z *= 0x94D049BB133111EB; z ^= z>>31. GOLDEN = 0x9E3779B97F4A7C15.
//   `j` is the element index within this launch's tensor (0..n): launch different tensors with
//   different seeds (e.g. base_seed + tensor index) so that they draw different noise, and use the
//   same rule on the CPU.
//
// sum_squares_bf16: partials[b] = block b's part of Σ_j f32(x[j])², accumulated in f64 (as the
//   CPU does: a square above f32's range stays finite); the host adds the gridDim.x partials in
//   block order. No atomics: the same grid gives the same bits every run, so the clipped update
//   is reproducible.
//
// Launch configuration (both kernels are grid-stride loops: any grid is correct):
//   block = (ADAMW_THREADS = 256, 1, 1), grid = (min(ceil(n / (8·256)), 8 · SM count), 1, 1)
//   shared memory: static (2 KB in sum_squares), dynamic = 0. Launch nothing when n == 0.
//
// Why this way. Both are memory-bound streams: per element AdamW moves 2+2 (param r/w) + 2 (grad)
// + 8 + 8 (m, v r/w) = 22 bytes, + 8 with a master copy. Each thread handles 8 consecutive elements
// per iteration with 16-byte loads and stores (bf16x8 = 16 B, f32x4 = 16 B) when every pointer is
// 16-byte aligned after a short scalar head (the head is chosen from `param`'s alignment; if the
// other pointers do not line up with it the whole tensor goes scalar: correct, slower). The hash
// costs one 64-bit splitmix round per 4 elements, well inside the compute budget of a stream.
#include "common.cuh"

#define ADAMW_THREADS 256
#define KD_GOLDEN 0x9E3779B97F4A7C15ull

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ unsigned long long sr_key(unsigned long long seed, unsigned long long step) {
    return mix64(seed + mix64(step + KD_GOLDEN));
}

// 64 random bits for the elements 4·j4 .. 4·j4 + 3.
__device__ __forceinline__ unsigned long long sr_hash(unsigned long long key, unsigned long long j4) {
    return mix64(key + (j4 + 1ull) * KD_GOLDEN);
}

// Stochastic rounding of a finite f32 to bf16 with 16 noise bits; NaN and ±inf keep RNE's result.
__device__ __forceinline__ uint16_t sr_bf16_bits(float x, uint32_t noise16) {
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return bf16_bits(f32_to_bf16(x));  // inf or NaN
    return static_cast<uint16_t>((u + noise16) >> 16);
}

struct AdamWConsts {
    float decay, b1w, beta2, b2w, eps, step_size, bc2_sqrt, grad_scale;
};

// One element of the update; p is updated in place.
__device__ __forceinline__ void adamw_elem(const AdamWConsts& k, float& p, float g_raw, float& m, float& v) {
    float g = __fmul_rn(g_raw, k.grad_scale);
    p = __fmul_rn(p, k.decay);
    m = __fadd_rn(m, __fmul_rn(k.b1w, __fsub_rn(g, m)));
    v = __fadd_rn(__fmul_rn(v, k.beta2), __fmul_rn(__fmul_rn(k.b2w, g), g));
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), k.bc2_sqrt), k.eps);
    p = __fsub_rn(p, __fmul_rn(k.step_size, __fdiv_rn(m, denom)));
}

__device__ __forceinline__ void load_f32x8(const float* p, float x[8]) {
    float4 a = *reinterpret_cast<const float4*>(p);
    float4 b = *reinterpret_cast<const float4*>(p + 4);
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
}

__device__ __forceinline__ void store_f32x8(float* p, const float x[8]) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(x[4], x[5], x[6], x[7]);
}

// Scalar path for element j.
__device__ __forceinline__ void adamw_scalar(const AdamWConsts& k, __nv_bfloat16* param, const __nv_bfloat16* grad,
                                             float* m, float* v, float* master, long long j,
                                             unsigned long long key) {
    float mj = m[j], vj = v[j];
    float p = master != nullptr ? master[j] : bf16_to_f32(param[j]);
    adamw_elem(k, p, bf16_to_f32(grad[j]), mj, vj);
    m[j] = mj;
    v[j] = vj;
    if (master != nullptr) {
        master[j] = p;
        param[j] = f32_to_bf16(p);
    } else {
        unsigned long long h = sr_hash(key, (unsigned long long)j >> 2);
        uint32_t noise = static_cast<uint32_t>((h >> (16 * (j & 3))) & 0xffffull);
        param[j] = bf16_from_bits(sr_bf16_bits(p, noise));
    }
}

extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
adamw_bf16(__nv_bfloat16* __restrict__ param, const __nv_bfloat16* __restrict__ grad, float* __restrict__ m,
           float* __restrict__ v, float* __restrict__ master, long long n, float lr, float beta1, float beta2,
           float eps, float weight_decay, float bias_correction1, float bias_correction2_sqrt, float grad_scale,
           unsigned long long seed, unsigned long long step) {
    AdamWConsts k;
    k.decay = (float)(1.0 - (double)lr * (double)weight_decay);
    k.b1w = (float)(1.0 - (double)beta1);
    k.beta2 = beta2;
    k.b2w = (float)(1.0 - (double)beta2);
    k.eps = eps;
    k.step_size = (float)((double)lr / (double)bias_correction1);
    k.bc2_sqrt = bias_correction2_sqrt;
    k.grad_scale = grad_scale;
    const unsigned long long key = sr_key(seed, step);

    // Scalar head up to param's 16-byte boundary; vectors of 8 after it if everything lines up.
    long long head = (long long)(((16u - (reinterpret_cast<uintptr_t>(param) & 15u)) & 15u) >> 1);
    if (head > n) head = n;
    bool vec = is_aligned16(param + head) && is_aligned16(grad + head) && is_aligned16(m + head) &&
               is_aligned16(v + head) && (master == nullptr || is_aligned16(master + head));
    if (!vec) head = n;
    const long long n_vec = (n - head) / 8;
    const long long tail = head + 8 * n_vec;

    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long t0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long j = t0; j < head; j += stride) adamw_scalar(k, param, grad, m, v, master, j, key);
    for (long long j = tail + t0; j < n; j += stride) adamw_scalar(k, param, grad, m, v, master, j, key);

    for (long long i = t0; i < n_vec; i += stride) {
        const long long j0 = head + 8 * i;
        float p[8], g[8], mm[8], vv[8];
        unpack_bf16x8(ldg_u4(grad + j0), g);
        load_f32x8(m + j0, mm);
        load_f32x8(v + j0, vv);
        if (master != nullptr) {
            load_f32x8(master + j0, p);
        } else {
            unpack_bf16x8(*reinterpret_cast<const uint4*>(param + j0), p);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) adamw_elem(k, p[e], g[e], mm[e], vv[e]);
        store_f32x8(m + j0, mm);
        store_f32x8(v + j0, vv);
        if (master != nullptr) {
            store_f32x8(master + j0, p);
            *reinterpret_cast<uint4*>(param + j0) = pack_bf16x8(p);
        } else {
            // j0 need not be a multiple of 4 (the head), so draw the hash per element group of 4.
            uint16_t b[8];
            unsigned long long cur_j4 = ~0ull, h = 0;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const unsigned long long j = (unsigned long long)(j0 + e);
                if ((j >> 2) != cur_j4) {
                    cur_j4 = j >> 2;
                    h = sr_hash(key, cur_j4);
                }
                b[e] = sr_bf16_bits(p[e], static_cast<uint32_t>((h >> (16 * (j & 3))) & 0xffffull));
            }
            uint4 out;
            out.x = (uint32_t)b[0] | ((uint32_t)b[1] << 16);
            out.y = (uint32_t)b[2] | ((uint32_t)b[3] << 16);
            out.z = (uint32_t)b[4] | ((uint32_t)b[5] << 16);
            out.w = (uint32_t)b[6] | ((uint32_t)b[7] << 16);
            *reinterpret_cast<uint4*>(param + j0) = out;
        }
    }
}

extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
sum_squares_bf16(const __nv_bfloat16* __restrict__ x, long long n, double* __restrict__ partials) {
    __shared__ double scratch[ADAMW_THREADS];
    long long head = (long long)(((16u - (reinterpret_cast<uintptr_t>(x) & 15u)) & 15u) >> 1);
    if (head > n) head = n;
    const long long n_vec = (n - head) / 8;
    const long long tail = head + 8 * n_vec;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long t0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    double acc = 0.0;
    for (long long j = t0; j < head; j += stride) {
        const double a = bf16_to_f32(x[j]);
        acc += a * a;
    }
    for (long long j = tail + t0; j < n; j += stride) {
        const double a = bf16_to_f32(x[j]);
        acc += a * a;
    }
    for (long long i = t0; i < n_vec; i += stride) {
        float a[8];
        unpack_bf16x8(ldg_u4(x + head + 8 * i), a);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc += (double)a[e] * a[e];
    }
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}
