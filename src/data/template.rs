//! Chat templates: turning a LLaVA conversation into token ids and per-position groups.
//!
//! A template is data (system text, user/assistant/image formats, end-of-turn string, BOS), so a
//! new model family needs a new value, not new code. Encoding follows TinyLLaVA, which LLaVA-KD
//! trains with:
//!
//! * the `<image>` tag is moved to the start of the first user turn (`<image>\n` + question for
//!   `phi`), and the text on each side of it is tokenised separately (TinyLLaVA's
//!   `tokenizer_image_token`), so no token spans the image;
//! * the image becomes `n_visual_tokens` positions of group [`Group::Visual`] holding a
//!   placeholder id; the model overwrites those rows with projected image features;
//! * the training targets ([`Group::Response`]) are each answer plus its end-of-turn string. The
//!   space between `ASSISTANT:` and the answer belongs to the answer's first token (`ASSISTANT: a
//!   cat` tokenises as `:`, ` a`, ` cat`), so the target starts at that token, as TinyLLaVA's
//!   label masking (instruction length − 1) makes it.
//!
//! Groups are assigned from byte offsets: the whole side of the image is tokenised as one text
//! (exactly TinyLLaVA's ids), and a token is a response token when it starts inside an answer's
//! span (the whitespace before the answer, the answer, its end-of-turn string).
//!
//! Labels are not stored: position `j` is a cross-entropy target iff `groups[j] == Response`;
//! the loss shifts (row `j − 1` predicts token `j`).

use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tokenizers::Tokenizer;

/// The literal that marks where the image goes in LLaVA conversations.
pub const IMAGE_TAG: &str = "<image>";

/// Default maximum sequence length after splicing the visual tokens (SPEC §1).
pub const DEFAULT_MAX_LEN: usize = 2048;

/// Why a conversation cannot be encoded; the dataset reader counts skipped samples by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EncodeErrorKind {
    /// A `from` field that is none of human/user/gpt/assistant.
    UnknownRole,
    /// No answer at all, or a final question without one.
    NoAnswer,
    /// Turns that do not alternate human/gpt, or an empty conversation.
    BadTurnOrder,
    /// More than one `<image>` tag.
    TooManyImages,
    /// An `<image>` tag in a sample without an image, or inside an answer.
    MisplacedImageTag,
    /// Longer than `max_len` in a way truncation cannot fix.
    TooLong,
}

impl EncodeErrorKind {
    pub fn describe(self) -> &'static str {
        match self {
            Self::UnknownRole => "unknown role",
            Self::NoAnswer => "no answer",
            Self::BadTurnOrder => "bad turn order",
            Self::TooManyImages => "more than one image",
            Self::MisplacedImageTag => "misplaced <image> tag",
            Self::TooLong => "too long",
        }
    }
}

/// A conversation that cannot be encoded, with its kind (find it with
/// `anyhow::Error::downcast_ref::<EncodeError>()`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodeError {
    pub kind: EncodeErrorKind,
    pub message: String,
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for EncodeError {}

/// Returns early with an [`EncodeError`] of the given kind unless the condition holds.
macro_rules! require {
    ($cond:expr, $kind:ident, $($fmt:tt)+) => {
        if !$cond {
            return Err(EncodeError { kind: EncodeErrorKind::$kind, message: format!($($fmt)+) }.into());
        }
    };
}

/// What a sequence position is; the losses select rows by group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Group {
    /// Padding: no token, no loss (packed batches have none; padded layouts use it).
    Pad = 0,
    /// Prompt text: system, questions, role markers. Not a target of L_ce.
    Prompt = 1,
    /// A visual token: its row is replaced by a projected image feature.
    Visual = 2,
    /// An answer token or its end-of-turn token: a target of L_ce and L_res.
    Response = 3,
}

