// relation.cu: the cosine part of the Gram-matrix relation loss (RDist) and its gradient.
//
// What it computes (CPU reference: src/backend/cpu/distill.rs::relation_loss and gram_cosine). The
// launcher forms, per image i, the Gram matrices R_s = Z_s·Z_sᵀ and R_t = Z_t·Z_tᵀ (n × n, BOTH
// triangles filled: cuBLAS GEMMs with bf16 inputs and fp32 output for the logits form; bf16 Grams
// R = H·M·Hᵀ for the identity form, src/loss/relation_identity.rs), images stored back to back,
// nn = n·n entries each (gram[i·nn + a·n + b]). These kernels compute, per image,
//     cos      = ⟨R_s, R_t⟩ / (‖R_s‖·‖R_t‖)                         (Frobenius)
//     loss_i   = 1 − cos,          *loss_sum += Σ_i loss_i          (in image order, f64)
//     grad[i]  = grad_scale · ∂(1 − cos)/∂R_s
//              = grad_scale · ( −R_t / (‖R_s‖‖R_t‖) + (⟨R_s,R_t⟩ / (‖R_s‖³‖R_t‖)) · R_s )
//   and when either norm is 0: loss 1, gradient 0 (as the CPU reference). The launcher then forms
//   ∂Z_s += 2 · grad · Z_s (G is symmetric) with one more GEMM. The loss is added into a slot of the
//   step's device-side sums (read back once per optimizer step), not returned per image.
//   The *_bf16 variants read bf16 Grams and write a bf16 gradient; the arithmetic is the same.
//
// Two kernels, because one block per image cannot stream an image's 2 × 2.1 MB (n = 728) fast
// enough (one SM reads ~100 GB/s: 4 images would take ~40 ms), and a grid-wide sum needs a second
// launch (or a grid barrier). Both use a fixed grid of RELATION_BLOCKS blocks per image:
//   1. relation_cosine_partials: block b of image i reduces its contiguous chunk of the n·n entries
//      to (⟨R_s,R_t⟩, ‖R_s‖², ‖R_t‖²) in f64 and writes them to
//      partials[(i·RELATION_BLOCKS + b)·3 + {0, 1, 2}] (f64; no atomics: deterministic).
//   2. relation_cosine_grad: every block first sums its image's RELATION_BLOCKS partials in a
//      fixed order (f64, so every block gets the identical coefficients) and writes the gradient
//      over its chunk; block (0, 0) also computes every image's loss from the partials, the same
//      way, and adds their sum in image order to *loss_sum (one writer: no atomics, fixed bits).
//   Loads/stores are 16-byte (float4) when the image's matrices are 16-byte aligned (n·n a
//   multiple of 4 and aligned bases), scalar otherwise. Bytes: 2 reads + 2 reads + 1 write of
//   n·n·4 per image: 4 images of n = 728 → 42 MB → ~10 µs; the GEMMs dominate the relation loss.
//
// Signatures (T = float, or __nv_bfloat16 for the *_bf16 variants):
//   relation_cosine_partials(const T* gram_s, const T* gram_t, long long nn, int n_images,
//                            double* partials)
//   relation_cosine_grad(const T* gram_s, const T* gram_t, long long nn, int n_images,
//                        float grad_scale, const double* partials, double* loss_sum, T* grad_gram)
//   partials: f64[n_images · RELATION_BLOCKS · 3] scratch, written by the first, read by the second
//   (no zeroing needed). grad_gram may alias neither input.
//
// Launch configuration (both kernels, same stream, in this order):
//   grid  = (RELATION_BLOCKS = 128, n_images, 1)
//   block = (RELATION_THREADS = 256, 1, 1)
//   shared memory: static (~1 KB), dynamic = 0. Launch nothing when n_images == 0 or n == 0.
#include "common.cuh"

#define RELATION_BLOCKS 128
#define RELATION_THREADS 256

