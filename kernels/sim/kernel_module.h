// kernel_module.h: registers host-compiled kernels with the simulated device. build.rs generates
// one translation unit per kernels/*.cu: it includes the .cu (under KD_HOST_SIM), then this
// header, then one KD_SIM_KERNEL(name) per `.entry` of that file's PTX, so every kernel a module
// holds on a GPU is found by the same name here.
//
// The launcher is generated from the kernel's C++ signature: cuLaunchKernel's kernelParams[i]
// points at parameter i, read as exactly that parameter's type (what the real driver does with
// the PTX's parameter layout), copied once, and the kernel body runs for every thread of the grid.
#pragma once

#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_sim.h"

namespace kd_simdev {

template <class... A>
struct Launcher {
    template <size_t... I>
    static void run_with(void* fn, void** params, unsigned grid[3], unsigned block[3], size_t smem, std::index_sequence<I...>) {
        auto k = reinterpret_cast<void (*)(A...)>(fn);
        std::tuple<std::decay_t<A>...> args{*static_cast<std::decay_t<A>*>(params[I])...};
        kd_sim::launch(kd_dim3{grid[0], grid[1], grid[2]}, kd_dim3{block[0], block[1], block[2]}, smem,
                       [&] { std::apply(k, args); });
    }
    static void run(void* fn, void** params, unsigned grid[3], unsigned block[3], size_t smem) {
        run_with(fn, params, grid, block, smem, std::index_sequence_for<A...>{});
    }
};

template <class T>
constexpr char param_kind() {
    return std::is_pointer_v<T> ? 'p' : std::is_integral_v<T> ? 'i' : std::is_floating_point_v<T> ? 'f' : 'o';
}

// Deduction picks the kernel out of an overload set (elementwise.cu's f32_to_bf16 kernel shares its
// name with host_sim.h's conversion helper, which does not return void).
template <class... A>
HostKernel host_kernel(void (*k)(A...)) {
    return HostKernel{reinterpret_cast<void*>(k), {sizeof(std::decay_t<A>)...}, {param_kind<std::decay_t<A>>()...},
                      &Launcher<A...>::run};
}

struct Registrar {
    Registrar(const char* name, HostKernel k) { register_kernel(name, k); }
};

}  // namespace kd_simdev

#define KD_SIM_KERNEL(name) static kd_simdev::Registrar kd_sim_registrar_##name(#name, kd_simdev::host_kernel(name));
