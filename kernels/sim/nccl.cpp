// nccl.cpp: the NCCL of the simulated CUDA device (libkd_nccl_sim.so, soname libnccl.so): the
// entry points cudarc's `nccl` module calls, so a multi-process data-parallel job (one process
// per rank, `kd-engine launch`) runs its real NCCL code path on machines without GPUs. Loaded
// like the simulated driver (see cuda_sim.h): by path before cudarc opens "libnccl.so" by name.
//
// Why it is built this way:
// - The ranks are separate processes on one host, so they meet in a POSIX shared-memory segment
//   named by the unique id (rank 0 makes the id; the job's rendezvous carries it to the others).
//   Simulated device memory is host memory, so a collective copies straight from and to the
//   device pointers.
// - Each collective moves in chunks through one staging slot per rank: every rank copies its
//   chunk in, all meet at a barrier, then every rank computes its output from all slots in rank
//   order (so every rank gets the same bits, whatever order they arrived in). The slots are
//   double-buffered: a rank can refill half h only after the barrier of the next chunk, which
//   every rank reaches only once it has read half h; one barrier per chunk is enough.
// - Reductions accumulate in the type itself for f32, f64 and integers; f16 and bf16 are widened
//   to f32, summed in rank order and rounded (to nearest even) once at the end.
// - The simulated driver runs every kernel to completion at launch, so by the time a collective
//   is called, everything queued before it on any stream has finished: running it at the call
//   (at ncclGroupEnd inside a group) keeps stream order. The call returns when it is done.
// - A collective never waits without end: the barrier sleeps on a futex in short slices and, in
//   between, checks whether a peer process has exited (a pidfd per peer, which also sees a dead
//   child its parent has not reaped yet), whether a peer has marked the communicator failed (it
//   aborted or hit an error), and the deadline (kd_nccl_sim_set_timeout; the job's dist timeout).
//   A failure marks the segment so every other rank fails fast too, is returned as
//   ncclRemoteError (a peer died or failed), ncclSystemError (the OS refused) or ncclTimeout,
//   and stays as the communicator's async error (ncclCommGetAsyncError), as with real NCCL.

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <vector>

#include "cuda_sim.h"

typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
    ncclTimeout = 8,
} ncclResult_t;

typedef enum {
    ncclInt8 = 0, ncclUint8 = 1, ncclInt32 = 2, ncclUint32 = 3, ncclInt64 = 4, ncclUint64 = 5,
    ncclFloat16 = 6, ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9, ncclNumTypes = 10,
} ncclDataType_t;

typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4, ncclNumOps = 5 } ncclRedOp_t;

typedef struct { char internal[128]; } ncclUniqueId;
typedef struct KdNcclComm* ncclComm_t;
typedef void* cudaStream_t;

static const int kVersion = 23000;  // reported as NCCL 2.30.0, the API cudarc binds
static const char kIdMagic[] = "kd-nccl-sim";
static const int kMaxRanks = 64;
static const size_t kSlotBytes = (size_t)2 << 20;  // per rank and half: 4 MiB of staging per rank

// The segment's header; a fresh segment is zero-filled, which is its initial state.
struct Shared {
    std::atomic<int32_t> nranks;       // set by the first rank to join
    std::atomic<uint32_t> joined;
    std::atomic<uint32_t> arrived;     // ranks at the current barrier
    std::atomic<uint32_t> generation;  // barriers passed (the futex word)
    std::atomic<int32_t> failed;       // 0, or 1 + the rank that failed or aborted
    std::atomic<int32_t> pids[kMaxRanks];
    std::atomic<uint32_t> waiting_for[kMaxRanks];  // 1 + the generation each rank last arrived at
};

static size_t segment_bytes(int nranks) { return 4096 + (size_t)nranks * 2 * kSlotBytes; }

struct KdNcclComm {
    int rank = 0, nranks = 0;
    std::string name;
    Shared* sh = nullptr;
    unsigned char* slots = nullptr;  // [nranks][2][kSlotBytes]
    size_t map_bytes = 0;
    std::vector<int> peer_fds;       // pidfds (or -1: fall back to kill(pid, 0))
    uint64_t chunks = 0;             // chunks moved so far: picks the half
    ncclResult_t async_error = ncclSuccess;
    std::string last_error;

