//! Rotary position tables, precomputed for every position of the context, with the scaling
//! rules of Hugging Face transformers (linear, dynamic within the trained length, llama3).

use crate::config::{Rope, RopeScaling};
use crate::{Error, Result};

/// Inverse frequencies of the rotated dimension pairs, scaled.
pub fn inverse_frequencies(rope: &Rope, context: usize) -> Result<Vec<f64>> {
    let half = rope.rotary_dim / 2;
    let base: Vec<f64> = (0..half).map(|i| 1.0 / rope.theta.powf(2.0 * i as f64 / rope.rotary_dim as f64)).collect();
    Ok(match &rope.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear(factor) => base.iter().map(|f| f / factor).collect(),
        &RopeScaling::Proportional { rotated_pairs, factor } => {
            base.iter().enumerate().map(|(i, f)| if i < rotated_pairs { f / factor } else { 0.0 }).collect()
        }
        &RopeScaling::Dynamic { original_max_position, .. } => {
            // Dynamic scaling changes nothing until a sequence outgrows the trained length, and
            // past it depends on the sequence length, which a fixed table cannot follow.
            if context > original_max_position {
                return Err(Error::invalid(format!(
                    "dynamic rope scaling past the trained context ({original_max_position}) is not supported; use --context {original_max_position} or less"
                )));
            }
            base
        }
        RopeScaling::LongRope { short_factor, long_factor, original_max_position, .. } => {
            // transformers takes the long set for a sequence past the trained length, the short
            // one otherwise; a fixed table serves every length up to the context, so a package
            // with a longer context rotates with the long set throughout.
            let set = if context > *original_max_position { long_factor } else { short_factor };
            base.iter().zip(set.iter()).map(|(f, s)| f / s).collect()
        }
        &RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
            let orig = original_max_position as f64;
            let low_wavelen = orig / low_freq_factor;
            let high_wavelen = orig / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    })
}

/// `cos` and `sin·sign` tables of shape (context, rotary_dim), laid out so that
/// `rope(x) = x·cos + swap_halves(x)·sin_signed`, where swap_halves exchanges the two halves of
/// the rotated part (Hugging Face's `rotate_half`, with its minus sign folded into the table).
/// Both are multiplied by the scaling's attention factor where it has one (LongRoPE).
pub fn tables(rope: &Rope, context: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let inv = inverse_frequencies(rope, context)?;
    let m = match rope.scaling {
        RopeScaling::LongRope { attention_factor, .. } => attention_factor,
        _ => 1.0,
    };
    let half = inv.len();
    let mut cos = Vec::with_capacity(context * 2 * half);
    let mut sin = Vec::with_capacity(context * 2 * half);
    for p in 0..context {
        let angles: Vec<f64> = inv.iter().map(|f| p as f64 * f).collect();
        cos.extend(angles.iter().map(|a| m * a.cos()));
        cos.extend(angles.iter().map(|a| m * a.cos()));
        sin.extend(angles.iter().map(|a| -m * a.sin()));
        sin.extend(angles.iter().map(|a| m * a.sin()));
    }
    Ok((cos, sin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let rope = Rope {
            theta: 500_000.0,
            rotary_dim: 128,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position: 8192,
            },
        };
        let plain = inverse_frequencies(&Rope { scaling: RopeScaling::None, ..rope.clone() }, 16).unwrap();
        let scaled = inverse_frequencies(&rope, 16).unwrap();
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-18);
    }

    #[test]
    fn tables_rotate_pairs() {
        let rope = Rope { theta: 10_000.0, rotary_dim: 4, scaling: RopeScaling::None };
        let (cos, sin) = tables(&rope, 3).unwrap();
        // Position 1, pair 0: angle 1 rad.
        assert!((cos[4] - 1f64.cos()).abs() < 1e-12 && (sin[4] + 1f64.sin()).abs() < 1e-12);
        assert!((sin[6] - 1f64.sin()).abs() < 1e-12);
        assert!(inverse_frequencies(
            &Rope { scaling: RopeScaling::Dynamic { factor: 2.0, original_max_position: 8 }, ..rope },
            16
        )
        .is_err());
    }
}
