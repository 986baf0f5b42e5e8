//! The end of the last stage: the final norm and the LM head, split in blocks of rows for the
//! Neural Engine, with the greedy token taken across the blocks.

use super::emitter::{i32s, scalar_i32, Binary, Graph};
use super::ANE_MAX_DIM;
use crate::arch::Role;
use crate::{Error, Result};
use corelm_contract::names;
use corelm_format::mil::builder::Arg;
use corelm_format::{DType, Tensor, Var};

/// Logits (1, N, vocab) in every layout, as the output `logits`. A split LM head gives one
/// output per block of rows, `logits_0`, `logits_1`, ... (joining them would make a tensor too
/// wide for the Neural Engine), which the runtime joins, and the greedy token of each position
/// as `argmax` (1, N).
pub(super) fn logits(g: &mut Graph, x: &Var, compute: DType) -> Result<()> {
    let h = g.norm(x, Role::FinalNorm, Some(Role::FinalNormBias), compute, true, "final_norm")?;
    let heads = g.pieces(Role::LmHead)?.ok_or_else(|| Error::invalid("no LM head weight"))?;
    let mut best: Option<(Var, Var)> = None;
    for (i, head) in heads.iter().enumerate() {
        let out = if heads.len() == 1 { names::LOGITS.to_string() } else { names::logits_block(i) };
        let (scale, cap) = (g.c.logit_scale, g.c.final_logit_softcap);
        let name = if cap.is_none() && scale.is_none() { out.clone() } else { format!("{out}_raw") };
        let projected = if g.ane {
            let ch = g.project(&h, head, None, &format!("{out}_channels"))?;
            g.tokens_first(&ch, &name)?
        } else {
            g.project(&h, head, None, &name)?
        };
        let scaled = match scale {
            None => projected,
            Some(s) => g.mul_s(&projected, s, &if cap.is_none() { out.clone() } else { format!("{out}_scaled") })?,
        };
        let logits = match cap {
            None => scaled,
            Some(cap) => g.softcap(&scaled, cap, &out, &out)?,
        };
        g.f.output(&logits, &out)?;
        if heads.len() > 1 {
            let block = block_argmax(g, &logits, i, &out)?;
            best = Some(match best {
                None => block,
                Some(below) => best_of(g, below, block, i + 1 == heads.len(), &out)?,
            });
        }
    }
    if let Some((_, argmax)) = best {
        g.f.output(&argmax, names::ARGMAX)?;
    }
    Ok(())
}

/// Block `i`'s maximum and its token id (offset by the rows before the block).
fn block_argmax(g: &mut Graph, logits: &Var, i: usize, out: &str) -> Result<(Var, Var)> {
    let no_dims = || Arg::Tensor(Tensor::scalar_bool(false));
    let top = g.op(
        "reduce_max",
        &format!("{out}_max"),
        vec![("x", logits.into()), ("axes", i32s(&[-1])), ("keep_dims", no_dims())],
    )?;
    let at = g.op(
        "reduce_argmax",
        &format!("{out}_at"),
        vec![("x", logits.into()), ("axis", scalar_i32(-1)), ("keep_dims", no_dims())],
    )?;
    let at = g.binary(Binary::Add, &format!("{out}_token"), &at, scalar_i32((i * ANE_MAX_DIM) as i32))?;
    Ok((top, at))
}

/// The better of the blocks so far and this one. Strictly greater: on a tie the lower token id
/// wins, as in a joined argmax. The last block's token is the output `argmax`.
fn best_of(
    g: &mut Graph,
    (best_top, best_at): (Var, Var),
    (top, at): (Var, Var),
    last: bool,
    out: &str,
) -> Result<(Var, Var)> {
    let wins = g.binary(Binary::Greater, &format!("{out}_wins"), &top, &best_top)?;
    let at_name = if last { names::ARGMAX.to_string() } else { format!("{out}_best_token") };
    let at = g.select(&at_name, &wins, &at, &best_at)?;
    let top = if last { top } else { g.select(&format!("{out}_best_max"), &wins, &top, &best_top)? };
    Ok((top, at))
}
