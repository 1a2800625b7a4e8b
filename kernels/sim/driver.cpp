// driver.cpp: the CUDA driver API of the simulated device (libkd_cuda_sim.so, soname libcuda.so):
// the subset cudarc and src/backend/cuda/device.rs call, answered on the CPU. See cuda_sim.h for
// how it is loaded in place of the real libcuda.
//
// Faithful where the real driver refuses: cuInit first, a current context for every call that
// needs one, handles checked, launch configurations checked against the device's limits and the
// kernel's __launch_bounds__ (the PTX's .maxntid), dynamic shared memory over 48 KiB only after
// cuFuncSetAttribute and never over the device's opt-in maximum, copies and memsets inside one
// live buffer. Each answers with the CUresult the real driver documents for it. A kernel that
// writes outside its buffers (found from guard zones after every launch) is an illegal address,
// sticky like the real one: every later call of the context fails with it.
// Kernels run synchronously at launch (on the emulator: every thread a fiber, blocks one after
// another), so events time the host, and the stream is always idle.
//
// Module images: PTX text, or an ELF cubin (the kernel entries from its symbol table, their
// parameter sizes and __launch_bounds__ from its .nv.info.<kernel> sections); each kernel found is
// bound to the host-compiled kernel of that name. As the real driver does, a cubin is refused on a
// device that cannot run its SM version, PTX whose .target is above the device, and a fatbin
// container is not read (kd-engine embeds plain cubins). cuModuleLoadDataEx writes why into the
// caller's CU_JIT_ERROR_LOG_BUFFER. The compute capability reported (default 9.0) is
// KD_SIM_COMPUTE_CAPABILITY=major.minor, so the image choice for other GPUs can be tested.
//
// The step-cost model (benches/step_model.py, issue 15) needs every operation of a training step
// at the anchor's full sizes, where emulating the kernels would take days. The trace
// (KD_SIM_TRACE) gives each launch's argument values and the bytes of the buffers it is handed,
// each GEMM's shape, FLOPs and bytes, each memset and copy, and the caller's phase marks
// (kd_sim_mark); KD_SIM_COUNT_ONLY=1 then checks, counts and traces every call but computes
// nothing: no kernel runs, no byte moves, and device memory is reserved address space that is
// never touched, so the anchor's tens of GB of buffers cost no RAM. Results are meaningless then
// (read-backs give positive filler values); only the operations are real.

#include <math.h>
#include <sys/mman.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "cuda_sim.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct KdCtx* CUcontext;
typedef struct KdModule* CUmodule;
typedef struct KdFunction* CUfunction;
typedef struct KdEvent* CUevent;
typedef struct KdStream* CUstream;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_NO_BINARY_FOR_GPU = 209,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

// The device it presents: an H200's limits (compute capability 9.0 unless KD_SIM_COMPUTE_CAPABILITY
// says otherwise, 132 SMs, 227 KiB of opt-in shared memory per block), with memory bounded by the
// host (KD_SIM_DEVICE_MEMORY_MIB, default 8 GiB).
// KD_SIM_DEVICES (default 1) devices are listed, so each rank of a multi-process job can open the
// ordinal LOCAL_RANK names, as on a node with that many GPUs; one process uses one of them.
static const char* kDeviceName = "kd-engine simulated CUDA device (H200 limits, kernels on the CPU emulator)";
static const int kSmCount = 132;
static const int kMaxThreadsPerBlock = 1024;
static const size_t kDefaultSmem = 48 * 1024;
static const size_t kMaxSmemOptin = 232448;
static const size_t kGuard = 4096;
static const unsigned char kGuardByte = 0xA5;
static const unsigned char kFreshByte = 0xFF;  // f32 and bf16 NaN, int -1: reads of unwritten memory show

struct KdCtx { int device; };
struct KdEvent { bool recorded = false; std::chrono::steady_clock::time_point at; unsigned id = 0; };
// A created stream. Work runs at launch on every stream, so streams only name the work (the
// trace shows which stream each launch, event and collective is on).
struct KdStream { int id; };
struct KdFunction {
    std::string name;
    const kd_simdev::HostKernel* kernel;
    unsigned maxntid;  // 0: no __launch_bounds__
    int max_dynamic_smem = (int)kDefaultSmem;
};
struct KdModule { std::map<std::string, std::unique_ptr<KdFunction>> functions; };

struct Allocation {
    unsigned char* raw;  // kGuard bytes, then the allocation, then kGuard bytes
    size_t size;
    // What the buffer lent from this block uses (kd_sim_lend); the rest of the block is guarded.
    // `lent == false`: the caching pool holds the block free, so all of it is guarded.
    size_t used;
    bool lent;
};

