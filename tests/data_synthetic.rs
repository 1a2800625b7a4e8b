//! The miniature study's procedural data: determinism, loading through the real reader and
//! templates, held-out images, the word-level tokenizer, response positions, balance, matching.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use kd_engine::data::synthetic::{
    ask, normalise_answer, read_eval, read_study_spec, split_words, study_tokenizer, vocabulary,
    QuestionKind, Scene, DESCRIBE, ENDOFTEXT, SPECIAL_TOKENS, UNK,
};
use kd_engine::data::{
    answer_matches, default_visual_placeholder, load_rgb, load_tokenizer, write_study_data,
    Dataset, DatasetOptions, EncodeOptions, Group, ImageCheck, Role, SampleEncoder, SplitMix64,
    StudyFiles, StudySpec, Template, Turn, IMAGE_TAG,
};
use tokenizers::Tokenizer;

const N_VISUAL: usize = 16;

/// A small spec: fast to write, big enough for every kind of question and scene.
fn small() -> StudySpec {
    StudySpec {
        pretrain_samples: 80,
        sft_samples: 120,
        eval_questions: 60,
        train_images: 70,
        eval_images: 25,
        image_size: 24,
        ..StudySpec::quick()
    }
}

fn write(spec: &StudySpec) -> (tempfile::TempDir, StudyFiles) {
    let dir = tempfile::tempdir().unwrap();
    let files = write_study_data(&dir.path().join("study"), spec).unwrap();
    (dir, files)
}

fn encoder(files: &StudyFiles, template: Template) -> SampleEncoder {
    let tokenizer = load_tokenizer(&files.tokenizer).unwrap();
    let visual_placeholder_id = default_visual_placeholder(&tokenizer);
    SampleEncoder {
        template,
        tokenizer,
        options: EncodeOptions {
            n_visual_tokens: N_VISUAL,
            visual_placeholder_id,
            max_len: 512,
        },
    }
}

fn load(path: &Path, enc: &SampleEncoder) -> Dataset {
    let opts = DatasetOptions {
        max_skip_fraction: 0.0,
        image_check: ImageCheck::Decode,
        ..DatasetOptions::default()
    };
    Dataset::load(path, enc, &opts).unwrap()
}

/// Every file under `dir`, relative path → bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

fn token_strings(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect()
}

/// Maximal runs of response positions.
fn response_runs(groups: &[Group]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = None;
    for (j, &g) in groups.iter().chain([Group::Pad].iter()).enumerate() {
        match (g == Group::Response, start) {
            (true, None) => start = Some(j),
            (false, Some(s)) => {
                runs.push(s..j);
                start = None;
            }
            _ => {}
        }
    }
    runs
}

#[test]
fn same_spec_gives_byte_identical_files() {
    let spec = small();
    let (_a, fa) = write(&spec);
    let (_b, fb) = write(&spec);
    let (sa, sb) = (snapshot(&fa.dir), snapshot(&fb.dir));
    assert_eq!(sa.len(), spec.train_images + spec.eval_images + 5);
    assert_eq!(sa.keys().collect::<Vec<_>>(), sb.keys().collect::<Vec<_>>());
    for (k, v) in &sa {
        assert!(v == &sb[k], "{} differs between two runs", k.display());
    }
    // Another seed gives other data; the manifest reads back.
    let (_c, fc) = write(&StudySpec {
        seed: spec.seed + 1,
        ..spec.clone()
    });
    assert_ne!(
        fs::read(&fa.pretrain).unwrap(),
        fs::read(&fc.pretrain).unwrap()
    );
    assert_eq!(read_study_spec(&fa.dir).unwrap(), Some(spec.clone()));
    // Train image i does not depend on the other counts.
    let (_d, fd) = write(&StudySpec {
        sft_samples: 7,
        eval_questions: 3,
        ..spec
    });
    assert_eq!(
        fs::read(fa.dir.join("images/train_00005.png")).unwrap(),
        fs::read(fd.dir.join("images/train_00005.png")).unwrap()
    );
}

