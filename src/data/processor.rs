//! The vision tower's image preprocessing: resize, rescale, normalise, channel-major layout.
//!
//! It reproduces transformers' SigLIP image processor on its PIL path (transformers 4.x's
//! `SiglipImageProcessor`, 5.x's `SiglipImageProcessorPil`), the one LLaVA-KD trained with:
//! PIL resize of the uint8 image to exactly H×W (no aspect-preserving step, no crop), then
//! `x · rescale_factor` computed in f64 and stored as f32, then `(x − mean) / std` in f32.

use std::fs;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::image::RgbImage;
use super::resample::{resize, Resample};

/// Name of the Hugging Face file this configuration is read from.
pub const PREPROCESSOR_CONFIG_FILE: &str = "preprocessor_config.json";

/// How images become the vision tower's `pixel_values`.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    /// Output height in pixels.
    pub height: u32,
    /// Output width in pixels.
    pub width: u32,
    /// Per-channel mean subtracted after rescaling (RGB order).
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub std: [f32; 3],
    /// Multiplier applied to the uint8 values (1/255 maps them to [0, 1]).
    pub rescale_factor: f64,
    /// PIL filter used for the resize.
    pub resample: Resample,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        Self::siglip()
    }
}

impl ImageProcessorConfig {
    /// SigLIP-so400m-patch14-384's settings: 384×384 bicubic, ×1/255, mean 0.5, std 0.5.
    pub fn siglip() -> Self {
        Self {
            height: 384,
            width: 384,
            mean: [0.5; 3],
            std: [0.5; 3],
            rescale_factor: 1.0 / 255.0,
            resample: Resample::Bicubic,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
        }
    }

    /// Reads `dir/preprocessor_config.json` over the SigLIP defaults; the defaults alone when the
    /// folder has no such file (many vision checkpoints ship without one).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(PREPROCESSOR_CONFIG_FILE);
        if !path.exists() {
            return Ok(Self::siglip());
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json_str(&text)
            .with_context(|| format!("bad image processor config {}", path.display()))
    }

    /// The preprocessing for a vision tower of `image_size` read from `dir`: its
    /// `preprocessor_config.json`, else SigLIP's settings at the tower's own size. A processor
    /// whose size disagrees with the tower is an error (learned positions fix the size).
    pub fn for_tower(dir: &Path, image_size: usize) -> Result<Self> {
        let mut cfg = Self::from_dir(dir)?;
        let file = dir.join(PREPROCESSOR_CONFIG_FILE);
        if file.exists() {
            ensure!(
                cfg.height as usize == image_size && cfg.width as usize == image_size,
                "{}: resizes to {}×{}, but the vision tower takes {image_size}×{image_size} images",
                file.display(),
                cfg.height,
                cfg.width
            );
        } else {
            (cfg.height, cfg.width) = (image_size as u32, image_size as u32);
        }
        Ok(cfg)
    }

    /// Parses the JSON text of a `preprocessor_config.json`; keys it does not set keep the
    /// SigLIP defaults. `size` may be `{height, width}` or `{shortest_edge}` (taken as a square:
    /// kd-engine never crops, and a vision tower with learned positions needs a fixed size).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let json: Value = serde_json::from_str(text).context("invalid JSON")?;
        let obj = json.as_object().context("expected a JSON object")?;
        let mut cfg = Self::siglip();
        if let Some(size) = obj.get("size") {
            (cfg.height, cfg.width) = parse_size(size).context("bad `size`")?;
        }
        if let Some(v) = obj.get("image_mean") {
            cfg.mean = parse_channels(v).context("bad `image_mean`")?;
        }
        if let Some(v) = obj.get("image_std") {
            cfg.std = parse_channels(v).context("bad `image_std`")?;
            ensure!(
                cfg.std.iter().all(|&s| s != 0.0 && s.is_finite()),
                "`image_std` must be finite and non-zero"
            );
        }
        if let Some(v) = obj.get("rescale_factor") {
            cfg.rescale_factor = v.as_f64().context("`rescale_factor` must be a number")?;
        }
        if let Some(v) = obj.get("resample") {
            let code = v
                .as_i64()
                .context("`resample` must be an integer PIL filter code")?;
            cfg.resample = Resample::from_pil_code(code)?;
        }
        for (key, field) in [
            ("do_resize", &mut cfg.do_resize),
            ("do_rescale", &mut cfg.do_rescale),
            ("do_normalize", &mut cfg.do_normalize),
        ] {
            if let Some(v) = obj.get(key) {
                *field = v
                    .as_bool()
                    .with_context(|| format!("`{key}` must be true or false"))?;
            }
        }
        Ok(cfg)
    }

    /// Number of floats `preprocess` returns: 3 · height · width.
    pub fn output_len(&self) -> usize {
        3 * self.height as usize * self.width as usize
    }
}

