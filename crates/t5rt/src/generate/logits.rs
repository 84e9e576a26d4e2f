//! Logits processors and sampling warpers, one row at a time, in Hugging Face's order:
//! repetition penalty, no-repeat n-gram, bad words, min_length, min_new_tokens, forced BOS,
//! forced EOS; then, when sampling, temperature, top-k, top-p.
//!
//! `seq` is always what HF calls `input_ids` of the decoder: the start token followed by the
//! tokens generated so far.

use super::config::GenerationConfig;
pub(crate) use crate::math::{argmax, softmax_in_place};

/// The processors of one generation request.
pub(crate) struct Processors<'a> {
    cfg: &'a GenerationConfig,
    eos: u32,
    /// HF's `max_length`: the start token plus the new-token limit.
    max_length: usize,
    /// `bad_words_ids` without the lone `[eos]` (HF drops it).
    bad_words: Vec<&'a [u32]>,
}

impl<'a> Processors<'a> {
    pub fn new(cfg: &'a GenerationConfig, eos: u32) -> Self {
        Processors {
            cfg,
            eos,
            max_length: 1 + cfg.new_token_limit(),
            bad_words: cfg
                .bad_words_ids
                .iter()
                .filter(|w| w.as_slice() != [eos])
                .map(Vec::as_slice)
                .collect(),
        }
    }

    /// Whether any processor besides min_new_tokens is on (greedy then works on the host).
    pub fn needs_host(&self) -> bool {
        let c = self.cfg;
        c.repetition_penalty != 1.0
            || c.no_repeat_ngram_size > 0
            || !self.bad_words.is_empty()
            || c.min_length > 1
            || c.forced_bos_token_id.is_some()
            || c.forced_eos_token_id.is_some()
    }

    /// Applies every processor to one row of scores (logits, or log-probs in beam search).
    pub fn apply(&self, seq: &[u32], scores: &mut [f32]) {
        let c = self.cfg;
        if c.repetition_penalty != 1.0 {
            repetition_penalty(seq, scores, c.repetition_penalty);
        }
        if c.no_repeat_ngram_size > 0 {
            for t in banned_ngram_tokens(seq, c.no_repeat_ngram_size) {
                scores[t as usize] = f32::NEG_INFINITY;
            }
        }
        for bad in &self.bad_words {
            let (last, prefix) = bad.split_last().expect("validated non-empty");
            if seq.ends_with(prefix) {
                scores[*last as usize] = f32::NEG_INFINITY;
            }
        }
        if seq.len() < c.min_length {
            scores[self.eos as usize] = f32::NEG_INFINITY;
        }
        if seq.len() - 1 < c.min_new_tokens {
            scores[self.eos as usize] = f32::NEG_INFINITY;
        }
        if let Some(bos) = c.forced_bos_token_id {
            if seq.len() == 1 {
                force(scores, bos);
            }
        }
        if let Some(eos) = c.forced_eos_token_id {
            if seq.len() == self.max_length - 1 {
                force(scores, eos);
            }
        }
    }
}

/// Every token -inf but `id`, which gets 0.
fn force(scores: &mut [f32], id: u32) {
    scores.fill(f32::NEG_INFINITY);
    scores[id as usize] = 0.0;
}

/// CTRL's penalty, once per distinct token in `seq`: negative scores times `p`, others over `p`.
fn repetition_penalty(seq: &[u32], scores: &mut [f32], p: f32) {
    let mut seen = std::collections::HashSet::with_capacity(seq.len());
    for &t in seq {
        if seen.insert(t) {
            let s = &mut scores[t as usize];
            *s = if *s < 0.0 { *s * p } else { *s / p };
        }
    }
}

/// Tokens that would complete an n-gram already present in `seq`.
pub(crate) fn banned_ngram_tokens(seq: &[u32], n: usize) -> Vec<u32> {
    let cur = seq.len();
    if cur + 1 < n {
        return Vec::new();
    }
    let prefix = &seq[cur + 1 - n..];
    seq.windows(n)
        .filter(|w| &w[..n - 1] == prefix)
        .map(|w| w[n - 1])
        .collect()
}

