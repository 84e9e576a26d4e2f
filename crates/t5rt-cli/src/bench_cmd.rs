//! `t5rt bench`: tokens/s on synthetic inputs of fixed shapes, EOS suppressed so every
//! sequence generates exactly the requested number of tokens.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use t5rt::{Backend, Checkpoint, GenerationConfig, WeightDtype};

use t5rt::bundled as default_model;

/// The standard cases of the benchmark.
const STANDARD: [(&str, usize, usize, usize); 4] = [
    ("a", 1, 32, 32),   // latency
    ("b", 1, 512, 64),  // long input
    ("c", 8, 128, 64),  // small batch
    ("d", 32, 128, 64), // throughput
];

#[derive(Args)]
#[command(
    after_help = "Standard cases (BATCH:INPUT:NEW): a = 1:32:32 (latency), b = 1:512:64 \
    (long input), c = 8:128:64, d = 32:128:64 (throughput).\n\
    Example: t5rt bench --model ./t5-small --case a --case 4:64:16 --json out.json"
)]
pub struct BenchArgs {
    /// Checkpoint directory [default: the bundled model].
    #[arg(short, long, value_name = "DIR")]
    model: Option<PathBuf>,

    /// A standard case (a, b, c, d) or BATCH:INPUT:NEW; repeatable [default: a b c d].
    #[arg(long = "case", value_name = "CASE")]
    cases: Vec<String>,

    /// Timed runs per case, after the warm-up.
    #[arg(long, value_name = "N", default_value_t = 5)]
    repeats: usize,

    /// Untimed runs per case first.
    #[arg(long, value_name = "N", default_value_t = 1)]
    warmup: usize,

    /// CPU threads (0 = one per core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,

    /// Precision of the linear layers' weights: f32 (exact parity with Hugging Face), bf16
    /// (half the memory; activations rounded to bf16 in products on `vdpbf16ps` and the portable
    /// kernels, kept f32 on the bf16-widened ones: the summary line names the kernels), int8 (a
    /// quarter; per-channel weight scales, activations quantized per row) or f16 (CUDA only).
    /// bf16 and int8 keep the attention caches narrower too (README, Precision); everything
    /// else stays f32.
    #[arg(long, value_name = "DTYPE", default_value_t = WeightDtype::F32)]
    dtype: WeightDtype,

    /// Where to run: cpu, cuda (the first GPU) or cuda:N (builds with the `cuda` feature).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: t5rt::device::Device,

    /// Seed of the synthetic input ids (uniform in [2, vocab)).
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,

    /// Time these input ids instead of synthetic ones: a JSONL file of
    /// `{"input_ids": [...]}` lines, one per sequence; it must match the shape of the one
    /// `--case` given (BATCH lines of INPUT ids). Lets a harness time every system on the
    /// same ids.
    #[arg(long, value_name = "FILE")]
    inputs: Option<PathBuf>,

    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut xs: Vec<f64>) -> Spread {
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        let median = if n % 2 == 1 {
            xs[n / 2]
        } else {
            (xs[n / 2 - 1] + xs[n / 2]) / 2.0
        };
        Spread {
            median,
            min: xs[0],
            max: xs[n - 1],
        }
    }
}

#[derive(Serialize)]
struct CaseResult {
    name: String,
    batch: usize,
    input_tokens: usize,
    new_tokens: usize,
    tokens_per_s: Spread,
    encode_s: Spread,
    decode_s: Spread,
    total_s: Spread,
    /// Peak resident memory of the process so far (VmHWM), MiB.
    peak_rss_mib: Option<f64>,
    /// On a GPU: the most device memory the case's runs held at once (weights included), MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu_peak_mib: Option<f64>,
    /// The generated ids of the last timed run, per input.
    output_ids: Vec<Vec<u32>>,
}

#[derive(Serialize)]
struct Report {
    engine: String,
    model: String,
    device: String,
    cpu: Option<String>,
    threads: usize,
    repeats: usize,
    warmup: usize,
    /// Seconds from opening the checkpoint to the model ready on the device (reading,
    /// converting and packing the weights).
    load_s: f64,
    /// How the backend ran the decoding steps (CUDA: graphs captured and replayed).
    #[serde(skip_serializing_if = "Option::is_none")]
    steps: Option<String>,
    cases: Vec<CaseResult>,
}

