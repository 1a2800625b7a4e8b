// decode_attention.cu: attention of ONE new query per row against that row's KV cache (the decoding
// step of generation), flash-decoding style, GQA, head dims 64, 72, 80 and 128.
//
// What it computes (CPU reference: src/backend/cpu/decode.rs, `Backend::attention_decode`):
//   q, out: [R, H·D] bf16 (row r's query heads back to back);
//   k_cache, v_cache: [n_slots, capacity, Hkv·D] bf16; row r reads slot slots[r], positions
//   0 .. lens[r] − 1 (1 <= lens[r] <= capacity), no mask; query head h reads kv head h / (H / Hkv).
//     S_j = scale · q·k_j,   out = Σ_j softmax(S)_j · v_j      (scale = 1/√D, passed by the launcher)
//   fp32 accumulation and softmax statistics; no log-sum-exp is returned (nothing trains through it).
//   row_meta: int [R][2] = (slot, len) per row, packed so that one upload carries both.
//
// Design (why it is written this way). Decoding reads the whole cache for O(1) work per byte, so
// the kernel is bound by memory bandwidth and its job is to keep enough bytes in flight:
//   * One block (128 threads = 4 warps) per (split of the positions, kv head × group chunk, row).
//     The GC query heads of a GQA group chunk (GC in {1, 2, 4, 8}, the launcher picks the smallest
//     >= the group, groups above 8 take several chunks) are all handled by the block that loads
//     their kv head, so each K/V byte is read from memory once per step, not H/Hkv times.
//   * A key row (D bf16) is read by TPK lanes with one 16-byte load each: TPK = 8 for D = 64, 16 for
//     D = 72/80/128 (lanes past D/8 idle and hold zeros), so a warp reads 32/TPK keys per load
//     instruction. Each lane holds its 8 elements of the GC queries (pre-scaled by scale·log2 e,
//     so that every probability is one ex2) and of the GC output accumulators in registers; the
//     dot products are reduced over the TPK lanes with xor shuffles (every lane gets the score).
//   * Each iteration issues all the K and V loads of U keys per lane group first (U = 8, 6, 4, 2
//     for GC = 1, 2, 4, 8: the most that fits the registers without spills), then does the math: 2·U 16-byte loads in flight per
//     thread. Online softmax in fp32 per lane group (one max/rescale per U keys).
//   * End of the block: the lane groups of a warp merge their (max, sum, accumulator) with shuffles,
//     the four warps through shared memory. A row whose length fits in one split (len <= chunk)
//     writes its bf16 output right there (single pass, no second launch for it). Otherwise each
//     split writes its normalised partial output (fp32 [R, H, n_splits, D]) and its base-2
//     log-sum-exp (fp32 [R, H, n_splits]), and decode_attn_combine_bf16 merges the splits.
//   * Splitting (flash-decoding): when R · Hkv · group chunks is too few blocks to fill the GPU, the
//     launcher cuts the positions into n_splits chunks of `chunk` positions (a multiple of 128, at
//     least 256 unless the rows are shorter) so the grid has about 4 blocks per SM. Blocks whose
//     split starts at or beyond their row's length exit at once (rows of unequal lengths).
//   * What a faster version changes: for large GQA groups (7-8 heads) the per-(key, head) shuffle
//     reductions and exponentials approach the memory time; a tensor-core version (the group's
//     heads as the M = 16 rows of mma.sync m16n8k16, keys as N, as in attention.cu's forward) or a
//     butterfly reduce-scatter of the scores would remove that. A cp.async multi-stage pipeline in
//     shared memory would keep more bytes in flight than registers allow for GC = 8.
//
// Precision: bf16 inputs, fp32 products, sums and statistics, ex2.approx for the exponentials, the
//   output rounded once to bf16 (partials stay fp32). Expected error vs an f64 reference: one bf16
//   rounding of the output (sim/sim_test.cpp measures relative L2 1.4e-3 to 1.8e-3 per row, every
//   element within half a bf16 ulp of its head's largest output).
//
// Requirements: q, k_cache, v_cache, out 16-byte aligned (every row is: D is a multiple of 8);
//   n_heads a multiple of n_kv_heads; every (slot, len) in range (the launcher checks them);
//   chunk >= 1; gridDim.x · chunk >= max len.
//
// Launch configuration (block = DEC_THREADS = 128 threads, no dynamic shared memory):
//   decode_attn_bf16_d{64,72,80,128}_g{1,2,4,8}(q, k_cache, v_cache, out, part_o, part_lse,
//                                               row_meta, capacity, n_heads, n_kv_heads, chunk, scale)
//     grid = (n_splits, n_kv_heads · ceil(group / GC), R), group = n_heads / n_kv_heads
//     static shared memory: 4·GC·D·4 + 2·4·GC·4 bytes (<= 16640)
//     part_o: fp32 [R, H, n_splits, D] and part_lse: fp32 [R, H, n_splits] (not read when n_splits
//     is 1, may then be NULL); nothing needs zeroing.
//   decode_attn_combine_bf16(part_o, part_lse, out, row_meta, n_rows, n_heads, head_dim, chunk, n_splits)
//     grid = (ceil(R·H / 4)), one warp per (row, head); only when n_splits > 1, same stream, after.
#include "common.cuh"

