//! `t5rt generate`: texts or a file in, generated text or JSONL out.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use t5rt::{
    Checkpoint, EarlyStopping, GenerationConfig, Hypothesis, T5Model, T5Tokenizer, WeightDtype,
};

use crate::inputs::{read_file, InputFormat, Request};
use t5rt::bundled as default_model;

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    t5rt generate \"spell: 1984\"\n  \
    t5rt generate --model ./flan-t5-small \"translate English to German: Hello\"\n  \
    t5rt generate --model ./flan-t5-small --input questions.txt --output answers.jsonl\n\n\
    JSONL input lines are {\"text\": \"...\"} or {\"input_ids\": [..]}; output lines are\n\
    {\"text\": \"...\", \"output_ids\": [..]} in input order, where output_ids are the generated\n\
    ids after the decoder start token, up to and including EOS when produced.")]
pub struct GenerateArgs {
    /// Input texts, one sequence each (or use --input).
    #[arg(value_name = "TEXT")]
    texts: Vec<String>,

    /// Checkpoint directory (config.json, model.safetensors or its sharded index, tokenizer.json).
    /// Without it, the bundled spell-numbers model runs.
    #[arg(short, long, value_name = "DIR")]
    model: Option<PathBuf>,

    /// Read inputs from FILE (`-` for stdin): plain text lines, or JSONL lines with "text" or "input_ids".
    #[arg(short, long, value_name = "FILE|-", conflicts_with = "texts")]
    input: Option<String>,

    /// How to read --input.
    #[arg(long, value_enum, default_value_t = InputFormat::Auto)]
    input_format: InputFormat,

    /// Write JSONL results to FILE (`-` for stdout). Default: text lines on stdout for plain input,
    /// JSONL on stdout for JSONL input.
    #[arg(short, long, value_name = "FILE|-")]
    output: Option<String>,

    /// Most tokens to generate per sequence (EOS included) [default: the model's
    /// generation_config.json, else 128].
    #[arg(long, value_name = "N")]
    max_new_tokens: Option<usize>,

    /// EOS is suppressed until this many tokens were generated (as in Hugging Face).
    #[arg(long, value_name = "N")]
    min_new_tokens: Option<usize>,

    /// Most sequences decoded together in one padded batch.
    #[arg(long, value_name = "N", default_value_t = 16)]
    batch_size: usize,

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

    /// Inputs longer than this many tokens are refused (never silently truncated).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_input_tokens: usize,

    /// Memory generation may use beyond the loaded model (caches, activations, outputs),
    /// such as 512M or 8G [default: what the machine, or its cgroup, has available]. Batches
    /// are split to fit it; a request that cannot fit is refused before any work, with the
    /// estimate and the option to lower.
    #[arg(long, value_name = "SIZE", value_parser = t5rt::generate::memory::parse_bytes)]
    max_memory: Option<u64>,

    /// Beam search with N beams; 1 is greedy search (or sampling with --do-sample)
    /// [default: the model's generation_config.json, else 1; likewise below].
    #[arg(long, value_name = "N", help_heading = "Decoding")]
    num_beams: Option<usize>,

