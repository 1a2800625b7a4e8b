//! Named parameter sets: weights, their gradients and optimizer moments share one layout, so
//! loading, the optimizer and checkpoints walk the same list.
//!
//! A parameter is one Hugging Face tensor, or several stacked by rows (`qkv_proj.weight` holding
//! `q_proj.weight`, `k_proj.weight`, `v_proj.weight`) so the compute runs one GEMM over them.
//! Everything outside the compute (files, checkpoints, initialisation by name, error messages)
//! sees the Hugging Face tensors: [`ParamSpec::hf_tensors`] lists them, [`ParamSpec::assemble`]
//! builds a parameter's values from them and [`ParamSpec::split`] cuts its values into them.

use std::ops::Range;

use anyhow::{ensure, Result};

use crate::backend::Backend;
use crate::weights::WeightSource;

/// One Hugging Face tensor stacked into a parameter: its name and how many rows (first-axis
/// entries) it contributes.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamPart {
    pub name: String,
    pub rows: usize,
}

/// One Hugging Face tensor of a parameter: its name, its shape, and the elements it occupies in
/// the parameter's row-major values.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
}

impl HfTensor {
    pub fn numel(&self) -> usize {
        self.range.len()
    }
}

/// One parameter tensor: a Hugging Face tensor (`parts` empty, `name` is its HF name), or several
/// stacked by rows in the order of `parts` (`name` is then kd-engine's own, e.g.
/// `model.layers.0.self_attn.qkv_proj.weight`).
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// Weight decay applies (matrices); never to biases or norm weights (HF Trainer's rule).
    pub decay: bool,
    /// The Hugging Face tensors stacked by rows into this parameter; empty for a plain tensor.
    pub parts: Vec<ParamPart>,
}

