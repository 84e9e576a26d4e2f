//! Stop strings: a sequence ends once its decoded text contains one of them. The tokens that
//! completed the stop string are kept (as Hugging Face does); the text is not cut.

use crate::error::Result;
use crate::tokenizer::T5Tokenizer;

pub struct StopStrings<'a> {
    pub strings: &'a [String],
    pub tokenizer: &'a T5Tokenizer,
}

impl StopStrings<'_> {
    /// Whether the decoded `generated` ids contain a stop string.
    pub fn hit(&self, generated: &[u32]) -> Result<bool> {
        let text = self.tokenizer.decode(generated)?;
        Ok(self.strings.iter().any(|s| text.contains(s.as_str())))
    }
}
