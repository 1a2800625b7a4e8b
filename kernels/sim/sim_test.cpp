// sim_test.cpp: runs the hand-written kernels under the CPU emulation (host_sim.h) against plain
// double-precision references, on random inputs whose sizes are not tile multiples.
// Build and run: bash kernels/sim/run.sh   (g++ only; no GPU, no CUDA toolkit needed)
// It checks indexing, masking, bounds, barriers and mma/ldmatrix fragment use; it cannot check
// speed, the memory model between blocks, or anything the hardware does differently from the
// PTX ISA's description that the emulator follows.
#define KD_HOST_SIM 1
#include "../softmax_kl.cu"
#include "../adamw.cu"
#include "../relation.cu"
#include "../sums.cu"
#include "../attention.cu"
#include "../decode_attention.cu"
namespace ew {  // its own helper names (f, b, mix64) would collide with adamw.cu's
#include "../elementwise.cu"
}

#include <random>
#include <string>

using bf16 = __nv_bfloat16;
static std::mt19937_64 rng(20261128);
static int failures = 0, passes = 0;

static float urand(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }
static float nrand() { return std::normal_distribution<float>(0.f, 1.f)(rng); }
static bf16 tb(float x) { return f32_to_bf16(x); }
static float fb(bf16 x) { return bf16_to_f32(x); }