fn parse_case(spec: &str) -> Result<(String, usize, usize, usize)> {
    if let Some(&(name, b, i, n)) = STANDARD.iter().find(|c| c.0 == spec) {
        return Ok((name.to_string(), b, i, n));
    }
    let parts: Vec<&str> = spec.split(':').collect();
    let nums: Vec<usize> = parts.iter().filter_map(|p| p.parse().ok()).collect();
    if parts.len() != 3 || nums.len() != 3 || nums.contains(&0) {
        bail!("case `{spec}`: expected a, b, c, d or BATCH:INPUT:NEW with positive numbers");
    }
    Ok((spec.to_string(), nums[0], nums[1], nums[2]))
}

/// The ids of `--inputs`, checked against the one case they are for.
fn read_inputs(path: &PathBuf, cases: &[(String, usize, usize, usize)]) -> Result<Vec<Vec<u32>>> {
    let [(name, batch, input, _)] = cases else {
        bail!("--inputs needs exactly one --case (the shape the ids have)");
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let ids = crate::inputs::parse_jsonl(&text, &path.display().to_string())?
        .into_iter()
        .map(|r| match r {
            t5rt::Input::Ids(ids) => Ok(ids),
            t5rt::Input::Text(_) => bail!("{}: --inputs takes input_ids, not text", path.display()),
        })
        .collect::<Result<Vec<_>>>()?;
    if ids.len() != *batch || ids.iter().any(|r| r.len() != *input) {
        bail!(
            "{}: {} sequences of {:?} ids; case {name} is {batch} of {input}",
            path.display(),
            ids.len(),
            ids.iter()
                .map(Vec::len)
                .collect::<std::collections::BTreeSet<_>>()
        );
    }
    Ok(ids)
}

/// A field of /proc/self/status in MiB (Linux only).
fn proc_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn cpu_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split(':').nth(1)?.trim().to_string())
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let specs = if args.cases.is_empty() {
        STANDARD.iter().map(|c| c.0.to_string()).collect()
    } else {
        args.cases.clone()
    };
    let cases = specs
        .iter()
        .map(|s| parse_case(s))
        .collect::<Result<Vec<_>>>()?;
    let given = match &args.inputs {
        None => None,
        Some(path) => Some(read_inputs(path, &cases)?),
    };
    let started = std::time::Instant::now();
    let (ckpt, model_name) = match &args.model {
        Some(dir) => (
            // Token ids only: the tokenizer is not read.
            Checkpoint::open_without_tokenizer(dir)
                .with_context(|| format!("loading {}", dir.display()))?,
            dir.display().to_string(),
        ),
        None => (
            default_model::checkpoint()?,
            default_model::NAME.to_string(),
        ),
    };
    let work = Bench {
        ckpt,
        args: &args,
        cases,
        given,
        model_name,
        started,
    };
    t5rt::device::with_backend(args.device, args.threads, args.dtype, work)?
}

/// The measurements, on whichever backend `--device` gives.
struct Bench<'a> {
    ckpt: Checkpoint,
    args: &'a BenchArgs,
    cases: Vec<(String, usize, usize, usize)>,
    given: Option<Vec<Vec<u32>>>,
    model_name: String,
    started: std::time::Instant,
}

impl t5rt::device::WithBackend for Bench<'_> {
    type Output = Result<()>;

    fn run<B: Backend + 'static>(self, backend: B) -> t5rt::Result<Result<()>> {
        let model = self.ckpt.load_model(backend)?;
        drop(self.ckpt); // release the weights' memory map: the model holds its own copy
        let load_s = self.started.elapsed().as_secs_f64();
        Ok(measure(
            model,
            self.args,
            self.cases,
            self.given,
            self.model_name,
            load_s,
        ))
    }
}

