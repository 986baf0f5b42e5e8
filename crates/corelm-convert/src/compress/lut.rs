//! Palettization: each group of output channels gets a table of 2^bits values found by 1-D
//! k-means, and each weight becomes an index into its group's table
//! (`constexpr_lut_to_dense`, iOS 18 form: `lut` of shape [groups, 1, 2^bits, 1]).

use corelm_format::{DType, Tensor};
use rayon::prelude::*;

use super::Compressed;
use crate::Result;

/// Lloyd iterations at most; 1-D k-means from quantile starts settles well before this.
const MAX_ITERATIONS: usize = 40;

/// The `k` centres of a 1-D weighted k-means over `values`, sorted. Distinct values are
/// clustered with their multiplicity (weights have few distinct values at fp16 precision),
/// from several starts.
pub fn kmeans_1d(values: &[f32], k: usize) -> Vec<f32> {
    let mut sorted: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f32::total_cmp);
    let mut points: Vec<(f64, f64)> = Vec::new(); // (value, count)
    for &v in &sorted {
        match points.last_mut() {
            Some((last, n)) if *last == v as f64 => *n += 1.0,
            _ => points.push((v as f64, 1.0)),
        }
    }
    if points.is_empty() {
        return vec![0.0; k];
    }
    if points.len() <= k {
        let mut c: Vec<f32> = points.iter().map(|p| p.0 as f32).collect();
        c.resize(k, c[c.len() - 1]);
        return c;
    }
    // Lloyd's method finds a local optimum only: keep the best of a quantile start and two
    // k-means++ starts (the first covers the bulk evenly, the others reach the tails).
    let starts = [quantile_starts(&points, k), plus_plus_starts(&points, k, 1), plus_plus_starts(&points, k, 2)];
    let best = starts.into_iter().map(|s| lloyd(&points, s)).min_by(|a, b| a.1.total_cmp(&b.1));
    best.expect("three starts").0.into_iter().map(|c| c as f32).collect()
}

/// Lloyd iterations from `centres` (sorted); returns the centres and their squared error.
fn lloyd(points: &[(f64, f64)], mut centres: Vec<f64>) -> (Vec<f64>, f64) {
    let k = centres.len();
    for _ in 0..MAX_ITERATIONS {
        // Points are sorted, so each cluster is a contiguous run between midpoints.
        let mut sums = vec![(0f64, 0f64); k];
        let mut c = 0;
        for &(v, n) in points {
            while c + 1 < k && v > (centres[c] + centres[c + 1]) / 2.0 {
                c += 1;
            }
            sums[c].0 += v * n;
            sums[c].1 += n;
        }
        let mut moved = false;
        for (centre, &(s, n)) in centres.iter_mut().zip(&sums) {
            if n > 0.0 && s / n != *centre {
                *centre = s / n;
                moved = true;
            }
        }
        if !moved {
            break;
        }
        centres.sort_by(f64::total_cmp);
    }
    let mut sse = 0.0;
    let mut c = 0;
    for &(v, n) in points {
        while c + 1 < k && v > (centres[c] + centres[c + 1]) / 2.0 {
            c += 1;
        }
        sse += n * (v - centres[c]).powi(2);
    }
    (centres, sse)
}

/// Centre i at the (i + ½)/k-th weighted quantile.
fn quantile_starts(points: &[(f64, f64)], k: usize) -> Vec<f64> {
    let total: f64 = points.iter().map(|p| p.1).sum();
    let mut centres = Vec::with_capacity(k);
    let (mut seen, mut p) = (0.0, 0);
    for i in 0..k {
        let target = (i as f64 + 0.5) / k as f64 * total;
        while p + 1 < points.len() && seen + points[p].1 <= target {
            seen += points[p].1;
            p += 1;
        }
        centres.push(points[p].0);
    }
    distinct(points, centres, k)
}

/// Sorted, duplicates replaced by unused point values (there are more points than `k`).
fn distinct(points: &[(f64, f64)], mut centres: Vec<f64>, k: usize) -> Vec<f64> {
    centres.sort_by(f64::total_cmp);
    centres.dedup();
    let spare: Vec<f64> = points.iter().map(|p| p.0).filter(|v| !centres.contains(v)).take(k - centres.len()).collect();
    centres.extend(spare);
    centres.sort_by(f64::total_cmp);
    centres
}