// The chunk [begin, end) of an image's nn entries that block b handles; chunk starts are
// multiples of 4 so that aligned images stay aligned per chunk.
__device__ __forceinline__ void relation_chunk(long long nn, int b, long long* begin, long long* end) {
    long long per = (nn + RELATION_BLOCKS - 1) / RELATION_BLOCKS;
    per = (per + 3) & ~3ll;
    long long s = (long long)b * per;
    long long e = s + per;
    *begin = s < nn ? s : nn;
    *end = e < nn ? e : nn;
}

// Four consecutive entries (16 bytes of f32, 8 of bf16: aligned when the image base is 16-byte
// aligned, as chunk starts are multiples of 4), and the scalar forms.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(p);
    const uint32_t lo = w[0], hi = w[1];
    return make_float4(bf16_bits_to_f32(lo & 0xffffu), bf16_bits_to_f32(lo >> 16), bf16_bits_to_f32(hi & 0xffffu), bf16_bits_to_f32(hi >> 16));
}
__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void store4(__nv_bfloat16* p, float4 v) {
    uint32_t* w = reinterpret_cast<uint32_t*>(p);
    w[0] = pack_bf16x2(v.x, v.y);
    w[1] = pack_bf16x2(v.z, v.w);
}
__device__ __forceinline__ float load1(const float* p) { return *p; }
__device__ __forceinline__ float load1(const __nv_bfloat16* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = f32_to_bf16(v); }

template <typename T>
__device__ __forceinline__ void cosine_partials(const T* __restrict__ gram_s, const T* __restrict__ gram_t, long long nn,
                                                int n_images, double* __restrict__ partials) {
    __shared__ double sh[RELATION_THREADS];
    const int img = blockIdx.y, b = blockIdx.x;
    if (img >= n_images) return;
    const T* rs = gram_s + (long long)img * nn;
    const T* rt = gram_t + (long long)img * nn;
    long long begin, end;
    relation_chunk(nn, b, &begin, &end);

    double dot = 0.0, ss = 0.0, tt = 0.0;
    const bool vec = is_aligned16(rs) && is_aligned16(rt);
    long long vec_end = vec ? begin + ((end - begin) & ~3ll) : begin;
    for (long long j = begin + 4 * (long long)threadIdx.x; j < vec_end; j += 4 * RELATION_THREADS) {
        float4 a = load4(rs + j);
        float4 c = load4(rt + j);
        dot += (double)a.x * c.x + (double)a.y * c.y + (double)a.z * c.z + (double)a.w * c.w;
        ss += (double)a.x * a.x + (double)a.y * a.y + (double)a.z * a.z + (double)a.w * a.w;
        tt += (double)c.x * c.x + (double)c.y * c.y + (double)c.z * c.z + (double)c.w * c.w;
    }
    for (long long j = vec_end + threadIdx.x; j < end; j += RELATION_THREADS) {
        double a = load1(rs + j), c = load1(rt + j);
        dot += a * c;
        ss += a * a;
        tt += c * c;
    }
    dot = block_sum_f64(dot, sh);
    ss = block_sum_f64(ss, sh);
    tt = block_sum_f64(tt, sh);
    if (threadIdx.x == 0) {
        double* p = partials + ((long long)img * RELATION_BLOCKS + b) * 3;
        p[0] = dot;
        p[1] = ss;
        p[2] = tt;
    }
}

// Image img's loss and gradient coefficients (ct for R_t, cs for R_s) from its partials, summed in
// a fixed order (f64), so every block that asks gets the same bits.
__device__ __forceinline__ double cosine_coefs(const double* __restrict__ partials, int img, float grad_scale, float* ct,
                                               float* cs) {
    const double* p = partials + (long long)img * RELATION_BLOCKS * 3;
    double dot = 0.0, ss = 0.0, tt = 0.0;
    for (int k = 0; k < RELATION_BLOCKS; ++k) {
        dot += p[3 * k];
        ss += p[3 * k + 1];
        tt += p[3 * k + 2];
    }
    double ns = sqrt(ss), nt = sqrt(tt);
    *ct = 0.0f;
    *cs = 0.0f;
    double l = 1.0;
    if (ns != 0.0 && nt != 0.0) {
        l = 1.0 - dot / (ns * nt);
        *ct = (float)(-(double)grad_scale / (ns * nt));
        *cs = (float)((double)grad_scale * dot / (ss * ns * nt));
    } else if (!(ns == ns) || !(nt == nt)) {  // NaN statistics: propagate
        l = ns + nt;
        *ct = *cs = NAN;
    }
    return l;
}

