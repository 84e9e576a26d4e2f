//! The CPU backend: packed-weight tiles for linear layers ([`packed`]), `gemm` for the
//! encoder's attention products, `rayon` for threads, plain loops elsewhere.
//! [`reference`](mod@reference) holds scalar versions of every kernel, the oracle the tests compare against.

mod attend;
mod isa;
mod kernels;
pub mod packed;
pub mod reference;
mod screen;

use rayon::prelude::*;

use super::{
    check_len, checks, matmul_nt_each, AttnShape, Backend, BiasLayout, KvFormat, MatDims,
    ScreenChoice, ScreenHead, WeightDtype,
};
use crate::config::Activation;
use crate::error::{Result, T5Error};
pub use isa::IsaLevel;
use packed::PackedWeight;

/// Runs every kernel on its own rayon pool of `threads` threads.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    /// What the kernels may use ([`IsaLevel::preferred`] from the detected features, or
    /// forced with `T5RT_ISA`).
    isa: IsaLevel,
    dtype: WeightDtype,
}

/// A linear weight on the CPU: packed for the tiles of [`packed`], in its [`WeightDtype`].
pub type CpuWeight = PackedWeight;

impl CpuBackend {
    /// A backend using `threads` threads (0 = one per core), with the fastest kernels this
    /// CPU runs ([`IsaLevel::preferred`]), or the level `T5RT_ISA` names in the environment
    /// (`portable`, `avx2`, `avx512bw`, `avx512-vnni`, `avx512-bf16`; at most what the CPU
    /// has).
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_isa(threads, IsaLevel::from_env()?)
    }

    /// A backend whose kernels use at most `level` (an error if this CPU lacks it): for
    /// tests and comparisons of the kernel paths.
    pub fn with_isa(threads: usize, level: IsaLevel) -> Result<Self> {
        let isa = level.checked()?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max_threads = 4 * cores;
        if threads > max_threads {
            return Err(T5Error::Input(format!(
                "{threads} threads: at most {max_threads} (4 per core; this machine has {cores}); 0 uses one per core"
            )));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("t5rt-cpu-{i}"))
            .build()
            .map_err(|e| {
                let n = match threads {
                    0 => "one thread per core".to_string(),
                    n => format!("{n} threads"),
                };
                T5Error::Backend(format!("cannot start the CPU pool ({n}): {e}"))
            })?;
        pool.broadcast(|_| kernels::warm_gemm());
        let threads = pool.current_num_threads();
        Ok(CpuBackend {
            pool,
            threads,
            isa,
            dtype: WeightDtype::F32,
        })
    }

    /// A backend with portable kernels only (no CPU-specific SIMD paths of t5rt's own; the
    /// `gemm` crate still picks its own).
    pub fn portable(threads: usize) -> Result<Self> {
        Self::with_isa(threads, IsaLevel::Portable)
    }

    /// Stores linear weights as `dtype` (f32 by default).
    pub fn with_dtype(mut self, dtype: WeightDtype) -> Self {
        self.dtype = dtype;
        self
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The kernel level this backend runs at.
    pub fn isa(&self) -> IsaLevel {
        self.isa
    }
}

/// `len` zeros, or an out-of-memory error instead of an abort (fresh zero pages from the
/// allocator: filling a buffer before the kernel that produces it took 0.19 s of t5-base's
/// 4.6 s at batch 32).
fn try_zeroed(len: usize) -> Result<Vec<f32>> {
    crate::alloc::try_zeroed(len, "a tensor")
}

/// int8 sums are exact in i32 while k · 127 · 127 < 2^31 (the u8 offset of `vpdpbusd` may
/// wrap on the way; wrapping arithmetic takes it back off exactly).
fn check_int8_inputs(k: usize) -> Result<()> {
    if k > 130_000 {
        return Err(T5Error::Backend(format!(
            "int8 weights with {k} inputs per output: at most 130000 (i32 sums); use bf16"
        )));
    }
    Ok(())
}

/// `data` copied into a fallibly allocated vector.
fn try_copy(data: &[f32]) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(data.len())
        .map_err(|_| crate::alloc::out_of_memory(4 * data.len(), "a tensor's copy"))?;
    v.extend_from_slice(data);
    Ok(v)
}

impl CpuBackend {
    /// Runs `op` on the pool (inline when called inside [`Backend::run`]), first asking back
    /// into the current call the helpers that left it ([`help_until`]).
    ///
    /// A helper leaves after [`HELP_IDLE_LIMIT`] with nothing to do; on a shared VM the host
    /// pausing the calling thread for that long made it leave calls it was needed in, and it
    /// then slept in rayon between the call's parallel operations, woken for each (some 150
    /// a decoding step). Asked back here, where the pool's first thread is between operations
    /// with no parallel work of the call in flight, and waited for (up to
    /// [`ASK_BACK_WAIT`]) before `op` starts any, the helper takes its job outside any piece
    /// of that work (inside one it would stall the call until it left again) and helps until
    /// the call is done or it is idle past the limits again.
    fn install<R: Send>(&self, op: impl FnOnce() -> R + Send) -> R {
        if spin_helpers() {
            self.ask_helpers_back();
        }
        self.pool.install(op)
    }

