// softmax_kl.cu: fused softmax-KL distillation loss and its gradient, with cross-entropy fused in
// (softmax_kl_bf16, described here), and the other divergences (softmax_div_bf16, at the end of the
// file: same shapes and launch, three passes instead of two).
//
// What it computes (CPU reference: src/backend/cpu/distill.rs::softmax_kl and cpu/loss.rs):
//   For each listed row i (r = rows[i]), over the first `kept` columns, with
//   z_s = student[r, c] / τ, z_t = teacher[r, c] / τ, p = softmax(z):
//     row_kl[i]          = τ² · Σ_c p_t(c) · (log p_t(c) − log p_s(c))      (p_t = 0 contributes 0)
//     dstudent[r, c]    += w_i · τ · (p_s(c) − p_t(c))                        c < kept
//   with w_i = row_scale[i] when row_scale != NULL (the fused head's chunk: each row weighted by
//   the KL terms it belongs to, 0 for none), else grad_scale;
//   and, when ce_targets != NULL and t = ce_targets[i] >= 0 (cross-entropy over the FULL student
//   row at temperature 1, the label fused into the same launch):
//     row_ce[i]          = logsumexp_c(student[r, c]) − student[r, t]         c < student_vocab
//     dstudent[r, c]    += ce_scale · (softmax(student[r, :])(c) − [c == t])
//   otherwise row_ce[i] = 0 (row_ce may be NULL when ce_targets is NULL). With accumulate != 0,
//   dstudent is accumulated (read-modify-write of bf16), as the CPU backend's "accumulate"
//   convention says, and columns from `kept` on are touched only by the CE term. With
//   accumulate == 0 every column of a listed row is written (`=` instead of `+=`, columns from
//   `kept` on 0 without a CE term): the fused head lists every row of its chunk in one launch, so
//   its gradient needs neither a zero-fill before nor a read of it (−2 B/element). Unlisted rows
//   are untouched either way.
//   A target >= student_vocab is a caller bug: row_ce[i] = NaN and no CE gradient (no OOB access).
//
// Shapes: student [rows, student_vocab] bf16, teacher [rows, teacher_vocab] bf16, dstudent like
//   student; rows/ce_targets int[n_rows]; row_scale, row_kl, row_ce f32[n_rows]. Row offsets are
//   64-bit.
//   student and dstudent must not alias. Listed rows must be distinct (rows are written in parallel).
//
// Launch configuration:
//   grid  = (n_rows, 1, 1)  one block per listed row (launch nothing when n_rows == 0)
//   block = (KL_THREADS = 512, 1, 1)
//   shared memory: static only (< 1 KB), dynamic = 0.
//
// Why this way. The loss is memory-bound: 4096 rows × 151936 columns is 1.24 GB per bf16 input.
// Each row is reduced by one block in two passes:
//   pass 1 reads student and teacher once and keeps, per thread, online (max, sum) statistics in
//     base 2 (y = z·log2(e)/τ, so each exponential is one FFMA + one SFU ex2): for the student,
//     for the teacher, and A = Σ 2^(y_t − m_t)·(y_t − y_s), which gives the KL without a second
//     pass: KL = ln2 · (A / S_t − lse2_t + lse2_s). A third statistic over the whole student row at
//     τ = 1 serves the CE (when τ = 1 the kept columns' student statistic is reused for it). The
//     per-thread statistics are merged across the block (warp shuffles, then shared memory).
//   pass 2 reads both rows again, now knowing both log-sum-exps, and writes the gradient. It walks
//     the row in the opposite order to pass 1, so that its first reads are the bytes pass 1 read
//     last, the ones most likely still in L2 (a row pair is 608 KB; L2 is 50 MB for ~132 rows in
//     flight, so part of the second pass hits L2).
//   Loads are 16 bytes (8 bf16) when the row pointers are 16-byte aligned (any vocabulary that is
//   a multiple of 8, e.g. 151936 and 152064), with a scalar tail; otherwise the row goes scalar.
//   Two 16-byte vectors per input are in flight per thread per iteration.
// Bytes per element: 2 + 2 (pass 1) + 2 + 2 (pass 2, partly from L2) + 2 (dstudent written; +2
//   more when accumulating) = 10 B/element from memory at worst in the fused head's write mode:
//   4096 × 151936 → 6.2 GB → 1.48 ms at 4.2 TB/s (12 B, 1.78 ms, accumulating); each L2 hit of
//   pass 2 saves up to 4. A faster version would hold the row in shared memory of a thread-block
//   cluster (4 SMs × 152 KB) and read every input byte once (→ ~0.9 ms).
// Precision: statistics in fp32 (per-thread partial sums over ~300 values, then a tree), the
//   exponentials through ex2.approx (~2 ulp); logs are precise log2f. Expected agreement with the
//   f64 CPU reference: ~1e-6 relative on the losses, bf16 rounding on the gradient.
#include "common.cuh"

