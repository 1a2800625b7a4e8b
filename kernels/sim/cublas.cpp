// cublas.cpp: the cuBLAS entry points of the simulated device (libkd_cublas_sim.so, soname
// libcublas.so), computed on the CPU exactly as the cuBLAS documentation defines them.
//
// GEMMs are column-major: C = alpha·op(A)·op(B) + beta·C, op(A) m×k, op(B) k×n, C m×n, element
// (i, j) of a matrix X with leading dimension ldx at X[i + j·ldx]; A is m×k (lda ≥ m) when not
// transposed and k×m (lda ≥ k) when it is, likewise B. bf16 inputs are widened exactly, products
// are accumulated in f32 (CUBLAS_COMPUTE_32F), and a bf16 C is rounded to nearest even once at the
// end. With beta = 0, C is not read (NaN in it does not propagate), as cuBLAS promises.
// Argument checks follow cublasGemmEx's: a negative size, a bad operation or a leading dimension
// below its minimum is CUBLAS_STATUS_INVALID_VALUE; a type combination cuBLAS does not offer is
// CUBLAS_STATUS_NOT_SUPPORTED; a null or destroyed handle CUBLAS_STATUS_NOT_INITIALIZED. A matrix
// that reaches outside its buffer would fault on a GPU: here it is CUBLAS_STATUS_EXECUTION_FAILED
// and the context's sticky illegal-address error, with the matrix named on stderr.

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "cuda_sim.h"

typedef int cublasStatus_t;
typedef struct KdBlas* cublasHandle_t;
struct KdBlas { void* stream = nullptr; };

enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
enum { CUBLAS_COMPUTE_32F = 68 };

namespace {
std::set<KdBlas*>& handles() {
    static auto* h = new std::set<KdBlas*>();
    return *h;
}

float load(const void* p, int type, size_t i) {
    if (type == CUDA_R_32F) return static_cast<const float*>(p)[i];
    uint32_t bits = (uint32_t) static_cast<const uint16_t*>(p)[i] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void store(void* p, int type, size_t i, float v) {
    if (type == CUDA_R_32F) {
        static_cast<float*>(p)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, 4);
    uint16_t b = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fff : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    static_cast<uint16_t*>(p)[i] = b;
}

size_t elem_size(int type) { return type == CUDA_R_32F ? 4 : 2; }

// The bytes a column-major rows×cols matrix with leading dimension ld spans.
size_t span(long rows, long cols, long ld, int type) {
    if (rows == 0 || cols == 0) return 0;
    return ((size_t)(cols - 1) * (size_t)ld + (size_t)rows) * elem_size(type);
}
}  // namespace

KD_SIM_EXPORT cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
    std::lock_guard<std::recursive_mutex> g(kd_simdev::device_lock());
    if (h == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    if (!kd_simdev::context_current()) return CUBLAS_STATUS_NOT_INITIALIZED;
    *h = new KdBlas();
    handles().insert(*h);
    return CUBLAS_STATUS_SUCCESS;
}

KD_SIM_EXPORT cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    std::lock_guard<std::recursive_mutex> g(kd_simdev::device_lock());
    if (handles().erase(h) == 0) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

KD_SIM_EXPORT cublasStatus_t cublasSetStream_v2(cublasHandle_t h, void* stream) {
    std::lock_guard<std::recursive_mutex> g(kd_simdev::device_lock());
    if (handles().count(h) == 0) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

KD_SIM_EXPORT cublasStatus_t cublasGemmEx(cublasHandle_t h, int transa, int transb, int m, int n, int k, const void* alpha,
                                          const void* A, int atype, int lda, const void* B, int btype, int ldb,
                                          const void* beta, void* C, int ctype, int ldc, int compute, int /*algo*/) {
    std::lock_guard<std::recursive_mutex> g(kd_simdev::device_lock());
    if (handles().count(h) == 0) return CUBLAS_STATUS_NOT_INITIALIZED;
    const bool op_ok = (transa == CUBLAS_OP_N || transa == CUBLAS_OP_T || transa == CUBLAS_OP_C) &&
                       (transb == CUBLAS_OP_N || transb == CUBLAS_OP_T || transb == CUBLAS_OP_C);
    if (!op_ok || m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;  // real types: C is T
    const long a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
    if (lda < std::max(1L, a_rows) || ldb < std::max(1L, b_rows) || ldc < std::max(1, m)) return CUBLAS_STATUS_INVALID_VALUE;
    if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    // The combinations with f32 compute that kd-engine's types need (cuBLAS's table has more).
    const bool types_ok = compute == CUBLAS_COMPUTE_32F && atype == btype &&
                          ((atype == CUDA_R_16BF && (ctype == CUDA_R_16BF || ctype == CUDA_R_32F)) ||
                           (atype == CUDA_R_32F && ctype == CUDA_R_32F));
    if (!types_ok) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    const bool reads_ab = k > 0 && al != 0.0f;
    struct { const char* name; const void* p; size_t bytes; } mats[3] = {
        {"A", A, reads_ab ? span(a_rows, a_cols, lda, atype) : 0},
        {"B", B, reads_ab ? span(b_rows, b_cols, ldb, btype) : 0},
        {"C", C, span(m, n, ldc, ctype)},
    };
    for (auto& x : mats) {
        std::string why = kd_simdev::check_range((uint64_t)(uintptr_t)x.p, x.bytes);
        if (!why.empty()) {
            kd_simdev::fail_sticky(700, "cublasGemmEx (m " + std::to_string(m) + ", n " + std::to_string(n) + ", k " +
                                            std::to_string(k) + "): matrix " + x.name + " reaches outside its buffer: " + why);
            return CUBLAS_STATUS_EXECUTION_FAILED;
        }
    }
    const double elem_ab = atype == CUDA_R_32F ? 4 : 2, elem_c = ctype == CUDA_R_32F ? 4 : 2;
    // What a GEMM moves at the least: A and B read once, C written (and read when beta != 0).
    const double bytes = (reads_ab ? elem_ab * ((double)m * k + (double)k * n) : 0) + elem_c * (double)m * n * (be == 0.0f ? 1 : 2);
    kd_simdev::count_gemm(m, n, k, 2.0 * m * n * (double)k, bytes);
    if (kd_simdev::count_only()) return CUBLAS_STATUS_SUCCESS;
    std::vector<float> col(k);
    for (long j = 0; j < n; ++j) {
        // Column j of op(B), widened once.
        for (long l = 0; l < k; ++l) col[l] = reads_ab ? load(B, btype, tb ? (size_t)(j + l * ldb) : (size_t)(l + j * ldb)) : 0.0f;
        for (long i = 0; i < m; ++i) {
            float acc = 0.0f;
            if (reads_ab)
                for (long l = 0; l < k; ++l) acc += load(A, atype, ta ? (size_t)(l + i * lda) : (size_t)(i + l * lda)) * col[l];
            const size_t ci = (size_t)(i + j * ldc);
            const float c = be == 0.0f ? 0.0f : be * load(C, ctype, ci);
            store(C, ctype, ci, al * acc + c);
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

KD_SIM_EXPORT const char* cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        default: return "CUBLAS_STATUS_UNKNOWN";
    }
}
