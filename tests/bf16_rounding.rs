//! The CPU stochastic rounding (`backend::cpu::bf16`), twin of the bf16 AdamW kernel's rounding:
//! exact values stay exact, results are one of the two neighbouring bf16 values, the rounding is
//! unbiased, and the hash is deterministic and pinned (so the CUDA side can be checked against the
//! same numbers).

use kd_engine::backend::cpu::bf16::{
    mix64, round_bf16_with_noise, sr_hash, sr_key, sr_noise16, stochastic_round_bf16, GOLDEN,
};

/// A small deterministic generator for test inputs (not the hash under test).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 ^ (self.0 >> 29)
    }
    /// A finite f32 of any sign and magnitude (uniform over bit patterns, non-finite rejected).
    fn finite_f32(&mut self) -> f32 {
        loop {
            let x = f32::from_bits((self.next() >> 32) as u32);
            if x.is_finite() {
                return x;
            }
        }
    }
}

/// The bf16 neighbours of a finite x, as bit patterns: truncation toward zero and one ulp further
/// out in magnitude.
fn neighbours(x: f32) -> (u16, u16) {
    let low = (x.to_bits() >> 16) as u16;
    (low, low.wrapping_add(1))
}

#[test]
fn representable_values_never_move() {
    let mut count = 0;
    for bits in 0..=u16::MAX {
        let b = half::bf16::from_bits(bits);
        if !b.is_finite() {
            continue;
        }
        let x = b.to_f32();
        for idx in [0u64, 1, 2, 3, 4, 1 << 20, u64::MAX] {
            for (seed, step) in [(0u64, 1u64), (42, 7), (u64::MAX, u64::MAX)] {
                let r = stochastic_round_bf16(x, seed, step, idx);
                assert_eq!(r.to_bits(), bits, "bf16 value {x} (bits {bits:#06x}) moved to {r}");
            }
        }
        count += 1;
    }
    assert!(count > 65000);
}

#[test]
fn result_is_one_of_the_two_neighbours() {
    let mut rng = Lcg(1);
    for i in 0..200_000u64 {
        let x = rng.finite_f32();
        let r = stochastic_round_bf16(x, 3, 11, i).to_bits();
        let (lo, hi) = neighbours(x);
        assert!(r == lo || r == hi, "x = {x:e} ({:#010x}) rounded to {r:#06x}, not {lo:#06x} or {hi:#06x}", x.to_bits());
        // Rounding never crosses zero and never changes the sign.
        assert_eq!(r & 0x8000, lo & 0x8000);
    }
    // Extreme noise values pick exactly the two ends.
    let x = 1.0f32 + f32::EPSILON * 3.0; // low half 0x0003 ...
    assert_eq!(round_bf16_with_noise(x, 0).to_bits(), neighbours(x).0);
    assert_eq!(round_bf16_with_noise(x, u16::MAX).to_bits(), neighbours(x).1);
}

#[test]
fn rounding_is_unbiased() {
    // Values with various fractional positions between two bf16 neighbours, both signs, several
    // magnitudes (including subnormals). Mean error over many indices must be far below the
    // spacing: for n = 100 000 draws the standard error is ≤ 0.0016 spacing.
    let n = 100_000u64;
    for &base in &[1.0f32, -1.0, 3.7e-3, -2.5e7, 1.5e-39, 6.1e30] {
        for &frac in &[1.0f64 / 65536.0, 0.1, 0.25, 0.5, 0.73, 0.999] {
            let lo_bits = base.to_bits() & 0xffff_0000;
            let x = f32::from_bits(lo_bits + (frac * 65536.0) as u32);
            let (lo, hi) = neighbours(x);
            let (lo_v, hi_v) = (half::bf16::from_bits(lo).to_f64(), half::bf16::from_bits(hi).to_f64());
            let spacing = (hi_v - lo_v).abs();
            let mut sum_err = 0.0f64;
            let mut ups = 0u64;
            for idx in 0..n {
                let r = stochastic_round_bf16(x, 12345, 9, idx);
                sum_err += r.to_f64() - x as f64;
                ups += (r.to_bits() == hi) as u64;
            }
            let mean_err = sum_err / n as f64;
            assert!(
                mean_err.abs() < 0.01 * spacing,
                "x = {x:e}: mean error {mean_err:e} vs spacing {spacing:e}"
            );
            let p = (x.to_bits() & 0xffff) as f64 / 65536.0;
            let p_hat = ups as f64 / n as f64;
            assert!((p_hat - p).abs() < 0.01, "x = {x:e}: rounds up {p_hat} of the time, expected {p}");
        }
    }
}

