//! `spiece.model` (a SentencePiece model, protobuf) -> the tokenizer Hugging Face's fast T5
//! tokenizer is converted to (`transformers`' `T5Converter`): a Unigram model over the pieces
//! plus the `<extra_id_N>` sentinels, the precompiled normaliser, right-strip and collapsed
//! spaces, the Metaspace pre-tokeniser and decoder, `</s>` appended, and the special tokens
//! as added tokens. The result is a `tokenizer.json` document that the `tokenizers` crate
//! loads, so the `tokenizers` crate does all the tokenising.

use base64::Engine;
use serde_json::{json, Value};

/// One piece of the vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    /// SentencePiece's type: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
    pub kind: i32,
}

/// What the converter needs from the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpmModel {
    pub pieces: Vec<Piece>,
    /// 1 Unigram, 2 BPE, ...
    pub model_type: i32,
    pub unk_id: u32,
    pub byte_fallback: bool,
    pub precompiled_charsmap: Vec<u8>,
}

/// A protobuf message's fields, read on demand (the wire format: varints, fixed 32/64 and
/// length-delimited values; groups are not used by SentencePiece).
struct Fields<'a> {
    buf: &'a [u8],
}

enum Wire<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8]),
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first().ok_or("truncated varint")?;
            self.buf = rest;
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.buf.len() {
            return Err("truncated field".into());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next (field number, value), or None at the end.
    fn next_field(&mut self) -> Result<Option<(u64, Wire<'a>)>, String> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed64
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "field too long")?;
                Wire::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Wire::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            t => return Err(format!("unsupported protobuf wire type {t}")),
        };
        Ok(Some((key >> 3, value)))
    }
}

fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "a piece is not UTF-8".to_string())
}

/// Parses a `spiece.model`.
pub fn parse(bytes: &[u8]) -> Result<SpmModel, String> {
    let mut m = SpmModel {
        model_type: 1,
        ..SpmModel::default()
    };
    let mut top = Fields { buf: bytes };
    while let Some((field, value)) = top.next_field()? {
        match (field, value) {
            (1, Wire::Bytes(b)) => {
                let mut p = Piece {
                    piece: String::new(),
                    score: 0.0,
                    kind: 1,
                };
                let mut f = Fields { buf: b };
                while let Some((field, value)) = f.next_field()? {
                    match (field, value) {
                        (1, Wire::Bytes(s)) => p.piece = text(s)?,
                        (2, Wire::Fixed32(bits)) => p.score = f32::from_bits(bits),
                        (3, Wire::Varint(t)) => p.kind = t as i32,
                        _ => {}
                    }
                }
                m.pieces.push(p);
            }
            (2, Wire::Bytes(b)) => {
                let mut f = Fields { buf: b };
                while let Some((field, value)) = f.next_field()? {
                    match (field, value) {
                        (3, Wire::Varint(t)) => m.model_type = t as i32,
                        (35, Wire::Varint(v)) => m.byte_fallback = v != 0,
                        (40, Wire::Varint(v)) => m.unk_id = v as u32,
                        _ => {}
                    }
                }
            }
            (3, Wire::Bytes(b)) => {
                let mut f = Fields { buf: b };
                while let Some((field, value)) = f.next_field()? {
                    if let (2, Wire::Bytes(map)) = (field, value) {
                        m.precompiled_charsmap = map.to_vec();
                    }
                }
            }
            _ => {}
        }
    }
    if m.pieces.is_empty() {
        return Err("no vocabulary pieces (is this a SentencePiece model?)".into());
    }
    if m.unk_id as usize >= m.pieces.len() {
        return Err(format!("unk_id {} is outside the vocabulary", m.unk_id));
    }
    Ok(m)
}

/// Options from `tokenizer_config.json` that change the conversion.
#[derive(Debug, Clone)]
pub struct T5Options {
    /// `<extra_id_N>` sentinels appended to the vocabulary (T5: 100).
    pub extra_ids: usize,
    /// `legacy: false` prepends the Metaspace `▁` to the first word only.
    pub legacy: bool,
    pub add_prefix_space: bool,
    /// `added_tokens_decoder` of tokenizer_config.json, when it has one: the added tokens
    /// exactly as saved (id -> their JSON).
    pub added_tokens: Option<Vec<(u32, Value)>>,
}

impl Default for T5Options {
    fn default() -> Self {
        T5Options {
            extra_ids: 100,
            legacy: true,
            add_prefix_space: true,
            added_tokens: None,
        }
    }
}

