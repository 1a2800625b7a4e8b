//! Which logit rows each term of the objective uses (SPEC §1), and how many there are.
//!
//! Row `j` of the logits is the model's output at position `j`. The shifted terms use row `j` to
//! predict token `j + 1` of the *same* sequence: the last row of a packed sequence predicts
//! nothing (the next position starts another sequence), and a padding row predicts nothing.
//!
//! | term | rows |
//! | --- | --- |
//! | L_ce | `j` with `groups[j+1] == Response` (target `ids[j+1]`) |
//! | L_res | the same rows as L_ce |
//! | L_prompt | `j` with `groups[j+1] == Prompt` |
//! | L_vis | `j` with `groups[j] == Visual` (not shifted) |
//! | L_rel | each image's visual rows, as one block |

use std::ops::{Add, AddAssign, Range};

use anyhow::{bail, ensure, Result};

use crate::backend::IGNORE_INDEX;
use crate::data::template::Group;

/// One (micro-)batch as the loss sees it: the packed layout of the logits' rows.
#[derive(Clone, Copy, Debug)]
pub struct LossInputs<'a> {
    /// Token id at each position (visual positions hold a placeholder, never a target).
    pub ids: &'a [u32],
    /// Group of each position.
    pub groups: &'a [Group],
    /// Lengths of the packed sequences, in order; they sum to the number of positions.
    pub seq_lens: &'a [usize],
    /// Rows of each image's visual tokens (contiguous, inside one sequence). Together they must
    /// cover exactly the [`Group::Visual`] positions; [`visual_ranges`] derives them from the
    /// groups.
    pub images: &'a [Range<usize>],
}

/// Numbers of rows (or images) each term averages over. Count a micro-batch with
/// [`LossCounts::of`]; sum the counts of every micro-batch of an optimizer step (`+`, `+=`,
/// `Iterator::sum`) and pass the sum to [`crate::loss::distill_loss`] for each of them, so every mean
/// spans the whole step (SPEC §1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LossCounts {
    /// Cross-entropy targets (positions whose token is a response token and has a row before it
    /// in its sequence).
    pub ce: usize,
    /// Rows predicting a response token (L_res); under SPEC §1 the same rows as `ce`.
    pub response: usize,
    /// Rows predicting a prompt-text token (L_prompt).
    pub prompt: usize,
    /// Rows at visual positions (L_vis).
    pub visual: usize,
    /// Images (L_rel).
    pub images: usize,
}

impl Add for LossCounts {
    type Output = LossCounts;
    fn add(self, o: LossCounts) -> LossCounts {
        LossCounts {
            ce: self.ce + o.ce,
            response: self.response + o.response,
            prompt: self.prompt + o.prompt,
            visual: self.visual + o.visual,
            images: self.images + o.images,
        }
    }
}

impl AddAssign for LossCounts {
    fn add_assign(&mut self, o: LossCounts) {
        *self = *self + o;
    }
}

impl std::iter::Sum for LossCounts {
    fn sum<I: Iterator<Item = LossCounts>>(iter: I) -> LossCounts {
        iter.fold(LossCounts::default(), |a, b| a + b)
    }
}

impl LossCounts {
    /// The counts of one micro-batch (validating its layout first).
    pub fn of(inputs: &LossInputs) -> Result<Self> {
        inputs.validate()?;
        let rows = inputs.rows();
        Ok(LossCounts {
            ce: rows.response.len(),
            response: rows.response.len(),
            prompt: rows.prompt.len(),
            visual: rows.visual.len(),
            images: inputs.images.len(),
        })
    }
}

/// The rows each KL term uses, as the backend takes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SelectedRows {
    /// Rows predicting a response token (also the cross-entropy rows).
    pub response: Vec<u32>,
    /// Rows predicting a prompt-text token.
    pub prompt: Vec<u32>,
    /// Rows at visual positions.
    pub visual: Vec<u32>,
}

