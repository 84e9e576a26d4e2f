//! [`GenerationConfig`]: every decoding option, Hugging Face's names and defaults, merged
//! from the model's `generation_config.json` and then the user's options, and validated.

use crate::config::{GenerationDefaults, T5Config};
use crate::error::{Result, T5Error};

/// When beam search stops, as Hugging Face's `early_stopping` defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `true`: stop a source as soon as `num_beams` hypotheses are finished.
    True,
    /// `false` (HF's default): stop when no running beam can beat the worst finished one,
    /// estimated at the current length.
    #[default]
    False,
    /// `"never"`: the same estimate at the longest possible length (when length_penalty > 0).
    Never,
}

impl std::str::FromStr for EarlyStopping {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "true" | "True" => Ok(EarlyStopping::True),
            "false" | "False" => Ok(EarlyStopping::False),
            "never" => Ok(EarlyStopping::Never),
            other => Err(format!("`{other}`: expected true, false or never")),
        }
    }
}

/// Decoding options. Defaults are Hugging Face's, except `max_new_tokens` (128, not
/// `max_length` 20) and the engine's own `batch_size` and `max_input_tokens`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Tokens generated at most per sequence (EOS included).
    pub max_new_tokens: usize,
    /// HF's `max_length` (counts the decoder start token); when set, the smaller limit wins.
    pub max_length: Option<usize>,
    /// EOS is banned until this many tokens were generated.
    pub min_new_tokens: usize,
    /// HF's `min_length` (counts the decoder start token).
    pub min_length: usize,
    /// Beams; 1 is greedy search (or sampling).
    pub num_beams: usize,
    /// Beam scores are divided by `length ** length_penalty`.
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    /// Sequences returned per input, best first (at most `num_beams` without sampling).
    pub num_return_sequences: usize,
    /// Sample instead of taking the most likely token.
    pub do_sample: bool,
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens when sampling (0 = all). HF's default is 50.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` when sampling.
    pub top_p: f32,
    /// Seed of the sampler; the same seed and inputs give the same samples.
    pub seed: u64,
    /// > 1 discourages tokens already generated (CTRL's penalty, as in HF).
    pub repetition_penalty: f32,
    /// No n-gram of this size occurs twice in an output (0 = off).
    pub no_repeat_ngram_size: usize,
    /// Token sequences never generated.
    pub bad_words_ids: Vec<Vec<u32>>,
    /// Token forced as the first generated one.
    pub forced_bos_token_id: Option<u32>,
    /// Token forced when the length limit is reached.
    pub forced_eos_token_id: Option<u32>,
    /// Generation of a sequence stops once its decoded text contains one of these.
    pub stop_strings: Vec<String>,
    /// Sequences decoded together at most (beam search: sources, each with its beams).
    pub batch_size: usize,
    /// Longest input accepted, in tokens; longer inputs are refused, not truncated.
    pub max_input_tokens: usize,
    /// Bytes one `generate` call may use beyond the loaded model (caches, activations,
    /// logits, outputs); `None`: the memory available to the process when the call starts
    /// (cgroup limits included). Batches are split to fit it; a request that cannot fit is
    /// refused before any work (see [`super::memory`]).
    pub max_memory: Option<u64>,
}

/// Hard bounds on the options a client controls, whatever the memory budget: values past
/// them are typos or abuse, and would cost hours or exhaust the machine.
#[derive(Debug, Clone, Copy)]
pub struct Limits;

