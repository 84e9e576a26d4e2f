//! Memory planning: the bytes one padded batch needs at its largest (caches at full length,
//! activations, logits, sequences, outputs), computed from the config and the request before
//! any work starts and checked against a budget: the memory available to the process now
//! (cgroup limits included), or [`GenerationConfig::max_memory`]. A batch that does not fit
//! is split into smaller ones; a single input that does not fit is refused with the estimate,
//! the budget and the parameter to lower.

use crate::backend::{Backend, WeightDtype};
use crate::config::T5Config;
use crate::error::{Result, T5Error};
use crate::model::T5Model;

use super::config::GenerationConfig;

/// The shape of one padded batch, as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    /// Source sequences encoded together.
    pub sources: usize,
    /// Decoded rows per source (beams; 1 for greedy search and sampling).
    pub rows_per_source: usize,
    /// Longest source, in tokens.
    pub src_len: usize,
    /// New tokens per row at most.
    pub new_tokens: usize,
    /// Bytes the encoder's attention holds at once (the position bias and the scores in
    /// flight) as the backend counts them (`Backend::encoder_attention_bytes` for `src_len`);
    /// `None`: a `[heads, L, L]` bias and a `[L, L]` matrix of scores per head.
    pub encoder_attention: Option<u64>,
}

impl BatchShape {
    /// A batch on `model`: `sources` sequences of up to `src_len` tokens, `rows_per_source`
    /// rows each decoding up to `new_tokens`, its encoder attention counted by the model's
    /// backend (`Backend::encoder_attention_bytes`).
    pub fn on<B: Backend>(
        model: &T5Model<B>,
        sources: usize,
        rows_per_source: usize,
        src_len: usize,
        new_tokens: usize,
    ) -> Self {
        BatchShape {
            sources,
            rows_per_source,
            src_len,
            new_tokens,
            encoder_attention: model.backend.encoder_attention_bytes(
                model.config.num_heads,
                sources,
                src_len,
            ),
        }
    }
}

/// Bytes one batch needs at its largest, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryPlan {
    /// The encoder pass: activations of every layer's sublayers and the attention scores.
    pub encoder: u64,
    /// Decoding: self-attention caches at full length (and one copy while they grow or are
    /// reordered), cross-attention keys/values, the step's activations, the encoder output.
    pub decoder: u64,
    /// Search on the host: logits rows, candidate indices, the sequences of every row.
    pub search: u64,
    /// What is returned: the generated ids of every sequence.
    pub outputs: u64,
}

impl MemoryPlan {
    /// The peak: the encoder pass, or decoding with its search, whichever is larger, plus the
    /// outputs (which live through both).
    pub fn peak(&self) -> u64 {
        self.encoder
            .max(self.decoder.saturating_add(self.search))
            .saturating_add(self.outputs)
    }
}

/// `a * b * ...` in u64, saturating (a plan that overflows is simply too large).
fn prod(factors: &[usize]) -> u64 {
    factors
        .iter()
        .fold(1u64, |acc, &f| acc.saturating_mul(f as u64))
}

