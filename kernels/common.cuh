// common.cuh: the small set of helpers the hand-written kernels share.
//
// What is here, and only this (keep it small and stable: every kernel file includes it):
//   - bf16 <-> f32 conversion (round-to-nearest-even), packing two bf16 into one 32-bit word,
//     unpacking 8 bf16 from one 16-byte vector;
//   - read-only 16-byte global loads;
//   - warp reductions (sum, max) and a block reduction of one float (sum);
//   - kd_exp2: the hardware base-2 exponential (ex2.approx.ftz: ~2 ulp, denormal results flushed to 0),
//     used where a probability is computed from a non-positive argument (softmax, attention);
//   - the tensor-core primitives of the attention kernels: ldmatrix (x4, plain and transposed),
//     mma.sync m16n8k16 bf16 -> f32, and cp.async 16-byte copies with zero fill.
//
// Every device-specific instruction goes through a helper here, so that the kernel files contain
// no inline assembly of their own. Under KD_HOST_SIM (never defined by build.rs) the helpers come
// from kernels/sim/host_sim.h instead: a CPU emulation used to run the kernels' indexing and
// fragment logic on a machine without a GPU (see kernels/README.md).
//
// Precision policy (build.rs compiles WITHOUT --use_fast_math): plain expf/logf/sqrtf/division are
// the precise IEEE versions; the hot softmax exponentials call kd_exp2 explicitly.
#pragma once

#ifdef KD_HOST_SIM
#include "sim/host_sim.h"
#else
#include <cuda_bf16.h>
#include <stdint.h>
#endif

#define KD_LOG2E 1.4426950408889634f
#define KD_LN2 0.6931471805599453f

// ---------------------------------------------------------------------------------------------
// bf16 <-> f32
// ---------------------------------------------------------------------------------------------
#ifndef KD_HOST_SIM

__device__ __forceinline__ float bf16_to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest, ties to even (NaN stays NaN).
__device__ __forceinline__ __nv_bfloat16 f32_to_bf16(float x) { return __float2bfloat16_rn(x); }

// Two floats -> one 32-bit word of two bf16, `lo` in the low half (the lower column index in
// every mma fragment and in memory order).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// The raw 16-bit pattern of a bf16 and back.
__device__ __forceinline__ uint16_t bf16_bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ __nv_bfloat16 bf16_from_bits(uint16_t b) { return __ushort_as_bfloat16(b); }

#endif  // !KD_HOST_SIM

// bf16 bits -> f32 is exact: the bf16 pattern is the high half of the f32 pattern.
__device__ __forceinline__ float bf16_bits_to_f32(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// 8 bf16 packed in a 16-byte vector (memory order: .x low half first) -> 8 floats.
__device__ __forceinline__ void unpack_bf16x8(const uint4& v, float out[8]) {
    out[0] = __uint_as_float(v.x << 16);
    out[1] = __uint_as_float(v.x & 0xffff0000u);
    out[2] = __uint_as_float(v.y << 16);
    out[3] = __uint_as_float(v.y & 0xffff0000u);
    out[4] = __uint_as_float(v.z << 16);
    out[5] = __uint_as_float(v.z & 0xffff0000u);
    out[6] = __uint_as_float(v.w << 16);
    out[7] = __uint_as_float(v.w & 0xffff0000u);
}

// 8 floats -> 8 bf16 (round to nearest even) packed in a 16-byte vector.
__device__ __forceinline__ uint4 pack_bf16x8(const float in[8]) {
    uint4 v;
    v.x = pack_bf16x2(in[0], in[1]);
    v.y = pack_bf16x2(in[2], in[3]);
    v.z = pack_bf16x2(in[4], in[5]);
    v.w = pack_bf16x2(in[6], in[7]);
    return v;
}

// True when p is 16-byte aligned (vector loads/stores allowed).
__device__ __forceinline__ bool is_aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ---------------------------------------------------------------------------------------------
// Device-specific instructions (emulated under KD_HOST_SIM)
// ---------------------------------------------------------------------------------------------
#ifndef KD_HOST_SIM

// Read-only (non-coherent) 16-byte load; p must be 16-byte aligned and not written by this kernel.
__device__ __forceinline__ uint4 ldg_u4(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// 2^x with the SFU (ex2.approx.ftz.f32): max error ~2 ulp; results below 2^-126 flush to 0;
// kd_exp2(-inf) = 0, kd_exp2(NaN) = NaN.
__device__ __forceinline__ float kd_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float shfl_xor_f32(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

// ldmatrix.x4: lane l gives the address of row (l % 8) of 8x8 matrix (l / 8) (16 bytes, 16-byte
// aligned, shared memory). Plain: r[i] of lane t holds matrix i's row t/4, columns 2(t%4), 2(t%4)+1.
// Transposed: r[i] of lane t holds matrix i's rows 2(t%4), 2(t%4)+1 at column t/4.
// In both, the element with the lower index is in the low 16 bits.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row) {
    uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row) {
    uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// D = A·B + D, A 16x16 bf16 (row), B 16x8 bf16 (col), D 16x8 f32. Fragments (g = lane/4, q = lane%4):
//   a[0]: A[g][2q..2q+1]  a[1]: A[g+8][2q..]  a[2]: A[g][8+2q..]  a[3]: A[g+8][8+2q..]
//   b0:   B[2q..2q+1][g]  b1:   B[8+2q..][g]
//   d[0], d[1]: D[g][2q], D[g][2q+1]      d[2], d[3]: D[g+8][2q], D[g+8][2q+1]
__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Asynchronous 16-byte global -> shared copy (cp.async.cg, bypassing L1). When `valid` is false
// nothing is read and the 16 shared bytes are zero-filled (src-size 0); gmem must still be a
// valid-looking address, pass any in-bounds pointer.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

// The block's dynamic shared memory as a 16-byte aligned byte array named `name`.
#define KD_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
// Waits until at most `N` committed groups are still in flight (this thread's copies only:
// follow with __syncthreads() before reading what other threads copied).
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

#endif  // !KD_HOST_SIM

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += shfl_xor_f32(v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, shfl_xor_f32(v, o));
    return v;
}

// Sum of `v` over the block; every thread gets the result. `scratch` is __shared__ float[32];
// blockDim.x must be a multiple of 32. Contains two __syncthreads(): call it from all threads.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Block sum of a double (every thread gets the result): a shared-memory tree over `sh`
// [blockDim.x] (a power of two), no shuffles; a fixed order, so the same bits every run.
__device__ __forceinline__ double block_sum_f64(double v, double* sh) {
    const int tid = threadIdx.x;
    __syncthreads();  // sh may still be read by a previous call
    sh[tid] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) sh[tid] += sh[tid + s];
        __syncthreads();
    }
    return sh[0];
}
