//! The KV cache: where each layer's keys and values live between calls, how a call writes its
//! rows and reads back what attention sees. Three kinds of storage (iOS 18 states, an fp16
//! state pair for fp32 compute, tensors passed in and returned on iOS 16/17), and for the ane
//! profile's sliding-window layers a ring buffer.

use std::collections::HashMap;

use half::f16;

use super::emitter::{i32s, scalar_i32, Binary, Graph};
use super::inputs::Positions;
use super::recurrent::RecurrentStates;
use super::{ring_slots, widest_window, GraphOptions, Stage};
use crate::config::{Attention, ModelConfig};
use crate::{Error, Result};
use corelm_contract::names;
use corelm_format::{DType, InputShape, Var};

/// Where the caches live between calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Storage {
    /// iOS 18 states (fp16).
    State,
    /// States are fp16 only, so fp32 compute keeps each cache as an fp16 pair (value,
    /// residual): 22 significant bits, enough that the cache adds no error beyond fp32
    /// arithmetic.
    StatePair,
    /// Older targets: passed in and returned updated, in the compute dtype.
    Tensors,
}

/// The ring buffer's writes: this call writes slots [first, past), and `mask` says which
/// slots each query sees; `span` is the slots attention reads (all of them).
struct RingWrite {
    first: Var,
    past: Var,
    mask: Var,
    span: Var,
}

/// For tensor caches: pad amounts placing this call's rows at [start, end) of the context, and
/// which context positions this call writes.
struct TensorWrite {
    pads: Var,
    written: Var,
}

/// Layers whose caches share one shape: same ring-or-not, KV heads and head size (Gemma 4's
/// global layers have their own).
struct Group {
    ring: bool,
    kv_heads: usize,
    head_dim: usize,
    /// Keys, values: one variable each, two for a state pair.
    vars: [Vec<Var>; 2],
}

pub(super) struct KvCache {
    storage: Storage,
    compute: DType,
    context: usize,
    /// Slots of the ring buffer sliding-window layers use (see [`ring_slots`]), if any.
    ring: Option<usize>,
    /// The widest sliding window.
    window: Option<usize>,
    groups: Vec<Group>,
    /// Each cached layer of the stage: its group and its index within it.
    place: HashMap<usize, (usize, usize)>,
    ring_write: Option<RingWrite>,
    tensor_write: Option<TensorWrite>,
    /// The end of each cache read, by (group, index within it).
    read_ends: HashMap<(usize, usize), Var>,
    /// Tensor caches: each layer's updated keys and values, returned as outputs.
    updated: [Vec<Var>; 2],
    /// What each cached layer attended over, for the layers that reuse its keys and values.
    seen: HashMap<usize, (Var, Var)>,
    /// Hybrid models: the recurrent layers' states, kept beside the attention layers' caches.
    pub recurrent: RecurrentStates,
}

