//! The graph emitter: one function's builder with the model's weights at hand, and the
//! building blocks every family shares (embedding, projections, layouts, activation, RoPE).

use std::collections::HashMap;

use half::f16;

use super::weights::{Stored, StoredWeights};
use super::ANE_MAX_DIM;
use crate::arch::Role;
use crate::config::{Activation, ModelConfig};
use crate::{Error, Result};
use corelm_format::mil::builder::Arg;
use corelm_format::{DType, FunctionBuilder, Tensor, Var};

pub(super) fn i32s(values: &[i32]) -> Arg<'static> {
    Arg::Tensor(Tensor::from_i32(vec![values.len()], values).expect("sizes agree"))
}

pub(super) fn scalar_i32(v: i32) -> Arg<'static> {
    Arg::Tensor(Tensor::scalar_i32(v))
}

/// Graph-building helpers over one function.
pub(super) struct Graph<'a, 'w> {
    pub(super) f: FunctionBuilder<'w>,
    pub(super) c: &'a ModelConfig,
    pub(super) w: &'a StoredWeights,
    pub(super) weights: HashMap<Role, Vec<Var>>,
    /// Neural Engine form: fp16 norms.
    pub(super) ane: bool,
    /// What the residual stream is divided by (see [`residual_divisor`]).
    pub(super) residual_divisor: f64,
    /// The Neural Engine norms' epsilon pairs, by shape, axis and value (see `ane_norm`).
    pub(super) epsilon_pairs: HashMap<(Vec<usize>, usize, u64), Var>,
    /// Constants every layer of the function shares, by name (see [`Graph::shared_constant`]).
    shared: HashMap<String, Var>,
}

/// Elementwise ops of two operands (`x`, `y`), named by type rather than by string.
#[derive(Clone, Copy, Debug)]
pub(super) enum Binary {
    Add,
    Sub,
    Mul,
    Mod,
    Maximum,
    Minimum,
    Less,
    Greater,
    GreaterEqual,
    LogicalAnd,
}

impl Binary {
    fn op_type(self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Mod => "mod",
            Binary::Maximum => "maximum",
            Binary::Minimum => "minimum",
            Binary::Less => "less",
            Binary::Greater => "greater",
            Binary::GreaterEqual => "greater_equal",
            Binary::LogicalAnd => "logical_and",
        }
    }
}

impl<'a, 'w> Graph<'a, 'w> {
    pub(super) fn new(
        f: FunctionBuilder<'w>,
        c: &'a ModelConfig,
        w: &'a StoredWeights,
        ane: bool,
        residual_divisor: f64,
    ) -> Graph<'a, 'w> {
        Graph {
            f,
            c,
            w,
            weights: HashMap::new(),
            ane,
            residual_divisor,
            epsilon_pairs: HashMap::new(),
            shared: HashMap::new(),
        }
    }
}

/// Typed forms of the MIL ops the graph uses most; each emits exactly what `op` would.
impl Graph<'_, '_> {
    pub(super) fn binary<'v>(
        &mut self,
        op: Binary,
        name: &str,
        x: impl Into<Arg<'v>>,
        y: impl Into<Arg<'v>>,
    ) -> Result<Var> {
        self.op(op.op_type(), name, vec![("x", x.into()), ("y", y.into())])
    }

    pub(super) fn concat(&mut self, name: &str, values: Vec<&Var>, axis: i32) -> Result<Var> {
        self.op("concat", name, vec![("values", Arg::Tuple(values)), ("axis", scalar_i32(axis))])
    }

    pub(super) fn reshape(&mut self, name: &str, x: &Var, shape: &[i32]) -> Result<Var> {
        self.op("reshape", name, vec![("x", x.into()), ("shape", i32s(shape))])
    }

    pub(super) fn transpose(&mut self, name: &str, x: &Var, perm: &[i32]) -> Result<Var> {
        self.op("transpose", name, vec![("x", x.into()), ("perm", i32s(perm))])
    }

    pub(super) fn expand_dims(&mut self, name: &str, x: &Var, axes: &[i32]) -> Result<Var> {
        self.op("expand_dims", name, vec![("x", x.into()), ("axes", i32s(axes))])
    }

    pub(super) fn squeeze(&mut self, name: &str, x: &Var, axes: &[i32]) -> Result<Var> {
        self.op("squeeze", name, vec![("x", x.into()), ("axes", i32s(axes))])
    }

    pub(super) fn slice_by_index<'v>(
        &mut self,
        name: &str,
        x: &Var,
        begin: impl Into<Arg<'v>>,
        end: impl Into<Arg<'v>>,
    ) -> Result<Var> {
        self.op("slice_by_index", name, vec![("x", x.into()), ("begin", begin.into()), ("end", end.into())])
    }

    /// Rows of `x` along axis 0.
    pub(super) fn gather_rows(&mut self, name: &str, x: &Var, indices: &Var) -> Result<Var> {
        self.op("gather", name, vec![("x", x.into()), ("indices", indices.into()), ("axis", scalar_i32(0))])
    }

    pub(super) fn select<'v>(
        &mut self,
        name: &str,
        cond: &Var,
        a: impl Into<Arg<'v>>,
        b: impl Into<Arg<'v>>,
    ) -> Result<Var> {
        self.op("select", name, vec![("cond", cond.into()), ("a", a.into()), ("b", b.into())])
    }

    /// The constant `name`, made by `make` the first time a layer asks: stored once per function
    /// however many layers read it.
    pub(super) fn shared_constant(&mut self, name: &str, make: impl FnOnce() -> Result<Tensor>) -> Result<Var> {
        if let Some(v) = self.shared.get(name) {
            return Ok(v.clone());
        }
        let v = self.f.constant(name, make()?)?;
        self.shared.insert(name.to_string(), v.clone());
        Ok(v)
    }

    /// An int32 vector constant.
    pub(super) fn ints(&mut self, name: &str, values: &[i32]) -> Result<Var> {
        self.f.constant(name, Tensor::from_i32(vec![values.len()], values)?)
    }
}