impl Group {
    /// Lower-case name, as the fixtures and logs write it.
    pub fn name(self) -> &'static str {
        match self {
            Group::Pad => "pad",
            Group::Prompt => "prompt",
            Group::Visual => "visual",
            Group::Response => "response",
        }
    }

    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "pad" => Group::Pad,
            "prompt" => Group::Prompt,
            "visual" => Group::Visual,
            "response" => Group::Response,
            other => bail!("unknown group {other:?}"),
        })
    }
}

/// Who speaks a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    /// LLaVA's `from` field: `human`/`user` or `gpt`/`assistant` (any letter case).
    pub fn parse(from: &str) -> Result<Self> {
        match from.to_ascii_lowercase().as_str() {
            "human" | "user" => Ok(Role::User),
            "gpt" | "assistant" => Ok(Role::Assistant),
            _ => Err(EncodeError {
                kind: EncodeErrorKind::UnknownRole,
                message: format!(
                    "unknown role {from:?} (expected \"human\"/\"user\" or \"gpt\"/\"assistant\")"
                ),
            }
            .into()),
        }
    }
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub text: String,
}

impl Turn {
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            text: text.into(),
        }
    }
}

/// A chat template as data. Formats hold one `{content}` placeholder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub name: String,
    /// Token text prepended once (LLaMA's `<s>`), or `None`.
    pub bos: Option<String>,
    /// System prompt, emitted once before the first user turn ("" for none).
    pub system: String,
    /// Placed between the system prompt and the first user turn.
    pub separator: String,
    /// Wraps each user turn, e.g. `"USER: {content} "`.
    pub user_format: String,
    /// Wraps the first user turn's text when the sample has an image, e.g. `"<image>\n{content}"`;
    /// must contain [`IMAGE_TAG`].
    pub image_format: String,
    /// `false` drops the user's text (the `pretrain` template keeps only the image).
    pub keep_user_text: bool,
    /// Wraps each answer, e.g. `"ASSISTANT: {content}"`. The target starts at `{content}`,
    /// extended back over the whitespace right before it (it joins the answer's first token).
    pub assistant_format: String,
    /// Appended to each answer and part of the target, e.g. `"<|endoftext|>"`.
    pub end_of_turn: String,
}

const PHI_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

impl Template {
    /// TinyLLaVA's `phi` template, which LLaVA-KD uses for Qwen in SFT/DFT:
    /// `"{system} USER: <image>\n{q1} ASSISTANT: {a1}<|endoftext|>USER: {q2} ASSISTANT: {a2}<|endoftext|>"`.
    pub fn phi() -> Self {
        Self {
            name: "phi".into(),
            bos: None,
            system: PHI_SYSTEM.into(),
            separator: " ".into(),
            user_format: "USER: {content} ".into(),
            image_format: "<image>\n{content}".into(),
            keep_user_text: true,
            assistant_format: "ASSISTANT: {content}".into(),
            end_of_turn: "<|endoftext|>".into(),
        }
    }

    /// TinyLLaVA's `pretrain` template (PT/DPT): `<image>` then the caption then `\n`; the human
    /// text is dropped and the target is the caption plus `\n`.
    pub fn pretrain() -> Self {
        Self {
            name: "pretrain".into(),
            bos: None,
            system: String::new(),
            separator: String::new(),
            user_format: "{content}".into(),
            image_format: "<image>{content}".into(),
            keep_user_text: false,
            assistant_format: "{content}".into(),
            end_of_turn: "\n".into(),
        }
    }

    /// For LLaMA-family models: BOS, then the `phi` text with `</s>` ending each answer.
    pub fn llama() -> Self {
        Self {
            name: "llama".into(),
            bos: Some("<s>".into()),
            end_of_turn: "</s>".into(),
            ..Self::phi()
        }
    }

    /// A built-in template by name: `phi`, `pretrain` or `llama`.
    pub fn builtin(name: &str) -> Result<Self> {
        match name {
            "phi" => Ok(Self::phi()),
            "pretrain" => Ok(Self::pretrain()),
            "llama" => Ok(Self::llama()),
            other => bail!("unknown template {other:?} (built in: phi, pretrain, llama)"),
        }
    }
}

