//! A converted language model driven through its Core ML interface: token ids in, logits out,
//! the KV cache kept between calls. Handles the three interfaces corelm writes: one function
//! with a flexible query length (states), fixed query lengths as functions (states and a
//! `position` input), and KV caches passed as inputs and outputs (iOS 16/17).
//!
//! The driver reads the interface from the model description and runs the functions through an
//! [`Executor`], so the reference interpreter and Core ML feed a package the same way. Tensors
//! cross as [`HostTensor`]s: the driver knows neither backend's types.

use std::any::Any;

use corelm_format::bytes::FileBytes;
use corelm_format::{DType, Package};

use crate::interface::{chunk_packages, Interface, PackageInterface};
use crate::tensor::{HostData, HostTensor, Tensors};
use crate::{keys, names};
use crate::{Error, Result};

/// What runs a package's functions, one prediction at a time.
///
/// An executor carries the KV caches a package passes as inputs and outputs (iOS 16/17: output
/// `keyCacheOut` is the next call's input `keyCache`, likewise `valueCache`) in its state, in its
/// own form: the driver neither passes nor reads them, and none is converted between calls.
pub trait Executor {
    /// What predictions carry from one call to the next (the KV caches); the default is empty
    /// (holding no memory), what a reset leaves before the fresh state is made.
    type State: Default;
    /// A fresh, zeroed state for `function` (`None`: the default function).
    fn new_state(&self, function: Option<&str>) -> Result<Self::State>;
    fn predict(&mut self, function: Option<&str>, inputs: &Tensors, state: &mut Self::State) -> Result<Tensors>;
    /// A copy of `state` to restore later (a recurrent model's state cannot be rewound); by
    /// default, an error: the executor cannot copy its states.
    fn copy_state(&self, state: &Self::State) -> Result<Self::State> {
        let _ = state;
        Err(Error::invalid("this backend cannot copy a model's states, so it cannot snapshot them"))
    }
    /// Like `predict` for a caller that needs only query position `row` of the logits. The
    /// logits may then hold that row alone; by default they hold every row.
    fn predict_row(
        &mut self,
        function: Option<&str>,
        inputs: &Tensors,
        state: &mut Self::State,
        row: usize,
    ) -> Result<Tensors> {
        let _ = row;
        self.predict(function, inputs, state)
    }
}

/// One package part run by its executor, with the executor's state: the driver holds parts of
/// any executor type alike.
trait Stage {
    /// One prediction; with `row`, only that query position's logits are needed.
    fn predict(&mut self, function: Option<&str>, inputs: &Tensors, row: Option<usize>) -> Result<Tensors>;
    /// Replaces the state with a fresh one for `function`, dropping the old one first.
    fn reset(&mut self, function: Option<&str>) -> Result<()>;
    /// A copy of the state, and its return.
    fn snapshot(&self) -> Result<Box<dyn Any>>;
    fn restore(&mut self, state: Box<dyn Any>) -> Result<()>;
}

struct Part<E: Executor> {
    executor: E,
    state: E::State,
}

impl<E: Executor> Stage for Part<E>
where
    E::State: 'static,
{
    fn predict(&mut self, function: Option<&str>, inputs: &Tensors, row: Option<usize>) -> Result<Tensors> {
        match row {
            None => self.executor.predict(function, inputs, &mut self.state),
            Some(r) => self.executor.predict_row(function, inputs, &mut self.state, r),
        }
    }

    /// The old state (a KV cache: gigabytes for a large model) goes before the fresh one is made,
    /// so two are never alive at once.
    fn reset(&mut self, function: Option<&str>) -> Result<()> {
        self.state = E::State::default();
        self.state = self.executor.new_state(function)?;
        Ok(())
    }

    fn snapshot(&self) -> Result<Box<dyn Any>> {
        Ok(Box::new(self.executor.copy_state(&self.state)?))
    }

    fn restore(&mut self, state: Box<dyn Any>) -> Result<()> {
        self.state = *state.downcast().map_err(|_| Error::invalid("a snapshot of another model"))?;
        Ok(())
    }
}

/// What a model was fed, kept to return to ([`LanguageModel::snapshot`]): each part's states
/// and the position.
pub struct Snapshot {
    position: usize,
    states: Vec<Box<dyn Any>>,
}

impl Snapshot {
    /// Tokens fed when it was taken.
    pub fn position(&self) -> usize {
        self.position
    }
}

/// A package fed token ids through its interface, whatever executes it: one type for every
/// backend, so callers hold a model without naming its executor.
pub struct LanguageModel {
    /// Each package part, run in order (one part unless `--chunks`).
    stages: Vec<Box<dyn Stage>>,
    interface: Interface,
    context: usize,
    mask_dtype: DType,
    position: usize,
    /// The per-layer embedding table the first part takes rows of (Gemma 3n, 4).
    per_layer: Option<PerLayerTable>,
    /// Hybrid models: recurrent states, which take no padding and cannot be rewound.
    recurrent: bool,
}

