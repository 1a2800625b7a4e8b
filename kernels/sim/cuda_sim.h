// cuda_sim.h: what the pieces of the simulated CUDA device share (driver.cpp, cublas.cpp and the
// generated kernel modules). The simulated device is a pair of shared libraries built by build.rs
// from kernels/*.cu with host_sim.h: libkd_cuda_sim.so exports the driver API entry points that
// cudarc loads (its soname is libcuda.so), libkd_cublas_sim.so the cuBLAS ones (soname
// libcublas.so). kd-engine loads both by path when KD_CUDA_SIM=1, before cudarc opens "libcuda.so"
// by name, so the dynamic loader hands cudarc these instead (a name that matches the soname of a
// loaded library resolves to it); the same binary and Rust code then run unchanged.
//
// Device memory is host memory: a CUdeviceptr is the address itself, so kernels run by the
// emulator dereference it directly. Every allocation has guard zones on both sides, and the
// caching pool above tells the device which part of a block a buffer uses (kd_sim_lend), so that
// writes past a buffer, into a cached (freed) block, or outside an allocation are caught after the
// launch that made them.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <mutex>
#include <string>
#include <vector>

#define KD_SIM_EXPORT extern "C" __attribute__((visibility("default")))

// The counters a run can read (kd_sim_counters); mirrored by src/backend/cuda/sim.rs.
struct KdSimCounters {
    uint64_t launches;
    uint64_t memsets;
    uint64_t memset_bytes;
    uint64_t htod_copies;
    uint64_t htod_bytes;
    uint64_t dtoh_copies;
    uint64_t dtoh_bytes;
    uint64_t dtod_copies;
    uint64_t dtod_bytes;
    // cuCtxSynchronize, cuStreamSynchronize and cuEventSynchronize.
    uint64_t syncs;
    uint64_t gemm_calls;
    double gemm_flops;
    uint64_t driver_allocs;
    uint64_t driver_frees;
    // Copies that return only when done (cuMemcpyHtoD, cuMemcpyDtoH, an async copy from pageable
    // memory): with the syncs, the points where the host waits for the device.
    uint64_t blocking_copies;
    // cuMemHostAlloc calls (page-locked staging memory).
    uint64_t pinned_allocs;
};

// The namespace is visible outside the driver library: the cuBLAS library links against it.
namespace __attribute__((visibility("default"))) kd_simdev {

// A host-compiled kernel: its parameter sizes (checked against the PTX at module load) and a
// function that unpacks cuLaunchKernel's `kernelParams` by the kernel's own C++ signature and runs
// the grid on the emulator.
struct HostKernel {
    void* fn;
    std::vector<size_t> param_sizes;
    // What each parameter is, for the trace: 'p' pointer (a device buffer), 'i' integer,
    // 'f' floating point, 'o' anything else.
    std::vector<char> param_kinds;
    void (*run)(void* fn, void** params, unsigned grid[3], unsigned block[3], size_t smem);
};

void register_kernel(const char* name, HostKernel k);

// One lock for the whole device: cuBLAS calls hold it too, so a GEMM never runs beside a launch
// or an allocation.
std::recursive_mutex& device_lock();

// What the driver checks for cuBLAS: that [ptr, ptr + bytes) lies inside one live buffer.
// Returns an empty string when it does, else why not.
std::string check_range(uint64_t ptr, size_t bytes);
// cuBLAS work is counted with the driver's counters and traced with the bytes of A, B and C; a
// fault makes the context's error sticky.
void count_gemm(int m, int n, int k, double flops, double bytes);
// KD_SIM_COUNT_ONLY=1: every call is checked, counted and traced, nothing is computed (driver.cpp).
bool count_only();
bool context_current();
// The trace's name of a stream: 0 for the default streams, 1, 2, … for created ones.
int stream_id(void* stream);
// Appends a line to the trace when KD_SIM_TRACE names a folder (see driver.cpp).
void trace(const std::string& line);
bool tracing();
void fail_sticky(int cuda_error, const std::string& why);

}  // namespace kd_simdev