#[test]
fn files_load_through_the_reader_with_no_skips_and_no_unknown_words() {
    let spec = small();
    let (_t, files) = write(&spec);
    for (path, template, n) in [
        (&files.pretrain, Template::pretrain(), spec.pretrain_samples),
        (&files.sft, Template::phi(), spec.sft_samples),
    ] {
        let enc = encoder(&files, template);
        let ds = load(path, &enc);
        assert_eq!(ds.report().skipped(), 0, "{}", ds.report());
        assert_eq!(ds.len(), n);
        let unk = enc.tokenizer.token_to_id(UNK).unwrap();
        for s in ds.samples() {
            let e = enc.encode(s).unwrap();
            assert!(!e.ids.contains(&unk), "{:?} has an unknown word", s.id);
            assert_eq!(
                e.groups.iter().filter(|&&g| g == Group::Visual).count(),
                N_VISUAL
            );
        }
        // A batch builds through the image processor.
        let proc = kd_engine::data::ImageProcessorConfig::default();
        let b = ds.load_batch(&[0, 1, 2], &enc, &proc).unwrap();
        assert!(b.skipped.is_empty());
    }
    // The eval file: one question per line, images exist and decode at the spec's size.
    let items = read_eval(&files.eval).unwrap();
    assert_eq!(items.len(), spec.eval_questions);
    for it in &items {
        assert!(!it.question.contains(IMAGE_TAG));
        let img = load_rgb(&files.dir.join(&it.image)).unwrap();
        assert_eq!(
            (img.width(), img.height()),
            (spec.image_size, spec.image_size)
        );
        assert!(it.kind().is_some(), "{}", it.id);
        let words = split_words(&it.answer).unwrap();
        assert_eq!(words.len(), 1, "answers are one word: {:?}", it.answer);
    }
    // The eval kinds are evenly spread.
    let mut per_kind = BTreeMap::new();
    for it in &items {
        *per_kind.entry(it.kind().unwrap()).or_insert(0) += 1;
    }
    assert_eq!(per_kind.len(), 5);
    assert!(
        per_kind.values().all(|&n| n == spec.eval_questions / 5),
        "{per_kind:?}"
    );
}

#[test]
fn eval_images_are_disjoint_from_training_images() {
    let spec = small();
    let (_t, files) = write(&spec);
    let names = |path: &Path| -> HashSet<String> {
        let v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["image"].as_str().unwrap().to_string())
            .collect()
    };
    let mut train = names(&files.pretrain);
    train.extend(names(&files.sft));
    let eval: HashSet<String> = read_eval(&files.eval)
        .unwrap()
        .into_iter()
        .map(|i| i.image)
        .collect();
    assert_eq!(train.len(), spec.train_images);
    assert_eq!(eval.len(), spec.eval_images);
    assert!(train.is_disjoint(&eval));
    // Disjoint as pixels too, not only as names.
    let pixels = |set: &HashSet<String>| -> HashSet<Vec<u8>> {
        set.iter()
            .map(|n| load_rgb(&files.dir.join(n)).unwrap().into_raw())
            .collect()
    };
    let (tp, ep) = (pixels(&train), pixels(&eval));
    assert_eq!(tp.len(), train.len(), "two training images are identical");
    assert!(tp.is_disjoint(&ep));
}