#define KL_THREADS 512

// Subtraction reference for a running max: −inf (nothing seen yet) is replaced by 0 so that
// 2^(−inf − ref) is 0 and never 2^(−inf + inf) = NaN.
__device__ __forceinline__ float max_ref(float m) { return m == -INFINITY ? 0.0f : m; }

// Per-thread (then per-block) statistics of one row, all in base 2.
struct KlStats {
    float ms, ss;  // student over the kept columns at 1/τ: max of y_s, Σ 2^(y_s − ms)
    float mt, st;  // teacher, likewise
    float a;       // Σ 2^(y_t − mt) · (y_t − y_s), rescaled with st
    float mc, sc;  // student over all columns at τ = 1 (cross-entropy), when kept separately
};

__device__ __forceinline__ KlStats kl_stats_empty() {
    KlStats s;
    s.ms = s.mt = s.mc = -INFINITY;
    s.ss = s.st = s.a = s.sc = 0.0f;
    return s;
}

// Merges two (max, sum) pairs: (m1, s1) becomes the merged pair. Returns the factor 2^(m1_old − m)
// applied to s1, and sets *f2 to the factor applied to s2 (for companions such as A).
__device__ __forceinline__ float merge_ms(float& m1, float& s1, float m2, float s2, float* f2) {
    float m = fmaxf(m1, m2);
    float ref = max_ref(m);
    float f1 = kd_exp2(m1 - ref);
    *f2 = kd_exp2(m2 - ref);
    s1 = s1 * f1 + s2 * (*f2);
    m1 = m;
    return f1;
}

__device__ __forceinline__ void kl_stats_merge(KlStats& x, const KlStats& y) {
    float f2;
    merge_ms(x.ms, x.ss, y.ms, y.ss, &f2);
    float f1 = merge_ms(x.mt, x.st, y.mt, y.st, &f2);
    x.a = x.a * f1 + y.a * f2;
    merge_ms(x.mc, x.sc, y.mc, y.sc, &f2);
}

__device__ __forceinline__ KlStats kl_stats_shfl_xor(const KlStats& s, int mask) {
    KlStats o;
    o.ms = shfl_xor_f32(s.ms, mask);
    o.ss = shfl_xor_f32(s.ss, mask);
    o.mt = shfl_xor_f32(s.mt, mask);
    o.st = shfl_xor_f32(s.st, mask);
    o.a = shfl_xor_f32(s.a, mask);
    o.mc = shfl_xor_f32(s.mc, mask);
    o.sc = shfl_xor_f32(s.sc, mask);
    return o;
}

