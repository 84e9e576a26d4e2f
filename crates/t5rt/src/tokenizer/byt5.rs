//! ByT5's tokenizer, as Hugging Face's `ByT5Tokenizer` defines it: no vocabulary file; text is
//! its UTF-8 bytes, each id = byte + 3 (0, 1, 2 are `<pad>`, `</s>`, `<unk>`), with `</s>`
//! appended. Special tokens written in the text are recognised (`<pad>`, `</s>` and `<unk>`
//! swallow the whitespace around them, as HF's stripping added tokens do); the sentinels
//! `<extra_id_N>` follow the 259 byte ids. Decoding joins the bytes and drops byte runs that
//! are not valid UTF-8, as HF's `decode("utf-8", errors="ignore")` does.

/// Ids of the special tokens; bytes start at [`OFFSET`].
const PAD: u32 = 0;
const EOS: u32 = 1;
const UNK: u32 = 2;
const OFFSET: u32 = 3;

#[derive(Debug, Clone)]
pub struct ByteTokenizer {
    /// Number of `<extra_id_N>` sentinels (ids 259 + N).
    extra_ids: u32,
}

/// A special token found in the text: its id, and whether it strips whitespace around it.
fn special_at(text: &str, extra_ids: u32) -> Option<(usize, u32, bool)> {
    for (tok, id) in [("<pad>", PAD), ("</s>", EOS), ("<unk>", UNK)] {
        if text.starts_with(tok) {
            return Some((tok.len(), id, true));
        }
    }
    let rest = text.strip_prefix("<extra_id_")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 6 || !rest[digits..].starts_with('>') {
        return None;
    }
    let n: u32 = rest[..digits].parse().ok()?;
    (n < extra_ids).then_some(("<extra_id_".len() + digits + 1, 259 + n, false))
}

impl ByteTokenizer {
    pub fn new(extra_ids: u32) -> Self {
        ByteTokenizer { extra_ids }
    }

    /// Ids in the vocabulary: specials, 256 bytes, sentinels.
    pub fn vocab_size(&self) -> usize {
        (OFFSET + 256 + self.extra_ids) as usize
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids: Vec<u32> = Vec::with_capacity(text.len() + 1);
        // Bytes of plain text waiting to be pushed (so a stripping token can trim them).
        let mut pending = String::new();
        let mut rest = text;
        let mut strip_next = false;
        while !rest.is_empty() {
            if strip_next {
                rest = rest.trim_start();
                strip_next = false;
                continue;
            }
            if let Some((len, id, strips)) = special_at(rest, self.extra_ids) {
                let plain = if strips {
                    pending.trim_end()
                } else {
                    pending.as_str()
                };
                ids.extend(plain.bytes().map(|b| b as u32 + OFFSET));
                pending.clear();
                ids.push(id);
                rest = &rest[len..];
                strip_next = strips;
                continue;
            }
            let ch = rest.chars().next().expect("not empty");
            pending.push(ch);
            rest = &rest[ch.len_utf8()..];
        }
        ids.extend(pending.bytes().map(|b| b as u32 + OFFSET));
        // `</s>` is appended unless the text already ends with it (as HF does).
        if ids.last() != Some(&EOS) {
            ids.push(EOS);
        }
        ids
    }

    /// Ids -> text, without special tokens and sentinels; invalid UTF-8 is dropped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|&&id| (OFFSET..OFFSET + 256).contains(&id))
            .map(|&id| (id - OFFSET) as u8)
            .collect();
        utf8_ignoring_errors(&bytes)
    }
}

/// Python's `bytes.decode("utf-8", errors="ignore")`: the valid sequences, in order.
fn utf8_ignoring_errors(mut bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let (valid, after) = bytes.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).expect("checked valid"));
                // Skip the invalid sequence (or the truncated one at the end).
                let skip = e.error_len().unwrap_or(after.len());
                bytes = &after[skip..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_plus_three_with_eos() {
        let t = ByteTokenizer::new(125);
        assert_eq!(t.encode("hi"), vec![104 + 3, 105 + 3, 1]);
        assert_eq!(t.encode(""), vec![1]);
        assert_eq!(t.encode("a</s>"), vec![97 + 3, 1]);
        assert_eq!(t.encode("a <extra_id_0> b"), vec![100, 35, 259, 35, 101, 1]);
        assert_eq!(t.encode("a  </s>  b"), vec![100, 1, 101, 1]);
        assert_eq!(t.decode(&t.encode("héllo 中文")), "héllo 中文");
        // An invalid run is dropped, the rest kept.
        assert_eq!(t.decode(&[100, 0xff + 3, 101, 0xe4 + 3]), "ab");
        assert_eq!(t.vocab_size(), 384);
    }
}