/// A per-layer embedding table kept beside the program ([`keys::PER_LAYER_EMBEDDINGS`]): mapped,
/// so a token reads its row and nothing else of the table is paged in.
struct PerLayerTable {
    bytes: FileBytes,
    dtype: DType,
    rows: usize,
    width: usize,
}

impl PerLayerTable {
    /// The table of `pkg`, if its metadata names one; its size checked against the file.
    fn open(pkg: &Package) -> Result<Option<PerLayerTable>> {
        let Some(dims) = pkg.model().description.metadata.user_defined.get(keys::PER_LAYER_EMBEDDINGS) else {
            return Ok(None);
        };
        let bad = |m: String| Error::invalid(format!("{}: {m}", pkg.path().display()));
        let parsed = dims.split_once(':').and_then(|(dtype, size)| {
            let dtype = match dtype {
                "fp16" => DType::Fp16,
                "fp32" => DType::Fp32,
                _ => return None,
            };
            let (r, w) = size.split_once('x')?;
            Some((dtype, r.parse::<usize>().ok()?, w.parse::<usize>().ok()?))
        });
        let (dtype, rows, width) = parsed
            .filter(|&(_, r, w)| r > 0 && w > 0)
            .ok_or_else(|| bad(format!("{} is `{dims}`, not fp16|fp32:ROWSxWIDTH", keys::PER_LAYER_EMBEDDINGS)))?;
        let path = pkg.path().join(keys::PER_LAYER_EMBEDDINGS_PATH);
        let bytes = FileBytes::map(&path).map_err(|e| bad(format!("the per-layer embedding table: {e}")))?;
        let size = dtype.bit_width().unwrap_or(16) / 8;
        if Some(bytes.len()) != rows.checked_mul(width).and_then(|n| n.checked_mul(size)) {
            return Err(bad(format!(
                "{} holds {} bytes; a {rows} × {width} {} table has {}",
                keys::PER_LAYER_EMBEDDINGS_PATH,
                bytes.len(),
                dtype.name(),
                rows as u128 * width as u128 * size as u128
            )));
        }
        Ok(Some(PerLayerTable { bytes, dtype, rows, width }))
    }

    /// The rows of `ids` (1, N), as the (1, N, width) input; ids past the table read row 0.
    fn rows_of(&self, ids: &HostTensor) -> Result<HostTensor> {
        let HostData::I32(ids) = &ids.data else { return Err(Error::invalid("token ids are not int32")) };
        let mut values = Vec::with_capacity(ids.len() * self.width);
        let row_bytes = self.width * self.dtype.bit_width().unwrap_or(16) / 8;
        for &id in ids {
            let row = usize::try_from(id).ok().filter(|&r| r < self.rows).unwrap_or(0);
            let bytes = &self.bytes[row * row_bytes..(row + 1) * row_bytes];
            match self.dtype {
                DType::Fp32 => {
                    values.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                }
                _ => values.extend(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())),
            }
        }
        Ok(HostTensor::f32(self.dtype, vec![1, ids.len(), self.width], values))
    }
}

