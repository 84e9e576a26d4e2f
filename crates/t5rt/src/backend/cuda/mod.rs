//! The CUDA backend (feature `cuda`): the [`Backend`] kernels on an NVIDIA GPU through
//! `cudarc`, with the CUDA libraries loaded at run time (a build needs no CUDA toolkit).
//! Products go through cuBLAS with f32 accumulation (TF32 off); the other kernels are CUDA C
//! in `kernels.cu`, compiled by NVRTC for the GPU at start.
//!
//! Precisions (`WeightDtype`): f32; bf16 and f16, where a product's half-precision operands go
//! into the matrix units and its result stays f32; products of up to 8 rows (decoding) go
//! through the `gemv` kernel instead, which widens the weights to f32 and keeps the
//! activations f32. Everything else stays f32: the residual
//! stream, RMSNorm statistics, softmax, activations, caches. The feed-forward output projection
//! (`wo`), whose inputs exceed fp16's range in T5 v1.1 / FLAN-T5 / mT5, is kept in f32 when the
//! weights are f16 ([`Backend::upload_output_linear`]): half precision is safe by construction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{sys as blas_sys, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};

use super::{
    attention_then_out, check_len, checks, cross_attention_then_out, ffn_then_out, matmul_nt_each,
    norm_qkv_then_write, norm_then_ffn_up, norm_then_products, self_attention_then_out, AttnCall,
    AttnShape, Backend, BiasLayout, CacheWrite, CrossAttnCall, FfnCall, KvFormat, MatDims,
    SelfAttnCall, StepPlan, WeightDtype,
};
use crate::config::Activation;
use crate::error::{Result, T5Error};

mod graphs;
pub use graphs::GraphStats;

/// The kernels' source, compiled at run time.
pub const KERNELS: &str = include_str!("kernels.cu");

/// Every kernel `kernels.cu` defines (loaded at start; a missing one is an error then).
pub const KERNEL_NAMES: [&str; 19] = [
    "to_bf16",
    "to_f16",
    "compress_kv",
    "rms_norm",
    "activate",
    "scale",
    "embed",
    "write_position",
    "gather_rows",
    "copy_rows",
    "fill_column",
    "argmax_rows",
    "attention",
    "attention_step",
    "attention_softmax",
    "gemv",
    "attention_o",
    "gemv_gemv",
    "gemv_attention_o",
];

/// How attention over several queries per sequence (the encoder's) runs on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderAttention {
    /// `attention`: a block per query whose weighted sum walks every key in turn (the first
    /// kernel; on an H200, t5-base over 32 x 512 tokens spent 28 ms per layer there).
    Block,
    /// `attention_step`, the decoding kernel: a block per query, rows read coalesced.
    Step,
    /// Two batched cuBLAS products per sequence (scores = q·kᵀ for every head, then the
    /// weights times v) around `attention_softmax` (bias, mask, softmax), the scores of a
    /// chunk of sequences in GPU memory (at most [`ATTENTION_SCORES_BYTES`]).
    Gemm,
}

impl EncoderAttention {
    /// `T5RT_CUDA_ENCODER_ATTENTION`: `gemm` (the default), `step` or `block`.
    fn from_env() -> Self {
        match std::env::var("T5RT_CUDA_ENCODER_ATTENTION").as_deref() {
            Ok("step") => EncoderAttention::Step,
            Ok("block") => EncoderAttention::Block,
            _ => EncoderAttention::Gemm,
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(c: u8) -> Self {
        match c {
            0 => EncoderAttention::Block,
            1 => EncoderAttention::Step,
            _ => EncoderAttention::Gemm,
        }
    }
}

/// The most memory the encoder's attention scores take at once ([`EncoderAttention::Gemm`]):
/// sequences go through in chunks whose `heads x q_len x kv_len` f32 scores fit (at least
/// one sequence per chunk).
pub const ATTENTION_SCORES_BYTES: usize = 256 << 20;

/// Bytes the encoder's attention holds on the GPU at once for `sources` sequences of up to
/// `src_len` tokens ([`Backend::encoder_attention_bytes`]): the bias rows (`[heads, L, L]`)
/// and, at most, the scores of one chunk of sequences ([`EncoderAttention::Gemm`]: as many
/// sequences' `[heads, L, L]` as fit [`ATTENTION_SCORES_BYTES`], at least one; the other modes
/// keep their scores in shared memory). Counted as `min(sources, max(256 MiB, one sequence))`
/// worth of scores, which covers the chunk of every batch up to this shape and grows with it.
fn encoder_attention_bound(heads: usize, sources: usize, src_len: usize) -> u64 {
    let per_seq = (heads as u64)
        .saturating_mul(src_len as u64)
        .saturating_mul(src_len as u64)
        .saturating_mul(4);
    let scores = per_seq
        .saturating_mul(sources as u64)
        .min(per_seq.max(ATTENTION_SCORES_BYTES as u64));
    per_seq.saturating_add(scores)
}

/// Optional fusions of the `gemv` kernel: the sublayer's RMSNorm on the input as it is staged,
/// an activation on the output (`act`: activation's code, -1 none), and a gated feed-forward's
/// two products in one (`gated`: out0 = act(x · w0) * (x · w1)), and products 1 and 2 written
/// into caches of `cache` = (positions per row, position) instead of plain outputs.
#[derive(Clone, Copy)]
struct GemvFuse<'a> {
    norm: Option<(&'a CudaSlice<f32>, f32)>,
    act: i32,
    gated: bool,
    cache: Option<(usize, usize)>,
}

const NO_FUSION: GemvFuse<'static> = GemvFuse {
    norm: None,
    act: -1,
    gated: false,
    cache: None,
};

fn act_code(act: Activation) -> i32 {
    match act {
        Activation::Relu => 0,
        Activation::GeluNew => 1,
        Activation::Silu => 2,
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> T5Error {
    T5Error::Backend(format!("cuda: {what}: {e}"))
}

/// Compiles `kernels.cu` with NVRTC for `arch` (`compute_80`, `compute_90`, ...): the PTX.
pub fn compile_kernels(arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
    if !nvrtc_available() {
        return Err(T5Error::Backend(
            "cuda: libnvrtc cannot be loaded (install the CUDA toolkit's NVRTC, or PyPI's nvidia-cuda-nvrtc, and add its folder to LD_LIBRARY_PATH)".into(),
        ));
    }
    let opts = CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(KERNELS, opts).map_err(|e| match e {
        CompileError::CompileError { log, .. } => T5Error::Backend(format!(
            "cuda: NVRTC could not compile the kernels for {arch}:\n{}",
            log.to_string_lossy()
        )),
        other => err("NVRTC", other),
    })
}

/// Whether a library can be loaded, without the panics cudarc raises when it cannot.
fn probe(f: impl FnOnce() -> bool + std::panic::UnwindSafe) -> bool {
    std::panic::catch_unwind(f).unwrap_or(false)
}

/// Whether libnvrtc can be loaded here.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to open the library.
    probe(|| unsafe { cudarc::nvrtc::sys::is_culib_present() })
}

/// Whether the CUDA driver library can be loaded here.
pub fn driver_available() -> bool {
    // SAFETY: as above.
    probe(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

/// A linear weight on the GPU, row-major `[n, k]` as in the checkpoint.
pub struct CudaWeight {
    pub n: usize,
    pub k: usize,
    data: WeightData,
}

enum WeightData {
    F32(CudaSlice<f32>),
    /// bf16 or f16 bit patterns.
    Half(CudaSlice<u16>, WeightDtype),
}

impl CudaWeight {
    /// `gemv`'s `kind` argument for these weights: 0 f32, 1 bf16, 2 f16.
    fn gemv_kind(&self) -> i32 {
        match &self.data {
            WeightData::F32(_) => 0,
            WeightData::Half(_, WeightDtype::F16) => 2,
            WeightData::Half(..) => 1,
        }
    }
}

/// Dynamic shared memory a kernel may ask for: 48 KB (the limit without an opt-in) less what
/// the kernels declare statically (at most about 170 bytes: the chained kernels hold both
/// roles' arrays; a launch over the sum fails with
/// "invalid argument", as 4 x 3072-value rows did on an H200 when `gemv` gained its 32 bytes).
pub const DYNAMIC_SHARED_MAX: usize = 48 * 1024 - 256;

/// Whether a product goes through the `gemv` kernel: up to `GEMV_ROWS` (8) rows, `k` a multiple
/// of 8, and the rows within [`DYNAMIC_SHARED_MAX`] of shared memory.
pub fn gemv_fits(d: MatDims) -> bool {
    d.m <= GEMV_ROWS && d.k.is_multiple_of(8) && d.m * d.k * 4 <= DYNAMIC_SHARED_MAX
}

/// Whether products of one input can share a `gemv` launch: a non-empty shape that
/// [`gemv_fits`], every weight of the product's shape and of one kind.
fn gemv_fits_all(ws: &[&CudaWeight], d: MatDims) -> bool {
    d.m > 0
        && d.n > 0
        && gemv_fits(d)
        && ws
            .iter()
            .all(|w| (w.n, w.k) == (d.n, d.k) && w.gemv_kind() == ws[0].gemv_kind())
}

/// A GPU, its stream, cuBLAS and the compiled kernels.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: Mutex<Blas>,
    kernels: HashMap<&'static str, CudaFunction>,
    dtype: WeightDtype,
    name: String,
    /// Decoding steps captured as CUDA graphs and replayed (see [`Backend::begin_step`]).
    steps: Mutex<graphs::StepGraphs>,
    /// Set while a decoding step is being captured: the step's position and token ids are
    /// then read from the device (`StepGraphs::args`), not passed as launch arguments.
    capturing: AtomicBool,
    /// With `T5RT_CUDA_PROFILE=1`: GPU time per operation (calls, seconds), each operation
    /// synchronized before and after (slow; graphs off). For finding where a step goes.
    profile: Option<Mutex<HashMap<String, (u64, f64)>>>,
    /// How attention over several queries per sequence (the encoder) runs
    /// ([`EncoderAttention`]'s code; `T5RT_CUDA_ENCODER_ATTENTION`, see
    /// [`CudaBackend::set_encoder_attention`]).
    encoder_attention: AtomicU8,
    /// Whether decoding's sublayers fuse their RMSNorm (and the feed-forward its activation)
    /// into the `gemv` products (on; `T5RT_CUDA_FUSED_GEMV=0` turns it off, see
    /// [`CudaBackend::set_fused_gemv`]).
    fused_gemv: AtomicBool,
    /// Warps (output columns) per block of `gemv`: 8, or `T5RT_CUDA_GEMV_WARPS` (1 to 8).
    /// t5-base's 768-column products fill only 96 blocks at 8, fewer than an H100/H200 has
    /// multiprocessors (132), but 2 per block was 1.3x-1.9x slower on an H200 (2026-11-27).
    gemv_warps: usize,
    /// Whether [`Backend::matmul_nt_shared`] runs up to three decoding products (q, k and v)
    /// as one `gemv` launch (on; `T5RT_CUDA_SHARED_GEMV=0` turns it off: see
    /// [`CudaBackend::set_shared_gemv`]).
    shared_gemv: AtomicBool,
    /// Whether `gemv` and `attention_step` go out as programmatic dependent launches (sm_90
    /// and later; `T5RT_CUDA_PDL=0` turns it off, see [`CudaBackend::set_pdl`]).
    pdl: AtomicBool,
    /// Whether a decoding sublayer's attention and output projection run as one
    /// `attention_o` launch ([`Backend::attention_out`]; `T5RT_CUDA_CHAIN=1`, see
    /// [`CudaBackend::set_chain`]). Off until it has run on a GPU.
    chain: AtomicBool,
    /// `attention_o`'s counters (tickets, attention blocks done, product blocks done), zero
    /// between launches.
    chain_sync: CudaSlice<u32>,
    /// Chained launches so far of `attention_o`, `gemv_gemv` and `gemv_attention_o`, for tests
    /// and the step report.
    chained: [std::sync::atomic::AtomicU64; 3],
}

/// cuBLAS, with what its products need in place: a workspace of its own (so that nothing is
/// allocated while a step is captured) and the half-precision copy of the activations,
/// reused from product to product (grown when a larger product comes).
struct Blas {
    handle: CudaBlas,
    _workspace: CudaSlice<u8>,
    half: Option<CudaSlice<u16>>,
}

/// cuBLAS's workspace: 32 MiB, what NVIDIA recommends for Hopper.
const BLAS_WORKSPACE: usize = 32 << 20;

/// Threads per block of the elementwise kernels.
const THREADS: u32 = 256;

/// The chained kernels ([`CudaBackend::set_chain`]), as [`CudaBackend::chained_launches`]
/// counts them.
const CHAINED: [&str; 3] = ["attention_o", "gemv_gemv", "gemv_attention_o"];

/// Threads per block of `attention_step` (its `STEP_THREADS`).
const STEP_THREADS: usize = 256;

/// Rows up to which products go through the `gemv` kernel (its `GEMV_ROWS`), not cuBLAS.
const GEMV_ROWS: usize = 8;

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(THREADS).max(1), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A null pointer for a kernel's optional buffer argument.
static NULL: u64 = 0;

/// Pushes buffer `t`, or a null pointer when there is none (the kernels' optional arguments).
fn arg_or_null<'a, T>(b: &mut cudarc::driver::LaunchArgs<'a>, t: Option<&'a CudaSlice<T>>) {
    match t {
        Some(t) => b.arg(t),
        None => b.arg(&NULL),
    };
}

/// Pushes the arguments both attention kernels start with: q, k, v, the optional bias and
/// mask, out, then the shape's ints (`a`).
#[allow(clippy::too_many_arguments)]
fn attention_args<'a>(
    b: &mut cudarc::driver::LaunchArgs<'a>,
    q: &'a CudaSlice<f32>,
    k: &'a CudaSlice<f32>,
    v: &'a CudaSlice<f32>,
    bias: Option<&'a CudaSlice<f32>>,
    mask: Option<&'a CudaSlice<f32>>,
    out: &'a mut CudaSlice<f32>,
    a: &'a [i32],
) {
    b.arg(q).arg(k).arg(v);
    arg_or_null(b, bias);
    arg_or_null(b, mask);
    b.arg(out);
    for v in a {
        b.arg(v);
    }
}

/// Parameters of a kernel launched by [`CudaBackend::launch_ex`], in the kernel's order: 8
/// bytes each, a device pointer, or a 4-byte int or float in the low bytes (the driver copies
/// each parameter's own size from its address; little-endian, as every CUDA host is).
#[derive(Default)]
struct Params(Vec<u64>);

impl Params {
    fn buf<T>(&mut self, t: &CudaSlice<T>, stream: &CudaStream) -> &mut Self {
        let (ptr, _guard) = t.device_ptr(stream);
        self.0.push(ptr);
        self
    }

