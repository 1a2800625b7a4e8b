//! Image decoding and SigLIP preprocessing against PIL / transformers references.
//!
//! References come from `tests/fixtures/make_data_fixtures.py` (Pillow 13.0.0, transformers
//! 5.17.0): `decode.safetensors` holds PIL's `convert("RGB")` of every fixture image and
//! `preprocess_*.safetensors` the SigLIP processor's output at 384×384.

use std::path::{Path, PathBuf};

use kd_engine::data::{
    decode_rgb, load_rgb, preprocess, resize, ImageProcessorConfig, Resample, RgbImage,
};
use safetensors::{Dtype, SafeTensors};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

/// Every fixture image and whether its decoder is bit-exact with PIL's (JPEG is not: another IDCT
/// and chroma upsampler than libjpeg-turbo).
const IMAGES: &[(&str, bool)] = &[
    ("chelsea_strip.png", true),
    ("camera_grey.png", true),
    ("rocket.jpg", false),
    ("astronaut_rgba.png", true),
    ("coffee_palette.png", true),
    ("no_time_for_that_tiny.gif", true),
    ("transparent.gif", true),
    ("exif_rotated.jpg", false),
    ("grey16.png", true),
    ("rgb16.png", true),
    ("grey_alpha16.png", true),
];

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("fixture {} unreadable: {e}", path.display()))
}

fn tensor_u8(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<u8>) {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
    assert_eq!(t.dtype(), Dtype::U8, "{name}");
    (t.shape().to_vec(), t.data().to_vec())
}

