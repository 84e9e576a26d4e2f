//! Decoding steps as CUDA graphs. A batch-1 decoding step of t5-base is a few hundred small
//! launches, and launching them one by one from the host costs more than the GPU's work; a
//! graph captured once and replayed launches them all in one call.
//!
//! The decoder asks the backend how to run each step ([`crate::backend::Backend::begin_step`])
//! with its state's layout id: an id that changes whenever the state's buffers move (rows
//! dropped, caches grown, rows joined). The first step of a layout runs as usual; the second
//! is captured (the kernels then read the step's position and token ids from a small device
//! buffer, [`StepGraphs::args`], uploaded before each step); later steps of that layout replay
//! the graph. A capture that fails (an operation that cannot be captured) makes the step run
//! uncaptured, and after a few failures graphs are switched off for this backend.
//!
//! A capture records everything queued on the backend's stream meanwhile, from any thread: one
//! thread at a time must drive a backend while graphs are on (the engine's worker does). Other
//! callers turn graphs off (`T5RT_CUDA_GRAPHS=0`, [`super::CudaBackend::set_graphs`]).

use cudarc::driver::{CudaGraph, CudaSlice};

/// Graphs kept at once (one per live layout; a batch that drops rows makes a new one).
const KEEP: usize = 8;
/// Failed captures after which graphs are switched off.
const MAX_FAILURES: u64 = 3;

/// Counts of how decoding steps ran, for benchmarks and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Steps captured as a graph (and then run through it).
    pub captures: u64,
    /// Steps that replayed a graph captured earlier.
    pub replays: u64,
    /// Steps run launch by launch (graphs off, a layout's first step, a mask, a failure).
    pub eager: u64,
    /// Captures that failed (the step then ran launch by launch).
    pub failures: u64,
}

/// A captured step. cudarc's graph holds raw driver handles, so it is not `Send`; it is only
/// used under [`StepGraphs`]'s mutex, one thread at a time, as the driver requires.
pub(super) struct Graph(pub CudaGraph);

// SAFETY: the graph is only touched with the backend's `steps` mutex held (see above), and the
// driver's handles may be used from any thread of the process.
unsafe impl Send for Graph {}

/// The backend's captured steps and the device buffer their kernels read.
pub(super) struct StepGraphs {
    pub enabled: bool,
    /// `[position, token ids...]` of the current step on the device.
    pub args: Option<CudaSlice<u32>>,
    /// The layout whose first step ran last (the next step of it is captured).
    pub seen: Option<u64>,
    /// The layout being captured.
    pub capturing: Option<u64>,
    /// The layout whose capture failed (its steps run uncaptured).
    pub failed: Option<u64>,
    graphs: Vec<(u64, Graph)>,
    pub stats: GraphStats,
}

impl StepGraphs {
    pub fn new(enabled: bool) -> Self {
        StepGraphs {
            enabled,
            args: None,
            seen: None,
            capturing: None,
            failed: None,
            graphs: Vec::new(),
            stats: GraphStats::default(),
        }
    }

    /// Drops every graph (the buffers they read are about to move).
    pub fn forget(&mut self) {
        self.graphs.clear();
        self.seen = None;
    }

    pub fn find(&self, layout: u64) -> Option<&Graph> {
        self.graphs
            .iter()
            .find(|(l, _)| *l == layout)
            .map(|(_, g)| g)
    }

    /// Keeps `graph` for `layout`, dropping the oldest beyond [`KEEP`].
    pub fn keep(&mut self, layout: u64, graph: Graph) {
        if self.graphs.len() >= KEEP {
            self.graphs.remove(0);
        }
        self.graphs.push((layout, graph));
    }

    /// Records a failed capture of `layout`; switches graphs off after [`MAX_FAILURES`].
    pub fn fail(&mut self, layout: Option<u64>) {
        self.stats.failures += 1;
        self.failed = layout;
        self.seen = None;
        if self.stats.failures >= MAX_FAILURES {
            self.enabled = false;
            self.graphs.clear();
        }
    }
}