#[test]
fn noise_bits_are_uniform_and_distinct_per_element() {
    // Each of the 16 bits is set about half of the time, in each of the four lanes of a hash.
    let n = 64_000u64;
    let mut set = [[0u64; 16]; 4];
    for idx in 0..n {
        let v = sr_noise16(7, 3, idx);
        for (b, s) in set[(idx & 3) as usize].iter_mut().enumerate() {
            *s += ((v >> b) & 1) as u64;
        }
    }
    for lane in set {
        for s in lane {
            let f = s as f64 / (n / 4) as f64;
            assert!((f - 0.5).abs() < 0.03, "a noise bit is set {f} of the time");
        }
    }
    // The four elements of one hash take its four 16-bit lanes, in order.
    let h = sr_hash(7, 3, 10);
    for lane in 0..4u64 {
        assert_eq!(sr_noise16(7, 3, 40 + lane), (h >> (16 * lane)) as u16);
    }
}

#[test]
fn deterministic_and_sensitive_to_seed_step_and_index() {
    let x = 0.123_456_79f32;
    for idx in 0..1000 {
        assert_eq!(stochastic_round_bf16(x, 5, 6, idx), stochastic_round_bf16(x, 5, 6, idx));
    }
    let differs = |f: &dyn Fn(u64) -> u64| (0..1000u64).filter(|&j| f(j) != sr_hash(5, 6, j)).count();
    assert!(differs(&|j| sr_hash(6, 6, j)) > 990, "seed must change the stream");
    assert!(differs(&|j| sr_hash(5, 7, j)) > 990, "step must change the stream");
    assert!(differs(&|j| sr_hash(5, 6, j + 1)) > 990, "index must change the hash");
}

#[test]
fn non_finite_values() {
    for idx in 0..64 {
        assert_eq!(stochastic_round_bf16(f32::INFINITY, 1, 1, idx).to_bits(), 0x7f80);
        assert_eq!(stochastic_round_bf16(f32::NEG_INFINITY, 1, 1, idx).to_bits(), 0xff80);
        assert!(stochastic_round_bf16(f32::NAN, 1, 1, idx).is_nan());
        // A NaN whose payload is only in the low half stays NaN (does not become inf).
        assert!(stochastic_round_bf16(f32::from_bits(0x7f80_0001), 1, 1, idx).is_nan());
    }
    // The largest finite f32 rounds to the largest finite bf16 or overflows to inf, like RNE would.
    let r = stochastic_round_bf16(f32::MAX, 1, 1, 0).to_bits();
    assert!(r == 0x7f7f || r == 0x7f80);
}

/// Pinned values of the hash: the CUDA kernel (kernels/adamw.cu) must produce these bits too.
/// Changing the hash changes every bf16 run without master weights: update both sides together.
#[test]
fn hash_is_pinned() {
    assert_eq!(GOLDEN, 0x9E37_79B9_7F4A_7C15);
    // splitmix64 with seed 0: its first output is mix64(GOLDEN) = 0xE220A8397B1DCDAF.
    assert_eq!(mix64(GOLDEN), 0xE220_A839_7B1D_CDAF);
    assert_eq!(sr_key(0, 0), mix64(mix64(GOLDEN)));
    let pinned: [(u64, u64, u64, u64); 4] = [
        (0, 1, 0, sr_hash(0, 1, 0)),
        (42, 1000, 123_456_789, sr_hash(42, 1000, 123_456_789)),
        (u64::MAX, u64::MAX, u64::MAX, sr_hash(u64::MAX, u64::MAX, u64::MAX)),
        (1, 2, 3, sr_hash(1, 2, 3)),
    ];
    for (seed, step, block, h) in pinned {
        assert_eq!(h, mix64(sr_key(seed, step).wrapping_add(block.wrapping_add(1).wrapping_mul(GOLDEN))));
    }
    assert_eq!(sr_hash(0, 1, 0), PINNED_0_1_0);
    assert_eq!(sr_hash(42, 1000, 123_456_789), PINNED_42_1000_123456789);
}

const PINNED_0_1_0: u64 = 0x6EC8_5F1F_8547_BC0C;
const PINNED_42_1000_123456789: u64 = 0x7334_D2E8_0259_6BFF;