/// Settings of [`Template::encode`] that come from the model rather than the template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Visual positions per image (728 for SigLIP-so400m-patch14-384 with the CLS-free select).
    pub n_visual_tokens: usize,
    /// Id stored at visual positions (the model replaces those rows; any valid id works, e.g.
    /// the `<image>` token of an exported LLaVA checkpoint or the tokenizer's pad/eos id).
    pub visual_placeholder_id: u32,
    /// Maximum sequence length after splicing; longer samples lose their tail.
    pub max_len: usize,
}

/// One sample as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedSample {
    pub ids: Vec<u32>,
    pub groups: Vec<Group>,
    pub has_image: bool,
}

impl EncodedSample {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of positions that are cross-entropy targets.
    pub fn n_response(&self) -> usize {
        self.groups
            .iter()
            .filter(|&&g| g == Group::Response)
            .count()
    }
}

/// The rendered conversation: its text, where the image tag is, which bytes are targets.
#[derive(Debug)]
struct Rendered {
    text: String,
    image_at: Option<usize>,
    responses: Vec<Range<usize>>,
}

impl Template {
    /// Encodes a conversation for training.
    ///
    /// `has_image` says whether the sample comes with an image: a single `<image>` tag anywhere in
    /// a user turn is moved to the start of the first user turn, and a missing tag is added there
    /// (LLaVA data always puts it in, other sources sometimes forget). Errors: an unknown
    /// conversation shape (no answer, roles that do not alternate), more than one `<image>` tag,
    /// a tag without an image or inside an answer, and a sample too long for `max_len` (the tail
    /// cut would reach into the visual block or leave no response token).
    pub fn encode(
        &self,
        turns: &[Turn],
        has_image: bool,
        tokenizer: &Tokenizer,
        opts: &EncodeOptions,
    ) -> Result<EncodedSample> {
        let rendered = self.render(turns, has_image)?;
        let sample = self.tokenize(&rendered, tokenizer, opts)?;
        truncate(sample, opts)
    }

    /// Encodes the prompt for generation: the conversation (whose last turn is the user's
    /// question) followed by the assistant prefix without trailing whitespace (`... ASSISTANT:`),
    /// so the model generates the answer's first token with its leading space.
    pub fn encode_generation_prompt(
        &self,
        turns: &[Turn],
        has_image: bool,
        tokenizer: &Tokenizer,
        opts: &EncodeOptions,
    ) -> Result<EncodedSample> {
        ensure!(
            turns.last().map(|t| t.role) == Some(Role::User),
            "a generation prompt must end with a user turn"
        );
        let mut rendered = self.render_turns(turns, has_image, true)?;
        let (prefix, _) = split_format(&self.assistant_format, "assistant_format")?;
        rendered.text.push_str(prefix.trim_end());
        let mut sample = self.tokenize(&rendered, tokenizer, opts)?;
        ensure!(
            sample.len() <= opts.max_len,
            "prompt is {} tokens, over max_len {}",
            sample.len(),
            opts.max_len
        );
        sample
            .groups
            .iter_mut()
            .filter(|g| **g == Group::Response)
            .for_each(|g| *g = Group::Prompt);
        Ok(sample)
    }

    fn render(&self, turns: &[Turn], has_image: bool) -> Result<Rendered> {
        let rendered = self.render_turns(turns, has_image, false)?;
        require!(
            !rendered.responses.is_empty(),
            NoAnswer,
            "no gpt turn: the sample has nothing to learn"
        );
        Ok(rendered)
    }

