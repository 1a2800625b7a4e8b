//! Chat templates against ids and groups computed in Python with TinyLLaVA's own algorithm
//! (`tests/fixtures/make_data_fixtures.py`) on the real Qwen tokenizer.
//!
//! The Qwen `tokenizer.json` (7 MB) is not copied into the repository: these tests read it from
//! `../shared/data/qwen2-tokenizer/` and are reported as skipped (in the summary line) when it is
//! absent: this file runs on the harness of `tests/common/harness.rs`.

use std::path::{Path, PathBuf};

use kd_engine::data::{
    load_tokenizer, EncodeErrorKind, EncodeOptions, Group, Role, Template, Turn,
};
use serde_json::Value;
use tokenizers::Tokenizer;

#[path = "common/harness.rs"]
mod harness;
use harness::{Outcome, Test};

/// The real Qwen tokenizer, or why the test cannot run here.
fn qwen_tokenizer() -> Result<Tokenizer, String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/qwen2-tokenizer/tokenizer.json");
    if !path.exists() {
        return Err(format!("needs the Qwen tokenizer, {} is absent", path.display()));
    }
    Ok(load_tokenizer(&path).unwrap())
}

fn fixture(name: &str) -> Value {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/data/template_{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn turns(case: &Value) -> Vec<Turn> {
    case["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            Turn::new(
                Role::parse(t["from"].as_str().unwrap()).unwrap(),
                t["value"].as_str().unwrap(),
            )
        })
        .collect()
}

fn check_case(name: &str) -> Outcome {
    let tok = match qwen_tokenizer() {
        Ok(t) => t,
        Err(why) => return Outcome::Skipped(why),
    };
    let case = fixture(name);
    let template = Template::builtin(case["template"].as_str().unwrap()).unwrap();
    let opts = EncodeOptions {
        n_visual_tokens: case["n_visual_tokens"].as_u64().unwrap() as usize,
        visual_placeholder_id: case["visual_placeholder_id"].as_u64().unwrap() as u32,
        max_len: case["max_len"].as_u64().unwrap() as usize,
    };
    let has_image = case["prompt"].as_str().unwrap().contains("<image>");
    let got = template
        .encode(&turns(&case), has_image, &tok, &opts)
        .unwrap();
    let want_ids: Vec<u32> = case["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want_groups: Vec<Group> = case["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| Group::from_name(v.as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(got.ids, want_ids, "{name}: ids");
    assert_eq!(got.groups, want_groups, "{name}: groups");
    assert_eq!(got.has_image, has_image);
    let response: Vec<u32> = got
        .ids
        .iter()
        .zip(&got.groups)
        .filter(|(_, g)| **g == Group::Response)
        .map(|(i, _)| *i)
        .collect();
    let text = tok.decode(&response, false).unwrap();
    assert_eq!(
        text,
        case["response_text"].as_str().unwrap(),
        "{name}: response text"
    );
    println!(
        "{name}: {} positions match ({} response, response text {text:?})",
        got.len(),
        got.n_response()
    );
    Outcome::Passed
}

fn phi_two_turn_with_image_matches_tinyllava() -> Outcome {
    check_case("phi_two_turn")
}

fn phi_text_only_digits_and_newlines_match_tinyllava() -> Outcome {
    check_case("phi_text_digits")
}

fn pretrain_caption_matches_tinyllava() -> Outcome {
    check_case("pretrain")
}

fn truncation_with_the_real_tokenizer() -> Outcome {
    let tok = match qwen_tokenizer() {
        Ok(t) => t,
        Err(why) => return Outcome::Skipped(why),
    };
    let case = fixture("phi_two_turn");
    let t = Template::phi();
    let full = t
        .encode(
            &turns(&case),
            true,
            &tok,
            &EncodeOptions {
                n_visual_tokens: 5,
                visual_placeholder_id: 0,
                max_len: 2048,
            },
        )
        .unwrap();
    let first_response = full
        .groups
        .iter()
        .position(|&g| g == Group::Response)
        .unwrap();
    let first_visual = full
        .groups
        .iter()
        .position(|&g| g == Group::Visual)
        .unwrap();
    let opts = |max_len| EncodeOptions {
        n_visual_tokens: 5,
        visual_placeholder_id: 0,
        max_len,
    };

    // Cut after the first response token: kept, tail gone, prefix unchanged.
    let cut = t
        .encode(&turns(&case), true, &tok, &opts(first_response + 1))
        .unwrap();
    assert_eq!(cut.ids[..], full.ids[..first_response + 1]);
    assert_eq!(cut.n_response(), 1);
    // Cut just before it: no target left.
    let err = t
        .encode(&turns(&case), true, &tok, &opts(first_response))
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<kd_engine::data::EncodeError>()
            .unwrap()
            .kind,
        EncodeErrorKind::TooLong
    );
    // Cut inside the visual block.
    let err = t
        .encode(&turns(&case), true, &tok, &opts(first_visual + 2))
        .unwrap_err();
    assert!(format!("{err}").contains("visual"), "{err}");
    Outcome::Passed
}

fn generation_prompt_ends_at_assistant_colon() -> Outcome {
    let tok = match qwen_tokenizer() {
        Ok(t) => t,
        Err(why) => return Outcome::Skipped(why),
    };
    let opts = EncodeOptions {
        n_visual_tokens: 3,
        visual_placeholder_id: 7,
        max_len: 2048,
    };
    let p = Template::phi()
        .encode_generation_prompt(
            &[Turn::new(Role::User, "<image>\nWhat is this?")],
            true,
            &tok,
            &opts,
        )
        .unwrap();
    assert!(p.groups.iter().all(|&g| g != Group::Response));
    assert_eq!(p.groups.iter().filter(|&&g| g == Group::Visual).count(), 3);
    let text = tok.decode(&p.ids, false).unwrap();
    assert!(
        text.ends_with(" USER: (((\nWhat is this? ASSISTANT:"),
        "{text:?}"
    );
    Outcome::Passed
}

/// A word-level tokenizer with `<s>`/`</s>` for the LLaMA template (no LLaMA vocabulary ships
/// with the tests); the Whitespace pre-tokenizer drops spaces, so offsets still locate answers.
const TINY_TOKENIZER: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [
    {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": null,
  "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "USER": 3, ":": 4, "ASSISTANT": 5,
    "hi": 6, "hello": 7, "there": 8, ".": 9}, "unk_token": "<unk>"}
}"#;