#[test]
fn tokenizer_round_trips_every_word() {
    let (_t, files) = write(&small());
    let tok = load_tokenizer(&files.tokenizer).unwrap();
    let vocab = vocabulary().unwrap();
    assert_eq!(tok.get_vocab_size(true), vocab.len());
    for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.token_to_id(s), Some(i as u32));
        assert_eq!(tok.encode(*s, false).unwrap().get_ids(), [i as u32]);
    }
    for (id, w) in vocab.iter().enumerate().skip(SPECIAL_TOKENS.len()) {
        let enc = tok.encode(w.as_str(), false).unwrap();
        assert_eq!(enc.get_ids(), [id as u32], "word {w:?}");
        assert_eq!(tok.id_to_token(id as u32).as_deref(), Some(w.as_str()));
        assert_eq!(tok.decode(&[id as u32], false).unwrap(), *w);
    }
    // The phi system prompt and the role markers are in the vocabulary.
    let unk = tok.token_to_id(UNK).unwrap();
    let phi = Template::phi();
    let enc = tok
        .encode(
            format!("{} USER: \nx ASSISTANT: red{ENDOFTEXT}", phi.system),
            false,
        )
        .unwrap();
    let unknown: Vec<_> = enc.get_ids().iter().filter(|&&i| i == unk).collect();
    assert_eq!(unknown.len(), 1, "only the made-up word x is unknown");
    // Words outside the closed language are unknown, not split or panicking.
    assert_eq!(tok.encode("purple", false).unwrap().get_ids(), [unk]);
    // The file is what the crate builds.
    assert_eq!(
        fs::read_to_string(&files.tokenizer).unwrap().trim_end(),
        study_tokenizer().unwrap().to_string(true).unwrap()
    );
}

#[test]
fn response_positions_are_exactly_the_answers() {
    let (_t, files) = write(&small());
    let eot = |tok: &Tokenizer| tok.token_to_id(ENDOFTEXT).unwrap();

    // phi: each answer word plus <|endoftext|>, per turn.
    let enc = encoder(&files, Template::phi());
    let ds = load(&files.sft, &enc);
    let mut two_turns = 0;
    for s in ds.samples() {
        let e = enc.encode(s).unwrap();
        let answers: Vec<&Turn> = s
            .turns
            .iter()
            .filter(|t| t.role == Role::Assistant)
            .collect();
        let runs = response_runs(&e.groups);
        assert_eq!(runs.len(), answers.len());
        two_turns += (answers.len() == 2) as usize;
        for (run, answer) in runs.iter().zip(&answers) {
            let ids = &e.ids[run.clone()];
            assert_eq!(*ids.last().unwrap(), eot(&enc.tokenizer));
            let mut want = split_words(&answer.text).unwrap();
            want.push(ENDOFTEXT.into());
            assert_eq!(token_strings(&enc.tokenizer, ids), want);
            let decoded = enc.tokenizer.decode(ids, true).unwrap();
            if answer.text.contains(' ') {
                // A caption (`Describe the image.`): the word-level decoder puts a space before
                // each comma, so compare words.
                assert_eq!(split_words(&decoded).unwrap(), split_words(&answer.text).unwrap());
            } else {
                assert_eq!(decoded, answer.text);
                assert!(answer_matches(
                    &enc.tokenizer.decode(ids, false).unwrap(),
                    &answer.text
                ));
            }
            // The token before the answer is the ':' of "ASSISTANT:".
            assert_eq!(
                enc.tokenizer.id_to_token(e.ids[run.start - 1]).unwrap(),
                ":"
            );
        }
    }
    assert!(two_turns > 0 && two_turns < ds.len());

    // A hand-made sample, and the generation prompt that ends right before the answer.
    let turns = [
        Turn::new(
            Role::User,
            format!("{IMAGE_TAG}\nWhat color is the circle?"),
        ),
        Turn::new(Role::Assistant, "red"),
    ];
    let e = enc
        .template
        .encode(&turns, true, &enc.tokenizer, &enc.options)
        .unwrap();
    let resp: Vec<u32> = e
        .ids
        .iter()
        .zip(&e.groups)
        .filter(|(_, &g)| g == Group::Response)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(token_strings(&enc.tokenizer, &resp), ["red", ENDOFTEXT]);
    let p = enc
        .template
        .encode_generation_prompt(&turns[..1], true, &enc.tokenizer, &enc.options)
        .unwrap();
    assert_eq!(p.ids[..], e.ids[..e.len() - 2]);
    assert!(p.groups.iter().all(|&g| g != Group::Response));

    // pretrain: the caption words plus "\n", nothing else.
    let enc = encoder(&files, Template::pretrain());
    let ds = load(&files.pretrain, &enc);
    for s in ds.samples() {
        let e = enc.encode(s).unwrap();
        let runs = response_runs(&e.groups);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].end, e.len());
        let mut want = split_words(&s.turns[1].text).unwrap();
        want.push("\n".into());
        assert_eq!(token_strings(&enc.tokenizer, &e.ids[runs[0].clone()]), want);
        // Only the visual block precedes the caption.
        assert_eq!(runs[0].start, N_VISUAL);
    }
}