impl Limits {
    /// `max_new_tokens` (and `max_length`) at most.
    pub const MAX_NEW_TOKENS: usize = 1 << 20;
    /// `max_input_tokens` at most.
    pub const MAX_INPUT_TOKENS: usize = 1 << 20;
    /// `num_beams` at most (and never more than the vocabulary).
    pub const MAX_BEAMS: usize = 512;
    /// `num_return_sequences` at most, per input.
    pub const MAX_RETURN_SEQUENCES: usize = 4096;
    /// `no_repeat_ngram_size` at most.
    pub const MAX_NGRAM: usize = 1024;
    /// Stop strings at most, and bytes in each.
    pub const MAX_STOP_STRINGS: usize = 64;
    pub const MAX_STOP_STRING_BYTES: usize = 1024;
    /// `bad_words_ids` sequences at most, and ids in each.
    pub const MAX_BAD_WORDS: usize = 10_000;
    pub const MAX_BAD_WORD_IDS: usize = 1024;
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 128,
            max_length: None,
            min_new_tokens: 0,
            min_length: 0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            num_return_sequences: 1,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            seed: 0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            bad_words_ids: Vec::new(),
            forced_bos_token_id: None,
            forced_eos_token_id: None,
            stop_strings: Vec::new(),
            batch_size: 16,
            max_input_tokens: 1024,
            max_memory: None,
        }
    }
}

fn invalid(msg: impl Into<String>) -> T5Error {
    T5Error::Input(msg.into())
}

impl GenerationConfig {
    /// Defaults, then the model's `generation_config.json`; user options are applied on the
    /// result (set fields directly, then call [`GenerationConfig::validate`]).
    pub fn from_model(defaults: &GenerationDefaults) -> Self {
        let d = defaults;
        let c = GenerationConfig::default();
        GenerationConfig {
            max_new_tokens: d.max_new_tokens.unwrap_or(c.max_new_tokens),
            min_new_tokens: d.min_new_tokens.unwrap_or(c.min_new_tokens),
            min_length: d.min_length.unwrap_or(c.min_length),
            num_beams: d.num_beams.unwrap_or(c.num_beams),
            num_return_sequences: d.num_return_sequences.unwrap_or(c.num_return_sequences),
            length_penalty: d.length_penalty.unwrap_or(c.length_penalty),
            early_stopping: d.early_stopping.unwrap_or(c.early_stopping),
            do_sample: d.do_sample.unwrap_or(c.do_sample),
            temperature: d.temperature.unwrap_or(c.temperature),
            top_k: d.top_k.unwrap_or(c.top_k),
            top_p: d.top_p.unwrap_or(c.top_p),
            repetition_penalty: d.repetition_penalty.unwrap_or(c.repetition_penalty),
            no_repeat_ngram_size: d.no_repeat_ngram_size.unwrap_or(c.no_repeat_ngram_size),
            bad_words_ids: d.bad_words_ids.clone().unwrap_or(c.bad_words_ids.clone()),
            forced_bos_token_id: d.forced_bos_token_id.or(c.forced_bos_token_id),
            forced_eos_token_id: d.forced_eos_token_id.or(c.forced_eos_token_id),
            ..c
        }
    }

    /// New tokens allowed: `max_new_tokens`, or fewer when `max_length` says so.
    pub fn new_token_limit(&self) -> usize {
        match self.max_length {
            Some(len) => self.max_new_tokens.min(len.saturating_sub(1)),
            None => self.max_new_tokens,
        }
    }

