//! `config.json` -> [`T5Config`]: every T5-family variant, validated once at load.
//!
//! Defaults follow Hugging Face's `T5Config`, so a config.json that omits a field means
//! what it means there (t5 v1.0 configs omit `tie_word_embeddings`, which defaults to true).

use serde::Deserialize;

use crate::error::{Result, T5Error};

/// The activation inside the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// t5 v1.0: `relu`.
    Relu,
    /// T5 v1.1 / FLAN-T5 / mT5 (`gated-gelu`): GELU, tanh approximation (`gelu_new`).
    GeluNew,
    /// `silu` / `gated-silu`.
    Silu,
}

/// The model blueprint. Immutable, validated, cheap to clone.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_decoder_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f32,
    pub activation: Activation,
    /// `wi_0` (activated) times `wi_1` (linear), as in T5 v1.1.
    pub is_gated_act: bool,
    /// Decoder output goes through the shared embedding (scaled by `d_model ** -0.5`).
    pub tie_word_embeddings: bool,
    pub pad_token_id: u32,
    pub eos_token_id: u32,
    pub decoder_start_token_id: u32,
    /// `tokenizer_class` when config.json names one (ByT5: `ByT5Tokenizer`).
    pub tokenizer_class: Option<String>,
}

/// `eos_token_id` is an int in T5 configs, a list in some generation configs.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

