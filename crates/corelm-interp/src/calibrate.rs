//! Calibration statistics for compression: the Gram matrix Σ x xᵀ of the inputs each linear
//! layer sees while the model reads a text, by weight name. With them, integer quantization
//! rounds a layer's weights so that its outputs, rather than each weight, stay close (GPTQ;
//! `corelm_convert::compress`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use corelm_format::Package;

use crate::lm::{chunk_packages, Executor, LanguageModel};
use crate::matmul::{matmul_t, WeightRows};
use crate::value::Value;
use crate::{Error, Interpreter, Result, State};

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
    fn add(&mut self, weight: &str, x: &Arc<Value>) -> Result<()> {
        if let Some((seen, g)) = &self.last {
            if Arc::ptr_eq(seen, x) {
                self.index.entry(weight.to_string()).or_insert(*g);
                return Ok(());
            }
        }
        let cols = *x.shape.last().ok_or_else(|| Error::invalid(format!("`{weight}`: a scalar linear input")))?;
        let xs = x.as_f32()?;
        let rows = xs.len() / cols.max(1);
        let g = *self.index.entry(weight.to_string()).or_insert_with(|| {
            self.grams.push(vec![0.0; cols * cols]);
            self.grams.len() - 1
        });
        if self.grams[g].len() != cols * cols {
            return Err(Error::invalid(format!("`{weight}` met inputs of different widths")));
        }
        // XᵀX as (Xᵀ)(Xᵀ)ᵀ through the matrix kernel, which multiplies by a transposed operand.
        let mut xt = vec![0f32; cols * rows];
        for (r, row) in xs.chunks(cols).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                xt[c * rows + r] = v;
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
struct Observing<'a> {
    interpreter: Interpreter,
    sums: &'a Mutex<Sums>,
}

impl Executor for Observing<'_> {
    type State = State;

    fn new_state(&self, function: Option<&str>) -> Result<State> {
        self.interpreter.new_state(function)
    }

    fn predict(
        &mut self,
        function: Option<&str>,
        inputs: &std::collections::BTreeMap<String, Value>,
        state: &mut State,
    ) -> Result<std::collections::BTreeMap<String, Value>> {
        let mut sums = self.sums.lock().map_err(|_| Error::invalid("calibration sums poisoned"))?;
        let sums: &mut Sums = &mut sums;
        // Values of an earlier call may have been freed and their addresses reused.
        sums.last = None;
        let mut failed = None;
        let out = self.interpreter.predict_observed(function, inputs, state, &mut |weight, x| {
            if failed.is_none() {
                failed = sums.add(weight, x).err();
            }
        })?;
        failed.map_or(Ok(out), Err)
    }
}

/// Runs each window of token ids through the package (and its sibling parts), from an empty
/// cache, on the interpreter, and returns Σ x xᵀ of every linear layer's inputs over all of
/// them. `progress` hears the tokens done after each window.
pub fn input_grams(pkg: &Package, windows: &[&[u32]], progress: &mut dyn FnMut(usize)) -> Result<Grams> {
    let sums = Mutex::new(Sums::default());
    let siblings = chunk_packages(pkg)?;
    let parts: Vec<&Package> = match &siblings {
        Some(parts) => parts.iter().collect(),
        None => vec![pkg],
    };
    let executors = parts
        .iter()
        .map(|p| Ok(Observing { interpreter: Interpreter::load(p)?, sums: &sums }))
        .collect::<Result<Vec<_>>>()?;
    let mut lm = LanguageModel::with_executors(&parts, executors)?;
    let mut done = 0;
    for window in windows {
        lm.reset()?;
        lm.feed_last(window)?;
        done += window.len();
        progress(done);
    }
    drop(lm);
    let sums = sums.into_inner().map_err(|_| Error::invalid("calibration sums poisoned"))?;
    let grams: Vec<Arc<Vec<f64>>> = sums.grams.into_iter().map(Arc::new).collect();
    Ok(sums.index.into_iter().map(|(name, g)| (name, grams[g].clone())).collect())
}
