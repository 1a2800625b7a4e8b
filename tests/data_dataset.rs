//! The LLaVA dataset reader on a deliberately dirty dataset, the seeded shuffle, and packing.

use std::path::{Path, PathBuf};

use kd_engine::data::{
    collate, shuffled_indices, Dataset, DatasetOptions, EncodeOptions, EncodedSample, Group,
    ImageCheck, ImageProcessorConfig, SampleEncoder, SkipReason, Template,
};
use tokenizers::Tokenizer;

/// A word-level tokenizer with Qwen's end-of-text token, so these tests need no shared files.
const TINY_TOKENIZER: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [
    {"id": 1, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": null,
  "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<|endoftext|>": 1, "USER": 2, ":": 3, "ASSISTANT": 4,
    "a": 5, "cat": 6, "what": 7, "is": 8, "it": 9, "?": 10, ".": 11}, "unk_token": "<unk>"}
}"#;

const N_VISUAL: usize = 16;
const MAX_LEN: usize = 96;

fn encoder() -> SampleEncoder {
    let tokenizer: Tokenizer = TINY_TOKENIZER.parse().unwrap();
    SampleEncoder {
        template: Template::phi(),
        tokenizer,
        options: EncodeOptions {
            n_visual_tokens: N_VISUAL,
            visual_placeholder_id: 1,
            max_len: MAX_LEN,
        },
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kd-engine-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("images")).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture_image(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/data/images")
            .join(name),
    )
    .unwrap()
}

fn conv(q: &str, a: &str) -> String {
    format!(
        r#"[{{"from": "human", "value": {}}}, {{"from": "gpt", "value": {}}}]"#,
        serde_json::json!(q),
        serde_json::json!(a)
    )
}