impl KvCache {
    /// Declares the caches of the stage's layers, as states or inputs: one per group of layers
    /// of one shape, holding only layers that compute their own keys and values.
    pub fn declare(g: &mut Graph, c: &ModelConfig, opts: &GraphOptions, stage: &Stage) -> Result<KvCache> {
        let ring = ring_slots(c, opts);
        let compute = opts.precision.dtype();
        let storage = match (opts.target.supports_states(), compute) {
            (false, _) => Storage::Tensors,
            (true, DType::Fp32) => Storage::StatePair,
            (true, _) => Storage::State,
        };
        let mut groups: Vec<(Group, Vec<usize>)> = Vec::new();
        let mut place = HashMap::new();
        for l in stage.layers.clone().filter(|&l| c.layer(l).kv_from.is_none() && !c.layer(l).mixer.is_recurrent()) {
            let in_ring = ring.is_some() && matches!(c.layer_attention[l], Attention::Sliding(_));
            let shape = c.layer(l);
            let key = (in_ring, shape.kv_heads, shape.head_dim);
            let gi = match groups.iter().position(|(g, _)| (g.ring, g.kv_heads, g.head_dim) == key) {
                Some(i) => i,
                None => {
                    let group = Group {
                        ring: in_ring,
                        kv_heads: shape.kv_heads,
                        head_dim: shape.head_dim,
                        vars: [vec![], vec![]],
                    };
                    groups.push((group, vec![]));
                    groups.len() - 1
                }
            };
            place.insert(l, (gi, groups[gi].1.len()));
            groups[gi].1.push(l);
        }
        if storage == Storage::Tensors && groups.len() > 1 {
            return Err(Error::invalid(
                "this model's layers have caches of different shapes, which only states can hold: use --target ios18",
            ));
        }
        if groups.iter().filter(|(g, _)| g.ring).count() > 1 {
            return Err(Error::invalid("sliding-window layers of different shapes cannot share one ring buffer"));
        }
        // Declared keys first, ring before full-length, in layer order (the names users see).
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by_key(|&i| !groups[i].0.ring);
        for (i, name) in [names::KEY_CACHE, names::VALUE_CACHE].into_iter().enumerate() {
            let mut full_seen = 0;
            for &gi in &order {
                let (group, layers) = &mut groups[gi];
                let suffix = if group.ring {
                    "Local".to_string()
                } else {
                    full_seen += 1;
                    match full_seen {
                        1 => String::new(),
                        _ if layers.iter().all(|&l| c.layer_attention[l] == Attention::Full) => "Global".to_string(),
                        n => n.to_string(),
                    }
                };
                let name = format!("{name}{suffix}");
                let slots = if group.ring { ring.expect("a ring group implies ring slots") } else { opts.context };
                let shape = [layers.len(), 1, group.kv_heads, slots, group.head_dim];
                group.vars[i] = match storage {
                    _ if group.ring => vec![g.f.state(&name, &shape)?],
                    Storage::Tensors => vec![g.f.input(&name, compute, InputShape::Fixed(shape.to_vec()))?],
                    Storage::StatePair => {
                        vec![g.f.state(&name, &shape)?, g.f.state(&format!("{name}Residual"), &shape)?]
                    }
                    Storage::State => vec![g.f.state(&name, &shape)?],
                };
            }
        }
        Ok(KvCache {
            storage,
            compute,
            context: opts.context,
            ring,
            window: widest_window(c),
            groups: groups.into_iter().map(|(g, _)| g).collect(),
            place,
            ring_write: None,
            tensor_write: None,
            read_ends: HashMap::new(),
            updated: [vec![], vec![]],
            seen: HashMap::new(),
            recurrent: RecurrentStates::empty(),
        })
    }

    /// Whether sliding-window layers keep a ring buffer (they then need no window mask).
    pub fn has_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// The mask of the ring's layers, once [`KvCache::prepare_writes`] has built it.
    pub fn ring_mask(&self) -> Option<Var> {
        self.ring_write.as_ref().map(|r| r.mask.clone())
    }

    /// What every layer's write shares: the ring's slots and mask, or the tensor caches' pads.
    pub fn prepare_writes(&mut self, g: &mut Graph, positions: &Positions, query_len: Option<usize>) -> Result<()> {
        if let Some(slots) = self.ring.filter(|_| self.groups.iter().any(|g| g.ring)) {
            let n = query_len.ok_or_else(|| Error::invalid("ring-buffer caches need fixed query lengths"))?;
            let window = self.window.expect("a ring implies a sliding layer");
            self.ring_write = Some(self.ring_write(g, positions, slots, n, window)?);
        }
        if self.storage == Storage::Tensors {
            self.tensor_write = Some(self.tensor_write(g, positions)?);
        }
        Ok(())
    }

