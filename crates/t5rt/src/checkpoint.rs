//! A model directory as published on the Hugging Face Hub: `config.json`, weights,
//! optionally `tokenizer.json` and `generation_config.json`.

use std::path::Path;

use crate::backend::Backend;
use crate::config::{GenerationDefaults, T5Config};
use crate::error::{Result, T5Error};
use crate::model::T5Model;
use crate::tokenizer::T5Tokenizer;
use crate::weights::TensorStore;

/// Everything read from a checkpoint before its weights go to a device.
pub struct Checkpoint {
    pub config: T5Config,
    pub store: TensorStore,
    pub tokenizer: Option<T5Tokenizer>,
    pub generation: GenerationDefaults,
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| T5Error::io(path, e))
}

/// The checkpoint's tokenizer, in order of preference: `tokenizer.json`; ByT5's bytes when
/// `tokenizer_config.json` or `config.json` names `ByT5Tokenizer`; `spiece.model` converted as
/// Hugging Face converts it; none (token ids only).
fn find_tokenizer(dir: &Path, config: &T5Config) -> Result<Option<T5Tokenizer>> {
    let json_path = dir.join("tokenizer.json");
    if json_path.is_file() {
        return T5Tokenizer::from_file(&json_path).map(Some);
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let tok_cfg: serde_json::Value = if cfg_path.is_file() {
        serde_json::from_str(&read_text(&cfg_path)?).map_err(|e| T5Error::Json {
            path: cfg_path.clone(),
            message: e.to_string(),
        })?
    } else {
        serde_json::Value::Null
    };
    let class = tok_cfg
        .get("tokenizer_class")
        .and_then(|c| c.as_str())
        .or(config.tokenizer_class.as_deref());
    if class == Some("ByT5Tokenizer") {
        let extra = tok_cfg
            .get("extra_ids")
            .and_then(|v| v.as_u64())
            .unwrap_or(125);
        let extra = u32::try_from(extra).map_err(|_| {
            T5Error::config(
                "extra_ids",
                format!("{extra} in tokenizer_config.json is too large"),
            )
        })?;
        return Ok(Some(T5Tokenizer::byt5(extra)));
    }
    let spm_path = dir.join("spiece.model");
    if spm_path.is_file() {
        let options = crate::tokenizer::spiece::T5Options::from_config(&tok_cfg);
        return T5Tokenizer::from_spiece(&spm_path, &options).map(Some);
    }
    Ok(None)
}

impl Checkpoint {
    /// Opens a checkpoint directory (no conversion needed).
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, true)
    }

    /// [`Checkpoint::open`] without reading the tokenizer (`tokenizer` is None): for work on
    /// token ids alone, such as `t5rt bench`, which then does not pay for parsing
    /// `tokenizer.json` (about 18 ms for T5's).
    pub fn open_without_tokenizer(dir: &Path) -> Result<Self> {
        Self::open_with(dir, false)
    }

    fn open_with(dir: &Path, with_tokenizer: bool) -> Result<Self> {
        if !dir.is_dir() {
            return Err(T5Error::MissingFile {
                path: dir.to_path_buf(),
                hint: "expected a model directory holding config.json and model.safetensors".into(),
            });
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(T5Error::MissingFile {
                path: config_path,
                hint: "every checkpoint directory needs its config.json".into(),
            });
        }
        let config = T5Config::from_json_str(&read_text(&config_path)?).map_err(|e| match e {
            T5Error::Json { message, .. } => T5Error::Json {
                path: config_path.clone(),
                message,
            },
            other => other,
        })?;
        let gen_path = dir.join("generation_config.json");
        let generation = if gen_path.is_file() {
            GenerationDefaults::from_json_str(&read_text(&gen_path)?, &config)?
        } else {
            GenerationDefaults::default()
        };
        let tokenizer = if with_tokenizer {
            find_tokenizer(dir, &config)?
        } else {
            None
        };
        let store = TensorStore::open_dir(dir)?;
        Self::checked(config, store, tokenizer, generation)
    }

    /// A checkpoint whose files are compiled into the program (the bundled default model).
    pub fn from_static(
        name: &str,
        config_json: &str,
        weights: &'static [u8],
        tokenizer_json: Option<&[u8]>,
        generation_json: Option<&str>,
    ) -> Result<Self> {
        let config = T5Config::from_json_str(config_json)?;
        let generation = match generation_json {
            Some(text) => GenerationDefaults::from_json_str(text, &config)?,
            None => GenerationDefaults::default(),
        };
        let tokenizer = tokenizer_json.map(T5Tokenizer::from_bytes).transpose()?;
        let store = TensorStore::from_static(weights, name)?;
        Self::checked(config, store, tokenizer, generation)
    }

    fn checked(
        config: T5Config,
        store: TensorStore,
        tokenizer: Option<T5Tokenizer>,
        generation: GenerationDefaults,
    ) -> Result<Self> {
        if let Some(tok) = &tokenizer {
            if tok.vocab_size() > config.vocab_size {
                return Err(T5Error::config(
                    "vocab_size",
                    format!(
                        "{} is smaller than the tokenizer's {} tokens; the tokenizer belongs to another model",
                        config.vocab_size,
                        tok.vocab_size()
                    ),
                ));
            }
        }
        Ok(Checkpoint {
            config,
            store,
            tokenizer,
            generation,
        })
    }

    /// Moves the weights onto `backend`. The checkpoint files are not needed afterwards.
    pub fn load_model<B: Backend>(&self, backend: B) -> Result<T5Model<B>> {
        T5Model::load(self.config.clone(), &self.store, backend)
    }
}
