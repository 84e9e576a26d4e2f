//! `t5rt generate`: texts or a file in, generated text or JSONL out.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use t5rt::{Backend, Checkpoint, CpuBackend, GenerateOptions, T5Tokenizer};

use crate::default_model;
use crate::inputs::{read_file, InputFormat, Request};

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

    /// Inputs longer than this many tokens are refused (never silently truncated).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_input_tokens: usize,
}

#[derive(Serialize)]
struct OutputLine<'a> {
    text: Option<&'a str>,
    output_ids: &'a [u32],
}

fn encode_requests(requests: &[Request], tokenizer: Option<&T5Tokenizer>) -> Result<Vec<Vec<u32>>> {
    requests
        .iter()
        .enumerate()
        .map(|(i, r)| match r {
            Request::Ids(ids) => Ok(ids.clone()),
            Request::Text(text) => {
                let tok = tokenizer.ok_or(t5rt::T5Error::NoTokenizer)?;
                tok.encode(text).with_context(|| format!("input {}", i + 1))
            }
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
    let tokenizer = ckpt.tokenizer.as_ref();
    let inputs = encode_requests(&requests, tokenizer)?;
    let opts = GenerateOptions {
        max_new_tokens: args
            .max_new_tokens
            .or(ckpt.generation.max_new_tokens)
            .unwrap_or(GenerateOptions::default().max_new_tokens),
        min_new_tokens: args
            .min_new_tokens
            .or(ckpt.generation.min_new_tokens)
            .unwrap_or(0),
        batch_size: args.batch_size,
        max_input_tokens: args.max_input_tokens,
    };
    let model = ckpt.load_model(CpuBackend::new(args.threads)?)?;
    let load_secs = started.elapsed().as_secs_f64();

    let bar = if args.input.is_some() {
        let bar = ProgressBar::new(inputs.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} sequences [{elapsed} < {eta}]")
                .expect("valid template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let gen_started = Instant::now();
    let outputs = t5rt::generate(&model, &inputs, &opts, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let gen_secs = gen_started.elapsed().as_secs_f64();

    let texts = match tokenizer {
        Some(tok) => outputs
            .iter()
            .map(|ids| tok.decode(ids).map(Some))
            .collect::<t5rt::Result<Vec<_>>>()?,
        None => vec![None; outputs.len()],
    };
    let jsonl_out = jsonl_in || args.output.is_some();
    let mut sink: Box<dyn Write> = match args.output.as_deref() {
        None | Some("-") => Box::new(BufWriter::new(std::io::stdout().lock())),
        Some(path) => Box::new(BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create {path}"))?,
        )),
    };
    for (ids, text) in outputs.iter().zip(&texts) {
        if jsonl_out {
            let line = OutputLine {
                text: text.as_deref(),
                output_ids: ids,
            };
            serde_json::to_writer(&mut sink, &line)?;
            writeln!(sink)?;
        } else {
            match text {
                Some(t) => writeln!(sink, "{t}")?,
                None => bail!("this model has no tokenizer.json to decode with; use --output FILE for JSONL ids"),
            }
        }
    }
    sink.flush()?;

    let tokens: usize = outputs.iter().map(Vec::len).sum();
    eprintln!(
        "t5rt: {} sequences, {} new tokens in {:.2} s ({:.0} tokens/s, {}; model loaded in {:.2} s)",
        outputs.len(),
        tokens,
        gen_secs,
        tokens as f64 / gen_secs.max(1e-9),
        model.backend.name(),
        load_secs
    );
    Ok(())
}