#[test]
fn yes_no_answers_are_balanced() {
    let spec = StudySpec {
        sft_samples: 400,
        eval_questions: 200,
        ..small()
    };
    let (_t, files) = write(&spec);
    let count = |answers: Vec<String>| {
        let yes = answers.iter().filter(|a| *a == "yes").count();
        let no = answers.iter().filter(|a| *a == "no").count();
        (yes, no)
    };
    let v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&files.sft).unwrap()).unwrap();
    let sft_answers: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["conversations"].as_array().unwrap().clone())
        .filter(|m| m["from"] == "gpt")
        .map(|m| m["value"].as_str().unwrap().to_string())
        .collect();
    let (yes, no) = count(sft_answers);
    assert!(yes + no >= 50, "{yes} {no}");
    assert!(yes.abs_diff(no) <= 1, "sft: {yes} yes, {no} no");
    let (yes, no) = count(
        read_eval(&files.eval)
            .unwrap()
            .into_iter()
            .map(|i| i.answer)
            .collect(),
    );
    assert_eq!(yes + no, spec.eval_questions / 5);
    assert!(yes.abs_diff(no) <= 1, "eval: {yes} yes, {no} no");
}

#[test]
fn questions_are_answered_by_their_scene() {
    let mut rng = SplitMix64::new(11);
    let mut answers: BTreeMap<QuestionKind, BTreeSet<String>> = BTreeMap::new();
    for i in 0..400 {
        let scene = Scene::random(&mut rng);
        for kind in QuestionKind::ALL {
            let qa = ask(&scene, kind, i % 2 == 0, &mut rng);
            let truth = match kind {
                QuestionKind::Colour => scene
                    .objects
                    .iter()
                    .find(|o| qa.question.contains(o.shape.word()))
                    .map(|o| o.colour.word()),
                QuestionKind::Shape => scene
                    .objects
                    .iter()
                    .find(|o| qa.question.contains(o.colour.word()))
                    .map(|o| o.shape.word()),
                QuestionKind::Count => Some(["one", "two", "three"][scene.count() - 1]),
                QuestionKind::Position => scene
                    .objects
                    .iter()
                    .find(|o| qa.question.contains(o.shape.word()))
                    .map(|o| o.position.word()),
                QuestionKind::YesNo => Some(
                    if scene.objects.iter().any(|o| {
                        qa.question
                            .contains(&format!("{} {}", o.colour.word(), o.shape.word()))
                    }) {
                        "yes"
                    } else {
                        "no"
                    },
                ),
            };
            assert_eq!(Some(qa.answer.as_str()), truth, "{qa:?} {scene:?}");
            answers.entry(kind).or_default().insert(qa.answer);
        }
    }
    // Every answer of every kind occurs.
    assert_eq!(answers[&QuestionKind::Colour].len(), 4);
    assert_eq!(answers[&QuestionKind::Shape].len(), 3);
    assert_eq!(answers[&QuestionKind::Count].len(), 3);
    assert_eq!(answers[&QuestionKind::Position].len(), 5);
    assert_eq!(answers[&QuestionKind::YesNo].len(), 2);
}

#[test]
fn answer_matching_is_normalised_exact_match() {
    assert!(answer_matches("red", "red"));
    assert!(answer_matches(" Red.", "red"));
    assert!(answer_matches("red<|endoftext|>", "red"));
    assert!(answer_matches("red <|endoftext|> blue", "red"));
    assert!(answer_matches("YES!\n", "yes"));
    assert!(answer_matches("left </s>", "Left"));
    assert!(answer_matches("a  red\tcircle", "a red circle"));
    assert!(answer_matches("two", "two."));
    assert!(!answer_matches("red circle", "red"));
    assert!(!answer_matches("re", "red"));
    assert!(!answer_matches("reddish", "red"));
    assert!(!answer_matches("no", "yes"));
    assert!(!answer_matches("", ""));
    assert!(!answer_matches("<|endoftext|>", ""));
    assert!(!answer_matches("...", ""));
    assert_eq!(normalise_answer("  The LEFT?! "), "the left");
}