/// k-means++ seeding over weighted points (value, count), with a fixed-seed generator so the
/// same weights always give the same tables. Far-out weights are picked with probability
/// proportional to their squared distance: outliers, which matter in LLM weights, get their
/// own entries instead of being averaged into the edge of the bulk.
fn plus_plus_starts(points: &[(f64, f64)], k: usize, seed: u64) -> Vec<f64> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (points.len() as u64) ^ (seed << 32);
    let mut uniform = move || {
        // SplitMix64.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    // The first centre: the weighted median.
    let total: f64 = points.iter().map(|p| p.1).sum();
    let mut acc = 0.0;
    let median = points.iter().find(|p| {
        acc += p.1;
        acc >= total / 2.0
    });
    let mut centres = vec![median.unwrap_or(&points[0]).0];
    let mut d2: Vec<f64> = points.iter().map(|p| (p.0 - centres[0]).powi(2)).collect();
    while centres.len() < k {
        let mass: f64 = points.iter().zip(&d2).map(|(p, d)| p.1 * d).sum();
        if mass <= 0.0 {
            break;
        }
        let target = uniform() * mass;
        let mut run = 0.0;
        let pick = points.iter().zip(&d2).position(|(p, d)| {
            run += p.1 * d;
            run >= target
        });
        let c = points[pick.unwrap_or(points.len() - 1)].0;
        centres.push(c);
        for (d, p) in d2.iter_mut().zip(points) {
            *d = d.min((p.0 - c).powi(2));
        }
    }
    distinct(points, centres, k)
}

/// The index of the nearest of the sorted `table` entries.
fn nearest(table: &[f32], v: f32) -> usize {
    let i = table.partition_point(|&t| t < v);
    match i {
        0 => 0,
        _ if i == table.len() => i - 1,
        _ => {
            if v - table[i - 1] <= table[i] - v {
                i - 1
            } else {
                i
            }
        }
    }
}

pub fn palettize(rows: usize, cols: usize, w: &[f32], bits: u8, group: usize, dtype: DType) -> Result<Compressed> {
    let entries = 1usize << bits;
    let groups = rows / group;
    // Groups are independent: k-means runs on all cores, one group's values at a time.
    let parts: Vec<(Vec<f32>, Vec<u8>)> = w
        .par_chunks(group * cols)
        .map(|values| {
            let mut table = kmeans_1d(values, entries);
            // Indices are chosen against the table as stored.
            if dtype == DType::Fp16 {
                table.iter_mut().for_each(|t| *t = half::f16::from_f32(*t).to_f32());
            }
            table.sort_by(f32::total_cmp);
            let idx = values.iter().map(|&v| nearest(&table, v) as u8).collect();
            (table, idx)
        })
        .collect();
    let mut lut = Vec::with_capacity(groups * entries);
    let mut indices: Vec<u8> = Vec::with_capacity(rows * cols);
    for (table, idx) in parts {
        lut.extend(table.iter().map(|&t| t as f64));
        indices.extend(idx);
    }
    let index_dtype = DType::from_name(&format!("uint{bits}")).expect("checked bit width");
    Ok(Compressed {
        op: "constexpr_lut_to_dense",
        inputs: vec![
            ("indices", Tensor::from_ints(index_dtype, vec![rows, cols], &indices)?),
            ("lut", Tensor::from_floats(dtype, vec![groups, 1, entries, 1], &lut)?),
        ],
        data_from: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_well_separated_clusters() {
        let centres = [-3.0f32, -1.0, 0.5, 4.0];
        let values: Vec<f32> =
            (0..4000).map(|i| centres[i % 4] + ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 0.2).collect();
        let found = kmeans_1d(&values, 4);
        for (f, c) in found.iter().zip(centres) {
            assert!((f - c).abs() < 0.02, "{found:?}");
        }
    }

    #[test]
    fn beats_a_quantile_table_on_heavy_tails() {
        // Heavy tails: tables at the quantiles under-cover them.
        let values: Vec<f32> = (0..5000).map(|i| ((i as f32 / 5000.0) - 0.5).powi(3) * 10.0).collect();
        let sse = |t: &[f32]| values.iter().map(|&v| (v - t[nearest(t, v)]).powi(2) as f64).sum::<f64>();
        let centres = kmeans_1d(&values, 16);
        let mut sorted = values.clone();
        sorted.sort_by(f32::total_cmp);
        let quantiles: Vec<f32> = (0..16).map(|i| sorted[(2 * i + 1) * sorted.len() / 32]).collect();
        assert!(sse(&centres) < 0.8 * sse(&quantiles), "{} vs {}", sse(&centres), sse(&quantiles));
    }

    #[test]
    fn a_lone_outlier_gets_its_own_entry() {
        let mut values: Vec<f32> = (0..9000).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
        values.push(5.25);
        let centres = kmeans_1d(&values, 16);
        assert!(centres.iter().any(|&c| (c - 5.25).abs() < 1e-6), "{centres:?}");
    }

    #[test]
    fn few_distinct_values_are_kept_exactly() {
        let values = [1.0f32, 2.0, 2.0, 5.0];
        let c = palettize(1, 4, &values, 4, 1, DType::Fp32).unwrap();
        let lut = c.inputs[1].1.to_f64().unwrap();
        let idx = c.inputs[0].1.to_i64().unwrap();
        let back: Vec<f32> = idx.iter().map(|&i| lut[i as usize] as f32).collect();
        assert_eq!(back, values);
        assert_eq!(c.inputs[0].1.dtype(), DType::Uint4);
        assert_eq!(c.inputs[1].1.shape(), &[1, 1, 16, 1]);
    }
}
