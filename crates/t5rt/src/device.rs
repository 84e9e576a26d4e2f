//! Where a model runs: `cpu`, `cuda` or `cuda:N`. One place turns a [`Device`] into a backend
//! ([`with_backend`]); everything above it is generic over [`Backend`].

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, WeightDtype};
use crate::error::Result;
#[cfg(not(feature = "cuda"))]
use crate::error::T5Error;

/// A compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// An NVIDIA GPU by index (CUDA's device ordinal).
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("`{other}`: expected cpu, cuda or cuda:N")),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// What to do with a backend once it exists: the caller's work, generic over the device.
pub trait WithBackend {
    type Output;
    fn run<B: Backend + 'static>(self, backend: B) -> Result<Self::Output>;
}

/// Makes the backend `device` names (CPU: `threads` threads, 0 = one per core) with linear
/// weights in `dtype`, and runs `work` on it. Asking for CUDA in a build without the `cuda`
/// feature is an error that says so.
pub fn with_backend<W: WithBackend>(
    device: Device,
    threads: usize,
    dtype: WeightDtype,
    work: W,
) -> Result<W::Output> {
    match device {
        Device::Cpu => work.run(CpuBackend::new(threads)?.with_dtype(dtype)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => work.run(crate::backend::cuda::CudaBackend::new(n, dtype)?),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            let _ = (threads, dtype);
            Err(T5Error::Backend(
                "this build of t5rt has no CUDA support: rebuild with `cargo build --release --features cuda`, or use --device cpu"
                    .into(),
            ))
        }
    }
}