#define DEC_THREADS 128
#define DEC_WARPS 4

template <int D, int GC>
struct DecCfg {
    static constexpr int NV = D / 8;                               // 16-byte vectors in a key row
    static constexpr int TPK = NV <= 8 ? 8 : 16;                   // lanes per key (power of 2 >= NV)
    static constexpr int KPW = 32 / TPK;                           // keys per warp per load
    static constexpr int U = GC == 1 ? 8 : GC == 2 ? 6 : GC == 4 ? 4 : 2;  // keys per lane group per iteration
    static constexpr int KPI = DEC_WARPS * KPW * U;                // keys per block iteration
    static_assert(D % 8 == 0 && NV <= 16, "head dim: a multiple of 8, at most 128");
    static_assert(GC == 1 || GC == 2 || GC == 4 || GC == 8, "group chunk");
};

template <int D, int GC>
__device__ __forceinline__ void decode_split(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
                                             const __nv_bfloat16* __restrict__ v_cache, __nv_bfloat16* __restrict__ out,
                                             float* __restrict__ part_o, float* __restrict__ part_lse,
                                             const int* __restrict__ row_meta, int capacity, int n_heads, int n_kv_heads,
                                             int chunk, float scale) {
    using C = DecCfg<D, GC>;
    __align__(16) __shared__ float sm_acc[DEC_WARPS][GC][D];
    __shared__ float sm_m[DEC_WARPS][GC], sm_l[DEC_WARPS][GC];

    const int split = blockIdx.x, n_splits = gridDim.x, row = blockIdx.z;
    const int group = n_heads / n_kv_heads;
    const int n_gc = (group + GC - 1) / GC;
    const int kvh = blockIdx.y / n_gc, g0 = (blockIdx.y % n_gc) * GC;
    const int h0 = kvh * group + g0;      // first query head of this block
    const int n_h = min(GC, group - g0);  // query heads of this block
    const int slot = row_meta[2 * row], len = row_meta[2 * row + 1];
    const int p_begin = split * chunk;
    if (p_begin >= len) return;  // whole block: this row is shorter than the split's start
    const int p_end = min(len, p_begin + chunk);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int kg = lane / C::TPK, li = lane % C::TPK;  // key group in the warp, lane in the group
    const bool active = li < C::NV;                     // lanes past D/8 hold zeros
    const long long kv_stride = (long long)n_kv_heads * D;  // elements between positions
    const long long base = (long long)slot * capacity * kv_stride + (long long)kvh * D + li * 8;
    const __nv_bfloat16* kb = k_cache + base;
    const __nv_bfloat16* vb = v_cache + base;

    // This lane's 8 elements of each query head, in the base-2 score domain.
    const float qs = scale * KD_LOG2E;
    float qf[GC][8];
#pragma unroll
    for (int g = 0; g < GC; ++g) {
        if (active && g < n_h) {
            unpack_bf16x8(ldg_u4(q + ((long long)row * n_heads + h0 + g) * D + li * 8), qf[g]);
#pragma unroll
            for (int e = 0; e < 8; ++e) qf[g][e] *= qs;
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) qf[g][e] = 0.0f;
        }
    }
    float m[GC], l[GC], acc[GC][8];