impl LanguageModel {
    /// Opens a package with its sibling parts, if it is one of several, each run by the
    /// executor `load` makes for it.
    pub fn open<E: Executor + 'static>(
        pkg: &Package,
        mut load: impl FnMut(&Package) -> Result<E>,
    ) -> Result<LanguageModel> {
        match chunk_packages(pkg)? {
            None => LanguageModel::with_executor(pkg, load(pkg)?),
            Some(parts) => {
                let executors = parts.iter().map(&mut load).collect::<Result<Vec<_>>>()?;
                LanguageModel::with_executors(&parts.iter().collect::<Vec<_>>(), executors)
            }
        }
    }

    /// Drives `pkg`, whose functions `executor` runs.
    pub fn with_executor<E: Executor + 'static>(pkg: &Package, executor: E) -> Result<LanguageModel> {
        LanguageModel::with_executors(&[pkg], vec![executor])
    }

    /// Drives the parts of a split model (see [`chunk_packages`]), one executor each, in order:
    /// the first takes the token ids, each later one the hidden states before it.
    pub fn with_executors<E: Executor + 'static>(parts: &[&Package], executors: Vec<E>) -> Result<LanguageModel> {
        let first = parts.first().ok_or_else(|| Error::invalid("no packages to run"))?;
        let PackageInterface { interface, context, mask_dtype, recurrent_states } = PackageInterface::read(first)?;
        if parts.len() != executors.len() {
            return Err(Error::invalid("one executor per package part"));
        }
        if parts.len() > 1 && matches!(interface, Interface::TensorCaches { .. }) {
            return Err(Error::invalid("a split model keeps its caches as states"));
        }
        let mut stages: Vec<Box<dyn Stage>> = Vec::with_capacity(executors.len());
        for executor in executors {
            let state = executor.new_state(interface.state_function())?;
            stages.push(Box::new(Part { executor, state }));
        }
        let per_layer = PerLayerTable::open(first)?;
        let recurrent = !recurrent_states.is_empty();
        Ok(LanguageModel { stages, interface, context, mask_dtype, position: 0, per_layer, recurrent })
    }

    /// One prediction through every part: each later part takes the hidden states the one
    /// before it returned in place of the token ids. With `row`, only that query position's
    /// logits are needed (see [`Executor::predict_row`]).
    fn predict(&mut self, function: Option<&str>, mut inputs: Tensors, row: Option<usize>) -> Result<Tensors> {
        if let Some(table) = &self.per_layer {
            let ids = inputs.get(names::INPUT_IDS).ok_or_else(|| Error::invalid("no token ids to gather rows for"))?;
            inputs.insert(names::PER_LAYER_EMBEDDINGS.into(), table.rows_of(ids)?);
        }
        let last = self.stages.len() - 1;
        for (i, stage) in self.stages.iter_mut().enumerate() {
            if i == last {
                return stage.predict(function, &inputs, row);
            }
            let mut out = stage.predict(function, &inputs, None)?;
            let hidden = out
                .remove(names::NEXT_HIDDEN_STATES)
                .ok_or_else(|| Error::invalid(format!("part {} has no nextHiddenStates output", i + 1)))?;
            inputs.remove(names::INPUT_IDS);
            inputs.remove(names::PER_LAYER_EMBEDDINGS);
            inputs.insert(names::HIDDEN_STATES.into(), hidden);
        }
        unreachable!("at least one part")
    }

    pub fn context(&self) -> usize {
        self.context
    }

    pub fn position(&self) -> usize {
        self.position
    }

    /// Whether the model keeps recurrent state (a hybrid model): it then returns to an earlier
    /// point only through a [`Snapshot`].
    pub fn is_recurrent(&self) -> bool {
        self.recurrent
    }

    /// Goes back to `position` tokens, forgetting what was fed after. A KV cache is rewound by
    /// moving the write position (what lies past it is masked, then overwritten); a recurrent
    /// state has folded every token in, so a hybrid model refuses and must restore a snapshot.
    pub fn rewind(&mut self, position: usize) -> Result<()> {
        if position > self.position {
            return Err(Error::invalid(format!("cannot rewind to {position} tokens: only {} were fed", self.position)));
        }
        if self.recurrent && position < self.position {
            return Err(Error::invalid(
                "this model's recurrent state cannot be rewound: take a snapshot before feeding, and restore it",
            ));
        }
        self.position = position;
        Ok(())
    }

    /// A copy of every part's state and the position, to [`restore`](Self::restore) later.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let states = self.stages.iter().map(|s| s.snapshot()).collect::<Result<Vec<_>>>()?;
        Ok(Snapshot { position: self.position, states })
    }

    /// Returns to `snapshot`: every part's state and the position as they were.
    pub fn restore(&mut self, snapshot: Snapshot) -> Result<()> {
        if snapshot.states.len() != self.stages.len() {
            return Err(Error::invalid("a snapshot of another model"));
        }
        for (stage, state) in self.stages.iter_mut().zip(snapshot.states) {
            stage.restore(state)?;
        }
        self.position = snapshot.position;
        Ok(())
    }

    /// Forgets everything fed so far. Each old state (a KV cache: gigabytes for a large model)
    /// is dropped before its fresh one is made, so two are never alive at once.
    pub fn reset(&mut self) -> Result<()> {
        for stage in &mut self.stages {
            stage.reset(self.interface.state_function())?;
        }
        self.position = 0;
        Ok(())
    }

    /// Causal mask rows for `n` queries starting at the current position over `width` keys.
    fn mask(&self, n: usize, width: usize) -> HostTensor {
        let mut m = vec![f32::NEG_INFINITY; n * width];
        for i in 0..n {
            for j in 0..=(self.position + i).min(width - 1) {
                m[i * width + j] = 0.0;
            }
        }
        HostTensor::f32(self.mask_dtype, vec![1, 1, n, width], m)
    }

    /// Feeds tokens; returns the logits of each fed position.
    pub fn feed(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.feed_rows(ids, false)
    }

    /// Feeds tokens; returns the logits of the last one (empty if `ids` is). What generation
    /// needs: the interpreter then applies the LM head to that position alone.
    pub fn feed_last(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(self.feed_rows(ids, true)?.pop().unwrap_or_default())
    }

    /// `last_only`: the logits of the last token alone are needed (and returned).
    fn feed_rows(&mut self, ids: &[u32], last_only: bool) -> Result<Vec<Vec<f32>>> {
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
            Interface::Fixed { lengths, aligned } => {
                let (lengths, aligned) = (lengths.clone(), *aligned);
                let mut rows = Vec::new();
                let mut rest = ids;
                while !rest.is_empty() {
                    // Few calls: the longest length the remaining tokens fill at least a quarter of
                    // (padding the rest: one 64-token call beats 37 one-token calls), else the
                    // shortest; within the context, and for ring-buffer caches starting at a
                    // multiple of its length.
                    // A recurrent model takes no padding (it would enter the state): the longest
                    // length the remaining tokens fill.
                    let position = self.position;
                    let allowed = |n: usize| position + n <= self.context && (!aligned || position.is_multiple_of(n));
                    let found = if self.recurrent {
                        lengths.iter().find(|(n, _)| *n <= rest.len() && allowed(*n))
                    } else {
                        lengths
                            .iter()
                            .find(|(n, _)| rest.len() * 4 >= *n && allowed(*n))
                            .or_else(|| lengths.iter().rev().find(|(n, _)| allowed(*n)))
                    };
                    let (n, name) = found
                        .cloned()
                        .ok_or_else(|| Error::invalid("no function length fits the remaining tokens and context"))?;
                    let take = n.min(rest.len());
                    let mut chunk: Vec<i32> = rest[..take].iter().map(|&t| t as i32).collect();
                    chunk.resize(n, 0);
                    let inputs = Tensors::from([
                        (names::INPUT_IDS.to_string(), HostTensor::i32(vec![1, n], chunk)),
                        (names::CAUSAL_MASK.to_string(), self.mask(n, self.context)),
                        (names::POSITION.to_string(), HostTensor::i32(vec![1], vec![self.position as i32])),
                    ]);
                    let finished = take == rest.len();
                    // Only the last token's logits wanted: of an earlier chunk, any one row
                    // (the cheapest request), none of them kept.
                    let row = last_only.then_some(if finished { take - 1 } else { 0 });
                    let out = self.predict(Some(&name), inputs, row)?;
                    let mut r = logits_rows(&out, row)?;
                    r.truncate(take);
                    if !last_only || finished {
                        rows.extend(r);
                    }
                    self.position += take;
                    rest = &rest[take..];
                }
                Ok(rows)
            }
            Interface::Flexible | Interface::TensorCaches { .. } => {
                let n = ids.len();
                let inputs = Tensors::from([
                    (
                        names::INPUT_IDS.to_string(),
                        HostTensor::i32(vec![1, n], ids.iter().map(|&t| t as i32).collect()),
                    ),
                    (names::CAUSAL_MASK.to_string(), self.mask(n, self.position + n)),
                ]);
                let row = last_only.then_some(n - 1);
                let out = self.predict(None, inputs, row)?;
                self.position += n;
                logits_rows(&out, row)
            }
        }
    }
}

