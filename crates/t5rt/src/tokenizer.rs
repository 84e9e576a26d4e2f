//! Text <-> token ids: Hugging Face's `tokenizer.json` through the `tokenizers` crate; a
//! SentencePiece `spiece.model` converted to the same tokenizer ([`spiece`]); or ByT5's bytes
//! (`byt5`).

mod byt5;
pub mod spiece;

use std::path::Path;

use crate::error::{Result, T5Error};

enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    Bytes(byt5::ByteTokenizer),
}

/// A model's tokenizer. Encoding appends `</s>` as the T5 tokenizers do.
pub struct T5Tokenizer {
    inner: Inner,
}

impl T5Tokenizer {
    /// Loads `tokenizer.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| T5Error::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| T5Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Loads a tokenizer from the bytes of a `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        // The `tokenizers` crate panics on some malformed files (a syntax error inside its
        // `decoder` section, for one): check the JSON first, and keep any panic it still
        // raises on well-formed but unexpected content from crossing the library boundary.
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
            .map_err(|e| T5Error::Tokenizer(format!("invalid tokenizer.json: {e}")))?;
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|panic| {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unexpected content");
                T5Error::Tokenizer(format!("invalid tokenizer.json: {why}"))
            })?;
        let inner =
            parsed.map_err(|e| T5Error::Tokenizer(format!("invalid tokenizer.json: {e}")))?;
        Ok(T5Tokenizer {
            inner: Inner::Hf(Box::new(inner)),
        })
    }

    /// The tokenizer Hugging Face's fast T5 tokenizer is converted to from a SentencePiece
    /// `spiece.model` (with the options of the checkpoint's tokenizer_config.json).
    pub fn from_spiece(path: &Path, options: &spiece::T5Options) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| T5Error::io(path, e))?;
        let bad = |m: String| T5Error::Tokenizer(format!("{}: {m}", path.display()));
        let model = spiece::parse(&bytes).map_err(bad)?;
        let json = spiece::tokenizer_json(&model, options).map_err(bad)?;
        Self::from_bytes(json.to_string().as_bytes())
            .map_err(|e| T5Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// ByT5's byte tokenizer, with `extra_ids` sentinels (ByT5: 125).
    pub fn byt5(extra_ids: u32) -> Self {
        T5Tokenizer {
            inner: Inner::Bytes(byt5::ByteTokenizer::new(extra_ids)),
        }
    }

    /// Text -> ids, with the special tokens the tokenizer adds (T5: a trailing `</s>`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Hf(t) => {
                let enc = t
                    .encode(text, true)
                    .map_err(|e| T5Error::Tokenizer(e.to_string()))?;
                Ok(enc.get_ids().to_vec())
            }
            Inner::Bytes(b) => Ok(b.encode(text)),
        }
    }

    /// Ids -> text, skipping special tokens (pad, eos, sentinels).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| T5Error::Tokenizer(e.to_string())),
            Inner::Bytes(b) => Ok(b.decode(ids)),
        }
    }

    /// Number of tokens including added ones.
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(t) => t.get_vocab_size(true),
            Inner::Bytes(b) => b.vocab_size(),
        }
    }
}

/// One input as a client gives it: text (encoded with the model's tokenizer) or token ids
/// (used as given).
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    Ids(Vec<u32>),
}

impl Input {
    /// The token ids to generate from: text goes through `tokenizer`, which a model without
    /// `tokenizer.json` does not have ([`T5Error::NoTokenizer`]).
    pub fn encode(&self, tokenizer: Option<&T5Tokenizer>) -> Result<Vec<u32>> {
        match self {
            Input::Ids(ids) => Ok(ids.clone()),
            Input::Text(text) => tokenizer.ok_or(T5Error::NoTokenizer)?.encode(text),
        }
    }
}