namespace {

struct Driver {
    bool initialised = false;
    KdCtx primary{0};
    int primary_refs = 0;
    int devices = 1;
    std::map<uint64_t, Allocation> allocs;  // by device address
    size_t allocated = 0;
    size_t capacity = 0;
    int cc_major = 9, cc_minor = 0;
    std::set<KdModule*> modules;
    std::set<KdFunction*> functions;
    std::set<KdEvent*> events;
    std::set<KdStream*> streams;
    int next_stream = 1;
    unsigned next_event = 1;
    KdSimCounters counters{};
    int sticky = CUDA_SUCCESS;
    bool count_only = false;  // KD_SIM_COUNT_ONLY=1
};

Driver& drv() {
    static Driver* d = new Driver();  // never destroyed: cudarc may call in from atexit handlers
    return *d;
}

thread_local CUcontext current_ctx = nullptr;

std::map<std::string, kd_simdev::HostKernel>& registry() {
    static auto* r = new std::map<std::string, kd_simdev::HostKernel>();
    return *r;
}

void say(const std::string& s) { fprintf(stderr, "kd-cuda-sim: %s\n", s.c_str()); }

// The checks at the top of every call that needs a context.
CUresult ready() {
    Driver& d = drv();
    if (!d.initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (current_ctx == nullptr) return CUDA_ERROR_INVALID_CONTEXT;
    return d.sticky;
}

// The live allocation holding `ptr`, or null.
Allocation* find_alloc(uint64_t ptr, uint64_t* base) {
    auto& a = drv().allocs;
    auto it = a.upper_bound(ptr);
    if (it == a.begin()) return nullptr;
    --it;
    if (ptr >= it->first + it->second.size) return nullptr;
    *base = it->first;
    return &it->second;
}

std::string hex(uint64_t x) {
    char b[32];
    snprintf(b, sizeof b, "0x%llx", (unsigned long long)x);
    return b;
}

std::string range_problem(uint64_t ptr, size_t bytes) {
    uint64_t base = 0;
    Allocation* a = find_alloc(ptr, &base);
    if (a == nullptr) return "address " + hex(ptr) + " is not in any live allocation";
    const size_t off = (size_t)(ptr - base);
    if (!a->lent) return "address " + hex(ptr) + " is in a block the caching pool holds free (use after free)";
    if (bytes > a->used - std::min(off, a->used))
        return std::to_string(bytes) + " bytes at offset " + std::to_string(off) + " run past the end of a " +
               std::to_string(a->used) + "-byte buffer (allocation " + hex(base) + ")";
    return "";
}

void fill_guards(uint64_t base, Allocation& a) {
    if (drv().count_only) return;  // no kernel runs that could write past a buffer
    memset(a.raw, kGuardByte, kGuard);
    const size_t from = a.lent ? a.used : 0;
    memset(a.raw + kGuard + from, kGuardByte, a.size - from + kGuard);
}

// The first byte of [p, p + n) that is not the guard pattern, or -1.
long first_bad(const unsigned char* p, size_t n) {
    static unsigned char pattern[4096];
    static bool init = (memset(pattern, kGuardByte, sizeof pattern), true);
    (void)init;
    for (size_t o = 0; o < n; o += sizeof pattern) {
        const size_t len = std::min(sizeof pattern, n - o);
        if (memcmp(p + o, pattern, len) != 0)
            for (size_t i = 0; i < len; ++i)
                if (p[o + i] != kGuardByte) return (long)(o + i);
    }
    return -1;
}

// After a launch: every guard zone must be intact, else the kernel wrote outside its buffers.
CUresult check_guards(const std::string& kernel) {
    for (auto& [base, a] : drv().allocs) {
        long bad = first_bad(a.raw, kGuard);
        std::string where;
        if (bad >= 0) where = std::to_string(kGuard - (size_t)bad) + " bytes before the start of a " + std::to_string(a.lent ? a.used : a.size) + "-byte buffer";
        if (where.empty()) {
            const size_t from = a.lent ? a.used : 0;
            // A free cached block is checked in its first 64 KiB (where a stale pointer lands);
            // a lent buffer's slack and the tail guard in full.
            const size_t tail = a.size - from + kGuard;
            bad = first_bad(a.raw + kGuard + from, a.lent ? tail : std::min(tail, (size_t)64 << 10));
            if (bad >= 0)
                where = a.lent ? "at byte " + std::to_string(from + (size_t)bad) + " of a " + std::to_string(a.used) + "-byte buffer (past its end)"
                               : "at byte " + std::to_string((size_t)bad) + " of a block the caching pool holds free (use after free)";
        }
        if (!where.empty()) {
            drv().sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
            say("kernel " + kernel + " wrote outside its buffers: " + where + " (allocation " + hex(base) + ")");
            return CUDA_ERROR_ILLEGAL_ADDRESS;
        }
    }
    return CUDA_SUCCESS;
}

// Parameter sizes and .maxntid (__launch_bounds__) of a kernel, from its PTX `.entry` or cubin.
struct KernelEntry {
    std::vector<size_t> params;
    unsigned maxntid = 0;
};

std::map<std::string, KernelEntry> parse_ptx(const std::string& ptx) {
    std::map<std::string, KernelEntry> out;
    size_t pos = 0;
    while ((pos = ptx.find(".entry ", pos)) != std::string::npos) {
        pos += 7;
        const size_t open = ptx.find('(', pos), body = ptx.find('{', pos);
        if (open == std::string::npos || body == std::string::npos) break;
        std::string name = ptx.substr(pos, open - pos);
        while (!name.empty() && isspace((unsigned char)name.back())) name.pop_back();
        const size_t close = ptx.find(')', open);
        KernelEntry e;
        std::string params = ptx.substr(open + 1, close - open - 1);
        size_t p = 0;
        while ((p = params.find(".param", p)) != std::string::npos) {
            size_t end = params.find(',', p);
            std::string decl = params.substr(p, end == std::string::npos ? std::string::npos : end - p);
            p += 6;
            // `.param .u64 ...`, `.param .align 8 .b8 name[24]`
            size_t bits = 0, count = 1;
            size_t t = decl.find(" .", 6);
            std::string rest = decl.substr(t == std::string::npos ? 6 : t + 1);
            if (rest.rfind(".align", 0) == 0) rest = rest.substr(rest.find(" .", 6) + 1);
            bits = strtoul(rest.c_str() + 2, nullptr, 10);
            size_t br = decl.find('[');
            if (br != std::string::npos) count = strtoul(decl.c_str() + br + 1, nullptr, 10);
            e.params.push_back(br != std::string::npos ? count * std::max<size_t>(bits, 8) / 8 : bits / 8);
        }
        const std::string between = ptx.substr(close, body - close);
        const size_t mx = between.find(".maxntid");
        if (mx != std::string::npos) {
            unsigned x = 1, y = 1, z = 1;
            sscanf(between.c_str() + mx + 8, " %u , %u , %u", &x, &y, &z);
            e.maxntid = x * y * z;
        }
        out[name] = e;
        pos = body;
    }
    return out;
}

}  // namespace

// ---- shared with cublas.cpp and the kernel modules ----
namespace kd_simdev {
std::recursive_mutex& device_lock() {
    static auto* m = new std::recursive_mutex();
    return *m;
}
void register_kernel(const char* name, HostKernel k) { registry()[name] = k; }
std::string check_range(uint64_t ptr, size_t bytes) {
    std::lock_guard<std::recursive_mutex> g(device_lock());
    return bytes == 0 ? "" : range_problem(ptr, bytes);
}
void count_gemm(int m, int n, int k, double flops, double bytes) {
    std::lock_guard<std::recursive_mutex> g(device_lock());
    drv().counters.gemm_calls++;
    drv().counters.gemm_flops += flops;
    trace("gemm " + std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k) + " flops=" + std::to_string((long long)flops) +
          " bytes=" + std::to_string((long long)bytes));
}
bool count_only() { return drv().count_only; }
bool context_current() { return drv().initialised && current_ctx != nullptr; }

int stream_id(void* s) {
    std::lock_guard<std::recursive_mutex> g(device_lock());
    auto it = drv().streams.find(static_cast<CUstream>(s));
    return it == drv().streams.end() ? 0 : (*it)->id;
}

// KD_SIM_TRACE=<folder>: one line per launch (with its arguments and bytes), GEMM, memset, copy,
// event record, stream wait, collective and caller's mark, in order, to <folder>/<pid>.trace, so
// tests can check what ran on which stream after what, and benches/step_model.py can cost a step.
static FILE* trace_file() {
    static FILE* f = [] {
        const char* dir = getenv("KD_SIM_TRACE");
        return dir ? fopen((std::string(dir) + "/" + std::to_string(getpid()) + ".trace").c_str(), "w") : nullptr;
    }();
    return f;
}
bool tracing() { return trace_file() != nullptr; }
void trace(const std::string& line) {
    FILE* f = trace_file();
    if (f == nullptr) return;
    std::lock_guard<std::recursive_mutex> g(device_lock());
    fprintf(f, "%s\n", line.c_str());
    fflush(f);
}
void fail_sticky(int e, const std::string& why) {
    std::lock_guard<std::recursive_mutex> g(device_lock());
    drv().sticky = e;
    say(why);
}
}  // namespace kd_simdev