#pragma unroll
    for (int g = 0; g < GC; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = 0.0f;
    }

    for (int p0 = p_begin; p0 < p_end; p0 += C::KPI) {
        // All loads of the iteration first. Key (u, warp, kg): the block covers 4·KPW consecutive
        // positions for each u.
        uint4 kr[C::U], vr[C::U];
#pragma unroll
        for (int u = 0; u < C::U; ++u) {
            const int p = p0 + (u * DEC_WARPS + warp) * C::KPW + kg;
            if (active && p < p_end) {
                kr[u] = ldg_u4(kb + p * kv_stride);
                vr[u] = ldg_u4(vb + p * kv_stride);
            } else {
                kr[u] = make_uint4(0u, 0u, 0u, 0u);
                vr[u] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        // Scores: partial dots over this lane's 8 elements, then summed over the TPK lanes.
        float s[C::U][GC];
#pragma unroll
        for (int u = 0; u < C::U; ++u) {
            float kf[8];
            unpack_bf16x8(kr[u], kf);
#pragma unroll
            for (int g = 0; g < GC; ++g) {
                float d = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; ++e) d = fmaf(qf[g][e], kf[e], d);
                s[u][g] = d;
            }
        }
#pragma unroll
        for (int o = C::TPK / 2; o > 0; o >>= 1) {
#pragma unroll
            for (int u = 0; u < C::U; ++u) {
#pragma unroll
                for (int g = 0; g < GC; ++g) s[u][g] += shfl_xor_f32(s[u][g], o);
            }
        }
        // Online softmax: one max and one rescale per U keys; s becomes the probabilities.
#pragma unroll
        for (int g = 0; g < GC; ++g) {
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < C::U; ++u) {
                const int p = p0 + (u * DEC_WARPS + warp) * C::KPW + kg;
                if (p >= p_end) s[u][g] = -INFINITY;
                mx = fmaxf(mx, s[u][g]);
            }
            const float ms = mx == -INFINITY ? 0.0f : mx;  // no key seen yet: avoid (−inf) − (−inf)
            const float corr = kd_exp2(m[g] - ms);
            m[g] = mx;
            float sum = l[g] * corr;
#pragma unroll
            for (int u = 0; u < C::U; ++u) {
                s[u][g] = kd_exp2(s[u][g] - ms);
                sum += s[u][g];
            }
            l[g] = sum;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] *= corr;
        }
#pragma unroll
        for (int u = 0; u < C::U; ++u) {
            float vf[8];
            unpack_bf16x8(vr[u], vf);
#pragma unroll
            for (int g = 0; g < GC; ++g) {
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(s[u][g], vf[e], acc[g][e]);
            }
        }
    }

    // Merge the lane groups of the warp (same li, different kg).
