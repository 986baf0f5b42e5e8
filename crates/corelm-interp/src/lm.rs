//! A converted language model driven through its Core ML interface: token ids in, logits out,
//! the KV cache kept between calls. Handles the three interfaces corelm writes: one function
//! with a flexible query length (states), fixed query lengths as functions (states and a
//! `position` input), and KV caches passed as inputs and outputs (iOS 16/17).

use std::collections::BTreeMap;

use corelm_format::{DType, Package};

use crate::value::{Data, Value};
use crate::{Error, Interpreter, Result, State};

enum Interface {
    Flexible,
    /// (query length, function name), longest first.
    Fixed(Vec<(usize, String)>),
    TensorCaches,
}

pub struct LanguageModel {
    interp: Interpreter,
    interface: Interface,
    context: usize,
    mask_dtype: DType,
    state: State,
    caches: Option<(Value, Value)>,
    position: usize,
}

impl LanguageModel {
    pub fn open(pkg: &Package) -> Result<LanguageModel> {
        let interp = Interpreter::load(pkg)?;
        let mut fixed = Vec::new();
        let mut interface = Interface::Flexible;
        let mut context = 0;
        let mut mask_dtype = DType::Fp16;
        for name in interp.functions().map(str::to_string).collect::<Vec<_>>() {
            let inputs = interp.inputs(Some(&name))?;
            let find = |n: &str| inputs.iter().find(|(i, _)| i == n).map(|(_, t)| t.clone());
            let ids =
                find("inputIds").ok_or_else(|| Error::invalid(format!("function `{name}` has no inputIds input")))?;
            let mask = find("causalMask")
                .ok_or_else(|| Error::invalid(format!("function `{name}` has no causalMask input")))?;
            mask_dtype = mask.dtype;
            if let Some(cache) = find("keyCache") {
                interface = Interface::TensorCaches;
                context = cache.dims[3].fixed().unwrap_or(0);
            } else if find("position").is_some() {
                let n = ids.dims[1]
                    .fixed()
                    .ok_or_else(|| Error::invalid("fixed-length functions need a fixed inputIds"))?;
                fixed.push((n, name.clone()));
                context = mask.dims[3].fixed().unwrap_or(0);
            }
        }
        if !fixed.is_empty() {
            fixed.sort_by_key(|f| std::cmp::Reverse(f.0));
            interface = Interface::Fixed(fixed);
        }
        if matches!(interface, Interface::Flexible) {
            let ctx = pkg.model().description.metadata.user_defined.get("corelm.context_length");
            context = match ctx.and_then(|c| c.parse().ok()) {
                Some(c) => c,
                None => {
                    let f = pkg.model().description.functions.first().ok_or_else(|| Error::invalid("no functions"))?;
                    f.states.first().and_then(|s| s.array()).and_then(|a| a.shape.get(3).copied()).unwrap_or(0)
                }
            };
        }
        if context == 0 {
            return Err(Error::invalid("cannot tell the model's context length"));
        }
        let state = interp.new_state(match &interface {
            Interface::Fixed(f) => Some(f[0].1.as_str()),
            _ => None,
        })?;
        let mut lm = LanguageModel { interp, interface, context, mask_dtype, state, caches: None, position: 0 };
        lm.reset()?;
        Ok(lm)
    }

    pub fn context(&self) -> usize {
        self.context
    }

    pub fn position(&self) -> usize {
        self.position
    }

    /// Forgets everything fed so far.
    pub fn reset(&mut self) -> Result<()> {
        self.position = 0;
        let function = match &self.interface {
            Interface::Fixed(f) => Some(f[0].1.clone()),
            _ => None,
        };
        self.state = self.interp.new_state(function.as_deref())?;
        if let Interface::TensorCaches = self.interface {
            let inputs = self.interp.inputs(None)?;
            let cache = inputs.iter().find(|(n, _)| n == "keyCache").map(|(_, t)| t.clone());
            let cache = cache.ok_or_else(|| Error::invalid("no keyCache input"))?;
            let shape = cache.shape().ok_or_else(|| Error::invalid("keyCache needs a fixed shape"))?;
            self.caches = Some((Value::zeros(cache.dtype, shape.clone()), Value::zeros(cache.dtype, shape)));
        }
        Ok(())
    }

