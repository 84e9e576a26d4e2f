//! Sampling: warped logits -> softmax -> one draw. Each sequence has its own random stream,
//! derived from the seed and the sequence's index in the request, so samples do not depend on
//! batching and the same seed gives the same output.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::GenerationConfig;
use super::logits::{softmax_in_place, warp};

pub(crate) struct Sampler {
    rng: ChaCha8Rng,
}

impl Sampler {
    /// The sampler of sequence `stream` of a request seeded with `seed`.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Sampler { rng }
    }

    /// Draws a token from processed `logits` (warped in place).
    pub fn sample(&mut self, cfg: &GenerationConfig, logits: &mut [f32]) -> u32 {
        warp(cfg, logits);
        softmax_in_place(logits);
        let u: f32 = self.rng.random();
        let mut cumulative = 0.0f32;
        let mut last_allowed = 0;
        for (i, &p) in logits.iter().enumerate() {
            if p > 0.0 {
                cumulative += p;
                last_allowed = i;
                if u < cumulative {
                    return i as u32;
                }
            }
        }
        last_allowed as u32 // rounding left u above the total: the last allowed token
    }
}
