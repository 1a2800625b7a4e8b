// cross_entropy.cu — fused cross-entropy: loss and ∂/∂logits of each row in one launch.
//
// What: for row r with target t (IGNORE_INDEX = −100: no target), lse = log Σ_v exp(z_v);
// row_loss[r] = lse − z_t; dlogits[r, v] = scale·(exp(z_v − lse) − [v = t]); rows without a target
// get row_loss 0 and a zero gradient row (overwritten, as the CPU reference does). The host sums
// row_loss in order (deterministic, f64).
//
// Shapes: logits, dlogits [rows, vocab] bf16 (vocab up to 151936 and beyond); targets [rows] int;
// row_loss [rows] fp32.
//
// Why this way: one block per row, two passes over the row: an online (max, sum) pass in fp32
// registers, combined across the block, then the gradient pass, so probabilities are never
// stored; both passes are coalesced bf16 reads (the second mostly from L2 for rows of ~300 KB).
// The distillation rows that also carry a label use the CE fused into softmax_kl.cu instead; this
// kernel serves plain L_ce (PT and SFT stages, and rows without a teacher).

#ifdef KD_HOST_SIM
#include "sim/host_sim.h"  // the CPU emulation (kernels/sim/): the simulated device runs this file too
#else
#include <cuda_bf16.h>
#endif

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float f(bf16 x) { return __bfloat162float(x); }

// Combine two (max, sum of exp(x − max)) pairs; an empty pair is (−inf, 0).
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    if (mm == -INFINITY) {
        m = mm;
        s = 0.f;
        return;
    }
    s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
    m = mm;
}

// Grid rows, block 512 (any multiple of 32 up to 1024 works).
extern "C" __global__ void cross_entropy_bf16(const bf16* logits, const int* targets, int vocab, float scale,
                                              float* row_loss, bf16* dlogits) {
    long long r = blockIdx.x;
    const bf16* z = logits + r * vocab;
    bf16* d = dlogits + r * vocab;
    int t = targets[r];
    if (t < 0) {  // IGNORE_INDEX (targets were range-checked on the host)
        for (int v = threadIdx.x; v < vocab; v += blockDim.x) d[v] = __float2bfloat16(0.f);
        if (threadIdx.x == 0) row_loss[r] = 0.f;
        return;
    }
    float m = -INFINITY, s = 0.f;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
        float x = f(z[v]);
        if (x > m) {
            s = s * __expf(m - x) + 1.f;
            m = x;
        } else if (x != -INFINITY) {  // exp(−inf − −inf) would be NaN; a −inf logit adds nothing
            s += __expf(x - m);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffff, m, o);
        float s2 = __shfl_xor_sync(0xffffffff, s, o);
        combine(m, s, m2, s2);
    }
    __shared__ float wm[32], ws[32];
    __shared__ float lse_sh;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        wm[warp] = m;
        ws[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        m = lane < nw ? wm[lane] : -INFINITY;
        s = lane < nw ? ws[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffff, m, o);
            float s2 = __shfl_xor_sync(0xffffffff, s, o);
            combine(m, s, m2, s2);
        }
        if (lane == 0) lse_sh = m + logf(s);
    }
    __syncthreads();
    float lse = lse_sh;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
        float p = __expf(f(z[v]) - lse);
        d[v] = __float2bfloat16(scale * (v == t ? p - 1.f : p));
    }
    if (threadIdx.x == 0) row_loss[r] = lse - f(z[t]);
}