#define LOCK std::lock_guard<std::recursive_mutex> kd_guard(kd_simdev::device_lock())
#define TRY(x)                           \
    do {                                 \
        CUresult kd_r = (x);             \
        if (kd_r != CUDA_SUCCESS) return kd_r; \
    } while (0)

// ---- the kd-engine side channel (src/backend/cuda/sim.rs) ----

// The pool lends [ptr, ptr + used) of the block at ptr to a new buffer: that part is filled with
// NaN bytes like a fresh allocation, the rest of the block becomes guard zone.
KD_SIM_EXPORT int kd_sim_lend(uint64_t ptr, size_t used) {
    LOCK;
    uint64_t base = 0;
    Allocation* a = find_alloc(ptr, &base);
    if (a == nullptr || base != ptr || used > a->size) return CUDA_ERROR_INVALID_VALUE;
    a->lent = true;
    a->used = used;
    if (!drv().count_only) memset(a->raw + kGuard, kFreshByte, used);
    fill_guards(base, *a);
    return CUDA_SUCCESS;
}

// The buffer at ptr went back to the pool's cache: the whole block becomes guard zone.
KD_SIM_EXPORT int kd_sim_reclaim(uint64_t ptr) {
    LOCK;
    uint64_t base = 0;
    Allocation* a = find_alloc(ptr, &base);
    if (a == nullptr || base != ptr) return CUDA_ERROR_INVALID_VALUE;
    a->lent = false;
    fill_guards(base, *a);
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT void kd_sim_counters(KdSimCounters* out) {
    LOCK;
    *out = drv().counters;
}

// A mark from the caller (bench-step: where each step and phase ends) in the trace.
KD_SIM_EXPORT void kd_sim_mark(const char* what) { kd_simdev::trace(std::string("mark ") + (what ? what : "")); }

// ---- initialisation, device, context ----

KD_SIM_EXPORT CUresult cuInit(unsigned flags) {
    LOCK;
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    Driver& d = drv();
    if (!d.initialised) {
        const char* mib = getenv("KD_SIM_DEVICE_MEMORY_MIB");
        d.capacity = (size_t)(mib ? strtoull(mib, nullptr, 10) : 8192) << 20;
        if (const char* cc = getenv("KD_SIM_COMPUTE_CAPABILITY")) {
            int major = 0, minor = 0;
            char tail = 0;
            if (sscanf(cc, "%d.%d%c", &major, &minor, &tail) != 2 || major < 1 || minor < 0 || minor > 9) {
                say(std::string("KD_SIM_COMPUTE_CAPABILITY=") + cc + ": expected major.minor, e.g. 8.6");
                return CUDA_ERROR_INVALID_VALUE;
            }
            d.cc_major = major;
            d.cc_minor = minor;
        }
        const char* n = getenv("KD_SIM_DEVICES");
        d.devices = n ? std::max(1, atoi(n)) : 1;
        const char* count_only = getenv("KD_SIM_COUNT_ONLY");
        d.count_only = count_only != nullptr && strcmp(count_only, "1") == 0;
        d.initialised = true;
    }
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuDriverGetVersion(int* v) {
    if (v == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuDeviceGetCount(int* n) {
    LOCK;
    if (!drv().initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (n == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *n = drv().devices;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuDeviceGet(CUdevice* dev, int ordinal) {
    LOCK;
    if (!drv().initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (dev == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal < 0 || ordinal >= drv().devices) return CUDA_ERROR_INVALID_DEVICE;
    *dev = ordinal;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice dev) {
    LOCK;
    if (!drv().initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (dev < 0 || dev >= drv().devices) return CUDA_ERROR_INVALID_DEVICE;
    if (name == nullptr || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    snprintf(name, (size_t)len, "%s", kDeviceName);
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice dev) {
    LOCK;
    if (!drv().initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (dev < 0 || dev >= drv().devices) return CUDA_ERROR_INVALID_DEVICE;
    if (bytes == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *bytes = drv().capacity;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuDeviceGetAttribute(int* v, int attrib, CUdevice dev) {
    LOCK;
    if (!drv().initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (dev < 0 || dev >= drv().devices) return CUDA_ERROR_INVALID_DEVICE;
    if (v == nullptr) return CUDA_ERROR_INVALID_VALUE;
    switch (attrib) {
        case 1: *v = kMaxThreadsPerBlock; break;       // MAX_THREADS_PER_BLOCK
        case 2: case 3: *v = 1024; break;              // MAX_BLOCK_DIM_X, _Y
        case 4: *v = 64; break;                        // MAX_BLOCK_DIM_Z
        case 5: *v = 2147483647; break;                // MAX_GRID_DIM_X
        case 6: case 7: *v = 65535; break;             // MAX_GRID_DIM_Y, _Z
        case 8: *v = (int)kDefaultSmem; break;         // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *v = 32; break;                       // WARP_SIZE
        case 16: *v = kSmCount; break;                 // MULTIPROCESSOR_COUNT
        case 75: *v = drv().cc_major; break;           // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = drv().cc_minor; break;           // COMPUTE_CAPABILITY_MINOR
        case 97: *v = (int)kMaxSmemOptin; break;       // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 115: *v = 0; break;                       // MEMORY_POOLS_SUPPORTED: no stream-ordered allocator
        default: return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice dev) {
    LOCK;
    if (!drv().initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (dev < 0 || dev >= drv().devices) return CUDA_ERROR_INVALID_DEVICE;
    if (ctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
    // The device state (memory, modules, counters) is the process's, not per device.
    if (drv().primary_refs > 0 && drv().primary.device != dev) {
        say("a process uses one simulated device: device " + std::to_string(drv().primary.device) + " is in use, device " + std::to_string(dev) + " was asked for");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    drv().primary.device = dev;
    drv().primary_refs++;
    *ctx = &drv().primary;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    LOCK;
    if (!drv().initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (dev < 0 || dev >= drv().devices) return CUDA_ERROR_INVALID_DEVICE;
    if (drv().primary_refs == 0) return CUDA_ERROR_INVALID_CONTEXT;
    drv().primary_refs--;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuCtxGetCurrent(CUcontext* ctx) {
    if (!drv().initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (ctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *ctx = current_ctx;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
    LOCK;
    if (!drv().initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (ctx != nullptr && (ctx != &drv().primary || drv().primary_refs == 0)) return CUDA_ERROR_INVALID_CONTEXT;
    current_ctx = ctx;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuCtxSynchronize() {
    LOCK;
    TRY(ready());
    drv().counters.syncs++;
    return CUDA_SUCCESS;
}

static bool valid_stream(CUstream s) {
    // The legacy default stream (null, CU_STREAM_LEGACY), the per-thread one, and created ones.
    return s == nullptr || s == (CUstream)0x1 || s == (CUstream)0x2 || drv().streams.count(s) != 0;
}

KD_SIM_EXPORT CUresult cuStreamCreate(CUstream* s, unsigned flags) {
    LOCK;
    TRY(ready());
    if (s == nullptr || flags > 1) return CUDA_ERROR_INVALID_VALUE;  // CU_STREAM_DEFAULT, CU_STREAM_NON_BLOCKING
    *s = new KdStream{drv().next_stream++};
    drv().streams.insert(*s);
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuStreamDestroy_v2(CUstream s) {
    LOCK;
    TRY(ready());
    if (drv().streams.erase(s) == 0) return CUDA_ERROR_INVALID_HANDLE;
    delete s;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned flags) {
    LOCK;
    TRY(ready());
    if (!valid_stream(s) || drv().events.count(e) == 0) return CUDA_ERROR_INVALID_HANDLE;
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    kd_simdev::trace("wait s" + std::to_string(kd_simdev::stream_id(s)) + " e" + std::to_string(e->id));
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuStreamSynchronize(CUstream s) {
    LOCK;
    TRY(ready());
    if (!valid_stream(s)) return CUDA_ERROR_INVALID_HANDLE;
    drv().counters.syncs++;
    return CUDA_SUCCESS;
}

// ---- memory ----

KD_SIM_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* dptr, size_t bytes) {
    LOCK;
    TRY(ready());
    if (dptr == nullptr || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    Driver& d = drv();
    const size_t rounded = (bytes + 255) / 256 * 256;
    if (rounded > d.capacity - d.allocated) return CUDA_ERROR_OUT_OF_MEMORY;
    unsigned char* raw = nullptr;
    if (d.count_only) {
        // Address space only: nothing ever writes it, so no page of it is ever backed.
        void* p = mmap(nullptr, rounded + 2 * kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        raw = p == MAP_FAILED ? nullptr : static_cast<unsigned char*>(p);
    } else {
        raw = static_cast<unsigned char*>(aligned_alloc(256, rounded + 2 * kGuard));
    }
    if (raw == nullptr) return CUDA_ERROR_OUT_OF_MEMORY;
    Allocation a{raw, rounded, bytes, true};
    if (!d.count_only) memset(raw + kGuard, kFreshByte, bytes);
    const uint64_t base = (uint64_t)(uintptr_t)(raw + kGuard);
    fill_guards(base, a);
    d.allocs[base] = a;
    d.allocated += rounded;
    d.counters.driver_allocs++;
    *dptr = base;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuMemFree_v2(CUdeviceptr ptr) {
    LOCK;
    TRY(ready());
    auto it = drv().allocs.find(ptr);
    if (it == drv().allocs.end()) return CUDA_ERROR_INVALID_VALUE;
    drv().allocated -= it->second.size;
    if (drv().count_only)
        munmap(it->second.raw, it->second.size + 2 * kGuard);
    else
        free(it->second.raw);
    drv().allocs.erase(it);
    drv().counters.driver_frees++;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    LOCK;
    TRY(ready());
    if (free_bytes == nullptr || total == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *total = drv().capacity;
    *free_bytes = drv().capacity - drv().allocated;
    return CUDA_SUCCESS;
}

static CUresult checked_range(uint64_t ptr, size_t bytes, const char* call) {
    std::string why = kd_simdev::check_range(ptr, bytes);
    if (why.empty()) return CUDA_SUCCESS;
    say(std::string(call) + ": " + why);
    return CUDA_ERROR_INVALID_VALUE;
}

// A host-to-device copy's data movement (both forms), traced.
static void copy_in(CUdeviceptr dst, const void* src, size_t bytes) {
    kd_simdev::trace("htod bytes=" + std::to_string(bytes));
    if (!drv().count_only) memcpy((void*)(uintptr_t)dst, src, bytes);
}

KD_SIM_EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    LOCK;
    TRY(ready());
    if (bytes == 0) return CUDA_SUCCESS;
    if (src == nullptr) return CUDA_ERROR_INVALID_VALUE;
    TRY(checked_range(dst, bytes, "cuMemcpyHtoD"));
    copy_in(dst, src, bytes);
    drv().counters.htod_copies++;
    drv().counters.htod_bytes += bytes;
    drv().counters.blocking_copies++;  // returns when the copy is done: the host waits
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    LOCK;
    TRY(ready());
    if (bytes == 0) return CUDA_SUCCESS;
    if (dst == nullptr) return CUDA_ERROR_INVALID_VALUE;
    TRY(checked_range(src, bytes, "cuMemcpyDtoH"));
    kd_simdev::trace("dtoh bytes=" + std::to_string(bytes));
    if (drv().count_only)
        // The device computed nothing. Bytes 0x30..0x3F read as positive finite numbers in every
        // float type (f32 and bf16 between 6e-10 and 0.75), different from one read-back to the
        // next, so the host takes the branches a real step takes (zeros would make a Gram's norm
        // vanish and skip its loss).
        memset(dst, 0x30 + (int)(drv().counters.dtoh_copies % 16), bytes);
    else
        memcpy(dst, (const void*)(uintptr_t)src, bytes);
    drv().counters.dtoh_copies++;
    drv().counters.dtoh_bytes += bytes;
    drv().counters.blocking_copies++;  // waits for the stream's work, then copies
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream s) {
    LOCK;
    TRY(ready());
    if (!valid_stream(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (bytes == 0) return CUDA_SUCCESS;
    TRY(checked_range(src, bytes, "cuMemcpyDtoDAsync (source)"));
    TRY(checked_range(dst, bytes, "cuMemcpyDtoDAsync (destination)"));
    kd_simdev::trace("dtod bytes=" + std::to_string(bytes));
    if (!drv().count_only) memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, bytes);
    drv().counters.dtod_copies++;
    drv().counters.dtod_bytes += bytes;
    return CUDA_SUCCESS;
}

// Page-locked host memory and copies from it. An asynchronous copy returns at once only from
// page-locked memory; from pageable memory the real driver stages it and the host waits, so such a
// copy counts as a blocking one (a caller that meant to stay asynchronous shows in the counts).
static std::map<uintptr_t, size_t>& pinned() {
    static auto* m = new std::map<uintptr_t, size_t>();
    return *m;
}

static bool is_pinned(const void* p, size_t bytes) {
    auto& m = pinned();
    auto it = m.upper_bound((uintptr_t)p);
    if (it == m.begin()) return false;
    --it;
    return (uintptr_t)p + bytes <= it->first + it->second;
}

KD_SIM_EXPORT CUresult cuMemHostAlloc(void** pp, size_t bytes, unsigned flags) {
    LOCK;
    TRY(ready());
    if (pp == nullptr || bytes == 0 || flags > 0xF) return CUDA_ERROR_INVALID_VALUE;
    void* p = aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
    if (p == nullptr) return CUDA_ERROR_OUT_OF_MEMORY;
    pinned()[(uintptr_t)p] = bytes;
    drv().counters.pinned_allocs++;
    *pp = p;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuMemFreeHost(void* p) {
    LOCK;
    TRY(ready());
    if (pinned().erase((uintptr_t)p) == 0) return CUDA_ERROR_INVALID_VALUE;
    free(p);
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream s) {
    LOCK;
    TRY(ready());
    if (!valid_stream(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (bytes == 0) return CUDA_SUCCESS;
    if (src == nullptr) return CUDA_ERROR_INVALID_VALUE;
    TRY(checked_range(dst, bytes, "cuMemcpyHtoDAsync"));
    copy_in(dst, src, bytes);
    drv().counters.htod_copies++;
    drv().counters.htod_bytes += bytes;
    if (!is_pinned(src, bytes)) drv().counters.blocking_copies++;
    return CUDA_SUCCESS;
}

static CUresult memset_n(CUdeviceptr dst, const void* value, size_t width, size_t n, CUstream s, const char* call) {
    LOCK;
    TRY(ready());
    if (!valid_stream(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (n == 0) return CUDA_SUCCESS;
    if (dst % width != 0) return CUDA_ERROR_INVALID_VALUE;  // D16/D32 need aligned destinations
    TRY(checked_range(dst, n * width, call));
    unsigned char* p = (unsigned char*)(uintptr_t)dst;
    kd_simdev::trace("memset bytes=" + std::to_string(n * width));
    if (!drv().count_only)
        for (size_t i = 0; i < n; ++i) memcpy(p + i * width, value, width);
    drv().counters.memsets++;
    drv().counters.memset_bytes += n * width;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    return memset_n(dst, &v, 1, n, s, "cuMemsetD8Async");
}
KD_SIM_EXPORT CUresult cuMemsetD16Async(CUdeviceptr dst, unsigned short v, size_t n, CUstream s) {
    return memset_n(dst, &v, 2, n, s, "cuMemsetD16Async");
}
KD_SIM_EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int v, size_t n, CUstream s) {
    return memset_n(dst, &v, 4, n, s, "cuMemsetD32Async");
}

// ---- modules and kernels ----

// Binds every kernel an image declares (name → parameter sizes, .maxntid) to the host-compiled one.
static CUresult bind_kernels(const std::map<std::string, KernelEntry>& entries, const char* image_kind, std::string& log,
                             CUmodule* module) {
    auto m = std::make_unique<KdModule>();
    for (const auto& [name, entry] : entries) {
        auto k = registry().find(name);
        if (k == registry().end()) {
            log = std::string("the ") + image_kind + " holds kernel " + name +
                  ", which the simulated device was not built with (rebuild: build.rs compiles kernels/*.cu into it)";
            return CUDA_ERROR_INVALID_IMAGE;
        }
        if (k->second.param_sizes != entry.params) {
            std::string got, want;
            for (size_t s : k->second.param_sizes) got += std::to_string(s) + " ";
            for (size_t s : entry.params) want += std::to_string(s) + " ";
            log = "kernel " + name + ": the host build's parameter sizes [ " + got + "] differ from the " + image_kind + "'s [ " + want + "]";
            return CUDA_ERROR_INVALID_IMAGE;
        }
        auto f = std::make_unique<KdFunction>();
        f->name = name;
        f->kernel = &k->second;
        f->maxntid = entry.maxntid;
        drv().functions.insert(f.get());
        m->functions[name] = std::move(f);
    }
    *module = m.get();
    drv().modules.insert(m.release());
    return CUDA_SUCCESS;
}

static CUresult load_ptx(const std::string& ptx, std::string& log, CUmodule* module) {
    if (ptx.find(".version") == std::string::npos || ptx.find(".target") == std::string::npos) {
        log = "ptxas fatal: the image is neither PTX (no .version/.target directive) nor an ELF cubin";
        return CUDA_ERROR_INVALID_PTX;
    }
    // `.target sm_XY[a|f]`: arch-specific code only on XY itself, plain PTX on XY and later.
    const size_t t = ptx.find(".target");
    int target = 0;
    char suffix = 0;
    if (sscanf(ptx.c_str() + t, ".target sm_%d%c", &target, &suffix) < 1) {
        log = "ptxas fatal: cannot read the .target directive";
        return CUDA_ERROR_INVALID_PTX;
    }
    const int dev = drv().cc_major * 10 + drv().cc_minor;
    const bool specific = suffix == 'a' || suffix == 'f';
    if (specific ? target != dev : target > dev) {
        log = "ptxas fatal: PTX for .target sm_" + std::to_string(target) + (specific ? std::string(1, suffix) : "") +
              " cannot be compiled for this device (sm_" + std::to_string(dev) + ")";
        return CUDA_ERROR_INVALID_PTX;
    }
    return bind_kernels(parse_ptx(ptx), "PTX", log, module);
}

// Little-endian reads at any alignment.
template <class T>
static T rd(const unsigned char* p, size_t off) {
    T v;
    memcpy(&v, p + off, sizeof v);
    return v;
}

// A CUDA ELF (cubin). The driver gets no length with the image: like it, this trusts the header's
// section table for the extent, and refuses headers that are not a CUDA ELF.
static CUresult load_cubin(const unsigned char* e, std::string& log, CUmodule* module) {
    const int kEmCuda = 190;
    if (e[4] != 2 || e[5] != 1) {
        log = "not a 64-bit little-endian ELF file";
        return CUDA_ERROR_INVALID_IMAGE;
    }
    const unsigned machine = rd<uint16_t>(e, 18);
    const uint64_t shoff = rd<uint64_t>(e, 40);
    const unsigned shentsize = rd<uint16_t>(e, 58), shnum = rd<uint16_t>(e, 60), shstrndx = rd<uint16_t>(e, 62);
    if (machine != kEmCuda || shentsize != 64 || shnum == 0 || shstrndx >= shnum || shoff < 64) {
        log = "damaged cubin header (e_machine " + std::to_string(machine) + ", expected " + std::to_string(kEmCuda) +
              "; " + std::to_string(shnum) + " sections of " + std::to_string(shentsize) + " bytes at offset " + std::to_string(shoff) + ")";
        return CUDA_ERROR_INVALID_IMAGE;
    }
    // The SM version: e_flags bits 8-15 from ELF ABI version 8 (CUDA 12.8+ toolkits), else bits 0-7.
    const uint32_t flags = rd<uint32_t>(e, 48);
    const int sm = e[8] >= 8 ? (int)((flags >> 8) & 0xff) : (int)(flags & 0xff);
    const int dev = drv().cc_major * 10 + drv().cc_minor;
    if (sm / 10 != drv().cc_major || sm % 10 > drv().cc_minor) {
        log = "the cubin holds machine code for sm_" + std::to_string(sm) + ", which this device (sm_" + std::to_string(dev) + ") cannot run";
        return CUDA_ERROR_NO_BINARY_FOR_GPU;
    }
    struct Sec { std::string name; uint32_t type, link; uint64_t off, size; };
    std::vector<Sec> secs(shnum);
    const unsigned char* sh = e + shoff;
    const uint64_t strtab_off = rd<uint64_t>(sh, shstrndx * 64 + 24);
    for (unsigned i = 0; i < shnum; ++i) {
        const unsigned char* h = sh + i * 64;
        secs[i] = {std::string((const char*)e + strtab_off + rd<uint32_t>(h, 0)), rd<uint32_t>(h, 4), rd<uint32_t>(h, 40),
                   rd<uint64_t>(h, 24), rd<uint64_t>(h, 32)};
    }
    const Sec* symtab = nullptr;
    for (const Sec& x : secs)
        if (x.type == 2) symtab = &x;  // SHT_SYMTAB
    if (symtab == nullptr || symtab->link >= shnum) {
        log = "the cubin has no symbol table";
        return CUDA_ERROR_INVALID_IMAGE;
    }
    const char* names = (const char*)e + secs[symtab->link].off;
    std::map<std::string, KernelEntry> entries;
    for (uint64_t o = 0; o + 24 <= symtab->size; o += 24) {
        const unsigned char* sym = e + symtab->off + o;
        // A kernel entry: a global function marked STO_CUDA_ENTRY (0x10) in st_other.
        if ((sym[4] & 0xf) != 2 || (sym[4] >> 4) != 1 || (sym[5] & 0x10) == 0) continue;
        const std::string name(names + rd<uint32_t>(sym, 0));
        KernelEntry entry;
        std::vector<std::pair<unsigned, size_t>> params;  // (ordinal, bytes)
        for (const Sec& x : secs) {
            if (x.name != ".nv.info." + name) continue;
            // Attributes: format byte, attribute byte, a 16-bit field, then for format 4 (SVAL)
            // as many bytes of value as that field says (formats 1-3 hold at most the field).
            const unsigned char* a = e + x.off;
            for (uint64_t i = 0; i + 4 <= x.size;) {
                const unsigned fmt = a[i], attr = a[i + 1];
                if (fmt != 4) { i += 4; continue; }
                const unsigned len = rd<uint16_t>(a, i + 2);
                const unsigned char* v = a + i + 4;
                if (attr == 0x17 && len >= 12)  // EIATTR_KPARAM_INFO: index, ordinal, offset, size << 18
                    params.push_back({rd<uint16_t>(v, 4), (rd<uint32_t>(v, 8) >> 18) & 0x3fff});
                if (attr == 0x05 && len >= 12)  // EIATTR_MAX_THREADS: __launch_bounds__ as x, y, z
                    entry.maxntid = rd<uint32_t>(v, 0) * rd<uint32_t>(v, 4) * rd<uint32_t>(v, 8);
                i += 4 + len;
            }
        }
        std::sort(params.begin(), params.end());
        for (const auto& p : params) entry.params.push_back(p.second);
        entries[name] = entry;
    }
    if (entries.empty()) {
        log = "the cubin holds no kernel entry";
        return CUDA_ERROR_INVALID_IMAGE;
    }
    return bind_kernels(entries, "cubin", log, module);
}

static CUresult load_module(CUmodule* module, const void* image, std::string& log) {
    const unsigned char* bytes = static_cast<const unsigned char*>(image);
    if (memcmp(bytes, "\x7f" "ELF", 4) == 0) return load_cubin(bytes, log, module);
    if (rd<uint32_t>(bytes, 0) == 0xBA55ED50u) {
        log = "a fatbin container: the simulated device reads PTX and cubins only";
        return CUDA_ERROR_INVALID_IMAGE;
    }
    return load_ptx(std::string(static_cast<const char*>(image)), log, module);
}

KD_SIM_EXPORT CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    LOCK;
    TRY(ready());
    if (module == nullptr || image == nullptr) return CUDA_ERROR_INVALID_VALUE;
    std::string log;
    const CUresult r = load_module(module, image, log);
    if (r != CUDA_SUCCESS) say("cuModuleLoadData: " + log);
    return r;
}

// Options read: CU_JIT_ERROR_LOG_BUFFER (5) and its size (6, in: capacity, out: bytes written);
// the info log (3, 4) is left empty. Others are accepted and ignored, as JIT tuning hints are.
KD_SIM_EXPORT CUresult cuModuleLoadDataEx(CUmodule* module, const void* image, unsigned n_options, int* options, void** values) {
    LOCK;
    TRY(ready());
    if (module == nullptr || image == nullptr || (n_options > 0 && (options == nullptr || values == nullptr))) return CUDA_ERROR_INVALID_VALUE;
    char* log_buf = nullptr;
    size_t log_cap = 0;
    for (unsigned i = 0; i < n_options; ++i) {
        if (options[i] == 5) log_buf = static_cast<char*>(values[i]);
        if (options[i] == 6) log_cap = (size_t)(uintptr_t)values[i];
        if (options[i] == 4) values[i] = nullptr;
    }
    std::string log;
    const CUresult r = load_module(module, image, log);
    const size_t written = log_buf != nullptr && log_cap > 0 ? std::min(log.size(), log_cap - 1) : 0;
    if (log_buf != nullptr && log_cap > 0) {
        memcpy(log_buf, log.data(), written);
        log_buf[written] = 0;
    }
    for (unsigned i = 0; i < n_options; ++i)
        if (options[i] == 6) values[i] = (void*)(uintptr_t)written;
    return r;
}

KD_SIM_EXPORT CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    LOCK;
    TRY(ready());
    if (f == nullptr || name == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (drv().modules.count(m) == 0) return CUDA_ERROR_INVALID_HANDLE;
    auto it = m->functions.find(name);
    if (it == m->functions.end()) return CUDA_ERROR_NOT_FOUND;
    *f = it->second.get();
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuModuleUnload(CUmodule m) {
    LOCK;
    TRY(ready());
    if (drv().modules.count(m) == 0) return CUDA_ERROR_INVALID_HANDLE;
    for (auto& [_, f] : m->functions) drv().functions.erase(f.get());
    drv().modules.erase(m);
    delete m;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuFuncSetAttribute(CUfunction f, int attrib, int value) {
    LOCK;
    TRY(ready());
    if (drv().functions.count(f) == 0) return CUDA_ERROR_INVALID_HANDLE;
    if (attrib != 8) return CUDA_ERROR_INVALID_VALUE;  // only MAX_DYNAMIC_SHARED_SIZE_BYTES is settable here
    if (value < 0 || (size_t)value > kMaxSmemOptin) return CUDA_ERROR_INVALID_VALUE;
    f->max_dynamic_smem = value;
    return CUDA_SUCCESS;
}

// A launch's arguments for the trace, comma-separated: a buffer as @<bytes from the address to the
// end of what its buffer uses> (a trailing v when the address is inside the buffer: a view),
// integers and floats as their values. The bytes returned, the sum over the buffers, bound what
// the kernel reads and writes once; a view is charged to its buffer's end, which
// benches/step_model.py replaces with the kernel's own count from the other arguments.
static size_t launch_args(const kd_simdev::HostKernel& k, void** params, std::string* out) {
    size_t total = 0;
    char b[64];
    for (size_t i = 0; i < k.param_kinds.size(); ++i) {
        const size_t size = k.param_sizes[i];
        snprintf(b, sizeof b, "?");
        if (k.param_kinds[i] == 'p') {
            uint64_t ptr = 0, base = 0;
            memcpy(&ptr, params[i], sizeof ptr);
            const Allocation* a = find_alloc(ptr, &base);
            const size_t extent = a != nullptr && a->lent && ptr - base < a->used ? a->used - (size_t)(ptr - base) : 0;
            total += extent;
            snprintf(b, sizeof b, "@%zu%s", extent, extent > 0 && ptr != base ? "v" : "");
        } else if (k.param_kinds[i] == 'i' && (size == 4 || size == 8)) {
            int32_t x = 0;
            long long v = 0;
            if (size == 4) memcpy(&x, params[i], 4), v = x;
            else memcpy(&v, params[i], 8);
            snprintf(b, sizeof b, "%lld", v);
        } else if (k.param_kinds[i] == 'f' && (size == 4 || size == 8)) {
            float x = 0;
            double v = 0;
            if (size == 4) memcpy(&x, params[i], 4), v = x;
            else memcpy(&v, params[i], 8);
            snprintf(b, sizeof b, "%g", v);
        }
        if (i > 0) *out += ',';
        *out += b;
    }
    return total;
}

KD_SIM_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                      unsigned bz, unsigned smem, CUstream s, void** params, void** extra) {
    LOCK;
    TRY(ready());
    if (drv().functions.count(f) == 0) return CUDA_ERROR_INVALID_HANDLE;
    if (!valid_stream(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (extra != nullptr) return CUDA_ERROR_NOT_SUPPORTED;
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0) return CUDA_ERROR_INVALID_VALUE;
    if (gx > 2147483647u || gy > 65535 || gz > 65535) return CUDA_ERROR_INVALID_VALUE;
    if (bx > 1024 || by > 1024 || bz > 64) return CUDA_ERROR_INVALID_VALUE;
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (threads > (unsigned long long)kMaxThreadsPerBlock) return CUDA_ERROR_INVALID_VALUE;
    if (f->maxntid != 0 && threads > f->maxntid) return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    if (smem > (unsigned)f->max_dynamic_smem) return CUDA_ERROR_INVALID_VALUE;
    if (!f->kernel->param_sizes.empty() && params == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (threads % 32 != 0) {
        say("kernel " + f->name + ": a block of " + std::to_string(threads) + " threads; the emulator runs whole warps only");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    if (kd_simdev::tracing()) {
        std::string args;
        const size_t bytes = launch_args(*f->kernel, params, &args);
        kd_simdev::trace("launch " + f->name + " s" + std::to_string(kd_simdev::stream_id(s)) + " bytes=" + std::to_string(bytes) +
                         " args=" + args);
    }
    drv().counters.launches++;
    if (drv().count_only) return CUDA_SUCCESS;
    f->kernel->run(f->kernel->fn, params, grid, block, smem);
    return check_guards(f->name);
}

// ---- events ----

KD_SIM_EXPORT CUresult cuEventCreate(CUevent* e, unsigned flags) {
    LOCK;
    TRY(ready());
    if (e == nullptr || flags > 0xF) return CUDA_ERROR_INVALID_VALUE;
    *e = new KdEvent();
    (*e)->id = drv().next_event++;
    drv().events.insert(*e);
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuEventRecord(CUevent e, CUstream s) {
    LOCK;
    TRY(ready());
    if (drv().events.count(e) == 0 || !valid_stream(s)) return CUDA_ERROR_INVALID_HANDLE;
    e->recorded = true;
    e->at = std::chrono::steady_clock::now();
    kd_simdev::trace("record e" + std::to_string(e->id) + " s" + std::to_string(kd_simdev::stream_id(s)));
    return CUDA_SUCCESS;
}

// Work runs at launch, so a recorded event has always completed.
KD_SIM_EXPORT CUresult cuEventQuery(CUevent e) {
    LOCK;
    TRY(ready());
    if (drv().events.count(e) == 0) return CUDA_ERROR_INVALID_HANDLE;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuEventSynchronize(CUevent e) {
    LOCK;
    TRY(ready());
    if (drv().events.count(e) == 0) return CUDA_ERROR_INVALID_HANDLE;
    drv().counters.syncs++;
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) {
    LOCK;
    TRY(ready());
    if (ms == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (drv().events.count(start) == 0 || drv().events.count(end) == 0) return CUDA_ERROR_INVALID_HANDLE;
    if (!start->recorded || !end->recorded) return CUDA_ERROR_INVALID_HANDLE;
    *ms = std::chrono::duration<float, std::milli>(end->at - start->at).count();
    return CUDA_SUCCESS;
}

KD_SIM_EXPORT CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) { return cuEventElapsedTime_v2(ms, start, end); }

KD_SIM_EXPORT CUresult cuEventDestroy_v2(CUevent e) {
    LOCK;
    TRY(ready());
    if (drv().events.erase(e) == 0) return CUDA_ERROR_INVALID_HANDLE;
    delete e;
    return CUDA_SUCCESS;
}

// ---- errors ----

// The driver's name and description of every CUresult this device returns, in one table.
struct ErrorText {
    CUresult code;
    const char* name;
    const char* text;
};
static const ErrorText kErrors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_NO_BINARY_FOR_GPU, "CUDA_ERROR_NO_BINARY_FOR_GPU", "no kernel image is available for execution on the device"},
    {CUDA_ERROR_INVALID_PTX, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
};

static const ErrorText* error_text(CUresult r) {
    for (const ErrorText& e : kErrors)
        if (e.code == r) return &e;
    return nullptr;
}

KD_SIM_EXPORT CUresult cuGetErrorName(CUresult r, const char** s) {
    if (s == nullptr) return CUDA_ERROR_INVALID_VALUE;
    const ErrorText* e = error_text(r);
    *s = e ? e->name : nullptr;
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

KD_SIM_EXPORT CUresult cuGetErrorString(CUresult r, const char** s) {
    if (s == nullptr) return CUDA_ERROR_INVALID_VALUE;
    const ErrorText* e = error_text(r);
    *s = e ? e->text : nullptr;
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