fn parse_size(size: &Value) -> Result<(u32, u32)> {
    let dim = |key: &str| -> Result<Option<u32>> {
        match size.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                let n = v
                    .as_u64()
                    .with_context(|| format!("`{key}` must be a positive integer"))?;
                ensure!(n > 0 && n <= 16384, "`{key}` = {n} is out of range");
                Ok(Some(n as u32))
            }
        }
    };
    if let Some(n) = size.as_u64() {
        ensure!(n > 0 && n <= 16384, "size {n} is out of range");
        return Ok((n as u32, n as u32));
    }
    match (dim("height")?, dim("width")?, dim("shortest_edge")?) {
        (Some(h), Some(w), _) => Ok((h, w)),
        (None, None, Some(s)) => Ok((s, s)),
        _ => bail!("expected {{\"height\", \"width\"}} or {{\"shortest_edge\"}}, got {size}"),
    }
}

fn parse_channels(v: &Value) -> Result<[f32; 3]> {
    if let Some(x) = v.as_f64() {
        return Ok([x as f32; 3]);
    }
    let list = v
        .as_array()
        .context("expected a number or a list of 3 numbers")?;
    ensure!(
        list.len() == 3,
        "expected 3 values (RGB), got {}",
        list.len()
    );
    let mut out = [0f32; 3];
    for (o, x) in out.iter_mut().zip(list) {
        *o = x.as_f64().context("expected numbers")? as f32;
    }
    Ok(out)
}

/// Turns an RGB image into `pixel_values`: `[3, height, width]` floats, channel-major.
///
/// With `do_resize` off the image must already have the configured size (the vision tower's
/// position embeddings fix it), and a mismatch is an error rather than a silently wrong shape.
pub fn preprocess(image: &RgbImage, cfg: &ImageProcessorConfig) -> Result<Vec<f32>> {
    let resized;
    let image = if cfg.do_resize {
        resized = resize(image, cfg.width, cfg.height, cfg.resample)?;
        &resized
    } else {
        ensure!(
            (image.width(), image.height()) == (cfg.width, cfg.height),
            "image is {}x{} but the processor expects {}x{} and has do_resize off",
            image.width(),
            image.height(),
            cfg.width,
            cfg.height
        );
        image
    };
    let plane = cfg.height as usize * cfg.width as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in image.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            let mut x = if cfg.do_rescale {
                (px[c] as f64 * cfg.rescale_factor) as f32
            } else {
                px[c] as f32
            };
            if cfg.do_normalize {
                x = (x - cfg.mean[c]) / cfg.std[c];
            }
            out[c * plane + i] = x;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_siglip_so400m_config() {
        let text = r#"{"do_normalize": true, "do_rescale": true, "do_resize": true,
            "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
            "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor", "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384}}"#;
        assert_eq!(
            ImageProcessorConfig::from_json_str(text).unwrap(),
            ImageProcessorConfig::siglip()
        );
    }

    #[test]
    fn reads_clip_style_config() {
        let text = r#"{"size": {"shortest_edge": 336}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 2, "do_normalize": false}"#;
        let cfg = ImageProcessorConfig::from_json_str(text).unwrap();
        assert_eq!((cfg.height, cfg.width), (336, 336));
        assert_eq!(cfg.resample, Resample::Bilinear);
        assert!(!cfg.do_normalize);
        assert_eq!(cfg.mean[0], 0.48145466);
    }

    #[test]
    fn rejects_bad_configs() {
        for bad in [
            "[1]",
            r#"{"size": {"height": 384}}"#,
            r#"{"image_mean": [0.5, 0.5]}"#,
            r#"{"image_std": 0}"#,
            r#"{"resample": 9}"#,
            r#"{"do_resize": "yes"}"#,
            "{",
        ] {
            assert!(ImageProcessorConfig::from_json_str(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_file_gives_defaults() {
        let cfg = ImageProcessorConfig::from_dir(Path::new("/nonexistent/kd-engine")).unwrap();
        assert_eq!(cfg, ImageProcessorConfig::siglip());
    }

    #[test]
    fn layout_is_channel_major() {
        let img = RgbImage::new(2, 1, vec![0, 255, 51, 255, 0, 102]).unwrap();
        let cfg = ImageProcessorConfig {
            height: 1,
            width: 2,
            ..ImageProcessorConfig::siglip()
        };
        let v = preprocess(&img, &cfg).unwrap();
        let want = [-1.0, 1.0, 1.0, -1.0, -0.6, -0.2];
        assert!(
            v.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{v:?}"
        );
    }
}