    /// Beam scores are divided by length ** P: > 0 favours longer outputs, < 0 shorter ones
    /// [default: 1.0].
    #[arg(
        long,
        value_name = "P",
        allow_negative_numbers = true,
        help_heading = "Decoding"
    )]
    length_penalty: Option<f64>,

    /// When beam search stops: true (num_beams hypotheses done), false (no running beam can
    /// win, judged at the current length), never (judged at the longest length)
    /// [default: false].
    #[arg(long, value_name = "WHEN", help_heading = "Decoding")]
    early_stopping: Option<EarlyStopping>,

    /// Sequences returned per input, best first (at most --num-beams unless sampling); JSONL
    /// lines then carry "sequences": [{"output_ids", "text", "score"}, ...].
    #[arg(long, value_name = "N", help_heading = "Decoding")]
    num_return_sequences: Option<usize>,

    /// No n-gram of this size occurs twice in an output (0 = off) [default: 0].
    #[arg(long, value_name = "N", help_heading = "Decoding")]
    no_repeat_ngram_size: Option<usize>,

    /// > 1 discourages tokens already generated (1 = off) [default: 1.0].
    #[arg(long, value_name = "P", help_heading = "Decoding")]
    repetition_penalty: Option<f32>,

    /// Sample the next token instead of taking the most likely one.
    #[arg(long, help_heading = "Sampling")]
    do_sample: bool,

    /// Sampling temperature (> 0; lower is more conservative) [default: 1.0].
    #[arg(long, value_name = "T", help_heading = "Sampling")]
    temperature: Option<f32>,

    /// Sample among the K most likely tokens (0 = all) [default: 50, as in Hugging Face].
    #[arg(long, value_name = "K", help_heading = "Sampling")]
    top_k: Option<usize>,

    /// Sample among the most likely tokens whose probabilities add up to P [default: 1.0].
    #[arg(long, value_name = "P", help_heading = "Sampling")]
    top_p: Option<f32>,

    /// Seed of the sampler: the same seed and inputs give the same outputs.
    #[arg(long, value_name = "N", default_value_t = 0, help_heading = "Sampling")]
    seed: u64,

    /// Stop a sequence once its text contains STRING (repeatable; greedy and sampling).
    #[arg(long = "stop", value_name = "STRING", help_heading = "Decoding")]
    stop: Vec<String>,
}

#[derive(Serialize)]
struct Sequence<'a> {
    output_ids: &'a [u32],
    text: Option<&'a str>,
    score: Option<f32>,
}

#[derive(Serialize)]
struct OutputLine<'a> {
    text: Option<&'a str>,
    output_ids: &'a [u32],
    #[serde(skip_serializing_if = "Option::is_none")]
    sequences: Option<Vec<Sequence<'a>>>,
}

fn encode_requests(requests: &[Request], tokenizer: Option<&T5Tokenizer>) -> Result<Vec<Vec<u32>>> {
    requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            r.encode(tokenizer)
                .with_context(|| format!("input {}", i + 1))
        })
        .collect()
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let (requests, jsonl_in) = match &args.input {
        Some(path) => read_file(path, args.input_format)?,
        None if args.texts.is_empty() => {
            bail!("nothing to generate from: give TEXT arguments or --input FILE (see --help)")
        }
        None => (
            args.texts.iter().cloned().map(Request::Text).collect(),
            false,
        ),
    };
    if let Some(i) = requests
        .iter()
        .position(|r| matches!(r, Request::Text(t) if t.trim().is_empty()))
    {
        bail!("input {} is empty", i + 1);
    }

    let started = Instant::now();
    let ckpt = match &args.model {
        Some(dir) => Checkpoint::open(dir).with_context(|| format!("loading {}", dir.display()))?,
        None => default_model::checkpoint().context(default_model::NAME)?,
    };
    // The weights' memory map is released once they are on the device.
    let Checkpoint {
        config,
        store,
        tokenizer,
        generation,
    } = ckpt;
    let tokenizer = tokenizer.as_ref();
    let inputs = encode_requests(&requests, tokenizer)?;
    let mut cfg = GenerationConfig::from_model(&generation);
    if let Some(n) = args.max_new_tokens {
        cfg.max_new_tokens = n;
    }
    if let Some(n) = args.min_new_tokens {
        cfg.min_new_tokens = n;
    }
    cfg.batch_size = args.batch_size;
    cfg.max_input_tokens = args.max_input_tokens;
    cfg.max_memory = args.max_memory;
    // User options override the model's generation_config.json only where given.
    macro_rules! given {
        ($($field:ident),*) => { $(if let Some(v) = args.$field { cfg.$field = v; })* };
    }
    given!(
        num_beams,
        length_penalty,
        early_stopping,
        num_return_sequences,
        no_repeat_ngram_size,
        repetition_penalty,
        temperature,
        top_k,
        top_p
    );
    cfg.do_sample |= args.do_sample;
    cfg.seed = args.seed;
    cfg.stop_strings = args.stop.clone();
    cfg.validate(&config)?;
    let run = Run {
        config,
        store,
        inputs: &inputs,
        cfg: &cfg,
        tokenizer,
        progress: args.input.is_some(),
        started,
    };
    let (outputs, device, load_secs, gen_secs) =
        t5rt::device::with_backend(args.device, args.threads, args.dtype, run)?;

    let texts = outputs
        .iter()
        .map(|hyps| {
            hyps.iter()
                .map(|h| tokenizer.map(|tok| tok.decode(&h.ids)).transpose())
                .collect::<t5rt::Result<Vec<Option<String>>>>()
        })
        .collect::<t5rt::Result<Vec<_>>>()?;
    let jsonl_out = jsonl_in || args.output.is_some();
    let mut sink: Box<dyn Write> = match args.output.as_deref() {
        None | Some("-") => Box::new(BufWriter::new(std::io::stdout().lock())),
        Some(path) => Box::new(BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create {path}"))?,
        )),
    };
    for (hyps, texts) in outputs.iter().zip(&texts) {
        write_result(
            &mut sink,
            hyps,
            texts,
            jsonl_out,
            cfg.num_return_sequences > 1,
        )?;
    }
    sink.flush()?;

    let tokens: usize = outputs.iter().flatten().map(|h| h.ids.len()).sum();
    eprintln!(
        "t5rt: {} inputs, {} new tokens in {:.2} s ({:.0} tokens/s, {}; model loaded in {:.2} s)",
        outputs.len(),
        tokens,
        gen_secs,
        tokens as f64 / gen_secs.max(1e-9),
        device,
        load_secs
    );
    Ok(())
}

