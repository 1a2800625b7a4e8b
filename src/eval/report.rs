//! The side-by-side answer report of `kd-engine compare` (a paper Figure A1 for any set of
//! models): one self-contained HTML page, images embedded as base64 `data:` URIs and every piece
//! of text escaped, so the file can be mailed or archived and still shows everything.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

/// One row of the report.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportItem {
    pub id: String,
    /// A `data:` URI of the image, or `None` for a text-only question.
    pub image: Option<String>,
    pub question: String,
    /// Reference answers, possibly none.
    pub references: Vec<String>,
    /// One answer per model, in the order of the report's model names; with the credit the
    /// metric gave it when the report was scored.
    pub answers: Vec<(String, Option<f64>)>,
}

/// A report: model names, their overall scores if scored, and the rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub title: String,
    pub models: Vec<String>,
    /// `(metric name, one score per model)`.
    pub scores: Option<(String, Vec<f64>)>,
    pub items: Vec<ReportItem>,
}

/// Text made safe for HTML element content and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ABC[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The MIME type of image bytes that browsers show as they are, from their magic numbers.
fn browser_image_type(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// An image file as a `data:` URI: PNG, JPEG, GIF and WebP bytes as they are; anything else the
/// data pipeline can decode is re-encoded as PNG.
pub fn image_data_uri(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    if let Some(mime) = browser_image_type(&bytes) {
        return Ok(format!("data:{mime};base64,{}", base64(&bytes)));
    }
    let img = crate::data::decode_rgb(&bytes).with_context(|| format!("image {}", path.display()))?;
    let png = crate::data::synthetic::encode_png(&img)?;
    Ok(format!("data:image/png;base64,{}", base64(&png)))
}

const STYLE: &str = "
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px 0; }
p.meta { color: #555; margin: 0 0 16px 0; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
th, td { border: 1px solid #ccc; padding: 8px; vertical-align: top; text-align: left; overflow-wrap: anywhere; }
th { background: #f2f2f2; }
td.image img { width: 100%; max-width: 260px; image-rendering: auto; display: block; }
td.image { width: 270px; }
.qid { color: #777; font-size: 12px; }
.question { font-weight: 600; white-space: pre-wrap; }
.reference { color: #225; margin-top: 6px; }
.answer { white-space: pre-wrap; }
td.right { background: #e8f6e8; }
td.wrong { background: #fbeaea; }
.credit { color: #555; font-size: 12px; }
";

impl Report {
    /// The page.
    pub fn to_html(&self) -> String {
        let mut h = String::new();
        let e = escape_html;
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
            e(&self.title),
            e(&self.title)
        );
        let _ = write!(h, "<p class=\"meta\">{} questions; models: {}", self.items.len(), e(&self.models.join(", ")));
        if let Some((metric, scores)) = &self.scores {
            let parts: Vec<String> = self.models.iter().zip(scores).map(|(m, s)| format!("{} {:.1} %", e(m), 100.0 * s)).collect();
            let _ = write!(h, "; {} score: {}", e(metric), parts.join(", "));
        }
        h.push_str("</p>\n<table>\n<thead><tr><th class=\"image\">image</th><th>question</th>");
        for m in &self.models {
            let _ = write!(h, "<th>{}</th>", e(m));
        }
        h.push_str("</tr></thead>\n<tbody>\n");
        for it in &self.items {
            h.push_str("<tr>");
            match &it.image {
                Some(uri) => {
                    let _ = write!(h, "<td class=\"image\"><img src=\"{}\" alt=\"image of {}\"></td>", e(uri), e(&it.id));
                }
                None => h.push_str("<td class=\"image\">(no image)</td>"),
            }
            let _ = write!(h, "<td><div class=\"qid\">{}</div><div class=\"question\">{}</div>", e(&it.id), e(&it.question));
            if !it.references.is_empty() {
                let _ = write!(h, "<div class=\"reference\">reference: {}</div>", e(&it.references.join(" | ")));
            }
            h.push_str("</td>");
            for (text, credit) in &it.answers {
                let class = match credit {
                    Some(c) if *c > 0.0 => " class=\"right\"",
                    Some(_) => " class=\"wrong\"",
                    None => "",
                };
                let _ = write!(h, "<td{class}><div class=\"answer\">{}</div>", e(text));
                if let Some(c) = credit {
                    let _ = write!(h, "<div class=\"credit\">score {c:.2}</div>");
                }
                h.push_str("</td>");
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</tbody>\n</table>\n</body>\n</html>\n");
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (raw, enc) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
        assert_eq!(base64(&[0xFF, 0xFE, 0xFD]), "//79");
    }

    #[test]
    fn escaping() {
        assert_eq!(escape_html("<b>\"x\" & 'y'</b>"), "&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/b&gt;");
    }
}
