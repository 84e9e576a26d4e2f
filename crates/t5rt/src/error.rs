//! The one error type of the library. Every message says what went wrong and what to do.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = T5Error> = std::result::Result<T, E>;

/// Everything that can go wrong in t5rt. Bad input is an error value, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum T5Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file the checkpoint needs is not there.
    #[error("{path} not found: {hint}")]
    MissingFile { path: PathBuf, hint: String },

    /// `config.json` (or `generation_config.json`) is malformed or asks for something
    /// the engine cannot run.
    #[error("config: field `{field}`: {message}")]
    Config { field: String, message: String },

    /// A JSON file could not be parsed.
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },

    /// A safetensors file is truncated or corrupt.
    #[error("{path}: not a valid safetensors file ({message}); the file is truncated or corrupt, download it again")]
    Safetensors { path: PathBuf, message: String },

    /// A `pytorch_model.bin` that cannot be read (corrupt, legacy format, or a pickle that
    /// asks for anything but tensors).
    #[error("{path}: cannot read this PyTorch checkpoint: {message}")]
    TorchCheckpoint { path: PathBuf, message: String },

    /// A tensor the model needs is absent from the checkpoint.
    #[error("tensor `{name}` is missing from {source_name}; is this a T5-family checkpoint (T5ForConditionalGeneration)?")]
    MissingTensor { name: String, source_name: String },

    /// A tensor has a shape that does not fit the config.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?} from config.json")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A tensor is stored in a dtype the loader does not read.
    #[error("tensor `{name}` is stored as {dtype}; t5rt reads F32, F16 and BF16 checkpoints")]
    UnsupportedDtype { name: String, dtype: String },

    /// Text was given but the model has no tokenizer.json.
    #[error("this model has no tokenizer.json, so text input cannot be encoded; give token ids (JSONL `{{\"input_ids\": [...]}}`) or add tokenizer.json to the model directory")]
    NoTokenizer,

    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A request that cannot be served as given (empty, too long, bad ids, bad options).
    #[error("invalid input: {0}")]
    Input(String),

    /// A device or kernel failure.
    #[error("backend: {0}")]
    Backend(String),

    /// The caller cancelled the work (`generate_cancellable`).
    #[error("cancelled")]
    Cancelled,
}

impl T5Error {
    pub(crate) fn config(field: &str, message: impl Into<String>) -> Self {
        T5Error::Config {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        T5Error::Io {
            path: path.into(),
            source,
        }
    }
}