    unsigned char* slot(int r, uint64_t chunk) { return slots + ((size_t)r * 2 + (chunk & 1)) * kSlotBytes; }
};

static std::atomic<double> g_timeout_s{600.0};
static thread_local std::string g_last_error;

static void say(KdNcclComm* c, const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    std::string s = c ? "rank " + std::to_string(c->rank) + " of " + std::to_string(c->nranks) + ": " + buf : std::string(buf);
    fprintf(stderr, "kd-nccl-sim: %s\n", s.c_str());
    g_last_error = s;
    if (c) c->last_error = s;
}

// ---- waiting ----

static long futex(std::atomic<uint32_t>* w, int op, uint32_t v, const struct timespec* t) {
    // Not FUTEX_PRIVATE: the word lives in memory shared between processes.
    return syscall(SYS_futex, reinterpret_cast<uint32_t*>(w), op, v, t, nullptr, 0);
}

static int pidfd_open(int pid) {
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    (void)pid;
    errno = ENOSYS;
    return -1;
#endif
}

// The first peer whose process has exited, or -1.
static int dead_peer(KdNcclComm* c) {
    for (int r = 0; r < c->nranks; ++r) {
        if (r == c->rank) continue;
        const int fd = r < (int)c->peer_fds.size() ? c->peer_fds[r] : -1;
        if (fd >= 0) {
            struct pollfd p = {fd, POLLIN, 0};
            if (poll(&p, 1, 0) > 0) return r;
        } else {
            const int pid = c->sh->pids[r].load();
            if (pid > 0 && kill(pid, 0) != 0 && errno == ESRCH) return r;
        }
    }
    return -1;
}

// Marks the communicator failed because of rank `culprit`, for every rank (they stop waiting and
// name it) and for this one.
static ncclResult_t fail(KdNcclComm* c, ncclResult_t r, int culprit) {
    int32_t none = 0;
    c->sh->failed.compare_exchange_strong(none, 1 + culprit);
    futex(&c->sh->generation, FUTEX_WAKE, INT32_MAX, nullptr);
    futex(&c->sh->joined, FUTEX_WAKE, INT32_MAX, nullptr);
    if (c->async_error == ncclSuccess) c->async_error = r;
    return r;
}

// Waits until `done()` or a failure, the deadline, or a peer's exit; `what` names the wait and
// `missing(r)` says whether rank r has not arrived (named when the deadline passes).
template <class Done, class Missing>
static ncclResult_t wait_for(KdNcclComm* c, const char* what, std::atomic<uint32_t>* word, Done done, Missing missing) {
    const auto start = std::chrono::steady_clock::now();
    const double limit = g_timeout_s.load();
    for (;;) {
        const uint32_t seen = word->load();
        if (done()) return ncclSuccess;
        const int32_t failed = c->sh->failed.load();
        if (failed != 0) {
            say(c, "%s: rank %d failed or aborted the communicator", what, failed - 1);
            return fail(c, ncclRemoteError, failed - 1);
        }
        const int dead = dead_peer(c);
        if (dead >= 0) {
            say(c, "%s: rank %d (pid %d) exited", what, dead, c->sh->pids[dead].load());
            return fail(c, ncclRemoteError, dead);
        }
        const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (waited >= limit) {
            std::string late;
            for (int r = 0; r < c->nranks; ++r)
                if (missing(r)) late += (late.empty() ? "" : ", ") + std::to_string(r);
            say(c, "%s: rank(s) %s did not arrive within %.0f s (hung or too slow)", what, late.c_str(), limit);
            return fail(c, ncclTimeout, c->rank);
        }
        // Short slices: a peer's exit does not wake the futex.
        const struct timespec slice = {0, 20 * 1000 * 1000};
        futex(word, FUTEX_WAIT, seen, &slice);
    }
}

static ncclResult_t barrier(KdNcclComm* c, const char* what) {
    Shared* s = c->sh;
    const uint32_t gen = s->generation.load();
    s->waiting_for[c->rank].store(gen + 1);
    if (s->arrived.fetch_add(1) + 1 == (uint32_t)c->nranks) {
        s->arrived.store(0);
        s->generation.fetch_add(1);
        futex(&s->generation, FUTEX_WAKE, INT32_MAX, nullptr);
        return ncclSuccess;
    }
    return wait_for(c, what, &s->generation, [&] { return s->generation.load() != gen; }, [&](int r) { return s->waiting_for[r].load() != gen + 1; });
}