/// Loading and generation, on whichever backend `--device` gives.
struct Run<'a> {
    config: t5rt::T5Config,
    store: t5rt::TensorStore,
    inputs: &'a [Vec<u32>],
    cfg: &'a GenerationConfig,
    tokenizer: Option<&'a T5Tokenizer>,
    progress: bool,
    started: Instant,
}

impl t5rt::device::WithBackend for Run<'_> {
    /// The outputs, the device's name, and the seconds spent loading and generating.
    type Output = (Vec<Vec<Hypothesis>>, String, f64, f64);

    fn run<B: t5rt::Backend + 'static>(self, backend: B) -> t5rt::Result<Self::Output> {
        let mut model = T5Model::load(self.config, &self.store, backend)?;
        drop(self.store); // the weights' memory map: the model holds its own copy
        if self.cfg.num_beams > 1 || self.cfg.do_sample {
            model.drop_head_screen(); // only greedy search screens the LM head
        }
        let load_secs = self.started.elapsed().as_secs_f64();
        let bar = if self.progress {
            let bar = ProgressBar::new(self.inputs.len() as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} sequences [{elapsed} < {eta}]")
                    .expect("valid template"),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        let gen_started = Instant::now();
        let outputs = t5rt::generate(&model, self.inputs, self.cfg, self.tokenizer, |done| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        let gen_secs = gen_started.elapsed().as_secs_f64();
        Ok((outputs, model.backend.name(), load_secs, gen_secs))
    }
}

/// One input's result: a JSONL line, or the best sequence's text.
fn write_result(
    sink: &mut dyn Write,
    hyps: &[Hypothesis],
    texts: &[Option<String>],
    jsonl: bool,
    with_sequences: bool,
) -> Result<()> {
    let best = &hyps[0];
    if jsonl {
        let sequences = with_sequences.then(|| {
            hyps.iter()
                .zip(texts)
                .map(|(h, t)| Sequence {
                    output_ids: &h.ids,
                    text: t.as_deref(),
                    score: h.score,
                })
                .collect()
        });
        let line = OutputLine {
            text: texts[0].as_deref(),
            output_ids: &best.ids,
            sequences,
        };
        serde_json::to_writer(&mut *sink, &line)?;
        writeln!(sink)?;
    } else {
        match &texts[0] {
            Some(t) => writeln!(sink, "{t}")?,
            None => bail!(
                "this model has no tokenizer.json to decode with; use --output FILE for JSONL ids"
            ),
        }
    }
    Ok(())
}