/// Writes the images and returns the dirty records: (JSON text, expected skip reason or None).
fn dirty_records(dir: &Path) -> Vec<(String, Option<SkipReason>)> {
    let jpeg = fixture_image("rocket.jpg");
    std::fs::write(dir.join("images/rocket.jpg"), &jpeg).unwrap();
    std::fs::write(dir.join("images/cut.jpg"), &jpeg[..jpeg.len() * 2 / 3]).unwrap();
    std::fs::write(
        dir.join("images/grey.png"),
        fixture_image("camera_grey.png"),
    )
    .unwrap();
    std::fs::write(
        dir.join("images/palette.png"),
        fixture_image("coffee_palette.png"),
    )
    .unwrap();
    let long_question = "what is it ? ".repeat(40);
    vec![
        (format!(r#"{{"id": "good-jpeg", "image": "rocket.jpg", "conversations": {}}}"#, conv("<image>\nwhat is it?", "a cat.")), None),
        (format!(r#"{{"id": "good-grey", "image": "grey.png", "conversations": {}}}"#, conv("what is it? <image>", "a cat.")), None),
        (format!(r#"{{"id": 7, "image": ["palette.png"], "conversations": {}}}"#, conv("<image>", "a cat.")), None),
        (format!(r#"{{"id": "text-only", "conversations": {}}}"#, conv("what is it?", "a cat.")), None),
        (
            r#"{"id": "user-assistant", "conversations": [{"from": "user", "value": "what"}, {"from": "assistant", "value": "a"}, {"from": "human", "value": "is"}, {"from": "gpt", "value": "it"}]}"#.into(),
            None,
        ),
        (format!(r#"{{"id": "missing", "image": "nope.jpg", "conversations": {}}}"#, conv("<image>", "a cat.")), Some(SkipReason::MissingImage)),
        (format!(r#"{{"id": "truncated", "image": "cut.jpg", "conversations": {}}}"#, conv("<image>", "a cat.")), Some(SkipReason::CorruptImage)),
        (r#"{"id": "no-gpt", "conversations": [{"from": "human", "value": "what is it?"}]}"#.into(), Some(SkipReason::NoAnswer)),
        (
            r#"{"id": "role", "conversations": [{"from": "system", "value": "be nice"}, {"from": "gpt", "value": "a"}]}"#.into(),
            Some(SkipReason::UnknownRole),
        ),
        (
            format!(r#"{{"id": "two-tags", "image": "rocket.jpg", "conversations": {}}}"#, conv("<image> what <image>", "a cat.")),
            Some(SkipReason::TooManyImages),
        ),
        (
            r#"{"id": "two-images", "image": ["rocket.jpg", "grey.png"], "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}"#.into(),
            Some(SkipReason::TooManyImages),
        ),
        (
            format!(r#"{{"id": "overlong", "image": "rocket.jpg", "conversations": {}}}"#, conv(&format!("<image>\n{long_question}"), "a cat.")),
            Some(SkipReason::TooLong),
        ),
        (r#"{"id": "broken", "conversations": [{"from": "human", "#.into(), Some(SkipReason::BadJson)),
        (r#"{"id": "no-conversations", "image": "rocket.jpg"}"#.into(), Some(SkipReason::BadRecord)),
    ]
}

fn write_jsonl(dir: &Path, records: &[(String, Option<SkipReason>)]) -> PathBuf {
    let path = dir.join("data.jsonl");
    let text: Vec<&str> = records.iter().map(|(r, _)| r.as_str()).collect();
    std::fs::write(&path, text.join("\n") + "\n\n").unwrap();
    path
}

fn lenient(dir: &Path) -> DatasetOptions {
    DatasetOptions {
        image_folder: Some(dir.join("images")),
        max_skip_fraction: 1.0,
        ..DatasetOptions::default()
    }
}

#[test]
fn dirty_jsonl_keeps_every_good_sample_and_skips_every_bad_one() {
    let tmp = TempDir::new("dirty");
    let records = dirty_records(&tmp.0);
    let path = write_jsonl(&tmp.0, &records);
    let enc = encoder();
    let ds = Dataset::load(&path, &enc, &lenient(&tmp.0)).unwrap();
    let report = ds.report();
    println!("{report}");

    let good: Vec<&str> = ["good-jpeg", "good-grey", "7", "text-only", "user-assistant"].to_vec();
    let kept: Vec<&str> = ds
        .samples()
        .iter()
        .map(|s| s.id.as_deref().unwrap())
        .collect();
    assert_eq!(kept, good);
    assert_eq!(report.total, records.len());
    assert_eq!(report.kept, good.len());
    for reason in [
        SkipReason::MissingImage,
        SkipReason::CorruptImage,
        SkipReason::NoAnswer,
        SkipReason::UnknownRole,
        SkipReason::TooManyImages,
        SkipReason::TooLong,
        SkipReason::BadJson,
        SkipReason::BadRecord,
    ] {
        let want = records.iter().filter(|(_, r)| *r == Some(reason)).count();
        assert_eq!(report.count(reason), want, "{reason}");
    }
    assert_eq!(report.skipped(), records.len() - good.len());
    // The first few reasons are kept word for word, with where they are.
    assert_eq!(report.examples.len(), 5);
    assert!(
        report.examples[0].starts_with("line 6 (id missing): missing image"),
        "{}",
        report.examples[0]
    );
    assert!(
        report.examples[1].contains("line 7 (id truncated): corrupt image")
            && report.examples[1].contains("truncated")
    );
    let text = report.to_string();
    assert!(
        text.contains("kept 5 of 14 samples") && text.contains("1 bad JSON"),
        "{text}"
    );

    // Every kept sample encodes; the grey image decodes to three channels.
    let b = ds
        .load_batch(&[0, 1, 2, 3, 4], &enc, &ImageProcessorConfig::siglip())
        .unwrap();
    assert!(b.skipped.is_empty());
    assert_eq!(b.batch.images, [Some(0), Some(1), Some(2), None, None]);
    assert_eq!(b.batch.pixel_values.len(), 3);
    assert!(b
        .batch
        .pixel_values
        .iter()
        .all(|p| p.len() == 3 * 384 * 384));
    let grey = &b.batch.pixel_values[1];
    let plane = 384 * 384;
    assert!((0..plane).all(|i| grey[i] == grey[plane + i] && grey[i] == grey[2 * plane + i]));
}

#[test]
fn json_list_gives_the_same_samples() {
    let tmp = TempDir::new("list");
    let records: Vec<_> = dirty_records(&tmp.0)
        .into_iter()
        .filter(|(_, r)| *r != Some(SkipReason::BadJson))
        .collect();
    let path = tmp.0.join("data.json");
    let list: Vec<&str> = records.iter().map(|(r, _)| r.as_str()).collect();
    std::fs::write(&path, format!("\u{feff}[\n{}\n]", list.join(",\n"))).unwrap();
    let ds = Dataset::load(&path, &encoder(), &lenient(&tmp.0)).unwrap();
    assert_eq!(ds.len(), 5);
    assert_eq!(ds.report().skipped(), records.len() - 5);
    assert!(
        ds.report().examples[0].starts_with("item 6 (id missing)"),
        "{}",
        ds.report().examples[0]
    );

    // A JSON list that does not parse is one file-level error naming the file.
    std::fs::write(&path, "[{\"id\": 1}, {").unwrap();
    let err = format!(
        "{:#}",
        Dataset::load(&path, &encoder(), &lenient(&tmp.0)).unwrap_err()
    );
    assert!(
        err.contains("data.json") && err.contains("invalid JSON list"),
        "{err}"
    );
}

#[test]
fn too_many_skips_fail_with_a_clear_error() {
    let tmp = TempDir::new("fraction");
    let records = dirty_records(&tmp.0);
    let path = write_jsonl(&tmp.0, &records);
    let opts = DatasetOptions {
        image_folder: Some(tmp.0.join("images")),
        ..DatasetOptions::default()
    };
    assert_eq!(opts.max_skip_fraction, 0.1);
    let err = format!("{:#}", Dataset::load(&path, &encoder(), &opts).unwrap_err());
    assert!(
        err.contains("data.jsonl")
            && err.contains("skipped 9 of 14")
            && err.contains("max_skip_fraction"),
        "{err}"
    );
    assert!(err.contains("missing image"), "{err}");

    // 9 of 14 skipped is 64 %: a limit of 0.65 accepts it, 0.6 does not.
    let at = |f| DatasetOptions {
        max_skip_fraction: f,
        ..opts.clone()
    };
    assert!(Dataset::load(&path, &encoder(), &at(0.65)).is_ok());
    assert!(Dataset::load(&path, &encoder(), &at(0.6)).is_err());
}

#[test]
fn empty_and_all_bad_datasets_are_errors_naming_the_file() {
    let tmp = TempDir::new("empty");
    let path = tmp.0.join("empty.jsonl");
    std::fs::write(&path, "\n  \n").unwrap();
    let err = format!(
        "{:#}",
        Dataset::load(&path, &encoder(), &lenient(&tmp.0)).unwrap_err()
    );
    assert!(
        err.contains("empty.jsonl") && err.contains("empty"),
        "{err}"
    );

    std::fs::write(&path, "[]").unwrap();
    assert!(format!(
        "{:#}",
        Dataset::load(&path, &encoder(), &lenient(&tmp.0)).unwrap_err()
    )
    .contains("empty"));

    std::fs::write(&path, "{\"conversations\": []}\nnot json\n").unwrap();
    let err = format!(
        "{:#}",
        Dataset::load(&path, &encoder(), &lenient(&tmp.0)).unwrap_err()
    );
    assert!(
        err.contains("empty.jsonl") && err.contains("no usable sample"),
        "{err}"
    );

    let missing = tmp.0.join("absent.jsonl");
    let err = format!(
        "{:#}",
        Dataset::load(&missing, &encoder(), &lenient(&tmp.0)).unwrap_err()
    );
    assert!(
        err.contains("absent.jsonl") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn header_check_defers_corrupt_pixels_to_batch_time_without_failing() {
    let tmp = TempDir::new("header");
    let records = dirty_records(&tmp.0);
    let path = write_jsonl(&tmp.0, &records);
    let opts = DatasetOptions {
        image_check: ImageCheck::Header,
        ..lenient(&tmp.0)
    };
    let enc = encoder();
    let ds = Dataset::load(&path, &enc, &opts).unwrap();
    // The truncated JPEG's header is intact, so it passes the fast check...
    let idx = ds
        .samples()
        .iter()
        .position(|s| s.id.as_deref() == Some("truncated"))
        .unwrap();
    assert_eq!(ds.report().count(SkipReason::CorruptImage), 0);
    // ...and is skipped, with its reason, when its batch is built.
    let b = ds
        .load_batch(&[0, idx, 3], &enc, &ImageProcessorConfig::siglip())
        .unwrap();
    assert_eq!(b.batch.n_sequences(), 2);
    assert_eq!(b.skipped.len(), 1);
    assert_eq!(b.skipped[0].reason, SkipReason::CorruptImage);
    assert!(
        b.skipped[0].to_string().contains("cut.jpg"),
        "{}",
        b.skipped[0]
    );
    // An image deleted after loading is skipped the same way.
    std::fs::remove_file(tmp.0.join("images/rocket.jpg")).unwrap();
    let b = ds
        .load_batch(&[0, 3], &enc, &ImageProcessorConfig::siglip())
        .unwrap();
    assert_eq!(
        (b.batch.n_sequences(), b.skipped[0].reason),
        (1, SkipReason::MissingImage)
    );
    assert!(ds
        .load_batch(&[99], &enc, &ImageProcessorConfig::siglip())
        .is_err());
}

#[test]
fn shuffle_is_a_seeded_permutation_identical_everywhere() {
    // Expected orders computed independently in Python from SplitMix64 (Vigna's reference
    // constants), Lemire's multiply-and-reject bounded draw, and a descending Fisher–Yates.
    assert_eq!(shuffled_indices(10, 42), [8, 3, 6, 5, 4, 0, 9, 2, 1, 7]);
    assert_eq!(shuffled_indices(10, 43), [4, 9, 2, 1, 6, 0, 8, 3, 5, 7]);
    assert_eq!(
        shuffled_indices(20, 0),
        [18, 19, 5, 15, 11, 7, 9, 14, 6, 3, 12, 13, 10, 2, 4, 1, 16, 0, 8, 17]
    );
    for n in [0usize, 1, 2, 7, 1000] {
        let mut o = shuffled_indices(n, 9);
        assert_eq!(o, shuffled_indices(n, 9));
        o.sort_unstable();
        assert_eq!(o, (0..n).collect::<Vec<_>>());
    }
    assert_ne!(shuffled_indices(1000, 1), shuffled_indices(1000, 2));

    let tmp = TempDir::new("order");
    let path = write_jsonl(&tmp.0, &dirty_records(&tmp.0));
    let ds = Dataset::load(&path, &encoder(), &lenient(&tmp.0)).unwrap();
    assert_eq!(ds.order(5), shuffled_indices(5, 5));
}

#[test]
fn packed_collation_positions_and_lengths() {
    use Group::*;
    let s = |ids: Vec<u32>, groups: Vec<Group>, img| EncodedSample {
        ids,
        groups,
        has_image: img,
    };
    let batch = collate(vec![
        (
            s(vec![5, 1, 1], vec![Prompt, Visual, Visual], true),
            Some(vec![0.5; 6]),
        ),
        (s(vec![9], vec![Response], false), None),
        (
            s(
                vec![1, 1, 2, 3],
                vec![Visual, Visual, Prompt, Response],
                true,
            ),
            Some(vec![-0.5; 6]),
        ),
    ])
    .unwrap();
    assert_eq!(batch.ids, [5, 1, 1, 9, 1, 1, 2, 3]);
    assert_eq!(
        batch.groups,
        [Prompt, Visual, Visual, Response, Visual, Visual, Prompt, Response]
    );
    assert_eq!(batch.positions, [0, 1, 2, 0, 0, 1, 2, 3]);
    assert_eq!(batch.seq_lens, [3, 1, 4]);
    assert_eq!(batch.cu_seq_lens(), [0, 3, 4, 8]);
    assert_eq!(batch.images, [Some(0), None, Some(1)]);
    assert_eq!(batch.pixel_values, [vec![0.5; 6], vec![-0.5; 6]]);
    assert_eq!((batch.n_sequences(), batch.n_tokens()), (3, 8));

    let err = collate(vec![(s(vec![1], vec![Visual], true), None)]).unwrap_err();
    assert!(err.to_string().contains("has_image"), "{err}");
    assert!(collate(vec![(s(vec![1, 2], vec![Prompt], false), None)]).is_err());
    assert!(collate(vec![]).unwrap().ids.is_empty());
}

#[test]
fn batches_from_the_dataset_pack_each_encoded_sample() {
    let tmp = TempDir::new("batch");
    let path = write_jsonl(&tmp.0, &dirty_records(&tmp.0));
    let enc = encoder();
    let ds = Dataset::load(&path, &enc, &lenient(&tmp.0)).unwrap();
    let order = ds.order(3);
    let b = ds
        .load_batch(&order, &enc, &ImageProcessorConfig::siglip())
        .unwrap()
        .batch;
    let mut offset = 0;
    for (k, &i) in order.iter().enumerate() {
        let e = enc.encode(&ds.samples()[i]).unwrap();
        assert_eq!(b.seq_lens[k], e.len());
        assert_eq!(&b.ids[offset..offset + e.len()], &e.ids[..]);
        assert_eq!(&b.groups[offset..offset + e.len()], &e.groups[..]);
        assert_eq!(b.images[k].is_some(), ds.samples()[i].image.is_some());
        if e.has_image {
            assert_eq!(
                e.groups.iter().filter(|&&g| g == Group::Visual).count(),
                N_VISUAL
            );
        }
        assert!(e.n_response() > 0 && e.len() <= MAX_LEN);
        offset += e.len();
    }
    assert_eq!(offset, b.n_tokens());
}

/// A PNG that declares `width`×`height` 8-bit grey pixels in its header; its pixel data is a
/// few bytes (a decoder must refuse the file from its header).
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    };
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit greyscale, no interlace
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    png
}

#[test]
fn decompression_bombs_and_non_utf8_lines_are_skipped_with_their_reason() {
    let tmp = TempDir::new("bomb");
    // 14000 × 13000 = 182 M pixels: above PIL's limit (178,956,970), 182 MB of grey pixels.
    let bomb = png_header_only(14_000, 13_000);
    std::fs::write(tmp.0.join("images/bomb.png"), &bomb).unwrap();
    std::fs::write(tmp.0.join("images/rocket.jpg"), fixture_image("rocket.jpg")).unwrap();
    let e = kd_engine::data::decode_rgb(&bomb).unwrap_err();
    assert!(e.downcast_ref::<kd_engine::data::ImageTooLarge>().is_some(), "{e:#}");
    assert!(format!("{e:#}").contains("decompression-bomb limit"), "{e:#}");

    let mut text = Vec::new();
    text.extend_from_slice(format!(r#"{{"id": "good", "image": "rocket.jpg", "conversations": {}}}"#, conv("<image>\nwhat is it?", "a cat.")).as_bytes());
    text.push(b'\n');
    text.extend_from_slice(format!(r#"{{"id": "bomb", "image": "bomb.png", "conversations": {}}}"#, conv("<image>", "a cat.")).as_bytes());
    text.push(b'\n');
    text.extend_from_slice(b"{\"id\": \"latin1\", \"conversations\": [{\"from\": \"human\", \"value\": \"caf\xe9\"}]}\n");
    text.extend_from_slice(format!(r#"{{"id": "text", "conversations": {}}}"#, conv("what is it?", "a cat.")).as_bytes());
    let path = tmp.0.join("data.jsonl");
    std::fs::write(&path, text).unwrap();
    for check in [ImageCheck::Decode, ImageCheck::Header] {
        let ds = Dataset::load(&path, &encoder(), &DatasetOptions { image_check: check, ..lenient(&tmp.0) }).unwrap();
        let report = ds.report();
        assert_eq!((report.kept, report.count(SkipReason::ImageTooLarge), report.count(SkipReason::BadJson)), (2, 1, 1), "{check:?}: {report}");
        assert!(report.examples.iter().any(|e| e.starts_with("line 3") && e.contains("UTF-8")), "{report:?}");
        assert!(report.to_string().contains("1 image too large"), "{report}");
    }
}
