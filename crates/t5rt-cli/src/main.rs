//! `t5rt`: run T5-family models from the command line.

mod bench_cmd;
mod convert_cmd;
mod generate_cmd;
mod inputs;
mod score_cmd;
mod serve_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "t5rt",
    version,
    about = "Fast inference for T5-family models (t5, FLAN-T5 / T5 v1.1, mT5)",
    long_about = "Fast inference for T5-family encoder-decoder models (t5, FLAN-T5 / T5 v1.1, mT5).\n\
                  Point it at a Hugging Face checkpoint directory as downloaded \
                  (config.json, model.safetensors, tokenizer.json); without --model it runs \
                  the small bundled model that spells out numbers (try \"spell: 1984\")."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text: greedy search, beam search or sampling.
    Generate(generate_cmd::GenerateArgs),
    /// Measure tokens/s on synthetic inputs (EOS suppressed), encoder and decoder apart.
    Bench(bench_cmd::BenchArgs),
    /// Score given targets: per-token log-probabilities under teacher forcing (as Hugging
    /// Face's forward pass with labels, or CTranslate2's score_batch).
    Score(score_cmd::ScoreArgs),
    /// Quantize a checkpoint's linear weights to int8 ahead of time (faster int8 loading).
    Convert(convert_cmd::ConvertArgs),
    /// Serve the model over HTTP (Text Generation Inference and OpenAI routes) with
    /// continuous batching.
    Serve(serve_cmd::ServeArgs),
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        quiet_on_closed_pipe();
    }
    let result = match cli.command {
        Command::Generate(args) => generate_cmd::run(args),
        Command::Bench(args) => bench_cmd::run(args),
        Command::Score(args) => score_cmd::run(args),
        Command::Convert(args) => convert_cmd::run(args),
        Command::Serve(args) => serve_cmd::run(args),
    };
    if let Err(err) = result {
        eprintln!("error: {}", error_chain(&err));
        std::process::exit(1);
    }
}

/// The error and its causes joined by ": ", as `{:#}` prints them, less a cause whose text the
/// message before it already ends with (t5rt's I/O errors name their cause in their own text).
fn error_chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out == text || out.ends_with(&format!(": {text}")) {
            continue;
        }
        if !out.is_empty() {
            out += ": ";
        }
        out += &text;
    }
    out
}

/// `t5rt generate ... | head` should stop quietly when `head` closes the pipe, as Unix tools
/// do, not panic in `println!`: restore SIGPIPE's default action, which Rust's runtime sets to
/// "ignore". Not for `serve`, where a client closing its socket must not end the server.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to its default, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let io = std::io::Error::other("disk on fire");
        let err = anyhow::Error::new(t5rt::T5Error::Io {
            path: "model.safetensors".into(),
            source: io,
        })
        .context("loading ./m");
        assert_eq!(
            error_chain(&err),
            "loading ./m: cannot read model.safetensors: disk on fire"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&plain), "outer: inner");
        // A cause that ends the message only as part of a word is still printed.
        let partial = anyhow::anyhow!("valid").context("input invalid");
        assert_eq!(error_chain(&partial), "input invalid: valid");
    }
}
