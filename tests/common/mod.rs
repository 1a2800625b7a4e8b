//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Whether this build has the simulated CUDA device (needs nvcc and g++ at build time). CI
/// requires it (`KD_REQUIRE_KERNELS=1`): there a build without it fails the test instead of
/// skipping it.
pub fn simulated_device_built() -> bool {
    if kd_engine::backend::cuda::sim::built() {
        return true;
    }
    assert!(std::env::var("KD_REQUIRE_KERNELS").as_deref() != Ok("1"), "KD_REQUIRE_KERNELS=1 but the simulated CUDA device was not built");
    println!("skipped: this build has no simulated CUDA device (needs nvcc and g++ at build time)");
    false
}

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// max |a − b| / max |b|, the golden-test measure.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let diff = a.iter().zip(b).fold(0f64, |m, (&x, &y)| {
        let d = (x as f64 - y as f64).abs();
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    });
    diff / scale
}

/// A deterministic generator for test inputs (splitmix64), so failures reproduce.
pub struct TestRng(pub u64);

impl TestRng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Central-difference check of an analytic gradient. `f(x)` is the scalar function; `analytic` its
/// claimed gradient at `x`. Checks `samples` coordinates spread over the vector (all when fewer)
/// and fails with the worst relative error above `tol`.
pub fn check_grad(what: &str, x: &[f64], analytic: &[f64], samples: usize, tol: f64, f: &mut dyn FnMut(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let n = x.len();
    let idx: Vec<usize> = if n <= samples { (0..n).collect() } else { (0..samples).map(|i| i * n / samples + (i * 7919) % (n / samples).max(1)).collect() };
    let h = 1e-5;
    let mut xp = x.to_vec();
    let scale = analytic.iter().fold(0f64, |m, g| m.max(g.abs())).max(1e-12);
    let mut worst = (0.0, 0usize, 0.0, 0.0);
    for &i in &idx {
        let orig = xp[i];
        xp[i] = orig + h;
        let fp = f(&xp);
        xp[i] = orig - h;
        let fm = f(&xp);
        xp[i] = orig;
        let numeric = (fp - fm) / (2.0 * h);
        // Relative to the larger of the entry and the gradient's overall scale, so tiny entries
        // are not judged on their own rounding noise.
        let err = (numeric - analytic[i]).abs() / analytic[i].abs().max(numeric.abs()).max(1e-3 * scale);
        if err > worst.0 {
            worst = (err, i, numeric, analytic[i]);
        }
    }
    assert!(
        worst.0 <= tol,
        "{what}: finite-difference mismatch at index {}: numeric {} vs analytic {} (rel err {:.2e} > {tol:.0e})",
        worst.1,
        worst.2,
        worst.3,
        worst.0
    );
}
