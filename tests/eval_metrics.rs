//! The evaluation metrics on hand-made cases with known scores, and the VQA normalisation
//! against the official vqaEval.py functions (outputs in tests/fixtures/generate/vqa_normalise.json,
//! made by make_generate_fixtures.py).

mod common;

use kd_engine::eval::metrics::{
    check_references, format_choices, parse_choice, parse_yes_no, reference_choice, score_item, vqa_normalise, vqa_score, ItemScore, Metric,
    Summary, YesNo, YesNoCounts,
};

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn vqa_normalisation_matches_the_official_script() {
    let text = std::fs::read_to_string(common::fixture("generate/vqa_normalise.json")).unwrap();
    let pairs: Vec<(String, String)> = serde_json::from_str(&text).unwrap();
    assert!(pairs.len() > 40);
    for (input, want) in pairs {
        assert_eq!(vqa_normalise(&input), want, "normalising {input:?}");
    }
}

#[test]
fn vqa_edge_cases() {
    assert_eq!(vqa_score("Two", &s(&["2"])), 1.0);
    assert_eq!(vqa_score("2", &s(&["two"])), 1.0);
    assert_eq!(vqa_score("a dog.", &s(&["dog"])), 1.0);
    assert_eq!(vqa_score("The Dog!", &s(&["dog"])), 1.0);
    assert_eq!(vqa_score("dogs", &s(&["dog"])), 0.0);
    assert_eq!(vqa_score("dont know", &s(&["don't know"])), 1.0);
    assert_eq!(vqa_score("", &s(&["dog"])), 0.0);
    assert_eq!(vqa_score("the", &s(&["a"])), 0.0, "an answer that normalises to nothing never matches");
    // Ten references (VQAv2): min(1, matches / 3).
    let refs = s(&["dog", "dog", "puppy", "cat", "cat", "cat", "cat", "animal", "dog.", "Cat"]);
    assert_eq!(vqa_score("dog", &refs), 1.0); // 3 matches ("dog." normalises to "dog")
    assert!((vqa_score("puppy", &refs) - 1.0 / 3.0).abs() < 1e-12); // 1 match
    assert_eq!(vqa_score("a cat", &refs), 1.0); // 5 matches, capped
    assert_eq!(vqa_score("horse", &refs), 0.0);
    let two = s(&["dog", "dog", "x", "x", "x", "x", "x", "x", "x", "x"]);
    assert!((vqa_score("dog", &two) - 2.0 / 3.0).abs() < 1e-12);
}

#[test]
fn pope_scores_on_a_known_confusion_matrix() {
    // TP 3, FP 1, TN 4, FN 2 → accuracy 0.7, precision 0.75, recall 0.6, F1 2/3, yes-ratio 0.4.
    let mut c = YesNoCounts::default();
    let cells = [(YesNo::Yes, YesNo::Yes, 3), (YesNo::Yes, YesNo::No, 1), (YesNo::No, YesNo::No, 4), (YesNo::No, YesNo::Yes, 2)];
    for (p, r, n) in cells {
        for _ in 0..n {
            c.add(p, r);
        }
    }
    let sc = c.scores();
    assert!((sc.accuracy - 0.7).abs() < 1e-12);
    assert!((sc.precision - 0.75).abs() < 1e-12);
    assert!((sc.recall - 0.6).abs() < 1e-12);
    assert!((sc.f1 - 2.0 / 3.0).abs() < 1e-12);
    assert!((sc.yes_ratio - 0.4).abs() < 1e-12);
    // Nothing predicted yes: precision, recall and F1 are 0, not NaN.
    let mut none = YesNoCounts::default();
    none.add(YesNo::No, YesNo::Yes);
    let z = none.scores();
    assert_eq!((z.precision, z.recall, z.f1, z.accuracy), (0.0, 0.0, 0.0, 0.0));

    // The same matrix through answers as a model writes them, and the summary.
    let preds = ["Yes", "yes.", "Yes, there is a dog.", "No", "no", "No.", "There is no dog.", "nope, I do not see one", "not really.", "I see it"];
    let refs = ["yes", "yes", "yes", "no", "no", "no", "no", "yes", "yes", "no"];
    let items: Vec<ItemScore> = preds.iter().zip(refs).map(|(p, r)| score_item(Metric::YesNo, p, &s(&[r]), None).unwrap()).collect();
    let sum = Summary::of(Metric::YesNo, &items);
    let y = sum.yes_no.unwrap();
    assert_eq!(sum.questions, 10);
    assert!((y.accuracy - 0.7).abs() < 1e-12 && (y.precision - 0.75).abs() < 1e-12 && (y.recall - 0.6).abs() < 1e-12, "{sum}");
    assert_eq!(parse_yes_no("No, there is not."), YesNo::No);
    assert_eq!(parse_yes_no("There is not a cat"), YesNo::No);
    assert_eq!(parse_yes_no("A cat is there"), YesNo::Yes);
    assert!(check_references(Metric::YesNo, &s(&["maybe"]), None).is_err());
}

#[test]
fn choice_letters() {
    let choices = s(&["a red circle", "a blue square", "green triangle", "dog"]);
    for (pred, want) in [
        ("B", Some(1)),
        ("(B)", Some(1)),
        ("B.", Some(1)),
        ("b) a blue square", Some(1)),
        ("C: green triangle", Some(2)),
        ("The answer is D.", Some(3)),
        ("a blue square", Some(1)),
        ("Blue square.", Some(1)),
        ("A dog", Some(3)),           // the choice text wins over the article
        ("I think it is the green triangle", Some(2)),
        ("E", None),                  // not a choice
        ("Both", None),
        ("", None),
    ] {
        assert_eq!(parse_choice(pred, &choices), want, "{pred:?}");
    }
    assert_eq!(reference_choice("C", &choices).unwrap(), 2);
    assert_eq!(reference_choice("(a)", &choices).unwrap(), 0);
    assert_eq!(reference_choice("dog", &choices).unwrap(), 3);
    assert!(reference_choice("E", &choices).is_err());
    assert!(reference_choice("cat", &choices).is_err());
    assert_eq!(format_choices(&choices[..2]), "A. a red circle\nB. a blue square");

    let preds = ["(B)", "B.", "b) text", "dog", "A"];
    let refs = ["B", "B", "B", "D", "C"];
    let items: Vec<ItemScore> =
        preds.iter().zip(refs).map(|(p, r)| score_item(Metric::Choice, p, &s(&[r]), Some(&choices)).unwrap()).collect();
    assert!((Summary::of(Metric::Choice, &items).accuracy - 0.8).abs() < 1e-12);
    assert!(check_references(Metric::Choice, &s(&["B"]), None).is_err(), "choices are required");
}

#[test]
fn exact_summary() {
    let items: Vec<ItemScore> = [("Two", vec!["2"]), ("a dog.", vec!["dog"]), ("cat", vec!["dog"])]
        .iter()
        .map(|(p, r)| score_item(Metric::Exact, p, &s(r), None).unwrap())
        .collect();
    let sum = Summary::of(Metric::Exact, &items);
    assert!((sum.accuracy - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(sum.to_string(), "exact: accuracy 66.67 % over 3 questions");
    assert!(check_references(Metric::Exact, &[], None).is_err());
}