template <typename T>
__device__ __forceinline__ void cosine_grad(const T* __restrict__ gram_s, const T* __restrict__ gram_t, long long nn, int n_images,
                                            float grad_scale, const double* __restrict__ partials, double* __restrict__ loss_sum,
                                            T* __restrict__ grad_gram) {
    __shared__ float coef[2];
    const int img = blockIdx.y, b = blockIdx.x;
    if (img >= n_images) return;
    const T* rs = gram_s + (long long)img * nn;
    const T* rt = gram_t + (long long)img * nn;
    T* g = grad_gram + (long long)img * nn;

    if (threadIdx.x == 0) {
        float ct, cs;
        cosine_coefs(partials, img, grad_scale, &ct, &cs);
        if (b == 0 && img == 0) {
            double total = 0.0;
            for (int i = 0; i < n_images; ++i) {
                float unused_t, unused_s;
                total += cosine_coefs(partials, i, grad_scale, &unused_t, &unused_s);
            }
            *loss_sum += total;
        }
        coef[0] = ct;
        coef[1] = cs;
    }
    __syncthreads();
    const float ct = coef[0], cs = coef[1];

    long long begin, end;
    relation_chunk(nn, b, &begin, &end);
    const bool vec = is_aligned16(rs) && is_aligned16(rt) && is_aligned16(g);
    long long vec_end = vec ? begin + ((end - begin) & ~3ll) : begin;
    for (long long j = begin + 4 * (long long)threadIdx.x; j < vec_end; j += 4 * RELATION_THREADS) {
        float4 a = load4(rs + j);
        float4 c = load4(rt + j);
        store4(g + j, make_float4(ct * c.x + cs * a.x, ct * c.y + cs * a.y, ct * c.z + cs * a.z, ct * c.w + cs * a.w));
    }
    for (long long j = vec_end + threadIdx.x; j < end; j += RELATION_THREADS) store1(g + j, ct * load1(rt + j) + cs * load1(rs + j));
}

extern "C" __global__ void __launch_bounds__(RELATION_THREADS)
relation_cosine_partials(const float* gram_s, const float* gram_t, long long nn, int n_images, double* partials) {
    cosine_partials(gram_s, gram_t, nn, n_images, partials);
}

extern "C" __global__ void __launch_bounds__(RELATION_THREADS)
relation_cosine_partials_bf16(const __nv_bfloat16* gram_s, const __nv_bfloat16* gram_t, long long nn, int n_images,
                              double* partials) {
    cosine_partials(gram_s, gram_t, nn, n_images, partials);
}

extern "C" __global__ void __launch_bounds__(RELATION_THREADS)
relation_cosine_grad(const float* gram_s, const float* gram_t, long long nn, int n_images, float grad_scale,
                     const double* partials, double* loss_sum, float* grad_gram) {
    cosine_grad(gram_s, gram_t, nn, n_images, grad_scale, partials, loss_sum, grad_gram);
}

extern "C" __global__ void __launch_bounds__(RELATION_THREADS)
relation_cosine_grad_bf16(const __nv_bfloat16* gram_s, const __nv_bfloat16* gram_t, long long nn, int n_images,
                          float grad_scale, const double* partials, double* loss_sum, __nv_bfloat16* grad_gram) {
    cosine_grad(gram_s, gram_t, nn, n_images, grad_scale, partials, loss_sum, grad_gram);
}