impl Graph<'_, '_> {
    pub(super) fn op(&mut self, ty: &str, name: &str, args: Vec<(&str, Arg)>) -> Result<Var> {
        self.f.op1(ty, name, args)
    }

    pub(super) fn float(&self, dtype: DType, v: f64) -> Arg<'static> {
        Arg::Tensor(Tensor::from_floats(dtype, vec![], &[v]).expect("scalar"))
    }

    /// A weight as its blocks of rows (one, unless the ane profile split it).
    pub(super) fn pieces(&mut self, role: Role) -> Result<Option<Vec<Var>>> {
        if let Some(v) = self.weights.get(&role) {
            return Ok(Some(v.clone()));
        }
        let Some(stored) = self.w.tensors.get(&role) else { return Ok(None) };
        let name = match role {
            Role::Layer(l, r) => format!("layers_{l}_{r:?}"),
            other => format!("{other:?}"),
        }
        .to_lowercase();
        let vars = match stored {
            Stored::Pieces(parts) => {
                let mut vars = Vec::new();
                for (i, part) in parts.iter().enumerate() {
                    vars.push(self.materialize(&format!("{name}_{i}"), part)?);
                }
                vars
            }
            one => vec![self.materialize(&name, one)?],
        };
        self.weights.insert(role, vars.clone());
        Ok(Some(vars))
    }

    pub(super) fn materialize(&mut self, name: &str, stored: &Stored) -> Result<Var> {
        match stored {
            Stored::Plain(blob) => Ok(self.f.weight(name, blob)),
            Stored::Compressed { op, inputs, data_from } => {
                let data = match data_from {
                    Some(inner) => Some(self.materialize(&format!("{name}_data"), inner)?),
                    None => None,
                };
                let mut args: Vec<(&str, Arg)> = inputs.iter().map(|(param, blob)| (*param, Arg::Blob(blob))).collect();
                if let Some(data) = &data {
                    args.insert(0, ("data", Arg::Var(data)));
                }
                self.f.op1(op, name, args)
            }
            Stored::Pieces(_) => Err(Error::invalid(format!("{name}: pieces inside pieces"))),
        }
    }

    pub(super) fn weight(&mut self, role: Role) -> Result<Option<Var>> {
        match self.pieces(role)? {
            None => Ok(None),
            Some(v) if v.len() == 1 => Ok(v.into_iter().next()),
            Some(_) => Err(Error::invalid(format!("{role:?} is split in blocks of rows; it is read piece by piece"))),
        }
    }

    pub(super) fn required(&mut self, role: Role) -> Result<Var> {
        self.weight(role)?.ok_or_else(|| Error::invalid(format!("weight for {role:?} was not loaded")))
    }

    pub(super) fn cast(&mut self, x: &Var, to: DType, name: &str) -> Result<Var> {
        if x.dtype() == to {
            return Ok(x.clone());
        }
        self.op("cast", name, vec![("x", x.into()), ("dtype", Arg::Tensor(Tensor::scalar_string(to.name())))])
    }

    /// `cap · tanh(x / cap)`, named `{prefix}_cap_in`, `{prefix}_cap_tanh` and `out`.
    pub(super) fn softcap(&mut self, x: &Var, cap: f64, prefix: &str, out: &str) -> Result<Var> {
        let s = self.mul_s(x, 1.0 / cap, &format!("{prefix}_cap_in"))?;
        let t = self.op("tanh", &format!("{prefix}_cap_tanh"), vec![("x", (&s).into())])?;
        self.mul_s(&t, cap, out)
    }

    pub(super) fn mul_s(&mut self, x: &Var, s: f64, name: &str) -> Result<Var> {
        let y = self.float(x.dtype(), s);
        self.binary(Binary::Mul, name, x, y)
    }

    /// Token embeddings, in the residual stream's dtype and scale. A table split in blocks of
    /// rows is read block by block, each id taken from the last block that starts at or below it.
    pub(super) fn embed(
        &mut self,
        ids: &Var,
        query: &Var,
        compute: DType,
        residual: DType,
        divisor: f64,
    ) -> Result<Var> {
        let c = self.c;
        let mut x = self.gather_embedding(ids)?;
        if let Some(pos_table) = self.weight(Role::PositionEmbed)? {
            let pe = self.gather_rows("pos_embed", &pos_table, query)?;
            x = self.binary(Binary::Add, "embed_sum", &x, &pe)?;
        }
        x = self.cast(&x, residual, "embed_res")?;
        if c.embedding_scale.is_some() || divisor != 1.0 {
            // Hugging Face rounds the multiplier to the activation dtype first.
            let s =
                c.embedding_scale.map_or(1.0, |s| if compute == DType::Fp16 { f16::from_f64(s).to_f64() } else { s });
            x = self.mul_s(&x, s / divisor, "embed_scaled")?;
        }
        Ok(x)
    }

    /// The embedding table's rows at `ids`, (1, N, hidden). A table split in blocks of rows is
    /// read block by block, each id taken from the last block that starts at or below it.
    fn gather_embedding(&mut self, ids: &Var) -> Result<Var> {
        let tables = self.pieces(Role::Embed)?.ok_or_else(|| Error::invalid("no embedding weight"))?;
        let mut x: Option<Var> = None;
        for (i, table) in tables.iter().enumerate() {
            let tag = if tables.len() == 1 { "embed".to_string() } else { format!("embed{i}") };
            // Ids outside this block are clamped into it (Core ML leaves out-of-range gathers
            // undefined), then replaced by the block that holds them.
            let local = if tables.len() == 1 {
                ids.clone()
            } else {
                let first = (i * ANE_MAX_DIM) as i32;
                let rows = table.ty().dims[0].fixed().expect("weights have fixed shapes") as i32;
                let shifted = self.binary(Binary::Sub, &format!("{tag}_local"), ids, scalar_i32(first))?;
                let lo = self.binary(Binary::Maximum, &format!("{tag}_lo"), &shifted, scalar_i32(0))?;
                self.binary(Binary::Minimum, &format!("{tag}_hi"), &lo, scalar_i32(rows - 1))?
            };
            let rows = self.gather_rows(&format!("{tag}_rows"), table, &local)?;
            x = Some(match x {
                None => rows,
                Some(below) => {
                    let first = (i * ANE_MAX_DIM) as i32;
                    let here = self.binary(Binary::GreaterEqual, &format!("{tag}_here"), ids, scalar_i32(first))?;
                    let here = self.expand_dims(&format!("{tag}_cond"), &here, &[-1])?;
                    self.select(&format!("{tag}_sel"), &here, &rows, &below)?
                }
            });
        }
        Ok(x.expect("at least one embedding block"))
    }

    /// The axis of hidden states' channels: the last, or 1 channels-first (Neural Engine).
    pub(super) fn channel_axis(&self) -> i32 {
        if self.ane {
            1
        } else {
            -1
        }
    }

    /// The mean over the channels, kept.
    pub(super) fn mean_channels(&mut self, x: &Var, name: &str) -> Result<Var> {
        let axis = self.channel_axis();
        self.op(
            "reduce_mean",
            name,
            vec![("x", x.into()), ("axes", i32s(&[axis])), ("keep_dims", Arg::Tensor(Tensor::scalar_bool(true)))],
        )
    }

    /// `x` split into `n` equal parts along the channels (itself when `n` is 1).
    pub(super) fn split_channels(&mut self, x: &Var, n: usize, name: &str) -> Result<Vec<Var>> {
        if n == 1 {
            return Ok(vec![x.clone()]);
        }
        let axis = self.channel_axis();
        self.f.op(
            "split",
            name,
            vec![("x", x.into()), ("num_splits", scalar_i32(n as i32)), ("axis", scalar_i32(axis))],
        )
    }

    pub(super) fn linear(&mut self, x: &Var, weight: Role, bias: Option<Role>, name: &str) -> Result<Var> {
        let w = self.required(weight)?;
        let b = match bias {
            Some(b) => self.weight(b)?,
            None => None,
        };
        self.project(x, &w, b.as_ref(), name)
    }

    /// `x·wᵀ + b`: a `linear` op, or for the Neural Engine a 1×1 `conv` over channels-first
    /// (1, C, 1, S) activations, the weight viewed as (out, in, 1, 1).
    pub(super) fn project(&mut self, x: &Var, w: &Var, b: Option<&Var>, name: &str) -> Result<Var> {
        let mut args = vec![("x", Arg::Var(x))];
        let w4;
        if self.ane {
            w4 = self.expand_dims(&format!("{name}_w"), w, &[2, 3])?;
            args.push(("weight", Arg::Var(&w4)));
        } else {
            args.push(("weight", Arg::Var(w)));
        }
        if let Some(b) = b {
            args.push(("bias", Arg::Var(b)));
        }
        self.f.op1(if self.ane { "conv" } else { "linear" }, name, args)
    }

    /// (1, S, C) ↔ (1, C, 1, S), the Neural Engine's channels-first layout.
    pub(super) fn channels_first(&mut self, x: &Var, name: &str) -> Result<Var> {
        let t = self.transpose(&format!("{name}_t"), x, &[0, 2, 1])?;
        self.expand_dims(name, &t, &[2])
    }

    pub(super) fn tokens_first(&mut self, x: &Var, name: &str) -> Result<Var> {
        let t = self.squeeze(&format!("{name}_sq"), x, &[2])?;
        self.transpose(name, &t, &[0, 2, 1])
    }

    pub(super) fn activation(&mut self, x: &Var, name: &str) -> Result<Var> {
        match self.c.activation {
            Activation::Silu => self.op("silu", name, vec![("x", x.into())]),
            Activation::GeluTanh => self.op(
                "gelu",
                name,
                vec![("x", x.into()), ("mode", Arg::Tensor(Tensor::scalar_string("TANH_APPROXIMATION")))],
            ),
            Activation::Gelu => {
                self.op("gelu", name, vec![("x", x.into()), ("mode", Arg::Tensor(Tensor::scalar_string("EXACT")))])
            }
        }
    }

    /// (1, N, heads·head_dim), or channels-first (1, heads·head_dim, 1, N) → (1, heads, N, head_dim).
    pub(super) fn split_heads(&mut self, x: &Var, heads: usize, head_dim: usize, name: &str) -> Result<Var> {
        let hd = head_dim as i32;
        let (shape, perm) = if self.ane {
            ([1, heads as i32, hd, -1], [0, 1, 3, 2])
        } else {
            ([1, -1, heads as i32, hd], [0, 2, 1, 3])
        };
        let r = self.reshape(&format!("{name}_r"), x, &shape)?;
        self.transpose(name, &r, &perm)
    }

    /// x·cos + swap_halves(x)·sin over the rotated part of the head dimension.
    pub(super) fn apply_rope(&mut self, x: &Var, cos: &Var, sin: &Var, hd: usize, name: &str) -> Result<Var> {
        let rd = cos.ty().dims[3].fixed().expect("tables have fixed width");
        let (rot, pass) = if rd < hd {
            let parts = self.f.op(
                "split",
                &format!("{name}_part"),
                vec![("x", x.into()), ("split_sizes", i32s(&[rd as i32, (hd - rd) as i32])), ("axis", scalar_i32(-1))],
            )?;
            (parts[0].clone(), Some(parts[1].clone()))
        } else {
            (x.clone(), None)
        };
        let halves = self.f.op(
            "split",
            &format!("{name}_half"),
            vec![("x", (&rot).into()), ("num_splits", scalar_i32(2)), ("axis", scalar_i32(-1))],
        )?;
        let swapped = self.concat(&format!("{name}_swap"), vec![&halves[1], &halves[0]], -1)?;
        let a = self.binary(Binary::Mul, &format!("{name}_cos"), &rot, cos)?;
        let b = self.binary(Binary::Mul, &format!("{name}_sin"), &swapped, sin)?;
        let y = self.binary(Binary::Add, &format!("{name}_rot"), &a, &b)?;
        match pass {
            Some(p) => self.concat(name, vec![&y, &p], -1),
            None => Ok(y),
        }
    }
}
