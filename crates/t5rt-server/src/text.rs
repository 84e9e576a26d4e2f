//! Generated ids -> text, as the tokens stream in: each token's text is what it adds to the
//! decoded sequence, so the pieces concatenate to the whole.

use t5rt::T5Tokenizer;

/// Incremental detokenization of one sequence.
pub struct TextStream<'a> {
    tokenizer: &'a T5Tokenizer,
    ids: Vec<u32>,
    /// The decoded text so far.
    text: String,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a T5Tokenizer) -> Self {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            text: String::new(),
        }
    }

    /// Adds `id`; returns the text it adds (empty for special tokens, and while a piece is not
    /// complete yet, such as the first bytes of a character split across tokens).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let Ok(text) = self.tokenizer.decode(&self.ids) else {
            return String::new();
        };
        if text.len() >= self.text.len()
            && text.starts_with(&self.text)
            && !text.ends_with('\u{fffd}')
        {
            let piece = text[self.text.len()..].to_string();
            self.text = text;
            piece
        } else {
            String::new()
        }
    }

    /// The whole text of the ids pushed so far.
    pub fn finish(&self) -> String {
        self.tokenizer.decode(&self.ids).unwrap_or_default()
    }
}
