//! Self-attention: the Q/K/V projections with their per-head norms and RoPE, attention itself
//! in the form the target and profile take, and the heads merged back.

use super::emitter::{scalar_i32, Binary, Graph};
use crate::arch::{LayerRole, Role};
use crate::config::QkNorm;
use crate::Result;
use corelm_format::mil::builder::Arg;
use corelm_format::{DType, Tensor, Var};

/// How attention is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AttentionForm {
    /// matmul + softmax + matmul, the scale and any soft-capping explicit.
    Decomposed,
    /// One `scaled_dot_product_attention` over the query heads grouped by KV head.
    Fused,
    /// The Neural Engine form: each query head against its KV head with the plain
    /// (1, 1, N, keys) mask, as small separate products.
    PerHead,
}

impl AttentionForm {
    /// Whether the mask is used untiled (heads attended one by one).
    pub fn per_head(self) -> bool {
        self == AttentionForm::PerHead
    }
}

/// Layer `l`'s queries (1, heads, N, head_dim), and unless the layer reuses an earlier layer's
/// keys and values, its keys and values (1, kv_heads, N, head_dim): normed per head where the
/// family does, rotated by `rope`.
pub(super) fn project_qkv(
    g: &mut Graph,
    l: usize,
    x: &Var,
    compute: DType,
    rope: Option<&(Var, Var)>,
) -> Result<(Var, Option<(Var, Var)>)> {
    use LayerRole::*;
    let c = g.c;
    let p = format!("l{l}");
    let lr = |r| Role::Layer(l, r);
    let shape = c.layer(l).clone();
    let hd = shape.head_dim;
    let norm = |g: &mut Graph, x: &Var, role: LayerRole, tag: &str| {
        g.norm(x, lr(role), None, compute, false, &format!("{p}_{tag}_norm"))
    };
    let rotate = |g: &mut Graph, x: Var, tag: &str| match rope {
        Some((cos, sin)) => g.apply_rope(&x, cos, sin, hd, &format!("{p}_{tag}_rope")),
        None => Ok(x),
    };
    let mut q = g.linear(x, lr(Q), Some(lr(QBias)), &format!("{p}_q"))?;
    let mut kv = match shape.kv_from {
        Some(_) => None,
        None => {
            let k = g.linear(x, lr(K), Some(lr(KBias)), &format!("{p}_k"))?;
            // Gemma 4's k = v global layers take the key projection, before its norm, as values.
            let v =
                if shape.values_are_keys { k.clone() } else { g.linear(x, lr(V), Some(lr(VBias)), &format!("{p}_v"))? };
            Some((k, v))
        }
    };
    if c.qk_norm == QkNorm::Projection {
        q = norm(g, &q, QNorm, "q")?;
        if let Some((k, _)) = &mut kv {
            *k = norm(g, k, KNorm, "k")?;
        }
    }
    let mut q = g.split_heads(&q, c.num_heads, hd, &format!("{p}_qh"))?;
    if let Some((k, v)) = &mut kv {
        *k = g.split_heads(k, shape.kv_heads, hd, &format!("{p}_kh"))?;
        *v = g.split_heads(v, shape.kv_heads, hd, &format!("{p}_vh"))?;
    }
    if c.qk_norm == QkNorm::PerHead {
        q = norm(g, &q, QNorm, "q")?;
        if let Some((k, _)) = &mut kv {
            *k = norm(g, k, KNorm, "k")?;
        }
    }
    if let Some((_, v)) = kv.as_mut().filter(|_| c.value_norm) {
        *v = g.plain_rms(v, true, compute, &format!("{p}_v_norm"))?;
    }
    let q = rotate(g, q, "q")?;
    let kv = match kv {
        Some((k, v)) => Some((rotate(g, k, "k")?, v)),
        None => None,
    };
    Ok((q, kv))
}