// Pass 1 on K kept columns: raw logits zs[], zt[]; c = log2(e)/τ. `ce_kept`: also feed the
// separate CE statistic (only when τ != 1; with τ = 1 the student statistic is the CE one).
template <int K>
__device__ __forceinline__ void kl_pass1(KlStats& st, const float* zs, const float* zt, float c, bool ce_kept) {
    float ys[K], yt[K];
    float gs = -INFINITY, gt = -INFINITY;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        ys[k] = zs[k] * c;
        yt[k] = zt[k] * c;
        gs = fmaxf(gs, ys[k]);
        gt = fmaxf(gt, yt[k]);
    }
    // student
    {
        float m = fmaxf(st.ms, gs), ref = max_ref(m);
        float acc = st.ss * kd_exp2(st.ms - ref);
#pragma unroll
        for (int k = 0; k < K; ++k) acc += kd_exp2(ys[k] - ref);
        st.ss = acc;
        st.ms = m;
    }
    // teacher and A
    {
        float m = fmaxf(st.mt, gt), ref = max_ref(m);
        float f = kd_exp2(st.mt - ref);
        float acc = st.st * f, a = st.a * f;
#pragma unroll
        for (int k = 0; k < K; ++k) {
            float e = kd_exp2(yt[k] - ref);
            acc += e;
            a += e > 0.0f ? e * (yt[k] - ys[k]) : 0.0f;  // p_t = 0 contributes 0 (also when y_s = −inf)
        }
        st.st = acc;
        st.a = a;
        st.mt = m;
    }
    if (ce_kept) {
        float yc[K], gc = -INFINITY;
#pragma unroll
        for (int k = 0; k < K; ++k) {
            yc[k] = zs[k] * KD_LOG2E;
            gc = fmaxf(gc, yc[k]);
        }
        float m = fmaxf(st.mc, gc), ref = max_ref(m);
        float acc = st.sc * kd_exp2(st.mc - ref);
#pragma unroll
        for (int k = 0; k < K; ++k) acc += kd_exp2(yc[k] - ref);
        st.sc = acc;
        st.mc = m;
    }
}

// Pass 1 on K student-only columns (c >= kept): the CE statistic.
template <int K>
__device__ __forceinline__ void ce_pass1(KlStats& st, const float* zs) {
    float yc[K], gc = -INFINITY;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        yc[k] = zs[k] * KD_LOG2E;
        gc = fmaxf(gc, yc[k]);
    }
    float m = fmaxf(st.mc, gc), ref = max_ref(m);
    float acc = st.sc * kd_exp2(st.mc - ref);
#pragma unroll
    for (int k = 0; k < K; ++k) acc += kd_exp2(yc[k] - ref);
    st.sc = acc;
    st.mc = m;
}

// Row constants of pass 2.
struct KlGrad {
    float c;         // log2(e)/τ
    float lse_s2;    // base-2 log-sum-exp of y_s (kept columns)
    float lse_t2;    // of y_t
    float lse_c2;    // of the full student row at τ = 1 (CE)
    float gk;        // grad_scale · τ
    float ce_scale;  // CE gradient scale (0 when the row has no CE)
    bool ce;         // the row has a CE term
    bool ce_reuse;   // p_ce == p_s exactly (τ = 1 and no extra student columns)
    long long target;
    // softmax_div_bf16 only (see div_terms): the divergence, its weight λ as ln λ and ln(1 − λ),
    // and H = Σ_c h_c of the row (from its pass 2).
    int div;
    float lam, ln_lam, ln_1m_lam;
    float h_sum;
};

// The divergences of softmax_div_bf16 (codes of src/backend/divergence.rs, Divergence::code).
#define DIV_FKL 0
#define DIV_RKL 1
#define DIV_SKL 2
#define DIV_JSD 3
#define DIV_TVD 4
#define DIV_SKEW_FKL 5
#define DIV_SKEW_RKL 6

// x·(lx − ly) with 0·anything = 0 (a zero probability contributes its limit).
__device__ __forceinline__ float xlog_ratio(float x, float lx, float ly) { return x > 0.0f ? x * (lx - ly) : (x != x ? x : 0.0f); }

// ln(e^a + e^b), exact when either is −inf.
__device__ __forceinline__ float ln_add(float a, float b) {
    float m = fmaxf(a, b);
    if (m == -INFINITY) return m;
    return m + logf(expf(a - m) + expf(b - m));
}