    /// A buffer, or a null pointer.
    fn opt<T>(&mut self, t: Option<&CudaSlice<T>>, stream: &CudaStream) -> &mut Self {
        match t {
            Some(t) => self.buf(t, stream),
            None => {
                self.0.push(0);
                self
            }
        }
    }

    /// A weight's device buffer (f32 or half).
    fn weight(&mut self, w: &CudaWeight, stream: &CudaStream) -> &mut Self {
        match &w.data {
            WeightData::F32(t) => self.buf(t, stream),
            WeightData::Half(t, _) => self.buf(t, stream),
        }
    }

    fn int(&mut self, v: i32) -> &mut Self {
        self.0.push(v as u32 as u64);
        self
    }

    fn float(&mut self, v: f32) -> &mut Self {
        self.0.push(v.to_bits() as u64);
        self
    }
}

/// The row length of an attention call's bias, for the kernels, which read rows
/// ([`BiasLayout::Rows`]; this backend uploads no lines, `Backend::upload_position_bias`).
fn bias_stride(s: &AttnShape) -> Result<i32> {
    match s.bias {
        BiasLayout::Rows { stride } => i32_of("attention bias stride", stride),
        BiasLayout::Lines => Err(T5Error::Backend(
            "CUDA attention reads position bias rows, not lines".into(),
        )),
    }
}

fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| T5Error::Backend(format!("cuda: {what} {v} is past 2^31")))
}