static double rel_err(const std::vector<double>& out, const std::vector<double>& ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < out.size(); ++i) {
        if (!std::isfinite(out[i])) return INFINITY;
        num += (out[i] - ref[i]) * (out[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return den == 0 ? sqrt(num) : sqrt(num / den);
}

static void check(const std::string& what, double err, double tol) {
    bool ok = err <= tol;
    printf("%-4s %-70s rel err %.3e (tol %.0e)\n", ok ? "ok" : "FAIL", what.c_str(), err, tol);
    if (!ok) ++failures;
    else ++passes;
}

// ------------------------------------------------------------------------------------------------
// softmax-KL (+ CE)
// ------------------------------------------------------------------------------------------------
// τ²·D(p_t, p_s) of one row in double, straight from the definitions (src/backend/divergence.rs
// lists them with their sources); `div` a DIV_* code.
static double ref_divergence(const std::vector<double>& zs, const std::vector<double>& zt, double tau, int div, double lam) {
    auto softmax = [&](const std::vector<double>& z) {
        double m = -INFINITY;
        for (double v : z) m = std::max(m, v / tau);
        std::vector<double> p(z.size());
        double sum = 0;
        for (size_t c = 0; c < z.size(); ++c) sum += (p[c] = exp(z[c] / tau - m));
        for (double& x : p) x /= sum;
        return p;
    };
    auto kl = [](const std::vector<double>& a, const std::vector<double>& b) {
        double k = 0;
        for (size_t c = 0; c < a.size(); ++c)
            if (a[c] > 0) k += a[c] * log(a[c] / b[c]);
        return k;
    };
    auto mix = [](double w, const std::vector<double>& a, const std::vector<double>& b) {
        std::vector<double> m(a.size());
        for (size_t c = 0; c < a.size(); ++c) m[c] = w * a[c] + (1 - w) * b[c];
        return m;
    };
    std::vector<double> q = softmax(zs), p = softmax(zt);
    double d = 0;
    switch (div) {
    case DIV_RKL: d = kl(q, p); break;
    case DIV_SKL: d = lam * kl(p, q) + (1 - lam) * kl(q, p); break;
    case DIV_JSD: { auto m = mix(lam, p, q); d = lam * kl(p, m) + (1 - lam) * kl(q, m); break; }
    case DIV_TVD: for (size_t c = 0; c < p.size(); ++c) d += 0.5 * fabs(p[c] - q[c]); break;
    case DIV_SKEW_FKL: d = kl(p, mix(lam, p, q)); break;
    case DIV_SKEW_RKL: d = kl(q, mix(lam, q, p)); break;
    default: d = kl(p, q);
    }
    return tau * tau * d;
}

// div < 0: softmax_kl_bf16 (the forward KL's two-pass kernel); otherwise softmax_div_bf16 with that
// DIV_* code and weight, its gradient checked against central differences of ref_divergence.
// write: the fused head's mode (accumulate = 0, a weight per row, one of them 0): the listed rows'
// gradient starts as NaN garbage and must come out whole, every column written.
static void test_softmax_kl(int vs, int vt, float tau, bool with_ce, int offset_elems, int div = -1, float lam = 0.0f, bool write = false) {
    const int n_total = 6, kept = std::min(vs, vt);
    std::vector<int> rows = {4, 0, 5, 2};
    const int n_rows = (int)rows.size();
    // Backing stores with an element offset so that row pointers can be misaligned on purpose.
    std::vector<bf16> s_store(n_total * (size_t)vs + 16), t_store(n_total * (size_t)vt + 16), d_store(n_total * (size_t)vs + 16);
    auto align = [](bf16* p) { return reinterpret_cast<bf16*>((reinterpret_cast<uintptr_t>(p) + 15) & ~uintptr_t(15)); };
    bf16* S = align(s_store.data()) + offset_elems;
    bf16* T = align(t_store.data()) + offset_elems;
    bf16* Dg = align(d_store.data()) + offset_elems;
    for (size_t i = 0; i < (size_t)n_total * vs; ++i) S[i] = tb(3.f * nrand());
    for (size_t i = 0; i < (size_t)n_total * vt; ++i) T[i] = tb(3.f * nrand());
    if (vs > 10) S[0 * vs + 7] = tb(-INFINITY);  // a −inf student logit outside the teacher's mass? keep finite loss:
    if (vs > 10) T[0 * vt + 7] = tb(-INFINITY);  // both −inf: p_t = 0 contributes 0
    std::vector<float> d0((size_t)n_total * vs);
    for (size_t i = 0; i < d0.size(); ++i) { Dg[i] = tb(urand(-1e-3f, 1e-3f)); d0[i] = fb(Dg[i]); }
    std::vector<int> targets = {std::min(3, vs - 1), -100, vs - 1, kept / 2};
    std::vector<float> row_kl(n_rows, NAN), row_ce(n_rows, NAN);
    const float grad_scale = 0.7f, ce_scale = 0.3f;
    std::vector<float> row_scale = {0.7f, 0.0f, 1.3f, 0.35f};
    if (write) {
        for (int r : rows)
            for (int c = 0; c < vs; ++c) Dg[(size_t)r * vs + c] = tb(NAN), d0[(size_t)r * vs + c] = 0.0f;
    }
    const float* rs = write ? row_scale.data() : nullptr;
    kd_sim::launch({(unsigned)n_rows, 1, 1}, {KL_THREADS, 1, 1}, 0, [&] {
        if (div < 0)
            softmax_kl_bf16(S, T, rows.data(), n_rows, vs, vt, kept, tau, grad_scale, rs, with_ce ? targets.data() : nullptr,
                            ce_scale, row_kl.data(), with_ce ? row_ce.data() : nullptr, write ? 0 : 1, Dg);
        else
            softmax_div_bf16(S, T, rows.data(), n_rows, vs, vt, kept, tau, grad_scale, rs, with_ce ? targets.data() : nullptr,
                             ce_scale, div, lam, row_kl.data(), with_ce ? row_ce.data() : nullptr, write ? 0 : 1, Dg);
    });
    // Reference in double.
    std::vector<double> kl_out, kl_ref, ce_out, ce_ref, g_out, g_ref;
    std::vector<bool> listed(n_total, false);
    for (int i = 0; i < n_rows; ++i) {
        const int r = rows[i];
        listed[r] = true;
        auto lse = [&](const bf16* z, int n, double inv) {
            double m = -INFINITY;
            for (int c = 0; c < n; ++c) m = std::max(m, (double)fb(z[c]) * inv);
            double s = 0;
            for (int c = 0; c < n; ++c) s += exp((double)fb(z[c]) * inv - m);
            return m + log(s);
        };
        const bf16* zs = S + (size_t)r * vs;
        const bf16* zt = T + (size_t)r * vt;
        double ls = lse(zs, kept, 1.0 / tau), lt = lse(zt, kept, 1.0 / tau), lc = lse(zs, vs, 1.0);
        double kl = 0;
        std::vector<double> g(vs, 0.0);
        const double w = write ? row_scale[i] : grad_scale;
        if (div < 0) {
            for (int c = 0; c < kept; ++c) {
                double lps = fb(zs[c]) / tau - ls, lpt = fb(zt[c]) / tau - lt;
                double pt = exp(lpt), ps = exp(lps);
                if (pt > 0) kl += pt * (lpt - lps);
                g[c] += w * tau * (ps - pt);
            }
            kl *= tau * tau;
        } else {
            std::vector<double> xs(kept), xt(kept);
            for (int c = 0; c < kept; ++c) xs[c] = fb(zs[c]), xt[c] = fb(zt[c]);
            kl = ref_divergence(xs, xt, tau, div, lam);
            const double h = 1e-4;
            for (int c = 0; c < kept; ++c) {
                if (!std::isfinite(xs[c])) continue;  // p_s = 0 there for good: no gradient
                const double x = xs[c];
                xs[c] = x + h;
                double fp = ref_divergence(xs, xt, tau, div, lam);
                xs[c] = x - h;
                double fm = ref_divergence(xs, xt, tau, div, lam);
                xs[c] = x;
                g[c] += w * (fp - fm) / (2 * h);
            }
        }
        kl_out.push_back(row_kl[i]);
        kl_ref.push_back(kl);
        const int tgt = targets[i];
        if (with_ce) {
            if (tgt >= 0) {
                for (int c = 0; c < vs; ++c) g[c] += ce_scale * exp(fb(zs[c]) - lc);
                g[tgt] -= ce_scale;
                ce_ref.push_back(lc - fb(zs[tgt]));
            } else {
                ce_ref.push_back(0.0);
            }
            ce_out.push_back(row_ce[i]);
        }
        for (int c = 0; c < vs; ++c) {
            g_out.push_back(fb(Dg[(size_t)r * vs + c]) - d0[(size_t)r * vs + c]);
            g_ref.push_back(g[c]);
        }
    }
    // Unlisted rows and untouched columns must be bit-identical.
    bool untouched = true;
    for (int r = 0; r < n_total; ++r)
        for (int c = 0; c < vs; ++c) {
            bool may_change = listed[r] && (c < kept || with_ce || write);
            if (!may_change && fb(Dg[(size_t)r * vs + c]) != d0[(size_t)r * vs + c]) untouched = false;
        }
    char name[160];
    snprintf(name, sizeof name, "%s%s Vs=%d Vt=%d tau=%.1f ce=%d off=%d", div < 0 ? "softmax_kl" : ("softmax_div " + std::to_string(div) + " lambda " + std::to_string(lam)).c_str(), write ? " (write, row weights)" : "", vs, vt, tau, (int)with_ce, offset_elems);
    check(std::string(name) + " loss", rel_err(kl_out, kl_ref), 2e-5);
    if (with_ce) check(std::string(name) + " ce", rel_err(ce_out, ce_ref), 2e-5);
    check(std::string(name) + " grad", rel_err(g_out, g_ref), 2e-2);
    check(std::string(name) + " untouched", untouched ? 0.0 : 1.0, 0.0);
}

// ------------------------------------------------------------------------------------------------
// relation
// ------------------------------------------------------------------------------------------------
// sums.cu: an array's sum added into one f64 (f32 and f64 inputs, lengths around the block size).
static void test_sums() {
    for (long long n : {0LL, 1LL, 255LL, 1000LL, 5003LL}) {
        std::vector<float> v(n);
        std::vector<double> d(n);
        double ref_v = 0.0, ref_d = 0.0;
        for (long long i = 0; i < n; ++i) {
            v[i] = nrand();
            d[i] = 1e3 * nrand();
            ref_v += v[i];
            ref_d += d[i];
        }
        double out_v = 0.25, out_d = -1.0;  // added to
        kd_sim::launch({1, 1, 1}, {SUMS_THREADS, 1, 1}, 0, [&] { sum_into_f64_from_f32(v.data(), n, &out_v); });
        kd_sim::launch({1, 1, 1}, {SUMS_THREADS, 1, 1}, 0, [&] { sum_into_f64_from_f64(d.data(), n, &out_d); });
        const double scale_v = 1.0 + sqrt((double)n), scale_d = 1e3 * (1.0 + sqrt((double)n));
        check("sums f32 n=" + std::to_string(n), fabs(out_v - 0.25 - ref_v) / scale_v, 1e-12);
        check("sums f64 n=" + std::to_string(n), fabs(out_d + 1.0 - ref_d) / scale_d, 1e-12);
    }
}

// The f32 kernels (logits form) and, with bf16, the *_bf16 ones (identity form: bf16 Grams and
// gradient); the reference is computed from the values the kernel reads.
static void test_relation(int n, int n_images, bool bf16_grams) {
    const size_t nn = (size_t)n * n;
    std::vector<float> gs(nn * n_images), gt(nn * n_images), grad(nn * n_images, NAN);
    for (auto& x : gs) x = nrand() * 50.f;
    for (size_t i = 0; i < gt.size(); ++i) gt[i] = 0.8f * gs[i] + 30.f * nrand();
    if (n_images > 2) for (size_t i = 0; i < nn; ++i) gs[2 * nn + i] = 0.f;  // image 2: zero norm
    std::vector<bf16> hs(gs.size()), ht(gt.size()), hg(grad.size(), tb(NAN));
    for (size_t i = 0; i < gs.size(); ++i) {
        hs[i] = tb(gs[i]);
        ht[i] = tb(gt[i]);
        if (bf16_grams) gs[i] = fb(hs[i]), gt[i] = fb(ht[i]);
    }
    std::vector<double> partials((size_t)n_images * RELATION_BLOCKS * 3, NAN);
    const float grad_scale = 0.25f;
    double loss_sum = 0.5;  // the kernel adds to it
    const long long nnl = (long long)nn;
    kd_sim::launch({RELATION_BLOCKS, (unsigned)n_images, 1}, {RELATION_THREADS, 1, 1}, 0, [&] {
        if (bf16_grams) relation_cosine_partials_bf16(hs.data(), ht.data(), nnl, n_images, partials.data());
        else relation_cosine_partials(gs.data(), gt.data(), nnl, n_images, partials.data());
    });
    kd_sim::launch({RELATION_BLOCKS, (unsigned)n_images, 1}, {RELATION_THREADS, 1, 1}, 0, [&] {
        if (bf16_grams) relation_cosine_grad_bf16(hs.data(), ht.data(), nnl, n_images, grad_scale, partials.data(), &loss_sum, hg.data());
        else relation_cosine_grad(gs.data(), gt.data(), nnl, n_images, grad_scale, partials.data(), &loss_sum, grad.data());
    });
    if (bf16_grams) for (size_t i = 0; i < grad.size(); ++i) grad[i] = fb(hg[i]);
    std::vector<double> go, gr;
    double loss_ref = 0.0;
    for (int i = 0; i < n_images; ++i) {
        const float* a = gs.data() + i * nn;
        const float* b = gt.data() + i * nn;
        double dot = 0, ss = 0, tt = 0;
        for (size_t j = 0; j < nn; ++j) { dot += (double)a[j] * b[j]; ss += (double)a[j] * a[j]; tt += (double)b[j] * b[j]; }
        double ns = sqrt(ss), nt = sqrt(tt);
        bool zero = ns == 0 || nt == 0;
        loss_ref += zero ? 1.0 : 1.0 - dot / (ns * nt);
        for (size_t j = 0; j < nn; ++j) {
            go.push_back(grad[i * nn + j]);
            gr.push_back(zero ? 0.0 : grad_scale * (-(double)b[j] / (ns * nt) + dot / (ss * ns * nt) * a[j]));
        }
    }
    char name[120];
    snprintf(name, sizeof name, "relation%s n=%d images=%d", bf16_grams ? " bf16" : "", n, n_images);
    check(std::string(name) + " loss sum (added)", rel_err(std::vector<double>{loss_sum - 0.5}, std::vector<double>{loss_ref}), 1e-6);
    check(std::string(name) + " grad", rel_err(go, gr), bf16_grams ? 1e-2 : 1e-6);
}

// ------------------------------------------------------------------------------------------------
// AdamW and sum of squares
// ------------------------------------------------------------------------------------------------
static uint64_t ref_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static uint64_t ref_sr_hash(uint64_t seed, uint64_t step, uint64_t j4) {
    uint64_t key = ref_mix64(seed + ref_mix64(step + 0x9E3779B97F4A7C15ull));
    return ref_mix64(key + (j4 + 1) * 0x9E3779B97F4A7C15ull);
}

static void test_adamw(long long n, int offset, bool with_master) {
    std::vector<bf16> p_store(n + 16), g_store(n + 16);
    std::vector<float> m_store(n + 16), v_store(n + 16), w_store(n + 16);
    auto al = [](auto* p) { return reinterpret_cast<decltype(p)>((reinterpret_cast<uintptr_t>(p) + 15) & ~uintptr_t(15)); };
    bf16* P = al(p_store.data()) + offset;
    bf16* G = al(g_store.data()) + offset;
    float* M = al(m_store.data()) + offset;
    float* V = al(v_store.data()) + offset;
    float* W = al(w_store.data()) + offset;
    std::vector<float> p0(n), m0(n), v0(n), w0(n), g0(n);
    for (long long j = 0; j < n; ++j) {
        w0[j] = nrand() * 0.05f;
        P[j] = tb(w0[j]);
        p0[j] = fb(P[j]);
        W[j] = w0[j];
        G[j] = tb(nrand() * 1e-2f);
        g0[j] = fb(G[j]);
        M[j] = m0[j] = nrand() * 1e-3f;
        V[j] = v0[j] = fabsf(nrand()) * 1e-5f;
    }
    const float lr = 1e-3f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.1f, gsc = 0.8f;
    const uint64_t step = 7, seed = 1234;
    const float bc1 = (float)(1.0 - pow(0.9, 7)), bc2s = (float)sqrt(1.0 - pow(0.999, 7));
    kd_sim::launch({3, 1, 1}, {ADAMW_THREADS, 1, 1}, 0, [&] {
        adamw_bf16(P, G, M, V, with_master ? W : nullptr, n, lr, b1, b2, eps, wd, bc1, bc2s, gsc, seed, step);
    });
    // Reference: the CPU reference's f32 operation order (no contraction: built with -ffp-contract=off).
    long long bad = 0;
    const float decay = (float)(1.0 - (double)lr * wd), b1w = (float)(1.0 - (double)b1), b2w = (float)(1.0 - (double)b2);
    const float step_size = (float)((double)lr / bc1);
    for (long long j = 0; j < n; ++j) {
        float g = g0[j] * gsc;
        float p = with_master ? w0[j] : p0[j];
        p = p * decay;
        float m = m0[j] + b1w * (g - m0[j]);
        float v = v0[j] * b2 + b2w * g * g;
        float denom = sqrtf(v) / bc2s + eps;
        p = p - step_size * (m / denom);
        uint16_t want;
        if (with_master) {
            want = f32_to_bf16(p).bits;
            if (W[j] != p) ++bad;
        } else {
            uint32_t u = __float_as_uint(p);
            uint16_t noise = (uint16_t)(ref_sr_hash(seed, step, (uint64_t)j >> 2) >> (16 * (j & 3)));
            want = (uint16_t)((u + noise) >> 16);
        }
        if (M[j] != m || V[j] != v || P[j].bits != want) ++bad;
    }
    char name[120];
    snprintf(name, sizeof name, "adamw n=%lld offset=%d master=%d (bit-exact elements wrong)", n, offset, (int)with_master);
    check(name, (double)bad, 0.0);

    double partials[2] = {NAN, NAN};
    kd_sim::launch({2, 1, 1}, {ADAMW_THREADS, 1, 1}, 0, [&] { sum_squares_bf16(G, n, partials); });
    double out = partials[0] + partials[1];
    double ref = 0;
    for (long long j = 0; j < n; ++j) ref += (double)g0[j] * g0[j];
    snprintf(name, sizeof name, "sum_squares n=%lld offset=%d", n, offset);
    check(name, fabs(out - ref) / ref, 1e-5);
}

static void test_sr_pinned() {
    // Values computed independently (Python) and pinned in tests/bf16_rounding.rs too.
    struct { uint64_t seed, step, j4, h; } pins[] = {
        {0, 1, 0, 0x6EC85F1F8547BC0Cull},
        {42, 1000, 123456789, 0x7334D2E802596BFFull},
    };
    int bad = 0;
    for (auto& p : pins) {
        uint64_t h = sr_hash(sr_key(p.seed, p.step), p.j4);
        if (h != p.h || h != ref_sr_hash(p.seed, p.step, p.j4)) {
            printf("     sr_hash(%llu, %llu, %llu) = %016llx, pinned %016llx\n", (unsigned long long)p.seed,
                   (unsigned long long)p.step, (unsigned long long)p.j4, (unsigned long long)h, (unsigned long long)p.h);
            ++bad;
        }
    }
    check("stochastic-rounding hash matches the pinned values", (double)bad, 0.0);
}

// ------------------------------------------------------------------------------------------------
// attention
// ------------------------------------------------------------------------------------------------
typedef void (*FwdFn)(const bf16*, const bf16*, const bf16*, bf16*, float*, const int*, int, int, int, int, int, float);
typedef void (*BwdFn)(const bf16*, const bf16*, const bf16*, const bf16*, const float*, const float*, float*, bf16*, bf16*,
                      const int*, int, int, int, int, int, float);

template <int D>
static void test_attention(FwdFn fwd, BwdFn bwd, std::vector<int> lens, int H, int Hkv, int causal) {
    using C = AttCfg<D>;
    std::vector<int> cu = {0};
    int max_len = 0;
    for (int l : lens) { cu.push_back(cu.back() + l); max_len = std::max(max_len, l); }
    const int T = cu.back(), n_seqs = (int)lens.size(), group = H / Hkv;
    const float scale = 1.0f / sqrtf((float)D);
    auto fill = [](size_t n) { std::vector<bf16> x(n); for (auto& e : x) e = tb(nrand()); return x; };
    std::vector<bf16> q = fill((size_t)T * H * D), k = fill((size_t)T * Hkv * D), v = fill((size_t)T * Hkv * D),
                      dout = fill((size_t)T * H * D);
    std::vector<bf16> out((size_t)T * H * D, tb(NAN));
    std::vector<float> lse((size_t)T * H, NAN);
    const size_t smem_f = 4 * ATT_BN * C::LD;
    const unsigned n_qt = (max_len + ATT_BM - 1) / ATT_BM;
    kd_sim::launch({n_qt, (unsigned)H, (unsigned)n_seqs}, {ATT_THREADS, 1, 1}, smem_f, [&] {
        fwd(q.data(), k.data(), v.data(), out.data(), lse.data(), cu.data(), n_seqs, max_len, H, Hkv, causal, scale);
    });
    // Reference (double) forward and backward from the same bf16 inputs.
    std::vector<double> o_ref((size_t)T * H * D, 0), lse_ref((size_t)T * H), dq_ref((size_t)T * H * D, 0),
        dk_ref((size_t)T * Hkv * D, 0), dv_ref((size_t)T * Hkv * D, 0);
    for (int s = 0; s < n_seqs; ++s) {
        const int st = cu[s], len = lens[s];
        for (int h = 0; h < H; ++h) {
            const int kh = h / group;
            for (int i = 0; i < len; ++i) {
                const int nk = causal ? i + 1 : len;
                std::vector<double> p(nk);
                double m = -INFINITY;
                for (int j = 0; j < nk; ++j) {
                    double d = 0;
                    for (int c = 0; c < D; ++c) d += (double)fb(q[((size_t)(st + i) * H + h) * D + c]) * fb(k[((size_t)(st + j) * Hkv + kh) * D + c]);
                    p[j] = d * scale;
                    m = std::max(m, p[j]);
                }
                double sum = 0;
                for (int j = 0; j < nk; ++j) { p[j] = exp(p[j] - m); sum += p[j]; }
                lse_ref[(size_t)(st + i) * H + h] = m + log(sum);
                for (int j = 0; j < nk; ++j) p[j] /= sum;
                double* orow = &o_ref[((size_t)(st + i) * H + h) * D];
                for (int j = 0; j < nk; ++j)
                    for (int c = 0; c < D; ++c) orow[c] += p[j] * fb(v[((size_t)(st + j) * Hkv + kh) * D + c]);
                // backward, using the reference P and O
                const bf16* dor = &dout[((size_t)(st + i) * H + h) * D];
                double delta = 0;
                for (int c = 0; c < D; ++c) delta += (double)fb(dor[c]) * orow[c];
                for (int j = 0; j < nk; ++j) {
                    const size_t kv = ((size_t)(st + j) * Hkv + kh) * D;
                    double dp = 0;
                    for (int c = 0; c < D; ++c) dp += (double)fb(dor[c]) * fb(v[kv + c]);
                    double ds = p[j] * (dp - delta);
                    for (int c = 0; c < D; ++c) {
                        dq_ref[((size_t)(st + i) * H + h) * D + c] += scale * ds * fb(k[kv + c]);
                        dk_ref[kv + c] += scale * ds * fb(q[((size_t)(st + i) * H + h) * D + c]);
                        dv_ref[kv + c] += p[j] * fb(dor[c]);
                    }
                }
            }
        }
    }
    char name[160];
    std::string lens_s;
    for (int l : lens) lens_s += std::to_string(l) + ",";
    snprintf(name, sizeof name, "attention D=%d H=%d Hkv=%d causal=%d lens=%s", D, H, Hkv, causal, lens_s.c_str());
    std::vector<double> oo(out.size()), lo(lse.begin(), lse.end());
    for (size_t i = 0; i < out.size(); ++i) oo[i] = fb(out[i]);
    check(std::string(name) + " out", rel_err(oo, o_ref), 1e-2);
    check(std::string(name) + " lse", rel_err(lo, lse_ref), 1e-4);

    // Backward: preprocess, bwd, convert.
    std::vector<float> delta((size_t)T * H, NAN), dq_acc((size_t)T * H * D, 0.f);
    std::vector<bf16> dq((size_t)T * H * D, tb(NAN)), dk((size_t)T * Hkv * D, tb(NAN)), dv((size_t)T * Hkv * D, tb(NAN));
    const long long n_rows = (long long)T * H;
    kd_sim::launch({(unsigned)((n_rows + 3) / 4), 1, 1}, {ATT_THREADS, 1, 1}, 0,
                   [&] { flash_attn_bwd_preprocess_bf16(out.data(), dout.data(), delta.data(), n_rows, D); });
    const unsigned n_kt = (max_len + ATT_BN - 1) / ATT_BN;
    kd_sim::launch({n_kt, (unsigned)Hkv, (unsigned)n_seqs}, {C::BWD_THREADS, 1, 1}, C::BWD_SMEM, [&] {
        bwd(q.data(), k.data(), v.data(), dout.data(), lse.data(), delta.data(), dq_acc.data(), dk.data(), dv.data(),
            cu.data(), n_seqs, max_len, H, Hkv, causal, scale);
    });
    const long long nq = (long long)T * H * D;
    kd_sim::launch({2, 1, 1}, {256, 1, 1}, 0, [&] { flash_attn_dq_to_bf16(dq_acc.data(), dq.data(), nq); });
    std::vector<double> a(dq.size()), b(dk.size()), c(dv.size());
    for (size_t i = 0; i < dq.size(); ++i) a[i] = fb(dq[i]);
    for (size_t i = 0; i < dk.size(); ++i) { b[i] = fb(dk[i]); c[i] = fb(dv[i]); }
    check(std::string(name) + " dq", rel_err(a, dq_ref), 1e-2);
    check(std::string(name) + " dk", rel_err(b, dk_ref), 1e-2);
    check(std::string(name) + " dv", rel_err(c, dv_ref), 1e-2);
}


// ------------------------------------------------------------------------------------------------
// decode attention (one query per row against its KV cache slot; split + combine when chunk < len)
// ------------------------------------------------------------------------------------------------
typedef void (*DecFn)(const bf16*, const bf16*, const bf16*, bf16*, float*, float*, const int*, int, int, int, int, float);

static DecFn decode_kernel(int D, int gc) {
#define KD_DEC_PICK(DIM)                                                                                           \
    if (D == DIM)                                                                                                  \
        return gc == 1 ? decode_attn_bf16_d##DIM##_g1 : gc == 2 ? decode_attn_bf16_d##DIM##_g2                     \
               : gc == 4 ? decode_attn_bf16_d##DIM##_g4 : decode_attn_bf16_d##DIM##_g8;
    KD_DEC_PICK(64)
    KD_DEC_PICK(72)
    KD_DEC_PICK(80)
    KD_DEC_PICK(128)
#undef KD_DEC_PICK
    fprintf(stderr, "no decode kernel for D=%d\n", D);
    abort();
}

// rows: (slot, len) per row. chunk = 0: one split (chunk = max len). q_scale widens the scores.
static void test_decode(int D, int H, int Hkv, std::vector<std::pair<int, int>> rows, int chunk, float q_scale = 1.0f) {
    const int R = (int)rows.size(), group = H / Hkv;
    const int gc = group == 1 ? 1 : group == 2 ? 2 : group <= 4 ? 4 : 8;  // as the launcher picks it
    const int n_gc = (group + gc - 1) / gc;
    int max_len = 0, n_slots = 0;
    for (auto& r : rows) { max_len = std::max(max_len, r.second); n_slots = std::max(n_slots, r.first + 2); }
    const int capacity = max_len + 3;
    if (chunk == 0) chunk = max_len;
    const int n_splits = (max_len + chunk - 1) / chunk;
    const float scale = 1.0f / sqrtf((float)D);
    const size_t kvd = (size_t)Hkv * D;
    // Cache: random where some row reads it, NaN everywhere else (a read past a row's length shows).
    std::vector<int> used(n_slots, 0);
    for (auto& r : rows) used[r.first] = std::max(used[r.first], r.second);
    std::vector<bf16> kc((size_t)n_slots * capacity * kvd), vc(kc.size());
    for (int s = 0; s < n_slots; ++s)
        for (int p = 0; p < capacity; ++p)
            for (size_t c = 0; c < kvd; ++c) {
                const size_t i = ((size_t)s * capacity + p) * kvd + c;
                const bool live = p < used[s];
                kc[i] = tb(live ? nrand() : NAN);
                vc[i] = tb(live ? nrand() : NAN);
            }
    std::vector<bf16> q((size_t)R * H * D), out((size_t)R * H * D, tb(NAN));
    for (auto& x : q) x = tb(q_scale * nrand());
    std::vector<int> meta;
    for (auto& r : rows) { meta.push_back(r.first); meta.push_back(r.second); }
    std::vector<float> part_o((size_t)R * H * n_splits * D, NAN), part_lse((size_t)R * H * n_splits, NAN);
    DecFn fn = decode_kernel(D, gc);
    kd_sim::launch({(unsigned)n_splits, (unsigned)(Hkv * n_gc), (unsigned)R}, {DEC_THREADS, 1, 1}, 0, [&] {
        fn(q.data(), kc.data(), vc.data(), out.data(), part_o.data(), part_lse.data(), meta.data(), capacity, H, Hkv, chunk,
           scale);
    });
    if (n_splits > 1)
        kd_sim::launch({(unsigned)((R * H + DEC_WARPS - 1) / DEC_WARPS), 1, 1}, {DEC_THREADS, 1, 1}, 0, [&] {
            decode_attn_combine_bf16(part_o.data(), part_lse.data(), out.data(), meta.data(), R, H, D, chunk, n_splits);
        });
    // Reference (double) from the same bf16 values.
    std::vector<double> ref((size_t)R * H * D, 0.0), got((size_t)R * H * D);
    double worst = 0.0;      // max over (row, head) of max |out − ref| / max |ref|
    double worst_row = 0.0;  // max over rows of the row's relative L2 error (a short row's large
                             // outputs must not hide a long row's error)
    for (int r = 0; r < R; ++r) {
        const int slot = rows[r].first, len = rows[r].second;
        for (int h = 0; h < H; ++h) {
            const int kh = h / group;
            const size_t o = ((size_t)r * H + h) * D;
            std::vector<double> p(len);
            double mx = -INFINITY;
            for (int j = 0; j < len; ++j) {
                const size_t kv = ((size_t)slot * capacity + j) * kvd + (size_t)kh * D;
                double d = 0;
                for (int c = 0; c < D; ++c) d += (double)fb(q[o + c]) * fb(kc[kv + c]);
                p[j] = d * scale;
                mx = std::max(mx, p[j]);
            }
            double sum = 0;
            for (int j = 0; j < len; ++j) { p[j] = exp(p[j] - mx); sum += p[j]; }
            for (int j = 0; j < len; ++j) {
                const size_t kv = ((size_t)slot * capacity + j) * kvd + (size_t)kh * D;
                for (int c = 0; c < D; ++c) ref[o + c] += p[j] / sum * fb(vc[kv + c]);
            }
            double amax = 0, emax = 0;
            for (int c = 0; c < D; ++c) {
                got[o + c] = fb(out[o + c]);
                amax = std::max(amax, fabs(ref[o + c]));
                emax = std::max(emax, std::isfinite(got[o + c]) ? fabs(got[o + c] - ref[o + c]) : INFINITY);
            }
            worst = std::max(worst, amax > 0 ? emax / amax : emax);
        }
        const size_t o = (size_t)r * H * D, n = (size_t)H * D;
        worst_row = std::max(worst_row, rel_err(std::vector<double>(got.begin() + o, got.begin() + o + n),
                                                std::vector<double>(ref.begin() + o, ref.begin() + o + n)));
    }
    char name[200];
    std::string lens_s;
    for (auto& r : rows) lens_s += std::to_string(r.second) + "@" + std::to_string(r.first) + ",";
    snprintf(name, sizeof name, "decode D=%d H=%d Hkv=%d GC=%d len@slot=%s chunk=%d splits=%d", D, H, Hkv, gc,
             lens_s.c_str(), chunk, n_splits);
    // Bounds: the output is rounded once to bf16 (at most half an ulp: 2^-9 to 2^-8 of the value,
    // ~1.1e-3 RMS); the fp32 accumulation adds ~1e-6. So per row the relative L2 error stays near
    // 1e-3 (bound 5e-3), and per head no element may be off by more than half an ulp at the head's
    // largest output (2^-8 = 3.9e-3 of it) plus fp32 slack (bound 4e-3).
    check(std::string(name) + " rel L2 (worst row)", worst_row, 5e-3);
    check(std::string(name) + " max|err|/max|ref| (worst head)", worst, 4e-3);
}

// ------------------------------------------------------------------------------------------------
// element-wise kernels: the 16-byte path (every operand aligned) and the scalar path (every operand
// one element past its alignment) give the same bits and match a double reference, at sizes that
// are not multiples of 8.
// ------------------------------------------------------------------------------------------------
// Runs `kernel(ins, outs)` on copies of `inputs` placed `off` elements into fresh buffers; returns
// the outputs (n_out of them, each of `len` elements, pre-filled with NaN, or for an in-place op
// output 0 with a copy of input 0).
static std::vector<std::vector<bf16>> run_ew(const std::vector<std::vector<bf16>>& inputs, int n_out, size_t len, bool in_place,
                                             int off, const std::function<void(std::vector<bf16*>&, std::vector<bf16*>&)>& kernel) {
    std::vector<std::vector<bf16>> in(inputs.size()), out(n_out, std::vector<bf16>(len + 8, tb(NAN)));
    if (in_place) std::copy(inputs[0].begin(), inputs[0].end(), out[0].begin() + off);
    std::vector<bf16*> ip, op;
    for (size_t k = 0; k < inputs.size(); ++k) {
        in[k].assign(off, tb(0.f));
        in[k].insert(in[k].end(), inputs[k].begin(), inputs[k].end());
        ip.push_back(in[k].data() + off);
    }
    for (auto& o : out) op.push_back(o.data() + off);
    kd_sim::launch({3, 1, 1}, {64, 1, 1}, 0, [&] { kernel(ip, op); });
    std::vector<std::vector<bf16>> res;
    for (auto& o : out) res.emplace_back(o.begin() + off, o.begin() + off + len);
    return res;
}

static void check_ew(const std::string& name, const std::vector<std::vector<bf16>>& inputs, int n_out, size_t len, bool in_place,
                     const std::function<void(std::vector<bf16*>&, std::vector<bf16*>&)>& kernel,
                     const std::vector<std::vector<double>>& ref) {
    const auto vec = run_ew(inputs, n_out, len, in_place, 0, kernel), scal = run_ew(inputs, n_out, len, in_place, 1, kernel);
    for (int k = 0; k < n_out; ++k) {
        size_t differ = 0;
        for (size_t i = 0; i < len; ++i) differ += vec[k][i].bits != scal[k][i].bits;
        std::vector<double> got(len);
        for (size_t i = 0; i < len; ++i) got[i] = fb(vec[k][i]);
        const std::string what = name + " out" + std::to_string(k);
        check(what + " (16-byte path)", rel_err(got, ref[k]), 1e-2);
        check(what + " scalar path: elements differing from the 16-byte path", (double)differ, 0);
    }
}

static void test_elementwise(long long rows, int dim) {
    const long long n = rows * dim;
    auto draw = [&](long long len, float lo, float hi) { std::vector<bf16> v(len); for (auto& e : v) e = tb(urand(lo, hi)); return v; };
    const auto g = draw(n, -6, 6), u = draw(n, -2, 2), d = draw(n, -1, 1), bias = draw(dim, -1, 1);
    const std::string sz = " " + std::to_string(rows) + "x" + std::to_string(dim);
    std::vector<double> r0(n), r1(n);
    for (long long i = 0; i < n; ++i) r0[i] = (double)fb(g[i]) + fb(bias[i % dim]);
    // add_bias: the bias is read by column, so it rides along as an input of its own length.
    check_ew("add_bias" + sz, {g, bias}, 1, n, true, [&](auto& in, auto& out) { ew::add_bias_bf16(out[0], in[1], rows, dim); }, {r0});
    for (long long i = 0; i < n; ++i) r0[i] = (double)fb(g[i]) + fb(u[i]);
    check_ew("add_assign" + sz, {g, u}, 1, n, true, [&](auto& in, auto& out) { ew::add_assign_bf16(out[0], in[1], n); }, {r0});
    for (long long i = 0; i < n; ++i) r0[i] = fb(g[i]) * -0.37;
    check_ew("scale" + sz, {g}, 1, n, true, [&](auto& in, auto& out) { ew::scale_bf16(out[0], -0.37f, n); }, {r0});
    for (int kind = 0; kind < 2; ++kind) {
        const std::string k = kind == 0 ? " erf" : " tanh";
        auto gelu = [&](double x) { return kind == 0 ? 0.5 * x * (1 + erf(x / sqrt(2.0))) : 0.5 * x * (1 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x))); };
        for (long long i = 0; i < n; ++i) {
            const double x = fb(g[i]), h = 1e-5;
            r0[i] = gelu(x);
            r1[i] = fb(d[i]) * (gelu(x + h) - gelu(x - h)) / (2 * h);
        }
        check_ew("gelu" + k + sz, {g}, 1, n, false, [&](auto& in, auto& out) { ew::gelu_fwd_bf16(in[0], out[0], n, kind); }, {r0});
        check_ew("gelu_backward" + k + sz, {g, d}, 1, n, false, [&](auto& in, auto& out) { ew::gelu_bwd_bf16(in[0], in[1], out[0], n, kind); }, {r1});
    }
}

