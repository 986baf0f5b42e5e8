//! Reading the arrays a backend returns: Core ML may pad their strides, and a caller that needs
//! one query position of `[…, N, V]` logits (generation, with a 262k-token vocabulary) should not
//! convert all N rows. Kept apart from Core ML so it runs under tests on any machine; the Core ML
//! backend hands it the bytes of each output array.

use crate::{Error, Result};

/// The elements of an array of `shape`, with element `strides`, stored in `data`, in row-major
/// order and converted by `convert`. With `row`, only that index of the second-to-last axis is
/// read (which then has length 1). Returns the shape read and its elements; strides that reach
/// past `data` are an error, not a read out of bounds.
pub fn gather<T: Copy, U>(
    data: &[T],
    shape: &[usize],
    strides: &[usize],
    row: Option<usize>,
    convert: impl Fn(T) -> U,
) -> Result<(Vec<usize>, Vec<U>)> {
    if shape.len() != strides.len() {
        return Err(Error::invalid(format!("shape {shape:?} with strides {strides:?}")));
    }
    let mut shape = shape.to_vec();
    let mut base = 0usize;
    if let Some(r) = row {
        let axis = shape.len().checked_sub(2).ok_or_else(|| Error::invalid("one row of an array of rank < 2"))?;
        if r >= shape[axis] {
            return Err(Error::invalid(format!("row {r} of an array of shape {shape:?}")));
        }
        base = r * strides[axis];
        shape[axis] = 1;
    }
    let count: usize = shape.iter().product();
    let mut out = Vec::with_capacity(count);
    if count == 0 {
        return Ok((shape, out));
    }
    let last = base + shape.iter().zip(strides).map(|(&d, &s)| (d - 1) * s).sum::<usize>();
    if last >= data.len() {
        return Err(Error::invalid(format!(
            "an array of shape {shape:?} and strides {strides:?} reaches element {last}, past its {} elements",
            data.len()
        )));
    }
    let (inner, inner_stride) = (shape[shape.len() - 1], strides[strides.len() - 1]);
    // An odometer over every dimension but the last.
    let mut index = vec![0usize; shape.len()];
    loop {
        let offset = base + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        if inner_stride == 1 {
            out.extend(data[offset..offset + inner].iter().map(|&x| convert(x)));
        } else {
            out.extend((0..inner).map(|k| convert(data[offset + k * inner_stride])));
        }
        let mut d = shape.len() - 1;
        loop {
            if d == 0 {
                return Ok((shape, out));
            }
            d -= 1;
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A [2, 3, 4] array whose rows Core ML padded to 8 elements: element (a, b, c) holds
    /// 100a + 10b + c, the padding -1.
    fn padded() -> (Vec<i32>, [usize; 3], [usize; 3]) {
        let (shape, strides) = ([2, 3, 4], [24, 8, 1]);
        let mut data = vec![-1; 48];
        for a in 0..2 {
            for b in 0..3 {
                for c in 0..4 {
                    data[a * 24 + b * 8 + c] = (100 * a + 10 * b + c) as i32;
                }
            }
        }
        (data, shape, strides)
    }

    #[test]
    fn padded_strides_are_read_in_row_major_order() {
        let (data, shape, strides) = padded();
        let (got_shape, got) = gather(&data, &shape, &strides, None, |x| x).unwrap();
        assert_eq!(got_shape, shape);
        let want: Vec<i32> =
            (0..2).flat_map(|a| (0..3).flat_map(move |b| (0..4).map(move |c| 100 * a + 10 * b + c))).collect();
        assert_eq!(got, want);
    }

    /// One query row of the logits: only that row is read and converted.
    #[test]
    fn one_row_is_read_alone() {
        let (data, shape, strides) = padded();
        let (got_shape, got) = gather(&data, &shape, &strides, Some(2), |x| x as f32).unwrap();
        assert_eq!(got_shape, [2, 1, 4]);
        assert_eq!(got, [20.0, 21.0, 22.0, 23.0, 120.0, 121.0, 122.0, 123.0]);
        assert!(gather(&data, &shape, &strides, Some(3), |x| x).is_err());
        assert!(gather(&data, &[4], &[1], Some(0), |x| x).is_err());
    }

    /// Strides that claim more than the buffer holds are refused, and a transposed (non-unit
    /// inner stride) array is read correctly.
    #[test]
    fn strides_past_the_buffer_are_an_error() {
        let (data, shape, _) = padded();
        let e = gather(&data, &shape, &[24, 8, 4], None, |x| x).unwrap_err().to_string();
        assert!(e.contains("past its 48 elements"), "{e}");
        let (_, t) = gather(&[1, 2, 3, 4, 5, 6], &[3, 2], &[1, 3], None, |x| x).unwrap();
        assert_eq!(t, [1, 4, 2, 5, 3, 6]);
    }
}