    fn ask_helpers_back(&self) {
        use std::sync::atomic::Ordering;
        // A plain load first: most operations find no helper to ask back. Only this thread
        // (the call's first) takes from `left`, so what the load saw is still there to take.
        let asked = CURRENT_CALL.with(|c| {
            let c = c.borrow();
            let call = c.as_ref()?;
            (call.left.load(Ordering::Relaxed) > 0).then(|| {
                (
                    std::sync::Arc::clone(call),
                    call.left.swap(0, Ordering::AcqRel),
                )
            })
        });
        let Some((call, left)) = asked else { return };
        let want = call.joined.load(Ordering::Acquire) + left;
        // Threads helping already return from the job at once (`help_until`'s flag).
        let job = std::sync::Arc::clone(&call);
        self.pool.spawn_broadcast(move |ctx| {
            if ctx.index() != 0 {
                help_until(&job, true);
            }
        });
        let start = std::time::Instant::now();
        while call.joined.load(Ordering::Acquire) < want && start.elapsed() < ASK_BACK_WAIT {
            std::hint::spin_loop();
        }
    }

    /// A checkpoint weight `[n, k]` packed as `kind` on this backend's threads.
    fn pack(&self, w: &[f32], n: usize, k: usize, kind: WeightDtype) -> Result<CpuWeight> {
        check_len("upload_linear", w.len(), n * k)?;
        if kind == WeightDtype::F16 {
            return Err(T5Error::Backend(
                "f16 weights run on CUDA only; on the CPU use bf16 (the same halved memory, f32's range)"
                    .into(),
            ));
        }
        if kind == WeightDtype::Int8 {
            check_int8_inputs(k)?;
        }
        let isa = self.isa;
        self.install(|| PackedWeight::pack(w, n, k, kind, isa))
    }
}

/// What one [`CpuBackend::run`] call shares with the threads helping it ([`help_until`]).
#[derive(Default)]
struct Call {
    /// Set when the call's job returns or unwinds.
    done: std::sync::atomic::AtomicBool,
    /// Helpers that left the call before it was done (idle past [`HELP_IDLE_LIMIT`]), not yet
    /// asked back ([`CpuBackend::install`]).
    left: std::sync::atomic::AtomicUsize,
    /// Times a thread began helping the call.
    joined: std::sync::atomic::AtomicUsize,
}

/// How long [`CpuBackend::install`] waits for the helpers it asked back to take their jobs
/// before starting its operation (a helper asleep in rayon wakes in tens of microseconds; one
/// paused by the host is not waited for).
const ASK_BACK_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// Sets the call's `done` when dropped: when the job returns or unwinds.
struct SetOnDrop<'a>(&'a Call);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0
            .done
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

std::thread_local! {
    /// The call the pool's first thread is running ([`CpuBackend::run`]), if any.
    static CURRENT_CALL: std::cell::RefCell<Option<std::sync::Arc<Call>>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes `call` the current thread's [`CURRENT_CALL`] until dropped, then puts back the one
/// before (a call's job can run inside another's when two threads call `run` at once).
struct CurrentCall(Option<std::sync::Arc<Call>>);

impl CurrentCall {
    fn set(call: &std::sync::Arc<Call>) -> Self {
        CurrentCall(CURRENT_CALL.with(|c| c.replace(Some(std::sync::Arc::clone(call)))))
    }
}

impl Drop for CurrentCall {
    fn drop(&mut self) {
        let before = self.0.take();
        CURRENT_CALL.with(|c| *c.borrow_mut() = before);
    }
}

/// Whether [`CpuBackend::run`]'s other threads stay awake for the call (`T5RT_SPIN=0`: no).
fn spin_helpers() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("T5RT_SPIN").map_or(true, |v| v != "0"))
}

/// How long a helping thread stays in a call with nothing to do ([`help_until`]), counted on
/// its own clock ([`IdleClock`]): longer than the serial stretches inside a call (a call's
/// start, 5-11 ms for t5-small at batch 32; at 3 ms the helper left every case-d call once),
/// short enough that the stall it ends is rare and brief.
const HELP_IDLE_LIMIT: std::time::Duration = std::time::Duration::from_millis(30);

/// The longest gap between two looks of [`help_until`] that counts as idle time: a longer
/// one is the host pausing this thread (a VM's CPU time taken by others), not time spent
/// waiting for work, and counts as this much.
const IDLE_GAP_CAP: std::time::Duration = std::time::Duration::from_millis(1);

/// A bound in wall time on how long [`help_until`] stays idle, whatever [`IdleClock`] counts
/// (naps that oversleep past [`IDLE_GAP_CAP`] on a loaded host would otherwise stretch
/// [`HELP_IDLE_LIMIT`] without end).
const HELP_IDLE_WALL_LIMIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Time spent looking for work, from look to look, each gap counted up to [`IDLE_GAP_CAP`].
struct IdleClock {
    began: std::time::Instant,
    last: std::time::Instant,
    idle: std::time::Duration,
}

impl IdleClock {
    fn start() -> Self {
        let now = std::time::Instant::now();
        IdleClock {
            began: now,
            last: now,
            idle: std::time::Duration::ZERO,
        }
    }

    /// The idle time so far, this look included.
    fn look(&mut self) -> std::time::Duration {
        self.look_at(std::time::Instant::now())
    }

    fn look_at(&mut self, now: std::time::Instant) -> std::time::Duration {
        self.idle += now.saturating_duration_since(self.last).min(IDLE_GAP_CAP);
        self.last = now;
        self.idle
    }
}

