//! `t5rt score`: the log-probability a model gives each token of given targets (teacher
//! forcing), as Hugging Face's forward pass with `labels` and CTranslate2's `score_batch`.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use t5rt::{Checkpoint, GenerationConfig, T5Model, WeightDtype};

use crate::inputs::Request;
use t5rt::bundled as default_model;

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    t5rt score \"spell: 1984\" \"one thousand nine hundred eighty-four\"\n  \
    t5rt score --model ./flan-t5-small --input pairs.jsonl --output scores.jsonl\n\n\
    Input lines are tab-separated `SOURCE<TAB>TARGET` texts, or JSONL objects with \"text\" or\n\
    \"input_ids\" and \"target\" or \"target_ids\". A target text is tokenized as Hugging Face\n\
    does (its ids end with EOS, which is scored too); target_ids are scored as given.\n\
    Output lines, in input order: {\"log_prob\": sum, \"mean_log_prob\": .., \"target_ids\": [..],\n\
    \"token_log_probs\": [..], \"top_ids\": [..]}, natural logs; top_ids are the model's most\n\
    likely token at each position.")]
pub struct ScoreArgs {
    /// One source text and its target text (or use --input).
    #[arg(value_names = ["SOURCE", "TARGET"], num_args = 2)]
    pair: Vec<String>,

    /// Checkpoint directory; without it, the bundled spell-numbers model.
    #[arg(short, long, value_name = "DIR")]
    model: Option<PathBuf>,

    /// Read pairs from FILE (`-` for stdin): `SOURCE<TAB>TARGET` lines or JSONL.
    #[arg(short, long, value_name = "FILE|-", conflicts_with = "pair")]
    input: Option<String>,

    /// Write JSONL to FILE (`-` for stdout).
    #[arg(short, long, value_name = "FILE|-")]
    output: Option<String>,

    /// Most pairs scored together in one padded batch.
    #[arg(long, value_name = "N", default_value_t = 16)]
    batch_size: usize,

    /// CPU threads (0 = one per core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,

    /// Precision of the linear layers' weights (as for `generate`).
    #[arg(long, value_name = "DTYPE", default_value_t = WeightDtype::F32)]
    dtype: WeightDtype,

    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: t5rt::device::Device,

    /// Sources longer than this many tokens are refused (never truncated).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_input_tokens: usize,

    /// Memory scoring may use beyond the model, such as 512M [default: what is available].
    #[arg(long, value_name = "SIZE", value_parser = t5rt::generate::memory::parse_bytes)]
    max_memory: Option<u64>,
}

#[derive(Deserialize)]
struct JsonPair {
    text: Option<String>,
    input_ids: Option<Vec<i64>>,
    target: Option<String>,
    target_ids: Option<Vec<i64>>,
}

#[derive(Serialize)]
struct OutputLine<'a> {
    log_prob: f64,
    mean_log_prob: f64,
    target_ids: &'a [u32],
    token_log_probs: &'a [f32],
    top_ids: &'a [u32],
}

/// One side of a pair from JSON: text or ids, not both, not empty.
fn side(
    text: Option<String>,
    ids: Option<Vec<i64>>,
    names: (&str, &str),
    at: &str,
) -> Result<Request> {
    match (text, ids) {
        (Some(_), Some(_)) => bail!("{at}: give \"{}\" or \"{}\", not both", names.0, names.1),
        (None, None) => bail!("{at}: needs \"{}\" or \"{}\"", names.0, names.1),
        (Some(t), None) if t.trim().is_empty() => bail!("{at}: empty {}", names.0),
        (Some(t), None) => Ok(Request::Text(t)),
        (None, Some(ids)) if ids.is_empty() => bail!("{at}: empty {}", names.1),
        (None, Some(ids)) => Ok(Request::Ids(
            ids.into_iter()
                .map(|id| u32::try_from(id).map_err(|_| anyhow::anyhow!("{at}: bad token id {id}")))
                .collect::<Result<_>>()?,
        )),
    }
}