fn tensor_f32(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

fn stem(name: &str) -> String {
    let (base, ext) = name.rsplit_once('.').unwrap();
    format!("{base}_{ext}")
}

#[test]
fn decoding_matches_pil_convert_rgb() {
    let bytes = read(&fixtures().join("decode.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for &(name, exact) in IMAGES {
        let img = load_rgb(&fixtures().join("images").join(name)).unwrap();
        let (shape, want) = tensor_u8(&st, name);
        assert_eq!(
            shape,
            [img.height() as usize, img.width() as usize, 3],
            "{name}: size"
        );
        let diffs: Vec<i32> = img
            .as_raw()
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
        println!(
            "decode {name:28} {}x{}  mean |du| {mean:.4}  max |du| {max}",
            img.width(),
            img.height()
        );
        if exact {
            assert_eq!(max, 0, "{name}: decoded pixels differ from PIL's");
        } else {
            assert!(
                mean < 1.0 && max <= 12,
                "{name}: JPEG decode too far from PIL's (mean {mean}, max {max})"
            );
        }
    }
}

/// Compares a processor output with a reference stored as u8 (x = (u/255 − 0.5)/0.5, exactly).
fn compare(
    name: &str,
    what: &str,
    ours: &[f32],
    want_u8: &[u8],
    rows: &[usize],
    cols: &[usize],
) -> (f64, f64) {
    let (h, w) = (384usize, 384usize);
    let mut sum = 0.0;
    let mut max = 0.0f64;
    let mut n = 0usize;
    for c in 0..3 {
        for (ri, &y) in rows.iter().enumerate() {
            for (ci, &x) in cols.iter().enumerate() {
                let u = want_u8[(c * rows.len() + ri) * cols.len() + ci] as f64;
                let want = (u / 255.0 - 0.5) / 0.5;
                let d = (ours[c * h * w + y * w + x] as f64 - want).abs();
                sum += d;
                max = max.max(d);
                n += 1;
            }
        }
    }
    let mean = sum / n as f64;
    println!(
        "preprocess {name:28} vs {what:16} mean |Δ| {mean:.6}  max |Δ| {max:.6}  ({n} values)"
    );
    (mean, max)
}

#[test]
fn preprocessing_matches_siglip_image_processor() {
    let cfg = ImageProcessorConfig::siglip();
    let all: Vec<usize> = (0..384).collect();
    let every_third: Vec<usize> = (0..384).step_by(3).collect();
    for &(name, exact_decode) in IMAGES {
        let img = load_rgb(&fixtures().join("images").join(name)).unwrap();
        let ours = preprocess(&img, &cfg).unwrap();
        assert_eq!(ours.len(), 3 * 384 * 384);
        let bytes = read(&fixtures().join(format!("preprocess_{}.safetensors", stem(name))));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let names = st.names();
        for backend in ["pil", "torchvision"] {
            let sub = format!("{backend}_u8_sub3");
            if !names.iter().any(|n| *n == sub) {
                continue; // torchvision was not installed when the fixtures were made
            }
            let (shape, want) = tensor_u8(&st, &sub);
            assert_eq!(shape, [3, 128, 128]);
            let (mean, max) = compare(name, &sub, &ours, &want, &every_third, &every_third);
            assert!(mean <= 0.02, "{name} vs {sub}: mean |Δ| {mean} > 0.02");
            if backend == "pil" && exact_decode {
                // Same pixels in, Pillow's integer arithmetic reproduced: identical uint8 output
                // (the bound only absorbs f32 rounding of the normalised value; one uint8 step
                // is 0.0078).
                assert!(
                    max < 1e-6,
                    "{name}: resize differs from Pillow's (max |Δ| {max})"
                );
            }
            let full = format!("{backend}_u8");
            if names.iter().any(|n| *n == full) {
                let (shape, want) = tensor_u8(&st, &full);
                assert_eq!(shape, [3, 384, 384]);
                let (mean, max) = compare(name, &full, &ours, &want, &all, &all);
                assert!(mean <= 0.02, "{name} vs {full}: mean |Δ| {mean}");
                if backend == "pil" && exact_decode {
                    assert!(
                        max < 1e-6,
                        "{name}: resize differs from Pillow's (max |Δ| {max})"
                    );
                }
            }
            // The float values themselves (rescale in f64, normalise in f32, as transformers).
            let (shape, rows) = tensor_f32(&st, &format!("{backend}_f32_rows"));
            assert_eq!(shape, [3, 4, 384]);
            let tol = if backend == "pil" && exact_decode {
                1e-6
            } else {
                0.2
            };
            for c in 0..3 {
                for y in 0..4 {
                    for x in 0..384 {
                        let a = ours[c * 384 * 384 + y * 384 + x];
                        let b = rows[(c * 4 + y) * 384 + x];
                        assert!(
                            (a - b).abs() <= tol,
                            "{name} {backend} c{c} y{y} x{x}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn resize_to_same_size_is_identity_and_other_filters_run() {
    let img = load_rgb(&fixtures().join("images/camera_grey.png")).unwrap();
    assert_eq!(
        resize(&img, img.width(), img.height(), Resample::Bicubic).unwrap(),
        img
    );
    for f in [
        Resample::Nearest,
        Resample::Bilinear,
        Resample::Box,
        Resample::Hamming,
        Resample::Lanczos,
    ] {
        let out = resize(&img, 61, 200, f).unwrap();
        assert_eq!((out.width(), out.height()), (61, 200));
    }
    assert!(resize(&img, 0, 10, Resample::Bicubic).is_err());
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kd-engine-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn bad_files_give_clear_errors() {
    let tmp = TempDir::new("bad-images");
    let msg = |path: &Path| format!("{:#}", load_rgb(path).unwrap_err());

    let missing = tmp.0.join("nope.jpg");
    let m = msg(&missing);
    assert!(m.contains("nope.jpg") && m.contains("cannot read"), "{m}");

    let jpeg = read(&fixtures().join("images/rocket.jpg"));
    for keep in [jpeg.len() / 2, jpeg.len() - 2, 600] {
        let cut = tmp.0.join(format!("cut{keep}.jpg"));
        std::fs::write(&cut, &jpeg[..keep]).unwrap();
        let m = msg(&cut);
        assert!(
            m.contains(&format!("cut{keep}.jpg")) && m.contains("truncated"),
            "{m}"
        );
    }

    let png = read(&fixtures().join("images/chelsea_strip.png"));
    let cut = tmp.0.join("cut.png");
    std::fs::write(&cut, &png[..png.len() / 2]).unwrap();
    let m = msg(&cut);
    assert!(
        m.contains("cut.png") && m.contains("corrupt or truncated"),
        "{m}"
    );

    // Corrupt the pixel data (the IDAT chunk starts at byte 2654 of this file).
    let mut flipped = png.clone();
    for b in &mut flipped[3000..3060] {
        *b ^= 0x5a;
    }
    let bad = tmp.0.join("flipped.png");
    std::fs::write(&bad, &flipped).unwrap();
    assert!(msg(&bad).contains("flipped.png"));

    let gif = read(&fixtures().join("images/no_time_for_that_tiny.gif"));
    let cut = tmp.0.join("cut.gif");
    std::fs::write(&cut, &gif[..200]).unwrap();
    assert!(msg(&cut).contains("cut.gif"));

    let text = tmp.0.join("notes.png");
    std::fs::write(&text, b"this is not an image").unwrap();
    assert!(
        msg(&text).contains("not a recognised image format"),
        "{}",
        msg(&text)
    );

    let empty = tmp.0.join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    assert!(msg(&empty).contains("empty"), "{}", msg(&empty));

    // BMP decodes in PIL but is not one of the formats the data pipeline supports.
    let mut bmp = b"BM".to_vec();
    bmp.extend_from_slice(&[0; 60]);
    assert!(format!("{:#}", decode_rgb(&bmp).unwrap_err()).contains("Bmp"));
}

#[test]
fn preprocess_without_resize_requires_the_configured_size() {
    let img = RgbImage::new(4, 3, vec![128; 36]).unwrap();
    let cfg = ImageProcessorConfig {
        do_resize: false,
        ..ImageProcessorConfig::siglip()
    };
    let err = format!("{:#}", preprocess(&img, &cfg).unwrap_err());
    assert!(err.contains("4x3") && err.contains("384x384"), "{err}");
    let cfg = ImageProcessorConfig {
        height: 3,
        width: 4,
        ..cfg
    };
    assert_eq!(preprocess(&img, &cfg).unwrap().len(), 36);
}

#[test]
fn processor_config_from_dir() {
    let tmp = TempDir::new("proc-config");
    assert_eq!(
        ImageProcessorConfig::from_dir(&tmp.0).unwrap(),
        ImageProcessorConfig::siglip()
    );
    std::fs::write(
        tmp.0.join("preprocessor_config.json"),
        r#"{"size": {"height": 224, "width": 192}, "image_mean": 0.25, "resample": 2, "do_rescale": false}"#,
    )
    .unwrap();
    let cfg = ImageProcessorConfig::from_dir(&tmp.0).unwrap();
    assert_eq!(
        (
            cfg.height,
            cfg.width,
            cfg.mean,
            cfg.resample,
            cfg.do_rescale
        ),
        (224, 192, [0.25; 3], Resample::Bilinear, false)
    );
    std::fs::write(tmp.0.join("preprocessor_config.json"), "{ nope").unwrap();
    let err = format!("{:#}", ImageProcessorConfig::from_dir(&tmp.0).unwrap_err());
    assert!(
        err.contains("preprocessor_config.json") && err.contains("invalid JSON"),
        "{err}"
    );
}