impl CudaBackend {
    /// Opens GPU `ordinal` and prepares the kernels for weights of `dtype` (f32, bf16 or
    /// f16; int8 is a CPU precision). Every failure is an error that says what is missing:
    /// no driver library, no such GPU, NVRTC or cuBLAS absent.
    pub fn new(ordinal: usize, dtype: WeightDtype) -> Result<Self> {
        if dtype == WeightDtype::Int8 {
            return Err(T5Error::Backend(
                "int8 weights run on the CPU only for now; on CUDA use f32, bf16 or f16".into(),
            ));
        }
        if !driver_available() {
            return Err(T5Error::Backend(
                "cuda: the NVIDIA driver library (libcuda.so) cannot be loaded: no NVIDIA driver on this machine"
                    .into(),
            ));
        }
        let count = probe(|| CudaContext::device_count().is_ok());
        let count = if count {
            CudaContext::device_count().map_err(|e| err("counting GPUs", e))? as usize
        } else {
            0
        };
        if ordinal >= count {
            return Err(T5Error::Backend(format!(
                "cuda:{ordinal}: this machine has {count} GPU(s) (cuda:0 to cuda:{})",
                count.saturating_sub(1)
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| err("opening the GPU", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| err("compute capability", e))?;
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let ptx = compile_kernels(arch)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| err("loading the kernels (is the driver older than NVRTC?)", e))?;
        let mut kernels = HashMap::new();
        for name in KERNEL_NAMES {
            let f = module
                .load_function(name)
                .map_err(|e| err(&format!("kernel {name}"), e))?;
            kernels.insert(name, f);
        }
        // One stream of our own (a graph cannot be captured on the legacy default stream),
        // with cudarc's cross-stream event tracking off: everything runs on this one stream.
        // SAFETY: no slice of this context is used on another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| err("creating a stream", e))?;
        if !probe(|| unsafe { cudarc::cublas::sys::is_culib_present() }) {
            return Err(T5Error::Backend(
                "cuda: libcublas cannot be loaded (install the CUDA toolkit's cuBLAS)".into(),
            ));
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| err("cuBLAS", e))?;
        // SAFETY: a valid handle; default math keeps TF32 off for f32 products.
        unsafe {
            blas_sys::cublasSetMathMode(*blas.handle(), blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
        }
        .result()
        .map_err(|e| err("cuBLAS math mode", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE)
            .map_err(|e| err("allocating cuBLAS's workspace", e))?;
        {
            let (wp, _g) = workspace.device_ptr(&stream);
            // SAFETY: a valid handle and a live buffer of that size, kept beside the handle.
            unsafe {
                blas_sys::cublasSetWorkspace_v2(*blas.handle(), wp as *mut _, BLAS_WORKSPACE)
            }
            .result()
            .map_err(|e| err("cuBLAS workspace", e))?;
        }
        let chain_sync = stream
            .alloc_zeros::<u32>(4)
            .map_err(|e| err("allocating the chained kernels' counters", e))?;
        let gpu = ctx.name().unwrap_or_else(|_| "GPU".into());
        let profile = std::env::var("T5RT_CUDA_PROFILE").is_ok_and(|v| v == "1");
        Ok(CudaBackend {
            name: format!("cuda:{ordinal} ({gpu}, sm_{major}{minor}, {dtype})"),
            ctx,
            stream,
            blas: Mutex::new(Blas {
                handle: blas,
                _workspace: workspace,
                half: None,
            }),
            kernels,
            dtype,
            steps: Mutex::new(graphs::StepGraphs::new(
                std::env::var("T5RT_CUDA_GRAPHS").map_or(true, |v| v != "0") && !profile,
            )),
            capturing: AtomicBool::new(false),
            profile: profile.then(|| Mutex::new(HashMap::new())),
            encoder_attention: AtomicU8::new(EncoderAttention::from_env().code()),
            fused_gemv: AtomicBool::new(
                std::env::var("T5RT_CUDA_FUSED_GEMV").map_or(true, |v| v != "0"),
            ),
            shared_gemv: AtomicBool::new(
                std::env::var("T5RT_CUDA_SHARED_GEMV").map_or(true, |v| v != "0"),
            ),
            pdl: AtomicBool::new(
                major >= 9 && std::env::var("T5RT_CUDA_PDL").map_or(true, |v| v != "0"),
            ),
            chain: AtomicBool::new(std::env::var("T5RT_CUDA_CHAIN").is_ok_and(|v| v == "1")),
            chain_sync,
            chained: Default::default(),
            gemv_warps: std::env::var("T5RT_CUDA_GEMV_WARPS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|w| (1..=8).contains(w))
                .unwrap_or(8),
        })
    }

    /// Free and total memory of the GPU, bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.bind()?;
        cudarc::driver::result::mem_get_info().map_err(|e| err("memory info", e))
    }

    /// How decoding steps have run so far (graphs captured, replayed; steps run uncaptured).
    pub fn graph_stats(&self) -> GraphStats {
        self.lock_steps().stats
    }

    /// Turns the capture of decoding steps as CUDA graphs on or off (on by default; the
    /// environment variable `T5RT_CUDA_GRAPHS=0` starts it off).
    pub fn set_graphs(&self, on: bool) {
        let mut st = self.lock_steps();
        st.enabled = on;
        st.forget();
    }

    /// How the encoder's attention (several queries per sequence) runs: see
    /// [`EncoderAttention`] (default [`EncoderAttention::Gemm`], or the environment's
    /// `T5RT_CUDA_ENCODER_ATTENTION`). Decoding's one-query attention is not affected.
    pub fn set_encoder_attention(&self, mode: EncoderAttention) {
        self.encoder_attention.store(mode.code(), Ordering::Relaxed);
    }

    /// The encoder's attention mode now in use.
    pub fn encoder_attention(&self) -> EncoderAttention {
        EncoderAttention::from_code(self.encoder_attention.load(Ordering::Relaxed))
    }

    /// Turns programmatic dependent launches on or off (on by default on sm_90 and later,
    /// unless `T5RT_CUDA_PDL=0`; never on older GPUs): `gemv` and `attention_step` may then
    /// start while the kernel before them finishes (`gemv` reads its first weights before it
    /// waits), which hides most of a launch's start in decoding's chain of small kernels.
    pub fn set_pdl(&self, on: bool) {
        let cc9 = self
            .ctx
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 9);
        self.pdl.store(on && cc9, Ordering::Relaxed);
    }

    /// Runs each sublayer of a decoding step as one launch: an attention sublayer's norm and
    /// input products, attention and output product (`gemv_attention_o`; each role's blocks
    /// start when a counter says the role before is done), or where that does not fit, its
    /// attention and output product (`attention_o`); a feed-forward's two products
    /// (`gemv_gemv`). t5-base's step goes from 8 launches per layer to 3. The results are the
    /// separate kernels' bit for bit. Off by default (`T5RT_CUDA_CHAIN=1` starts it on) until it
    /// has run on a GPU (scripts/gpu-check.sh tests it).
    pub fn set_chain(&self, on: bool) {
        self.chain.store(on, Ordering::Relaxed);
        // Steps recorded with the other setting are recorded again.
        self.lock_steps().forget();
    }

    /// How many chained launches ([`CudaBackend::set_chain`]) have gone out, of
    /// `attention_o`, `gemv_gemv` and `gemv_attention_o` (a recorded step's once, when it is
    /// recorded).
    pub fn chained_launches(&self) -> [u64; 3] {
        std::array::from_fn(|i| self.chained[i].load(Ordering::Relaxed))
    }

    /// Turns the `gemv` fusions of decoding on or off: the RMSNorm before q/k/v, cross q and
    /// the feed-forward computed as the products stage their input, and the feed-forward's
    /// activation (gated: both input products) in its product's epilogue. Saves 3 to 4
    /// launches per decoder layer. On by default (`T5RT_CUDA_FUSED_GEMV=0` starts it off).
    pub fn set_fused_gemv(&self, on: bool) {
        self.fused_gemv.store(on, Ordering::Relaxed);
    }

    /// Whether these products can go through one fused `gemv` launch each (fusions on and
    /// [`gemv_fits_all`]).
    fn fused_gemv_fits(&self, ws: &[&CudaWeight], d: MatDims) -> bool {
        self.fused_gemv.load(Ordering::Relaxed) && gemv_fits_all(ws, d)
    }

    /// Runs up to three decoding products of one input (q, k and v; a gated feed-forward's
    /// two input products; the cross-attention keys and values) as one `gemv` launch, a grid
    /// row per product, instead of one launch each. Each output is computed exactly as alone
    /// (the same kernel, the same order of sums). On by default: on an H200 (2026-11-27) it
    /// took t5-base's batch-1 decoding step from 0.70 to 0.61 ms (bf16) and 0.84 to 0.73 ms
    /// (f32). With it on, a decoding step's keys and values also go straight into the caches.
    pub fn set_shared_gemv(&self, on: bool) {
        self.shared_gemv.store(on, Ordering::Relaxed);
    }

    /// `outs[i] (+)= x · ws[i]ᵀ` through the `gemv` kernel (the caller checked [`gemv_fits`]
    /// and the shapes; one to three products of one kind, a grid row each): a warp per
    /// column, `gemv_warps` columns per block (each block stages x). Slots past the last
    /// product repeat it (grid y never reaches them).
    /// With `fuse.gated`, `ws` = [gate, up] and `outs` = [out]: one product row.
    fn gemv(
        &self,
        x: &CudaSlice<f32>,
        ws: &[&CudaWeight],
        outs: &[&CudaSlice<f32>],
        d: MatDims,
        accumulate: bool,
        fuse: GemvFuse<'_>,
    ) -> Result<()> {
        debug_assert!(
            (1..=3).contains(&ws.len())
                && (ws.len() == outs.len() || (fuse.gated && ws.len() == 2 && outs.len() == 1))
        );
        let (m, n, k) = (i32_of("m", d.m)?, i32_of("n", d.n)?, i32_of("k", d.k)?);
        let warps = self.gemv_warps;
        let rows = if fuse.gated { 1 } else { ws.len() as u32 };
        let cfg = LaunchConfig {
            grid_dim: (d.n.div_ceil(warps) as u32, rows, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: (d.m * d.k * 4) as u32,
        };
        let (kind, acc) = (ws[0].gemv_kind(), accumulate as i32);
        let st = &self.stream;
        let mut p = Params::default();
        p.buf(x, st);
        for i in 0..3 {
            p.weight(ws[i.min(ws.len() - 1)], st);
        }
        for i in 0..3 {
            p.buf(outs[i.min(outs.len() - 1)], st);
        }
        p.int(m).int(n).int(k).int(kind).int(acc);
        let (norm, eps) = match fuse.norm {
            Some((w, eps)) => (Some(w), eps),
            None => (None, 0.0f32),
        };
        p.opt(norm, st)
            .float(eps)
            .int(fuse.act)
            .int(fuse.gated as i32);
        let (rows, pos) = fuse.cache.unwrap_or((0, 0));
        p.int(i32_of("cache positions", rows)?);
        // A recorded step reads its position from the step's device arguments.
        let steps = (fuse.cache.is_some() && self.capturing()).then(|| self.lock_steps());
        p.opt(steps.as_ref().and_then(|s| s.args.as_ref()), st);
        p.int(i32_of("position", pos)?);
        self.launch_ex("gemv", cfg, &p)
    }

    /// Launches kernel `name` with `cuLaunchKernelEx`: as a programmatic dependent launch
    /// when that is on ([`CudaBackend::set_pdl`]; the kernel waits in `PDL_WAIT()` for the
    /// one before it), else as a plain launch.
    fn launch_ex(&self, name: &'static str, cfg: LaunchConfig, p: &Params) -> Result<()> {
        use cudarc::driver::sys;
        let mut ptrs: Vec<*mut std::ffi::c_void> =
            p.0.iter()
                .map(|v| v as *const u64 as *mut std::ffi::c_void)
                .collect();
        // SAFETY: all zeros is a valid value of this C union.
        let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let lc = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: self.pdl.load(Ordering::Relaxed) as u32,
        };
        self.bind()?;
        self.timed(
            || name.to_string(),
            // SAFETY: each caller pushes the parameters its kernel declares, in order, for
            // buffers it checked against the shapes; `ptrs` and `attr` outlive the call.
            || {
                unsafe {
                    sys::cuLaunchKernelEx(
                        &lc,
                        self.f(name).cu_function(),
                        ptrs.as_mut_ptr(),
                        std::ptr::null_mut(),
                    )
                }
                .result()
                .map_err(|e| err(name, e))
            },
        )
    }

    /// The device's current memory pool, which cudarc's stream-ordered allocations draw from.
    fn memory_pool(&self) -> Option<cudarc::driver::sys::CUmemoryPool> {
        self.bind().ok()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: a valid device of this context; the pool handle is written on success.
        unsafe { cudarc::driver::sys::cuDeviceGetMemPool(&mut pool, self.ctx.cu_device()) }
            .result()
            .ok()?;
        (!pool.is_null()).then_some(pool)
    }

    fn lock_steps(&self) -> std::sync::MutexGuard<'_, graphs::StepGraphs> {
        self.steps.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn capturing(&self) -> bool {
        self.capturing.load(Ordering::Relaxed)
    }

    /// Makes this GPU current on the calling thread (the engine's workers are other threads).
    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| err("binding the GPU", e))
    }

    fn f(&self, name: &str) -> &CudaFunction {
        &self.kernels[name]
    }

    fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(len.max(1))
            .map_err(|e| err(&format!("allocating {len} values (out of GPU memory?)"), e))
    }

    fn launch(
        &self,
        b: &mut cudarc::driver::LaunchArgs<'_>,
        cfg: LaunchConfig,
        what: &str,
    ) -> Result<()> {
        // SAFETY: each caller passes the arguments its kernel declares, in order, with
        // buffers it checked against the shapes.
        self.timed(
            || what.to_string(),
            || {
                unsafe { b.launch(cfg) }.map_err(|e| err(what, e))?;
                Ok(())
            },
        )
    }

    /// Runs `f`, and with profiling on, adds its GPU time to operation `what`.
    fn timed<R>(&self, what: impl FnOnce() -> String, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let Some(profile) = &self.profile else {
            return f();
        };
        let sync = || self.stream.synchronize().map_err(|e| err("profiling", e));
        sync()?;
        let t0 = std::time::Instant::now();
        let r = f()?;
        sync()?;
        let dt = t0.elapsed().as_secs_f64();
        let mut p = profile.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry(what()).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += dt;
        Ok(r)
    }

    /// `x` (first `n` values) as bf16 or f16 bits in `half` (grown to `n` values when
    /// shorter), for a half-precision product.
    fn to_half<'h>(
        &self,
        half: &'h mut Option<CudaSlice<u16>>,
        x: &CudaSlice<f32>,
        n: usize,
        dtype: WeightDtype,
    ) -> Result<&'h mut CudaSlice<u16>> {
        if half.as_ref().is_none_or(|h| h.len() < n) {
            if self.capturing() {
                // Freeing the old buffer inside a capture would fail; the step runs uncaptured.
                return Err(T5Error::Backend(
                    "cuda: half-precision scratch would grow during graph capture".into(),
                ));
            }
            // Graphs captured earlier read the old buffer: they go with it.
            self.lock_steps().forget();
            *half = None;
            // SAFETY: every value a product reads is written by the conversion below first.
            let fresh = unsafe { self.stream.alloc::<u16>(n.max(1)) }
                .map_err(|e| err("allocating half activations (out of GPU memory?)", e))?;
            *half = Some(fresh);
        }
        let out = half.as_mut().expect("allocated above");
        let kernel = if dtype == WeightDtype::F16 {
            "to_f16"
        } else {
            "to_bf16"
        };
        let n32 = i32_of("length", n)?;
        let mut b = self.stream.launch_builder(self.f(kernel));
        b.arg(x).arg(&mut *out).arg(&n32);
        self.launch(&mut b, grid(n), kernel)?;
        drop(b);
        Ok(out)
    }

    /// Rows `[start, start + len)` of each of `rows` rows of `src`, zero-padded to `new_len`.
    fn copy_rows(
        &self,
        src: &CudaSlice<f32>,
        rows: usize,
        src_len: usize,
        start: usize,
        len: usize,
        new_len: usize,
    ) -> Result<CudaSlice<f32>> {
        check_len("copy_rows", src.len(), rows * src_len)?;
        let mut out = self.alloc(rows * new_len)?;
        let (r, sl) = (i32_of("rows", rows)?, i32_of("row length", src_len)?);
        let (st, l, nl) = (
            i32_of("start", start)?,
            i32_of("length", len)?,
            i32_of("length", new_len)?,
        );
        let mut b = self.stream.launch_builder(self.f("copy_rows"));
        b.arg(src)
            .arg(&mut out)
            .arg(&r)
            .arg(&sl)
            .arg(&st)
            .arg(&l)
            .arg(&nl);
        self.launch(&mut b, grid(rows * new_len), "copy_rows")?;
        Ok(out)
    }

    /// Attention (see [`Backend::attention`]); `step`: a recorded decoding step's
    /// self-attention, whose length is read on the device (kv_len = position + 1).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        mask: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        s: AttnShape,
        step: bool,
    ) -> Result<()> {
        s.check(
            q.len(),
            out.len(),
            (k.len(), v.len()),
            bias.map(CudaSlice::len),
            mask.map(CudaSlice::len),
        )?;
        let blocks = s.batch * s.heads * s.q_len;
        if blocks == 0 {
            return Ok(());
        }
        let kv_bf16 = match s.kv {
            KvFormat::F32 => 0i32,
            KvFormat::Bf16 => 1,
            KvFormat::Int8 => {
                return Err(T5Error::Backend(
                    "cuda attention over int8 keys/values: not supported (use bf16)".into(),
                ))
            }
        };
        let a: Vec<i32> = [
            s.batch,
            s.heads,
            s.d_kv,
            s.q_len,
            s.kv_len,
            s.kv_stride,
            s.kv_group,
        ]
        .iter()
        .map(|&v| i32_of("attention shape", v))
        .collect::<Result<_>>()?;
        let bias_stride = bias_stride(&s)?;
        let mode = self.encoder_attention();
        if s.q_len > 1 && !step && mode == EncoderAttention::Gemm && kv_bf16 == 0 {
            return self.attend_gemm(q, k, v, bias, mask, out, s);
        }
        // One query per sequence: `attention_step`, when it takes the call.
        if let Some((cfg, p)) = self.step_kernel(q, k, v, bias, mask, out, s, step)? {
            return self.launch_ex("attention_step", cfg, &p);
        }
        if step {
            return Err(T5Error::Backend(
                "cuda: this self-attention cannot be recorded (head width or cache length)".into(),
            ));
        }
        // Scores of one (sequence, head, query) in shared memory.
        let shared = s.kv_len * 4;
        if shared > DYNAMIC_SHARED_MAX {
            return Err(T5Error::Backend(format!(
                "cuda attention over {} keys: at most {} for now",
                s.kv_len,
                DYNAMIC_SHARED_MAX / 4
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: (i32_of("blocks", blocks)? as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let mut b = self.stream.launch_builder(self.f("attention"));
        attention_args(&mut b, q, k, v, bias, mask, out, &a);
        b.arg(&kv_bf16);
        b.arg(&bias_stride);
        self.launch(&mut b, cfg, "attention")
    }

    /// `attention_step`'s launch for this call, when the call suits it: its queries run here
    /// (one per sequence, or the `step` encoder mode), the head width fits the kernel's layout
    /// (16-byte pieces of 4 f32 / 8 bf16 values splitting a block's threads evenly: d_kv 8,
    /// 16, 32, 64 or 128), f32 or bf16 keys and values, and its shared memory within
    /// [`DYNAMIC_SHARED_MAX`]. The launch's shape and parameters, in the kernel's order (the
    /// caller checked the buffers against `s`).
    #[allow(clippy::too_many_arguments)]
    fn step_kernel(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        mask: Option<&CudaSlice<f32>>,
        out: &CudaSlice<f32>,
        s: AttnShape,
        step: bool,
    ) -> Result<Option<(LaunchConfig, Params)>> {
        let kv_bf16 = match s.kv {
            KvFormat::F32 => 0i32,
            KvFormat::Bf16 => 1,
            KvFormat::Int8 => return Ok(None),
        };
        let per = if kv_bf16 == 1 { 8 } else { 4 };
        let fits = s.d_kv.is_multiple_of(8) && (s.d_kv / 4).is_power_of_two() && s.d_kv <= 128;
        let queries_here = s.q_len == 1 || self.encoder_attention() == EncoderAttention::Step;
        // A recorded step's self-attention holds room for every position of the cache.
        let kv_cap = if step { s.kv_stride } else { s.kv_len };
        let shared = (kv_cap.div_ceil(4) * 4 + s.d_kv + STEP_THREADS * per) * 4;
        let blocks = s.batch * s.heads * s.q_len;
        if !queries_here || !fits || shared > DYNAMIC_SHARED_MAX || blocks == 0 {
            return Ok(None);
        }
        let steps = step.then(|| self.lock_steps());
        let args = steps.as_ref().and_then(|st| st.args.as_ref());
        let cfg = LaunchConfig {
            grid_dim: (i32_of("blocks", blocks)? as u32, 1, 1),
            block_dim: (STEP_THREADS as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let st = &self.stream;
        let mut p = Params::default();
        p.buf(q, st)
            .buf(k, st)
            .buf(v, st)
            .opt(bias, st)
            .opt(mask, st)
            .buf(out, st);
        for x in [
            s.batch,
            s.heads,
            s.d_kv,
            s.q_len,
            s.kv_len,
            s.kv_stride,
            s.kv_group,
        ] {
            p.int(i32_of("attention shape", x)?);
        }
        p.int(kv_bf16)
            .int(bias_stride(&s)?)
            .int(i32_of("attention keys", kv_cap)?)
            .opt(args, st);
        Ok(Some((cfg, p)))
    }

    /// The chained kernels' last parameters for their output product `x += attn · oᵀ`: o,
    /// x, its `n` outputs, o's kind, the counters.
    fn output_product(
        &self,
        p: &mut Params,
        o: &CudaWeight,
        x: &CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        let st = &self.stream;
        p.weight(o, st)
            .buf(x, st)
            .int(i32_of("n", n)?)
            .int(o.gemv_kind())
            .buf(&self.chain_sync, st);
        Ok(())
    }

    /// Launches chained kernel `which` of [`CHAINED`] and counts it; true.
    fn launch_chained(&self, which: usize, cfg: LaunchConfig, p: &Params) -> Result<bool> {
        self.launch_ex(CHAINED[which], cfg, p)?;
        self.chained[which].fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// [`Backend::attention_out`] in one `attention_o` launch, when it can
    /// ([`CudaBackend::attention_o_part`], and the blocks' shared memory fits). Returns false
    /// (nothing launched) otherwise.
    fn chained_attention_out(
        &self,
        c: &AttnCall<'_, CudaSlice<f32>>,
        attn: &CudaSlice<f32>,
        o: &CudaWeight,
        x: &CudaSlice<f32>,
        d: MatDims,
    ) -> Result<bool> {
        if !self.chain.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let Some((attn_cfg, mut p)) = self.attention_o_part(c, attn, o, x, d)? else {
            return Ok(false);
        };
        let shared = (attn_cfg.shared_mem_bytes as usize).max(d.m * d.k * 4);
        if shared > DYNAMIC_SHARED_MAX {
            return Ok(false);
        }
        let attn_blocks = attn_cfg.grid_dim.0;
        let gemv_blocks = d.n.div_ceil(self.gemv_warps) as u32;
        let cfg = LaunchConfig {
            grid_dim: (attn_blocks + gemv_blocks, 1, 1),
            block_dim: (STEP_THREADS as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        self.output_product(&mut p, o, x, d.n)?;
        self.launch_chained(0, cfg, &p)
    }

    /// What `attention_o` and `gemv_attention_o` share: whether a one-query attention `a`
    /// followed by `x += attn · oᵀ` (`d`) can run as their attention and output-product
    /// blocks (`attention_step` takes the attention, `gemv` at 8 columns per block the
    /// product, rows and inputs agree), the two operations' checks, and then
    /// `attention_step`'s launch shape and parameters ([`CudaBackend::step_kernel`]); None when
    /// it cannot.
    fn attention_o_part(
        &self,
        a: &AttnCall<'_, CudaSlice<f32>>,
        attn: &CudaSlice<f32>,
        o: &CudaWeight,
        x: &CudaSlice<f32>,
        d: MatDims,
    ) -> Result<Option<(LaunchConfig, Params)>> {
        let s = a.shape;
        let ok = s.q_len == 1
            && self.gemv_warps * 32 == STEP_THREADS
            && gemv_fits(d)
            && d.n > 0
            && d.m == s.batch
            && d.k == s.heads * s.d_kv;
        if !ok {
            return Ok(None);
        }
        s.check(
            a.q.len(),
            attn.len(),
            (a.k.len(), a.v.len()),
            a.bias.map(CudaSlice::len),
            a.mask.map(CudaSlice::len),
        )?;
        checks::matmul(attn.len(), x.len(), (o.n, o.k), d)?;
        let step = a.step && self.capturing();
        self.step_kernel(a.q, a.k, a.v, a.bias, a.mask, attn, s, step)
    }

    /// A whole attention sublayer of a decoding step in one `gemv_attention_o` launch, when it
    /// can: the input product(s) `ws` of `x` with the norm fused into `outs` (q; with three
    /// products also this position's keys and values into the caches, `cache` = (capacity,
    /// position)), the attention `a` (its q is `outs[0]`), and `x += attn · oᵀ`. Needs
    /// [`CudaBackend::attention_o_part`], the input products fused in one `gemv` launch, and
    /// the three roles' shared memory within the limit. Returns false (nothing
    /// launched) otherwise.
    #[allow(clippy::too_many_arguments)]
    fn chained_sublayer(
        &self,
        x: &CudaSlice<f32>,
        norm: (&CudaSlice<f32>, f32),
        ws: &[&CudaWeight],
        outs: [&CudaSlice<f32>; 3],
        cache: Option<(usize, usize)>,
        proj: MatDims,
        a: &AttnCall<'_, CudaSlice<f32>>,
        attn: &CudaSlice<f32>,
        o: &CudaWeight,
        out_proj: MatDims,
    ) -> Result<bool> {
        let ok = self.chain.load(Ordering::Relaxed)
            && (ws.len() == 1 || self.shared_gemv.load(Ordering::Relaxed))
            && self.fused_gemv_fits(ws, proj)
            && proj.n > 0
            && proj.m == a.shape.batch;
        if !ok {
            return Ok(false);
        }
        // The checks of the input products (the attention's and the output product's are
        // attention_o_part's).
        check_len("rms_norm w", norm.0.len(), proj.k)?;
        for w in ws {
            checks::matmul(x.len(), outs[0].len(), (w.n, w.k), proj)?;
        }
        if let Some((capacity, pos)) = cache {
            for c in [outs[1], outs[2]] {
                checks::write_position(proj.m * proj.n, c.len(), proj.m, proj.n, capacity, pos)?;
            }
        }
        let Some((attn_cfg, attn_p)) = self.attention_o_part(a, attn, o, x, out_proj)? else {
            return Ok(false);
        };
        let shared = (attn_cfg.shared_mem_bytes as usize)
            .max(proj.m * proj.k * 4)
            .max(out_proj.m * out_proj.k * 4);
        if shared > DYNAMIC_SHARED_MAX {
            return Ok(false);
        }
        let warps = self.gemv_warps;
        let blocks = proj.n.div_ceil(warps) * ws.len()
            + attn_cfg.grid_dim.0 as usize
            + out_proj.n.div_ceil(warps);
        let cfg = LaunchConfig {
            grid_dim: (i32_of("blocks", blocks)? as u32, 1, 1),
            block_dim: (STEP_THREADS as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let st = &self.stream;
        let mut p = Params::default();
        p.buf(x, st);
        for i in 0..3 {
            p.weight(ws[i.min(ws.len() - 1)], st);
        }
        for out in outs {
            p.buf(out, st);
        }
        p.int(i32_of("m", proj.m)?)
            .int(i32_of("n", proj.n)?)
            .int(i32_of("k", proj.k)?)
            .int(ws[0].gemv_kind())
            .buf(norm.0, st)
            .float(norm.1);
        let (rows, pos) = cache.unwrap_or((0, 0));
        p.int(i32_of("cache positions", rows)?);
        // A recorded step reads its position from the step's device arguments.
        {
            let steps = (cache.is_some() && self.capturing()).then(|| self.lock_steps());
            p.opt(steps.as_ref().and_then(|s| s.args.as_ref()), st);
        }
        p.int(i32_of("position", pos)?).int(ws.len() as i32);
        p.0.extend_from_slice(&attn_p.0);
        self.output_product(&mut p, o, x, out_proj.n)?;
        self.launch_chained(2, cfg, &p)
    }

    /// [`Backend::ffn_out`] in one `gemv_gemv` launch, when it can: both products go through
    /// `gemv` (the input one with the norm and activation fused), and the blocks' shared
    /// memory fits. Returns false (nothing launched) otherwise.
    fn chained_ffn_out(
        &self,
        c: &FfnCall<'_, CudaSlice<f32>, CudaWeight>,
        x: &CudaSlice<f32>,
        ff: &CudaSlice<f32>,
    ) -> Result<bool> {
        let (up, down) = (c.up, c.down);
        let ok = self.chain.load(Ordering::Relaxed)
            && (1..=2).contains(&c.ws.len())
            && self.fused_gemv_fits(c.ws, up)
            && gemv_fits(down)
            && up.n > 0
            && down.n > 0
            && (down.m, down.k, down.n) == (up.m, up.n, up.k);
        if !ok {
            return Ok(false);
        }
        // The checks of the two products this launch stands for.
        check_len("rms_norm w", c.norm.len(), up.k)?;
        for w in c.ws {
            checks::matmul(x.len(), ff.len(), (w.n, w.k), up)?;
        }
        checks::matmul(ff.len(), x.len(), (c.wo.n, c.wo.k), down)?;
        let shared = (up.m * up.k).max(down.m * down.k) * 4;
        if shared > DYNAMIC_SHARED_MAX {
            return Ok(false);
        }
        let warps = self.gemv_warps;
        let blocks = up.n.div_ceil(warps) + down.n.div_ceil(warps);
        let cfg = LaunchConfig {
            grid_dim: (i32_of("blocks", blocks)? as u32, 1, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let st = &self.stream;
        let mut p = Params::default();
        p.buf(x, st)
            .weight(c.ws[0], st)
            .weight(c.ws[c.ws.len() - 1], st);
        p.buf(ff, st)
            .int(i32_of("m", up.m)?)
            .int(i32_of("n", up.n)?)
            .int(i32_of("k", up.k)?)
            .int(c.ws[0].gemv_kind())
            .buf(c.norm, st)
            .float(c.eps)
            .int(act_code(c.act))
            .int((c.ws.len() == 2) as i32);
        p.weight(c.wo, st)
            .buf(x, st)
            .int(c.wo.gemv_kind())
            .buf(&self.chain_sync, st);
        self.launch_chained(1, cfg, &p)
    }

    /// [`EncoderAttention::Gemm`]: per chunk of sequences, the scores of every (sequence,
    /// head) as one batched product (`[kv_len, q_len]` column-major = q·kᵀ row-major, a head's
    /// q and k rows `inner` apart), `attention_softmax`, and the weighted values as a second
    /// batched product written straight into `out`'s `[q_len, inner]` rows. f32 throughout
    /// (cuBLAS's default math: no TF32). The caller checked the shapes (`AttnShape::check`)
    /// and that keys and values are f32.
    #[allow(clippy::too_many_arguments)]
    fn attend_gemm(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        mask: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        s: AttnShape,
    ) -> Result<()> {
        let inner = s.heads * s.d_kv;
        let per_seq = s.heads * s.q_len * s.kv_len;
        let chunk = (ATTENTION_SCORES_BYTES / (per_seq * 4).max(1)).clamp(1, s.batch);
        // SAFETY: every score a chunk reads is written by its first product.
        let mut scores = unsafe { self.stream.alloc::<f32>(chunk * per_seq) }
            .map_err(|e| err("allocating attention scores (out of GPU memory?)", e))?;
        let d_kv = i32_of("d_kv", s.d_kv)?;
        let (q_len, kv_len) = (i32_of("q_len", s.q_len)?, i32_of("kv_len", s.kv_len)?);
        let ld = i32_of("heads x d_kv", inner)?;
        let (one, zero) = (1.0f32, 0.0f32);
        let a: Vec<i32> = [s.batch, s.heads, s.q_len, s.kv_len, s.kv_group]
            .iter()
            .map(|&v| i32_of("attention shape", v))
            .collect::<Result<_>>()?;
        let bias_stride = bias_stride(&s)?;
        let (qp, _gq) = q.device_ptr(&self.stream);
        let (kp, _gk) = k.device_ptr(&self.stream);
        let (vp, _gv) = v.device_ptr(&self.stream);
        let (op, _go) = out.device_ptr(&self.stream);
        let f = |elements: usize| (elements * 4) as u64;
        for b0 in (0..s.batch).step_by(chunk) {
            let nb = chunk.min(s.batch - b0);
            // One product per (sequence, head) of the chunk, all in one batched call each:
            // pointer arrays [k, q, scores | v, scores, out], a (sequence, head) per entry.
            let count = nb * s.heads;
            let sp = scores.device_ptr(&self.stream).0;
            let mut ptrs = vec![0u64; 6 * count];
            for b in b0..b0 + nb {
                let kb = b / s.kv_group;
                for h in 0..s.heads {
                    let e = (b - b0) * s.heads + h;
                    let kv = f(kb * s.kv_stride * inner + h * s.d_kv);
                    let qo = f(b * s.q_len * inner + h * s.d_kv);
                    let sc = sp + f(e * s.q_len * s.kv_len);
                    for (slot, ptr) in [kp + kv, qp + qo, sc, vp + kv, sc, op + qo]
                        .into_iter()
                        .enumerate()
                    {
                        ptrs[slot * count + e] = ptr;
                    }
                }
            }
            let arrays = self
                .stream
                .clone_htod(&ptrs)
                .map_err(|e| err("uploading attention pointers", e))?;
            let (ap, _ga) = arrays.device_ptr(&self.stream);
            let arr = |slot: usize| (ap + (slot * count * 8) as u64) as *const *const f32;
            let n = i32_of("attention products", count)?;
            let guard = self.blas.lock().unwrap_or_else(|e| e.into_inner());
            let handle = *guard.handle.handle();
            // One batched product: C[e] = op(A[e]) · B[e] (column-major, α = 1, β = 0) for
            // the pointer arrays in slots (a, b, c).
            let batched = |what: &str, ta, m, nn, kk, (a, lda), (b, ldb), (c, ldc)| {
                self.timed(
                    || format!("attention {what} {}x{}x{}", s.q_len, s.kv_len, s.d_kv),
                    // SAFETY: every pointer lies inside its checked buffer (q, out: batch x
                    // q_len rows of `inner`; k, v: batch / kv_group x kv_stride rows;
                    // scores: chunk x per_seq); the arrays live until the call is queued and
                    // are freed in stream order after it.
                    || {
                        unsafe {
                            blas_sys::cublasSgemmBatched(
                                handle,
                                ta,
                                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                                m,
                                nn,
                                kk,
                                &one,
                                arr(a),
                                lda,
                                arr(b),
                                ldb,
                                &zero,
                                arr(c) as *const *mut f32,
                                ldc,
                                n,
                            )
                        }
                        .result()
                        .map_err(|e| err(&format!("attention {what} (sgemm)"), e))
                    },
                )
            };
            // scores, column-major [kv_len x q_len] = k · qᵀ (row-major q · kᵀ), per
            // (sequence, head)
            let t = blas_sys::cublasOperation_t::CUBLAS_OP_T;
            batched(
                "scores",
                t,
                kv_len,
                q_len,
                d_kv,
                (0, ld),
                (1, ld),
                (2, kv_len),
            )?;
            let rows = nb * s.heads * s.q_len;
            let first = i32_of("sequence", b0)?;
            let mut kb = self.stream.launch_builder(self.f("attention_softmax"));
            kb.arg(&mut scores);
            arg_or_null(&mut kb, bias);
            arg_or_null(&mut kb, mask);
            for x in &a {
                kb.arg(x);
            }
            kb.arg(&bias_stride).arg(&first);
            let cfg = LaunchConfig {
                grid_dim: (i32_of("rows", rows)? as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(&mut kb, cfg, "attention_softmax")?;
            drop(kb);
            // out rows, column-major [d_kv x q_len] = vᵀ · weightsᵀ, per (sequence, head)
            let nt = blas_sys::cublasOperation_t::CUBLAS_OP_N;
            batched(
                "values",
                nt,
                d_kv,
                q_len,
                kv_len,
                (3, ld),
                (4, kv_len),
                (5, ld),
            )?;
        }
        Ok(())
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<CudaSlice<u32>> {
        self.stream
            .clone_htod(ids)
            .map_err(|e| err("uploading ids", e))
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaSlice<f32>;
    type Weight = CudaWeight;

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let _ = self.bind();
        f()
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.bind()?;
        if data.is_empty() {
            return self.alloc(0);
        }
        self.stream
            .clone_htod(data)
            .map_err(|e| err("uploading (out of GPU memory?)", e))
    }

    fn download(&self, t: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>> {
        self.bind()?;
        check_len("download", t.len(), len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.stream
            .clone_dtoh(&t.slice(0..len))
            .map_err(|e| err("downloading", e))
    }

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.bind()?;
        self.alloc(len)
    }

    fn upload_linear(&self, w: &[f32], n: usize, k: usize) -> Result<CudaWeight> {
        self.bind()?;
        check_len("upload_linear", w.len(), n * k)?;
        let data = match self.dtype {
            WeightDtype::F32 => WeightData::F32(self.upload(&w[..n * k])?),
            WeightDtype::Bf16 | WeightDtype::F16 => {
                let bits: Vec<u16> = if self.dtype == WeightDtype::Bf16 {
                    w[..n * k]
                        .iter()
                        .map(|&v| half::bf16::from_f32(v).to_bits())
                        .collect()
                } else {
                    w[..n * k]
                        .iter()
                        .map(|&v| half::f16::from_f32(v).to_bits())
                        .collect()
                };
                let dev = self
                    .stream
                    .clone_htod(&bits)
                    .map_err(|e| err("uploading weights (out of GPU memory?)", e))?;
                WeightData::Half(dev, self.dtype)
            }
            WeightDtype::Int8 => unreachable!("refused in new"),
        };
        Ok(CudaWeight { n, k, data })
    }

    fn upload_output_linear(&self, w: &[f32], n: usize, k: usize) -> Result<CudaWeight> {
        if self.dtype == WeightDtype::F16 {
            // fp16's range (65504) is too small for the inputs of T5's FFN output projection.
            self.bind()?;
            check_len("upload_output_linear", w.len(), n * k)?;
            return Ok(CudaWeight {
                n,
                k,
                data: WeightData::F32(self.upload(&w[..n * k])?),
            });
        }
        self.upload_linear(w, n, k)
    }

    fn weight_dtype(&self) -> WeightDtype {
        self.dtype
    }

    fn device_memory(&self) -> Option<u64> {
        self.memory().ok().map(|(free, _)| free as u64)
    }

    fn encoder_attention_bytes(&self, heads: usize, sources: usize, src_len: usize) -> Option<u64> {
        Some(encoder_attention_bound(heads, sources, src_len))
    }

    fn matmul_nt_shared(
        &self,
        x: &CudaSlice<f32>,
        ws: &[&CudaWeight],
        outs: &mut [&mut CudaSlice<f32>],
        d: MatDims,
    ) -> Result<()> {
        checks::shared_products(ws.len(), outs.len())?;
        let one_launch = self.shared_gemv.load(Ordering::Relaxed)
            && (2..=3).contains(&ws.len())
            && gemv_fits_all(ws, d);
        if !one_launch {
            return matmul_nt_each(self, x, ws, outs, d);
        }
        for (w, out) in ws.iter().zip(outs.iter()) {
            checks::matmul(x.len(), out.len(), (w.n, w.k), d)?;
        }
        let os: Vec<&CudaSlice<f32>> = outs.iter().map(|o| &**o).collect();
        self.gemv(x, ws, &os, d, false, NO_FUSION)
    }

    fn norm_matmul_shared(
        &self,
        x: &CudaSlice<f32>,
        norm: &CudaSlice<f32>,
        eps: f32,
        normed: &mut CudaSlice<f32>,
        ws: &[&CudaWeight],
        outs: &mut [&mut CudaSlice<f32>],
        d: MatDims,
    ) -> Result<()> {
        checks::shared_products(ws.len(), outs.len())?;
        if !(self.fused_gemv_fits(ws, d) && ws.len() <= 3) {
            return norm_then_products(self, x, norm, eps, normed, ws, outs, d);
        }
        check_len("rms_norm w", norm.len(), d.k)?;
        for (w, out) in ws.iter().zip(outs.iter()) {
            checks::matmul(x.len(), out.len(), (w.n, w.k), d)?;
        }
        let fuse = GemvFuse {
            norm: Some((norm, eps)),
            ..NO_FUSION
        };
        let os: Vec<&CudaSlice<f32>> = outs.iter().map(|o| &**o).collect();
        if ws.len() == 1 || self.shared_gemv.load(Ordering::Relaxed) {
            return self.gemv(x, ws, &os, d, false, fuse);
        }
        for (w, o) in ws.iter().zip(&os) {
            self.gemv(x, &[w], &[o], d, false, fuse)?;
        }
        Ok(())
    }

    fn norm_ffn_up(
        &self,
        x: &CudaSlice<f32>,
        norm: &CudaSlice<f32>,
        eps: f32,
        normed: &mut CudaSlice<f32>,
        ws: &[&CudaWeight],
        ff: &mut CudaSlice<f32>,
        ff_up: &mut CudaSlice<f32>,
        act: Activation,
        d: MatDims,
    ) -> Result<()> {
        if !((1..=2).contains(&ws.len()) && self.fused_gemv_fits(ws, d)) {
            return norm_then_ffn_up(self, x, norm, eps, normed, ws, ff, ff_up, act, d);
        }
        check_len("rms_norm w", norm.len(), d.k)?;
        for w in ws {
            checks::matmul(x.len(), ff.len(), (w.n, w.k), d)?;
        }
        let fuse = GemvFuse {
            norm: Some((norm, eps)),
            act: act_code(act),
            gated: ws.len() == 2,
            cache: None,
        };
        self.gemv(x, ws, &[&*ff], d, false, fuse)
    }

    fn self_attention_out(
        &self,
        call: SelfAttnCall<'_, CudaSlice<f32>, CudaWeight>,
        x: &mut CudaSlice<f32>,
        normed: &mut CudaSlice<f32>,
        qkv: [&mut CudaSlice<f32>; 3],
        cache: CacheWrite<'_, CudaSlice<f32>>,
        attn: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let a = call.attention(&*qkv[0], &*cache.k_cache, &*cache.v_cache);
        let outs = [&*qkv[0], &*cache.k_cache, &*cache.v_cache];
        let at = Some((cache.capacity, cache.pos));
        let (norm, ws) = ((call.norm, call.eps), &call.ws[..]);
        if self.chained_sublayer(
            x,
            norm,
            ws,
            outs,
            at,
            call.proj,
            &a,
            attn,
            call.o,
            call.out_proj,
        )? {
            return Ok(());
        }
        self_attention_then_out(self, call, x, normed, qkv, cache, attn)
    }

    fn cross_attention_out(
        &self,
        call: CrossAttnCall<'_, CudaSlice<f32>, CudaWeight>,
        x: &mut CudaSlice<f32>,
        normed: &mut CudaSlice<f32>,
        q: &mut CudaSlice<f32>,
        attn: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let a = call.attention(&*q);
        let (norm, ws) = ((call.norm, call.eps), [call.wq]);
        if self.chained_sublayer(
            x,
            norm,
            &ws,
            [&*q, &*q, &*q],
            None,
            call.proj,
            &a,
            attn,
            call.o,
            call.out_proj,
        )? {
            return Ok(());
        }
        cross_attention_then_out(self, call, x, normed, q, attn)
    }

    fn ffn_out(
        &self,
        call: FfnCall<'_, CudaSlice<f32>, CudaWeight>,
        x: &mut CudaSlice<f32>,
        normed: &mut CudaSlice<f32>,
        ff: &mut CudaSlice<f32>,
        ff_up: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if self.chained_ffn_out(&call, x, ff)? {
            return Ok(());
        }
        ffn_then_out(self, call, x, normed, ff, ff_up)
    }

    fn norm_qkv_step(
        &self,
        x: &CudaSlice<f32>,
        norm: &CudaSlice<f32>,
        eps: f32,
        normed: &mut CudaSlice<f32>,
        ws: [&CudaWeight; 3],
        outs: [&mut CudaSlice<f32>; 3],
        cache: CacheWrite<'_, CudaSlice<f32>>,
        d: MatDims,
    ) -> Result<()> {
        // The fused kernel writes f32 caches only (this backend keeps f32 self-attention
        // caches, `bf16_self_kv`; another format goes the generic way).
        if !(self.shared_gemv.load(Ordering::Relaxed) && self.fused_gemv_fits(&ws, d))
            || cache.kv != KvFormat::F32
        {
            return norm_qkv_then_write(self, x, norm, eps, normed, ws, outs, cache, d);
        }
        check_len("rms_norm w", norm.len(), d.k)?;
        for w in ws {
            checks::matmul(x.len(), outs[0].len(), (w.n, w.k), d)?;
        }
        let CacheWrite {
            k_cache,
            v_cache,
            capacity,
            pos,
            kv: _,
        } = cache;
        for c in [&*k_cache, &*v_cache] {
            checks::write_position(d.m * d.n, c.len(), d.m, d.n, capacity, pos)?;
        }
        let fuse = GemvFuse {
            norm: Some((norm, eps)),
            cache: Some((capacity, pos)),
            ..NO_FUSION
        };
        self.gemv(x, &ws, &[&*outs[0], &*k_cache, &*v_cache], d, false, fuse)
    }

    fn matmul_nt(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        out: &mut CudaSlice<f32>,
        d: MatDims,
        accumulate: bool,
    ) -> Result<()> {
        checks::matmul(x.len(), out.len(), (w.n, w.k), d)?;
        if d.m == 0 || d.n == 0 {
            return Ok(());
        }
        let (m, n, k) = (i32_of("m", d.m)?, i32_of("n", d.n)?, i32_of("k", d.k)?);
        if gemv_fits(d) {
            // Decoding's few rows: the weights read once, activations in f32.
            return self.gemv(x, &[w], &[&*out], d, accumulate, NO_FUSION);
        }
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        let mut guard = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        let Blas {
            handle: blas, half, ..
        } = &mut *guard;
        // Row-major out[m, n] = x[m, k] · w[n, k]ᵀ is column-major outᵀ = w · xᵀ.
        match &w.data {
            WeightData::F32(wd) => {
                let cfg = GemmConfig {
                    transa: blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    m: n,
                    n: m,
                    k,
                    alpha: 1.0f32,
                    lda: k,
                    ldb: k,
                    beta,
                    ldc: n,
                };
                let xv = x.slice(0..d.m * d.k);
                let mut ov = out.slice_mut(0..d.m * d.n);
                self.timed(
                    || format!("sgemm {}x{}x{}", d.m, d.n, d.k),
                    // SAFETY: the shapes were checked against the buffers above.
                    || unsafe { blas.gemm(cfg, wd, &xv, &mut ov) }.map_err(|e| err("sgemm", e)),
                )?;
            }
            WeightData::Half(wd, dtype) => {
                let xh = self.to_half(half, x, d.m * d.k, *dtype)?;
                let ty = if *dtype == WeightDtype::F16 {
                    blas_sys::cudaDataType_t::CUDA_R_16F
                } else {
                    blas_sys::cudaDataType_t::CUDA_R_16BF
                };
                let alpha = 1.0f32;
                let (wp, _gw) = wd.device_ptr(&self.stream);
                let (xp, _gx) = xh.device_ptr(&self.stream);
                let (op, _go) = out.device_ptr_mut(&self.stream);
                self.timed(
                    || format!("gemm_ex {}x{}x{} {dtype}", d.m, d.n, d.k),
                    // SAFETY: as above; the pointers' guards live until the call is queued.
                    || {
                        unsafe {
                            cudarc::cublas::result::gemm_ex(
                                *blas.handle(),
                                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                                n,
                                m,
                                k,
                                &alpha as *const f32 as *const _,
                                wp as *const _,
                                ty,
                                k,
                                xp as *const _,
                                ty,
                                k,
                                &beta as *const f32 as *const _,
                                op as *mut _,
                                blas_sys::cudaDataType_t::CUDA_R_32F,
                                n,
                                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                            )
                        }
                        .map_err(|e| err("gemm_ex", e))
                    },
                )?;
            }
        }
        Ok(())
    }

    fn embed(
        &self,
        ids: &[u32],
        table: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        d: usize,
    ) -> Result<()> {
        check_len("embed out", out.len(), ids.len() * d)?;
        let vocab = table.len() / d.max(1);
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(T5Error::Input(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        if ids.is_empty() {
            return Ok(());
        }
        let (n, d32) = (i32_of("ids", ids.len())?, i32_of("d", d)?);
        let steps = self.capturing().then(|| self.lock_steps());
        let uploaded;
        let dev_ids = match &steps {
            // A recorded step reads its tokens from the step's device arguments.
            Some(st) => st
                .args
                .as_ref()
                .ok_or_else(|| err("embed", "no step arguments"))?
                .slice(1..1 + ids.len()),
            None => {
                uploaded = self.upload_ids(ids)?;
                uploaded.slice(0..ids.len())
            }
        };
        let mut b = self.stream.launch_builder(self.f("embed"));
        b.arg(&dev_ids).arg(table).arg(out).arg(&n).arg(&d32);
        self.launch(&mut b, grid(ids.len() * d), "embed")
    }

    fn embed_linear(
        &self,
        ids: &[u32],
        w: &CudaWeight,
        out: &mut CudaSlice<f32>,
        d: usize,
    ) -> Result<()> {
        match &w.data {
            WeightData::F32(table) if w.k == d => self.embed(ids, table, out, d),
            _ => Err(T5Error::Backend(
                "embed_linear: only f32 weights of the embedding width double as the table".into(),
            )),
        }
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        check_len("rms_norm x", x.len(), rows * d)?;
        check_len("rms_norm out", out.len(), rows * d)?;
        check_len("rms_norm w", w.len(), d)?;
        if rows == 0 {
            return Ok(());
        }
        let (r, d32) = (i32_of("rows", rows)?, i32_of("d", d)?);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.f("rms_norm"));
        b.arg(x).arg(w).arg(out).arg(&r).arg(&d32).arg(&eps);
        self.launch(&mut b, cfg, "rms_norm")
    }

    fn activate(
        &self,
        x: &mut CudaSlice<f32>,
        up: Option<&CudaSlice<f32>>,
        len: usize,
        act: Activation,
    ) -> Result<()> {
        check_len("activate x", x.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        let code = act_code(act);
        let n = i32_of("len", len)?;
        if let Some(u) = up {
            check_len("activate up", u.len(), len)?;
        }
        let mut b = self.stream.launch_builder(self.f("activate"));
        b.arg(x);
        arg_or_null(&mut b, up);
        b.arg(&n).arg(&code);
        self.launch(&mut b, grid(len), "activate")
    }

    fn scale(&self, x: &mut CudaSlice<f32>, len: usize, s: f32) -> Result<()> {
        check_len("scale", x.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        let n = i32_of("len", len)?;
        let mut b = self.stream.launch_builder(self.f("scale"));
        b.arg(x).arg(&n).arg(&s);
        self.launch(&mut b, grid(len), "scale")
    }

    fn compress_kv(&self, t: &CudaSlice<f32>, len: usize) -> Result<CudaSlice<f32>> {
        check_len("compress_kv", t.len(), len)?;
        if !len.is_multiple_of(2) {
            return Err(T5Error::Backend(format!(
                "compress_kv: {len} values do not pair up"
            )));
        }
        let mut out = self.alloc(len / 2)?;
        let pairs = i32_of("len", len / 2)?;
        let mut b = self.stream.launch_builder(self.f("compress_kv"));
        b.arg(t).arg(&mut out).arg(&pairs);
        self.launch(&mut b, grid(len / 2), "compress_kv")?;
        Ok(out)
    }

    fn attention(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        mask: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        s: AttnShape,
    ) -> Result<()> {
        self.attend(q, k, v, bias, mask, out, s, false)
    }

    fn step_attention(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        mask: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        s: AttnShape,
    ) -> Result<()> {
        self.attend(q, k, v, bias, mask, out, s, self.capturing())
    }

    fn attention_out(
        &self,
        call: AttnCall<'_, CudaSlice<f32>>,
        attn: &mut CudaSlice<f32>,
        o: &CudaWeight,
        x: &mut CudaSlice<f32>,
        dims: MatDims,
    ) -> Result<()> {
        if self.chained_attention_out(&call, attn, o, x, dims)? {
            return Ok(());
        }
        attention_then_out(self, call, attn, o, x, dims)
    }

    fn begin_step(&self, layout: Option<u64>, pos: usize, tokens: &[u32]) -> Result<StepPlan> {
        self.bind()?;
        let mut st = self.lock_steps();
        let Some(layout) = layout.filter(|&l| st.enabled && st.failed != Some(l)) else {
            st.stats.eager += 1;
            return Ok(StepPlan::Eager);
        };
        let need = 1 + tokens.len();
        if st.args.as_ref().is_none_or(|a| a.len() < need) {
            st.forget(); // the graphs read the old buffer
            st.args = None;
            let fresh = self
                .stream
                .alloc_zeros::<u32>(need.max(64))
                .map_err(|e| err("allocating step arguments", e))?;
            st.args = Some(fresh);
        }
        let mut host = Vec::with_capacity(need);
        host.push(u32::try_from(pos).map_err(|_| err("step", "position past 2^32"))?);
        host.extend_from_slice(tokens);
        {
            let args = st.args.as_mut().expect("allocated above");
            let mut head = args.slice_mut(0..need);
            self.stream
                .memcpy_htod(&host, &mut head)
                .map_err(|e| err("uploading step arguments", e))?;
        }
        if let Some(g) = st.find(layout) {
            g.0.launch()
                .map_err(|e| err("replaying a decoding step", e))?;
            st.stats.replays += 1;
            return Ok(StepPlan::Replayed);
        }
        if st.seen == Some(layout) {
            self.stream
                .begin_capture(
                    cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
                .map_err(|e| err("starting a graph capture", e))?;
            st.capturing = Some(layout);
            self.capturing.store(true, Ordering::Relaxed);
            return Ok(StepPlan::Capture);
        }
        st.seen = Some(layout);
        st.stats.eager += 1;
        Ok(StepPlan::Eager)
    }

    fn end_step(&self, ok: bool) -> Result<bool> {
        self.capturing.store(false, Ordering::Relaxed);
        let mut st = self.lock_steps();
        let layout = st.capturing.take();
        let graph = self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        match (ok, layout, graph) {
            (true, Some(layout), Ok(Some(g))) => {
                g.launch().map_err(|e| err("running a captured step", e))?;
                st.keep(layout, graphs::Graph(g));
                st.stats.captures += 1;
                Ok(true)
            }
            _ => {
                st.fail(layout);
                st.stats.eager += 1;
                Ok(false)
            }
        }
    }

    fn device_peak_memory(&self) -> Option<u64> {
        let pool = self.memory_pool()?;
        let mut high = 0u64;
        // SAFETY: a live pool; the attribute is a cuuint64_t.
        unsafe {
            cudarc::driver::sys::cuMemPoolGetAttribute(
                pool,
                cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut high as *mut u64 as *mut _,
            )
        }
        .result()
        .ok()?;
        // Zero: the allocations did not come from the pool (no stream-ordered allocator).
        (high > 0).then_some(high)
    }

    fn reset_device_peak_memory(&self) {
        if let Some(pool) = self.memory_pool() {
            let mut zero = 0u64;
            // SAFETY: as above; 0 is the one value this attribute may be set to.
            let _ = unsafe {
                cudarc::driver::sys::cuMemPoolSetAttribute(
                    pool,
                    cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut zero as *mut u64 as *mut _,
                )
            };
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.stream
            .synchronize()
            .map_err(|e| err("waiting for the GPU", e))
    }

    fn step_report(&self) -> Option<String> {
        let st = self.lock_steps();
        let s = st.stats;
        let mut line = format!(
            "CUDA graphs {}: {} steps captured, {} replayed, {} run launch by launch, {} failed captures",
            if st.enabled { "on" } else { "off" },
            s.captures,
            s.replays,
            s.eager,
            s.failures
        );
        drop(st);
        let on = |b: &AtomicBool| {
            if b.load(Ordering::Relaxed) {
                "on"
            } else {
                "off"
            }
        };
        line += &format!(
            "\nCUDA kernels: encoder attention {:?}, gemv fusions {}, shared gemv {}, \
             programmatic launches {}, gemv {} columns per block, \
             chained sublayers {} (launches so far: {:?} attention_o, gemv_gemv, \
             gemv_attention_o)",
            self.encoder_attention(),
            on(&self.fused_gemv),
            on(&self.shared_gemv),
            on(&self.pdl),
            self.gemv_warps,
            on(&self.chain),
            self.chained_launches()
        );
        if let Some(p) = &self.profile {
            let p = p.lock().unwrap_or_else(|e| e.into_inner());
            let mut ops: Vec<_> = p.iter().collect();
            ops.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
            let total: f64 = ops.iter().map(|(_, v)| v.1).sum();
            line += &format!(
                "\nT5RT_CUDA_PROFILE: {:.1} ms synchronized GPU time; by operation:",
                total * 1e3
            );
            for (name, (calls, secs)) in ops.iter().take(25) {
                line += &format!(
                    "\n  {:>9.3} ms {:>5.1}% {:>6} calls {:>8.1} us/call  {name}",
                    secs * 1e3,
                    100.0 * secs / total.max(1e-12),
                    calls,
                    secs * 1e6 / *calls as f64
                );
            }
        }
        Some(line)
    }

    fn write_position(
        &self,
        src: &CudaSlice<f32>,
        cache: &mut CudaSlice<f32>,
        batch: usize,
        width: usize,
        stride: usize,
        pos: usize,
    ) -> Result<()> {
        checks::write_position(src.len(), cache.len(), batch, width, stride, pos)?;
        if batch * width == 0 {
            return Ok(());
        }
        let a = [
            i32_of("batch", batch)?,
            i32_of("width", width)?,
            i32_of("stride", stride)?,
            i32_of("position", pos)?,
        ];
        // A recorded step reads its position from the step's device arguments.
        let st = self.capturing().then(|| self.lock_steps());
        let step = st.as_ref().and_then(|st| st.args.as_ref());
        let mut b = self.stream.launch_builder(self.f("write_position"));
        b.arg(src)
            .arg(cache)
            .arg(&a[0])
            .arg(&a[1])
            .arg(&a[2])
            .arg(&a[3]);
        arg_or_null(&mut b, step);
        self.launch(&mut b, grid(batch * width), "write_position")
    }

    fn gather_rows(
        &self,
        src: &CudaSlice<f32>,
        rows: &[usize],
        row_len: usize,
    ) -> Result<CudaSlice<f32>> {
        checks::gather_rows(src.len(), rows, row_len)?;
        let mut out = self.alloc(rows.len() * row_len)?;
        if rows.is_empty() || row_len == 0 {
            return Ok(out);
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let dev = self.upload_ids(&idx)?;
        let (n, l) = (i32_of("rows", rows.len())?, i32_of("row_len", row_len)?);
        let mut b = self.stream.launch_builder(self.f("gather_rows"));
        b.arg(src).arg(&dev).arg(&mut out).arg(&n).arg(&l);
        self.launch(&mut b, grid(rows.len() * row_len), "gather_rows")?;
        Ok(out)
    }

    fn widen_rows(
        &self,
        src: &CudaSlice<f32>,
        rows: usize,
        old_len: usize,
        new_len: usize,
    ) -> Result<CudaSlice<f32>> {
        checks::widen_rows(src.len(), rows, old_len, new_len)?;
        self.copy_rows(src, rows, old_len, 0, old_len, new_len)
    }

    fn retain_rows(&self, t: &mut CudaSlice<f32>, rows: &[usize], row_len: usize) -> Result<()> {
        checks::retain_rows(t.len(), rows, row_len)?;
        *t = self.gather_rows(t, rows, row_len)?;
        Ok(())
    }

    fn append(
        &self,
        t: &mut CudaSlice<f32>,
        t_len: usize,
        src: &CudaSlice<f32>,
        len: usize,
    ) -> Result<()> {
        checks::append(t.len(), t_len, src.len(), len)?;
        let mut out = self.alloc(t_len + len)?;
        if t_len > 0 {
            let from = t.slice(0..t_len);
            let mut to = out.slice_mut(0..t_len);
            self.stream
                .memcpy_dtod(&from, &mut to)
                .map_err(|e| err("append", e))?;
        }
        if len > 0 {
            let from = src.slice(0..len);
            let mut to = out.slice_mut(t_len..t_len + len);
            self.stream
                .memcpy_dtod(&from, &mut to)
                .map_err(|e| err("append", e))?;
        }
        *t = out;
        Ok(())
    }

    fn slice_rows(
        &self,
        src: &CudaSlice<f32>,
        rows: usize,
        row_len: usize,
        start: usize,
        len: usize,
    ) -> Result<CudaSlice<f32>> {
        checks::slice_rows(src.len(), rows, row_len, start, len)?;
        self.copy_rows(src, rows, row_len, start, len, len)
    }

    fn argmax_rows(&self, x: &CudaSlice<f32>, rows: usize, n: usize) -> Result<Vec<u32>> {
        check_len("argmax_rows", x.len(), rows * n)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let mut out = self
            .stream
            .alloc_zeros::<u32>(rows)
            .map_err(|e| err("argmax", e))?;
        let (r, n32) = (i32_of("rows", rows)?, i32_of("n", n)?);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.f("argmax_rows"));
        b.arg(x).arg(&mut out).arg(&r).arg(&n32);
        self.launch(&mut b, cfg, "argmax_rows")?;
        drop(b);
        self.stream.clone_dtoh(&out).map_err(|e| err("argmax", e))
    }

    fn fill_column(
        &self,
        x: &mut CudaSlice<f32>,
        rows: usize,
        n: usize,
        col: usize,
        value: f32,
    ) -> Result<()> {
        check_len("fill_column", x.len(), rows * n)?;
        if col >= n {
            return Err(T5Error::Backend(format!(
                "fill_column: column {col} >= width {n}"
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        let (r, n32, c) = (i32_of("rows", rows)?, i32_of("n", n)?, i32_of("col", col)?);
        let mut b = self.stream.launch_builder(self.f("fill_column"));
        b.arg(x).arg(&r).arg(&n32).arg(&c).arg(&value);
        self.launch(&mut b, grid(rows), "fill_column")
    }
}

#[cfg(test)]
mod bound_tests {
    use super::{encoder_attention_bound, ATTENTION_SCORES_BYTES};

    /// The count covers the scores `attend_gemm` allocates (a chunk of `clamp(256 MiB / one
    /// sequence's scores, 1, batch)` sequences) for every batch up to the shape counted, and
    /// grows with the length and the batch; no GPU needed.
    #[test]
    fn the_gpu_count_covers_every_chunk() {
        let heads = 12;
        let mut last_len = 0;
        for l in [1usize, 64, 512, 1024, 2047, 2048, 3000, 5000] {
            let count = encoder_attention_bound(heads, 32, l);
            assert!(count >= last_len, "{l}");
            last_len = count;
            let mut last_batch = 0;
            for sources in 1..=32 {
                let bound = encoder_attention_bound(heads, sources, l);
                assert!(bound >= last_batch, "{l} x {sources}");
                last_batch = bound;
                // Every batch of at most `sources` sequences of at most `l` tokens.
                for (b, len) in [(sources, l), (1, l), (sources, l / 2 + 1)] {
                    let per_seq = heads * len * len;
                    let chunk = (ATTENTION_SCORES_BYTES / (per_seq * 4).max(1)).clamp(1, b);
                    let allocated = (chunk * per_seq * 4 + per_seq * 4) as u64;
                    assert!(allocated <= bound, "{l} x {sources}: {b} x {len}");
                }
            }
        }
    }
}
