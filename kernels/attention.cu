// attention.cu: fused (flash-style, online-softmax) attention over packed sequences with GQA,
// forward and backward, causal or not, head dims 64, 72, 80 and 128.
//
// What it computes (CPU reference: src/backend/cpu/attention.rs, same saved state):
//   q, out: [T, H, D] bf16; k, v: [T, Hkv, D] bf16; token-major, sequences packed back to back,
//   sequence s = tokens cu_seqlens[s] .. cu_seqlens[s+1]; query head h reads kv head h / (H / Hkv).
//   Forward, per sequence, head h, local query i, visible keys j (j < len; j <= i when causal):
//     S_ij = scale · q_i·k_j,  lse_i = log Σ_j exp(S_ij)  (fp32 [T, H], natural log),
//     out_i = Σ_j exp(S_ij − lse_i) · v_j
//   Backward (FlashAttention-2 formulation, recomputing P from lse):
//     delta_i = Σ_d dO_i ∘ O_i                                (flash_attn_bwd_preprocess_bf16)
//     dS_ij = P_ij · (dO_i·v_j − delta_i)
//     dq_i = scale · Σ_j dS_ij k_j     (fp32 atomics into dq_accum [T, H, D], zeroed by the launcher,
//                                       then flash_attn_dq_to_bf16 converts it)
//     dk_j = scale · Σ_{h in group} Σ_i dS_ij q_i,   dv_j = Σ_{h in group} Σ_i P_ij dO_i
//                                      (written, not accumulated: one block owns each (kv head, key tile))
//   scale is a parameter (the model passes 1/sqrt(D)).
//
// Design (FlashAttention-2 on mma.sync, the Ampere/Hopper-compatible tensor-core path):
//   * 4 warps per block. Matrix products use mma.sync.m16n8k16 (bf16 inputs, fp32 accumulate);
//     operands come from shared memory through ldmatrix (x4, plain or transposed), so no operand is
//     ever transposed in memory. Tiles are loaded with cp.async (16 B per copy, zero-filled beyond
//     the sequence and in the padding columns).
//   * Head dims that are not multiples of 16 (72, 80) are padded to DP = round_up(D, 16) columns of
//     zeros in shared memory (the k dimension of q·kᵀ); the d dimension of the products with V, dO,
//     Q and K only needs multiples of 8 (D/8 n-tiles). Rows are padded by 8 elements (16 bytes):
//     the 8 row addresses of every ldmatrix phase then fall in distinct banks.
//   * Forward: block = (query tile of 64, head, sequence); each warp owns 16 query rows and keeps
//     its Q fragments, its O accumulator (16 × D fp32) and its running max/sum in registers, and
//     walks the key tiles (64 keys). Scores are kept in the base-2 domain (scale·log2 e folded in)
//     so each probability is one ex2. The V tile load overlaps q·kᵀ; the next K tile's load
//     overlaps the softmax and P·V. The Q tile is staged through the V buffer, so shared memory is
//     2 tiles. Query tiles are scheduled last-first (blockIdx.x reversed) so the longest causal
//     tiles start first.
//   * Backward: block = (key tile of 64, kv head, sequence), looping over the group's query heads
//     and the query tiles (BWD_BM = 64 rows) that see the key tile. dK and dV are accumulated in
//     registers for the whole loop, so GQA's sum over the heads of a group needs no atomics.
//     D ≤ 80: 4 warps, each owning 16 keys and all of d (dK and dV: 16 × D fp32 each). It computes
//     Sᵀ and dPᵀ (keys × queries) directly, so Pᵀ and dSᵀ are already in the A-fragment layout of
//     dV += Pᵀ·dO and dK += dSᵀ·Q. D = 128: that would be 128 accumulator registers per thread
//     (ptxas needed 255 and spilled), so 8 warps, two per group of 16 keys: each computes Sᵀ and
//     dPᵀ for half of the tile's queries, the pair exchanges Pᵀ and dSᵀ (bf16) through shared
//     memory, and each accumulates dK and dV for half of d (135 registers, no spill; 8 warps per
//     SM, as two 4-warp blocks of 255 registers were). dSᵀ is staged in shared memory (bf16) for
//     dQ = dS·K, which the warps split by query rows and d and add to dq_accum with fp32 atomics
//     (the order of those adds varies: dq is not bit-reproducible run to run; dk, dv, out and lse
//     are).
//   * What a faster version changes (FlashAttention-3 on sm_90a): wgmma from shared memory by
//     warpgroups (HGMMA instead of HMMA), TMA tile loads into a 2–3 stage mbarrier pipeline,
//     producer/consumer warp specialisation with setmaxnreg, and softmax overlapped with the next
//     q·kᵀ (ping-pong between two warpgroups). Also larger tiles (128 query rows per block, 8
//     warps), and a split into dK/dV and dQ kernels to avoid the dQ atomics.
//
// Precision: bf16 operands, fp32 accumulation and softmax statistics; P and dS are rounded to bf16
//   for the second products (as FlashAttention does); ex2.approx for the exponentials. Expected
//   relative error vs the f64 CPU reference: ~3e-3 (bf16 bound, ≤ 1e-2).
//
// Requirements: q, k, v, out, dout, dk, dv 16-byte aligned (every row is, since D is a multiple
//   of 8); n_heads a multiple of n_kv_heads; cu_seqlens non-decreasing with cu_seqlens[0] = 0 (or any
//   base) and max_seqlen >= every sequence length.
//
// Launch configuration (block = ATT_THREADS = 128 threads for every kernel here but the D = 128
// backward, which takes AttCfg<128>::BWD_THREADS = 256):
//   flash_attn_fwd_bf16_d{64,72,80,128}(q, k, v, out, lse, cu_seqlens, n_seqs, max_seqlen,
//                                       n_heads, n_kv_heads, causal, scale)
//     grid = (ceil(max_seqlen / 64), n_heads, n_seqs)
//     dynamic shared memory = 4 · 64 · LD bytes, LD = round_up(D, 16) + 8:
//       D=64: 18432, D=72: 22528, D=80: 22528, D=128: 34816 (all below 48 KB: no attribute needed)
//   flash_attn_bwd_preprocess_bf16(out, dout, delta, n_rows = T·H, head_dim)
//     grid = (ceil(T·H / 4)), one warp per (token, head) row; no shared memory
//   flash_attn_bwd_bf16_d{64,72,80,128}(q, k, v, dout, lse, delta, dq_accum, dk, dv, cu_seqlens,
//                                       n_seqs, max_seqlen, n_heads, n_kv_heads, causal, scale)
//     dq_accum: fp32 [T, H, D], ZEROED by the launcher before the launch.
//     grid = (ceil(max_seqlen / 64), n_kv_heads, n_seqs), block = 128 threads (256 for D = 128)
//     dynamic shared memory (AttCfg::BWD_SMEM) = 2·(2·64·LD + 2·64·LD + 64·72·n) + 512 bytes,
//       n = 1 tile (dSᵀ) for D ≤ 80, 2 (Pᵀ and dSᵀ) for D = 128:
//       D=64: 46592, D=72: 54784, D=80: 54784, D=128: 88576
//     The launcher must raise CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES to this value once
//     per function when it exceeds 48 KB (49152).
//   flash_attn_dq_to_bf16(dq_accum, dq, n = T·H·D)
//     grid = (min(ceil(n / 256), 8 · SM count)), grid-stride; no shared memory
#include "common.cuh"

