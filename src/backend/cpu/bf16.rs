//! Stochastic rounding f32 → bf16: the CPU twin of the bf16 AdamW kernel's rounding
//! (`kernels/adamw.cu`), bit for bit, so a CUDA parameter update without fp32 master weights can be
//! reproduced and tested on the CPU.
//!
//! The noise is a counter hash of (seed, step, element index), not a random-number generator
//! state, so every element is independent of launch geometry and thread order:
//!
//! ```text
//! mix64(z)           = splitmix64 finaliser: z ^= z>>30; z *= 0xBF58476D1CE4E5B9;
//!                                            z ^= z>>27; z *= 0x94D049BB133111EB; z ^= z>>31
//! key(seed, step)    = mix64(seed + mix64(step + GOLDEN))            (wrapping u64 arithmetic)
//! sr_hash(s, t, j4)  = mix64(key(s, t) + (j4 + 1)·GOLDEN)            the j4-th splitmix64 output
//! noise16(s, t, j)   = bits [16·(j mod 4), 16·(j mod 4) + 16) of sr_hash(s, t, j / 4)
//! round(x, noise)    = high 16 bits of (f32 bits of x + noise)        for finite x
//!                      (x >> 16) | 0x0040 if x is NaN (stays a quiet NaN), x >> 16 for ±inf
//! ```
//!
//! with `GOLDEN = 0x9E3779B97F4A7C15`. Adding 16 uniform bits below the bf16 mantissa and
//! truncating rounds the magnitude up with probability (low 16 bits)/2¹⁶, so the expected result
//! is x (unbiased); a value already representable in bf16 (low 16 bits zero) never moves. A carry
//! out of the largest finite bf16 magnitude gives ±inf, as round-to-nearest would at that size.
//! One 64-bit hash serves four consecutive elements. `j` is the index within one tensor's launch:
//! different tensors take different seeds (e.g. the run's seed plus the tensor's index).

/// The splitmix64 increment (2⁶⁴/φ).
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 output finaliser.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The per-(seed, step) stream key.
#[inline]
pub fn sr_key(seed: u64, step: u64) -> u64 {
    mix64(seed.wrapping_add(mix64(step.wrapping_add(GOLDEN))))
}

/// 64 random bits for elements `4·block .. 4·block + 3` of the tensor.
#[inline]
pub fn sr_hash(seed: u64, step: u64, block: u64) -> u64 {
    mix64(sr_key(seed, step).wrapping_add(block.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// The 16 noise bits of element `idx`.
#[inline]
pub fn sr_noise16(seed: u64, step: u64, idx: u64) -> u16 {
    (sr_hash(seed, step, idx >> 2) >> (16 * (idx & 3))) as u16
}

/// Rounds `x` to bf16 with the given 16 noise bits (see the module documentation).
#[inline]
pub fn round_bf16_with_noise(x: f32, noise: u16) -> half::bf16 {
    let u = x.to_bits();
    let bits = if u & 0x7f80_0000 == 0x7f80_0000 {
        // ±inf keep their pattern; NaN stays NaN (quiet bit set, so a payload only in the low
        // half cannot turn it into an infinity).
        ((u >> 16) as u16) | if x.is_nan() { 0x0040 } else { 0 }
    } else {
        (u.wrapping_add(noise as u32) >> 16) as u16
    };
    half::bf16::from_bits(bits)
}

/// Stochastic rounding of element `idx` of a tensor updated at optimizer `step` under `seed`:
/// exactly what `adamw_bf16` stores when it has no fp32 master copy.
#[inline]
pub fn stochastic_round_bf16(x: f32, seed: u64, step: u64, idx: u64) -> half::bf16 {
    round_bf16_with_noise(x, sr_noise16(seed, step, idx))
}