// ---- element types ----

static size_t type_size(int t) {
    switch (t) {
        case ncclInt8: case ncclUint8: return 1;
        case ncclFloat16: case ncclBfloat16: return 2;
        case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
        case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
        default: return 0;
    }
}

static float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static float f16_to_f32(uint16_t u) {
    _Float16 h;
    memcpy(&h, &u, 2);
    return (float)h;
}

static uint16_t f32_to_f16(float f) {
    _Float16 h = (_Float16)f;  // round to nearest even
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

template <class A>
static A combine(A acc, A x, int op) {
    switch (op) {
        case ncclProd: return acc * x;
        case ncclMax: return x > acc ? x : acc;
        case ncclMin: return x < acc ? x : acc;
        default: return acc + x;  // sum and avg
    }
}

// out[i] = op over ranks (in rank order) of in[r][i], accumulated in A; Load/Store convert.
template <class T, class A, class Load, class Store>
static void reduce_into(void* out, const std::vector<const unsigned char*>& in, size_t n, int op, Load load, Store store) {
    const size_t ranks = in.size();
    for (size_t i = 0; i < n; ++i) {
        A acc = load(reinterpret_cast<const T*>(in[0])[i]);
        for (size_t r = 1; r < ranks; ++r) acc = combine<A>(acc, load(reinterpret_cast<const T*>(in[r])[i]), op);
        if (op == ncclAvg) acc = (A)(acc / (A)ranks);
        reinterpret_cast<T*>(out)[i] = store(acc);
    }
}

template <class T>
static void reduce_native(void* out, const std::vector<const unsigned char*>& in, size_t n, int op) {
    reduce_into<T, T>(out, in, n, op, [](T x) { return x; }, [](T x) { return x; });
}

static void reduce(void* out, const std::vector<const unsigned char*>& in, size_t n, int type, int op) {
    switch (type) {
        case ncclInt8: return reduce_native<int8_t>(out, in, n, op);
        case ncclUint8: return reduce_native<uint8_t>(out, in, n, op);
        case ncclInt32: return reduce_native<int32_t>(out, in, n, op);
        case ncclUint32: return reduce_native<uint32_t>(out, in, n, op);
        case ncclInt64: return reduce_native<int64_t>(out, in, n, op);
        case ncclUint64: return reduce_native<uint64_t>(out, in, n, op);
        case ncclFloat32: return reduce_native<float>(out, in, n, op);
        case ncclFloat64: return reduce_native<double>(out, in, n, op);
        case ncclBfloat16: return reduce_into<uint16_t, float>(out, in, n, op, bf16_to_f32, f32_to_bf16);
        case ncclFloat16: return reduce_into<uint16_t, float>(out, in, n, op, f16_to_f32, f32_to_f16);
    }
}

// ---- collectives ----

enum Kind { kAllReduce, kReduce, kBroadcast, kAllGather, kReduceScatter };
static const char* kind_name(Kind k) {
    static const char* names[] = {"ncclAllReduce", "ncclReduce", "ncclBroadcast", "ncclAllGather", "ncclReduceScatter"};
    return names[k];
}

struct Op {
    Kind kind;
    const unsigned char* send;
    unsigned char* recv;
    size_t count;  // elements per rank: of the result (all-reduce, reduce, broadcast), of send
                   // (all-gather) or of recv (reduce-scatter)
    int type, op, root;
    KdNcclComm* comm;
};

// Runs one collective on this rank (every rank runs the same ones in the same order).
static ncclResult_t run(const Op& o) {
    KdNcclComm* c = o.comm;
    const size_t es = type_size(o.type);
    const int n = c->nranks;
    // A reduce-scatter stages a piece for every rank in each slot; the others one piece.
    const size_t per_slot = (o.kind == kReduceScatter ? kSlotBytes / (size_t)n : kSlotBytes) / es;
    std::vector<const unsigned char*> in((size_t)n);
    for (size_t at = 0; at < o.count; at += per_slot) {
        const size_t len = std::min(per_slot, o.count - at), bytes = len * es;
        const uint64_t chunk = c->chunks++;
        unsigned char* mine = c->slot(c->rank, chunk);
        switch (o.kind) {
            case kAllReduce: case kReduce: case kAllGather:
                memcpy(mine, o.send + at * es, bytes);
                break;
            case kBroadcast:
                if (c->rank == o.root) memcpy(mine, o.send + at * es, bytes);
                break;
            case kReduceScatter:
                for (int r = 0; r < n; ++r) memcpy(mine + (size_t)r * bytes, o.send + ((size_t)r * o.count + at) * es, bytes);
                break;
        }
        const ncclResult_t b = barrier(c, kind_name(o.kind));
        if (b != ncclSuccess) return b;
        for (int r = 0; r < n; ++r) in[(size_t)r] = c->slot(r, chunk);
        switch (o.kind) {
            case kAllReduce:
                reduce(o.recv + at * es, in, len, o.type, o.op);
                break;
            case kReduce:
                if (c->rank == o.root) reduce(o.recv + at * es, in, len, o.type, o.op);
                break;
            case kBroadcast:
                memcpy(o.recv + at * es, c->slot(o.root, chunk), bytes);
                break;
            case kAllGather:
                for (int r = 0; r < n; ++r) memcpy(o.recv + ((size_t)r * o.count + at) * es, in[(size_t)r], bytes);
                break;
            case kReduceScatter:
                for (int r = 0; r < n; ++r) in[(size_t)r] += (size_t)c->rank * bytes;
                reduce(o.recv + at * es, in, len, o.type, o.op);
                break;
        }
    }
    return ncclSuccess;
}

// Collectives called between ncclGroupStart and ncclGroupEnd run at the outermost end, in order.
static thread_local int g_group_depth = 0;
static thread_local std::vector<Op> g_group;

static ncclResult_t submit(Kind kind, const void* send, void* recv, size_t count, int type, int op, int root, ncclComm_t comm, cudaStream_t stream) {
    if (comm == nullptr || comm->sh == nullptr) {
        say(nullptr, "%s: a null or destroyed communicator", kind_name(kind));
        return ncclInvalidArgument;
    }
    // A failed communicator stays failed (its last error says why), as real NCCL's does.
    if (comm->async_error != ncclSuccess) return comm->async_error;
    const size_t es = type_size(type);
    if (es == 0 || op < 0 || op >= ncclNumOps) {
        say(comm, "%s: data type %d or reduction %d is not one NCCL defines", kind_name(kind), type, op);
        return ncclInvalidArgument;
    }
    if ((kind == kReduce || kind == kBroadcast) && (root < 0 || root >= comm->nranks)) {
        say(comm, "%s: root %d is not a rank of %d", kind_name(kind), root, comm->nranks);
        return ncclInvalidArgument;
    }
    if (!kd_simdev::context_current()) {
        say(comm, "%s: no CUDA context is current on this thread", kind_name(kind));
        return ncclUnhandledCudaError;
    }
    const size_t n = (size_t)comm->nranks;
    const bool sends = kind != kBroadcast || comm->rank == root;
    const bool receives = kind != kReduce || comm->rank == root;
    const size_t send_elems = kind == kReduceScatter ? count * n : count;
    const size_t recv_elems = kind == kAllGather ? count * n : count;
    if (count > 0) {
        for (int k = 0; k < 2; ++k) {
            const bool used = k == 0 ? sends : receives;
            const void* p = k == 0 ? send : recv;
            const size_t bytes = (k == 0 ? send_elems : recv_elems) * es;
            if (!used) continue;
            const std::string why = kd_simdev::check_range((uint64_t)(uintptr_t)p, bytes);
            if (!why.empty()) {
                say(comm, "%s: the %s buffer (%zu elements of %zu bytes): %s", kind_name(kind), k == 0 ? "send" : "receive",
                    k == 0 ? send_elems : recv_elems, es, why.c_str());
                return ncclInvalidArgument;
            }
        }
    }
    // The stream only names the work (see the header: every stream is idle when a collective is
    // called); the trace records it, to check which stream a collective was queued on.
    kd_simdev::trace(std::string(kind_name(kind)) + " s" + std::to_string(kd_simdev::stream_id(stream)) + " n" + std::to_string(count));
    Op o{kind, static_cast<const unsigned char*>(send), static_cast<unsigned char*>(recv), count, type, op, root, comm};
    if (g_group_depth > 0) {
        g_group.push_back(o);
        return ncclSuccess;
    }
    return run(o);
}

// ---- exported API ----

// The longest a collective waits for the other ranks (the job's dist timeout).
KD_SIM_EXPORT void kd_nccl_sim_set_timeout(double seconds) {
    if (seconds > 0) g_timeout_s.store(seconds);
}

KD_SIM_EXPORT ncclResult_t ncclGetVersion(int* version) {
    if (version == nullptr) return ncclInvalidArgument;
    *version = kVersion;
    return ncclSuccess;
}

KD_SIM_EXPORT ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (id == nullptr) return ncclInvalidArgument;
    memset(id, 0, sizeof *id);
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    unsigned rnd = 0;
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd >= 0) {
        if (read(fd, &rnd, sizeof rnd) != (ssize_t)sizeof rnd) rnd = 0;
        close(fd);
    }
    snprintf(id->internal, sizeof id->internal, "%s /kd-nccl-sim-%d-%lld-%ld-%08x", kIdMagic, (int)getpid(), (long long)t.tv_sec, t.tv_nsec, rnd);
    return ncclSuccess;
}