#define ATT_THREADS 128
#define ATT_BM 64  // forward query tile: 4 warps × 16 rows
#define ATT_BN 64  // key tile (forward and backward): 4 warps × 16 keys in the backward

template <int D>
struct AttCfg {
    static constexpr int DP = (D + 15) / 16 * 16;  // head dim padded to the mma k of 16
    static constexpr int LD = DP + 8;              // shared-memory row stride in elements
    static constexpr int NKS = DP / 16;            // k-steps of q·kᵀ over the head dim
    static constexpr int NDT = D / 8;              // n-tiles of 8 over the head dim
    static constexpr int NCH = DP / 8;             // 16-byte chunks per padded row
    // Backward: warps sharing each group of 16 keys, each accumulating dK and dV over a 1/BWD_WN
    // slice of d. One warp per group would hold 16 keys × D × 2 fp32 accumulators, 2·D/8 registers
    // per thread: at D = 128 that is 128, and with Sᵀ, dPᵀ and the addresses ptxas needed 255
    // registers and spilled. Two warps per group halve it; they then exchange Pᵀ and dSᵀ through
    // shared memory instead of keeping them in registers.
    static constexpr int BWD_WN = D > 80 ? 2 : 1;
    static constexpr int BWD_THREADS = ATT_THREADS * BWD_WN;
    static constexpr int BWD_BM = 64;  // query rows per tile
    static constexpr int BWD_LDS = BWD_BM + 8;  // row stride of the Pᵀ and dSᵀ tiles
    static constexpr int BWD_SMEM = 2 * (2 * ATT_BN * LD + 2 * BWD_BM * LD + ATT_BN * BWD_LDS * (BWD_WN > 1 ? 2 : 1)) + 8 * BWD_BM;
    static_assert(D % 8 == 0, "head dim must be a multiple of 8");
};