/// Sampling warpers on one row of logits: temperature, top-k, top-p (as HF's warpers).
pub(crate) fn warp(cfg: &GenerationConfig, scores: &mut [f32]) {
    if cfg.temperature != 1.0 {
        scores.iter_mut().for_each(|s| *s /= cfg.temperature);
    }
    if cfg.top_k > 0 && cfg.top_k < scores.len() {
        // Remove every token scoring below the k-th best (ties with it stay).
        let mut sorted = scores.to_vec();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let kth = sorted[cfg.top_k - 1];
        scores
            .iter_mut()
            .filter(|s| **s < kth)
            .for_each(|s| *s = f32::NEG_INFINITY);
    }
    if cfg.top_p < 1.0 {
        // Ascending order; drop the low tail whose total probability is <= 1 - top_p,
        // always keeping the most likely token.
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let mut probs: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
        softmax_in_place(&mut probs);
        let mut cumulative = 0.0f32;
        let last = order.len() - 1;
        for (rank, (&i, p)) in order.iter().zip(&probs).enumerate() {
            cumulative += p;
            if cumulative <= 1.0 - cfg.top_p && rank != last {
                scores[i] = f32::NEG_INFINITY;
            }
        }
    }
}

/// Log-softmax in place (f32), as beam search scores tokens.
pub(crate) fn log_softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = x.iter().map(|v| (v - max).exp()).sum();
    let log_sum = sum.ln();
    x.iter_mut().for_each(|v| *v = *v - max - log_sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GenerationConfig {
        GenerationConfig::default()
    }

    #[test]
    fn repetition_penalty_hits_each_seen_token_once() {
        let mut s = vec![2.0, -2.0, 1.0, 4.0];
        repetition_penalty(&[0, 1, 1, 3], &mut s, 2.0);
        assert_eq!(s, vec![1.0, -4.0, 1.0, 2.0]);
    }

    #[test]
    fn ngrams_already_seen_are_banned() {
        // 2-grams of [0, 5, 6, 5]: (0,5) (5,6) (6,5); the sequence ends in 5, so 6 is banned.
        assert_eq!(banned_ngram_tokens(&[0, 5, 6, 5], 2), vec![6]);
        assert_eq!(banned_ngram_tokens(&[0, 5, 6, 5], 3), Vec::<u32>::new());
        assert_eq!(banned_ngram_tokens(&[0, 5, 6, 0, 5], 3), vec![6]);
        assert!(banned_ngram_tokens(&[0], 3).is_empty());
    }

    #[test]
    fn processors_in_order() {
        let c = GenerationConfig {
            min_new_tokens: 2,
            bad_words_ids: vec![vec![3], vec![1], vec![5, 4]],
            ..cfg()
        };
        let p = Processors::new(&c, 1);
        let mut s = vec![0.0; 6];
        p.apply(&[0, 5], &mut s);
        // eos banned by min_new_tokens (1 token so far), 3 always, 4 after 5; `[eos]` is dropped.
        assert_eq!(s[1], f32::NEG_INFINITY);
        assert_eq!(s[3], f32::NEG_INFINITY);
        assert_eq!(s[4], f32::NEG_INFINITY);
        let mut s = vec![0.0; 6];
        p.apply(&[0, 5, 2], &mut s);
        assert_eq!(s[1], 0.0, "min_new_tokens reached");
        assert_eq!(s[4], 0.0, "4 only follows 5");
    }

    #[test]
    fn forced_tokens() {
        let c = GenerationConfig {
            forced_bos_token_id: Some(2),
            forced_eos_token_id: Some(1),
            max_new_tokens: 3,
            ..cfg()
        };
        let p = Processors::new(&c, 1);
        let mut s = vec![0.5; 4];
        p.apply(&[0], &mut s);
        assert_eq!(argmax(&s), 2);
        assert_eq!(s[0], f32::NEG_INFINITY);
        let mut s = vec![0.5; 4];
        p.apply(&[0, 2, 3], &mut s); // max_length 4: the last step forces eos
        assert_eq!(
            s,
            vec![f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]
        );
    }

    #[test]
    fn top_k_and_top_p_keep_the_right_sets() {
        let c = GenerationConfig { top_k: 2, ..cfg() };
        let mut s = vec![1.0, 3.0, 2.0, 0.0];
        warp(&c, &mut s);
        assert_eq!(s, vec![f32::NEG_INFINITY, 3.0, 2.0, f32::NEG_INFINITY]);
        // probabilities 0.5, 0.25, 0.125, 0.125: top_p 0.7 keeps the two best.
        let c = GenerationConfig {
            top_k: 0,
            top_p: 0.7,
            ..cfg()
        };
        let l = |p: f32| p.ln();
        let mut s = vec![l(0.125), l(0.5), l(0.125), l(0.25)];
        warp(&c, &mut s);
        assert!(s[1].is_finite() && s[3].is_finite());
        assert!(s[0] == f32::NEG_INFINITY && s[2] == f32::NEG_INFINITY);
    }
}