static void unmap(KdNcclComm* c) {
    for (int fd : c->peer_fds)
        if (fd >= 0) close(fd);
    c->peer_fds.clear();
    if (c->sh) munmap(c->sh, c->map_bytes);
    c->sh = nullptr;
}

KD_SIM_EXPORT ncclResult_t ncclCommInitRank(ncclComm_t* out, int nranks, ncclUniqueId id, int rank) {
    if (out == nullptr) return ncclInvalidArgument;
    *out = nullptr;
    if (nranks < 1 || nranks > kMaxRanks || rank < 0 || rank >= nranks) {
        say(nullptr, "ncclCommInitRank: rank %d of %d ranks (the simulated NCCL takes 1 to %d)", rank, nranks, kMaxRanks);
        return ncclInvalidArgument;
    }
    id.internal[sizeof id.internal - 1] = 0;
    const size_t magic = strlen(kIdMagic);
    if (strncmp(id.internal, kIdMagic, magic) != 0 || id.internal[magic] != ' ') {
        say(nullptr, "ncclCommInitRank: the unique id was not made by ncclGetUniqueId of the simulated NCCL");
        return ncclInvalidArgument;
    }
    auto* c = new KdNcclComm();
    c->rank = rank;
    c->nranks = nranks;
    c->name = id.internal + magic + 1;
    const int fd = shm_open(c->name.c_str(), O_CREAT | O_RDWR, 0600);
    c->map_bytes = segment_bytes(nranks);
    void* m = MAP_FAILED;
    if (fd >= 0) {
        // Every rank sizes it the same; a fresh segment is zeros, the header's initial state.
        if (ftruncate(fd, (off_t)c->map_bytes) == 0) m = mmap(nullptr, c->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
    }
    if (m == MAP_FAILED) {
        say(c, "ncclCommInitRank: shared memory segment %s: %s", c->name.c_str(), strerror(errno));
        delete c;
        return ncclSystemError;
    }
    c->sh = static_cast<Shared*>(m);
    c->slots = static_cast<unsigned char*>(m) + 4096;
    int32_t unset = 0;
    if (!c->sh->nranks.compare_exchange_strong(unset, nranks) && unset != nranks) {
        say(c, "ncclCommInitRank: this rank was told %d ranks, another rank %d", nranks, unset);
        unmap(c);
        delete c;
        return ncclInvalidUsage;
    }
    c->sh->pids[rank].store((int32_t)getpid());
    c->sh->joined.fetch_add(1);
    futex(&c->sh->joined, FUTEX_WAKE, INT32_MAX, nullptr);
    // Every rank's pid is written before it counts itself in.
    ncclResult_t r = wait_for(
        c, "ncclCommInitRank", &c->sh->joined, [&] { return c->sh->joined.load() >= (uint32_t)nranks; }, [&](int p) { return c->sh->pids[p].load() == 0; });
    if (r == ncclSuccess) {
        for (int p = 0; p < nranks; ++p) c->peer_fds.push_back(p == rank ? -1 : pidfd_open(c->sh->pids[p].load()));
        r = barrier(c, "ncclCommInitRank");
    }
    // Everyone has mapped it: the name can go (the mappings stay), so no segment outlives the job.
    if (rank == 0 || r != ncclSuccess) shm_unlink(c->name.c_str());
    if (r != ncclSuccess) {
        unmap(c);
        delete c;
        return r;
    }
    *out = c;
    return ncclSuccess;
}

KD_SIM_EXPORT ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (comm == nullptr) return ncclInvalidArgument;
    unmap(comm);
    delete comm;
    return ncclSuccess;
}