/// Each position's logits (with `row`, that position's alone): the `logits` output, or the
/// blocks `logits_0`, `logits_1`, ... of a split LM head joined along the vocabulary.
fn logits_rows(out: &Tensors, row: Option<usize>) -> Result<Vec<Vec<f32>>> {
    let parts: Vec<&HostTensor> = match out.get(names::LOGITS) {
        Some(l) => vec![l],
        None => (0..).map_while(|i| out.get(&names::logits_block(i))).collect(),
    };
    if parts.is_empty() {
        return Err(Error::invalid("the model has no `logits` (or `logits_0`, ...) output"));
    }
    let mut rows: Vec<Vec<f32>> = Vec::new();
    for part in parts {
        let width = *part.shape.last().ok_or_else(|| Error::invalid("logits have no dimensions"))?;
        let HostData::F32(v) = &part.data else { return Err(Error::invalid("logits are not floats")) };
        let n = v.len() / width.max(1);
        if rows.is_empty() {
            rows = vec![Vec::new(); n];
        } else if rows.len() != n {
            return Err(Error::invalid("the logits blocks cover different numbers of positions"));
        }
        for (row, chunk) in rows.iter_mut().zip(v.chunks(width)) {
            row.extend_from_slice(chunk);
        }
    }
    // An executor that computed every row, asked for one.
    match row {
        Some(r) if rows.len() > 1 => {
            let n = rows.len();
            Ok(vec![rows.into_iter().nth(r).ok_or_else(|| Error::invalid(format!("no row {r} of {n} logits rows")))?])
        }
        _ => Ok(rows),
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) }).0
}