/// The plan for one batch of `shape` with weights of `dtype`.
pub fn plan(config: &T5Config, dtype: WeightDtype, shape: BatchShape) -> MemoryPlan {
    const F32: usize = 4;
    let c = config;
    let (d, inner, d_ff, vocab) = (c.d_model, c.inner_dim(), c.d_ff, c.vocab_size);
    let ff_bufs = if c.is_gated_act { 2 } else { 1 };
    let (l, sources) = (shape.src_len, shape.sources);
    let rows_e = sources.saturating_mul(l);
    let widest = d.max(inner).max(d_ff);

    // Encoder: x, normed [rows, d]; q, k, v, attn [rows, inner]; ff (and up) [rows, d_ff];
    // the attention's position bias and scores, as the backend counts them or else the
    // shared bias [heads, L, L] and per-task scores [L, L] (at most one task per head in
    // flight); reduced-precision activations [rows, widest]; ids and mask.
    let encoder = [
        prod(&[2, rows_e, d, F32]),
        prod(&[4, rows_e, inner, F32]),
        prod(&[ff_bufs, rows_e, d_ff, F32]),
        shape
            .encoder_attention
            .unwrap_or_else(|| prod(&[2, c.num_heads, l, l, F32])),
        prod(&[rows_e, widest, F32]),
        prod(&[2, rows_e, F32]),
    ]
    .iter()
    .fold(0u64, |a, &b| a.saturating_add(b));

    // Decoding.
    let rows = sources.saturating_mul(shape.rows_per_source);
    let cap = shape.new_tokens.max(1);
    let layers = c.num_decoder_layers;
    let kv_bytes = if dtype == WeightDtype::F32 { F32 } else { 2 };
    let self_cache = prod(&[rows, cap, inner, F32]); // one layer's keys (or values)
    let cross = prod(&[sources, l, inner]);
    let decoder = [
        // self-attention keys and values of every layer, and one more while they grow
        // (doubling) or are reordered (gather into a new buffer)
        self_cache.saturating_mul(2 * layers as u64 + 1),
        // cross-attention keys and values, and the f32 pair before bf16 compression
        cross.saturating_mul((2 * layers * kv_bytes + 2 * F32) as u64),
        prod(&[sources, l, F32]),
        // the encoder output, held while the cross-attention keys/values are projected
        prod(&[rows_e, d, F32]),
        // one step's activations: x, normed, q, k, v, attn, ff (x2), logits
        prod(&[rows, 2 * d + 4 * inner + 2 * d_ff + vocab, F32]),
        // per-task attention rows over the cache
        prod(&[rows, c.num_heads, cap, F32]),
    ]
    .iter()
    .fold(0u64, |a, &b| a.saturating_add(b));

    // Search: logits on the host [rows, vocab]; beam search ranks the `beams * vocab`
    // candidates of a source (usize indices) and holds every row's sequence several times
    // over (running beams, finished slots, candidates); greedy search one sequence per row.
    let beams = shape.rows_per_source;
    let seq_copies = if beams > 1 { 6 } else { 1 };
    let search = [
        prod(&[rows, vocab, F32]),
        if beams > 1 {
            prod(&[beams, vocab, 8])
        } else {
            0
        },
        prod(&[seq_copies, rows, cap.saturating_add(1), F32]),
        prod(&[rows, 64]), // per-row bookkeeping
    ]
    .iter()
    .fold(0u64, |a, &b| a.saturating_add(b));

    let outputs = prod(&[rows, cap, F32]).saturating_add(prod(&[rows, 48]));
    MemoryPlan {
        encoder,
        decoder,
        search,
        outputs,
    }
}

