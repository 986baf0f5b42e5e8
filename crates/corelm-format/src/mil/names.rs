//! MIL identifiers: `[A-Za-z_][A-Za-z0-9_]*`, not a word of MIL text syntax.

use std::collections::HashSet;

/// Words that clash with MIL text syntax in compiled models.
pub const RESERVED: &[&str] = &[
    "any", "bool", "program", "func", "tensor", "list", "dict", "tuple", "true", "false", "string", "bf16", "fp16",
    "fp32", "fp64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "state",
];

/// Whether `name` may be used as a function, variable or op name as it is.
pub fn is_valid(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !RESERVED.contains(&name)
}

/// Maps any string onto a valid identifier: invalid characters become `_`, a bad first
/// character gets a `var_` prefix and reserved words a `_workaround` suffix.
pub fn sanitize(name: &str) -> String {
    let mut out: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        out.insert_str(0, "var_");
    }
    if RESERVED.contains(&out.as_str()) {
        out.push_str("_workaround");
    }
    out
}

/// Hands out sanitized names, unique within one function.
#[derive(Default)]
pub struct NameAllocator {
    used: HashSet<String>,
}

impl NameAllocator {
    /// `base` sanitized, with `_0`, `_1`, ... appended if already taken.
    pub fn fresh(&mut self, base: &str) -> String {
        let base = sanitize(base);
        let mut name = base.clone();
        let mut i = 0;
        while self.used.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        self.used.insert(name.clone());
        name
    }

    /// Claims `name` exactly; false if it is taken or invalid.
    pub fn claim(&mut self, name: &str) -> bool {
        is_valid(name) && self.used.insert(name.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizes_like_coremltools() {
        assert_eq!(sanitize("model.layers.0.q_proj"), "model_layers_0_q_proj");
        assert_eq!(sanitize("0abc"), "var_0abc");
        assert_eq!(sanitize("fp16"), "fp16_workaround");
        assert!(!is_valid("a@b") && !is_valid("") && !is_valid("state") && is_valid("_x9"));
        let mut names = NameAllocator::default();
        assert_eq!(names.fresh("x"), "x");
        assert_eq!(names.fresh("x"), "x_0");
        assert_eq!(names.fresh("x"), "x_1");
        assert!(!names.claim("x"));
    }
}
