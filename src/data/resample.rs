//! Image resizing that reproduces Pillow's `Image.resize` on 8-bit RGB, bit for bit.
//!
//! transformers' PIL image processors (the SigLIP one used upstream) resize the uint8 image with
//! PIL, so matching PIL's arithmetic, not just its filter, is what makes our pixels theirs.
//! Pillow's algorithm, re-implemented here from its description:
//!
//! * separable: a horizontal pass into an 8-bit temporary image, then a vertical pass;
//! * the filter is stretched by the scale factor when shrinking (`support × max(1, in/out)`),
//!   which is the antialiasing; output pixel `i` is centred at `(i + 0.5) · in/out` in the input;
//! * the taps of each output pixel are evaluated in f64, normalised to sum 1, then converted to
//!   fixed point with 22 fractional bits (rounded half away from zero);
//! * each pass accumulates `pixel · tap` in integers starting from one half, shifts right by 22
//!   (floor) and clips to 0..=255, so both passes round to uint8;
//! * bicubic uses the Keys kernel with a = −0.5 (support 2); bilinear, box, Hamming and Lanczos
//!   are the same machinery with other kernels; nearest samples `floor((i + 0.5) · in/out)`.

use anyhow::{bail, ensure, Result};

use super::image::RgbImage;

/// A filter kernel: weight as a function of distance in input pixels (at scale 1).
type Kernel = fn(f64) -> f64;

/// PIL's resampling filters, numbered as PIL numbers them (`preprocessor_config.json`'s
/// `resample` holds these numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    Nearest = 0,
    Lanczos = 1,
    Bilinear = 2,
    Bicubic = 3,
    Box = 4,
    Hamming = 5,
}

impl Resample {
    /// Maps PIL's integer code to the filter.
    pub fn from_pil_code(code: i64) -> Result<Self> {
        Ok(match code {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            other => bail!("unknown PIL resample code {other} (expected 0..=5)"),
        })
    }

    /// The kernel and its support radius at scale 1; `None` for nearest (no convolution).
    fn kernel(self) -> Option<(Kernel, f64)> {
        match self {
            Self::Nearest => None,
            Self::Box => Some((box_kernel, 0.5)),
            Self::Bilinear => Some((bilinear_kernel, 1.0)),
            Self::Hamming => Some((hamming_kernel, 1.0)),
            Self::Bicubic => Some((bicubic_kernel, 2.0)),
            Self::Lanczos => Some((lanczos_kernel, 3.0)),
        }
    }
}