    /// This call writes slots [start mod R, + N) (the driver starts chunks at multiples of
    /// their length, so they never wrap). After the write, slot k holds the latest position
    /// p ≤ end − 1 with p ≡ k (mod R); query q sees it when 0 ≤ q − p < window and p ≥ 0.
    fn ring_write(&self, g: &mut Graph, at: &Positions, slots: usize, n: usize, window: usize) -> Result<RingWrite> {
        use Binary::*;
        let r = slots as i32;
        let first = g.binary(Mod, "ring_first", &at.start, scalar_i32(r))?;
        let past = g.binary(Add, "ring_past", &first, scalar_i32(n as i32))?;
        let last = g.binary(Sub, "ring_last_pos", &at.end, scalar_i32(1))?;
        let ks = g.ints("ring_slots", &(0..r).collect::<Vec<_>>())?;
        let behind = g.binary(Sub, "ring_behind", &last, &ks)?;
        let behind = g.binary(Add, "ring_behind_pos", &behind, scalar_i32(r))?;
        let behind = g.binary(Mod, "ring_age", &behind, scalar_i32(r))?;
        let held = g.binary(Sub, "ring_held", &last, &behind)?;
        let q = g.expand_dims("ring_q", &at.query, &[1])?;
        let age = g.binary(Sub, "ring_key_age", &q, &held)?;
        let seen = g.binary(GreaterEqual, "ring_seen", &age, scalar_i32(0))?;
        let recent = g.binary(Less, "ring_recent", &age, scalar_i32(window as i32))?;
        let written = g.binary(GreaterEqual, "ring_written", &held, scalar_i32(0))?;
        let ok = g.binary(LogicalAnd, "ring_in_window", &seen, &recent)?;
        let ok = g.binary(LogicalAnd, "ring_visible", &ok, &written)?;
        // select takes its shape from `a` and `b` (coremltools' typing), so one is full size.
        let zero = g.float(self.compute, 0.0);
        let open = g.op("fill", "ring_open", vec![("shape", i32s(&[n as i32, r])), ("value", zero)])?;
        let shut = g.float(self.compute, f16::MIN.to_f64());
        let mask = g.select("ring_mask_2d", &ok, &open, shut)?;
        let mask = g.expand_dims("ring_mask", &mask, &[0, 1])?;
        let span = g.ints("ring_span", &[r])?;
        Ok(RingWrite { first, past, mask, span })
    }

    fn tensor_write(&self, g: &mut Graph, at: &Positions) -> Result<TensorWrite> {
        use Binary::*;
        let ctx = self.context as i32;
        let ctx_len = g.ints("ctx_len", &[ctx])?;
        let after = g.binary(Sub, "pad_after", &ctx_len, &at.end)?;
        let head = g.ints("pad_head", &[0; 6])?;
        let tail = g.ints("pad_tail", &[0; 2])?;
        let pads = g.concat("cache_pads", vec![&head, &at.start, &after, &tail], 0)?;
        let all = g.ints("all_positions", &(0..ctx).collect::<Vec<_>>())?;
        let from = g.binary(GreaterEqual, "at_or_after_start", &all, &at.start)?;
        let to = g.binary(Less, "before_end", &all, &at.end)?;
        let both = g.binary(LogicalAnd, "written_now", &from, &to)?;
        let written = g.reshape("written_rows", &both, &[1, 1, 1, ctx, 1])?;
        Ok(TensorWrite { pads, written })
    }