    /// Renders the conversation text. With `open_ended`, a final user turn without answer is
    /// allowed (generation); otherwise every user turn needs an answer.
    fn render_turns(&self, turns: &[Turn], has_image: bool, open_ended: bool) -> Result<Rendered> {
        // LLaVA drops a leading non-human turn; so do we.
        let turns = match turns.first() {
            Some(t) if t.role == Role::Assistant => &turns[1..],
            _ => turns,
        };
        require!(!turns.is_empty(), BadTurnOrder, "empty conversation");
        let n_tags: usize = turns
            .iter()
            .map(|t| t.text.matches(IMAGE_TAG).count())
            .sum();
        require!(
            n_tags <= 1,
            TooManyImages,
            "more than one {IMAGE_TAG} tag ({n_tags}); a sample may have one image"
        );
        if n_tags == 1 {
            require!(
                has_image,
                MisplacedImageTag,
                "the text has an {IMAGE_TAG} tag but the sample has no image"
            );
            require!(
                turns
                    .iter()
                    .all(|t| t.role == Role::User || !t.text.contains(IMAGE_TAG)),
                MisplacedImageTag,
                "the {IMAGE_TAG} tag is in an answer, not in a question"
            );
        }
        let (user_pre, user_post) = split_format(&self.user_format, "user_format")?;
        let (image_pre, image_post) = split_format(&self.image_format, "image_format")?;
        let (asst_pre, asst_post) = split_format(&self.assistant_format, "assistant_format")?;
        ensure!(
            image_pre.matches(IMAGE_TAG).count() + image_post.matches(IMAGE_TAG).count() == 1,
            "template {}: image_format must contain {IMAGE_TAG} once",
            self.name
        );

        let mut text = String::new();
        let mut image_at = None;
        let mut responses = Vec::new();
        if let Some(bos) = &self.bos {
            text.push_str(bos);
        }
        for (i, pair) in turns.chunks(2).enumerate() {
            let question = &pair[0];
            require!(
                question.role == Role::User,
                BadTurnOrder,
                "turn {} is from gpt but a human turn was expected (turns must alternate)",
                2 * i + 1
            );
            let answer = match pair.get(1) {
                Some(a) => {
                    require!(
                        a.role == Role::Assistant,
                        BadTurnOrder,
                        "turn {} is from human but a gpt turn was expected (turns must alternate)",
                        2 * i + 2
                    );
                    Some(a)
                }
                None if open_ended => None,
                None => {
                    return Err(EncodeError {
                        kind: EncodeErrorKind::NoAnswer,
                        message: "the last human turn has no gpt answer".into(),
                    }
                    .into())
                }
            };
            if i == 0 {
                text.push_str(&self.system);
                if !self.system.is_empty() {
                    text.push_str(&self.separator);
                }
            }
            let mut content = if self.keep_user_text {
                question.text.clone()
            } else {
                String::new()
            };
            if content.contains(IMAGE_TAG) {
                content = content.replace(IMAGE_TAG, "").trim().to_string();
            }
            text.push_str(user_pre);
            if i == 0 && has_image {
                // TinyLLaVA strips the question, wraps it, and strips the result again.
                let wrapped = format!("{image_pre}{}{image_post}", content.trim());
                let wrapped = if self.keep_user_text {
                    wrapped.trim().to_string()
                } else {
                    wrapped
                };
                let tag = wrapped
                    .find(IMAGE_TAG)
                    .context("image tag lost while formatting")?;
                image_at = Some(text.len() + tag);
                text.push_str(&wrapped);
            } else {
                text.push_str(&content);
            }
            text.push_str(user_post);
            if let Some(answer) = answer {
                text.push_str(asst_pre);
                let lead = asst_pre.len() - asst_pre.trim_end().len();
                let start = text.len() - lead;
                text.push_str(&answer.text);
                text.push_str(asst_post);
                text.push_str(&self.end_of_turn);
                responses.push(start..text.len());
            }
        }
        Ok(Rendered {
            text,
            image_at,
            responses,
        })
    }