impl OneOrMany {
    pub(crate) fn first(&self) -> Option<i64> {
        match self {
            OneOrMany::One(v) => Some(*v),
            OneOrMany::Many(v) => v.first().copied(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<i64>,
    d_model: Option<i64>,
    d_kv: Option<i64>,
    d_ff: Option<i64>,
    num_layers: Option<i64>,
    num_decoder_layers: Option<i64>,
    num_heads: Option<i64>,
    relative_attention_num_buckets: Option<i64>,
    relative_attention_max_distance: Option<i64>,
    layer_norm_epsilon: Option<f64>,
    feed_forward_proj: Option<String>,
    dense_act_fn: Option<String>,
    is_gated_act: Option<bool>,
    tie_word_embeddings: Option<bool>,
    pad_token_id: Option<i64>,
    eos_token_id: Option<OneOrMany>,
    decoder_start_token_id: Option<i64>,
    is_encoder_decoder: Option<bool>,
    tokenizer_class: Option<String>,
}

/// Upper bounds on the config's dimensions: several times the largest published T5-family
/// model's (t5-11b: d_ff 65536, 128 heads of d_kv 128; mT5: 250112 tokens). A config past
/// them is corrupt, and sizes computed from it could overflow.
fn dimension_limit(field: &str) -> i64 {
    match field {
        "vocab_size" => 1 << 22,
        "d_model" => 1 << 16,
        "d_kv" => 1 << 12,
        "d_ff" => 1 << 18,
        "num_layers" | "num_decoder_layers" | "num_heads" => 1 << 10,
        "relative_attention_num_buckets" => 1 << 12,
        _ => 1 << 24, // relative_attention_max_distance
    }
}

fn positive(field: &str, value: Option<i64>, default: i64) -> Result<usize> {
    let v = value.unwrap_or(default);
    if v <= 0 {
        return Err(T5Error::config(
            field,
            format!("must be a positive integer, found {v}"),
        ));
    }
    let limit = dimension_limit(field);
    if v > limit {
        return Err(T5Error::config(
            field,
            format!(
                "{v} is larger than any T5-family model (at most {limit}); is config.json corrupt?"
            ),
        ));
    }
    Ok(v as usize)
}

fn token_id(field: &str, value: Option<i64>, default: i64, vocab: usize) -> Result<u32> {
    let v = value.unwrap_or(default);
    if v < 0 || v as usize >= vocab {
        return Err(T5Error::config(
            field,
            format!("token id {v} is outside the vocabulary (vocab_size {vocab})"),
        ));
    }
    Ok(v as u32)
}

/// Splits `feed_forward_proj` as Hugging Face does: `"gated-gelu"` -> gated `gelu_new`.
fn parse_feed_forward(proj: &str) -> Result<(Activation, bool)> {
    let parts: Vec<&str> = proj.split('-').collect();
    let (gated, act) = match parts.as_slice() {
        [act] => (false, *act),
        ["gated", act] => (true, *act),
        _ => {
            return Err(T5Error::config(
                "feed_forward_proj",
                format!("`{proj}` is not of the form `ACT` or `gated-ACT`"),
            ))
        }
    };
    let activation = match (act, gated) {
        ("relu", _) => Activation::Relu,
        // HF maps `gated-gelu` to the tanh approximation (`gelu_new`).
        ("gelu", true) | ("gelu_new", _) => Activation::GeluNew,
        ("silu", _) | ("swish", _) => Activation::Silu,
        _ => {
            return Err(T5Error::config(
                "feed_forward_proj",
                format!("`{proj}` is not supported; t5rt runs relu, gated-gelu, gelu_new and silu (gated or not)"),
            ))
        }
    };
    Ok((activation, gated))
}

impl T5Config {
    /// Parses and validates the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| T5Error::Json {
            path: "config.json".into(),
            message: e.to_string(),
        })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self> {
        let model_type = raw.model_type.unwrap_or_else(|| "t5".to_string());
        match model_type.as_str() {
            "t5" | "mt5" => {}
            "umt5" => return Err(T5Error::config(
                "model_type",
                "umt5 (a relative bias in every layer) is not supported yet; t5rt runs t5 and mt5",
            )),
            other => {
                return Err(T5Error::config(
                    "model_type",
                    format!("`{other}` is not a T5-family model; t5rt runs t5 and mt5"),
                ))
            }
        }
        if raw.is_encoder_decoder == Some(false) {
            return Err(T5Error::config(
                "is_encoder_decoder",
                "encoder-only T5 checkpoints cannot generate; t5rt needs the decoder",
            ));
        }
        let vocab_size = positive("vocab_size", raw.vocab_size, 32128)?;
        let d_model = positive("d_model", raw.d_model, 512)?;
        let d_kv = positive("d_kv", raw.d_kv, 64)?;
        let d_ff = positive("d_ff", raw.d_ff, 2048)?;
        let num_layers = positive("num_layers", raw.num_layers, 6)?;
        let num_decoder_layers = positive(
            "num_decoder_layers",
            raw.num_decoder_layers,
            num_layers as i64,
        )?;
        let num_heads = positive("num_heads", raw.num_heads, 8)?;
        let buckets = positive(
            "relative_attention_num_buckets",
            raw.relative_attention_num_buckets,
            32,
        )?;
        if buckets < 4 {
            return Err(T5Error::config(
                "relative_attention_num_buckets",
                format!("must be at least 4, found {buckets}"),
            ));
        }
        let max_distance = positive(
            "relative_attention_max_distance",
            raw.relative_attention_max_distance,
            128,
        )?;
        let eps = raw.layer_norm_epsilon.unwrap_or(1e-6);
        if !(eps > 0.0 && eps < 1.0) {
            return Err(T5Error::config(
                "layer_norm_epsilon",
                format!("must be in (0, 1), found {eps}"),
            ));
        }
        let proj = raw.feed_forward_proj.unwrap_or_else(|| "relu".to_string());
        let (activation, is_gated_act) = parse_feed_forward(&proj)?;
        if let Some(gated) = raw.is_gated_act {
            if gated != is_gated_act {
                return Err(T5Error::config(
                    "is_gated_act",
                    format!("{gated} contradicts feed_forward_proj `{proj}`"),
                ));
            }
        }
        if let Some(act) = raw.dense_act_fn.as_deref() {
            let consistent = match activation {
                Activation::Relu => act == "relu",
                Activation::GeluNew => act == "gelu_new" || act == "gelu",
                Activation::Silu => act == "silu" || act == "swish",
            };
            if !consistent {
                return Err(T5Error::config(
                    "dense_act_fn",
                    format!("`{act}` contradicts feed_forward_proj `{proj}`"),
                ));
            }
        }
        if matches!(&raw.eos_token_id, Some(OneOrMany::Many(v)) if v.is_empty()) {
            return Err(T5Error::config(
                "eos_token_id",
                "an empty list; give the EOS id",
            ));
        }
        let pad = token_id("pad_token_id", raw.pad_token_id, 0, vocab_size)?;
        let eos = token_id(
            "eos_token_id",
            raw.eos_token_id.as_ref().and_then(OneOrMany::first),
            1,
            vocab_size,
        )?;
        let start = token_id(
            "decoder_start_token_id",
            raw.decoder_start_token_id,
            pad as i64,
            vocab_size,
        )?;
        Ok(T5Config {
            model_type,
            vocab_size,
            d_model,
            d_kv,
            d_ff,
            num_layers,
            num_decoder_layers,
            num_heads,
            relative_attention_num_buckets: buckets,
            relative_attention_max_distance: max_distance,
            layer_norm_epsilon: eps as f32,
            activation,
            is_gated_act,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            pad_token_id: pad,
            eos_token_id: eos,
            decoder_start_token_id: start,
            tokenizer_class: raw.tokenizer_class,
        })
    }

    /// Width of the attention projections: `num_heads * d_kv`.
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

/// Defaults a model ships in `generation_config.json`; user options override them
/// (see `GenerationConfig::from_model`). Keys t5rt does not use are ignored, as HF's files
/// carry many (`transformers_version`, `_from_model_config`, ...).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub min_length: Option<usize>,
    pub eos_token_id: Option<u32>,
    pub decoder_start_token_id: Option<u32>,
    pub num_beams: Option<usize>,
    pub num_return_sequences: Option<usize>,
    pub length_penalty: Option<f64>,
    pub early_stopping: Option<crate::generate::EarlyStopping>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub no_repeat_ngram_size: Option<usize>,
    pub bad_words_ids: Option<Vec<Vec<u32>>>,
    pub forced_bos_token_id: Option<u32>,
    pub forced_eos_token_id: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct RawGenerationConfig {
    max_new_tokens: Option<i64>,
    max_length: Option<i64>,
    min_new_tokens: Option<i64>,
    min_length: Option<i64>,
    eos_token_id: Option<OneOrMany>,
    decoder_start_token_id: Option<i64>,
    num_beams: Option<i64>,
    num_return_sequences: Option<i64>,
    length_penalty: Option<f64>,
    early_stopping: Option<serde_json::Value>,
    do_sample: Option<bool>,
    temperature: Option<f64>,
    top_k: Option<i64>,
    top_p: Option<f64>,
    repetition_penalty: Option<f64>,
    no_repeat_ngram_size: Option<i64>,
    bad_words_ids: Option<Vec<Vec<i64>>>,
    forced_bos_token_id: Option<i64>,
    forced_eos_token_id: Option<OneOrMany>,
}

impl GenerationDefaults {
    /// Parses `generation_config.json`. `max_length` counts the decoder start token, as in HF.
    pub fn from_json_str(text: &str, config: &T5Config) -> Result<Self> {
        let raw: RawGenerationConfig = serde_json::from_str(text).map_err(|e| T5Error::Json {
            path: "generation_config.json".into(),
            message: e.to_string(),
        })?;
        let count = |field: &str, v: Option<i64>| -> Result<Option<usize>> {
            match v {
                Some(n) if n < 0 => Err(T5Error::config(field, format!("must be >= 0, found {n}"))),
                Some(n) => Ok(Some(n as usize)),
                None => Ok(None),
            }
        };
        let vocab = config.vocab_size;
        let id = |field: &str, v: Option<i64>| -> Result<Option<u32>> {
            v.map(|v| token_id(field, Some(v), 0, vocab)).transpose()
        };
        let max_new_tokens = match count("max_new_tokens", raw.max_new_tokens)? {
            Some(n) => Some(n),
            None => count("max_length", raw.max_length)?.map(|n| n.saturating_sub(1)),
        };
        let early_stopping = match raw.early_stopping {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Bool(true)) => Some(crate::generate::EarlyStopping::True),
            Some(serde_json::Value::Bool(false)) => Some(crate::generate::EarlyStopping::False),
            Some(serde_json::Value::String(s)) if s == "never" => {
                Some(crate::generate::EarlyStopping::Never)
            }
            Some(other) => {
                return Err(T5Error::config(
                    "early_stopping",
                    format!("{other} is not true, false or \"never\""),
                ))
            }
        };
        let bad_words_ids = match raw.bad_words_ids {
            Some(seqs) => Some(
                seqs.into_iter()
                    .map(|seq| {
                        seq.into_iter()
                            .map(|t| token_id("bad_words_ids", Some(t), 0, vocab))
                            .collect::<Result<Vec<u32>>>()
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            None => None,
        };
        Ok(GenerationDefaults {
            max_new_tokens,
            min_new_tokens: count("min_new_tokens", raw.min_new_tokens)?,
            min_length: count("min_length", raw.min_length)?,
            eos_token_id: id(
                "eos_token_id",
                raw.eos_token_id.as_ref().and_then(OneOrMany::first),
            )?,
            decoder_start_token_id: id("decoder_start_token_id", raw.decoder_start_token_id)?,
            num_beams: count("num_beams", raw.num_beams)?,
            num_return_sequences: count("num_return_sequences", raw.num_return_sequences)?,
            length_penalty: raw.length_penalty,
            early_stopping,
            do_sample: raw.do_sample,
            temperature: raw.temperature.map(|v| v as f32),
            top_k: count("top_k", raw.top_k)?,
            top_p: raw.top_p.map(|v| v as f32),
            repetition_penalty: raw.repetition_penalty.map(|v| v as f32),
            no_repeat_ngram_size: count("no_repeat_ngram_size", raw.no_repeat_ngram_size)?,
            bad_words_ids,
            forced_bos_token_id: id("forced_bos_token_id", raw.forced_bos_token_id)?,
            forced_eos_token_id: id(
                "forced_eos_token_id",
                raw.forced_eos_token_id.as_ref().and_then(OneOrMany::first),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_0_defaults_tie_embeddings_and_use_relu() {
        let c = T5Config::from_json_str(r#"{"d_model": 512, "num_heads": 8}"#).unwrap();
        assert!(c.tie_word_embeddings);
        assert_eq!(c.activation, Activation::Relu);
        assert!(!c.is_gated_act);
        assert_eq!(c.num_decoder_layers, 6);
        assert_eq!(c.decoder_start_token_id, 0);
    }

    #[test]
    fn flan_is_gated_gelu_new_untied() {
        let c = T5Config::from_json_str(
            r#"{"feed_forward_proj": "gated-gelu", "tie_word_embeddings": false,
                "dense_act_fn": "gelu_new", "is_gated_act": true, "num_decoder_layers": 8}"#,
        )
        .unwrap();
        assert_eq!(c.activation, Activation::GeluNew);
        assert!(c.is_gated_act && !c.tie_word_embeddings);
        assert_eq!(c.num_decoder_layers, 8);
    }

    #[test]
    fn unsupported_configs_name_the_field() {
        for (json, field) in [
            (
                r#"{"feed_forward_proj": "gated-tanh"}"#,
                "feed_forward_proj",
            ),
            (
                r#"{"feed_forward_proj": "very-gated-gelu"}"#,
                "feed_forward_proj",
            ),
            (r#"{"model_type": "bart"}"#, "model_type"),
            (r#"{"model_type": "umt5"}"#, "model_type"),
            (r#"{"d_model": 0}"#, "d_model"),
            (r#"{"eos_token_id": 99999}"#, "eos_token_id"),
            (
                r#"{"feed_forward_proj": "relu", "is_gated_act": true}"#,
                "is_gated_act",
            ),
        ] {
            match T5Config::from_json_str(json) {
                Err(T5Error::Config { field: f, .. }) => assert_eq!(f, field, "{json}"),
                other => panic!("{json}: expected a config error, got {other:?}"),
            }
        }
    }

    #[test]
    fn generation_max_length_counts_the_start_token() {
        let c = T5Config::from_json_str("{}").unwrap();
        let g = GenerationDefaults::from_json_str(r#"{"max_length": 20, "eos_token_id": [1]}"#, &c)
            .unwrap();
        assert_eq!(g.max_new_tokens, Some(19));
        assert_eq!(g.eos_token_id, Some(1));
        let g = GenerationDefaults::from_json_str(
            r#"{"num_beams": 4, "early_stopping": "never", "length_penalty": 0.6,
                "no_repeat_ngram_size": 3, "bad_words_ids": [[5, 6]], "transformers_version": "x"}"#,
            &c,
        )
        .unwrap();
        assert_eq!(g.num_beams, Some(4));
        assert_eq!(
            g.early_stopping,
            Some(crate::generate::EarlyStopping::Never)
        );
        assert_eq!(g.bad_words_ids, Some(vec![vec![5, 6]]));
        assert!(GenerationDefaults::from_json_str(r#"{"early_stopping": 3}"#, &c).is_err());
    }
}