/// Pairs from `text`: JSONL when the first non-blank line starts with `{`, else
/// tab-separated lines. Every line is checked before any work.
pub fn parse_pairs(text: &str, name: &str) -> Result<Vec<(Request, Request)>> {
    let jsonl = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| l.trim_start().starts_with('{'));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("{name} line {}", i + 1);
        if line.trim().is_empty() {
            if jsonl {
                continue;
            }
            bail!("{at}: empty line");
        }
        if jsonl {
            let p: JsonPair = serde_json::from_str(line).with_context(|| {
                format!("{at}: not a JSON object with \"text\"/\"input_ids\" and \"target\"/\"target_ids\"")
            })?;
            out.push((
                side(p.text, p.input_ids, ("text", "input_ids"), &at)?,
                side(p.target, p.target_ids, ("target", "target_ids"), &at)?,
            ));
        } else {
            let Some((src, tgt)) = line.split_once('\t') else {
                bail!("{at}: expected SOURCE<TAB>TARGET");
            };
            if src.trim().is_empty() || tgt.trim().is_empty() {
                bail!("{at}: empty source or target");
            }
            out.push((Request::Text(src.into()), Request::Text(tgt.into())));
        }
    }
    if out.is_empty() {
        bail!("{name} holds no pairs");
    }
    Ok(out)
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let pairs = match &args.input {
        Some(path) => {
            let (text, name) = crate::inputs::read_text(path)?;
            parse_pairs(&text, name)?
        }
        None if args.pair.len() == 2 => {
            if args.pair.iter().any(|t| t.trim().is_empty()) {
                bail!("empty source or target");
            }
            vec![(
                Request::Text(args.pair[0].clone()),
                Request::Text(args.pair[1].clone()),
            )]
        }
        None => bail!("nothing to score: give SOURCE TARGET or --input FILE (see --help)"),
    };
    let started = Instant::now();
    let ckpt = match &args.model {
        Some(dir) => Checkpoint::open(dir).with_context(|| format!("loading {}", dir.display()))?,
        None => default_model::checkpoint().context(default_model::NAME)?,
    };
    let Checkpoint {
        config,
        store,
        tokenizer,
        ..
    } = ckpt;
    let tok = tokenizer.as_ref();
    let mut inputs = Vec::with_capacity(pairs.len());
    let mut targets = Vec::with_capacity(pairs.len());
    for (i, (src, tgt)) in pairs.iter().enumerate() {
        inputs.push(src.encode(tok).with_context(|| format!("pair {}", i + 1))?);
        targets.push(
            tgt.encode(tok)
                .with_context(|| format!("pair {} target", i + 1))?,
        );
    }
    let cfg = GenerationConfig {
        batch_size: args.batch_size,
        max_input_tokens: args.max_input_tokens,
        max_memory: args.max_memory,
        ..GenerationConfig::default()
    };
    let work = Work {
        config,
        store,
        inputs: &inputs,
        targets: &targets,
        cfg: &cfg,
        started,
    };
    let (scores, device, load_secs, secs) =
        t5rt::device::with_backend(args.device, args.threads, args.dtype, work)?;
    let mut sink: Box<dyn Write> = match args.output.as_deref() {
        None | Some("-") => Box::new(BufWriter::new(std::io::stdout().lock())),
        Some(path) => Box::new(BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create {path}"))?,
        )),
    };
    for (target, s) in targets.iter().zip(&scores) {
        let lp = &s.log_probs;
        let sum: f64 = lp.iter().map(|&v| v as f64).sum();
        let line = OutputLine {
            log_prob: sum,
            mean_log_prob: sum / lp.len() as f64,
            target_ids: target,
            token_log_probs: lp,
            top_ids: &s.top_ids,
        };
        serde_json::to_writer(&mut sink, &line)?;
        writeln!(sink)?;
    }
    sink.flush()?;
    let tokens: usize = targets.iter().map(Vec::len).sum();
    eprintln!(
        "t5rt: {} pairs, {tokens} target tokens scored in {secs:.2} s ({device}; model loaded in {load_secs:.2} s)",
        scores.len()
    );
    Ok(())
}

struct Work<'a> {
    config: t5rt::T5Config,
    store: t5rt::TensorStore,
    inputs: &'a [Vec<u32>],
    targets: &'a [Vec<u32>],
    cfg: &'a GenerationConfig,
    started: Instant,
}

impl t5rt::device::WithBackend for Work<'_> {
    /// The scores, the device's name, and the seconds spent loading and scoring.
    type Output = (Vec<t5rt::TargetScore>, String, f64, f64);

    fn run<B: t5rt::Backend + 'static>(self, backend: B) -> t5rt::Result<Self::Output> {
        let mut model = T5Model::load(self.config, &self.store, backend)?;
        drop(self.store);
        model.drop_head_screen(); // scoring needs every logit
        let load_secs = self.started.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let scores = t5rt::score(&model, self.inputs, self.targets, self.cfg)?;
        Ok((
            scores,
            model.backend.name(),
            load_secs,
            t0.elapsed().as_secs_f64(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_from_tsv_and_jsonl() {
        let p = parse_pairs("a\tb\nc\td e\n", "f").unwrap();
        assert_eq!(
            p[1],
            (Request::Text("c".into()), Request::Text("d e".into()))
        );
        let p = parse_pairs("{\"text\": \"a\", \"target_ids\": [4, 1]}\n\n{\"input_ids\": [5], \"target\": \"x\"}\n", "f").unwrap();
        assert_eq!(p[0], (Request::Text("a".into()), Request::Ids(vec![4, 1])));
        assert_eq!(p[1], (Request::Ids(vec![5]), Request::Text("x".into())));
    }

    #[test]
    fn bad_pairs_name_the_line() {
        for (text, needle) in [
            ("a\tb\nno tab\n", "f line 2: expected SOURCE<TAB>TARGET"),
            ("a\t \n", "empty source or target"),
            ("{\"text\": \"a\"}", "needs \"target\" or \"target_ids\""),
            ("{\"text\": \"a\", \"target_ids\": []}", "empty target_ids"),
            (
                "{\"text\": \"a\", \"target\": \"b\", \"target_ids\": [1]}",
                "not both",
            ),
            (
                "{\"input_ids\": [-1], \"target\": \"b\"}",
                "bad token id -1",
            ),
            ("", "holds no pairs"),
        ] {
            let err = format!("{:#}", parse_pairs(text, "f").unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