    /// Tokenises each side of the image separately and assigns groups from byte offsets.
    fn tokenize(
        &self,
        r: &Rendered,
        tokenizer: &Tokenizer,
        opts: &EncodeOptions,
    ) -> Result<EncodedSample> {
        ensure!(
            tokenizer.get_truncation().is_none(),
            "the tokenizer has truncation enabled, which would cut samples silently; load it with \
             kd_engine::data::load_tokenizer"
        );
        let mut ids = Vec::new();
        let mut groups = Vec::new();
        let mut chunks: Vec<(usize, &str)> = Vec::with_capacity(2);
        let mut body_start = 0;
        if let Some(bos) = &self.bos {
            let id = tokenizer.token_to_id(bos).with_context(|| {
                format!(
                    "template {} needs BOS token {bos:?}, which the tokenizer lacks",
                    self.name
                )
            })?;
            ids.push(id);
            groups.push(Group::Prompt);
            body_start = bos.len();
        }
        match r.image_at {
            Some(at) => {
                chunks.push((body_start, &r.text[body_start..at]));
                chunks.push((at + IMAGE_TAG.len(), &r.text[at + IMAGE_TAG.len()..]));
            }
            None => chunks.push((body_start, &r.text[body_start..])),
        }
        for (k, &(offset, chunk)) in chunks.iter().enumerate() {
            if k == 1 {
                ids.extend(
                    std::iter::repeat(opts.visual_placeholder_id).take(opts.n_visual_tokens),
                );
                groups.extend(std::iter::repeat(Group::Visual).take(opts.n_visual_tokens));
            }
            if chunk.is_empty() {
                continue;
            }
            let enc = tokenizer
                .encode(chunk, false)
                .map_err(|e| anyhow!("tokenizer failed on the prompt text: {e}"))?;
            for (&id, &(start, _)) in enc.get_ids().iter().zip(enc.get_offsets()) {
                let at = offset + start;
                let is_response = r.responses.iter().any(|span| span.contains(&at));
                ids.push(id);
                groups.push(if is_response {
                    Group::Response
                } else {
                    Group::Prompt
                });
            }
        }
        Ok(EncodedSample {
            ids,
            groups,
            has_image: r.image_at.is_some(),
        })
    }
}

/// Splits a format at its `{content}` placeholder.
fn split_format<'a>(format: &'a str, what: &str) -> Result<(&'a str, &'a str)> {
    const SLOT: &str = "{content}";
    let at = format
        .find(SLOT)
        .with_context(|| format!("template {what} {format:?} has no {SLOT}"))?;
    Ok((&format[..at], &format[at + SLOT.len()..]))
}

/// Cuts the tail to `max_len`; refuses a cut into the visual block or one that leaves no target.
fn truncate(mut s: EncodedSample, opts: &EncodeOptions) -> Result<EncodedSample> {
    if s.len() <= opts.max_len {
        return Ok(s);
    }
    if let Some(last_visual) = s.groups.iter().rposition(|&g| g == Group::Visual) {
        require!(
            last_visual < opts.max_len,
            TooLong,
            "too long: {} positions, and cutting to max_len {} would cut into the image's visual \
             tokens (they end at position {})",
            s.len(),
            opts.max_len,
            last_visual + 1
        );
    }
    let full = s.len();
    s.ids.truncate(opts.max_len);
    s.groups.truncate(opts.max_len);
    require!(
        s.n_response() > 0,
        TooLong,
        "too long: {full} positions, and cutting to max_len {} leaves no response token",
        opts.max_len
    );
    Ok(s)
}

/// Loads a `tokenizer.json` (a file, or a model folder holding one) with truncation and padding
/// switched off, so that encoding never cuts or pads behind the template's back.
///
/// A folder that has only a SentencePiece `tokenizer.model` (older LLaMA checkpoints) gets an
/// error explaining the one-time conversion.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let file = if path.is_dir() {
        let json = path.join("tokenizer.json");
        if !json.exists() {
            if path.join("tokenizer.model").exists() {
                bail!(
                    "{} has a SentencePiece tokenizer.model but no tokenizer.json; convert it once with \
                     transformers: python -c \"from transformers import AutoTokenizer; \
                     AutoTokenizer.from_pretrained('{0}').save_pretrained('{0}')\"",
                    path.display()
                );
            }
            bail!("{} has no tokenizer.json", path.display());
        }
        json
    } else {
        path.to_path_buf()
    };
    let mut tok = Tokenizer::from_file(&file)
        .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", file.display()))?;
    tok.with_truncation(None)
        .map_err(|e| anyhow!("cannot disable truncation of {}: {e}", file.display()))?;
    tok.with_padding(None);
    Ok(tok)
}