#pragma unroll
    for (int o = C::TPK; o < 32; o <<= 1) {
#pragma unroll
        for (int g = 0; g < GC; ++g) {
            const float mo = shfl_xor_f32(m[g], o), lo = shfl_xor_f32(l[g], o);
            const float mx = fmaxf(m[g], mo);
            const float ms = mx == -INFINITY ? 0.0f : mx;
            const float a = kd_exp2(m[g] - ms), b = kd_exp2(mo - ms);
            l[g] = l[g] * a + lo * b;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] = acc[g][e] * a + shfl_xor_f32(acc[g][e], o) * b;
            m[g] = mx;
        }
    }
    if (kg == 0 && active) {
#pragma unroll
        for (int g = 0; g < GC; ++g) {
            float4* dst = reinterpret_cast<float4*>(&sm_acc[warp][g][li * 8]);
            dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
            dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < GC; ++g) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
    }
    __syncthreads();

    // Merge the warps: one thread per (head, 8 elements).
    const bool direct = len <= chunk;  // the row has one split: write the output here
    for (int i = tid; i < n_h * C::NV; i += DEC_THREADS) {
        const int g = i / C::NV, c = (i % C::NV) * 8;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) mx = fmaxf(mx, sm_m[w][g]);
        const float ms = mx == -INFINITY ? 0.0f : mx;
        float sum = 0.0f, o[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] = 0.0f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) {
            const float a = kd_exp2(sm_m[w][g] - ms);
            sum += a * sm_l[w][g];
            const float4* src = reinterpret_cast<const float4*>(&sm_acc[w][g][c]);
            const float4 x0 = src[0], x1 = src[1];
            o[0] += a * x0.x; o[1] += a * x0.y; o[2] += a * x0.z; o[3] += a * x0.w;
            o[4] += a * x1.x; o[5] += a * x1.y; o[6] += a * x1.z; o[7] += a * x1.w;
        }
        const float inv = 1.0f / sum;
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] *= inv;
        const long long hrow = (long long)row * n_heads + h0 + g;
        if (direct) {
            *reinterpret_cast<uint4*>(out + hrow * D + c) = pack_bf16x8(o);
        } else {
            const long long pi = hrow * n_splits + split;
            float4* dst = reinterpret_cast<float4*>(part_o + pi * D + c);
            dst[0] = make_float4(o[0], o[1], o[2], o[3]);
            dst[1] = make_float4(o[4], o[5], o[6], o[7]);
            if (c == 0) part_lse[pi] = mx + log2f(sum);
        }
    }
}

#define KD_DECODE_ENTRY(DIM, GCH)                                                                                  \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) decode_attn_bf16_d##DIM##_g##GCH(                   \
        const __nv_bfloat16* q, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache, __nv_bfloat16* out,   \
        float* part_o, float* part_lse, const int* row_meta, int capacity, int n_heads, int n_kv_heads, int chunk, \
        float scale) {                                                                                            \
        decode_split<DIM, GCH>(q, k_cache, v_cache, out, part_o, part_lse, row_meta, capacity, n_heads, n_kv_heads, \
                               chunk, scale);                                                                     \
    }
#define KD_DECODE_ENTRIES(DIM) \
    KD_DECODE_ENTRY(DIM, 1)    \
    KD_DECODE_ENTRY(DIM, 2)    \
    KD_DECODE_ENTRY(DIM, 4)    \
    KD_DECODE_ENTRY(DIM, 8)

KD_DECODE_ENTRIES(64)
KD_DECODE_ENTRIES(72)
KD_DECODE_ENTRIES(80)
KD_DECODE_ENTRIES(128)

// Merges the splits of every (row, head) whose row has more than one (len > chunk):
//   out = Σ_s 2^(lse_s − M) · o_s / Σ_s 2^(lse_s − M),   M = max_s lse_s,  s < ceil(len / chunk).
// One warp per (row, head); rows with a single split were written by the split kernel.
extern "C" __global__ void __launch_bounds__(DEC_THREADS)
decode_attn_combine_bf16(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                         __nv_bfloat16* __restrict__ out, const int* __restrict__ row_meta, int n_rows, int n_heads,
                         int head_dim, int chunk, int n_splits) {
    const long long hrow = (long long)blockIdx.x * DEC_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (hrow >= (long long)n_rows * n_heads) return;  // whole warps leave together
    const int len = row_meta[2 * (hrow / n_heads) + 1];
    const int n_valid = (len - 1) / chunk + 1;
    if (n_valid <= 1) return;
    const float* lse = part_lse + hrow * n_splits;
    float mx = -INFINITY;
    for (int s = lane; s < n_valid; s += 32) mx = fmaxf(mx, lse[s]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int s = lane; s < n_valid; s += 32) sum += kd_exp2(lse[s] - mx);
    const float inv = 1.0f / warp_sum(sum);
    const float* po = part_o + hrow * n_splits * head_dim;
    for (int c = lane; c < head_dim; c += 32) {
        float o = 0.0f;
        for (int s = 0; s < n_valid; ++s) o += kd_exp2(lse[s] - mx) * po[(long long)s * head_dim + c];
        out[hrow * head_dim + c] = f32_to_bf16(o * inv);
    }
}