// As check_ew, for kernels whose outputs differ in length (out_lens[k] elements each, NaN-filled,
// so an unwritten element fails): the 16-byte path (every operand aligned) and the scalar path
// (every operand one element past its alignment) give the same bits and match a double reference.
static void check_multi(const std::string& name, const std::vector<std::vector<bf16>>& inputs, const std::vector<size_t>& out_lens,
                        const std::function<void(std::vector<bf16*>&, std::vector<bf16*>&)>& kernel,
                        const std::vector<std::vector<double>>& ref) {
    auto run = [&](int off) {
        std::vector<std::vector<bf16>> in(inputs.size()), out;
        std::vector<bf16*> ip, op;
        for (size_t k = 0; k < inputs.size(); ++k) {
            in[k].assign(off, tb(0.f));
            in[k].insert(in[k].end(), inputs[k].begin(), inputs[k].end());
            ip.push_back(in[k].data() + off);
        }
        for (size_t len : out_lens) out.emplace_back(len + 8, tb(NAN));
        for (auto& o : out) op.push_back(o.data() + off);
        kd_sim::launch({3, 1, 1}, {64, 1, 1}, 0, [&] { kernel(ip, op); });
        std::vector<std::vector<bf16>> res;
        for (size_t k = 0; k < out.size(); ++k) res.emplace_back(out[k].begin() + off, out[k].begin() + off + out_lens[k]);
        return res;
    };
    const auto vec = run(0), scal = run(1);
    for (size_t k = 0; k < out_lens.size(); ++k) {
        size_t differ = 0;
        std::vector<double> got(out_lens[k]);
        for (size_t i = 0; i < out_lens[k]; ++i) {
            differ += vec[k][i].bits != scal[k][i].bits;
            got[i] = fb(vec[k][i]);
        }
        const std::string what = name + " out" + std::to_string(k);
        check(what + " (16-byte path where the shape allows)", rel_err(got, ref[k]), 1e-2);
        check(what + " scalar path: elements differing from the 16-byte path", (double)differ, 0);
    }
}

