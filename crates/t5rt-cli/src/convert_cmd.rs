//! `t5rt convert`: quantize a checkpoint's linear weights to int8 ahead of time.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use t5rt::WeightDtype;

#[derive(Args)]
#[command(after_help = "Example:\n  \
    t5rt convert --model ./flan-t5-base --output ./flan-t5-base-int8\n  \
    t5rt generate --model ./flan-t5-base-int8 --dtype int8 \"summarize: ...\"\n\n\
    The result loads with --dtype int8 only, gives exactly the outputs of the original loaded\n\
    with --dtype int8, reads a quarter of the weight bytes and skips quantizing at load. Only\n\
    t5rt reads it (linear weights are stored as NAME.t5rt_int8 and NAME.t5rt_scale).")]
pub struct ConvertArgs {
    /// Checkpoint directory to convert.
    #[arg(short, long, value_name = "DIR")]
    model: PathBuf,

    /// Where to write the converted checkpoint (a new or empty directory).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,

    /// Precision to store the linear weights in (int8 is the one that gains from it: bf16
    /// and f32 load from the checkpoint as published).
    #[arg(long, value_name = "DTYPE", default_value_t = WeightDtype::Int8)]
    dtype: WeightDtype,

    /// Threads (0 = one per core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    if args.dtype != WeightDtype::Int8 {
        bail!(
            "--dtype {}: only int8 is converted ahead of time; {} loads from the checkpoint as published",
            args.dtype,
            args.dtype
        );
    }
    let started = Instant::now();
    let s = t5rt::convert::convert_int8(&args.model, &args.output, args.threads)
        .with_context(|| format!("converting {}", args.model.display()))?;
    eprintln!(
        "t5rt: {} linear weights quantized to int8, {} tensors kept in f32; wrote {} ({}) in {:.2} s",
        s.quantized,
        s.kept,
        s.path.display(),
        t5rt::generate::memory::human_bytes(s.bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
