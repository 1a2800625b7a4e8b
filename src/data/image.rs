//! Image decoding that reproduces PIL's `Image.open(f).convert("RGB")`.
//!
//! Upstream (LLaVA-KD / TinyLLaVA) feeds every image through PIL before the SigLIP processor, so
//! the pixels the vision tower sees are PIL's. The `image` crate decodes the files; this module
//! then applies PIL's conversion rules, which differ from the crate's own `to_rgb8` in ways that
//! change pixels:
//!
//! * alpha is dropped, never composited (a transparent pixel keeps its stored colour);
//! * palette images are expanded through the palette (a transparent index keeps its colour);
//! * greyscale is repeated into three channels;
//! * 16-bit greyscale (PIL mode `I;16`) is clipped to 255, not scaled (PIL converts `I;16` to 8
//!   bits by saturation), while 16-bit colour and grey+alpha keep the high byte (PIL reads them
//!   with the `;16B` raw modes, which take the most significant byte);
//! * animated GIFs give their first frame; EXIF orientation is ignored (PIL's `open` does not
//!   rotate, and neither does the processor).
//!
//! An image of more pixels than PIL accepts (its decompression-bomb limit, [`MAX_IMAGE_PIXELS`])
//! is refused from its header, before any pixel is decoded ([`ImageTooLarge`]).
//!
//! A decoder that fills in missing data instead of failing would hide a truncated file, so JPEG
//! streams are also checked structurally for their end-of-image marker (PIL raises "image file
//! is truncated" there).
//!
//! Known differences that remain: JPEG pixels come from another IDCT and chroma upsampler than
//! libjpeg-turbo's (a few levels per channel: mean 0.2-0.3, max 3 on the test fixtures); CMYK
//! JPEGs are converted by the crate, not by PIL's formula; a GIF whose first frame does not cover
//! the whole logical screen has the uncovered area black here, PIL's background colour there.

use std::fs;
use std::io::Cursor;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

/// PIL raises `DecompressionBombError` above twice `Image.MAX_IMAGE_PIXELS` (89,478,485).
pub const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// An image whose header declares more than [`MAX_IMAGE_PIXELS`] pixels (a decompression bomb).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTooLarge {
    pub width: u32,
    pub height: u32,
}

impl std::fmt::Display for ImageTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the image is {}x{} = {} pixels, more than PIL's decompression-bomb limit of {MAX_IMAGE_PIXELS} pixels; not decoded",
            self.width,
            self.height,
            self.width as u64 * self.height as u64
        )
    }
}

impl std::error::Error for ImageTooLarge {}

/// Refuses a size beyond [`MAX_IMAGE_PIXELS`] (read from a header, before decoding).
pub fn check_image_size(width: u32, height: u32) -> Result<()> {
    if width as u64 * height as u64 > MAX_IMAGE_PIXELS {
        return Err(ImageTooLarge { width, height }.into());
    }
    Ok(())
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel, no padding.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

/// Shows the size only: a failed assertion should not print a million pixel values.
impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

impl RgbImage {
    /// Wraps `data` (row-major RGB, `3 * width * height` bytes).
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Result<Self> {
        ensure!(
            width > 0 && height > 0,
            "image has an empty size {width}x{height}"
        );
        let expected = 3 * width as usize * height as usize;
        ensure!(
            data.len() == expected,
            "RGB image {width}x{height} needs {expected} bytes, got {}",
            data.len()
        );
        Ok(Self {
            width,
            height,
            data,
        })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// The pixels, row-major, `[R, G, B]` per pixel.
    pub fn as_raw(&self) -> &[u8] {
        &self.data
    }

    pub fn into_raw(self) -> Vec<u8> {
        self.data
    }
}

/// Reads and decodes an image file as PIL's `Image.open(path).convert("RGB")` would.
///
/// Errors name the file and say whether it is missing, unreadable, of an unsupported format,
/// truncated or corrupt.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes =
        fs::read(path).with_context(|| format!("cannot read image file {}", path.display()))?;
    decode_rgb(&bytes).with_context(|| format!("cannot decode image {}", path.display()))
}

/// Decodes an in-memory JPEG, PNG or GIF (format sniffed from the bytes, not a file name).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    ensure!(!bytes.is_empty(), "the file is empty");
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .context("cannot sniff the image format")?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Gif)) => f,
        Some(other) => bail!("unsupported image format {other:?} (supported: JPEG, PNG, GIF)"),
        None => bail!("not a recognised image format (supported: JPEG, PNG, GIF)"),
    };
    if format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes)?;
    }
    // The reader keeps the crate's default memory limits, so a decompression bomb is an error.
    let decoder = reader
        .into_decoder()
        .with_context(|| format!("corrupt {format:?} header"))?;
    let (width, height) = decoder.dimensions();
    check_image_size(width, height)?;
    let original = decoder.original_color_type();
    let image = DynamicImage::from_decoder(decoder)
        .with_context(|| format!("corrupt or truncated {format:?} data"))?;
    to_rgb_like_pil(image, original)
}