// One element's (ℓ, h) of the divergence, from the natural-log probabilities lp (teacher) and lq
// (student) and p, q themselves: D = Σ ℓ, and h = q·∂D/∂q up to a multiple of q, so that
// ∂D/∂s_c = h_c − q_c·Σh (s = z/τ). The same formulas, in f64, are the CPU reference's
// (src/backend/divergence.rs, Divergence::terms, where each is derived).
__device__ __forceinline__ void div_terms(const KlGrad& g, float lp, float lq, float p, float q, float* l, float* h) {
    switch (g.div) {
    case DIV_RKL: {
        float r = xlog_ratio(q, lq, lp);
        *l = r;
        *h = r;
        break;
    }
    case DIV_SKL: {
        float f = xlog_ratio(p, lp, lq), r = xlog_ratio(q, lq, lp);
        *l = g.lam * f + (1.0f - g.lam) * r;
        *h = -g.lam * p + (1.0f - g.lam) * r;
        break;
    }
    case DIV_JSD: {  // m = β·p + (1−β)·q
        float lm = ln_add(g.ln_lam + lp, g.ln_1m_lam + lq);
        float kq = xlog_ratio(q, lq, lm);
        *l = g.lam * xlog_ratio(p, lp, lm) + (1.0f - g.lam) * kq;
        *h = (1.0f - g.lam) * kq;
        break;
    }
    case DIV_TVD: {
        float d = q - p;
        *l = 0.5f * fabsf(d);
        *h = 0.5f * q * (d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : d));
        break;
    }
    case DIV_SKEW_FKL: {  // m = λ·p + (1−λ)·q
        float lm = ln_add(g.ln_lam + lp, g.ln_1m_lam + lq);
        *l = xlog_ratio(p, lp, lm);
        *h = (p > 0.0f && q > 0.0f) ? -(1.0f - g.lam) * expf(lp + lq - lm) : 0.0f;
        break;
    }
    case DIV_SKEW_RKL: {  // m = λ·q + (1−λ)·p
        float lm = ln_add(g.ln_lam + lq, g.ln_1m_lam + lp);
        float k = xlog_ratio(q, lq, lm);
        *l = k;
        *h = q > 0.0f ? k - g.lam * expf(2.0f * lq - lm) : 0.0f;
        break;
    }
    default: {  // DIV_FKL
        *l = xlog_ratio(p, lp, lq);
        *h = -p;
    }
    }
}

// (ℓ, h) of one element from its raw logits.
__device__ __forceinline__ void div_elem(const KlGrad& g, float zs, float zt, float* l, float* h) {
    float ys = zs * g.c - g.lse_s2, yt = zt * g.c - g.lse_t2;  // log2 q, log2 p
    div_terms(g, yt * KD_LN2, ys * KD_LN2, kd_exp2(yt), kd_exp2(ys), l, h);
}

// Pass 2 on K kept columns starting at column col0: gradient into g[]. DIV: the gradient of
// softmax_div_bf16 (h − q·H), else the forward KL's (q − p).
template <int K, bool DIV>
__device__ __forceinline__ void kl_pass2(const KlGrad& q, const float* zs, const float* zt, long long col0, float* g) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
        float ps = kd_exp2(zs[k] * q.c - q.lse_s2);
        float v;
        if (DIV) {
            float l, h;
            div_elem(q, zs[k], zt[k], &l, &h);
            v = q.gk * (h - ps * q.h_sum);
        } else {
            float pt = kd_exp2(zt[k] * q.c - q.lse_t2);
            v = q.gk * (ps - pt);
        }
        if (q.ce) {
            float pc = q.ce_reuse ? ps : kd_exp2(zs[k] * KD_LOG2E - q.lse_c2);
            v += q.ce_scale * pc;
            if (col0 + k == q.target) v -= q.ce_scale;
        }
        g[k] = v;
    }
}

// Pass 2 on K student-only columns (c >= kept; only when the row has a CE term).
template <int K>
__device__ __forceinline__ void ce_pass2(const KlGrad& q, const float* zs, long long col0, float* g) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
        float v = q.ce_scale * kd_exp2(zs[k] * KD_LOG2E - q.lse_c2);
        if (col0 + k == q.target) v -= q.ce_scale;
        g[k] = v;
    }
}

// Stores of the gradient: ACC adds to what is there (read-modify-write), otherwise overwrites.
template <bool ACC>
__device__ __forceinline__ void put_bf16x8(__nv_bfloat16* d, const float g[8]) {
    float x[8];
    if (ACC) {
        unpack_bf16x8(*reinterpret_cast<const uint4*>(d), x);
#pragma unroll
        for (int k = 0; k < 8; ++k) x[k] += g[k];
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) x[k] = g[k];
    }
    *reinterpret_cast<uint4*>(d) = pack_bf16x8(x);
}