/// The id to store at visual positions by default: the tokenizer's `<image>` token if it has
/// one, else its end-of-text / end-of-sequence / padding token, else 0.
pub fn default_visual_placeholder(tokenizer: &Tokenizer) -> u32 {
    ["<image>", "<|endoftext|>", "</s>", "<pad>", "<unk>"]
        .iter()
        .find_map(|t| tokenizer.token_to_id(t))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(t: &str) -> Turn {
        Turn::new(Role::User, t)
    }
    fn gpt(t: &str) -> Turn {
        Turn::new(Role::Assistant, t)
    }

    #[test]
    fn phi_renders_like_spec() {
        let r = Template::phi()
            .render(
                &[
                    user("What is it?\n<image>"),
                    gpt("A cat."),
                    user("Colour?"),
                    gpt("Orange."),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            r.text,
            format!("{PHI_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.<|endoftext|>USER: Colour? ASSISTANT: Orange.<|endoftext|>")
        );
        assert_eq!(&r.text[r.image_at.unwrap()..][..7], "<image>");
        let spans: Vec<&str> = r.responses.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(spans, [" A cat.<|endoftext|>", " Orange.<|endoftext|>"]);
    }

    #[test]
    fn pretrain_drops_the_question() {
        let r = Template::pretrain()
            .render(&[user("<image>\nDescribe."), gpt("A cat.")], true)
            .unwrap();
        assert_eq!(r.text, "<image>A cat.\n");
        assert_eq!(r.responses.len(), 1);
        assert_eq!(r.responses[0], 7..14);
    }

    #[test]
    fn missing_tag_is_added_and_leading_gpt_turn_dropped() {
        let r = Template::phi()
            .render(&[gpt("hello"), user("What?"), gpt("This.")], true)
            .unwrap();
        assert!(r.text.contains("USER: <image>\nWhat? ASSISTANT: This."));
    }

    #[test]
    fn shape_errors() {
        let t = Template::phi();
        let err = |turns: &[Turn], img: bool| t.render(turns, img).unwrap_err().to_string();
        assert!(err(&[user("<image> a <image>"), gpt("b")], true).contains("more than one"));
        assert!(err(&[user("<image> a"), gpt("b")], false).contains("no image"));
        assert!(err(&[user("a"), gpt("<image>")], true).contains("in an answer"));
        assert!(err(&[user("a")], false).contains("no gpt answer"));
        assert!(err(&[user("a"), user("b")], false).contains("alternate"));
        assert!(err(&[gpt("a")], false).contains("empty conversation"));
        assert!(Role::parse("system")
            .unwrap_err()
            .to_string()
            .contains("unknown role"));
    }

    #[test]
    fn truncation_rules() {
        let opts = |max_len| EncodeOptions {
            n_visual_tokens: 3,
            visual_placeholder_id: 0,
            max_len,
        };
        use Group::*;
        let s = EncodedSample {
            ids: vec![1, 0, 0, 0, 2, 3, 4],
            groups: vec![Prompt, Visual, Visual, Visual, Prompt, Response, Response],
            has_image: true,
        };
        assert_eq!(
            truncate(s.clone(), &opts(6)).unwrap().ids,
            [1, 0, 0, 0, 2, 3]
        );
        assert!(truncate(s.clone(), &opts(5))
            .unwrap_err()
            .to_string()
            .contains("no response"));
        assert!(truncate(s.clone(), &opts(3))
            .unwrap_err()
            .to_string()
            .contains("visual"));
        assert_eq!(truncate(s.clone(), &opts(7)).unwrap(), s);
    }
}
