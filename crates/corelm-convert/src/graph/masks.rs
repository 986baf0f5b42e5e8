//! Attention masks: the causal mask for full-attention layers, a windowed one for each
//! sliding-window width (a ring-buffer cache brings its own), each tiled once for grouped
//! query heads.

use std::collections::HashMap;

use half::f16;

use super::emitter::{i32s, scalar_i32, Binary, Graph};
use super::inputs::Positions;
use crate::config::Attention;
use crate::Result;
use corelm_format::{DType, Var};

pub(super) struct Masks {
    causal: Var,
    /// By window width, for sliding layers whose cache holds every position.
    windows: HashMap<usize, Var>,
    /// For sliding layers whose cache is a ring buffer.
    ring: Option<Var>,
    /// Masks tiled along the query axis for grouped query heads, by window and query heads
    /// per KV head (which differ between Gemma 4's local and global layers).
    tiled: HashMap<(Option<usize>, usize), Var>,
}

impl Masks {
    /// For each sliding window among `layers` (unless a ring buffer holds them), positions
    /// further back than the window are masked too.
    pub fn new(
        g: &mut Graph,
        layers: &[Attention],
        causal: &Var,
        positions: &Positions,
        ring_caches: bool,
        compute: DType,
    ) -> Result<Masks> {
        let mut windows = HashMap::new();
        for att in layers.iter().filter(|_| !ring_caches) {
            let Attention::Sliding(wnd) = *att else { continue };
            if windows.contains_key(&wnd) {
                continue;
            }
            let e0 = g.squeeze(&format!("w{wnd}_end"), &positions.key_end, &[0])?;
            let keys = g.op(
                "range_1d",
                &format!("w{wnd}_keys"),
                vec![("end", (&e0).into()), ("start", scalar_i32(0)), ("step", scalar_i32(1))],
            )?;
            let q = g.expand_dims(&format!("w{wnd}_q"), &positions.query, &[1])?;
            let diff = g.binary(Binary::Sub, &format!("w{wnd}_diff"), &q, &keys)?;
            let far = g.binary(Binary::GreaterEqual, &format!("w{wnd}_far"), &diff, scalar_i32(wnd as i32))?;
            let floor = g.float(compute, f16::MIN.to_f64());
            let m = g.select(&format!("w{wnd}_mask"), &far, floor, causal)?;
            windows.insert(wnd, m);
        }
        Ok(Masks { causal: causal.clone(), windows, ring: None, tiled: HashMap::new() })
    }

    /// Sliding layers with a ring-buffer cache use `mask` (built with the ring's writes).
    pub fn set_ring(&mut self, mask: Option<Var>) {
        self.ring = mask;
    }

    /// The mask of a layer with sliding window `window` (`None`: full attention), tiled for
    /// `repeat` query heads per KV head unless `per_head` (heads attended one by one). `prefix`
    /// names the tiled mask after the first layer that needs it.
    pub fn for_layer(
        &mut self,
        g: &mut Graph,
        window: Option<usize>,
        repeat: usize,
        per_head: bool,
        prefix: &str,
    ) -> Result<Var> {
        let base = match (window, &self.ring) {
            (Some(_), Some(ring)) => ring.clone(),
            (Some(w), None) => self.windows[&w].clone(),
            (None, _) => self.causal.clone(),
        };
        if repeat == 1 || per_head {
            return Ok(base);
        }
        if let Some(t) = self.tiled.get(&(window, repeat)) {
            return Ok(t.clone());
        }
        let reps = i32s(&[1, 1, repeat as i32, 1]);
        let t = g.op("tile", &format!("{prefix}_mask_rep"), vec![("x", (&base).into()), ("reps", reps)])?;
        self.tiled.insert((window, repeat), t.clone());
        Ok(t)
    }
}