/// Runs the pool's pending work until `call` is done, without sleeping in rayon: a decoding step is a
/// chain of short parallel operations, and a thread that went to sleep between two of them
/// woke late for the next. While idle it yields the core every so often, and after a
/// millisecond with nothing to do (the calling thread working alone) it naps 50 µs between
/// looks, so a call that waits on something else does not keep a core busy. After
/// [`HELP_IDLE_LIMIT`] with nothing to do ([`IdleClock`]: each gap between two looks counts at
/// most a millisecond, so the host pausing the thread does not count; on the shared Emerald
/// Rapids VM such pauses of 30 ms and more made it leave calls it was needed in; and at most
/// [`HELP_IDLE_WALL_LIMIT`] of wall time) it leaves, counted in the call's `left` (the
/// thread is then an ordinary rayon worker until the call's next parallel operation asks it
/// back, [`CpuBackend::install`]; pauses of the calling thread still make it leave): rayon
/// may hand a thread its helping job while that thread is inside a piece of the same call's
/// parallel work that it stole (it looks for work while waiting on the piece's own halves);
/// the call's first thread then waits for that piece and nothing else runs, so leaving is
/// what lets the piece finish. That stall (seen once, in CI, as a hang before this limit) now
/// costs about the limit (at most [`HELP_IDLE_WALL_LIMIT`]).
///
/// A thread already helping one call that picks up another call's helper job (two `run`s from
/// different threads at once: the server's step loop and a beam search) leaves that job at
/// once: staying would hold it there until the other call ended, and the first call's
/// `broadcast`, which waits for every thread's job, with it. Its own loop goes on helping
/// whichever work comes. Where it was asked back into a call that is now done (such a job,
/// which no `broadcast` waits for, can outlive its call's `run` by up to a nap), it helps the
/// new one instead (`asked_back`).
fn help_until(call: &Call, asked_back: bool) {
    use std::cell::Cell;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    const SPIN: Duration = Duration::from_millis(1);
    const _: () = assert!(HELP_IDLE_LIMIT.as_micros() > SPIN.as_micros());
    thread_local! {
        /// The call this thread is helping (null: none), and whether it was asked back into it.
        static HELPING: Cell<(*const Call, bool)> = const { Cell::new((std::ptr::null(), false)) };
    }
    let outer = HELPING.with(|h| h.get());
    if !outer.0.is_null() {
        // SAFETY: a non-null pointer is the call of a `help_until` further down this thread's
        // stack, which holds a reference to it until it returns (and puts back the one before).
        let outer_done = unsafe { &*outer.0 }.done.load(Ordering::Acquire);
        // Only a job asked back, which no `run` waits for, may hold another call: it can
        // outlive its own call's `run` by up to a nap and take the next call's job first.
        if !(outer.1 && outer_done) {
            return;
        }
    }
    HELPING.with(|h| h.set((call, asked_back)));
    /// Puts back the call helped before, however the loop ends.
    struct Restore((*const Call, bool));
    impl Drop for Restore {
        fn drop(&mut self) {
            HELPING.with(|h| h.set(self.0));
        }
    }
    let _restore = Restore(outer);
    call.joined.fetch_add(1, Ordering::Release);
    let leave = || {
        call.left.fetch_add(1, Ordering::Release);
    };
    let mut idle = 0u32;
    let mut clock: Option<IdleClock> = None;
    while !call.done.load(Ordering::Acquire) {
        if let Some(rayon::Yield::Executed) = rayon::yield_now() {
            idle = 0;
            clock = None;
            continue;
        }
        idle = idle.wrapping_add(1);
        if !idle.is_multiple_of(64) {
            std::hint::spin_loop();
        } else {
            let clock = clock.get_or_insert_with(IdleClock::start);
            let idle_for = clock.look();
            // `last` is this look's time: the wall time idle so far, without another read.
            if clock.last - clock.began >= HELP_IDLE_WALL_LIMIT {
                return leave();
            }
            if idle_for < SPIN {
                std::thread::yield_now();
            } else if idle_for < HELP_IDLE_LIMIT {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                return leave();
            }
        }
    }
}

/// Lookups of at least this many ids run on the pool ([`CpuBackend::each_row`]): an encoder's
/// input (thousands of ids) is otherwise a serial stretch long enough for the helping thread
/// to leave the call ([`HELP_IDLE_LIMIT`]). t5-base's 4096 ids of case d, read from its tied f32
/// head (a row of the packed head is one value per cache line), took some 45 ms on one
/// thread: the helper left every such call at 30 ms, and those calls then took about 18% longer
/// to decode (rayon waking a sleeping thread for each of some 150 parallel steps a token; a
/// helper kept in the call against one that left, 4 of 4 alternating `t5rt bench` pairs:
/// decoding 5.6-7.1 s against 6.6-9.9 s, medians 6.1 and 7.2 s). A decoding step's few ids
/// stay on one thread.
const EMBED_PARALLEL_MIN: usize = 64;

/// An error naming the first id of `ids` that is not below `n` (the vocabulary), if any.
fn check_ids(ids: &[u32], n: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= n) {
        Some(id) => Err(T5Error::Input(format!(
            "token id {id} is outside the vocabulary"
        ))),
        None => Ok(()),
    }
}