template <bool ACC>
__device__ __forceinline__ void put_bf16(__nv_bfloat16* d, float g) { *d = f32_to_bf16(ACC ? bf16_to_f32(*d) + g : g); }

// One listed row as both kernels walk it: row pointers, the CE target, and the column ranges:
// kept columns [0, kv) as n_kvec 16-byte vectors when all three row pointers allow it, then
// [kv, kept) scalar; CE-only columns [kept, ev) as n_evec vectors when aligned, [ev, V_s) scalar.
struct KlRow {
    const __nv_bfloat16* S;
    const __nv_bfloat16* T;
    __nv_bfloat16* D;
    long long target;
    bool ce;        // the row has a CE term
    bool tau_one;   // τ = 1
    bool ce_kept;   // a separate CE statistic over the kept columns (τ ≠ 1)
    float c;        // log2(e)/τ
    long long n_kvec, kv, n_evec, ev;
};

__device__ __forceinline__ KlRow kl_row_setup(const __nv_bfloat16* student, const __nv_bfloat16* teacher, __nv_bfloat16* dstudent,
                                              long long r, int student_vocab, int teacher_vocab, int kept, float temperature,
                                              long long target) {
    KlRow w;
    w.S = student + r * (long long)student_vocab;
    w.T = teacher + r * (long long)teacher_vocab;
    w.D = dstudent + r * (long long)student_vocab;
    w.target = target;
    w.ce = target >= 0 && target < student_vocab;
    w.tau_one = temperature == 1.0f;
    w.ce_kept = w.ce && !w.tau_one;
    w.c = KD_LOG2E / temperature;
    const bool vec = is_aligned16(w.S) && is_aligned16(w.T) && is_aligned16(w.D);
    w.n_kvec = vec ? kept / 8 : 0;
    w.kv = w.n_kvec * 8;
    const long long extra = w.ce ? (long long)student_vocab - kept : 0;
    const bool evec = w.ce && is_aligned16(w.S + kept) && is_aligned16(w.D + kept);
    w.n_evec = evec ? extra / 8 : 0;
    w.ev = kept + w.n_evec * 8;
    return w;
}

// The row constants of the gradient passes, from the merged statistics.
__device__ __forceinline__ KlGrad kl_grad_consts(const KlStats& st, const KlRow& w, float temperature, float grad_scale, float ce_scale) {
    KlGrad q;
    q.c = w.c;
    q.lse_s2 = st.ms + log2f(st.ss);
    q.lse_t2 = st.mt + log2f(st.st);
    q.lse_c2 = st.mc + log2f(st.sc);
    q.gk = grad_scale * temperature;
    q.ce = w.ce;
    q.ce_scale = w.ce ? ce_scale : 0.0f;
    q.ce_reuse = w.ce && w.tau_one && q.lse_c2 == q.lse_s2;
    q.target = w.target;
    return q;
}

// row_ce[i] (when row_ce is given): the row's CE, 0 without a label, NaN for a label out of range.
__device__ __forceinline__ void write_row_ce(const KlGrad& q, const KlRow& w, int student_vocab, float* row_ce, int i) {
    if (row_ce == nullptr) return;
    float ce_loss = 0.0f;
    if (w.ce) ce_loss = KD_LN2 * q.lse_c2 - bf16_to_f32(w.S[w.target]);
    else if (w.target >= student_vocab) ce_loss = NAN;  // bad label: make it visible
    row_ce[i] = ce_loss;
}

