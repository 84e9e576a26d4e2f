//! Validation: a request body as Text Generation Inference defines it -> the engine's input
//! ids and [`GenerationConfig`]. Every error is a 422 naming the field (or a 400 for a body
//! that is not JSON at all); nothing here panics on any input.

use serde::Deserialize;
use t5rt::{GenerationConfig, T5Tokenizer};

use crate::error::ApiError;

/// TGI's `parameters`. Every field TGI defines is accepted; those t5rt does not implement
/// are refused when set to anything but their neutral value, and unknown fields are refused
/// (a typo must not be ignored silently). `num_beams`, `min_new_tokens`,
/// `no_repeat_ngram_size` and `length_penalty` are t5rt's additions.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parameters {
    pub best_of: Option<usize>,
    pub decoder_input_details: Option<bool>,
    pub details: Option<bool>,
    pub do_sample: Option<bool>,
    pub frequency_penalty: Option<f32>,
    pub grammar: Option<serde_json::Value>,
    pub max_new_tokens: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub return_full_text: Option<bool>,
    pub seed: Option<u64>,
    pub stop: Option<Vec<String>>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_n_tokens: Option<usize>,
    pub top_p: Option<f32>,
    pub truncate: Option<usize>,
    pub typical_p: Option<f32>,
    pub watermark: Option<bool>,
    pub adapter_id: Option<String>,
    // t5rt's additions
    pub num_beams: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub no_repeat_ngram_size: Option<usize>,
    pub length_penalty: Option<f64>,
}

/// `POST /generate`, `/generate_stream` and `/` bodies.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: Parameters,
    /// Sent by some clients on `/`; streaming is chosen by the route here.
    #[serde(default)]
    pub stream: bool,
}

/// Parses a JSON body: 400 for bytes that are not JSON (or not UTF-8), 422 for JSON of the
/// wrong shape (unknown field, wrong type, missing `inputs`), naming what is wrong.
pub fn parse_body<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ApiError> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "validation",
            "the request body is not UTF-8",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::validation(format!("invalid request: {e}")),
            _ => ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "validation",
                format!("the request body is not valid JSON: {e}"),
            ),
        }
    })
}

/// Server-wide limits the validation applies (also shown by `/info`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_input_tokens: usize,
    pub max_new_tokens: usize,
    /// `max_new_tokens` when a request does not say.
    pub default_max_new_tokens: usize,
    pub max_stop_sequences: usize,
}

/// A validated request: what the engine runs, and what the response needs.
#[derive(Debug, Clone)]
pub struct Validated {
    pub ids: Vec<u32>,
    pub cfg: GenerationConfig,
    pub details: bool,
    pub return_full_text: bool,
    /// The seed sampling used (None for greedy and beams), for `details.seed`.
    pub seed: Option<u64>,
}

/// Turns `inputs` and `parameters` into ids and options, or a 422 naming the field.
pub fn validate(
    inputs: &str,
    p: &Parameters,
    tokenizer: Option<&T5Tokenizer>,
    defaults: &GenerationConfig,
    limits: &Limits,
    streaming: bool,
) -> Result<Validated, ApiError> {
    let bad = |m: String| Err(ApiError::validation(m));
    if inputs.trim().is_empty() {
        return bad("`inputs` is empty".into());
    }
    // What TGI defines and t5rt does not do: refused unless neutral.
    if p.best_of.is_some_and(|b| b > 1) {
        return bad("`best_of` > 1 is not supported; use `num_beams` for beam search".into());
    }
    if p.frequency_penalty.is_some_and(|f| f != 0.0) {
        return bad("`frequency_penalty` is not supported; use `repetition_penalty`".into());
    }
    if p.grammar.as_ref().is_some_and(|g| !g.is_null()) {
        return bad("`grammar` (constrained decoding) is not supported".into());
    }
    if p.top_n_tokens.is_some_and(|n| n > 0) {
        return bad("`top_n_tokens` is not supported".into());
    }
    if p.typical_p.is_some() {
        return bad("`typical_p` is not supported".into());
    }
    if p.watermark == Some(true) {
        return bad("`watermark` is not supported".into());
    }
    if p.adapter_id.as_ref().is_some_and(|a| !a.is_empty()) {
        return bad("`adapter_id`: adapters are not supported".into());
    }
    if streaming && p.decoder_input_details == Some(true) {
        return bad("`decoder_input_details` is not supported when streaming".into());
    }
    let tokenizer = tokenizer.ok_or_else(|| {
        ApiError::validation(
            "this model has no tokenizer.json, so text inputs cannot be encoded".to_string(),
        )
    })?;
    let mut ids = tokenizer
        .encode(inputs)
        .map_err(|e| ApiError::validation(format!("`inputs`: {e}")))?;
    if let Some(t) = p.truncate {
        if t == 0 {
            return bad("`truncate` must be at least 1".into());
        }
        // As TGI: keep the last `truncate` tokens.
        if ids.len() > t {
            ids.drain(..ids.len() - t);
        }
    }
    if ids.len() > limits.max_input_tokens {
        return bad(format!(
            "`inputs` has {} tokens, more than max_input_tokens ({})",
            ids.len(),
            limits.max_input_tokens
        ));
    }
    let max_new = p.max_new_tokens.unwrap_or(limits.default_max_new_tokens);
    if max_new == 0 {
        return bad("`max_new_tokens` must be at least 1".into());
    }
    if max_new > limits.max_new_tokens {
        return bad(format!(
            "`max_new_tokens` is {max_new}, more than the limit of {} (max_new_tokens)",
            limits.max_new_tokens
        ));
    }
    let stop = p.stop.clone().unwrap_or_default();
    if stop.len() > limits.max_stop_sequences {
        return bad(format!(
            "`stop` has {} sequences, more than max_stop_sequences ({})",
            stop.len(),
            limits.max_stop_sequences
        ));
    }
    let mut cfg = GenerationConfig {
        max_new_tokens: max_new,
        max_length: None,
        stop_strings: stop,
        batch_size: 1,
        max_input_tokens: limits.max_input_tokens,
        ..defaults.clone()
    };
    macro_rules! set {
        ($($field:ident),*) => { $(if let Some(v) = p.$field.clone() { cfg.$field = v; })* };
    }
    set!(
        do_sample,
        repetition_penalty,
        temperature,
        top_k,
        top_p,
        num_beams,
        min_new_tokens,
        no_repeat_ngram_size,
        length_penalty
    );
    if let Some(seed) = p.seed {
        cfg.seed = seed;
    }
    if cfg.min_new_tokens > max_new {
        cfg.min_new_tokens = cfg.min_new_tokens.min(max_new);
        if p.min_new_tokens.is_some() {
            return bad(format!(
                "`min_new_tokens` ({}) is larger than `max_new_tokens` ({max_new})",
                p.min_new_tokens.unwrap_or(0)
            ));
        }
    }
    let seed = (cfg.do_sample && cfg.num_beams <= 1).then_some(cfg.seed);
    Ok(Validated {
        ids,
        cfg,
        details: p.details.unwrap_or(false) || p.decoder_input_details.unwrap_or(false),
        return_full_text: p.return_full_text.unwrap_or(false),
        seed,
    })
}
