//! The Hugging Face tokenizer shipped inside a package (`Data/ai.corelm/tokenizer.json`).

use std::path::Path;

use corelm_format::Package;

use crate::{Error, Result};

/// Where conversions store the tokenizer inside a package.
pub const TOKENIZER_PATH: &str = "Data/ai.corelm/tokenizer.json";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

/// The largest tokenizer.json read (Gemma 3's, with 262k tokens, is 33 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let bytes = corelm_format::package::read_capped(path, MAX_TOKENIZER_BYTES)?;
        // tokenizers panics on some malformed `decoder` objects instead of returning an error.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|_| Error::malformed(path, "not a usable tokenizer.json: the tokenizers crate rejected it"))?;
        let inner = parsed.map_err(|e| Error::malformed(path, format!("not a usable tokenizer.json: {e}")))?;
        Ok(Tokenizer { inner })
    }

    /// The tokenizer a corelm conversion put in the package.
    pub fn from_package(pkg: &Package) -> Result<Tokenizer> {
        let path = pkg.path().join(TOKENIZER_PATH);
        if !path.is_file() {
            return Err(Error::malformed(pkg.path(), "the package carries no tokenizer.json (Data/ai.corelm/)"));
        }
        Tokenizer::from_file(&path)
    }

    /// Token ids of `text`; `special` adds the tokenizer's BOS/EOS template.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, special)
            .map_err(|e| Error::invalid(format!("cannot tokenize: {e}")))?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::invalid(format!("cannot decode: {e}")))
    }
}

#[cfg(test)]
mod tests {
    /// A malformed decoder made the tokenizers crate panic (found by the tokenizer fuzz target).
    #[test]
    fn a_tokenizer_the_library_panics_on_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, r#"{"decoder": {"1": 2}}"#).unwrap();
        let e = super::Tokenizer::from_file(&path).err().expect("refused");
        assert!(e.to_string().contains("not a usable tokenizer.json"), "{e}");
    }
}
