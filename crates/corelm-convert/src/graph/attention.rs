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

/// Layer `l`'s queries (1, heads, N, head_dim), keys and values (1, kv_heads, N, head_dim),
/// normed per head where the family does and rotated by `rope`.
pub(super) fn project_qkv(
    g: &mut Graph,
    l: usize,
    x: &Var,
    compute: DType,
    rope: Option<&(Var, Var)>,
) -> Result<(Var, Var, Var)> {
    use LayerRole::*;
    let c = g.c;
    let p = format!("l{l}");
    let lr = |r| Role::Layer(l, r);
    let mut q = g.linear(x, lr(Q), Some(lr(QBias)), &format!("{p}_q"))?;
    let mut k = g.linear(x, lr(K), Some(lr(KBias)), &format!("{p}_k"))?;
    let v = g.linear(x, lr(V), Some(lr(VBias)), &format!("{p}_v"))?;
    let qk_norm = |g: &mut Graph, q: &Var, k: &Var| -> Result<(Var, Var)> {
        Ok((
            g.norm(q, lr(QNorm), None, compute, false, &format!("{p}_q_norm"))?,
            g.norm(k, lr(KNorm), None, compute, false, &format!("{p}_k_norm"))?,
        ))
    };
    if c.qk_norm == QkNorm::Projection {
        (q, k) = qk_norm(g, &q, &k)?;
    }
    let mut q = g.split_heads(&q, c.num_heads, &format!("{p}_qh"))?;
    let mut k = g.split_heads(&k, c.num_kv_heads, &format!("{p}_kh"))?;
    let v = g.split_heads(&v, c.num_kv_heads, &format!("{p}_vh"))?;
    if c.qk_norm == QkNorm::PerHead {
        (q, k) = qk_norm(g, &q, &k)?;
    }
    if let Some((cos, sin)) = rope {
        q = g.apply_rope(&q, cos, sin, &format!("{p}_q_rope"))?;
        k = g.apply_rope(&k, cos, sin, &format!("{p}_k_rope"))?;
    }
    Ok((q, k, v))
}

/// Attention of `q` over `keys` and `values` under `mask`, (1, kv_heads or heads, ·, head_dim).
pub(super) fn attend(
    g: &mut Graph,
    form: AttentionForm,
    q: Var,
    keys: &Var,
    values: &Var,
    mask: &Var,
    p: &str,
) -> Result<Var> {
    let c = g.c;
    let (kvh, hd) = (c.num_kv_heads as i32, c.head_dim as i32);
    // SDPA divides by √head_dim itself; fold any other scale into Q.
    let extra = c.attention_scale * (c.head_dim as f64).sqrt();
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
            per_head(g, &qs, keys, values, mask, p)
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

fn per_head(g: &mut Graph, q: &Var, keys: &Var, values: &Var, mask: &Var, p: &str) -> Result<Var> {
    let c = g.c;
    let rep = c.num_heads / c.num_kv_heads;
    let split = |g: &mut Graph, x: &Var, n: usize, name: String| -> Result<Vec<Var>> {
        if n == 1 {
            return Ok(vec![x.clone()]);
        }
        g.f.op("split", &name, vec![("x", x.into()), ("num_splits", scalar_i32(n as i32)), ("axis", scalar_i32(1))])
    };
    let qh = split(g, q, c.num_heads, format!("{p}_q_head"))?;
    let kh = split(g, keys, c.num_kv_heads, format!("{p}_k_head"))?;
    let vh = split(g, values, c.num_kv_heads, format!("{p}_v_head"))?;
    let mut outs = Vec::with_capacity(c.num_heads);
    for (h, qv) in qh.iter().enumerate() {
        outs.push(sdpa(g, &format!("{p}_attn_h{h}"), qv, &kh[h / rep], &vh[h / rep], mask)?);
    }
    g.concat(&format!("{p}_attn"), outs.iter().collect(), 1)
}

/// The heads back to (1, N, heads·head_dim), or channels-first (1, heads·head_dim, 1, N).
pub(super) fn merge_heads(g: &mut Graph, attn: &Var, p: &str) -> Result<Var> {
    let (heads, hd) = (g.c.num_heads as i32, g.c.head_dim as i32);
    let split = g.reshape(&format!("{p}_attn_heads"), attn, &[1, heads, -1, hd])?;
    let (perm, shape) =
        if g.ane { ([0, 1, 3, 2], vec![1, heads * hd, 1, -1]) } else { ([0, 2, 1, 3], vec![1, -1, heads * hd]) };
    let tokens = g.transpose(&format!("{p}_attn_t"), &split, &perm)?;
    g.reshape(&format!("{p}_attn_flat"), &tokens, &shape)
}
