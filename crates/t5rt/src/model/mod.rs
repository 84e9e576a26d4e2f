//! The T5 model, written once against [`Backend`]: `encode` and `decode_step`.

mod decoder;
mod encoder;
mod ffn;
mod keep;
pub mod params;
pub mod relpos;
pub mod state;

use crate::backend::{Backend, WeightDtype};
use crate::config::T5Config;
use crate::error::Result;
use crate::weights::TensorStore;

pub use decoder::INITIAL_CACHE_POSITIONS;
pub use params::T5Params;
pub use state::{DecoderState, EncoderOutput};

/// A loaded model: config, backend and immutable weights. Share it behind an `Arc`;
/// per-request data lives in [`EncoderOutput`] and [`DecoderState`].
pub struct T5Model<B: Backend> {
    pub config: T5Config,
    pub backend: B,
    pub(crate) params: T5Params<B::Tensor, B::Weight>,
}

impl<B: Backend> T5Model<B> {
    /// `out[i, :]` = the embedding of `ids[i]`.
    pub(crate) fn embed(&self, ids: &[u32], out: &mut B::Tensor) -> Result<()> {
        let d = self.config.d_model;
        match &self.params.shared {
            Some(params::Table::Device(table)) => self.backend.embed(ids, table, out, d),
            Some(params::Table::Stored(table)) => {
                self.backend.embed_host(ids, table.as_slice(), out, d)
            }
            None => self.backend.embed_linear(ids, &self.params.lm_head, out, d),
        }
    }

    /// Whether greedy decoding screens the LM head with a cheaper copy of it
    /// ([`Backend::screened_argmax`]: the same tokens, most logits never computed by the head
    /// itself). On by default where the backend can (the CPU, with f32 heads, and bf16 heads
    /// at kernel levels whose bf16 products are widened);
    /// `T5RT_SCREEN_HEAD=0` at load, or [`T5Model::drop_head_screen`], turns it off.
    pub fn screens_head(&self) -> bool {
        self.params.screen.is_some()
    }

    /// The precision of the LM head's screen ([`T5Model::screens_head`]): int8 on the CPU for
    /// f32 heads, and for bf16 heads at kernel levels whose bf16 products are widened
    /// (`avx512-vnni`, `avx512bw`, `avx2`); `T5RT_SCREEN_HEAD=bf16`: bf16 for f32 heads and none
    /// for bf16 heads; `=int8`: bf16 heads at every level. `None` without one.
    pub fn head_screen_dtype(&self) -> Option<WeightDtype> {
        self.params.screen.as_ref().map(|s| s.kind)
    }

    /// Drops the copy of the LM head that greedy decoding screens with, and its memory (int8:
    /// a quarter of an f32 head's bytes, half a bf16 head's): every logit is then computed by
    /// the head, with the same choices.
    pub fn drop_head_screen(&mut self) {
        self.params.screen = None;
    }

    /// Reads every weight the config names from `store` onto `backend`, in the backend's
    /// execution context ([`Backend::run`]: the CPU's thread pool), where large conversions
    /// spread over its threads.
    pub fn load(config: T5Config, store: &TensorStore, backend: B) -> Result<Self> {
        let params = backend.run(|| T5Params::load(store, &backend, &config))?;
        Ok(T5Model {
            config,
            backend,
            params,
        })
    }
}