impl CpuBackend {
    /// `f(row, id)` for each row of `d` values of `out` and its id, on the pool when there
    /// are [`EMBED_PARALLEL_MIN`] ids or more.
    fn each_row(
        &self,
        out: &mut [f32],
        d: usize,
        ids: &[u32],
        f: impl Fn(&mut [f32], usize) -> Result<()> + Sync,
    ) -> Result<()> {
        if d == 0 {
            return Ok(());
        }
        if ids.len() < EMBED_PARALLEL_MIN {
            return out
                .chunks_exact_mut(d)
                .zip(ids)
                .try_for_each(|(row, &id)| f(row, id as usize));
        }
        self.install(|| {
            out.par_chunks_exact_mut(d)
                .zip(ids.par_iter())
                .try_for_each(|(row, &id)| f(row, id as usize))
        })
    }
}

impl Backend for CpuBackend {
    type Tensor = Vec<f32>;
    type Weight = CpuWeight;

    /// Runs `f` on the pool's first thread, always the same one (`install` would hand it to
    /// whichever thread is free). A decode allocates its large buffers (caches, activations)
    /// on the thread it runs on, and glibc's malloc gives each thread its own arena, which
    /// keeps what was freed there for that thread's next allocations: with calls landing on
    /// either thread, each arena held a past call's buffers and a process's peak memory grew
    /// by up to a third over repeated calls (t5-base f32 at batch 32: 1315 MiB after one call,
    /// 1743 after four in some runs). The other threads stay in the call, running `f`'s parallel
    /// work as it comes and not sleeping in rayon until `f` returns or they have had nothing to
    /// do for 30 ms, `HELP_IDLE_LIMIT` (then the call's next parallel operation asks them back,
    /// `CpuBackend::install`; `T5RT_SPIN=0`: they leave at once and rayon puts them to
    /// sleep when idle): a decoding step is some 150 short parallel
    /// operations, and a thread that fell asleep between two of them woke late for the next
    /// (t5-small bf16 case a about 4% faster, t5-base case d decoding about 1.5%, alternating
    /// runs on the Zen 4). They yield the core to the system every so often while idle.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.pool.current_thread_index().is_some() {
            return f();
        }
        let f = std::sync::Mutex::new(Some(f));
        let call = std::sync::Arc::new(Call::default());
        let results = self.pool.broadcast(|ctx| {
            if ctx.index() != 0 {
                if spin_helpers() {
                    help_until(&call, false);
                }
                return None;
            }
            let _finished = SetOnDrop(&call);
            let _current = CurrentCall::set(&call);
            let f = f.lock().unwrap_or_else(|e| e.into_inner()).take();
            f.map(|f| f())
        });
        results
            .into_iter()
            .flatten()
            .next()
            .expect("the pool's first thread ran the job")
    }

    fn name(&self) -> String {
        // Below the CPU's highest level (forced, or the preferred level of Intel CPUs with
        // AVX-512 BF16), the summary says so.
        let top = IsaLevel::detect();
        let below = if self.isa < top {
            format!(" of {top}")
        } else {
            String::new()
        };
        format!(
            "cpu ({} threads, {}, {} kernels at level {}{below})",
            self.threads,
            self.dtype,
            self.isa.kernel(self.dtype),
            self.isa
        )
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        try_copy(data)
    }

    fn upload_owned(&self, data: Vec<f32>) -> Result<Vec<f32>> {
        Ok(data)
    }

    /// The position bias as lines, and the scores of one task (`kernels::most_scores_per_task`)
    /// for each task that can run at once: one per pool thread, at most one per (sequence,
    /// head).
    fn encoder_attention_bytes(&self, heads: usize, sources: usize, src_len: usize) -> Option<u64> {
        let l = src_len as u64;
        let lines = (heads as u64).saturating_mul(l.saturating_mul(2).saturating_sub(1));
        let tasks = self.threads.min(sources.saturating_mul(heads)) as u64;
        let scores = tasks.saturating_mul(kernels::most_scores_per_task(src_len) as u64);
        Some(lines.saturating_add(scores).saturating_mul(4))
    }

    /// The lines as they are: the attention reads each query's row out of its head's line.
    fn upload_position_bias(
        &self,
        lines: &[f32],
        heads: usize,
        q_len: usize,
        kv_len: usize,
    ) -> Result<(Vec<f32>, BiasLayout)> {
        crate::model::relpos::check_lines(lines, heads, q_len, kv_len)?;
        Ok((try_copy(lines)?, BiasLayout::Lines))
    }

    fn upload_linear(&self, w: &[f32], n: usize, k: usize) -> Result<CpuWeight> {
        self.pack(w, n, k, self.dtype)
    }

    fn upload_linear_f32(&self, w: &[f32], n: usize, k: usize) -> Result<CpuWeight> {
        self.pack(w, n, k, WeightDtype::F32)
    }

    fn upload_linear_int8(
        &self,
        q: &[i8],
        scales: &[f32],
        n: usize,
        k: usize,
    ) -> Result<CpuWeight> {
        if self.dtype != WeightDtype::Int8 {
            return Err(T5Error::Backend(format!(
                "this checkpoint holds int8 weights (made by `t5rt convert`): load it with --dtype int8 (asked for {})",
                self.dtype
            )));
        }
        check_len("upload_linear_int8", q.len(), n * k)?;
        check_len("upload_linear_int8 scales", scales.len(), n)?;
        check_int8_inputs(k)?;
        // The tiles without VNNI negate weights (`|q| · ±w`), exact for ±127 but not for -128,
        // which `quantize_int8` never writes.
        if q.contains(&i8::MIN) {
            return Err(T5Error::Backend(
                "int8 weight value -128: t5rt's int8 weights lie in [-127, 127] (corrupt checkpoint?)"
                    .into(),
            ));
        }
        if let Some(bad) = scales[..n].iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(T5Error::Backend(format!(
                "int8 weight scale {bad}: scales must be finite and positive (corrupt checkpoint?)"
            )));
        }
        self.install(|| PackedWeight::from_int8(q, scales, n, k))
    }

    fn weight_dtype(&self) -> WeightDtype {
        self.dtype
    }

    fn download(&self, t: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        check_len("download", t.len(), len)?;
        try_copy(&t[..len])
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        try_zeroed(len)
    }

    fn matmul_nt(
        &self,
        x: &Vec<f32>,
        w: &CpuWeight,
        out: &mut Vec<f32>,
        d: MatDims,
        accumulate: bool,
    ) -> Result<()> {
        checks::matmul(x.len(), out.len(), (w.n, w.k), d)?;
        let isa = self.isa;
        self.install(|| packed::matmul_packed(x, w, out, d.m, accumulate, isa))
    }

    fn matmul_nt_shared(
        &self,
        x: &Vec<f32>,
        ws: &[&CpuWeight],
        outs: &mut [&mut Vec<f32>],
        d: MatDims,
    ) -> Result<()> {
        checks::shared_products(ws.len(), outs.len())?;
        if !packed::can_share(ws) {
            return matmul_nt_each(self, x, ws, outs, d);
        }
        for (w, out) in ws.iter().zip(outs.iter()) {
            checks::matmul(x.len(), out.len(), (w.n, w.k), d)?;
        }
        let isa = self.isa;
        let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        self.install(|| packed::matmul_packed_shared(x, ws, &mut slices, d.m, false, isa))
    }

    fn embed(&self, ids: &[u32], table: &Vec<f32>, out: &mut Vec<f32>, d: usize) -> Result<()> {
        self.embed_host(ids, table, out, d)
    }

    fn embeds_from_host(&self) -> bool {
        true
    }

    fn embed_host(&self, ids: &[u32], table: &[f32], out: &mut Vec<f32>, d: usize) -> Result<()> {
        check_len("embed out", out.len(), ids.len() * d)?;
        if d == 0 {
            return Ok(());
        }
        check_ids(ids, table.len() / d)?;
        self.each_row(&mut out[..ids.len() * d], d, ids, |row, id| {
            row.copy_from_slice(&table[id * d..(id + 1) * d]);
            Ok(())
        })
    }

    fn embed_linear(&self, ids: &[u32], w: &CpuWeight, out: &mut Vec<f32>, d: usize) -> Result<()> {
        check_len("embed out", out.len(), ids.len() * d)?;
        if w.k != d {
            return Err(T5Error::Backend(format!(
                "embed_linear: rows of {} values, {d} wanted",
                w.k
            )));
        }
        check_ids(ids, w.n)?;
        self.each_row(&mut out[..ids.len() * d], d, ids, |row, id| {
            w.read_row(id, row)
        })
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        out: &mut Vec<f32>,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        check_len("rms_norm x", x.len(), rows * d)?;
        check_len("rms_norm out", out.len(), rows * d)?;
        check_len("rms_norm w", w.len(), d)?;
        self.install(|| {
            out[..rows * d]
                .par_chunks_exact_mut(d)
                .zip(x[..rows * d].par_chunks_exact(d))
                .for_each(|(o, x)| kernels::rms_norm_row(x, &w[..d], o, eps));
        });
        Ok(())
    }

    fn activate(
        &self,
        x: &mut Vec<f32>,
        up: Option<&Vec<f32>>,
        len: usize,
        act: Activation,
    ) -> Result<()> {
        check_len("activate x", x.len(), len)?;
        if let Some(up) = up {
            check_len("activate up", up.len(), len)?;
        }
        const CHUNK: usize = 4096;
        let isa = self.isa;
        let run = move |x: &mut [f32], u: Option<&[f32]>| {
            #[cfg(target_arch = "x86_64")]
            if isa.avx512() {
                // SAFETY: the backend only runs at levels the CPU has.
                return unsafe { kernels::activate_chunk_avx512(x, u, act) };
            } else if isa >= IsaLevel::Avx2 {
                // SAFETY: as above.
                return unsafe { kernels::activate_chunk_avx2(x, u, act) };
            }
            let _ = isa;
            kernels::activate_chunk(x, u, act)
        };
        self.install(|| {
            let xs = x[..len].par_chunks_mut(CHUNK);
            match up {
                None => xs.for_each(|x| run(x, None)),
                Some(up) => xs
                    .zip(up[..len].par_chunks(CHUNK))
                    .for_each(|(x, u)| run(x, Some(u))),
            }
        });
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, len: usize, s: f32) -> Result<()> {
        check_len("scale", x.len(), len)?;
        x[..len].iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        mask: Option<&Vec<f32>>,
        out: &mut Vec<f32>,
        s: AttnShape,
    ) -> Result<()> {
        s.check(
            q.len(),
            out.len(),
            (k.len(), v.len()),
            bias.map(Vec::len),
            mask.map(Vec::len),
        )?;
        let bias = bias.map(|b| b.as_slice());
        let mask = mask.map(|m| m.as_slice());
        self.install(|| {
            if s.q_len > 1 {
                kernels::attention_gemm(q, k, v, bias, mask, &mut out[..], s, self.isa)
            } else {
                attend::attention(q, k, v, bias, mask, &mut out[..], s, self.isa)
            }
        });
        Ok(())
    }

    fn compress_kv(&self, t: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        check_len("compress_kv", t.len(), len)?;
        if !len.is_multiple_of(2) {
            return Err(T5Error::Backend(format!(
                "compress_kv: {len} values do not pair up"
            )));
        }
        // Pairs rounded as `bf16_bits` (the even value in the low half), in chunks across the
        // pool, in vectors where the CPU has them.
        const CHUNK: usize = 1 << 14;
        let mut out = try_zeroed(len / 2)?;
        let isa = self.isa;
        self.install(|| {
            out.par_chunks_mut(CHUNK / 2)
                .zip(t[..len].par_chunks(CHUNK))
                .for_each(|(dst, src)| {
                    // SAFETY: f32 and u32 have the same size and alignment; the slots hold bits.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u32, dst.len())
                    };
                    packed::bf16_row(src, dst, isa)
                });
        });
        Ok(out)
    }

    fn int8_kv(&self) -> bool {
        true
    }

    fn bf16_self_kv(&self) -> bool {
        true
    }

    fn quantize_kv(
        &self,
        t: &Vec<f32>,
        positions: usize,
        heads: usize,
        d_kv: usize,
    ) -> Result<Vec<f32>> {
        let inner = heads * d_kv;
        check_len("quantize_kv", t.len(), positions * inner)?;
        if !KvFormat::Int8.fits(d_kv) {
            return Err(T5Error::Backend(format!(
                "quantize_kv: d_kv {d_kv} is not a multiple of 4"
            )));
        }
        // Each head's values are a row of the weights' per-row rule (`quantize_int8`), then
        // laid out per position: the values, then the heads' scales.
        let (q, scales) = self.install(|| {
            packed::quantize_int8(&t[..positions * inner], positions * heads, d_kv, self.isa)
        })?;
        let per = KvFormat::Int8.slots_per_position(heads, d_kv);
        let mut out = try_zeroed(positions * per)?;
        self.install(|| {
            out.par_chunks_exact_mut(per)
                .zip(q.par_chunks_exact(inner))
                .zip(scales.par_chunks_exact(heads))
                .for_each(|((dst, q), s)| {
                    let (values, scales) = dst.split_at_mut(inner / 4);
                    // SAFETY: an f32 slice viewed as its bytes (u8 has no alignment or
                    // validity requirements); value `i` is byte `i` in memory order.
                    let bytes = unsafe {
                        std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<i8>(), inner)
                    };
                    bytes.copy_from_slice(q);
                    scales.copy_from_slice(s);
                });
        });
        Ok(out)
    }

    fn write_position(
        &self,
        src: &Vec<f32>,
        cache: &mut Vec<f32>,
        batch: usize,
        width: usize,
        stride: usize,
        pos: usize,
    ) -> Result<()> {
        checks::write_position(src.len(), cache.len(), batch, width, stride, pos)?;
        for b in 0..batch {
            let dst = (b * stride + pos) * width;
            cache[dst..dst + width].copy_from_slice(&src[b * width..(b + 1) * width]);
        }
        Ok(())
    }

    fn gather_rows(&self, src: &Vec<f32>, rows: &[usize], row_len: usize) -> Result<Vec<f32>> {
        checks::gather_rows(src.len(), rows, row_len)?;
        let mut out = Vec::new();
        let len = rows.len().saturating_mul(row_len);
        out.try_reserve_exact(len)
            .map_err(|_| crate::alloc::out_of_memory(len.saturating_mul(4), "gathered rows"))?;
        for &r in rows {
            let row = src
                .get(r * row_len..(r + 1) * row_len)
                .ok_or_else(|| T5Error::Backend(format!("gather_rows: row {r} is out of range")))?;
            out.extend_from_slice(row);
        }
        Ok(out)
    }

    fn widen_rows(
        &self,
        src: &Vec<f32>,
        rows: usize,
        old_len: usize,
        new_len: usize,
    ) -> Result<Vec<f32>> {
        checks::widen_rows(src.len(), rows, old_len, new_len)?;
        let mut out = try_zeroed(rows.saturating_mul(new_len))?;
        for (dst, row) in out.chunks_exact_mut(new_len).zip(src.chunks_exact(old_len)) {
            dst[..old_len].copy_from_slice(row);
        }
        Ok(out)
    }

    fn retain_rows(&self, t: &mut Vec<f32>, rows: &[usize], row_len: usize) -> Result<()> {
        checks::retain_rows(t.len(), rows, row_len)?;
        for (i, &r) in rows.iter().enumerate() {
            if r != i {
                t.copy_within(r * row_len..(r + 1) * row_len, i * row_len);
            }
        }
        t.truncate(rows.len() * row_len);
        Ok(())
    }

    fn append(&self, t: &mut Vec<f32>, t_len: usize, src: &Vec<f32>, len: usize) -> Result<()> {
        checks::append(t.len(), t_len, src.len(), len)?;
        t.truncate(t_len);
        t.try_reserve(len)
            .map_err(|_| crate::alloc::out_of_memory(4 * len, "an appended tensor"))?;
        t.extend_from_slice(&src[..len]);
        Ok(())
    }

    fn slice_rows(
        &self,
        src: &Vec<f32>,
        rows: usize,
        row_len: usize,
        start: usize,
        len: usize,
    ) -> Result<Vec<f32>> {
        checks::slice_rows(src.len(), rows, row_len, start, len)?;
        let mut out = try_zeroed(rows.saturating_mul(len))?;
        for (dst, row) in out
            .chunks_exact_mut(len.max(1))
            .zip(src.chunks_exact(row_len.max(1)))
        {
            dst.copy_from_slice(&row[start..start + len]);
        }
        Ok(out)
    }

    fn screens_heads(&self) -> bool {
        true
    }

    fn upload_screen(
        &self,
        w: &[f32],
        n: usize,
        k: usize,
        head: WeightDtype,
        choice: ScreenChoice,
    ) -> Result<Option<ScreenHead<CpuWeight>>> {
        check_len("upload_screen", w.len(), n * k)?;
        let (isa, w) = (self.isa, &w[..n * k]);
        screen::screen_kind(head, k, isa, choice)
            .map(|kind| self.install(|| screen::build(w, n, k, head, kind, isa)))
            .transpose()
    }

    fn screened_argmax(
        &self,
        x: &Vec<f32>,
        head: &CpuWeight,
        screen: &ScreenHead<CpuWeight>,
        rows: usize,
        banned: Option<usize>,
        scratch: &mut Vec<f32>,
    ) -> Result<Option<Vec<u32>>> {
        let s = &screen.weight;
        let fits = match s.kind {
            WeightDtype::Bf16 => head.kind == WeightDtype::F32 && screen.err_norms.is_empty(),
            WeightDtype::Int8 => {
                matches!(head.kind, WeightDtype::F32 | WeightDtype::Bf16)
                    && screen.err_norms.len() == head.n
            }
            _ => false,
        };
        if !fits || (s.n, s.k) != (head.n, head.k) || screen.norms.len() != head.n {
            return Err(T5Error::Backend(format!(
                "screened_argmax: a {} head of {} x {} with a {} screen of {} x {}, {} norms and {} error norms",
                head.kind,
                head.n,
                head.k,
                s.kind,
                s.n,
                s.k,
                screen.norms.len(),
                screen.err_norms.len()
            )));
        }
        check_len("screened_argmax x", x.len(), rows * head.k)?;
        check_len("screened_argmax scratch", scratch.len(), rows * head.n)?;
        let isa = self.isa;
        self.install(|| screen::screened_argmax(x, head, screen, rows, banned, scratch, isa))
    }

    fn argmax_rows(&self, x: &Vec<f32>, rows: usize, n: usize) -> Result<Vec<u32>> {
        check_len("argmax_rows", x.len(), rows * n)?;
        if n == 0 {
            return Ok(vec![0; rows]);
        }
        // Rows in parallel: a batch of 32 over a 32k vocabulary is a million values a step.
        Ok(self.install(|| {
            x[..rows * n]
                .par_chunks_exact(n)
                .map(crate::math::argmax)
                .collect()
        }))
    }

    fn fill_column(
        &self,
        x: &mut Vec<f32>,
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
        for r in 0..rows {
            x[r * n + col] = value;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A helper thread can take its part of a `run` (the helping loop) while it is inside a
    /// piece of that same call's parallel work that it stole first (it looks for work while
    /// waiting on that piece's own halves); the call's first thread then waits for the piece,
    /// and the piece for the loop. The loop must give way: many short calls of nested parallel
    /// work, watched by a thread that fails the test if they stall for 20 s.
    #[test]
    fn calls_of_nested_parallel_work_never_stall() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let b = CpuBackend::new(2).unwrap();
            for i in 0..3000u64 {
                let sum: u64 = b.run(|| {
                    (0..8u64)
                        .into_par_iter()
                        .map(|j| (0..4u64).into_par_iter().map(|k| i + j + k).sum::<u64>())
                        .sum()
                });
                assert_eq!(sum, 32 * i + 8 * 28 / 2 + 6 * 8);
            }
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("3000 calls of nested parallel work stalled");
    }

    /// Gaps between looks count up to the cap: a pause of the thread by the host is not idle
    /// time.
    #[test]
    fn idle_clock_caps_each_gap() {
        use std::time::Duration;
        let mut c = IdleClock::start();
        let t0 = c.last;
        assert_eq!(
            c.look_at(t0 + Duration::from_micros(300)),
            Duration::from_micros(300)
        );
        let paused = t0 + Duration::from_micros(300) + Duration::from_millis(50);
        assert_eq!(c.look_at(paused), Duration::from_micros(300) + IDLE_GAP_CAP);
        // A clock read earlier than the last look adds nothing.
        assert_eq!(c.look_at(t0), Duration::from_micros(300) + IDLE_GAP_CAP);
    }

    /// Embedding lookups, from a table and from a tied f32 head, on one thread (few ids) and
    /// on the pool (many): the rows asked for, and an error for an id past the vocabulary
    /// wherever it is.
    #[test]
    fn embedding_lookups_read_their_rows_serially_and_on_the_pool() {
        let b = CpuBackend::new(2).unwrap();
        let (vocab, d) = (300, 24);
        let table: Vec<f32> = (0..vocab * d)
            .map(|i| (i % 977) as f32 * 0.25 - 7.0)
            .collect();
        let head = b.upload_linear_f32(&table, vocab, d).unwrap();
        for count in [3, EMBED_PARALLEL_MIN - 1, EMBED_PARALLEL_MIN, 500] {
            let ids: Vec<u32> = (0..count).map(|i| ((i * 37 + 5) % vocab) as u32).collect();
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&id| table[id as usize * d..(id as usize + 1) * d].to_vec())
                .collect();
            let mut out = vec![0.0; count * d];
            b.run(|| b.embed_host(&ids, &table, &mut out, d)).unwrap();
            assert_eq!(out, want, "table, {count} ids");
            let mut out = vec![0.0; count * d];
            b.run(|| b.embed_linear(&ids, &head, &mut out, d)).unwrap();
            assert_eq!(out, want, "head, {count} ids");
            let mut bad = ids.clone();
            bad[count - 1] = vocab as u32;
            let mut out = vec![0.0; count * d];
            let e = b.embed_host(&bad, &table, &mut out, d).unwrap_err();
            assert!(e.to_string().contains("outside the vocabulary"), "{e}");
            let e = b.embed_linear(&bad, &head, &mut out, d).unwrap_err();
            assert!(e.to_string().contains("outside the vocabulary"), "{e}");
        }
        // Rows of no values: nothing to read, and no panic.
        b.embed_host(&[1, 2], &[], &mut Vec::new(), 0).unwrap();
        let empty = b.upload_linear_f32(&[], vocab, 0).unwrap();
        b.embed_linear(&[1, 2], &empty, &mut Vec::new(), 0).unwrap();
    }

    #[test]
    fn run_always_uses_the_pools_first_thread() {
        let b = CpuBackend::new(2).unwrap();
        for _ in 0..50 {
            assert_eq!(b.run(rayon::current_thread_index), Some(0));
            // Inside the pool, `run` calls straight through.
            assert_eq!(b.run(|| b.run(rayon::current_thread_index)), Some(0));
        }
        // Parallel work inside `run` still reaches every thread.
        let used: std::collections::HashSet<usize> = b.run(|| {
            (0..64)
                .into_par_iter()
                .map(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    rayon::current_thread_index().unwrap()
                })
                .collect()
        });
        assert_eq!(used.len(), 2);
    }

    /// A helper that left a call (its calling thread busy alone past the idle limits) helps
    /// it again from the call's next operation on.
    #[test]
    fn a_helper_that_left_comes_back_at_the_next_operation() {
        use std::sync::atomic::Ordering;
        use std::time::{Duration, Instant};
        if !spin_helpers() {
            return;
        }
        let b = CpuBackend::new(2).unwrap();
        let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
            let start = Instant::now();
            while !ok() {
                assert!(start.elapsed() < Duration::from_secs(5), "{what}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        b.run(|| {
            let call = CURRENT_CALL
                .with(|c| c.borrow().clone())
                .expect("a current call");
            wait_for("the helper never joined", &|| {
                call.joined.load(Ordering::Relaxed) == 1
            });
            // The calling thread busy alone: the helper leaves.
            std::thread::sleep(HELP_IDLE_WALL_LIMIT);
            wait_for("the helper never left", &|| {
                call.left.load(Ordering::Relaxed) == 1
            });
            b.install(|| ());
            wait_for("the helper did not come back", &|| {
                call.joined.load(Ordering::Relaxed) == 2
            });
        });
    }

    /// Two calls from two threads at once: the one that started first and ends first returns
    /// while the other still runs (a helper of the first that picked up the second's helper
    /// job would otherwise stay in it until the second ended, holding up the first's return).
    #[test]
    fn a_call_does_not_wait_for_a_concurrent_one() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;
        let b = CpuBackend::new(2).unwrap();
        let second_done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                b.run(|| {
                    std::thread::sleep(Duration::from_millis(1500));
                    second_done.store(true, Ordering::SeqCst);
                });
            });
            b.run(|| std::thread::sleep(Duration::from_millis(200)));
            assert!(
                !second_done.load(Ordering::SeqCst),
                "the first call returned only after the second had ended"
            );
        });
    }

    /// The calling thread's CPU time (user and system) so far.
    #[cfg(target_os = "linux")]
    fn thread_cpu_time() -> std::time::Duration {
        // SAFETY: `getrusage` only fills the struct it is given.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
        let tv = |t: libc::timeval| {
            std::time::Duration::from_secs(t.tv_sec as u64)
                + std::time::Duration::from_micros(t.tv_usec as u64)
        };
        tv(u.ru_utime) + tv(u.ru_stime)
    }

    /// A call whose own thread waits (here: sleeps 400 ms) does not keep the pool's other
    /// thread spinning: it naps once idle for a millisecond. Spinning, it would use about
    /// 400 ms of CPU time.
    #[cfg(target_os = "linux")]
    #[test]
    fn idle_helpers_do_not_spin_through_a_wait() {
        let b = CpuBackend::new(2).unwrap();
        let times = || b.pool.broadcast(|_| thread_cpu_time());
        let before = times();
        b.run(|| std::thread::sleep(std::time::Duration::from_millis(400)));
        let after = times();
        let helper = after[1] - before[1];
        assert!(
            helper < std::time::Duration::from_millis(150),
            "the idle thread used {helper:?} of CPU time"
        );
    }
}
