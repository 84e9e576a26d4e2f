//! t5rt: fast inference for T5-family encoder-decoder models (t5, FLAN-T5 / T5 v1.1, mT5).
//!
//! ```no_run
//! use t5rt::{Checkpoint, CpuBackend, GenerationConfig};
//! let ckpt = Checkpoint::open("path/to/flan-t5-small".as_ref())?;
//! let model = ckpt.load_model(CpuBackend::new(0)?)?;
//! let tok = ckpt.tokenizer.as_ref().expect("tokenizer.json");
//! let ids = tok.encode("translate English to German: Hello")?;
//! let out = t5rt::generate(&model, &[ids], &GenerationConfig::default(), Some(tok), |_| {})?;
//! println!("{}", tok.decode(&out[0][0].ids)?);
//! # Ok::<(), t5rt::T5Error>(())
//! ```
//!
//! Reduced precision: `CpuBackend::new(0)?.with_dtype(t5rt::WeightDtype::Int8)` (or `Bf16`)
//! stores the linear layers' weights in that precision (see the README's Precision section).

mod alloc;
pub mod backend;
#[cfg(feature = "bundled")]
pub mod bundled;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod device;
pub mod engine;
pub mod error;
pub mod generate;
mod hugepage;
mod math;
pub mod model;
pub mod tokenizer;
pub mod weights;

pub use backend::cpu::{CpuBackend, IsaLevel};
pub use backend::{Backend, WeightDtype};
pub use checkpoint::Checkpoint;
pub use config::{Activation, GenerationDefaults, T5Config};
pub use error::{Result, T5Error};
pub use generate::{
    generate, generate_cancellable, generate_with_stats, score, score_cancellable, EarlyStopping,
    GenerationConfig, GenerationStats, Hypothesis, Limits, TargetScore,
};
pub use model::{DecoderState, EncoderOutput, T5Model};
pub use tokenizer::{Input, T5Tokenizer};
pub use weights::{HostTensor, TensorStore};