// Unlike destroy, tells the other ranks: their pending and later collectives fail at once.
KD_SIM_EXPORT ncclResult_t ncclCommAbort(ncclComm_t comm) {
    if (comm == nullptr) return ncclInvalidArgument;
    if (comm->sh) fail(comm, ncclRemoteError, comm->rank);
    unmap(comm);
    delete comm;
    return ncclSuccess;
}

KD_SIM_EXPORT ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* err) {
    if (comm == nullptr || err == nullptr) return ncclInvalidArgument;
    *err = comm->async_error;
    return ncclSuccess;
}

KD_SIM_EXPORT ncclResult_t ncclCommCount(ncclComm_t comm, int* count) {
    if (comm == nullptr || count == nullptr) return ncclInvalidArgument;
    *count = comm->nranks;
    return ncclSuccess;
}

KD_SIM_EXPORT ncclResult_t ncclCommUserRank(ncclComm_t comm, int* rank) {
    if (comm == nullptr || rank == nullptr) return ncclInvalidArgument;
    *rank = comm->rank;
    return ncclSuccess;
}

KD_SIM_EXPORT const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
        case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
        case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
        case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
        case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        case ncclTimeout: return "NCCL operation timed out";
        default: return "unknown result code";
    }
}

KD_SIM_EXPORT const char* ncclGetLastError(ncclComm_t comm) { return comm ? comm->last_error.c_str() : g_last_error.c_str(); }