// The CE gradient on the student-only columns [kept, student_vocab) (nothing without a CE term:
// then n_evec = 0 and q.ce is false), walked from the row's end as pass 2 of both kernels does.
// Without ACC (write mode) and without a CE term, the student-only columns are written 0.
template <bool ACC>
__device__ __forceinline__ void ce_only_grad(const KlGrad& q, const __nv_bfloat16* __restrict__ S, __nv_bfloat16* D, int kept,
                                             int student_vocab, long long n_evec, long long ev) {
    const int tid = threadIdx.x, nt = blockDim.x;
    if (q.ce) {
        for (long long col = (long long)student_vocab - 1 - tid; col >= ev; col -= nt) {
            float zs = bf16_to_f32(S[col]), g;
            ce_pass2<1>(q, &zs, col, &g);
            put_bf16<ACC>(D + col, g);
        }
    } else if (!ACC) {
        for (long long col = (long long)student_vocab - 1 - tid; col >= kept; col -= nt) D[col] = f32_to_bf16(0.0f);
    }
    for (long long e = n_evec - 1 - tid; e >= 0; e -= nt) {
        float zs[8], g[8];
        unpack_bf16x8(ldg_u4(S + kept + 8 * e), zs);
        ce_pass2<8>(q, zs, kept + 8 * e, g);
        put_bf16x8<ACC>(D + kept + 8 * e, g);
    }
}

// Pass 1 of both kernels: the row's statistics (student, teacher, A, CE), merged over the block;
// every thread gets them. Contains __syncthreads(): call it from all threads.
__device__ __forceinline__ KlStats kl_row_stats(const KlRow& w, int kept, int student_vocab, KlStats* warp_stats,
                                                KlStats* row_stats) {
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
    const __nv_bfloat16* S = w.S;
    const __nv_bfloat16* T = w.T;
    const long long n_kvec = w.n_kvec, kv = w.kv, n_evec = w.n_evec, ev = w.ev;
    const bool ce = w.ce, ce_kept = w.ce_kept, tau_one = w.tau_one;
    const float c = w.c;
    // ---- pass 1: statistics ----
    KlStats st = kl_stats_empty();
    {
        long long v = tid;
        for (; v + nt < n_kvec; v += 2 * nt) {
            uint4 s0 = ldg_u4(S + 8 * v), t0 = ldg_u4(T + 8 * v);
            uint4 s1 = ldg_u4(S + 8 * (v + nt)), t1 = ldg_u4(T + 8 * (v + nt));
            float zs[8], zt[8];
            unpack_bf16x8(s0, zs);
            unpack_bf16x8(t0, zt);
            kl_pass1<8>(st, zs, zt, c, ce_kept);
            unpack_bf16x8(s1, zs);
            unpack_bf16x8(t1, zt);
            kl_pass1<8>(st, zs, zt, c, ce_kept);
        }
        for (; v < n_kvec; v += nt) {
            float zs[8], zt[8];
            unpack_bf16x8(ldg_u4(S + 8 * v), zs);
            unpack_bf16x8(ldg_u4(T + 8 * v), zt);
            kl_pass1<8>(st, zs, zt, c, ce_kept);
        }
        for (long long col = kv + tid; col < kept; col += nt) {
            float zs = bf16_to_f32(S[col]), zt = bf16_to_f32(T[col]);
            kl_pass1<1>(st, &zs, &zt, c, ce_kept);
        }
        for (long long e = tid; e < n_evec; e += nt) {
            float zs[8];
            unpack_bf16x8(ldg_u4(S + kept + 8 * e), zs);
            ce_pass1<8>(st, zs);
        }
        if (ce) {
            for (long long col = ev + tid; col < student_vocab; col += nt) {
                float zs = bf16_to_f32(S[col]);
                ce_pass1<1>(st, &zs);
            }
        }
    }

    // ---- block merge of the statistics ----
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        KlStats other = kl_stats_shfl_xor(st, o);
        kl_stats_merge(st, other);
    }
    if (lane == 0) warp_stats[warp] = st;
    __syncthreads();
    if (warp == 0) {
        st = lane < (nt >> 5) ? warp_stats[lane] : kl_stats_empty();
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            KlStats other = kl_stats_shfl_xor(st, o);
            kl_stats_merge(st, other);
        }
        if (lane == 0) {
            if (tau_one && ce) {
                // CE statistic = student kept columns (at τ = 1) merged with the CE-only columns.
                float f2;
                float mc = st.ms, sc = st.ss;
                merge_ms(mc, sc, st.mc, st.sc, &f2);
                st.mc = mc;
                st.sc = sc;
            }
            *row_stats = st;
        }
    }
    __syncthreads();
    return *row_stats;

}