// Subtraction reference for a running max (−inf → 0: 2^(−inf − 0) = 0, never NaN).
__device__ __forceinline__ float att_max_ref(float m) { return m == -INFINITY ? 0.0f : m; }

// Issues the cp.async copies of a tile of R rows × DP columns of a [T, heads, D] tensor, head hh,
// global tokens tok0 .. tok0 + R − 1, of which the first n_valid exist; the rest, and the padding
// columns D .. DP − 1, are zero-filled. Destination row stride LD. NT: the block's threads.
template <int D, int R, int NT>
__device__ __forceinline__ void att_load_tile(__nv_bfloat16* smem, const __nv_bfloat16* src, long long tok0,
                                              int n_valid, int heads, int hh) {
    using C = AttCfg<D>;
    for (int idx = threadIdx.x; idx < R * C::NCH; idx += NT) {
        const int row = idx / C::NCH, ch = idx - row * C::NCH;
        const bool valid = row < n_valid && ch * 8 < D;
        const __nv_bfloat16* g = valid ? src + ((tok0 + row) * heads + hh) * (long long)D + ch * 8 : src;
        cp_async16(smem + row * C::LD + ch * 8, g, valid);
    }
}

// Address for ldmatrix.x4 of a 16×16 A operand (rows r0.., cols c0..) stored row-major at `base`
// with row stride ld: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15),
// (rows 8-15, cols 8-15) → a[0..3] of mma m16n8k16.
__device__ __forceinline__ const __nv_bfloat16* a_frag_addr(const __nv_bfloat16* base, int ld, int r0, int c0, int lane) {
    return base + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + c0 + (lane >> 4) * 8;
}

// Address for ldmatrix.x4 (plain) of the B operands of two n-tiles when B[k][n] = X[n][k], X stored
// row-major (rows = n): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
// → (b0, b1) of n-tile n0 and (b0, b1) of n-tile n0 + 8.
__device__ __forceinline__ const __nv_bfloat16* bt_frag_addr(const __nv_bfloat16* base, int ld, int n0, int k0, int lane) {
    return base + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8;
}

// Address for ldmatrix.x4.trans of the B operands of two n-tiles when B[k][n] = X[k][n], X stored
// row-major (rows = k): matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
// → (b0, b1) of n-tile n0 and (b0, b1) of n-tile n0 + 8.
__device__ __forceinline__ const __nv_bfloat16* b_frag_addr_trans(const __nv_bfloat16* base, int ld, int k0, int n0, int lane) {
    return base + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8;
}

// Address for ldmatrix.x4.trans of a 16×16 A operand A[m][k] = X[k][m], X stored row-major
// (rows = k): matrices (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15) → a[0..3].
__device__ __forceinline__ const __nv_bfloat16* at_frag_addr_trans(const __nv_bfloat16* base, int ld, int m0, int k0, int lane) {
    return base + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8;
}

// acc[0 .. NT) += A·X[:, n-tiles dt0 .. dt0 + NT): A is 16 rows × 16·KS (k-step kk's fragment
// written by a_of(kk, a)), X is [16·KS][LD] bf16 in shared memory, read transposed by ldmatrix.
template <int KS, int NT, int LD, class AFrag>
__device__ __forceinline__ void mma_a_x(float (*acc)[4], AFrag a_of, const __nv_bfloat16* X, int dt0, int lane) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        uint32_t a[4];
        a_of(kk, a);
#pragma unroll
        for (int dp = 0; dp < (NT + 1) / 2; ++dp) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, b_frag_addr_trans(X, LD, kk * 16, (dt0 + 2 * dp) * 8, lane));
            mma_bf16_16816(acc[2 * dp], a, b[0], b[1]);
            if (2 * dp + 1 < NT) mma_bf16_16816(acc[2 * dp + 1], a, b[2], b[3]);
        }
    }
}