    /// Writes layer `l`'s keys and values (1, kv_heads, N, head_dim) into the caches at
    /// [start, end), then reads the layer's keys and values for positions [0, key_end):
    /// (1, kv_heads, key_end, head_dim) each.
    pub fn write_and_read(
        &mut self,
        g: &mut Graph,
        at: &Positions,
        l: usize,
        keys: &Var,
        values: &Var,
    ) -> Result<(Var, Var)> {
        let p = format!("l{l}");
        let (gi, slot) = self.place[&l];
        let (begin, end) = self.write_range(g, at, &p, gi, slot)?;
        let mut read = Vec::with_capacity(2);
        for (i, (tag, val)) in [("k", keys), ("v", values)].into_iter().enumerate() {
            let parts = self.encode(g, val, &format!("{p}_{tag}"))?;
            let caches = self.groups[gi].vars[i].clone();
            let mut seen = Vec::new();
            for (part, (update, cache)) in parts.iter().zip(&caches).enumerate() {
                let name = if part == 0 { format!("{p}_{tag}") } else { format!("{p}_{tag}_lo") };
                let layer = if self.storage == Storage::Tensors {
                    let merged = self.merge_rows(g, cache, update, gi, slot, &name)?;
                    self.updated[i].push(merged.clone());
                    merged
                } else {
                    let old = g.op("read_state", &format!("{name}_old"), vec![("input", cache.into())])?;
                    let new = g.op(
                        "slice_update",
                        &format!("{name}_new"),
                        vec![
                            ("x", (&old).into()),
                            ("update", update.into()),
                            ("begin", (&begin).into()),
                            ("end", (&end).into()),
                        ],
                    )?;
                    let store = vec![("input", cache.into()), ("data", (&new).into())];
                    g.f.op("write_state", &format!("{name}_store"), store)?;
                    new
                };
                seen.push(self.read(g, at, &layer, gi, slot, &name)?);
            }
            read.push(match seen.as_slice() {
                [one] => one.clone(),
                [hi, lo] => g.binary(Binary::Add, &format!("{p}_{tag}_seen_sum"), hi, lo)?,
                _ => unreachable!("one or two cache parts"),
            });
        }
        let values = read.pop().expect("keys and values");
        let keys = read.pop().expect("keys and values");
        self.seen.insert(l, (keys.clone(), values.clone()));
        Ok((keys, values))
    }

    /// The keys and values layer `source` attended over, for a layer that reuses them.
    pub fn reuse(&self, source: usize) -> Result<(Var, Var)> {
        self.seen.get(&source).cloned().ok_or_else(|| {
            Error::invalid(format!(
                "layer {source}'s keys and values are shared, but it is not in this part of the model"
            ))
        })
    }

    /// The begin and end of this call's rows in layer `slot` of the cache (the ring's slots for
    /// a ring layer).
    fn write_range(&self, g: &mut Graph, at: &Positions, p: &str, gi: usize, slot: usize) -> Result<(Var, Var)> {
        let group = &self.groups[gi];
        let (start, end) = match (&self.ring_write, group.ring) {
            (Some(ring), true) => (&ring.first, &ring.past),
            _ => (&at.start, &at.end),
        };
        let s = slot as i32;
        let head = g.ints(&format!("{p}_b0"), &[s, 0, 0])?;
        let zero = g.ints(&format!("{p}_b1"), &[0])?;
        let begin = g.concat(&format!("{p}_begin"), vec![&head, start, &zero], 0)?;
        let head = g.ints(&format!("{p}_e0"), &[s + 1, 1, group.kv_heads as i32])?;
        let tail = g.ints(&format!("{p}_e1"), &[group.head_dim as i32])?;
        let end = g.concat(&format!("{p}_end"), vec![&head, end, &tail], 0)?;
        Ok((begin, end))
    }

    /// The rows to write, (1, 1, kv_heads, N, head_dim), in the cache's dtype: one part, or
    /// for a state pair the fp16 value and the fp16 residual.
    fn encode(&self, g: &mut Graph, rows: &Var, name: &str) -> Result<Vec<Var>> {
        let update = g.expand_dims(&format!("{name}_upd5"), rows, &[0])?;
        let dtype = if self.storage == Storage::Tensors { self.compute } else { DType::Fp16 };
        let hi = g.cast(&update, dtype, &format!("{name}_upd"))?;
        let mut parts = vec![hi.clone()];
        if self.storage == Storage::StatePair {
            let back = g.cast(&hi, DType::Fp32, &format!("{name}_upd_back"))?;
            let rest = g.binary(Binary::Sub, &format!("{name}_upd_rest"), &update, &back)?;
            parts.push(g.cast(&rest, DType::Fp16, &format!("{name}_upd_lo"))?);
        }
        Ok(parts)
    }