#[test]
fn presets_are_valid_and_bad_specs_are_refused() {
    for s in [StudySpec::full(), StudySpec::quick()] {
        s.validate().unwrap();
        assert!(s.eval_questions % 5 == 0 && s.eval_images >= 1);
    }
    let dir = tempfile::tempdir().unwrap();
    for (bad, what) in [
        (
            StudySpec {
                sft_samples: 0,
                ..small()
            },
            "sft_samples",
        ),
        (
            StudySpec {
                image_size: 8,
                ..small()
            },
            "image_size",
        ),
        (
            StudySpec {
                two_turn_percent: 101,
                ..small()
            },
            "two_turn_percent",
        ),
        (
            StudySpec {
                describe_percent: 101,
                ..small()
            },
            "describe_percent",
        ),
        (
            StudySpec {
                noise: 200,
                ..small()
            },
            "noise",
        ),
    ] {
        let err = write_study_data(dir.path(), &bad).unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
    }
}

/// Prints the numbers the trainer needs (run with --nocapture): vocabulary size and sequence
/// lengths in tokens, without the visual block.
#[test]
fn report_vocabulary_and_lengths() {
    let (_t, files) = write(&StudySpec::quick());
    let stats = |path: &Path, template: Template| {
        let mut enc = encoder(&files, template);
        enc.options.n_visual_tokens = 0;
        let ds = load(path, &enc);
        let lens: Vec<usize> = ds
            .samples()
            .iter()
            .map(|s| enc.encode(s).unwrap().len())
            .collect();
        let resp: Vec<usize> = ds
            .samples()
            .iter()
            .map(|s| enc.encode(s).unwrap().n_response())
            .collect();
        let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len() as f64;
        (
            *lens.iter().min().unwrap(),
            mean(&lens),
            *lens.iter().max().unwrap(),
            mean(&resp),
        )
    };
    let tok = load_tokenizer(&files.tokenizer).unwrap();
    println!("vocabulary: {} tokens", tok.get_vocab_size(true));
    println!(
        "pretrain text tokens (min, mean, max, mean response): {:?}",
        stats(&files.pretrain, Template::pretrain())
    );
    println!(
        "sft text tokens (min, mean, max, mean response): {:?}",
        stats(&files.sft, Template::phi())
    );
    assert!(tok.get_vocab_size(true) < 128);
}

#[test]
fn describe_conversations_answer_with_their_images_caption() {
    let spec = StudySpec { sft_samples: 400, ..small() };
    let (_t, files) = write(&spec);
    let read = |p: &Path| -> Vec<serde_json::Value> { serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap() };
    // Pretrain sample i shows image i % train_images: every image's caption, by image path.
    let captions: HashMap<String, String> = read(&files.pretrain)
        .iter()
        .map(|r| (r["image"].as_str().unwrap().to_string(), r["conversations"][1]["value"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(captions.len(), spec.train_images);
    let mut described = 0;
    for r in read(&files.sft) {
        let turns = r["conversations"].as_array().unwrap();
        if turns[0]["value"] == format!("{IMAGE_TAG}\n{DESCRIBE}") {
            assert_eq!(turns.len(), 2, "{r}");
            assert_eq!(turns[1]["value"].as_str().unwrap(), captions[r["image"].as_str().unwrap()], "{r}");
            described += 1;
        } else {
            assert!(turns.iter().all(|m| m["value"].as_str().is_some_and(|v| !v.contains(DESCRIBE))), "{r}");
        }
    }
    // describe_percent = 20 of 400 conversations: 80 expected, binomial sd 8.
    assert!((50..=110).contains(&described), "{described} of 400 conversations ask for the caption");
}