/// Bytes as a short human figure: `1.5 GiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Parses a size such as `512M`, `8G`, `1.5GiB` or `1000000` (bytes).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a size such as 512M, 8G or 1000000"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("`{s}`: unknown unit `{other}` (use K, M, G or T)")),
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{s}`: out of range"));
    }
    Ok(bytes as u64)
}

/// Memory the process may still use now: the least of the system's available memory, what a
/// cgroup limit leaves, and what an address-space limit (`ulimit -v`) leaves; `None` where
/// none can be read (not Linux).
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        let line = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib.saturating_mul(1024))
    });
    let read_u64 =
        |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    // cgroup v2 (the unified hierarchy; a process in its own group sees it at the root),
    // then v1.
    let cgroup = match (
        read_u64("/sys/fs/cgroup/memory.max"),
        read_u64("/sys/fs/cgroup/memory.current"),
    ) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => match (
            read_u64("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
            read_u64("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
        ) {
            // v1 reports "no limit" as a huge number: keep it only when below 2^60.
            (Some(max), Some(cur)) if max < 1 << 60 => Some(max.saturating_sub(cur)),
            _ => None,
        },
    };
    // An address-space limit (`ulimit -v`) leaves what the process has not mapped yet.
    let rlimit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("Max address space"))?;
            let soft: u64 = line.split_whitespace().nth(3)?.parse().ok()?; // "unlimited" fails
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            let vm = status.lines().find(|l| l.starts_with("VmSize:"))?;
            let kib: u64 = vm.split_whitespace().nth(1)?.parse().ok()?;
            Some(soft.saturating_sub(kib.saturating_mul(1024)))
        });
    [meminfo, cgroup, rlimit].into_iter().flatten().min()
}

/// The memory a batch on `backend` may use now: the device's free memory for a backend with
/// memory of its own (a GPU), else the host's ([`available_bytes`]).
pub fn available_for<B: Backend>(backend: &B) -> Option<u64> {
    backend.device_memory().or_else(available_bytes)
}

/// Bytes the weights of `config` take once uploaded in `dtype`: the linear weights in
/// `dtype` (the FFN output projection in f32 when `dtype` is f16, which keeps it range-safe),
/// the rest (embedding, norms) in f32. An estimate used to refuse a model that cannot fit
/// before any upload starts.
pub fn weight_bytes(config: &T5Config, dtype: WeightDtype) -> u64 {
    let c = config;
    let (d, inner, d_ff) = (c.d_model as u64, c.inner_dim() as u64, c.d_ff as u64);
    let per = match dtype {
        WeightDtype::F32 => 4,
        WeightDtype::Bf16 | WeightDtype::F16 => 2,
        WeightDtype::Int8 => 1,
    };
    let wo = if dtype == WeightDtype::F16 { 4 } else { per };
    let ff_in = if c.is_gated_act { 2 } else { 1 };
    let attn = 4 * d * inner * per;
    let ffn = ff_in * d * d_ff * per + d * d_ff * wo;
    let layers = |n: usize, attns: u64| (n as u64).saturating_mul(attns * attn + ffn + 3 * d * 4);
    let vocab = c.vocab_size as u64 * d;
    // The embedding table is f32; an f32 head tied to it holds it once.
    let table = if c.tie_word_embeddings && dtype == WeightDtype::F32 {
        0
    } else {
        vocab * 4
    };
    layers(c.num_layers, 1)
        .saturating_add(layers(c.num_decoder_layers, 2))
        .saturating_add(vocab * per) // the head
        .saturating_add(table)
}

/// The budget of one `generate` call and where it came from (for messages).
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub bytes: u64,
    /// Set by the caller (`max_memory`), not read from the system.
    pub explicit: bool,
}

impl Budget {
    /// `max_memory` when set, else `available` (what the device has available now, see
    /// [`available_for`]); `None` when neither is known (the hard limits still apply then).
    pub fn of(cfg: &GenerationConfig, available: Option<u64>) -> Option<Budget> {
        match cfg.max_memory {
            Some(bytes) => Some(Budget {
                bytes,
                explicit: true,
            }),
            None => available.map(|bytes| Budget {
                bytes,
                explicit: false,
            }),
        }
    }

    fn describe(&self) -> String {
        if self.explicit {
            format!("the budget of {} (max_memory)", human_bytes(self.bytes))
        } else {
            format!(
                "the {} this device has available now (set max_memory / --max-memory to change the budget)",
                human_bytes(self.bytes)
            )
        }
    }
}

/// An error unless one batch of exactly `shape` fits the budget (for callers that cannot
/// split their batch, such as a benchmark of fixed shapes); `available` as in [`Budget::of`].
pub fn require_fit(
    config: &T5Config,
    dtype: WeightDtype,
    cfg: &GenerationConfig,
    available: Option<u64>,
    shape: BatchShape,
) -> Result<()> {
    let Some(budget) = Budget::of(cfg, available) else {
        return Ok(());
    };
    let need = plan(config, dtype, shape).peak();
    if need > budget.bytes {
        return Err(T5Error::Input(format!(
            "a batch of {} x {} input tokens with up to {} new tokens needs about {} at its largest, more than {}",
            shape.sources,
            shape.src_len,
            shape.new_tokens,
            human_bytes(need),
            budget.describe()
        )));
    }
    Ok(())
}

/// How many units (sources, or sampled copies) one batch may hold so that the worst batch
/// fits the budget: `requested`, or fewer. `shape_of(n)` is the worst batch of `n` units.
/// An error when even one unit does not fit, naming the estimate, the budget and what to
/// lower.
pub(crate) fn fit_batch(
    config: &T5Config,
    dtype: WeightDtype,
    cfg: &GenerationConfig,
    available: Option<u64>,
    requested: usize,
    shape_of: impl Fn(usize) -> BatchShape,
) -> Result<usize> {
    let Some(budget) = Budget::of(cfg, available) else {
        return Ok(requested);
    };
    let fits = |n: usize| plan(config, dtype, shape_of(n)).peak() <= budget.bytes;
    let mut n = requested.max(1);
    while n > 1 && !fits(n) {
        n /= 2;
    }
    if fits(n) {
        return Ok(n);
    }
    let one = shape_of(1);
    let need = plan(config, dtype, one).peak();
    // The most new tokens that would fit (the plan grows with them).
    let max_tokens = {
        let with = |t: usize| BatchShape {
            new_tokens: t,
            ..one
        };
        let (mut lo, mut hi) = (0usize, one.new_tokens);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if plan(config, dtype, with(mid)).peak() <= budget.bytes {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    };
    let advice = if max_tokens >= 1 {
        format!("lower max_new_tokens (--max-new-tokens) to at most {max_tokens}")
    } else if one.rows_per_source > 1 {
        "lower num_beams (--num-beams) or the input length".to_string()
    } else {
        "shorten the input or raise the budget".to_string()
    };
    Err(T5Error::Input(format!(
        "one sequence of {} input tokens with {} row(s) and up to {} new tokens needs about {} at its largest, more than {}: {advice}",
        one.src_len,
        one.rows_per_source,
        one.new_tokens,
        human_bytes(need),
        budget.describe()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("-1G").is_err());
        assert!(parse_bytes("5X").is_err());
        assert!(parse_bytes("").is_err());
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn weight_estimate_matches_the_bundled_checkpoint() {
        // The bundled model is stored in f32 by Hugging Face: its tensors' bytes are what the
        // f32 estimate must come to (the relative-bias tables, a few KiB, aside).
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/spell-numbers");
        let cfg =
            T5Config::from_json_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let file = std::fs::read(dir.join("model.safetensors")).unwrap();
        let header = u64::from_le_bytes(file[..8].try_into().unwrap());
        let tensors = file.len() as u64 - 8 - header;
        let est = weight_bytes(&cfg, WeightDtype::F32);
        assert!(
            est <= tensors && est * 1000 >= tensors * 995,
            "{est} vs {tensors}"
        );
        // Halved linear weights, the embedding table still in f32; f16 keeps `wo` in f32.
        let bf16 = weight_bytes(&cfg, WeightDtype::Bf16);
        assert!(bf16 < est && bf16 > est / 2, "{bf16}");
        assert!(weight_bytes(&cfg, WeightDtype::F16) > bf16);
    }

    #[test]
    fn plan_grows_with_every_dimension_and_saturates() {
        let cfg = T5Config::from_json_str(
            r#"{"d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8, "vocab_size": 32128}"#,
        )
        .unwrap();
        let base = BatchShape {
            sources: 2,
            rows_per_source: 1,
            src_len: 32,
            new_tokens: 32,
            encoder_attention: None,
        };
        let p = |s| plan(&cfg, WeightDtype::F32, s).peak();
        let b = p(base);
        for bigger in [
            BatchShape { sources: 4, ..base },
            BatchShape {
                rows_per_source: 2,
                ..base
            },
            BatchShape {
                src_len: 64,
                ..base
            },
            BatchShape {
                new_tokens: 64,
                ..base
            },
        ] {
            assert!(p(bigger) > b, "{bigger:?}");
        }
        // t5-small, 16 x 128 tokens, 128 new: tens of MiB, not GiB.
        let typical = p(BatchShape {
            sources: 16,
            rows_per_source: 1,
            src_len: 128,
            new_tokens: 128,
            encoder_attention: None,
        });
        assert!(typical > 10 << 20 && typical < 1 << 30, "{typical}");
        let huge = p(BatchShape {
            new_tokens: usize::MAX,
            ..base
        });
        assert_eq!(huge, u64::MAX);
    }

    /// The CPU backend's count of the encoder's attention (its bias as lines, a task's scores
    /// per task that can run at once) replaces the plan's `[heads, L, L]` twice: at 4096
    /// tokens and 12 heads some 4 MiB instead of 1.5 GiB; with two threads never more than
    /// that default; growing with the input's length, and counting no more tasks than there
    /// are threads or (sequence, head) pairs.
    #[test]
    fn the_cpu_counts_its_own_encoder_attention() {
        use crate::backend::Backend;
        let cfg = T5Config::from_json_str(
            r#"{"d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12, "vocab_size": 32128}"#,
        )
        .unwrap();
        let b = crate::CpuBackend::with_isa(2, crate::IsaLevel::Portable).unwrap();
        let mut last = 0;
        for l in [1, 7, 128, 724, 725, 1024, 1100, 4096] {
            let own = b.encoder_attention_bytes(12, 3, l).unwrap();
            let rows = 2 * 12 * (l * l) as u64 * 4;
            assert!(own <= rows && own > last, "{l}: {own}");
            last = own;
            let shape = |encoder_attention| BatchShape {
                sources: 3,
                rows_per_source: 1,
                src_len: l,
                new_tokens: 4,
                encoder_attention,
            };
            let (with, without) = (
                plan(&cfg, WeightDtype::F32, shape(Some(own))),
                plan(&cfg, WeightDtype::F32, shape(None)),
            );
            assert_eq!(without.encoder - with.encoder, rows - own, "{l}");
        }
        assert!(b.encoder_attention_bytes(12, 1, 4096).unwrap() < 5 << 20);
        // Eight threads, one sequence of one head: one task's scores beside the line.
        let eight = crate::CpuBackend::with_isa(8, crate::IsaLevel::Portable).unwrap();
        assert_eq!(
            eight.encoder_attention_bytes(1, 1, 100).unwrap(),
            b.encoder_attention_bytes(1, 1, 100).unwrap()
        );
        assert!(
            eight.encoder_attention_bytes(12, 1, 100).unwrap()
                > b.encoder_attention_bytes(12, 1, 100).unwrap()
        );
    }
}
