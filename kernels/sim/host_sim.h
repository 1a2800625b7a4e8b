// host_sim.h: a small CPU emulation of the CUDA subset the kernels in kernels/*.cu use, so that
// their indexing, bounds handling, barriers and tensor-core fragment logic can be run and checked
// on a machine without a GPU (kernels/sim/sim_test.cpp; `bash kernels/sim/run.sh`).
//
// How: every CUDA thread of a block is a fiber on one OS thread (switched by a few instructions on
// x86-64; by ucontext elsewhere, whose swapcontext makes a system call per switch); blocks run one
// after another. A fiber runs until it reaches a collective (__syncthreads, a shuffle, ldmatrix, mma),
// where it waits for the others it synchronises with. Warp collectives are emulated from the PTX
// ISA's definitions: each lane deposits its operands, and after a warp barrier each lane computes
// its own result from all deposits.
// Schedules (KD_SIM_SCHEDULE): `lockstep` (default) runs every fiber to its next collective in
// turn, so warps advance nearly together; `warps` runs one warp at a time from one __syncthreads
// to the next, first warp first, and `warps-reverse` last warp first. A missing __syncthreads
// then shows: under `warps` a warp reads shared memory that later warps have not written yet;
// under `warps-reverse` a warp overwrites a tile that earlier warps have not read yet.
// cp.async copies are deferred until the cp.async.wait_group that covers them (or the thread's
// exit), so reading a tile before its wait sees the old contents.
// What it does NOT model: the memory model between blocks (blocks are sequential), timing, and
// ex2.approx's error (exact exp2f).
// Included by kernels/common.cuh when KD_HOST_SIM is defined; never part of the GPU build.
#pragma once

#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

using std::max;
using std::min;

struct uint4 { uint32_t x, y, z, w; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }
struct kd_dim3 { unsigned x, y, z; };

struct __nv_bfloat16 { uint16_t bits; };

inline float __uint_as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }

namespace kd_sim {

struct Barrier {
    int count = 0;
    unsigned long long generation = 0;
};

// A cp.async copy not yet performed.
struct PendingCopy {
    void* smem;
    const void* gmem;
    bool valid;
};

// A fiber's saved execution context and the switch between two.
#if defined(__x86_64__)
struct Context {
    void* sp = nullptr;
};
// Saves the callee-saved registers on the current stack, stores its pointer in *save, loads `to`
// and pops the registers saved there (System V x86-64: everything else is the caller's to save).
__attribute__((naked, noinline)) static void kd_ctx_switch(void** /*save*/, void* /*to*/) {
    __asm__ volatile(
        "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
        "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
        "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}
inline void ctx_switch(Context& from, Context& to) { kd_ctx_switch(&from.sp, to.sp); }
// A context that starts `entry` on [stack, stack + size): six zeroed registers for the first
// switch to pop, then `entry` as the return address, so `entry` starts as if called (rsp ≡ 8 mod 16).
inline void ctx_make(Context& c, char* stack, size_t size, void (*entry)()) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;  // entry's own (never used) return address
    *--sp = reinterpret_cast<void*>(entry);
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
inline void ctx_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void ctx_make(Context& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

// Fiber stacks, kept for the life of the process and reused by every block: mapped once, never
// zeroed again (a block of 1024 threads would otherwise clear 256 MiB per block).
constexpr size_t kStackBytes = 256 * 1024;
inline char* fiber_stack(size_t i) {
    static std::vector<char*> stacks;
    while (stacks.size() <= i) {
        void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) { fprintf(stderr, "sim: cannot map a fiber stack\n"); abort(); }
        stacks.push_back(static_cast<char*>(p));
    }
    return stacks[i];
}

struct Fiber {
    Context ctx;
    int tid = 0;
    bool done = false;
    // Waiting at __syncthreads for the block barrier to leave generation `block_gen`.
    bool block_wait = false;
    unsigned long long block_gen = 0;
    // cp.async: issued copies, and the end of each committed group in `pending`.
    std::vector<PendingCopy> pending;
    std::vector<size_t> groups;
};

enum class Schedule { Lockstep, Warps, WarpsReverse };

inline Schedule schedule() {
    static Schedule s = [] {
        const char* e = getenv("KD_SIM_SCHEDULE");
        if (e == nullptr || strcmp(e, "lockstep") == 0) return Schedule::Lockstep;
        if (strcmp(e, "warps") == 0) return Schedule::Warps;
        if (strcmp(e, "warps-reverse") == 0) return Schedule::WarpsReverse;
        fprintf(stderr, "sim: KD_SIM_SCHEDULE=%s is not lockstep, warps or warps-reverse\n", e);
        abort();
    }();
    return s;
}

struct Block {
    std::vector<Fiber> fibers;
    Context sched;
    int cur = 0;
    int n_threads = 0;
    Barrier block_bar;
    std::vector<Barrier> warp_bars;
    // Per-warp deposit slots for collectives (32 lanes × up to 16 words).
    std::vector<uint64_t> slots;
    std::vector<unsigned char> dyn_smem;
    std::function<void()> body;
    bool progressed = false;
};

inline Block*& block() { static Block* b = nullptr; return b; }
inline kd_dim3& block_idx() { static kd_dim3 d{0, 0, 0}; return d; }
inline kd_dim3& grid_dim() { static kd_dim3 d{1, 1, 1}; return d; }
inline kd_dim3& block_dim() { static kd_dim3 d{1, 1, 1}; return d; }

inline Fiber& me() { return block()->fibers[block()->cur]; }
inline void yield() { ctx_switch(me().ctx, block()->sched); }

inline void wait_barrier(Barrier& b, int expected) {
    unsigned long long gen = b.generation;
    block()->progressed = true;
    if (++b.count == expected) {
        b.count = 0;
        b.generation++;
        return;
    }
    const bool is_block = &b == &block()->block_bar;
    if (is_block) {
        me().block_wait = true;
        me().block_gen = gen;
    }
    while (b.generation == gen) yield();
    me().block_wait = false;
}

// Performs this thread's oldest pending cp.async copies, up to `end`.
inline void complete_copies(size_t end) {
    Fiber& f = me();
    for (size_t i = 0; i < end; ++i) {
        const PendingCopy& c = f.pending[i];
        if (c.valid) memcpy(c.smem, c.gmem, 16);
        else memset(c.smem, 0, 16);
    }
    f.pending.erase(f.pending.begin(), f.pending.begin() + (long)end);
    for (size_t& g : f.groups) g -= end;
}

inline void warp_barrier() { wait_barrier(block()->warp_bars[me().tid >> 5], 32); }
inline uint64_t* warp_slots() { return &block()->slots[(size_t)(me().tid >> 5) * 32 * 16]; }

inline void fiber_entry() {
    block()->body();
    me().groups.clear();
    complete_copies(me().pending.size());  // outstanding copies still land
    me().done = true;
    block()->progressed = true;
    ctx_switch(me().ctx, block()->sched);
}

// Runs `body` as every thread of a grid (blocks one after another).
inline void launch(kd_dim3 grid, kd_dim3 blk, size_t dyn_smem, std::function<void()> body) {
    const int nt = (int)(blk.x * blk.y * blk.z);
    if (nt % 32 != 0) { fprintf(stderr, "sim: block size must be a multiple of 32\n"); abort(); }
    grid_dim() = grid;
    block_dim() = blk;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Block b;
                b.n_threads = nt;
                b.fibers.resize(nt);
                b.warp_bars.resize(nt / 32);
                b.slots.assign((size_t)nt * 16, 0);
                b.dyn_smem.assign(dyn_smem + 16, 0xCD);  // poisoned, like uninitialised smem
                b.body = body;
                block() = &b;
                block_idx() = kd_dim3{bx, by, bz};
                for (int t = 0; t < nt; ++t) {
                    Fiber& f = b.fibers[t];
                    f.tid = t;
                    ctx_make(f.ctx, fiber_stack((size_t)t), kStackBytes, fiber_entry);
                }
                int live = nt;
                const int nw = nt / 32;
                // Whether fiber t is parked at __syncthreads that has not released yet.
                auto parked = [&b](int t) { return b.fibers[t].block_wait && b.block_bar.generation == b.fibers[t].block_gen; };
                while (live > 0) {
                    b.progressed = false;
                    if (schedule() == Schedule::Lockstep) {
                        for (int t = 0; t < nt; ++t) {
                            if (b.fibers[t].done) continue;
                            b.cur = t;
                            ctx_switch(b.sched, b.fibers[t].ctx);
                        }
                    } else {
                        // One warp at a time, each up to its next __syncthreads (or its end).
                        for (int k = 0; k < nw; ++k) {
                            const int w = schedule() == Schedule::Warps ? k : nw - 1 - k;
                            for (bool ran = true; ran;) {
                                ran = false;
                                const bool before = b.progressed;
                                b.progressed = false;
                                for (int t = 32 * w; t < 32 * w + 32; ++t) {
                                    if (b.fibers[t].done || parked(t)) continue;
                                    b.cur = t;
                                    ctx_switch(b.sched, b.fibers[t].ctx);
                                    ran = true;
                                }
                                // A pass with no arrival anywhere: this warp is stuck (its lanes
                                // wait on each other across a __syncthreads); the others may not be.
                                if (!b.progressed) ran = false;
                                b.progressed = b.progressed || before;
                            }
                        }
                    }
                    live = 0;
                    for (int t = 0; t < nt; ++t) live += !b.fibers[t].done;
                    if (live > 0 && !b.progressed) {
                        fprintf(stderr, "sim: deadlock in block (%u,%u,%u): %d threads wait forever\n", bx, by, bz, live);
                        abort();
                    }
                }
                block() = nullptr;
            }
}

inline unsigned char* dyn_smem() {
    uintptr_t p = reinterpret_cast<uintptr_t>(block()->dyn_smem.data());
    return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
}

}  // namespace kd_sim

struct kd_tid_proxy {
    unsigned x, y, z;
};
inline kd_tid_proxy kd_thread_idx() {
    int t = kd_sim::me().tid;
    kd_dim3 b = kd_sim::block_dim();
    return kd_tid_proxy{(unsigned)(t % b.x), (unsigned)((t / b.x) % b.y), (unsigned)(t / (b.x * b.y))};
}
#define threadIdx (kd_thread_idx())
#define blockIdx (kd_sim::block_idx())
#define blockDim (kd_sim::block_dim())
#define gridDim (kd_sim::grid_dim())

inline void __syncthreads() { kd_sim::wait_barrier(kd_sim::block()->block_bar, kd_sim::block()->n_threads); }

inline float atomicAdd(float* p, float v) { float old = *p; *p = old + v; return old; }

// ---- bf16 ----
inline float bf16_to_f32(__nv_bfloat16 x) { return __uint_as_float((uint32_t)x.bits << 16); }
inline __nv_bfloat16 f32_to_bf16(float x) {
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline uint32_t pack_bf16x2(float lo, float hi) {
    return (uint32_t)f32_to_bf16(lo).bits | ((uint32_t)f32_to_bf16(hi).bits << 16);
}
inline uint16_t bf16_bits(__nv_bfloat16 x) { return x.bits; }
inline __nv_bfloat16 bf16_from_bits(uint16_t b) { return __nv_bfloat16{b}; }

// ---- device instructions ----
inline uint4 ldg_u4(const void* p) {
    if (reinterpret_cast<uintptr_t>(p) & 15u) { fprintf(stderr, "sim: misaligned 16-byte load\n"); abort(); }
    uint4 v;
    memcpy(&v, p, 16);
    return v;
}

inline float kd_exp2(float x) { return exp2f(x); }

// The CUDA intrinsics that elementwise.cu, norm.cu and cross_entropy.cu call directly (they do not
// go through common.cuh). __expf is the SFU's approximation on a GPU; here it is exact.
inline float __bfloat162float(__nv_bfloat16 x) { return bf16_to_f32(x); }
inline __nv_bfloat16 __float2bfloat16(float x) { return f32_to_bf16(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return f32_to_bf16(x); }
inline float kd_sim_expf(float x) { return expf(x); }
#define __expf kd_sim_expf
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

inline float shfl_xor_f32(float v, int mask) {
    using namespace kd_sim;
    uint64_t* s = warp_slots();
    const int lane = me().tid & 31;
    s[lane * 16] = __float_as_uint(v);
    warp_barrier();
    float r = __uint_as_float((uint32_t)s[(lane ^ mask) * 16]);
    warp_barrier();
    return r;
}

// Every lane of the warp takes part (the kernels pass the full mask).
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) { return shfl_xor_f32(v, lane_mask); }

inline uint16_t kd_sim_ld16(uintptr_t a) { uint16_t h; memcpy(&h, reinterpret_cast<const void*>(a), 2); return h; }

inline void kd_sim_ldmatrix(uint32_t r[4], const void* row, bool trans) {
    using namespace kd_sim;
    uint64_t* s = warp_slots();
    const int lane = me().tid & 31;
    if (reinterpret_cast<uintptr_t>(row) & 15u) { fprintf(stderr, "sim: ldmatrix row not 16-byte aligned\n"); abort(); }
    unsigned char* lo = dyn_smem();
    unsigned char* hi = lo + block()->dyn_smem.size() - 16;
    const unsigned char* rp = static_cast<const unsigned char*>(row);
    if (rp < lo || rp + 16 > hi) { fprintf(stderr, "sim: ldmatrix row outside dynamic shared memory\n"); abort(); }
    s[lane * 16] = reinterpret_cast<uintptr_t>(row);
    warp_barrier();
    const int g = lane >> 2, q = lane & 3;
    for (int i = 0; i < 4; ++i) {
        uint16_t e0, e1;
        if (!trans) {
            uintptr_t a = (uintptr_t)s[(8 * i + g) * 16];
            e0 = kd_sim_ld16(a + 2 * (2 * q));
            e1 = kd_sim_ld16(a + 2 * (2 * q + 1));
        } else {
            e0 = kd_sim_ld16((uintptr_t)s[(8 * i + 2 * q) * 16] + 2 * g);
            e1 = kd_sim_ld16((uintptr_t)s[(8 * i + 2 * q + 1) * 16] + 2 * g);
        }
        r[i] = (uint32_t)e0 | ((uint32_t)e1 << 16);
    }
    warp_barrier();
}
inline void ldmatrix_x4(uint32_t r[4], const void* row) { kd_sim_ldmatrix(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t r[4], const void* row) { kd_sim_ldmatrix(r, row, true); }

// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 from the PTX ISA fragment layouts.
inline void mma_bf16_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    using namespace kd_sim;
    uint64_t* s = warp_slots();
    const int lane = me().tid & 31;
    for (int i = 0; i < 4; ++i) s[lane * 16 + i] = a[i];
    s[lane * 16 + 4] = b0;
    s[lane * 16 + 5] = b1;
    warp_barrier();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, q = l & 3;
        const uint64_t* f = s + l * 16;
        auto lo = [](uint64_t w) { return __uint_as_float((uint32_t)(w & 0xffff) << 16); };
        auto hi = [](uint64_t w) { return __uint_as_float((uint32_t)((w >> 16) & 0xffff) << 16); };
        A[g][2 * q] = lo(f[0]);         A[g][2 * q + 1] = hi(f[0]);
        A[g + 8][2 * q] = lo(f[1]);     A[g + 8][2 * q + 1] = hi(f[1]);
        A[g][8 + 2 * q] = lo(f[2]);     A[g][8 + 2 * q + 1] = hi(f[2]);
        A[g + 8][8 + 2 * q] = lo(f[3]); A[g + 8][8 + 2 * q + 1] = hi(f[3]);
        B[2 * q][g] = lo(f[4]);         B[2 * q + 1][g] = hi(f[4]);
        B[8 + 2 * q][g] = lo(f[5]);     B[8 + 2 * q + 1][g] = hi(f[5]);
    }
    const int g = lane >> 2, q = lane & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
    float out[4];
    for (int i = 0; i < 4; ++i) {
        float acc = d[i];
        for (int kk = 0; kk < 16; ++kk) acc += A[rows[i]][kk] * B[kk][cols[i]];
        out[i] = acc;
    }
    warp_barrier();
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

inline void cp_async16(void* smem, const void* gmem, bool valid) {
    if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) & 15u) {
        fprintf(stderr, "sim: cp.async address not 16-byte aligned\n");
        abort();
    }
    kd_sim::me().pending.push_back(kd_sim::PendingCopy{smem, gmem, valid});
}
inline void cp_async_commit() { kd_sim::me().groups.push_back(kd_sim::me().pending.size()); }
// cp.async.wait_group N: every committed group but the N most recent has landed.
template <int N>
inline void cp_async_wait() {
    kd_sim::Fiber& f = kd_sim::me();
    if (f.groups.size() <= (size_t)N) return;
    const size_t done = f.groups.size() - N;
    const size_t end = f.groups[done - 1];
    f.groups.erase(f.groups.begin(), f.groups.begin() + (long)done);
    kd_sim::complete_copies(end);
}

#define KD_DYNAMIC_SMEM(name) unsigned char* name = kd_sim::dyn_smem()
