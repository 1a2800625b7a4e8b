//! Named parameter sets: weights, their gradients and optimizer moments share one layout, so
//! loading, the optimizer and checkpoints walk the same list.

use anyhow::Result;

use crate::backend::Backend;
use crate::weights::WeightSource;

/// One parameter tensor, by its Hugging Face name.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// Weight decay applies (matrices); never to biases or norm weights (HF Trainer's rule).
    pub decay: bool,
}

impl ParamSpec {
    pub fn matrix(name: String, rows: usize, cols: usize) -> Self {
        ParamSpec { name, shape: vec![rows, cols], decay: true }
    }
    pub fn vector(name: String, len: usize) -> Self {
        ParamSpec { name, shape: vec![len], decay: false }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
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

    pub fn zeros<B: Backend<Buf = Buf>>(be: &B, specs: &[ParamSpec]) -> Result<Self> {
        let bufs = specs.iter().map(|s| be.zeros(s.numel())).collect::<Result<_>>()?;
        Ok(ParamSet { specs: specs.to_vec(), bufs })
    }

    /// Loads every spec from `source` as `prefix + name`, checking shapes.
    pub fn load<B: Backend<Buf = Buf>>(be: &B, specs: &[ParamSpec], source: &WeightSource, prefix: &str) -> Result<Self> {
        let bufs = specs
            .iter()
            .map(|s| be.upload(&source.read_f32(&format!("{prefix}{}", s.name), &s.shape)?))
            .collect::<Result<_>>()?;
        Ok(ParamSet { specs: specs.to_vec(), bufs })
    }

    /// Builds a set from host values produced by `init(spec)`.
    pub fn from_fn<B: Backend<Buf = Buf>>(
        be: &B,
        specs: &[ParamSpec],
        mut init: impl FnMut(&ParamSpec) -> Vec<f32>,
    ) -> Result<Self> {
        let bufs = specs.iter().map(|s| be.upload(&init(s))).collect::<Result<_>>()?;
        Ok(ParamSet { specs: specs.to_vec(), bufs })
    }

    pub fn zero_all<B: Backend<Buf = Buf>>(&mut self, be: &B) -> Result<()> {
        self.bufs.iter_mut().try_for_each(|b| be.fill_zero(b))
    }
}