    /// Causal mask rows for `n` queries starting at the current position over `width` keys.
    fn mask(&self, n: usize, width: usize) -> Value {
        let mut m = vec![f32::NEG_INFINITY; n * width];
        for i in 0..n {
            for j in 0..=(self.position + i).min(width - 1) {
                m[i * width + j] = 0.0;
            }
        }
        Value::f32(self.mask_dtype, vec![1, 1, n, width], m)
    }

    /// Feeds tokens; returns the logits of each fed position.
    pub fn feed(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        if self.position + ids.len() > self.context {
            return Err(Error::invalid(format!(
                "{} tokens after {} already fed exceed the context of {}",
                ids.len(),
                self.position,
                self.context
            )));
        }
        match &self.interface {
            Interface::Fixed(lengths) => {
                let lengths = lengths.clone();
                let mut rows = Vec::new();
                let mut rest = ids;
                while !rest.is_empty() {
                    // The longest length that fits, else the shortest one that covers the rest.
                    let (n, name) = lengths
                        .iter()
                        .find(|(n, _)| *n <= rest.len())
                        .or_else(|| lengths.iter().rev().find(|(n, _)| *n >= rest.len()))
                        .cloned()
                        .ok_or_else(|| Error::invalid("no function length fits"))?;
                    let take = n.min(rest.len());
                    if self.position + n > self.context {
                        return Err(Error::invalid("the padded chunk does not fit the context"));
                    }
                    let mut chunk: Vec<i32> = rest[..take].iter().map(|&t| t as i32).collect();
                    chunk.resize(n, 0);
                    let inputs = BTreeMap::from([
                        ("inputIds".to_string(), Value::i32(vec![1, n], chunk)),
                        ("causalMask".to_string(), self.mask(n, self.context)),
                        ("position".to_string(), Value::i32(vec![1], vec![self.position as i32])),
                    ]);
                    let out = self.interp.predict(Some(&name), &inputs, &mut self.state)?;
                    let mut r = logits_rows(&out)?;
                    r.truncate(take);
                    rows.extend(r);
                    self.position += take;
                    rest = &rest[take..];
                }
                Ok(rows)
            }
            Interface::Flexible | Interface::TensorCaches => {
                let n = ids.len();
                let mut inputs = BTreeMap::from([
                    ("inputIds".to_string(), Value::i32(vec![1, n], ids.iter().map(|&t| t as i32).collect())),
                    ("causalMask".to_string(), self.mask(n, self.position + n)),
                ]);
                if let Some((k, v)) = self.caches.take() {
                    inputs.insert("keyCache".into(), k);
                    inputs.insert("valueCache".into(), v);
                }
                let mut out = self.interp.predict(None, &inputs, &mut self.state)?;
                if let Interface::TensorCaches = self.interface {
                    let k = out.remove("keyCacheOut").ok_or_else(|| Error::invalid("no keyCacheOut output"))?;
                    let v = out.remove("valueCacheOut").ok_or_else(|| Error::invalid("no valueCacheOut output"))?;
                    self.caches = Some((k, v));
                }
                self.position += n;
                logits_rows(&out)
            }
        }
    }
}

fn logits_rows(out: &BTreeMap<String, Value>) -> Result<Vec<Vec<f32>>> {
    let logits = out.get("logits").ok_or_else(|| Error::invalid("the model has no `logits` output"))?;
    let vocab = *logits.shape.last().ok_or_else(|| Error::invalid("logits have no dimensions"))?;
    match &logits.data {
        Data::F32(v) => Ok(v.chunks(vocab).map(|c| c.to_vec()).collect()),
        _ => Err(Error::invalid("logits are not floats")),
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) }).0
}