// The fused Q/K/V split with its bias and RoPE (qkv [T, q_dim + 2·kv_dim] + bias → q, k rotated, v) and its
// backward (dq, dk rotated back, dv → dqkv), GQA, at head dims 64 (16-byte path when aligned), 6
// and 72 (D/2 not a multiple of 8: scalar always).
static void test_qkv_rope(int T, int qh, int kvh, int D) {
    const int half = D / 2;
    const size_t qd = (size_t)qh * D, kd = (size_t)kvh * D, row = qd + 2 * kd;
    auto draw = [&](size_t len) { std::vector<bf16> v(len); for (auto& e : v) e = tb(urand(-2, 2)); return v; };
    const auto qkv = draw(T * row), bias = draw(row), dq = draw(T * qd), dk = draw(T * kd), dv = draw(T * kd);
    std::vector<unsigned> pos(T);
    for (int t = 0; t < T; ++t) pos[t] = (unsigned)(t * 977 % 5000);
    const double theta = 1e6;
    std::vector<double> rq(T * qd), rk(T * kd), rv(T * kd), rd(T * row);
    // The heads of token t at src plus b (null: none), rotated by sign·angle into dst.
    auto rotate = [&](int t, const bf16* src, const bf16* b, int heads, double sign, double* dst) {
        auto at = [&](int c) { return (double)fb(src[c]) + (b ? (double)fb(b[c]) : 0.0); };
        for (int h = 0; h < heads; ++h)
            for (int i = 0; i < half; ++i) {
                const double a = pos[t] * pow(theta, -2.0 * i / D), c = cos(a), s = sign * sin(a);
                const double x1 = at(h * D + i), x2 = at(h * D + i + half);
                dst[h * D + i] = x1 * c - x2 * s;
                dst[h * D + i + half] = x2 * c + x1 * s;
            }
    };
    for (int t = 0; t < T; ++t) {
        rotate(t, &qkv[t * row], &bias[0], qh, 1, &rq[t * qd]);
        rotate(t, &qkv[t * row + qd], &bias[qd], kvh, 1, &rk[t * kd]);
        for (size_t c = 0; c < kd; ++c) rv[t * kd + c] = (double)fb(qkv[t * row + qd + kd + c]) + fb(bias[qd + kd + c]);
        rotate(t, &dq[t * qd], nullptr, qh, -1, &rd[t * row]);
        rotate(t, &dk[t * kd], nullptr, kvh, -1, &rd[t * row + qd]);
        for (size_t c = 0; c < kd; ++c) rd[t * row + qd + kd + c] = fb(dv[t * kd + c]);
    }
    const std::string sz = " T=" + std::to_string(T) + " heads=" + std::to_string(qh) + "/" + std::to_string(kvh) + " D=" + std::to_string(D);
    check_multi("qkv_split_rope" + sz, {qkv, bias}, {T * qd, T * kd, T * kd},
                [&](auto& in, auto& out) { ew::qkv_split_rope_bf16(in[0], in[1], pos.data(), T, qh, kvh, D, theta, out[0], out[1], out[2]); },
                {rq, rk, rv});
    check_multi("qkv_merge_rope_bwd" + sz, {dq, dk, dv}, {T * row},
                [&](auto& in, auto& out) { ew::qkv_merge_rope_bwd_bf16(in[0], in[1], in[2], pos.data(), T, qh, kvh, D, theta, out[0]); },
                {rd});
}

