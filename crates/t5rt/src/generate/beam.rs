//! Beam search with Hugging Face `generate()` semantics (transformers 4.57's vectorised beam
//! search): log-softmax, processors on log-probs, the best `2 * num_beams` continuations per
//! source, length-normalised finished hypotheses, and HF's `early_stopping` rules. Scores are
//! computed in f32 exactly where HF computes them in f32, including its -1e9 penalties.
//!
//! Beams of a source share its cross-attention keys/values; reordering beams moves only the
//! self-attention caches (`DecoderState::select`).

use crate::backend::Backend;
use crate::error::Result;
use crate::model::T5Model;

use super::config::{EarlyStopping, GenerationConfig};
use super::logits::{log_softmax_in_place, Processors};
use super::Hypothesis;

/// HF's stand-in for "minus infinity" in beam scores.
const NEG: f32 = -1.0e9;

/// A finished-hypothesis slot: the sequence (start token first) and its normalised score.
#[derive(Clone)]
struct Slot {
    seq: Vec<u32>,
    score: f32,
    finished: bool,
}

/// Beam-search state of one source.
struct Source {
    /// Running beams: sequences (start token first) and accumulated log-probs.
    running: Vec<(Vec<u32>, f32)>,
    /// `num_beams` best finished hypotheses, best first.
    slots: Vec<Slot>,
    /// HF's `is_early_stop_heuristic_unsatisfied`.
    improvable: bool,
}

/// Indices of the `k` largest `scores`, largest first (ties: lower index first).
fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let by_score = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, by_score);
        idx.truncate(k);
    }
    idx.sort_by(by_score);
    idx
}

/// `x / (len ** length_penalty)`, with the divisor computed in f64 and the division in f32,
/// as `tensor_f32 / python_float` is in PyTorch.
fn normalise(x: f32, len: usize, length_penalty: f64) -> f32 {
    x / ((len as f64).powf(length_penalty) as f32)
}