// The gradient pass of both kernels over one row, walked from its end (the reverse of pass 1, so
// that its first reads are the bytes most likely still in L2): CE-only columns, then the kept ones.
template <bool DIV, bool ACC>
__device__ __forceinline__ void kl_grad_pass(const KlGrad& q, const KlRow& w, int kept, int student_vocab) {
    const int tid = threadIdx.x, nt = blockDim.x;
    const __nv_bfloat16* S = w.S;
    const __nv_bfloat16* T = w.T;
    __nv_bfloat16* D = w.D;
    const long long n_kvec = w.n_kvec, kv = w.kv;
    ce_only_grad<ACC>(q, S, D, kept, student_vocab, w.n_evec, w.ev);
    for (long long col = (long long)kept - 1 - tid; col >= kv; col -= nt) {
        float zs = bf16_to_f32(S[col]), zt = bf16_to_f32(T[col]), g;
        kl_pass2<1, DIV>(q, &zs, &zt, col, &g);
        put_bf16<ACC>(D + col, g);
    }
    {
        long long v = n_kvec - 1 - tid;
        for (; v - nt >= 0; v -= 2 * nt) {
            const long long v1 = v - nt;
            uint4 s0 = ldg_u4(S + 8 * v), t0 = ldg_u4(T + 8 * v);
            uint4 s1 = ldg_u4(S + 8 * v1), t1 = ldg_u4(T + 8 * v1);
            float zs[8], zt[8], g[8];
            unpack_bf16x8(s0, zs);
            unpack_bf16x8(t0, zt);
            kl_pass2<8, DIV>(q, zs, zt, 8 * v, g);
            put_bf16x8<ACC>(D + 8 * v, g);
            unpack_bf16x8(s1, zs);
            unpack_bf16x8(t1, zt);
            kl_pass2<8, DIV>(q, zs, zt, 8 * v1, g);
            put_bf16x8<ACC>(D + 8 * v1, g);
        }
        for (; v >= 0; v -= nt) {
            float zs[8], zt[8], g[8];
            unpack_bf16x8(ldg_u4(S + 8 * v), zs);
            unpack_bf16x8(ldg_u4(T + 8 * v), zt);
            kl_pass2<8, DIV>(q, zs, zt, 8 * v, g);
            put_bf16x8<ACC>(D + 8 * v, g);
        }
    }
}

extern "C" __global__ void __launch_bounds__(KL_THREADS, 2)
softmax_kl_bf16(const __nv_bfloat16* __restrict__ student, const __nv_bfloat16* __restrict__ teacher,
                const int* __restrict__ rows, int n_rows, int student_vocab, int teacher_vocab, int kept,
                float temperature, float grad_scale, const float* __restrict__ row_scale,
                const int* __restrict__ ce_targets, float ce_scale, float* __restrict__ row_kl, float* __restrict__ row_ce,
                int accumulate, __nv_bfloat16* __restrict__ dstudent) {
    __shared__ KlStats warp_stats[KL_THREADS / 32];
    __shared__ KlStats row_stats;

    const int i = blockIdx.x;
    if (i >= n_rows) return;
    const KlRow w = kl_row_setup(student, teacher, dstudent, rows[i], student_vocab, teacher_vocab, kept, temperature,
                                 ce_targets != nullptr ? (long long)ce_targets[i] : -1);

    const KlStats st = kl_row_stats(w, kept, student_vocab, warp_stats, &row_stats);
    KlGrad q = kl_grad_consts(st, w, temperature, row_scale != nullptr ? row_scale[i] : grad_scale, ce_scale);

    if (threadIdx.x == 0) {
        // KL = ln2 · (A/S_t − lse2_t + lse2_s), times τ².
        float kl = (st.a / st.st) + (st.ms - st.mt) + (log2f(st.ss) - log2f(st.st));
        row_kl[i] = temperature * temperature * KD_LN2 * kl;
        write_row_ce(q, w, student_vocab, row_ce, i);
    }

    // ---- pass 2: gradient, in the reverse order of pass 1 ----
    if (accumulate) kl_grad_pass<false, true>(q, w, kept, student_vocab);
    else kl_grad_pass<false, false>(q, w, kept, student_vocab);
}

