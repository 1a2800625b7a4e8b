//! On the simulated CUDA device: a kernel that writes past its buffer is an error naming the
//! kernel, and the context stays failed afterwards, as on a GPU. A process of its own, since the
//! error is sticky (`backend::cuda::checks::out_of_bounds_write_is_caught`).

mod common;

use kd_engine::backend::cuda::{checks, CudaBackend};

#[test]
fn a_kernel_writing_past_its_buffer_is_caught_and_sticky() {
    if !common::simulated_device_built() {
        return;
    }
    // Always the simulated device, even beside a GPU: on a real one this would poison the context.
    std::env::set_var("KD_CUDA_SIM", "1");
    let be = CudaBackend::new().expect("opening the simulated CUDA device");
    let (launch, sync) = checks::out_of_bounds_write_is_caught(&be).unwrap();
    println!("launch: {launch}\nsync:   {sync}");
    assert!(launch.contains("scale_bf16") && launch.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{launch}");
    assert!(sync.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "the illegal address must be sticky: {sync}");
}