KD_SIM_EXPORT ncclResult_t ncclGroupStart() {
    ++g_group_depth;
    return ncclSuccess;
}

KD_SIM_EXPORT ncclResult_t ncclGroupEnd() {
    if (g_group_depth == 0) {
        say(nullptr, "ncclGroupEnd without ncclGroupStart");
        return ncclInvalidUsage;
    }
    if (--g_group_depth > 0) return ncclSuccess;
    std::vector<Op> ops;
    ops.swap(g_group);
    for (const Op& o : ops) {
        const ncclResult_t r = run(o);
        if (r != ncclSuccess) return r;
    }
    return ncclSuccess;
}

KD_SIM_EXPORT ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op, ncclComm_t comm, cudaStream_t s) {
    return submit(kAllReduce, send, recv, count, type, op, 0, comm, s);
}

KD_SIM_EXPORT ncclResult_t ncclReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t s) {
    return submit(kReduce, send, recv, count, type, op, root, comm, s);
}

KD_SIM_EXPORT ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root, ncclComm_t comm, cudaStream_t s) {
    return submit(kBroadcast, send, recv, count, type, ncclSum, root, comm, s);
}

KD_SIM_EXPORT ncclResult_t ncclBcast(void* buf, size_t count, ncclDataType_t type, int root, ncclComm_t comm, cudaStream_t s) {
    return submit(kBroadcast, buf, buf, count, type, ncclSum, root, comm, s);
}

KD_SIM_EXPORT ncclResult_t ncclAllGather(const void* send, void* recv, size_t sendcount, ncclDataType_t type, ncclComm_t comm, cudaStream_t s) {
    return submit(kAllGather, send, recv, sendcount, type, ncclSum, 0, comm, s);
}

KD_SIM_EXPORT ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recvcount, ncclDataType_t type, ncclRedOp_t op, ncclComm_t comm, cudaStream_t s) {
    return submit(kReduceScatter, send, recv, recvcount, type, op, 0, comm, s);
}