// The other divergences (rkl, skl, jsd, tvd, skew_fkl, skew_rkl; `divergence` a DIV_* code, `lambda`
// its weight λ or β, ignored by those without one). Same arguments, outputs and conventions as
// softmax_kl_bf16 otherwise, with row_kl[i] = τ²·D(p_t, p_s) and the gradient
// w_i·τ·(h − p_s·H) (div_terms). Three passes instead of two: pass 1 (statistics) as above;
// pass 2 reads the kept columns again for Σℓ (the loss) and H = Σh, block-reduced; pass 3 writes
// the gradient, which needs H. Why not two: ℓ and h of the mixture forms (jsd, skews) involve
// ln(λ·p + (1−λ)·q) of the *normalised* probabilities, which an online (max, sum) rescaling cannot
// carry the way the forward KL's A statistic does, so the sums wait for both normalisers. (For rkl
// and skl alone an online statistic like A would do; one kernel for all keeps this simple, and
// these are not the default.) Cost: one more read of the kept columns, 16 B/element at worst
// instead of 12.
extern "C" __global__ void __launch_bounds__(KL_THREADS, 2)
softmax_div_bf16(const __nv_bfloat16* __restrict__ student, const __nv_bfloat16* __restrict__ teacher,
                 const int* __restrict__ rows, int n_rows, int student_vocab, int teacher_vocab, int kept,
                 float temperature, float grad_scale, const float* __restrict__ row_scale,
                 const int* __restrict__ ce_targets, float ce_scale, int divergence, float lambda,
                 float* __restrict__ row_kl, float* __restrict__ row_ce, int accumulate, __nv_bfloat16* __restrict__ dstudent) {
    __shared__ KlStats warp_stats[KL_THREADS / 32];
    __shared__ KlStats row_stats;
    __shared__ float scratch[32];

    const int i = blockIdx.x;
    if (i >= n_rows) return;
    const int tid = threadIdx.x, nt = blockDim.x;
    const KlRow w = kl_row_setup(student, teacher, dstudent, rows[i], student_vocab, teacher_vocab, kept, temperature,
                                 ce_targets != nullptr ? (long long)ce_targets[i] : -1);
    const KlStats st = kl_row_stats(w, kept, student_vocab, warp_stats, &row_stats);
    KlGrad q = kl_grad_consts(st, w, temperature, row_scale != nullptr ? row_scale[i] : grad_scale, ce_scale);
    q.div = divergence;
    q.lam = lambda;
    q.ln_lam = logf(lambda);
    q.ln_1m_lam = logf(1.0f - lambda);

    // ---- pass 2: Σℓ and H = Σh over the kept columns ----
    float l_sum = 0.0f, h_sum = 0.0f;
    for (long long v = tid; v < w.n_kvec; v += nt) {
        float zs[8], zt[8];
        unpack_bf16x8(ldg_u4(w.S + 8 * v), zs);
        unpack_bf16x8(ldg_u4(w.T + 8 * v), zt);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            float l, h;
            div_elem(q, zs[k], zt[k], &l, &h);
            l_sum += l;
            h_sum += h;
        }
    }
    for (long long col = w.kv + tid; col < kept; col += nt) {
        float l, h;
        div_elem(q, bf16_to_f32(w.S[col]), bf16_to_f32(w.T[col]), &l, &h);
        l_sum += l;
        h_sum += h;
    }
    l_sum = block_sum(l_sum, scratch);
    q.h_sum = block_sum(h_sum, scratch);
    if (tid == 0) {
        row_kl[i] = temperature * temperature * l_sum;
        write_row_ce(q, w, student_vocab, row_ce, i);
    }

    // ---- pass 3: gradient ----
    if (accumulate) kl_grad_pass<true, true>(q, w, kept, student_vocab);
    else kl_grad_pass<true, false>(q, w, kept, student_vocab);
}