// SwiGLU on a stacked gate/up projection [rows, 2·inter] and its backward, at inter 64 (16-byte
// path when aligned) and 13 (scalar always).
static void test_swiglu(long long rows, int inter) {
    const long long n = rows * inter;
    auto draw = [&](long long len, float lo, float hi) { std::vector<bf16> v(len); for (auto& e : v) e = tb(urand(lo, hi)); return v; };
    const auto gu = draw(2 * n, -4, 4), d = draw(n, -1, 1);
    auto sig = [](double x) { return 1.0 / (1.0 + exp(-x)); };
    std::vector<double> r0(n), r1(2 * n);
    for (long long r = 0; r < rows; ++r)
        for (int j = 0; j < inter; ++j) {
            const double g = fb(gu[r * 2 * inter + j]), u = fb(gu[r * 2 * inter + inter + j]), dd = fb(d[r * inter + j]), s = sig(g);
            r0[r * inter + j] = g * s * u;
            r1[r * 2 * inter + j] = dd * u * s * (1 + g * (1 - s));
            r1[r * 2 * inter + inter + j] = dd * g * s;
        }
    const std::string sz = " " + std::to_string(rows) + "x(2*" + std::to_string(inter) + ")";
    check_multi("swiglu" + sz, {gu}, {(size_t)n},
                [&](auto& in, auto& out) { ew::swiglu_fwd_bf16(in[0], rows, inter, out[0]); }, {r0});
    check_multi("swiglu_backward" + sz, {gu, d}, {(size_t)(2 * n)},
                [&](auto& in, auto& out) { ew::swiglu_bwd_bf16(in[0], in[1], rows, inter, out[0]); }, {r1});
}