fn llama_template_has_bos_and_eos_targets() {
    let tok: Tokenizer = TINY_TOKENIZER.parse().unwrap();
    let opts = EncodeOptions {
        n_visual_tokens: 2,
        visual_placeholder_id: 0,
        max_len: 2048,
    };
    let s = Template::llama()
        .encode(
            &[
                Turn::new(Role::User, "hi <image>"),
                Turn::new(Role::Assistant, "hello there."),
            ],
            true,
            &tok,
            &opts,
        )
        .unwrap();
    assert_eq!(s.ids[0], 1, "BOS first");
    let tail: Vec<(u32, Group)> = s
        .ids
        .iter()
        .copied()
        .zip(s.groups.iter().copied())
        .rev()
        .take(5)
        .collect();
    use Group::*;
    assert_eq!(
        tail,
        [
            (2, Response),
            (9, Response),
            (8, Response),
            (7, Response),
            (4, Prompt)
        ]
    );
    assert_eq!(s.groups.iter().filter(|&&g| g == Visual).count(), 2);
    assert_eq!(s.groups[0], Prompt);
}

fn llama_template_without_bos_token_is_an_error() {
    let tok: Tokenizer = TINY_TOKENIZER.replace("\"<s>\": 1, ", "").replace(
        r#"{"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},"#,
        "",
    )
    .parse()
    .unwrap();
    let opts = EncodeOptions {
        n_visual_tokens: 2,
        visual_placeholder_id: 0,
        max_len: 2048,
    };
    let err = Template::llama()
        .encode(
            &[
                Turn::new(Role::User, "hi"),
                Turn::new(Role::Assistant, "hello"),
            ],
            false,
            &tok,
            &opts,
        )
        .unwrap_err();
    assert!(format!("{err}").contains("BOS"), "{err}");
}

fn tokenizer_folder_with_only_sentencepiece_model_explains_conversion() {
    let dir = std::env::temp_dir().join(format!("kd-engine-spm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.model"), b"spm").unwrap();
    let err = format!("{:#}", load_tokenizer(&dir).unwrap_err());
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        err.contains("tokenizer.model") && err.contains("save_pretrained"),
        "{err}"
    );
}

fn main() {
    harness::run(&[
        Test { name: "phi_two_turn_with_image_matches_tinyllava", run: phi_two_turn_with_image_matches_tinyllava },
        Test { name: "phi_text_only_digits_and_newlines_match_tinyllava", run: phi_text_only_digits_and_newlines_match_tinyllava },
        Test { name: "pretrain_caption_matches_tinyllava", run: pretrain_caption_matches_tinyllava },
        Test { name: "truncation_with_the_real_tokenizer", run: truncation_with_the_real_tokenizer },
        Test { name: "generation_prompt_ends_at_assistant_colon", run: generation_prompt_ends_at_assistant_colon },
        Test { name: "llama_template_has_bos_and_eos_targets", run: || {
            llama_template_has_bos_and_eos_targets();
            Outcome::Passed
        } },
        Test { name: "llama_template_without_bos_token_is_an_error", run: || {
            llama_template_without_bos_token_is_an_error();
            Outcome::Passed
        } },
        Test { name: "tokenizer_folder_with_only_sentencepiece_model_explains_conversion", run: || {
            tokenizer_folder_with_only_sentencepiece_model_explains_conversion();
            Outcome::Passed
        } },
    ]);
}