/// Applies PIL's `convert("RGB")` rules to a decoded image (see the module docs).
fn to_rgb_like_pil(image: DynamicImage, original: image::ExtendedColorType) -> Result<RgbImage> {
    let (width, height) = (image.width(), image.height());
    let n = width as usize * height as usize;
    let mut rgb = Vec::with_capacity(3 * n);
    match image {
        DynamicImage::ImageRgb8(buf) => rgb = buf.into_raw(),
        DynamicImage::ImageRgba8(buf) => {
            for px in buf.as_raw().chunks_exact(4) {
                rgb.extend_from_slice(&px[..3]);
            }
        }
        DynamicImage::ImageLuma8(buf) => {
            for &l in buf.as_raw() {
                rgb.extend_from_slice(&[l, l, l]);
            }
        }
        DynamicImage::ImageLumaA8(buf) => {
            for px in buf.as_raw().chunks_exact(2) {
                rgb.extend_from_slice(&[px[0], px[0], px[0]]);
            }
        }
        DynamicImage::ImageLuma16(buf) => {
            for &l in buf.as_raw() {
                let v = l.min(255) as u8;
                rgb.extend_from_slice(&[v, v, v]);
            }
        }
        DynamicImage::ImageLumaA16(buf) => {
            // A 16-bit grey PNG with a tRNS chunk arrives here with alpha added by the decoder;
            // PIL opens it as plain `I;16` (clipped), a true grey+alpha PNG as `LA` (high byte).
            let clip = original == image::ExtendedColorType::L16;
            for px in buf.as_raw().chunks_exact(2) {
                let v = if clip {
                    px[0].min(255) as u8
                } else {
                    (px[0] >> 8) as u8
                };
                rgb.extend_from_slice(&[v, v, v]);
            }
        }
        DynamicImage::ImageRgb16(buf) => rgb.extend(buf.as_raw().iter().map(|&v| (v >> 8) as u8)),
        DynamicImage::ImageRgba16(buf) => {
            for px in buf.as_raw().chunks_exact(4) {
                rgb.extend(px[..3].iter().map(|&v| (v >> 8) as u8));
            }
        }
        other => bail!("unsupported pixel layout {:?}", other.color()),
    }
    RgbImage::new(width, height, rgb)
}

/// Fails unless the JPEG stream runs from SOI through its scans to an EOI marker.
///
/// The JPEG decoder pads a truncated scan with grey instead of failing, and PIL refuses such a
/// file ("image file is truncated"); a training sample built from half an image is worse than a
/// skipped one. Segments are walked by their lengths (so thumbnails inside EXIF are skipped), and
/// entropy-coded data is scanned for the next real marker (0xFF followed by neither a stuffed
/// 0x00 nor a restart marker). Bytes after EOI are allowed, as PIL allows them.
fn check_jpeg_complete(bytes: &[u8]) -> Result<()> {
    ensure!(
        bytes.len() >= 2 && bytes[0] == 0xFF && bytes[1] == 0xD8,
        "corrupt JPEG: it does not start with an SOI marker"
    );
    let truncated = || {
        anyhow::anyhow!(
            "JPEG file is truncated ({} bytes, no end-of-image marker)",
            bytes.len()
        )
    };
    let mut i = 2;
    loop {
        // Markers may be preceded by any number of 0xFF fill bytes.
        if i >= bytes.len() {
            return Err(truncated());
        }
        ensure!(
            bytes[i] == 0xFF,
            "corrupt JPEG: expected a marker at byte {i}, found {:#04x}",
            bytes[i]
        );
        while i < bytes.len() && bytes[i] == 0xFF {
            i += 1;
        }
        let marker = *bytes.get(i).ok_or_else(truncated)?;
        i += 1;
        match marker {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD7 => continue, // stand-alone markers without a length
            _ => {}
        }
        let len_bytes = bytes.get(i..i + 2).ok_or_else(truncated)?;
        let len = u16::from_be_bytes([len_bytes[0], len_bytes[1]]) as usize;
        ensure!(
            len >= 2,
            "corrupt JPEG: segment {marker:#04x} at byte {i} has length {len}"
        );
        i += len;
        if i > bytes.len() {
            return Err(truncated());
        }
        if marker == 0xDA {
            // Entropy-coded data follows the scan header up to the next non-restart marker.
            loop {
                let pos = bytes[i..]
                    .iter()
                    .position(|&b| b == 0xFF)
                    .ok_or_else(truncated)?;
                i += pos;
                let next = *bytes.get(i + 1).ok_or_else(truncated)?;
                if next == 0x00 || (0xD0..=0xD7).contains(&next) {
                    i += 2;
                } else if next == 0xFF {
                    i += 1;
                } else {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_structure_check_accepts_complete_and_rejects_cut_streams() {
        // SOI, APP0 (len 4), SOS header (len 3), entropy data with a stuffed FF00 and RST0, EOI.
        let good = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0xAA, 0xBB, 0xFF, 0xDA, 0x00, 0x03, 0x01, 0x12,
            0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56, 0xFF, 0xD9,
        ];
        check_jpeg_complete(&good).unwrap();
        let mut trailing = good.to_vec();
        trailing.extend_from_slice(b"junk");
        check_jpeg_complete(&trailing).unwrap();
        for cut in 2..good.len() - 1 {
            let err = check_jpeg_complete(&good[..cut]).unwrap_err().to_string();
            assert!(
                err.contains("truncated") || err.contains("corrupt"),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn rgb_image_rejects_wrong_sizes() {
        assert!(RgbImage::new(2, 2, vec![0; 12]).is_ok());
        assert!(RgbImage::new(2, 2, vec![0; 11]).is_err());
        assert!(RgbImage::new(0, 2, vec![]).is_err());
    }
}