fn measure<B: Backend>(
    model: t5rt::T5Model<B>,
    args: &BenchArgs,
    cases: Vec<(String, usize, usize, usize)>,
    given: Option<Vec<Vec<u32>>>,
    model_name: String,
    load_s: f64,
) -> Result<()> {
    let vocab = model.config.vocab_size as u32;
    println!(
        "model loaded in {load_s:.3} s ({}, {}{})",
        model.backend.name(),
        model.backend.weight_dtype(),
        model.head_screen_dtype().map_or(String::new(), |d| format!(
            "; greedy LM head screened by its {d} copy"
        ))
    );
    let mut results = Vec::new();
    println!(
        "{:<12} {:>5} {:>6} {:>5} {:>12} {:>17} {:>9} {:>9} {:>9}",
        "case",
        "batch",
        "input",
        "new",
        "tokens/s",
        "(min-max)",
        "encode s",
        "decode s",
        "peak MiB"
    );
    // Every case is checked (limits, memory) before any is run or its inputs are made.
    let configs = cases
        .iter()
        .map(|&(ref name, batch, input, new)| {
            let cfg = GenerationConfig {
                max_new_tokens: new,
                min_new_tokens: new, // EOS suppressed: every sequence generates `new` tokens
                batch_size: batch,
                max_input_tokens: input,
                ..GenerationConfig::default()
            };
            cfg.validate(&model.config)
                .and_then(|()| {
                    let shape =
                        t5rt::generate::memory::BatchShape::on(&model, batch, 1, input, new);
                    t5rt::generate::memory::require_fit(
                        &model.config,
                        args.dtype,
                        &cfg,
                        t5rt::generate::memory::available_for(&model.backend),
                        shape,
                    )
                })
                .with_context(|| format!("case {name}"))?;
            Ok(cfg)
        })
        .collect::<Result<Vec<_>>>()?;
    for ((name, batch, input, new), cfg) in cases.into_iter().zip(configs) {
        let inputs: Vec<Vec<u32>> = match &given {
            Some(ids) => ids.clone(),
            None => {
                let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
                (0..batch)
                    .map(|_| (0..input).map(|_| rng.random_range(2..vocab)).collect())
                    .collect()
            }
        };
        let (mut tps, mut enc, mut dec, mut tot) = (vec![], vec![], vec![], vec![]);
        model.backend.reset_device_peak_memory();
        let mut output_ids = Vec::new();
        for run in 0..args.warmup + args.repeats {
            let started = Instant::now();
            let (out, stats) = t5rt::generate_with_stats(&model, &inputs, &cfg, None, |_| {})?;
            let secs = started.elapsed().as_secs_f64();
            let tokens: usize = out.iter().flatten().map(|h| h.ids.len()).sum();
            if tokens != batch * new {
                bail!(
                    "case {name}: generated {tokens} tokens, expected {}",
                    batch * new
                );
            }
            if run >= args.warmup {
                output_ids = out.into_iter().map(|mut h| h.swap_remove(0).ids).collect();
                tps.push(tokens as f64 / secs);
                enc.push(stats.encode_secs);
                dec.push(stats.decode_secs);
                tot.push(secs);
            }
        }
        let r = CaseResult {
            name,
            batch,
            input_tokens: input,
            new_tokens: new,
            tokens_per_s: Spread::of(tps),
            encode_s: Spread::of(enc),
            decode_s: Spread::of(dec),
            total_s: Spread::of(tot),
            peak_rss_mib: proc_status_mib("VmHWM:"),
            gpu_peak_mib: model
                .backend
                .device_peak_memory()
                .map(|b| b as f64 / (1u64 << 20) as f64),
            output_ids,
        };
        println!(
            "{:<12} {:>5} {:>6} {:>5} {:>12.1} {:>17} {:>9.4} {:>9.4} {:>9}",
            r.name,
            r.batch,
            r.input_tokens,
            r.new_tokens,
            r.tokens_per_s.median,
            format!("({:.1}-{:.1})", r.tokens_per_s.min, r.tokens_per_s.max),
            r.encode_s.median,
            r.decode_s.median,
            r.peak_rss_mib.map_or("?".into(), |m| format!("{m:.0}")),
        );
        if let Some(gpu) = r.gpu_peak_mib {
            println!(
                "{:<12} GPU memory at most {gpu:.0} MiB (weights included)",
                r.name
            );
        }
        results.push(r);
    }
    let steps = model.backend.step_report();
    if let Some(line) = &steps {
        println!("{line}");
    }
    let report = Report {
        engine: format!("t5rt {} {}", env!("CARGO_PKG_VERSION"), args.dtype),
        model: model_name,
        device: model.backend.name(),
        cpu: cpu_name(),
        threads: args.threads,
        repeats: args.repeats,
        warmup: args.warmup,
        load_s,
        steps,
        cases: results,
    };
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
