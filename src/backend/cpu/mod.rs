//! The CPU backend: plain Rust, generic over the element type (f32 to run, f64 for gradient checks,
//! where f32 central differences drown in rounding noise). It is the reference every other backend
//! is tested against, so it favours clarity; the hot loops still use both cores (rayon row loops and
//! threaded `matrixmultiply` GEMMs).

mod attention;
pub mod bf16;
mod decode;
mod distill;
mod elementwise;
mod loss;
mod norm;

use std::marker::PhantomData;

use anyhow::{ensure, Context, Result};
use num_traits::{Float, FromPrimitive, ToPrimitive};

use super::{check_slot, AdamWStep, AttnShape, Backend, Gemm, GeluKind, KlShape};

/// Element types the CPU backend computes in.
pub trait Elem:
    Float + FromPrimitive + ToPrimitive + Default + Send + Sync + std::fmt::Debug + std::iter::Sum + 'static
{
    /// Strided GEMM (`matrixmultiply` argument order: `C[m,n] = α·A[m,k]·B[k,n] + β·C`).
    ///
    /// # Safety
    /// The pointers and strides must describe valid, non-overlapping matrices of the given sizes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
    fn of(x: f64) -> Self {
        Self::from_f64(x).unwrap_or_else(Self::nan)
    }
    fn f64(self) -> f64 {
        self.to_f64().unwrap_or(f64::NAN)
    }
}

impl Elem for f32 {
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl Elem for f64 {
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

/// The CPU backend over element type `T`.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend<T: Elem>(PhantomData<T>);

impl<T: Elem> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend(PhantomData)
    }
}

/// Length checks shared by every op: a mismatch is a bug in the caller, reported rather than
/// allowed to read out of bounds.
fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    ensure!(got == want, "cpu backend: {what} has {got} elements, expected {want}");
    Ok(())
}

impl<T: Elem> Backend for CpuBackend<T> {
    type Buf = Vec<T>;
    type State = Vec<T>;
    /// Plain f64 values: the CPU computes every loss at once, so there is nothing to defer.
    type Sums = Vec<f64>;

    fn name(&self) -> String {
        format!("cpu ({}, {} threads)", std::any::type_name::<T>(), rayon::current_num_threads())
    }