fn box_kernel(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_kernel(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn hamming_kernel(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * std::f64::consts::PI;
    // Pillow writes these constants as C floats; their f32 values are what it multiplies by.
    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
}

fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos_kernel(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 22;

/// The taps of one axis: for output pixel `i`, inputs `first[i] .. first[i] + count[i]` with
/// fixed-point weights `weights[i * stride ..]`.
struct AxisTaps {
    first: Vec<usize>,
    count: Vec<usize>,
    stride: usize,
    weights: Vec<i32>,
}

impl AxisTaps {
    fn new(in_size: usize, out_size: usize, kernel: Kernel, kernel_support: f64) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = kernel_support * filter_scale;
        let stride = support.ceil() as usize * 2 + 1;
        let inv = 1.0 / filter_scale;
        let mut first = Vec::with_capacity(out_size);
        let mut count = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * stride];
        let mut taps = vec![0f64; stride];
        for i in 0..out_size {
            let center = (i as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero; the clamp to 0 follows, as in Pillow.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = hi.saturating_sub(lo).min(stride);
            let mut sum = 0.0;
            for (j, tap) in taps.iter_mut().enumerate().take(n) {
                let w = kernel(((j + lo) as f64 - center + 0.5) * inv);
                *tap = w;
                sum += w;
            }
            for (j, tap) in taps.iter().enumerate().take(n) {
                let w = if sum != 0.0 { tap / sum } else { *tap };
                let fixed = w * (1u32 << PRECISION_BITS) as f64;
                weights[i * stride + j] = if w < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            first.push(lo);
            count.push(n);
        }
        Self {
            first,
            count,
            stride,
            weights,
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let w = &self.weights[i * self.stride..i * self.stride + self.count[i]];
        (self.first[i], w)
    }
}

/// Rounds a fixed-point accumulator (which started at one half) back to uint8, as Pillow does.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image to `width × height` exactly as Pillow's `Image.resize` does.
pub fn resize(image: &RgbImage, width: u32, height: u32, filter: Resample) -> Result<RgbImage> {
    ensure!(
        width > 0 && height > 0,
        "cannot resize to an empty size {width}x{height}"
    );
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if (in_w, in_h) == (out_w, out_h) {
        return Ok(image.clone());
    }
    let Some((kernel, support)) = filter.kernel() else {
        return resize_nearest(image, out_w, out_h);
    };
    let src = image.as_raw();

    // Horizontal pass over every input row (Pillow limits it to the rows the vertical pass
    // reads, which changes nothing in the result).
    let horizontal;
    let (mid, mid_w) = if out_w != in_w {
        let taps = AxisTaps::new(in_w, out_w, kernel, support);
        let mut out = vec![0u8; out_w * in_h * 3];
        for y in 0..in_h {
            let row = &src[y * in_w * 3..(y + 1) * in_w * 3];
            for x in 0..out_w {
                let (lo, w) = taps.taps(x);
                let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                for (j, &k) in w.iter().enumerate() {
                    let p = &row[(lo + j) * 3..(lo + j) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += p[c] as i64 * k as i64;
                    }
                }
                let o = (y * out_w + x) * 3;
                for c in 0..3 {
                    out[o + c] = clip8(acc[c]);
                }
            }
        }
        horizontal = out;
        (horizontal.as_slice(), out_w)
    } else {
        (src, in_w)
    };

    if out_h == in_h {
        return RgbImage::new(width, height, mid.to_vec());
    }
    let taps = AxisTaps::new(in_h, out_h, kernel, support);
    let mut out = vec![0u8; mid_w * out_h * 3];
    for y in 0..out_h {
        let (lo, w) = taps.taps(y);
        for x in 0..mid_w {
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (j, &k) in w.iter().enumerate() {
                let o = ((lo + j) * mid_w + x) * 3;
                for c in 0..3 {
                    acc[c] += mid[o + c] as i64 * k as i64;
                }
            }
            let o = (y * mid_w + x) * 3;
            for c in 0..3 {
                out[o + c] = clip8(acc[c]);
            }
        }
    }
    RgbImage::new(width, height, out)
}

/// Pillow's nearest-neighbour resize: output pixel `i` takes input `floor((i + 0.5) · in/out)`.
fn resize_nearest(image: &RgbImage, out_w: usize, out_h: usize) -> Result<RgbImage> {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let pick = |i: usize, n_in: usize, n_out: usize| {
        (((i as f64 + 0.5) * (n_in as f64 / n_out as f64)) as usize).min(n_in - 1)
    };
    let cols: Vec<usize> = (0..out_w).map(|x| pick(x, in_w, out_w)).collect();
    let src = image.as_raw();
    let mut out = Vec::with_capacity(out_w * out_h * 3);
    for y in 0..out_h {
        let sy = pick(y, in_h, out_h);
        for &sx in &cols {
            let o = (sy * in_w + sx) * 3;
            out.extend_from_slice(&src[o..o + 3]);
        }
    }
    RgbImage::new(out_w as u32, out_h as u32, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for (n_in, n_out) in [(8, 384), (451, 384), (1000, 384), (384, 384), (25, 7)] {
            let taps = AxisTaps::new(n_in, n_out, bicubic_kernel, 2.0);
            for i in 0..n_out {
                let (lo, w) = taps.taps(i);
                assert!(lo + w.len() <= n_in);
                let s: i64 = w.iter().map(|&k| k as i64).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= w.len() as i64,
                    "{n_in}->{n_out} px {i}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::new(7, 5, [10u8, 200, 77].repeat(35)).unwrap();
        for f in [
            Resample::Bicubic,
            Resample::Bilinear,
            Resample::Lanczos,
            Resample::Box,
            Resample::Hamming,
            Resample::Nearest,
        ] {
            for (w, h) in [(3, 2), (20, 9), (7, 11)] {
                let out = resize(&img, w, h, f).unwrap();
                assert!(
                    out.as_raw().chunks(3).all(|p| p == [10, 200, 77]),
                    "{f:?} {w}x{h}"
                );
            }
        }
    }
}