impl T5Options {
    /// Reads the options from a parsed `tokenizer_config.json`.
    pub fn from_config(cfg: &Value) -> T5Options {
        let d = T5Options::default();
        let added_tokens = cfg
            .get("added_tokens_decoder")
            .and_then(Value::as_object)
            .map(|m| {
                let mut v: Vec<(u32, Value)> = m
                    .iter()
                    .filter_map(|(k, t)| Some((k.parse().ok()?, t.clone())))
                    .collect();
                v.sort_by_key(|(id, _)| *id);
                v
            });
        T5Options {
            extra_ids: cfg
                .get("extra_ids")
                .and_then(Value::as_u64)
                .map_or(d.extra_ids, |n| n as usize),
            legacy: cfg.get("legacy").and_then(Value::as_bool).unwrap_or(true),
            add_prefix_space: cfg
                .get("add_prefix_space")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            added_tokens,
        }
    }
}

fn added(id: usize, content: &str, strip: bool) -> Value {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": strip, "rstrip": strip,
        "normalized": false, "special": true
    })
}

/// The `tokenizer.json` document of the converted tokenizer.
pub fn tokenizer_json(m: &SpmModel, opts: &T5Options) -> Result<Value, String> {
    if m.model_type != 1 {
        return Err(format!(
            "SentencePiece model type {} is not Unigram; T5-family tokenizers are Unigram",
            m.model_type
        ));
    }
    let mut vocab: Vec<Value> = m.pieces.iter().map(|p| json!([p.piece, p.score])).collect();
    let n = m.pieces.len();
    for i in (0..opts.extra_ids).rev() {
        vocab.push(json!([format!("<extra_id_{i}>"), 0.0]));
    }
    let id_of = |piece: &str| m.pieces.iter().position(|p| p.piece == piece);
    let eos = id_of("</s>").ok_or("the vocabulary has no </s>")?;
    let added_tokens: Vec<Value> = match &opts.added_tokens {
        Some(list) => list
            .iter()
            .map(|(id, t)| {
                let mut t = t.clone();
                t["id"] = json!(id);
                t
            })
            .collect(),
        None => {
            // As the slow T5Tokenizer registers them: the control pieces and <unk>, then the
            // sentinels (which strip the whitespace around them).
            let mut v: Vec<Value> = m
                .pieces
                .iter()
                .enumerate()
                .filter(|(i, p)| p.kind == 3 || p.kind == 4 || *i == m.unk_id as usize)
                .map(|(i, p)| added(i, &p.piece, false))
                .collect();
            for i in 0..opts.extra_ids {
                v.push(added(
                    n + opts.extra_ids - 1 - i,
                    &format!("<extra_id_{i}>"),
                    true,
                ));
            }
            v.sort_by_key(|t| t["id"].as_u64());
            v
        }
    };
    let mut normalizers = Vec::new();
    if !m.precompiled_charsmap.is_empty() {
        normalizers.push(json!({
            "type": "Precompiled",
            "precompiled_charsmap": base64::engine::general_purpose::STANDARD.encode(&m.precompiled_charsmap),
        }));
    }
    normalizers.push(json!({"type": "Strip", "strip_left": false, "strip_right": true}));
    normalizers
        .push(json!({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u{2581}"}));
    let prepend = match (opts.add_prefix_space, opts.legacy) {
        (false, _) => "never",
        (true, true) => "always",
        (true, false) => "first",
    };
    let metaspace = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": prepend, "split": true});
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": metaspace,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [
                {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}
            ],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [eos], "tokens": ["</s>"]}}
        },
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": m.unk_id, "vocab": vocab, "byte_fallback": false}
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a field key.
    fn key(field: u64, wire: u64) -> Vec<u8> {
        varint(field << 3 | wire)
    }

    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes_field(field: u64, b: &[u8]) -> Vec<u8> {
        let mut out = key(field, 2);
        out.extend(varint(b.len() as u64));
        out.extend(b);
        out
    }

    fn piece(p: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut m = bytes_field(1, p.as_bytes());
        m.extend(key(2, 5));
        m.extend(score.to_le_bytes());
        m.extend(key(3, 0));
        m.extend(varint(kind));
        bytes_field(1, &m)
    }

    #[test]
    fn parses_pieces_and_specs() {
        let mut model = Vec::new();
        model.extend(piece("<pad>", 0.0, 3));
        model.extend(piece("</s>", 0.0, 3));
        model.extend(piece("<unk>", 0.0, 2));
        model.extend(piece("\u{2581}a", -1.5, 1));
        let mut trainer = key(3, 0);
        trainer.extend(varint(1));
        trainer.extend(key(40, 0));
        trainer.extend(varint(2));
        model.extend(bytes_field(2, &trainer));
        let m = parse(&model).unwrap();
        assert_eq!(m.pieces.len(), 4);
        assert_eq!(m.pieces[3].score, -1.5);
        assert_eq!((m.unk_id, m.model_type), (2, 1));
        let j = tokenizer_json(&m, &T5Options::default()).unwrap();
        assert_eq!(j["model"]["vocab"].as_array().unwrap().len(), 104);
        assert!(parse(&model[..model.len() - 3]).is_err());
        assert!(parse(b"not a model").is_err());
    }
}