/// Beam search for one batch of sources. Returns, per source, the best
/// `num_return_sequences` hypotheses (generated ids after the start token) with their scores,
/// and the seconds spent in the encoder.
pub(crate) fn beam_search<B: Backend>(
    model: &T5Model<B>,
    inputs: &[Vec<u32>],
    cfg: &GenerationConfig,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<(Vec<Vec<Hypothesis>>, f64)> {
    let mc = &model.config;
    let backend = &model.backend;
    let (vocab, eos, start) = (mc.vocab_size, mc.eos_token_id, mc.decoder_start_token_id);
    let k = cfg.num_beams;
    let keep = 2 * k; // HF: max(2, 1 + number of EOS ids) * num_beams, with one EOS id
    let limit = cfg.new_token_limit();
    let max_length = 1 + limit; // HF's max_length: the start token counts
    let lp = cfg.length_penalty;
    let procs = Processors::new(cfg, eos);

    let started = std::time::Instant::now();
    let enc = model.encode(inputs)?;
    model.backend.synchronize()?; // the encoder's own time, on a GPU too
    let encode_secs = started.elapsed().as_secs_f64();
    let mut state = model.start_grouped_decoding(&enc, limit, k)?;
    drop(enc);
    let mut sources: Vec<Source> = (0..inputs.len())
        .map(|_| Source {
            // Only the first beam is live at first; the others start at -1e9.
            running: (0..k)
                .map(|j| (vec![start], if j == 0 { 0.0 } else { NEG }))
                .collect(),
            slots: vec![
                Slot {
                    seq: Vec::new(),
                    score: NEG,
                    finished: false
                };
                k
            ],
            improvable: true,
        })
        .collect();
    let mut cur_len = 1; // tokens in each running sequence, start token included
    loop {
        super::check_cancel(cancel)?;
        let tokens: Vec<u32> = sources
            .iter()
            .flat_map(|s| s.running.iter().map(|(seq, _)| *seq.last().unwrap()))
            .collect();
        let logits = model.decode_step(&tokens, &mut state)?;
        let mut scores = backend.download(logits, tokens.len() * vocab)?;
        let mut all_hit = true;
        let mut reorder = Vec::with_capacity(tokens.len());
        for (b, src) in sources.iter_mut().enumerate() {
            // accumulated[j * vocab + t] = log p(t | beam j) (processed) + score of beam j
            let acc = &mut scores[b * k * vocab..(b + 1) * k * vocab];
            for (j, row) in acc.chunks_exact_mut(vocab).enumerate() {
                log_softmax_in_place(row);
                procs.apply(&src.running[j].0, row);
                let beam_score = src.running[j].1;
                row.iter_mut().for_each(|v| *v += beam_score);
            }
            let top = top_k(acc, keep);
            let cand: Vec<(usize, u32, f32, bool)> = top
                .iter()
                .map(|&i| {
                    let (beam, token) = (i / vocab, (i % vocab) as u32);
                    let hit = token == eos || cur_len + 1 >= max_length;
                    (beam, token, acc[i], hit)
                })
                .collect();
            all_hit &= cand.iter().all(|c| c.3);

            // Finished hypotheses: only the first num_beams candidates may enter.
            let full =
                src.slots.iter().all(|x| x.finished) && cfg.early_stopping == EarlyStopping::True;
            let mut merged: Vec<Slot> = src.slots.clone();
            for (rank, &(beam, token, score, hit)) in cand.iter().enumerate() {
                let just_finished = hit && rank < k;
                let mut s = normalise(score, cur_len + 1 - 1, lp);
                s += if full { NEG } else { -0.0 };
                s += if src.improvable { -0.0 } else { NEG };
                s += if just_finished { -0.0 } else { NEG };
                let mut seq = src.running[beam].0.clone();
                seq.push(token);
                merged.push(Slot {
                    seq,
                    score: s,
                    finished: just_finished,
                });
            }
            let merged_scores: Vec<f32> = merged.iter().map(|x| x.score).collect();
            src.slots = top_k(&merged_scores, k)
                .into_iter()
                .map(|i| merged[i].clone())
                .collect();

            // Running beams: the best continuations that did not finish.
            let running_scores: Vec<f32> = cand
                .iter()
                .map(|c| c.2 + if c.3 { NEG } else { 0.0 })
                .collect();
            let next = top_k(&running_scores, k);
            src.running = next
                .iter()
                .map(|&c| {
                    let (beam, token, _, _) = cand[c];
                    let mut seq = src.running[beam].0.clone();
                    seq.push(token);
                    reorder.push(b * k + beam);
                    (seq, running_scores[c])
                })
                .collect();
        }
        cur_len += 1;
        // Early-stop heuristic: can the best running beam still beat the worst finished one?
        for src in sources.iter_mut() {
            let best_len = if cfg.early_stopping == EarlyStopping::Never && lp > 0.0 {
                max_length - 1
            } else {
                cur_len - 1
            };
            let best_possible = normalise(src.running[0].1, best_len, lp);
            let worst = src
                .slots
                .iter()
                .map(|x| x.score)
                .fold(f32::INFINITY, f32::min);
            let beats = src
                .slots
                .iter()
                .any(|x| best_possible > if x.finished { worst } else { NEG });
            src.improvable &= beats;
        }
        let improvement_possible = sources.iter().any(|s| s.improvable);
        let all_slots_finished = sources.iter().all(|s| s.slots.iter().all(|x| x.finished));
        let open = !(all_slots_finished && cfg.early_stopping == EarlyStopping::True);
        if !(improvement_possible && open && !all_hit) {
            break;
        }
        state.select(backend, &reorder)?;
    }
    let hyps = sources
        .into_iter()
        .map(|src| {
            src.slots
                .into_iter()
                .take(cfg.num_return_sequences)
                .map(|slot| Hypothesis {
                    ids: slot.seq.get(1..).map(<[u32]>::to_vec).unwrap_or_default(),
                    score: Some(slot.score),
                })
                .collect()
        })
        .collect();
    Ok((hyps, encode_secs))
}