    /// Refuses unknown combinations and out-of-range values with a message naming the option.
    pub fn validate(&self, model: &T5Config) -> Result<()> {
        if self.new_token_limit() == 0 {
            return Err(invalid(
                "max_new_tokens (and max_length - 1) must be at least 1",
            ));
        }
        let at_most = |what: &str, value: usize, limit: usize| {
            if value > limit {
                Err(invalid(format!(
                    "{what} is {value}, more than the limit of {limit}"
                )))
            } else {
                Ok(())
            }
        };
        at_most(
            "max_new_tokens",
            self.new_token_limit(),
            Limits::MAX_NEW_TOKENS,
        )?;
        at_most(
            "max_input_tokens",
            self.max_input_tokens,
            Limits::MAX_INPUT_TOKENS,
        )?;
        at_most("num_beams", self.num_beams, Limits::MAX_BEAMS)?;
        if self.num_beams > model.vocab_size {
            return Err(invalid(format!(
                "num_beams ({}) is larger than the vocabulary ({} tokens)",
                self.num_beams, model.vocab_size
            )));
        }
        at_most(
            "num_return_sequences",
            self.num_return_sequences,
            Limits::MAX_RETURN_SEQUENCES,
        )?;
        at_most(
            "no_repeat_ngram_size",
            self.no_repeat_ngram_size,
            Limits::MAX_NGRAM,
        )?;
        at_most(
            "the number of stop strings",
            self.stop_strings.len(),
            Limits::MAX_STOP_STRINGS,
        )?;
        if let Some(s) = self
            .stop_strings
            .iter()
            .find(|s| s.len() > Limits::MAX_STOP_STRING_BYTES)
        {
            return Err(invalid(format!(
                "a stop string of {} bytes is longer than the limit of {} bytes",
                s.len(),
                Limits::MAX_STOP_STRING_BYTES
            )));
        }
        at_most(
            "the number of bad_words_ids sequences",
            self.bad_words_ids.len(),
            Limits::MAX_BAD_WORDS,
        )?;
        if let Some(seq) = self
            .bad_words_ids
            .iter()
            .find(|s| s.len() > Limits::MAX_BAD_WORD_IDS)
        {
            return Err(invalid(format!(
                "a bad_words_ids sequence of {} ids is longer than the limit of {}",
                seq.len(),
                Limits::MAX_BAD_WORD_IDS
            )));
        }
        if self.max_memory == Some(0) {
            return Err(invalid("max_memory must be more than 0 bytes"));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(invalid(format!(
                "min_new_tokens ({}) is larger than max_new_tokens ({})",
                self.min_new_tokens, self.max_new_tokens
            )));
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size must be at least 1"));
        }
        if self.num_beams == 0 {
            return Err(invalid("num_beams must be at least 1"));
        }
        if self.num_return_sequences == 0 {
            return Err(invalid("num_return_sequences must be at least 1"));
        }
        if !self.do_sample && self.num_return_sequences > self.num_beams {
            return Err(invalid(format!(
                "num_return_sequences ({}) > num_beams ({}) needs sampling (do_sample); \
                 greedy and beam search return at most num_beams sequences",
                self.num_return_sequences, self.num_beams
            )));
        }
        if self.do_sample && self.num_beams > 1 {
            return Err(invalid(
                "beam sampling (do_sample with num_beams > 1) is not supported yet",
            ));
        }
        if self.num_beams > 1 && !self.stop_strings.is_empty() {
            return Err(invalid(
                "stop strings are supported with greedy search and sampling, not with beams yet",
            ));
        }
        if !(self.length_penalty.is_finite()) {
            return Err(invalid("length_penalty must be a finite number"));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(invalid(format!(
                "temperature must be > 0, found {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid(format!(
                "top_p must be in (0, 1], found {}",
                self.top_p
            )));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(invalid(format!(
                "repetition_penalty must be > 0, found {}",
                self.repetition_penalty
            )));
        }
        let vocab = model.vocab_size;
        let in_vocab = |what: &str, id: u32| {
            if id as usize >= vocab {
                Err(invalid(format!(
                    "{what}: token id {id} is outside the vocabulary of {vocab}"
                )))
            } else {
                Ok(())
            }
        };
        for seq in &self.bad_words_ids {
            if seq.is_empty() {
                return Err(invalid("bad_words_ids: an empty sequence"));
            }
            for &id in seq {
                in_vocab("bad_words_ids", id)?;
            }
        }
        if let Some(id) = self.forced_bos_token_id {
            in_vocab("forced_bos_token_id", id)?;
        }
        if let Some(id) = self.forced_eos_token_id {
            in_vocab("forced_eos_token_id", id)?;
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(invalid("stop strings must not be empty"));
        }
        Ok(())
    }
}