impl ParamSpec {
    /// A plain tensor of any shape.
    pub fn plain(name: String, shape: Vec<usize>, decay: bool) -> Self {
        ParamSpec { name, shape, decay, parts: Vec::new() }
    }
    pub fn matrix(name: String, rows: usize, cols: usize) -> Self {
        Self::plain(name, vec![rows, cols], true)
    }
    pub fn vector(name: String, len: usize) -> Self {
        Self::plain(name, vec![len], false)
    }
    /// Hugging Face tensors `parts` (name, rows) stacked by rows into one parameter `name`:
    /// shape `[Σ rows, cols]`, or `[Σ rows]` for 1-D parts (`cols` `None`, e.g. biases).
    pub fn stacked(name: String, parts: Vec<(String, usize)>, cols: Option<usize>, decay: bool) -> Self {
        assert!(!parts.is_empty(), "stacked parameter {name} has no parts");
        let rows = parts.iter().map(|p| p.1).sum();
        let shape = match cols {
            Some(c) => vec![rows, c],
            None => vec![rows],
        };
        let parts = parts.into_iter().map(|(name, rows)| ParamPart { name, rows }).collect();
        ParamSpec { name, shape, decay, parts }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_stacked(&self) -> bool {
        !self.parts.is_empty()
    }

    /// The Hugging Face tensors this parameter holds, in row order: itself when plain.
    pub fn hf_tensors(&self) -> Vec<HfTensor> {
        if self.parts.is_empty() {
            return vec![HfTensor { name: self.name.clone(), shape: self.shape.clone(), range: 0..self.numel() }];
        }
        let row_elems: usize = self.shape.iter().skip(1).product();
        let mut start = 0;
        self.parts
            .iter()
            .map(|p| {
                let mut shape = self.shape.clone();
                shape[0] = p.rows;
                let len = p.rows * row_elems;
                let t = HfTensor { name: p.name.clone(), shape, range: start..start + len };
                start += len;
                t
            })
            .collect()
    }

    /// The Hugging Face tensors as plain specs (decay as this parameter's): what an initialisation
    /// by name, or a file of Hugging Face tensors, sees.
    pub fn hf_specs(&self) -> Vec<ParamSpec> {
        self.hf_tensors().iter().map(|t| self.hf_spec(t)).collect()
    }

    /// Hugging Face tensor `t` of this parameter as a plain spec (decay as this parameter's).
    pub fn hf_spec(&self, t: &HfTensor) -> ParamSpec {
        Self::plain(t.name.clone(), t.shape.clone(), self.decay)
    }

    /// This parameter's values, assembled from its Hugging Face tensors: `part(t)` gives tensor
    /// `t`'s values (checked to have `t`'s element count). A plain parameter's values are its one
    /// tensor's, not copied.
    pub fn assemble(&self, mut part: impl FnMut(&HfTensor) -> Result<Vec<f32>>) -> Result<Vec<f32>> {
        let tensors = self.hf_tensors();
        let check = |t: &HfTensor, v: &[f32]| {
            ensure!(v.len() == t.numel(), "tensor {} has {} values, its shape {:?} needs {}", t.name, v.len(), t.shape, t.numel());
            Ok(())
        };
        if let [t] = tensors.as_slice() {
            let v = part(t)?;
            check(t, &v)?;
            return Ok(v);
        }
        let mut out = vec![0f32; self.numel()];
        for t in &tensors {
            let v = part(t)?;
            check(t, &v)?;
            out[t.range.clone()].copy_from_slice(&v);
        }
        Ok(out)
    }

    /// Reads this parameter from `source`, each Hugging Face tensor `t` as `name(t.name)` with its
    /// shape checked.
    pub fn read(&self, source: &WeightSource, name: impl Fn(&str) -> String) -> Result<Vec<f32>> {
        self.assemble(|t| source.read_f32(&name(&t.name), &t.shape))
    }

    /// Cuts this parameter's `values` into its Hugging Face tensors.
    pub fn split<'a>(&self, values: &'a [f32]) -> Result<Vec<(HfTensor, &'a [f32])>> {
        ensure!(
            values.len() == self.numel(),
            "parameter {} has {} values, its shape {:?} needs {}",
            self.name,
            values.len(),
            self.shape,
            self.numel()
        );
        let cut = |t: HfTensor| {
            let v = &values[t.range.clone()];
            (t, v)
        };
        Ok(self.hf_tensors().into_iter().map(cut).collect())
    }
}

/// The parameter holding Hugging Face tensor `name` among `specs`, and the tensor's element range
/// in it.
pub fn find_hf(specs: &[ParamSpec], name: &str) -> Option<(ParamId, Range<usize>)> {
    specs.iter().enumerate().find_map(|(i, s)| s.hf_tensors().into_iter().find(|t| t.name == name).map(|t| (ParamId(i), t.range)))
}

/// Index of a parameter in its set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamId(pub usize);

/// Buffers laid out as a list of specs.
#[derive(Clone)]
pub struct ParamSet<Buf> {
    pub specs: Vec<ParamSpec>,
    pub bufs: Vec<Buf>,
}

impl<Buf> ParamSet<Buf> {
    pub fn get(&self, id: ParamId) -> &Buf {
        &self.bufs[id.0]
    }
    pub fn get_mut(&mut self, id: ParamId) -> &mut Buf {
        &mut self.bufs[id.0]
    }
    pub fn numel(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }
    /// The parameter holding Hugging Face tensor `name`, and the tensor's element range in it.
    pub fn find_hf(&self, name: &str) -> Option<(ParamId, Range<usize>)> {
        find_hf(&self.specs, name)
    }

    pub fn zeros<B: Backend<Buf = Buf>>(be: &B, specs: &[ParamSpec]) -> Result<Self> {
        let bufs = specs.iter().map(|s| be.zeros(s.numel())).collect::<Result<_>>()?;
        Ok(ParamSet { specs: specs.to_vec(), bufs })
    }