// Accumulator pair (n-tiles 2kk, 2kk+1 of a 16-row C fragment) → bf16 A fragment with k = the
// accumulator's n (the FlashAttention-2 register reuse: C layout of m16n8 = A layout of m16n8k16).
__device__ __forceinline__ void acc_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = pack_bf16x2(c0[0], c0[1]);
    a[1] = pack_bf16x2(c0[2], c0[3]);
    a[2] = pack_bf16x2(c1[0], c1[1]);
    a[3] = pack_bf16x2(c1[2], c1[3]);
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <int D>
__device__ __forceinline__ void flash_fwd(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                          const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ out,
                                          float* __restrict__ lse, const int* __restrict__ cu_seqlens, int n_seqs,
                                          int n_heads, int n_kv_heads, int causal, float scale) {
    using C = AttCfg<D>;
    KD_DYNAMIC_SMEM(kd_att_smem);
    __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(kd_att_smem);  // [BN][LD]
    __nv_bfloat16* Vs = Ks + ATT_BN * C::LD;                              // [BN][LD]; Q [BM][LD] first

    const int seq = blockIdx.z, h = blockIdx.y;
    if (seq >= n_seqs) return;
    const int qt = gridDim.x - 1 - blockIdx.x;
    const long long start = cu_seqlens[seq];
    const int len = cu_seqlens[seq + 1] - (int)start;
    const int q0 = qt * ATT_BM;
    if (q0 >= len) return;
    const int kvh = h / (n_heads / n_kv_heads);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const int k_end = causal ? min(len, q0 + ATT_BM) : len;
    const int n_kt = (k_end + ATT_BN - 1) / ATT_BN;

    // Prologue: Q tile (staged in Vs) and K tile 0.
    att_load_tile<D, ATT_BM, ATT_THREADS>(Vs, q, start + q0, min(ATT_BM, len - q0), n_heads, h);
    att_load_tile<D, ATT_BN, ATT_THREADS>(Ks, k, start, min(ATT_BN, len), n_kv_heads, kvh);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[C::NKS][4];
#pragma unroll
    for (int kk = 0; kk < C::NKS; ++kk) ldmatrix_x4(qf[kk], a_frag_addr(Vs, C::LD, warp * 16, kk * 16, lane));
    __syncthreads();  // Q is in registers: Vs is free

    float o[C::NDT][4];
#pragma unroll
    for (int t = 0; t < C::NDT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.0f, 0.0f};
    const float sl2 = scale * KD_LOG2E;
    const int qi0 = q0 + warp * 16 + g;  // local query index of accumulator rows g and g + 8
    const int qi1 = qi0 + 8;

    for (int kt = 0; kt < n_kt; ++kt) {
        const int k0 = kt * ATT_BN;
        att_load_tile<D, ATT_BN, ATT_THREADS>(Vs, v, start + k0, min(ATT_BN, len - k0), n_kv_heads, kvh);
        cp_async_commit();

        // S = Q·Kᵀ (16 × 64 per warp)
        float s[ATT_BN / 8][4];
#pragma unroll
        for (int t = 0; t < ATT_BN / 8; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < C::NKS; ++kk) {
#pragma unroll
            for (int np = 0; np < ATT_BN / 16; ++np) {
                uint32_t b[4];
                ldmatrix_x4(b, bt_frag_addr(Ks, C::LD, np * 16, kk * 16, lane));
                mma_bf16_16816(s[2 * np], qf[kk], b[0], b[1]);
                mma_bf16_16816(s[2 * np + 1], qf[kk], b[2], b[3]);
            }
        }

        // Scale to base 2, mask, online softmax.
        float mx0 = m_r[0], mx1 = m_r[1];
#pragma unroll
        for (int t = 0; t < ATT_BN / 8; ++t) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + t * 8 + 2 * tq + (e & 1);
                const int qi = e < 2 ? qi0 : qi1;
                const bool ok = key < len && (!causal || key <= qi);
                s[t][e] = ok ? s[t][e] * sl2 : -INFINITY;
            }
            mx0 = fmaxf(mx0, fmaxf(s[t][0], s[t][1]));
            mx1 = fmaxf(mx1, fmaxf(s[t][2], s[t][3]));
        }
        mx0 = fmaxf(mx0, shfl_xor_f32(mx0, 1));
        mx0 = fmaxf(mx0, shfl_xor_f32(mx0, 2));
        mx1 = fmaxf(mx1, shfl_xor_f32(mx1, 1));
        mx1 = fmaxf(mx1, shfl_xor_f32(mx1, 2));
        const float ref0 = att_max_ref(mx0), ref1 = att_max_ref(mx1);
        const float corr0 = kd_exp2(m_r[0] - ref0), corr1 = kd_exp2(m_r[1] - ref1);
        m_r[0] = mx0;
        m_r[1] = mx1;
        float ls0 = 0.0f, ls1 = 0.0f;