int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IONBF, 0);
    // `quick`: a shorter set; `attention`: the kernels whose warps share shared memory (relation,
    // softmax-KL, attention, decode; quick cases), for the schedule sweep of run.sh.
    const std::string mode = argc > 1 ? argv[1] : "";
    const bool quick = mode == "quick" || mode == "attention";
    const bool rest = mode != "attention";
    if (rest) {
    test_elementwise(37, 129);  // 4773 elements: 596 chunks of 8 and a tail of 5; rows straddle chunks
    test_elementwise(3, 64);
    test_elementwise(1, 1);
    test_qkv_rope(5, 4, 2, 64);
    test_qkv_rope(3, 3, 1, 6);
    test_qkv_rope(4, 2, 2, 72);
    test_swiglu(7, 64);
    test_swiglu(5, 13);
    test_sr_pinned();
    test_adamw(1003, 0, false);
    test_adamw(1003, 3, false);
    test_adamw(1003, 0, true);
    test_adamw(1003, 5, true);
    test_adamw(1, 1, false);
    }
    if (rest) test_sums();
    test_relation(20, 3, false);
    test_relation(7, 2, false);
    test_relation(20, 3, true);
    test_relation(7, 2, true);
    test_softmax_kl(1000, 1016, 1.0f, true, 0);    // vector path, extra teacher columns
    test_softmax_kl(1024, 1000, 2.0f, true, 0);    // extra student columns for the CE, τ ≠ 1
    test_softmax_kl(1024, 1024, 1.0f, true, 0);    // CE statistic reused
    test_softmax_kl(203, 199, 1.5f, true, 1);      // scalar path, misaligned rows
    test_softmax_kl(203, 199, 1.0f, false, 0);     // no CE
    test_softmax_kl(1, 1, 1.0f, true, 0);          // one column
    // The fused head's write mode: NaN garbage in, every column of the listed rows out, per-row weights.
    test_softmax_kl(1000, 1016, 1.0f, true, 0, -1, 0.0f, true);
    test_softmax_kl(1024, 1000, 2.0f, false, 0, -1, 0.0f, true);  // no CE: student-only columns written 0
    test_softmax_kl(203, 199, 1.5f, true, 1, -1, 0.0f, true);     // scalar path
    test_softmax_kl(1024, 1000, 2.0f, true, 0, DIV_JSD, 0.9f, true);
    test_softmax_kl(203, 199, 1.0f, false, 1, DIV_RKL, 0.0f, true);
    // The other divergences (softmax_div_bf16): every one on the vector path with the CE fused and
    // τ ≠ 1, the mixture forms also on the scalar path with misaligned rows; fkl through the
    // three-pass kernel matches the two-pass one's reference.
    for (int div = DIV_FKL; div <= DIV_SKEW_RKL; ++div) {
        const float lam = div == DIV_SKL || div == DIV_JSD ? 0.9f : 0.1f;
        test_softmax_kl(1024, 1000, 2.0f, true, 0, div, lam);
        if (!quick && (div == DIV_JSD || div == DIV_SKEW_FKL || div == DIV_SKEW_RKL)) test_softmax_kl(203, 199, 1.0f, false, 1, div, lam);
    }
    test_attention<64>(flash_attn_fwd_bf16_d64, flash_attn_bwd_bf16_d64, {1, 70, 130}, 4, 2, 1);
    test_attention<64>(flash_attn_fwd_bf16_d64, flash_attn_bwd_bf16_d64, {1, 70, 130}, 4, 2, 0);
    test_attention<72>(flash_attn_fwd_bf16_d72, flash_attn_bwd_bf16_d72, {65, 3}, 2, 1, 1);
    test_attention<80>(flash_attn_fwd_bf16_d80, flash_attn_bwd_bf16_d80, {33, 100}, 2, 2, 0);
    test_attention<128>(flash_attn_fwd_bf16_d128, flash_attn_bwd_bf16_d128, {97, 1, 40}, 4, 1, 1);
    if (!quick) {
        test_attention<72>(flash_attn_fwd_bf16_d72, flash_attn_bwd_bf16_d72, {65, 3}, 2, 1, 0);
        test_attention<80>(flash_attn_fwd_bf16_d80, flash_attn_bwd_bf16_d80, {33, 100}, 2, 2, 1);
        test_attention<128>(flash_attn_fwd_bf16_d128, flash_attn_bwd_bf16_d128, {97, 1, 40}, 4, 1, 0);
    }
    // decode attention: GQA groups 1, 2, 3 (chunk of 4), 4, 7, 16 (two chunks); D 64/72/80/128;
    // lens 1..2000; single pass (chunk 0) and split + combine; rows with different slots (one shared).
    test_decode(64, 4, 4, {{2, 1}, {0, 17}, {3, 300}}, 0);
    test_decode(64, 14, 2, {{1, 17}, {4, 2000}, {0, 300}, {2, 1}}, 256);
    test_decode(128, 7, 1, {{1, 2000}, {0, 17}}, 512, 3.0f);
    test_decode(128, 2, 2, {{0, 2000}}, 128);
    test_decode(80, 4, 2, {{2, 300}, {0, 1}, {1, 2000}}, 384);
    if (!quick) {
        test_decode(72, 6, 2, {{1, 300}, {0, 17}}, 0);
        test_decode(64, 16, 1, {{0, 300}, {1, 40}}, 128, 2.0f);
        test_decode(128, 8, 2, {{1, 17}, {0, 1}, {1, 300}}, 0);
        test_decode(80, 1, 1, {{0, 2000}}, 0);
        test_decode(128, 14, 2, {{3, 17}, {1, 300}}, 128);
    }
    printf("%d passed, %d failed\n", passes, failures);
    return failures == 0 ? 0 : 1;
}