    /// A tensor cache has no slice_update: pad the new rows out to the context and select
    /// them where positions fall in [start, end). Returns layer `l`'s updated cache rows.
    fn merge_rows(&self, g: &mut Graph, cache: &Var, update: &Var, gi: usize, slot: usize, name: &str) -> Result<Var> {
        let write = self.tensor_write.as_ref().expect("built for tensor caches");
        let group = &self.groups[gi];
        let (l, kvh, ctx, hd) = (slot as i32, group.kv_heads as i32, self.context as i32, group.head_dim as i32);
        let old = g.slice_by_index(
            &format!("{name}_layer5"),
            cache,
            i32s(&[l, 0, 0, 0, 0]),
            i32s(&[l + 1, 1, kvh, ctx, hd]),
        )?;
        let rows = g.op("pad", &format!("{name}_rows"), vec![("x", update.into()), ("pad", (&write.pads).into())])?;
        let merged = g.select(&format!("{name}_merged"), &write.written, &rows, &old)?;
        // The runtime pad amounts hide the shape from type inference; restate it.
        g.reshape(&format!("{name}_written"), &merged, &[1, 1, kvh, ctx, hd])
    }

    /// Attention's view of a layer's cache: positions [0, key_end) of layer `slot` (the
    /// written part when the query length is flexible, the whole context when shapes are fixed:
    /// the mask hides what is not written yet), as (1, kv_heads, key_end, head_dim).
    fn read(&mut self, g: &mut Graph, at: &Positions, layer: &Var, gi: usize, slot: usize, name: &str) -> Result<Var> {
        // The stateful cache holds every layer; a merged tensor cache row holds just this one.
        let index = if self.storage == Storage::Tensors { 0 } else { slot };
        let (ring, kv_heads, head_dim) = {
            let group = &self.groups[gi];
            (group.ring, group.kv_heads as i32, group.head_dim as i32)
        };
        let read_end = match self.read_ends.get(&(gi, index)) {
            Some(v) => v.clone(),
            None => {
                // Named as before groups existed: the ring's, then the first full-length group's.
                let tag = match (ring, self.groups.iter().position(|g| !g.ring) == Some(gi)) {
                    (true, _) => "ring_".to_string(),
                    (false, true) => String::new(),
                    (false, false) => format!("g{gi}_"),
                };
                let head = g.ints(&format!("read_end_{tag}{index}"), &[index as i32 + 1, 1, kv_heads])?;
                let tail = g.ints("read_end_tail", &[head_dim])?;
                let key_end = match (&self.ring_write, ring) {
                    (Some(r), true) => &r.span,
                    _ => &at.key_end,
                };
                let v = g.concat(&format!("read_end_{tag}{index}_all"), vec![&head, key_end, &tail], 0)?;
                self.read_ends.insert((gi, index), v.clone());
                v
            }
        };
        let seen = g.slice_by_index(&format!("{name}_seen5"), layer, i32s(&[index as i32, 0, 0, 0, 0]), &read_end)?;
        let shape = [1, kv_heads, -1, head_dim];
        let seen = g.reshape(&format!("{name}_seen16"), &seen, &shape)?;
        g.cast(&seen, self.compute, &format!("{name}_seen"))
    }

    /// Tensor caches: the updated caches as outputs (`keyCacheOut`, `valueCacheOut`).
    pub fn output_updates(&self, g: &mut Graph) -> Result<()> {
        for (input, layers) in [(names::KEY_CACHE, &self.updated[0]), (names::VALUE_CACHE, &self.updated[1])] {
            if layers.is_empty() {
                continue;
            }
            let name = &names::carried_output(input);
            let all = g.concat(name, layers.iter().collect(), 0)?;
            g.f.output(&all, name)?;
        }
        Ok(())
    }
}