#pragma unroll
        for (int t = 0; t < ATT_BN / 8; ++t) {
            s[t][0] = kd_exp2(s[t][0] - ref0);
            s[t][1] = kd_exp2(s[t][1] - ref0);
            s[t][2] = kd_exp2(s[t][2] - ref1);
            s[t][3] = kd_exp2(s[t][3] - ref1);
            ls0 += s[t][0] + s[t][1];
            ls1 += s[t][2] + s[t][3];
        }
        l_r[0] = l_r[0] * corr0 + ls0;  // per-thread partial row sums; reduced over the quad at the end
        l_r[1] = l_r[1] * corr1 + ls1;
#pragma unroll
        for (int t = 0; t < C::NDT; ++t) {
            o[t][0] *= corr0;
            o[t][1] *= corr0;
            o[t][2] *= corr1;
            o[t][3] *= corr1;
        }

        // V tile ready (own copies), visible to all (barrier); every warp is past its Ks reads.
        cp_async_wait<0>();
        __syncthreads();
        if (kt + 1 < n_kt) {
            att_load_tile<D, ATT_BN, ATT_THREADS>(Ks, k, start + k0 + ATT_BN, min(ATT_BN, len - k0 - ATT_BN), n_kv_heads, kvh);
        }
        cp_async_commit();

        // O += P·V
        mma_a_x<ATT_BN / 16, C::NDT, C::LD>(o, [&](int kk, uint32_t a[4]) { acc_to_a(a, s[2 * kk], s[2 * kk + 1]); }, Vs, 0, lane);
        cp_async_wait<0>();  // next K tile
        __syncthreads();     // Ks ready for everyone; every warp is past its Vs reads
    }

    // Epilogue: full row sums, normalise, store O (bf16) and lse (fp32, natural log).
    float l0 = l_r[0], l1 = l_r[1];
    l0 += shfl_xor_f32(l0, 1);
    l0 += shfl_xor_f32(l0, 2);
    l1 += shfl_xor_f32(l1, 1);
    l1 += shfl_xor_f32(l1, 2);
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    if (qi0 < len) {
        __nv_bfloat16* orow = out + ((start + qi0) * n_heads + h) * (long long)D;
#pragma unroll
        for (int t = 0; t < C::NDT; ++t)
            *reinterpret_cast<uint32_t*>(orow + t * 8 + 2 * tq) = pack_bf16x2(o[t][0] * inv0, o[t][1] * inv0);
        if (tq == 0) lse[(start + qi0) * n_heads + h] = (m_r[0] + log2f(l0)) * KD_LN2;
    }
    if (qi1 < len) {
        __nv_bfloat16* orow = out + ((start + qi1) * n_heads + h) * (long long)D;
#pragma unroll
        for (int t = 0; t < C::NDT; ++t)
            *reinterpret_cast<uint32_t*>(orow + t * 8 + 2 * tq) = pack_bf16x2(o[t][2] * inv1, o[t][3] * inv1);
        if (tq == 0) lse[(start + qi1) * n_heads + h] = (m_r[1] + log2f(l1)) * KD_LN2;
    }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