    /// Loads every spec from `source`, each Hugging Face tensor as `prefix + name`, checking shapes.
    pub fn load<B: Backend<Buf = Buf>>(be: &B, specs: &[ParamSpec], source: &WeightSource, prefix: &str) -> Result<Self> {
        Self::load_named(be, specs, source, |n| format!("{prefix}{n}"))
    }

    /// Loads every spec from `source`, each Hugging Face tensor `t` as `name(t)`, checking shapes.
    pub fn load_named<B: Backend<Buf = Buf>>(
        be: &B,
        specs: &[ParamSpec],
        source: &WeightSource,
        name: impl Fn(&str) -> String,
    ) -> Result<Self> {
        let bufs = specs.iter().map(|s| be.upload(&s.read(source, &name)?)).collect::<Result<_>>()?;
        Ok(ParamSet { specs: specs.to_vec(), bufs })
    }

    /// Builds a set from host values: `init` is called for each Hugging Face tensor, in order, as
    /// a plain spec ([`ParamSpec::hf_specs`]), so an initialisation by name or shape gives a
    /// stacked parameter the values its tensors would have apart.
    pub fn from_fn<B: Backend<Buf = Buf>>(
        be: &B,
        specs: &[ParamSpec],
        mut init: impl FnMut(&ParamSpec) -> Vec<f32>,
    ) -> Result<Self> {
        let bufs = specs
            .iter()
            .map(|s| {
                let values = s.assemble(|t| Ok(init(&s.hf_spec(t))))?;
                be.upload(&values)
            })
            .collect::<Result<_>>()?;
        Ok(ParamSet { specs: specs.to_vec(), bufs })
    }

