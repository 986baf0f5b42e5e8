//! The interfaces corelm writes, read back from a package's description: how its functions take
//! token ids and how its KV cache travels between calls.

use corelm_format::model::{ArrayFeature, Flexibility, FunctionDescription};
use corelm_format::{DType, Package};

use crate::{keys, names, Error, Result};

/// How a package's KV cache travels between calls.
#[derive(Clone, Debug, PartialEq)]
pub enum Interface {
    /// One function with a flexible query length; the caches are states (iOS 18).
    Flexible,
    /// One function per query length (name by length, longest first), sharing the caches as
    /// states, each taking a `position`. `aligned`: a chunk of length n must start at a multiple
    /// of n (ring-buffer caches, metadata [`keys::RING_SLOTS`]).
    Fixed { lengths: Vec<(usize, String)>, aligned: bool },
    /// The caches passed as inputs and returned as outputs (iOS 16/17): their dtype and shape.
    TensorCaches { dtype: DType, shape: Vec<usize> },
}

/// A package's interface, with the context length and causal-mask dtype it declares.
#[derive(Clone, Debug, PartialEq)]
pub struct PackageInterface {
    pub interface: Interface,
    pub context: usize,
    pub mask_dtype: DType,
    /// The recurrent states of a hybrid model ([`keys::RECURRENT_STATES`]), empty for a model
    /// whose every layer attends. Non-empty: a call must carry no padding (it would enter the
    /// state), and the model returns to an earlier point by restoring a snapshot, not by moving
    /// the write position back.
    pub recurrent_states: Vec<String>,
}

impl Interface {
    /// The function whose states every prediction shares (fixed lengths: all functions declare
    /// the same states); `None`: the default function.
    pub fn state_function(&self) -> Option<&str> {
        match self {
            Interface::Fixed { lengths, .. } => Some(lengths[0].1.as_str()),
            _ => None,
        }
    }
}

fn input<'a>(f: &'a FunctionDescription, name: &str) -> Option<&'a ArrayFeature> {
    f.inputs.iter().find(|i| i.name == name).and_then(|i| i.array())
}

fn fixed_shape<'a>(a: &'a ArrayFeature, name: &str) -> Result<&'a [usize]> {
    match a.flexibility {
        Flexibility::Fixed => Ok(&a.shape),
        _ => Err(Error::invalid(format!("{name} needs a fixed shape"))),
    }
}

impl PackageInterface {
    /// Reads the interface a package's functions declare.
    pub fn read(pkg: &Package) -> Result<PackageInterface> {
        let description = &pkg.model().description;
        let mut fixed = Vec::new();
        let mut caches = None;
        let mut context = 0;
        let mut mask_dtype = DType::Fp16;
        for f in &description.functions {
            let name = &f.name;
            let required =
                |n: &str| input(f, n).ok_or_else(|| Error::invalid(format!("function `{name}` has no {n} input")));
            let ids = required(names::INPUT_IDS)?;
            let mask = required(names::CAUSAL_MASK)?;
            mask_dtype = mask.dtype.ok_or_else(|| Error::invalid("causalMask has a dtype corelm does not know"))?;
            if let Some(cache) = input(f, names::KEY_CACHE) {
                let shape = fixed_shape(cache, names::KEY_CACHE)?;
                let dtype = cache.dtype.ok_or_else(|| Error::invalid("keyCache has a dtype corelm does not know"))?;
                context = shape.get(3).copied().unwrap_or(0);
                caches = Some((dtype, shape.to_vec()));
            } else if input(f, names::POSITION).is_some() {
                let n = fixed_shape(ids, "inputIds of a fixed-length function")?.get(1).copied();
                fixed.push((n.ok_or_else(|| Error::invalid("inputIds needs two dimensions"))?, name.clone()));
                context = fixed_shape(mask, "causalMask of a fixed-length function")?.get(3).copied().unwrap_or(0);
            }
        }
        let metadata = &description.metadata.user_defined;
        let interface = if let Some((dtype, shape)) = caches {
            Interface::TensorCaches { dtype, shape }
        } else if !fixed.is_empty() {
            fixed.sort_by_key(|f| std::cmp::Reverse(f.0));
            Interface::Fixed { lengths: fixed, aligned: metadata.contains_key(keys::RING_SLOTS) }
        } else {
            context = match metadata.get(keys::CONTEXT_LENGTH).and_then(|c| c.parse().ok()) {
                Some(c) => c,
                None => {
                    let f = description.functions.first().ok_or_else(|| Error::invalid("no functions"))?;
                    f.states.first().and_then(|s| s.array()).and_then(|a| a.shape.get(3).copied()).unwrap_or(0)
                }
            };
            Interface::Flexible
        };
        if context == 0 {
            return Err(Error::invalid("cannot tell the model's context length"));
        }
        // Without the metadata (a package edited, or written by another tool), the states corelm
        // names so still say the model is recurrent.
        let recurrent_states: Vec<String> = match metadata.get(keys::RECURRENT_STATES) {
            Some(list) => list.split(',').map(str::to_string).collect(),
            None => description
                .functions
                .first()
                .map(|f| f.states.iter().map(|s| s.name.clone()))
                .into_iter()
                .flatten()
                .filter(|n| n == names::CONV_STATE || n == names::RECURRENT_STATE)
                .collect(),
        };
        for name in &recurrent_states {
            if !description.functions.iter().all(|f| f.states.iter().any(|s| &s.name == name)) {
                return Err(Error::invalid(format!(
                    "{} names the state `{name}`, which a function does not declare",
                    keys::RECURRENT_STATES
                )));
            }
        }
        Ok(PackageInterface { interface, context, mask_dtype, recurrent_states })
    }
}

/// The parts of a model converted with `--chunks` (siblings named in the [`keys::CHUNKS`]
/// metadata of any part), opened in running order; `None` for a model in one package.
pub fn chunk_packages(pkg: &Package) -> Result<Option<Vec<Package>>> {
    let Some(names) = pkg.model().description.metadata.user_defined.get(keys::CHUNKS) else { return Ok(None) };
    let folder = pkg.path().parent().unwrap_or(std::path::Path::new("."));
    let mut parts = Vec::new();
    for name in names.split(',') {
        // Plain file names only: metadata must not point outside the model's folder.
        if name.is_empty() || name.contains(['/', '\\']) || name == ".." {
            return Err(Error::invalid(format!("corelm.chunks names `{name}`, not a package beside this one")));
        }
        let path = folder.join(name);
        parts.push(Package::open(&path).map_err(|e| e.context(format!("part {name} of {}", pkg.path().display())))?);
    }
    Ok(Some(parts))
}
