//! `exp` over slices on the CPU's vector unit: softmax, silu and sigmoid spend most of their time
//! in it, and the scalar libm call is several times slower than the arithmetic around it.
//!
//! Cody–Waite reduction `x = n·ln2 + r` and the Cephes degree-6 polynomial for `e^r` (within
//! 2 ulp of a correctly rounded `exp` on the whole f32 range), then `2^n` applied in two halves
//! so that results in the subnormal range and overflow to infinity come out right. Every
//! element goes through the same arithmetic, whatever its position in the slice, so a value's
//! `exp` does not depend on how a computation was split up (prefill vs. decode).

/// Replaces every element with its exponential.
pub fn exp_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::usable() {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { avx2::exp_in_place(v) };
            return;
        }
    }
    v.iter_mut().for_each(|a| *a = exp(*a));
}

/// The same arithmetic, one value at a time.
pub fn exp(x: f32) -> f32 {
    // NaN passes through the clamp (`max`/`min` keep NaN only this way round).
    let x = if x.is_nan() { x } else { x.clamp(LO, HI) };
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let p = POLY.iter().fold(0f32, |p, &c| p.mul_add(r, c));
    let e = p.mul_add(r * r, r + 1.0);
    let (n1, n2) = halves(n as i32);
    e * f32::from_bits(((n1 + 127) as u32) << 23) * f32::from_bits(((n2 + 127) as u32) << 23)
}

/// Below `LO` the result is 0 in f32, above `HI` infinite; clamping keeps `n` in range.
const LO: f32 = -104.0;
const HI: f32 = 89.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `n·LN2_HI` is exact for every `n` in range.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// e^r ≈ 1 + r + r²·P(r), coefficients highest first.
const POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1];

/// `n` as two exponents, each a normal power of two for `n` in [-150, 129].
fn halves(n: i32) -> (i32, i32) {
    let n1 = n >> 1;
    (n1, n - n1)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::*;

    pub fn usable() -> bool {
        static FEATURES: OnceLock<bool> = OnceLock::new();
        *FEATURES.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_in_place(v: &mut [f32]) {
        let mut chunks = v.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: c holds exactly eight values.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr()))) };
        }
        // The tail goes through the same vector arithmetic, padded.
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let mut buf = [0f32; 8];
            buf[..tail.len()].copy_from_slice(tail);
            // SAFETY: buf holds eight values.
            unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), exp8(_mm256_loadu_ps(buf.as_ptr()))) };
            tail.copy_from_slice(&buf[..tail.len()]);
        }
    }

    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        // SAFETY: register-only intrinsics under the caller's features.
        unsafe {
            // min/max return their second operand when either is NaN, so NaN survives.
            let x = _mm256_max_ps(_mm256_set1_ps(LO), _mm256_min_ps(_mm256_set1_ps(HI), x));
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                x,
                _mm256_set1_ps(LOG2E),
            ));
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x));
            let mut p = _mm256_setzero_ps();
            for c in POLY {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let e = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
            let ni = _mm256_cvtps_epi32(n);
            let n1 = _mm256_srai_epi32::<1>(ni);
            let n2 = _mm256_sub_epi32(ni, n1);
            let pow =
                |k: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k, _mm256_set1_epi32(127))));
            _mm256_mul_ps(_mm256_mul_ps(e, pow(n1)), pow(n2))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64 `exp` over the whole range, including the subnormal results, overflow, the
    /// infinities and NaN; vector and scalar paths agree bit for bit.
    #[test]
    fn within_two_ulp_of_exp() {
        let mut xs: Vec<f32> = (-1_100_000..=1_000_000).map(|i| i as f32 * 1e-4).collect();
        xs.extend([f32::NEG_INFINITY, f32::INFINITY, f32::NAN, -0.0, 88.72, 88.73, -87.5, -103.0, -103.97, -200.0]);
        let mut got = xs.clone();
        exp_in_place(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            assert_eq!(g.to_bits(), exp(x).to_bits(), "vector and scalar differ at {x}");
            let want = (x as f64).exp() as f32;
            if x.is_nan() {
                assert!(g.is_nan());
            } else if want.is_infinite() || want == 0.0 {
                assert_eq!(g, want, "exp({x})");
            } else {
                let ulp = (want.to_bits() as i64 - g.to_bits() as i64).abs();
                assert!(ulp <= 2, "exp({x}) = {g}, want {want} ({ulp} ulp)");
            }
        }
    }
}