    pub fn zero_all<B: Backend<Buf = Buf>>(&mut self, be: &B) -> Result<()> {
        self.bufs.iter_mut().try_for_each(|b| be.fill_zero(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn qkv() -> ParamSpec {
        ParamSpec::stacked(
            "l.qkv_proj.weight".into(),
            vec![
                ("l.q_proj.weight".into(), 4),
                ("l.k_proj.weight".into(), 2),
                ("l.v_proj.weight".into(), 2),
            ],
            Some(3),
            true,
        )
    }
    fn qkv_bias() -> ParamSpec {
        ParamSpec::stacked(
            "l.qkv_proj.bias".into(),
            vec![
                ("l.q_proj.bias".into(), 4),
                ("l.k_proj.bias".into(), 2),
                ("l.v_proj.bias".into(), 2),
            ],
            None,
            false,
        )
    }

    #[test]
    fn a_stacked_matrix_lists_its_tensors_by_rows() {
        let s = qkv();
        assert_eq!(s.shape, vec![8, 3]);
        assert!(s.decay && s.is_stacked());
        let t = s.hf_tensors();
        let got: Vec<(&str, Vec<usize>, Range<usize>)> = t
            .iter()
            .map(|t| (t.name.as_str(), t.shape.clone(), t.range.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("l.q_proj.weight", vec![4, 3], 0..12),
                ("l.k_proj.weight", vec![2, 3], 12..18),
                ("l.v_proj.weight", vec![2, 3], 18..24)
            ]
        );
    }

    #[test]
    fn a_stacked_vector_lists_its_tensors_by_elements() {
        let s = qkv_bias();
        assert_eq!(s.shape, vec![8]);
        assert!(!s.decay);
        let got: Vec<(String, Vec<usize>, Range<usize>)> = s
            .hf_tensors()
            .into_iter()
            .map(|t| (t.name, t.shape, t.range))
            .collect();
        assert_eq!(
            got,
            vec![
                ("l.q_proj.bias".into(), vec![4], 0..4),
                ("l.k_proj.bias".into(), vec![2], 4..6),
                ("l.v_proj.bias".into(), vec![2], 6..8)
            ]
        );
    }

    #[test]
    fn a_plain_spec_is_its_own_one_tensor() {
        let s = ParamSpec::matrix("w".into(), 5, 7);
        assert!(!s.is_stacked());
        assert_eq!(
            s.hf_tensors(),
            vec![HfTensor {
                name: "w".into(),
                shape: vec![5, 7],
                range: 0..35
            }]
        );
        assert_eq!(s.hf_specs(), vec![s.clone()]);
    }

    #[test]
    fn assemble_and_split_place_each_tensor_in_its_rows() {
        let s = qkv();
        // Tensor values tagged by their own name: q → 100 + i, k → 200 + i, v → 300 + i.
        let tag = |name: &str| match name {
            "l.q_proj.weight" => 100.0,
            "l.k_proj.weight" => 200.0,
            "l.v_proj.weight" => 300.0,
            other => panic!("asked for {other}"),
        };
        let v = s
            .assemble(|t| Ok((0..t.numel()).map(|i| tag(&t.name) + i as f32).collect()))
            .unwrap();
        let mut want: Vec<f32> = (0..12).map(|i| 100.0 + i as f32).collect();
        want.extend((0..6).map(|i| 200.0 + i as f32));
        want.extend((0..6).map(|i| 300.0 + i as f32));
        assert_eq!(v, want);
        let parts = s.split(&v).unwrap();
        assert_eq!(parts.len(), 3);
        for (t, p) in &parts {
            let w: Vec<f32> = (0..t.numel()).map(|i| tag(&t.name) + i as f32).collect();
            assert_eq!(p.to_vec(), w, "{}", t.name);
        }
        assert!(s
            .split(&v[1..])
            .unwrap_err()
            .to_string()
            .contains("l.qkv_proj.weight"));
    }

    #[test]
    fn assemble_names_a_tensor_with_the_wrong_length() {
        let e = qkv()
            .assemble(|t| {
                Ok(vec![
                    0.0;
                    if t.name.contains("k_proj") {
                        5
                    } else {
                        t.numel()
                    }
                ])
            })
            .unwrap_err();
        assert!(e.to_string().contains("l.k_proj.weight"), "{e}");
    }

    #[test]
    fn find_hf_finds_a_tensor_inside_a_stacked_parameter() {
        let specs = vec![ParamSpec::vector("n".into(), 3), qkv(), qkv_bias()];
        assert_eq!(find_hf(&specs, "n"), Some((ParamId(0), 0..3)));
        assert_eq!(
            find_hf(&specs, "l.k_proj.weight"),
            Some((ParamId(1), 12..18))
        );
        assert_eq!(find_hf(&specs, "l.v_proj.bias"), Some((ParamId(2), 6..8)));
        assert_eq!(
            find_hf(&specs, "l.qkv_proj.weight"),
            None,
            "a stacked parameter's own name is no HF tensor"
        );
    }

    #[test]
    fn from_fn_initialises_a_stacked_parameter_per_tensor() {
        let be = CpuBackend::<f32>::new();
        let specs = vec![qkv(), qkv_bias()];
        let mut seen = Vec::new();
        let set = ParamSet::from_fn(&be, &specs, |s| {
            seen.push((s.name.clone(), s.shape.clone(), s.decay, s.is_stacked()));
            vec![seen.len() as f32; s.numel()]
        })
        .unwrap();
        assert_eq!(
            seen[1],
            ("l.k_proj.weight".to_string(), vec![2, 3], true, false)
        );
        assert_eq!(
            seen[3],
            ("l.q_proj.bias".to_string(), vec![4], false, false)
        );
        assert_eq!(seen.len(), 6);
        let mut want = vec![1.0; 12];
        want.extend([2.0; 6]);
        want.extend([3.0; 6]);
        assert_eq!(set.bufs[0], want);
        assert_eq!(set.bufs[1], vec![4.0, 4.0, 4.0, 4.0, 5.0, 5.0, 6.0, 6.0]);
        assert_eq!(set.find_hf("l.q_proj.bias"), Some((ParamId(1), 0..4)));
    }
}
