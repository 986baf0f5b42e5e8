//! The interpreter as an [`Executor`] of the generation driver
//! ([`LanguageModel`](corelm_contract::driver::LanguageModel)): the driver's tensors become values
//! at this boundary, and the KV caches a package passes as inputs and outputs stay values, carried
//! from one prediction to the next without a copy.

use std::collections::BTreeMap;

use corelm_contract::driver::Executor;
use corelm_contract::names;
use corelm_contract::tensor::Tensors;

use crate::value::Value;
use crate::{Error, Interpreter, Observer, Result, State};

/// What the interpreter carries from one prediction to the next: the function's states, and the
/// KV caches the package passes as inputs and outputs, as the last prediction returned them.
#[derive(Default, Clone)]
pub struct CarriedState {
    states: State,
    /// Each input that the output `<input>Out` feeds, with its value for the next call (zeros at
    /// first).
    caches: Vec<(String, Value)>,
}

impl Executor for Interpreter {
    type State = CarriedState;

    fn new_state(&self, function: Option<&str>) -> Result<CarriedState> {
        let (_, plan) = self.plan(function)?;
        let mut caches = Vec::new();
        for (name, _, ty) in &plan.inputs {
            if !plan.outputs.iter().any(|(output, _)| *output == names::carried_output(name)) {
                continue;
            }
            let shape = ty.shape().ok_or_else(|| Error::invalid(format!("{name} needs a fixed shape")))?;
            caches.push((name.clone(), Value::zeros(ty.dtype, shape, &format_args!("input `{name}`"))?));
        }
        Ok(CarriedState { states: Interpreter::new_state(self, function)?, caches })
    }

    fn predict(&mut self, function: Option<&str>, inputs: &Tensors, state: &mut CarriedState) -> Result<Tensors> {
        self.predict_carrying(function, inputs, state, None, None)
    }

    /// Values are shared until written (copy on write), so a copy costs nothing until then.
    fn copy_state(&self, state: &CarriedState) -> Result<CarriedState> {
        Ok(state.clone())
    }

    fn predict_row(
        &mut self,
        function: Option<&str>,
        inputs: &Tensors,
        state: &mut CarriedState,
        row: usize,
    ) -> Result<Tensors> {
        self.predict_carrying(function, inputs, state, Some(row), None)
    }
}

impl Interpreter {
    /// One prediction for the driver: its tensors copied into values once (as
    /// [`predict`](Interpreter::predict) copies its inputs), the carried caches moved in (the
    /// program updates them in place) and the ones it returns moved back, the outputs moved out.
    /// `row` as for [`predict_row`](Interpreter::predict_row); `observe` sees each layer's input
    /// (calibration). A failed prediction leaves no caches, as a reset will make new ones.
    pub(crate) fn predict_carrying(
        &self,
        function: Option<&str>,
        inputs: &Tensors,
        state: &mut CarriedState,
        row: Option<usize>,
        observe: Option<&mut Observer<'_>>,
    ) -> Result<Tensors> {
        let carried: Vec<String> = state.caches.iter().map(|(name, _)| name.clone()).collect();
        let mut values: BTreeMap<String, Value> =
            inputs.iter().map(|(name, t)| (name.clone(), Value::from_host(t))).collect();
        values.extend(std::mem::take(&mut state.caches));
        let mut out = self.predict_owned(function, values, &mut state.states, row, observe)?;
        for name in carried {
            let output = names::carried_output(&name);
            let value = out.remove(&output).ok_or_else(|| Error::invalid(format!("no {output} output")))?;
            state.caches.push((name, value));
        }
        out.into_iter()
            .map(|(name, value)| {
                let tensor = value.into_host(&name)?;
                Ok((name, tensor))
            })
            .collect()
    }
}