impl LossInputs<'_> {
    /// Number of positions (rows of the logits).
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Checks that ids, groups and sequence lengths agree and that the image ranges are exactly
    /// the visual positions, one contiguous block inside one sequence each.
    pub fn validate(&self) -> Result<()> {
        let n = self.groups.len();
        ensure!(self.ids.len() == n, "loss inputs: {} token ids but {n} groups", self.ids.len());
        let total: usize = self.seq_lens.iter().sum();
        ensure!(total == n, "loss inputs: sequence lengths sum to {total} but there are {n} positions");
        ensure!(n <= u32::MAX as usize, "loss inputs: {n} positions are too many to index");
        let starts = seq_starts(self.seq_lens);
        let mut covered = 0;
        for (i, r) in self.images.iter().enumerate() {
            ensure!(r.start < r.end, "loss inputs: image {i} has an empty row range {r:?}");
            ensure!(r.end <= n, "loss inputs: image {i} covers rows {r:?} but there are {n} positions");
            // The sequence holding the first row must hold the last one too.
            let seq = starts.partition_point(|&s| s <= r.start) - 1;
            let seq_end = starts[seq] + self.seq_lens[seq];
            ensure!(
                r.end <= seq_end,
                "loss inputs: image {i} (rows {r:?}) crosses the end of sequence {seq} (rows {}..{seq_end})",
                starts[seq]
            );
            if let Some(p) = self.groups[r.clone()].iter().position(|&g| g != Group::Visual) {
                bail!(
                    "loss inputs: image {i} (rows {r:?}) includes row {} of group {}, not visual",
                    r.start + p,
                    self.groups[r.start + p].name()
                );
            }
            covered += r.len();
        }
        let n_visual = self.groups.iter().filter(|&&g| g == Group::Visual).count();
        // Every range is all-visual; they cover every visual position exactly once iff they are
        // disjoint and their lengths add up to the number of visual positions.
        let mut sorted: Vec<&Range<usize>> = self.images.iter().collect();
        sorted.sort_by_key(|r| r.start);
        if let Some(w) = sorted.windows(2).find(|w| w[0].end > w[1].start) {
            bail!("loss inputs: image row ranges {:?} and {:?} overlap", w[0], w[1]);
        }
        ensure!(
            covered == n_visual,
            "loss inputs: the image row ranges cover {covered} rows but there are {n_visual} visual positions"
        );
        Ok(())
    }

    /// The rows of the KL terms. Meaningful for a layout that [`Self::validate`] accepts (on
    /// another it stops at the end of the groups rather than panic).
    pub fn rows(&self) -> SelectedRows {
        let mut out = SelectedRows::default();
        let mut start = 0usize;
        for &len in self.seq_lens {
            let Some(g) = self.groups.get(start..start.saturating_add(len)) else { break };
            for j in 0..len {
                let row = (start + j) as u32;
                if g[j] == Group::Visual {
                    out.visual.push(row);
                }
                if j + 1 < len && g[j] != Group::Pad {
                    match g[j + 1] {
                        Group::Response => out.response.push(row),
                        Group::Prompt => out.prompt.push(row),
                        Group::Visual | Group::Pad => {}
                    }
                }
            }
            start += len;
        }
        out
    }

    /// Cross-entropy target of each row: the next token of the same sequence when it is a
    /// response token, [`IGNORE_INDEX`] otherwise. Validates the layout first.
    pub fn ce_targets(&self) -> Result<Vec<i32>> {
        self.validate()?;
        let mut targets = vec![IGNORE_INDEX; self.len()];
        for r in self.rows().response {
            let id = self.ids[r as usize + 1];
            targets[r as usize] = i32::try_from(id)
                .map_err(|_| anyhow::anyhow!("loss inputs: token id {id} at position {} does not fit a target", r + 1))?;
        }
        Ok(targets)
    }
}

/// Start offset of each sequence.
fn seq_starts(seq_lens: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(seq_lens.len());
    let mut s = 0;
    for &l in seq_lens {
        out.push(s);
        s += l;
    }
    out
}

/// The image row ranges of a packed batch, from its groups: each sequence's run of visual
/// positions is one image. A sequence with two separate runs is an error (a sample with more
/// than one image is a bad sample, SPEC §1).
pub fn visual_ranges(groups: &[Group], seq_lens: &[usize]) -> Result<Vec<Range<usize>>> {
    let total: usize = seq_lens.iter().sum();
    ensure!(total == groups.len(), "visual ranges: sequence lengths sum to {total} but there are {} groups", groups.len());
    let mut out = Vec::new();
    let mut start = 0;
    for (s, &len) in seq_lens.iter().enumerate() {
        let g = &groups[start..start + len];
        if let Some(first) = g.iter().position(|&x| x == Group::Visual) {
            let run = g[first..].iter().take_while(|&&x| x == Group::Visual).count();
            ensure!(
                !g[first + run..].contains(&Group::Visual),
                "visual ranges: sequence {s} has more than one block of visual positions (more than one image)"
            );
            out.push(start + first..start + first + run);
        }
        start += len;
    }
    Ok(out)
}