    fn zeros(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::zero(); len])
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<T>> {
        Ok(data.iter().map(|&x| T::of(x as f64)).collect())
    }

    fn download(&self, buf: &Vec<T>) -> Result<Vec<f32>> {
        Ok(buf.iter().map(|x| x.f64() as f32).collect())
    }

    fn len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }

    fn zeros_state(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::zero(); len])
    }

    fn upload_state(&self, data: &[f32]) -> Result<Vec<T>> {
        self.upload(data)
    }

    fn download_state(&self, buf: &Vec<T>) -> Result<Vec<f32>> {
        self.download(buf)
    }

    fn fill_zero(&self, buf: &mut Vec<T>) -> Result<()> {
        buf.iter_mut().for_each(|x| *x = T::zero());
        Ok(())
    }

    fn sums(&self, n: usize) -> Result<Vec<f64>> {
        Ok(vec![0.0; n])
    }

    fn read_sums(&self, sums: &Vec<f64>) -> Result<Vec<f64>> {
        Ok(sums.clone())
    }

    fn copy_range(
        &self,
        src: &Vec<T>,
        src_off: usize,
        dst: &mut Vec<T>,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        ensure!(
            src_off + len <= src.len() && dst_off + len <= dst.len(),
            "cpu backend: copy of {len} elements out of range (src {src_off}/{}, dst {dst_off}/{})",
            src.len(),
            dst.len()
        );
        dst[dst_off..dst_off + len].copy_from_slice(&src[src_off..src_off + len]);
        Ok(())
    }

    fn gemm(&self, g: Gemm, a: &Vec<T>, b: &Vec<T>, c: &mut Vec<T>) -> Result<()> {
        check_len("gemm A", a.len(), g.m * g.k)?;
        check_len("gemm B", b.len(), g.k * g.n)?;
        check_len("gemm C", c.len(), g.m * g.n)?;
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        if decode::few_rows(&g) {
            return decode::gemm_few_rows(g, a, b, c);
        }
        let (rsa, csa) = if g.trans_a { (1, g.m as isize) } else { (g.k as isize, 1) };
        let (rsb, csb) = if g.trans_b { (1, g.k as isize) } else { (g.n as isize, 1) };
        // SAFETY: lengths checked above; A, B and C are distinct Vecs (C is &mut).
        unsafe {
            T::gemm_raw(
                g.m,
                g.k,
                g.n,
                T::of(g.alpha as f64),
                a.as_ptr(),
                rsa,
                csa,
                b.as_ptr(),
                rsb,
                csb,
                T::of(g.beta as f64),
                c.as_mut_ptr(),
                g.n as isize,
                1,
            )
        }
        Ok(())
    }

    fn add_bias(&self, x: &mut Vec<T>, bias: &Vec<T>, rows: usize) -> Result<()> {
        elementwise::add_bias(x, bias, rows)
    }

    fn bias_grad(&self, dy: &Vec<T>, dbias: &mut Vec<T>, rows: usize) -> Result<()> {
        elementwise::bias_grad(dy, dbias, rows)
    }

    fn add_assign(&self, dst: &mut Vec<T>, src: &Vec<T>) -> Result<()> {
        check_len("add_assign source", src.len(), dst.len())?;
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = *d + s);
        Ok(())
    }

    fn scale(&self, x: &mut Vec<T>, s: f32) -> Result<()> {
        let s = T::of(s as f64);
        x.iter_mut().for_each(|v| *v = *v * s);
        Ok(())
    }

    fn sum_squares_into(&self, parts: &[(&Vec<T>, std::ops::Range<usize>)], out: &mut Vec<f64>, slot: usize) -> Result<()> {
        check_slot("sum_squares", slot, out.len())?;
        let sums = parts
            .iter()
            .map(|(x, r)| {
                let s = x.get(r.clone()).with_context(|| format!("sum_squares: range {r:?} of a buffer of {}", x.len()))?;
                Ok(s.iter().map(|v| v.f64() * v.f64()).sum::<f64>())
            })
            .collect::<Result<Vec<f64>>>()?;
        out[slot] += sums.into_iter().sum::<f64>();
        Ok(())
    }

    fn embedding(&self, table: &Vec<T>, ids: &[u32], dim: usize, out: &mut Vec<T>) -> Result<()> {
        elementwise::embedding(table, ids, dim, out)
    }

    fn embedding_backward(
        &self,
        dout: &Vec<T>,
        ids: &[u32],
        dim: usize,
        dtable: &mut Vec<T>,
    ) -> Result<()> {
        elementwise::embedding_backward(dout, ids, dim, dtable)
    }

    fn rmsnorm(
        &self,
        x: &Vec<T>,
        w: &Vec<T>,
        eps: f32,
        out: &mut Vec<T>,
        rstd: &mut Vec<T>,
    ) -> Result<()> {
        norm::rmsnorm(x, w, eps, out, rstd)
    }

    fn rmsnorm_backward(
        &self,
        dout: &Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        rstd: &Vec<T>,
        dx: &mut Vec<T>,
        dw: &mut Vec<T>,
    ) -> Result<()> {
        norm::rmsnorm_backward(dout, x, w, rstd, dx, dw)
    }

    fn layernorm(&self, x: &Vec<T>, w: &Vec<T>, b: &Vec<T>, eps: f32, out: &mut Vec<T>) -> Result<()> {
        norm::layernorm(x, w, b, eps, out)
    }

    fn qkv_split_rope(
        &self,
        qkv: &Vec<T>,
        bias: Option<&Vec<T>>,
        positions: &[u32],
        head_dim: usize,
        theta: f64,
        q: &mut Vec<T>,
        k: &mut Vec<T>,
        v: &mut Vec<T>,
    ) -> Result<()> {
        elementwise::qkv_split_rope(qkv, bias.map(Vec::as_slice), positions, head_dim, theta, q, k, v)
    }

    fn qkv_merge_rope_backward(
        &self,
        dq: &Vec<T>,
        dk: &Vec<T>,
        dv: &Vec<T>,
        positions: &[u32],
        head_dim: usize,
        theta: f64,
        dqkv: &mut Vec<T>,
    ) -> Result<()> {
        elementwise::qkv_merge_rope_backward(dq, dk, dv, positions, head_dim, theta, dqkv)
    }

    fn attention(
        &self,
        shape: AttnShape,
        seq_lens: &[usize],
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &mut Vec<T>,
        lse: &mut Vec<T>,
    ) -> Result<()> {
        attention::forward(shape, seq_lens, q, k, v, out, lse)
    }

    fn attention_backward(
        &self,
        shape: AttnShape,
        seq_lens: &[usize],
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &Vec<T>,
        lse: &Vec<T>,
        dout: &Vec<T>,
        dq: &mut Vec<T>,
        dk: &mut Vec<T>,
        dv: &mut Vec<T>,
    ) -> Result<()> {
        attention::backward(shape, seq_lens, q, k, v, out, lse, dout, dq, dk, dv)
    }

    fn attention_decode(
        &self,
        shape: AttnShape,
        capacity: usize,
        slots: &[u32],
        lens: &[usize],
        q: &Vec<T>,
        k_cache: &Vec<T>,
        v_cache: &Vec<T>,
        out: &mut Vec<T>,
    ) -> Result<()> {
        decode::attention_decode(shape, capacity, slots, lens, q, k_cache, v_cache, out)
    }

    fn swiglu(&self, gate_up: &Vec<T>, inter: usize, out: &mut Vec<T>) -> Result<()> {
        elementwise::swiglu(gate_up, inter, out)
    }

    fn swiglu_backward(&self, gate_up: &Vec<T>, inter: usize, dout: &Vec<T>, dgate_up: &mut Vec<T>) -> Result<()> {
        elementwise::swiglu_backward(gate_up, inter, dout, dgate_up)
    }

    fn gelu(&self, x: &Vec<T>, out: &mut Vec<T>, kind: GeluKind) -> Result<()> {
        elementwise::gelu(x, out, kind)
    }

    fn gelu_backward(&self, x: &Vec<T>, dout: &Vec<T>, dx: &mut Vec<T>, kind: GeluKind) -> Result<()> {
        elementwise::gelu_backward(x, dout, dx, kind)
    }

    fn softmax_kl_into(
        &self,
        student: &Vec<T>,
        teacher: &Vec<T>,
        shape: KlShape,
        rows: &[u32],
        scale: f32,
        dstudent: &mut Vec<T>,
        sums: &mut Vec<f64>,
        slot: usize,
    ) -> Result<()> {
        check_slot("softmax_kl", slot, sums.len())?;
        sums[slot] += distill::softmax_kl(student, teacher, shape, rows, scale, dstudent)?;
        Ok(())
    }

    fn softmax_kl_ce_into(
        &self,
        student: &Vec<T>,
        teacher: &Vec<T>,
        shape: KlShape,
        rows: &[u32],
        targets: &[i32],
        scale: f32,
        ce_scale: f32,
        dstudent: &mut Vec<T>,
        sums: &mut Vec<f64>,
        kl_slot: usize,
        ce_slot: usize,
    ) -> Result<()> {
        check_slot("softmax_kl_ce (KL)", kl_slot, sums.len())?;
        check_slot("softmax_kl_ce (CE)", ce_slot, sums.len())?;
        let (kl, ce) = distill::softmax_kl_ce(student, teacher, shape, rows, targets, scale, ce_scale, dstudent)?;
        sums[kl_slot] += kl;
        sums[ce_slot] += ce;
        Ok(())
    }

    fn relation_loss_into(
        &self,
        student: &Vec<T>,
        teacher: &Vec<T>,
        shape: KlShape,
        images: &[(u32, u32)],
        scale: f32,
        dstudent: &mut Vec<T>,
        sums: &mut Vec<f64>,
        slot: usize,
    ) -> Result<()> {
        check_slot("relation_loss", slot, sums.len())?;
        sums[slot] += distill::relation_loss(student, teacher, shape, images, scale, dstudent)?;
        Ok(())
    }

    fn gram_cosine_into(&self, rs: &Vec<T>, rt: &Vec<T>, scale: f32, grad: &mut Vec<T>, sums: &mut Vec<f64>, slot: usize) -> Result<()> {
        check_slot("gram_cosine", slot, sums.len())?;
        check_len("gram_cosine teacher Gram", rt.len(), rs.len())?;
        check_len("gram_cosine gradient", grad.len(), rs.len())?;
        sums[slot] += distill::gram_cosine(rs, rt, scale as f64, grad).0;
        Ok(())
    }

    fn cross_entropy_into(
        &self,
        logits: &Vec<T>,
        targets: &[i32],
        vocab: usize,
        scale: f32,
        dlogits: &mut Vec<T>,
        sums: &mut Vec<f64>,
        slot: usize,
    ) -> Result<()> {
        check_slot("cross_entropy", slot, sums.len())?;
        sums[slot] += loss::cross_entropy(logits, targets, vocab, scale, dlogits)?;
        Ok(())
    }

    fn adamw(
        &self,
        h: AdamWStep,
        param: &mut Vec<T>,
        grad: &Vec<T>,
        offset: usize,
        m: &mut Vec<T>,
        v: &mut Vec<T>,
        master: Option<&mut Vec<T>>,
    ) -> Result<()> {
        let range = offset..offset + m.len();
        let (n, glen) = (param.len(), grad.len());
        let param = param.get_mut(range.clone()).with_context(|| format!("adamw: elements {range:?} of {n} parameters"))?;
        let grad = grad.get(range.clone()).with_context(|| format!("adamw: elements {range:?} of {glen} gradients"))?;
        match master {
            // The CPU stores parameters in T (≥ f32): a master copy is updated like the
            // parameters and the parameters are set to it, so both paths give the same values.
            Some(master) => {
                check_len("adamw master weights", master.len(), param.len())?;
                elementwise::adamw(h, master, grad, m, v)?;
                param.copy_from_slice(master);
                Ok(())
            }
            None => elementwise::adamw(h, param, grad, m, v),
        }
    }
}