/// Attention of `q` over `keys` and `values` under `mask`, (1, kv_heads or heads, ·, head_dim).
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    g: &mut Graph,
    form: AttentionForm,
    l: usize,
    q: Var,
    keys: &Var,
    values: &Var,
    mask: &Var,
    p: &str,
) -> Result<Var> {
    let c = g.c;
    let shape = c.layer(l);
    let (kvh, hd) = (shape.kv_heads as i32, shape.head_dim as i32);
    // SDPA divides by √head_dim itself; fold any other scale into Q.
    let extra = c.attention_scale * (shape.head_dim as f64).sqrt();
    let prescale = |g: &mut Graph, q: Var| {
        if (extra - 1.0).abs() > 1e-12 {
            g.mul_s(&q, extra, &format!("{p}_q_scaled"))
        } else {
            Ok(q)
        }
    };
    match form {
        AttentionForm::PerHead => {
            let qs = prescale(g, q)?;
            per_head(g, shape.kv_heads, &qs, keys, values, mask, p)
        }
        AttentionForm::Fused => {
            // GQA without copying K/V: the query heads that share a KV head fold into the query
            // axis (the mask rows are tiled to match).
            let qg = g.reshape(&format!("{p}_q_groups"), &q, &[1, kvh, -1, hd])?;
            let qs = prescale(g, qg)?;
            sdpa(g, &format!("{p}_attn"), &qs, keys, values, mask)
        }
        AttentionForm::Decomposed => {
            let qg = g.reshape(&format!("{p}_q_groups"), &q, &[1, kvh, -1, hd])?;
            let qs = g.mul_s(&qg, c.attention_scale, &format!("{p}_q_scaled"))?;
            let transpose_y = Arg::Tensor(Tensor::scalar_bool(true));
            let mut scores = g.op(
                "matmul",
                &format!("{p}_scores"),
                vec![("x", (&qs).into()), ("y", keys.into()), ("transpose_y", transpose_y)],
            )?;
            if let Some(cap) = c.attn_logit_softcap {
                scores = g.softcap(&scores, cap, p, &format!("{p}_capped"))?;
            }
            let masked = g.binary(Binary::Add, &format!("{p}_masked"), &scores, mask)?;
            let probs =
                g.op("softmax", &format!("{p}_probs"), vec![("x", (&masked).into()), ("axis", scalar_i32(-1))])?;
            g.op("matmul", &format!("{p}_attn"), vec![("x", (&probs).into()), ("y", values.into())])
        }
    }
}

fn sdpa(g: &mut Graph, name: &str, q: &Var, keys: &Var, values: &Var, mask: &Var) -> Result<Var> {
    g.op(
        "scaled_dot_product_attention",
        name,
        vec![("query", q.into()), ("key", keys.into()), ("value", values.into()), ("attn_mask", mask.into())],
    )
}

fn per_head(g: &mut Graph, kv_heads: usize, q: &Var, keys: &Var, values: &Var, mask: &Var, p: &str) -> Result<Var> {
    let c = g.c;
    let rep = c.num_heads / kv_heads;
    let split = |g: &mut Graph, x: &Var, n: usize, name: String| -> Result<Vec<Var>> {
        if n == 1 {
            return Ok(vec![x.clone()]);
        }
        g.f.op("split", &name, vec![("x", x.into()), ("num_splits", scalar_i32(n as i32)), ("axis", scalar_i32(1))])
    };
    let qh = split(g, q, c.num_heads, format!("{p}_q_head"))?;
    let kh = split(g, keys, kv_heads, format!("{p}_k_head"))?;
    let vh = split(g, values, kv_heads, format!("{p}_v_head"))?;
    let mut outs = Vec::with_capacity(c.num_heads);
    for (h, qv) in qh.iter().enumerate() {
        outs.push(sdpa(g, &format!("{p}_attn_h{h}"), qv, &kh[h / rep], &vh[h / rep], mask)?);
    }
    g.concat(&format!("{p}_attn"), outs.iter().collect(), 1)
}

/// The heads back to (1, N, heads·head_dim), or channels-first (1, heads·head_dim, 1, N).
pub(super) fn merge_heads(g: &mut Graph, l: usize, attn: &Var, p: &str) -> Result<Var> {
    let (heads, hd) = (g.c.num_heads as i32, g.c.layer(l).head_dim as i32);
    let split = g.reshape(&format!("{p}_attn_heads"), attn, &[1, heads, -1, hd])?;
    let (perm, shape) =
        if g.ane { ([0, 1, 3, 2], vec![1, heads * hd, 1, -1]) } else { ([0, 2, 1, 3], vec![1, -1, heads * hd]) };
    let tokens = g.transpose(&format!("{p}_attn_t"), &split, &perm)?;
    g.reshape(&format!("{p}_attn_flat"), &tokens, &shape)
}
