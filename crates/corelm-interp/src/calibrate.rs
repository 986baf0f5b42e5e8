//! Calibration statistics for compression: the Gram matrix Σ x xᵀ of the inputs each layer
//! (`linear`, or 1×1 `conv` in the Neural Engine layout) sees while the model reads a text, by
//! weight name. With them, integer quantization
//! rounds a layer's weights so that its outputs, rather than each weight, stay close (GPTQ;
//! `corelm_convert::compress`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use corelm_contract::driver::{Executor, LanguageModel};
use corelm_contract::tensor::Tensors;
use corelm_format::Package;

use crate::executor::CarriedState;
use crate::matmul::{matmul_t, WeightRows};
use crate::value::Value;
use crate::{Error, Features, Interpreter, Result};

/// Σ x xᵀ (cols × cols, row-major) by the name of the weight the inputs x met. Layers that read
/// the same value (q, k and v projections) share one matrix.
pub type Grams = HashMap<String, Arc<Vec<f64>>>;

#[derive(Default)]
struct Sums {
    index: HashMap<String, usize>,
    grams: Vec<Vec<f64>>,
    /// The value observed last, so the layers after it that read the same value share its sums.
    last: Option<(Arc<Value>, usize)>,
}

impl Sums {
    fn add(&mut self, weight: &str, x: &Arc<Value>, features: Features) -> Result<()> {
        if let Some((seen, g)) = &self.last {
            if Arc::ptr_eq(seen, x) {
                self.index.entry(weight.to_string()).or_insert(*g);
                return Ok(());
            }
        }
        let axis = match features {
            Features::Last => x.rank().checked_sub(1),
            Features::Channels => (x.rank() > 1).then_some(1),
        };
        let axis = axis.ok_or_else(|| Error::invalid(format!("`{weight}`: an input of shape {:?}", x.shape)))?;
        let cols = x.shape[axis];
        // Each feature vector: `cols` values `inner` apart, in `outer` runs.
        let inner: usize = x.shape[axis + 1..].iter().product();
        let xs = x.as_f32()?;
        if xs.is_empty() {
            return Ok(());
        }
        let rows = xs.len() / cols;
        let g = *self.index.entry(weight.to_string()).or_insert_with(|| {
            self.grams.push(vec![0.0; cols * cols]);
            self.grams.len() - 1
        });
        if self.grams[g].len() != cols * cols {
            return Err(Error::invalid(format!("`{weight}` met inputs of different widths")));
        }
        // XᵀX as (Xᵀ)(Xᵀ)ᵀ through the matrix kernel, which multiplies by a transposed operand.
        let mut xt = vec![0f32; cols * rows];
        for (o, block) in xs.chunks(cols * inner).enumerate() {
            for (c, run) in block.chunks(inner).enumerate() {
                xt[c * rows + o * inner..][..inner].copy_from_slice(run);
            }
        }
        let mut product = vec![0f32; cols * cols];
        matmul_t(cols, rows, cols, &xt, WeightRows::F32(&xt), &mut product);
        for (sum, p) in self.grams[g].iter_mut().zip(product) {
            *sum += p as f64;
        }
        self.last = Some((x.clone(), g));
        Ok(())
    }
}

/// An interpreter that adds what every linear layer reads to shared sums.
struct Observing {
    interpreter: Interpreter,
    sums: Arc<Mutex<Sums>>,
}

impl Executor for Observing {
    type State = CarriedState;

    fn new_state(&self, function: Option<&str>) -> Result<CarriedState> {
        Executor::new_state(&self.interpreter, function)
    }

    fn predict(&mut self, function: Option<&str>, inputs: &Tensors, state: &mut CarriedState) -> Result<Tensors> {
        let mut sums = self.sums.lock().map_err(|_| Error::invalid("calibration sums poisoned"))?;
        let sums: &mut Sums = &mut sums;
        // Values of an earlier call may have been freed and their addresses reused.
        sums.last = None;
        let mut failed = None;
        let mut observe = |weight: &str, x: &Arc<Value>, features| {
            if failed.is_none() {
                failed = sums.add(weight, x, features).err();
            }
        };
        let out = self.interpreter.predict_carrying(function, inputs, state, None, Some(&mut observe))?;
        failed.map_or(Ok(out), Err)
    }
}

/// Tokens per calibration window, at most.
const WINDOW: usize = 512;

/// Runs `tokens` through the package (and its sibling parts) on the interpreter, in windows
/// that each start from an empty cache, and returns Σ x xᵀ of every layer's inputs over them.
/// The windows are whole multiples of 64 tokens (as the context allows) and a short tail is
/// left out, so fixed-length functions (the Neural Engine profile's 64-token prefill) see no
/// padding rows. `progress` hears the tokens done after each window.
pub fn input_grams(pkg: &Package, tokens: &[u32], progress: &mut dyn FnMut(usize)) -> Result<Grams> {
    let sums = Arc::new(Mutex::new(Sums::default()));
    let mut lm =
        LanguageModel::open(pkg, |p| Ok(Observing { interpreter: Interpreter::load(p)?, sums: sums.clone() }))?;
    let fit = lm.context().min(WINDOW);
    let window = if fit >= 64 { fit / 64 * 64 } else { fit };
    let windows: Vec<&[u32]> = match tokens.len() >= window {
        true => tokens.chunks_exact(window).collect(),
        false => vec![tokens],
    };
    let mut done = 0;
    for window in windows {
        lm.reset()?;
        lm.feed_last(window)?;
        done += window.len();
        progress(done);
    }
    drop(lm);
    let sums = Arc::into_inner(sums).ok_or_else(|| Error::invalid("calibration sums still shared"))?;
    let sums = sums.into_inner().map_err(|_| Error::invalid("calibration sums poisoned"))?;
    let grams: Vec<Arc<Vec<f64>>> = sums.grams.into_iter().map(Arc::new).collect();
    Ok(sums.index.into_iter().map(|(name, g)| (name, grams[g].clone())).collect())
}