template <int D>
__device__ __forceinline__ void flash_bwd(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                          const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ dout,
                                          const float* __restrict__ lse, const float* __restrict__ delta,
                                          float* __restrict__ dq_accum, __nv_bfloat16* __restrict__ dk,
                                          __nv_bfloat16* __restrict__ dv, const int* __restrict__ cu_seqlens, int n_seqs,
                                          int n_heads, int n_kv_heads, int causal, float scale) {
    using C = AttCfg<D>;
    constexpr int BM = C::BWD_BM;
    constexpr int LDS = C::BWD_LDS;
    constexpr int WN = C::BWD_WN;              // warps per group of 16 keys
    constexpr int NT = C::BWD_THREADS;
    constexpr int BMW = BM / WN;               // query columns of Sᵀ and dPᵀ per warp
    constexpr int NDTK = C::NDT / WN;          // d n-tiles of dK and dV per warp
    constexpr int QW = BM / 16;                // warps along the query rows in the dQ product
    constexpr int NSPLIT = NT / 32 / QW;       // ... and along d
    constexpr int NDTW = C::NDT / NSPLIT;      // d n-tiles per warp in the dQ product
    static_assert(C::NDT % WN == 0 && C::NDT % NSPLIT == 0 && BMW % 16 == 0, "backward work split");
    KD_DYNAMIC_SMEM(kd_att_smem);
    __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(kd_att_smem);  // [BN][LD]
    __nv_bfloat16* Vs = Ks + ATT_BN * C::LD;                              // [BN][LD]
    __nv_bfloat16* Qs = Vs + ATT_BN * C::LD;                              // [BM][LD]
    __nv_bfloat16* dOs = Qs + BM * C::LD;                                 // [BM][LD]
    __nv_bfloat16* dSs = dOs + BM * C::LD;                                // [BN][LDS]: dSᵀ (keys × queries)
    __nv_bfloat16* Ps = dSs + ATT_BN * LDS;                               // [BN][LDS]: Pᵀ, only when WN > 1
    float* lse2_s = reinterpret_cast<float*>(Ps + (WN > 1 ? ATT_BN * LDS : 0));  // [BM]: lse · log2 e
    float* delta_s = lse2_s + BM;                                                // [BM]

    const int seq = blockIdx.z, kvh = blockIdx.y, kt = blockIdx.x;
    if (seq >= n_seqs) return;
    const long long start = cu_seqlens[seq];
    const int len = cu_seqlens[seq + 1] - (int)start;
    const int k0 = kt * ATT_BN;
    if (k0 >= len) return;
    const int group = n_heads / n_kv_heads;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const int kr0 = (warp % 4) * 16;           // this warp's 16 keys (rows of Sᵀ, dK, dV) ...
    const int qc0 = (warp / 4) * BMW;          // ... its query columns of Sᵀ and dPᵀ ...
    const int dc0 = (warp / 4) * NDTK;         // ... and its d n-tiles of dK and dV
    const int key_a = k0 + kr0 + g;            // local key index of accumulator rows g and g + 8
    const int key_b = key_a + 8;
    const float sl2 = scale * KD_LOG2E;

    att_load_tile<D, ATT_BN, NT>(Ks, k, start + k0, min(ATT_BN, len - k0), n_kv_heads, kvh);
    att_load_tile<D, ATT_BN, NT>(Vs, v, start + k0, min(ATT_BN, len - k0), n_kv_heads, kvh);
    cp_async_commit();

    float dkacc[NDTK][4], dvacc[NDTK][4];
#pragma unroll
    for (int t = 0; t < NDTK; ++t) {
        dkacc[t][0] = dkacc[t][1] = dkacc[t][2] = dkacc[t][3] = 0.0f;
        dvacc[t][0] = dvacc[t][1] = dvacc[t][2] = dvacc[t][3] = 0.0f;
    }
    const int qt_begin = causal ? k0 / BM : 0;
    const int n_qt = (len + BM - 1) / BM;
    const int qr0 = (warp % QW) * 16;        // dQ product: this warp's query rows ...
    const int dt0 = (warp / QW) * NDTW;      // ... and d n-tiles
    // A fragments of this warp's 16 rows of a [BN][LDS] tile in shared memory (Pᵀ or dSᵀ).
    auto smem_rows = [&](const __nv_bfloat16* tile) {
        return [=](int kk, uint32_t a[4]) { ldmatrix_x4(a, a_frag_addr(tile, LDS, kr0, kk * 16, lane)); };
    };
    // bf16 pairs of a 16 × BMW accumulator → rows kr0 .., columns qc0 .. of a [BN][LDS] tile.
    auto store_rows = [&](__nv_bfloat16* tile, const float (*acc)[4]) {
#pragma unroll
        for (int t = 0; t < BMW / 8; ++t) {
            *reinterpret_cast<uint32_t*>(tile + (kr0 + g) * LDS + qc0 + t * 8 + 2 * tq) = pack_bf16x2(acc[t][0], acc[t][1]);
            *reinterpret_cast<uint32_t*>(tile + (kr0 + g + 8) * LDS + qc0 + t * 8 + 2 * tq) = pack_bf16x2(acc[t][2], acc[t][3]);
        }
    };

    for (int hh = 0; hh < group; ++hh) {
        const int h = kvh * group + hh;
        for (int qt = qt_begin; qt < n_qt; ++qt) {
            const int q0 = qt * BM;
            const int q_valid = min(BM, len - q0);
            __syncthreads();  // everyone is past the previous tile's Qs/dOs/dSs/Ps/lse/delta reads
            att_load_tile<D, BM, NT>(Qs, q, start + q0, q_valid, n_heads, h);
            att_load_tile<D, BM, NT>(dOs, dout, start + q0, q_valid, n_heads, h);
            cp_async_commit();
            for (int i = tid; i < BM; i += NT) {
                const bool ok = i < q_valid;
                const long long row = (start + q0 + i) * n_heads + h;
                lse2_s[i] = ok ? lse[row] * KD_LOG2E : INFINITY;
                delta_s[i] = ok ? delta[row] : 0.0f;
            }
            cp_async_wait<0>();
            __syncthreads();

            // Sᵀ = K_w·Qᵀ (16 keys × BMW queries per warp)
            float st[BMW / 8][4];
#pragma unroll
            for (int t = 0; t < BMW / 8; ++t) st[t][0] = st[t][1] = st[t][2] = st[t][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < C::NKS; ++kk) {
                uint32_t ka[4];
                ldmatrix_x4(ka, a_frag_addr(Ks, C::LD, kr0, kk * 16, lane));
#pragma unroll
                for (int np = 0; np < BMW / 16; ++np) {
                    uint32_t b[4];
                    ldmatrix_x4(b, bt_frag_addr(Qs, C::LD, qc0 + np * 16, kk * 16, lane));
                    mma_bf16_16816(st[2 * np], ka, b[0], b[1]);
                    mma_bf16_16816(st[2 * np + 1], ka, b[2], b[3]);
                }
            }
            // Pᵀ = exp(S − lse), masked
#pragma unroll
            for (int t = 0; t < BMW / 8; ++t) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = qc0 + t * 8 + 2 * tq + (e & 1);
                    const int qi = q0 + col;
                    const int key = e < 2 ? key_a : key_b;
                    const bool ok = key < len && qi < len && (!causal || key <= qi);
                    st[t][e] = ok ? kd_exp2(st[t][e] * sl2 - lse2_s[col]) : 0.0f;
                }
            }
            // dV += Pᵀ·dO: from registers when this warp holds all of Pᵀ's columns, else after the
            // exchange below.
            if constexpr (WN == 1) {
                mma_a_x<BM / 16, NDTK, C::LD>(dvacc, [&](int kk, uint32_t a[4]) { acc_to_a(a, st[2 * kk], st[2 * kk + 1]); }, dOs, dc0, lane);
            } else {
                store_rows(Ps, st);
            }
            // dPᵀ = V_w·dOᵀ
            float dpt[BMW / 8][4];
#pragma unroll
            for (int t = 0; t < BMW / 8; ++t) dpt[t][0] = dpt[t][1] = dpt[t][2] = dpt[t][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < C::NKS; ++kk) {
                uint32_t va[4];
                ldmatrix_x4(va, a_frag_addr(Vs, C::LD, kr0, kk * 16, lane));
#pragma unroll
                for (int np = 0; np < BMW / 16; ++np) {
                    uint32_t b[4];
                    ldmatrix_x4(b, bt_frag_addr(dOs, C::LD, qc0 + np * 16, kk * 16, lane));
                    mma_bf16_16816(dpt[2 * np], va, b[0], b[1]);
                    mma_bf16_16816(dpt[2 * np + 1], va, b[2], b[3]);
                }
            }
            // dSᵀ = Pᵀ ∘ (dPᵀ − delta)   (masked entries have P = 0)
#pragma unroll
            for (int t = 0; t < BMW / 8; ++t) {
#pragma unroll
                for (int e = 0; e < 4; ++e) st[t][e] = st[t][e] * (dpt[t][e] - delta_s[qc0 + t * 8 + 2 * tq + (e & 1)]);
            }
            // dK += dSᵀ·Q   (scale applied at the end)
            if constexpr (WN == 1)
                mma_a_x<BM / 16, NDTK, C::LD>(dkacc, [&](int kk, uint32_t a[4]) { acc_to_a(a, st[2 * kk], st[2 * kk + 1]); }, Qs, dc0, lane);
            // dSᵀ → shared memory (bf16), for dQ = dS·K across the block's 64 keys (and for the
            // other warp of this key group when WN > 1).
            store_rows(dSs, st);
            __syncthreads();
            if constexpr (WN > 1) {
                mma_a_x<BM / 16, NDTK, C::LD>(dvacc, smem_rows(Ps), dOs, dc0, lane);
                mma_a_x<BM / 16, NDTK, C::LD>(dkacc, smem_rows(dSs), Qs, dc0, lane);
            }

            // dQ[qr0 .. qr0+15, d-tiles dt0 ..] += scale · dS·K, into dq_accum with fp32 atomics.
            float dqacc[NDTW][4];
#pragma unroll
            for (int t = 0; t < NDTW; ++t) dqacc[t][0] = dqacc[t][1] = dqacc[t][2] = dqacc[t][3] = 0.0f;
            mma_a_x<ATT_BN / 16, NDTW, C::LD>(
                dqacc, [&](int kk, uint32_t a[4]) { ldmatrix_x4_trans(a, at_frag_addr_trans(dSs, LDS, qr0, kk * 16, lane)); }, Ks, dt0, lane);
            const int qa = q0 + qr0 + g, qb = qa + 8;
            if (qa < len) {
                float* row = dq_accum + ((start + qa) * n_heads + h) * (long long)D;
#pragma unroll
                for (int t = 0; t < NDTW; ++t) {
                    atomicAdd(row + (dt0 + t) * 8 + 2 * tq, scale * dqacc[t][0]);
                    atomicAdd(row + (dt0 + t) * 8 + 2 * tq + 1, scale * dqacc[t][1]);
                }
            }
            if (qb < len) {
                float* row = dq_accum + ((start + qb) * n_heads + h) * (long long)D;
#pragma unroll
                for (int t = 0; t < NDTW; ++t) {
                    atomicAdd(row + (dt0 + t) * 8 + 2 * tq, scale * dqacc[t][2]);
                    atomicAdd(row + (dt0 + t) * 8 + 2 * tq + 1, scale * dqacc[t][3]);
                }
            }
        }
    }

    // dK (scaled) and dV of this warp's 16 keys and d n-tiles, bf16.
    if (key_a < len) {
        const long long row = ((start + key_a) * n_kv_heads + kvh) * (long long)D;
#pragma unroll
        for (int t = 0; t < NDTK; ++t) {
            const int col = (dc0 + t) * 8 + 2 * tq;
            *reinterpret_cast<uint32_t*>(dk + row + col) = pack_bf16x2(scale * dkacc[t][0], scale * dkacc[t][1]);
            *reinterpret_cast<uint32_t*>(dv + row + col) = pack_bf16x2(dvacc[t][0], dvacc[t][1]);
        }
    }
    if (key_b < len) {
        const long long row = ((start + key_b) * n_kv_heads + kvh) * (long long)D;
#pragma unroll
        for (int t = 0; t < NDTK; ++t) {
            const int col = (dc0 + t) * 8 + 2 * tq;
            *reinterpret_cast<uint32_t*>(dk + row + col) = pack_bf16x2(scale * dkacc[t][2], scale * dkacc[t][3]);
            *reinterpret_cast<uint32_t*>(dv + row + col) = pack_bf16x2(dvacc[t][2], dvacc[t][3]);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Entry points
// ------------------------------------------------------------------------------------------------
#define KD_FLASH_ENTRIES(DIM)                                                                                    \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_attn_fwd_bf16_d##DIM(                       \
        const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* out, float* lse, \
        const int* cu_seqlens, int n_seqs, int max_seqlen, int n_heads, int n_kv_heads, int causal, float scale) { \
        (void)max_seqlen;                                                                                        \
        flash_fwd<DIM>(q, k, v, out, lse, cu_seqlens, n_seqs, n_heads, n_kv_heads, causal, scale);               \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(AttCfg<DIM>::BWD_THREADS) flash_attn_bwd_bf16_d##DIM(         \
        const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const __nv_bfloat16* dout,      \
        const float* lse, const float* delta, float* dq_accum, __nv_bfloat16* dk, __nv_bfloat16* dv,            \
        const int* cu_seqlens, int n_seqs, int max_seqlen, int n_heads, int n_kv_heads, int causal, float scale) { \
        (void)max_seqlen;                                                                                        \
        flash_bwd<DIM>(q, k, v, dout, lse, delta, dq_accum, dk, dv, cu_seqlens, n_seqs, n_heads, n_kv_heads,    \
                       causal, scale);                                                                           \
    }

KD_FLASH_ENTRIES(64)
KD_FLASH_ENTRIES(72)
KD_FLASH_ENTRIES(80)
KD_FLASH_ENTRIES(128)

// delta[row] = Σ_d f32(dout[row, d]) · f32(out[row, d]), row = token·H + head; one warp per row.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
flash_attn_bwd_preprocess_bf16(const __nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ dout,
                               float* __restrict__ delta, long long n_rows, int head_dim) {
    const long long row = (long long)blockIdx.x * (ATT_THREADS / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;  // whole warps leave together
    const __nv_bfloat16* o = out + row * head_dim;
    const __nv_bfloat16* d = dout + row * head_dim;
    float acc = 0.0f;
    for (int c = lane; c < head_dim; c += 32) acc += bf16_to_f32(o[c]) * bf16_to_f32(d[c]);
    acc = warp_sum(acc);
    if (lane == 0) delta[row] = acc;
}

// dq[i] = bf16(dq_accum[i]), grid-stride.
extern "C" __global__ void __launch_bounds__(256)
flash_attn_dq_to_bf16(const float* __restrict__ dq_accum, __nv_bfloat16* __restrict__ dq, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) dq[i] = f32_to_bf16(dq_accum[i]);
}
