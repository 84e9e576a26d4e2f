//! Python bindings of t5rt (module `t5rt`, native part `t5rt._t5rt`). Thin by design: type
//! conversion, the GIL released around every generation (`Python::detach`), Ctrl-C turned into
//! a cancellation of the work, errors mapped to Python exceptions with the library's messages.
//! Every behaviour lives in the Rust library.

mod convert;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyStopIteration, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use t5rt::engine::{EngineConfig, EngineHandle, Event, RequestStream};
use t5rt::{Checkpoint, CpuBackend, GenerationConfig, Limits, T5Model, T5Tokenizer, WeightDtype};

use convert::{to_py_err, Inputs, Options};

/// How often a call waiting for Rust work takes the GIL back to look for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Runs `work` on another thread with the GIL released; every [`SIGNAL_POLL`] the calling
/// thread checks for signals (Ctrl-C): then `cancel` is set, the work stops at its next
/// decoding step, and the signal's exception is raised.
fn run_interruptible<T: Send>(
    py: Python<'_>,
    cancel: &AtomicBool,
    work: impl FnOnce() -> T + Send,
) -> PyResult<T> {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        s.spawn(move || {
            let _ = tx.send(work());
        });
        let mut rx = Some(rx);
        loop {
            // (The receiver moves into the GIL-free closure and back: it is Send, not Sync.)
            let r = rx.take().expect("put back each turn");
            let (got, r) = py.detach(move || (r.recv_timeout(SIGNAL_POLL), r));
            rx = Some(r);
            match got {
                Ok(v) => return Ok(v),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        cancel.store(true, Ordering::Relaxed);
                        return Err(e); // the scope waits for the worker, which stops soon
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(pyo3::exceptions::PyRuntimeError::new_err(
                        "the generation thread ended without a result",
                    ))
                }
            }
        }
    })
}

/// A T5-family model (t5, FLAN-T5 / T5 v1.1, mT5) loaded from a Hugging Face checkpoint
/// directory (`config.json`, `model.safetensors`, `tokenizer.json`), ready to generate.
///
/// `Model()` with no path loads the small bundled model that spells out numbers
/// (`model.generate("spell: 1984")`).
#[pyclass(frozen, module = "t5rt")]
struct Model {
    model: Arc<T5Model<CpuBackend>>,
    tokenizer: Option<Arc<T5Tokenizer>>,
    /// The model's generation_config.json defaults.
    defaults: GenerationConfig,
    name: String,
    /// Started on the first `generate_stream`.
    engine: OnceLock<EngineHandle>,
}

fn load(path: Option<PathBuf>, device: &str, dtype: &str, threads: usize) -> PyResult<Model> {
    match device {
        "cpu" => {}
        d if d == "cuda" || d.starts_with("cuda:") => {
            return Err(PyValueError::new_err(format!(
                "device `{d}`: this build of t5rt has no CUDA support; use device=\"cpu\""
            )))
        }
        other => {
            return Err(PyValueError::new_err(format!(
                "device `{other}`: expected \"cpu\""
            )))
        }
    }
    let dtype: WeightDtype = dtype.parse().map_err(PyValueError::new_err)?;
    let (ckpt, name) = match &path {
        Some(p) => (
            Checkpoint::open(p).map_err(to_py_err)?,
            p.display().to_string(),
        ),
        None => (
            t5rt::bundled::checkpoint().map_err(to_py_err)?,
            t5rt::bundled::NAME.to_string(),
        ),
    };
    let backend = CpuBackend::new(threads)
        .map_err(to_py_err)?
        .with_dtype(dtype);
    let model = ckpt.load_model(backend).map_err(to_py_err)?;
    let Checkpoint {
        tokenizer,
        generation,
        ..
    } = ckpt;
    Ok(Model {
        model: Arc::new(model),
        tokenizer: tokenizer.map(Arc::new),
        defaults: GenerationConfig::from_model(&generation),
        name,
        engine: OnceLock::new(),
    })
}

#[pymethods]
impl Model {
    /// Loads a checkpoint directory (`path=None`: the bundled model) on `device` ("cpu"),
    /// with linear-layer weights in `dtype` ("f32", "bf16" or "int8") and `threads` CPU
    /// threads (0: one per core).
    #[new]
    #[pyo3(signature = (path=None, *, device="cpu", dtype="f32", threads=0))]
    fn new(
        py: Python<'_>,
        path: Option<PathBuf>,
        device: &str,
        dtype: &str,
        threads: usize,
    ) -> PyResult<Self> {
        let (device, dtype) = (device.to_string(), dtype.to_string());
        py.detach(move || load(path, &device, &dtype, threads))
    }

    /// The same as `Model(path, ...)`, named as in Hugging Face transformers.
    #[staticmethod]
    #[pyo3(signature = (path=None, *, device="cpu", dtype="f32", threads=0))]
    fn from_pretrained(
        py: Python<'_>,
        path: Option<PathBuf>,
        device: &str,
        dtype: &str,
        threads: usize,
    ) -> PyResult<Self> {
        Model::new(py, path, device, dtype, threads)
    }

    /// Generates for one input or many, with Hugging Face `generate()` semantics.
    ///
    /// `inputs`: a string, a list of strings, or token ids (a list of lists of ints, or a
    /// 2-D numpy array). Returns a string per string input (a list for a list), the generated
    /// ids per id input; with `num_return_sequences > 1`, a list of those per input (the n
    /// best, or n samples). With `return_details=True`, `GenerationResult`s (`text`, `ids`,
    /// `score`) instead.
    ///
    /// Options: `max_new_tokens` (None: the model's generation_config.json, else 128),
    /// `min_new_tokens`, `num_beams` (beam search when > 1), `num_return_sequences`,
    /// `length_penalty`, `early_stopping` (True, False or "never"), `do_sample`, `temperature`,
    /// `top_k`, `top_p`, `repetition_penalty`, `no_repeat_ngram_size`, `seed` (same seed,
    /// same samples), `stop` (a string or a list: stop once the text contains one),
    /// `batch_size` (inputs decoded together). The GIL is released while generating; Ctrl-C
    /// stops the call with KeyboardInterrupt. Bad input raises ValueError or TypeError.
    #[pyo3(signature = (
        inputs, *, max_new_tokens=None, min_new_tokens=0, num_beams=1,
        num_return_sequences=1, length_penalty=1.0, early_stopping=None, do_sample=false,
        temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        seed=0, stop=None, batch_size=16, return_details=false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        inputs: &Bound<'py, PyAny>,
        max_new_tokens: Option<usize>,
        min_new_tokens: usize,
        num_beams: usize,
        num_return_sequences: usize,
        length_penalty: f64,
        early_stopping: Option<&Bound<'py, PyAny>>,
        do_sample: bool,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        repetition_penalty: f32,
        no_repeat_ngram_size: usize,
        seed: u64,
        stop: Option<&Bound<'py, PyAny>>,
        batch_size: usize,
        return_details: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let opts = Options {
            max_new_tokens,
            min_new_tokens,
            num_beams,
            num_return_sequences,
            length_penalty,
            early_stopping: convert::early_stopping(early_stopping)?,
            do_sample,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            no_repeat_ngram_size,
            seed,
            stop: convert::stop_strings(stop)?,
            batch_size,
        };
        let cfg = opts.config(&self.defaults);
        let inputs = Inputs::from_py(inputs)?;
        let tok = self.tokenizer.as_deref();
        let ids = inputs.ids(tok)?;
        let cancel = AtomicBool::new(false);
        let model = &self.model;
        let out = run_interruptible(py, &cancel, || {
            t5rt::generate_cancellable(model, &ids, &cfg, tok, |_| {}, &cancel)
        })?
        .map_err(to_py_err)?
        .0;
        convert::outputs(
            py,
            &inputs,
            out,
            tok,
            num_return_sequences > 1,
            return_details,
        )
    }

    /// Generates for one text (or one list of token ids), yielding `(id, text)` for each new
    /// token as it is decoded; `text` is what the token adds to the decoded output (empty for
    /// EOS). Takes the options of `generate` (not `batch_size` or `return_details`); the
    /// tokens equal `generate`'s for the same input and options.
    #[pyo3(signature = (
        inputs, *, max_new_tokens=None, min_new_tokens=0, num_beams=1,
        length_penalty=1.0, early_stopping=None, do_sample=false,
        temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        seed=0, stop=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn generate_stream<'py>(
        &self,
        inputs: &Bound<'py, PyAny>,
        max_new_tokens: Option<usize>,
        min_new_tokens: usize,
        num_beams: usize,
        length_penalty: f64,
        early_stopping: Option<&Bound<'py, PyAny>>,
        do_sample: bool,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        repetition_penalty: f32,
        no_repeat_ngram_size: usize,
        seed: u64,
        stop: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<TokenStream> {
        let opts = Options {
            max_new_tokens,
            min_new_tokens,
            num_beams,
            num_return_sequences: 1,
            length_penalty,
            early_stopping: convert::early_stopping(early_stopping)?,
            do_sample,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            no_repeat_ngram_size,
            seed,
            stop: convert::stop_strings(stop)?,
            batch_size: 1,
        };
        let cfg = opts.config(&self.defaults);
        let inputs = Inputs::from_py(inputs)?;
        let tok = self.tokenizer.as_deref();
        let mut ids = inputs.ids(tok)?;
        if ids.len() != 1 {
            return Err(PyValueError::new_err(
                "generate_stream takes one input (a string, or one list of token ids)",
            ));
        }
        let ids = ids.remove(0);
        // The same checks as `generate`, and the memory plan of this one sequence.
        cfg.validate(&self.model.config).map_err(to_py_err)?;
        self.model
            .check_inputs(std::slice::from_ref(&ids))
            .map_err(to_py_err)?;
        let shape = t5rt::generate::memory::BatchShape::on(
            &self.model,
            1,
            cfg.num_beams,
            ids.len(),
            cfg.new_token_limit(),
        );
        t5rt::generate::memory::require_fit(
            &self.model.config,
            t5rt::Backend::weight_dtype(&self.model.backend),
            &cfg,
            t5rt::generate::memory::available_for(&self.model.backend),
            shape,
        )
        .map_err(to_py_err)?;
        let engine = self.engine()?;
        let stream = engine
            .submit(ids, cfg)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(TokenStream {
            inner: Mutex::new(StreamState {
                stream,
                ids: Vec::new(),
                text: String::new(),
                done: false,
            }),
            tokenizer: self.tokenizer.clone(),
        })
    }

    /// The model's tokenizer (None when the checkpoint has no tokenizer.json).
    #[getter]
    fn tokenizer(&self) -> Option<Tokenizer> {
        self.tokenizer.clone().map(|inner| Tokenizer { inner })
    }

    /// The model's config.json, as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        convert::config_dict(py, &self.model.config)
    }

    fn __repr__(&self) -> String {
        format!(
            "t5rt.Model({:?}, {})",
            self.name,
            t5rt::Backend::name(&self.model.backend)
        )
    }
}

impl Model {
    /// The streaming engine, started on first use.
    fn engine(&self) -> PyResult<&EngineHandle> {
        if let Some(e) = self.engine.get() {
            return Ok(e);
        }
        let config = EngineConfig {
            max_input_tokens: Limits::MAX_INPUT_TOKENS,
            max_new_tokens: Limits::MAX_NEW_TOKENS,
            max_batch_tokens: usize::MAX / 4,
            ..EngineConfig::default()
        };
        let engine = EngineHandle::start(self.model.clone(), self.tokenizer.clone(), config)
            .map_err(to_py_err)?;
        Ok(self.engine.get_or_init(|| engine))
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        if let Some(e) = self.engine.get() {
            e.shutdown();
        }
    }
}

struct StreamState {
    stream: RequestStream,
    ids: Vec<u32>,
    text: String,
    done: bool,
}

/// An iterator over `(id, text)` of new tokens (`Model.generate_stream`). Dropping it
/// cancels the generation.
#[pyclass(module = "t5rt")]
struct TokenStream {
    inner: Mutex<StreamState>,
    tokenizer: Option<Arc<T5Tokenizer>>,
}

#[pymethods]
impl TokenStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<(u32, String)> {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if st.done {
            return Err(PyStopIteration::new_err(()));
        }
        loop {
            // Wait without the GIL, looking for Ctrl-C between waits.
            let started = Instant::now();
            let events = &mut st.stream.events;
            let event = py.detach(|| loop {
                match events.try_recv() {
                    Ok(e) => break Some(e),
                    Err(tokio_like::Empty) if started.elapsed() < SIGNAL_POLL => {
                        std::thread::sleep(Duration::from_micros(200))
                    }
                    Err(tokio_like::Empty) => break None,
                    Err(tokio_like::Disconnected) => {
                        break Some(Event::Error("the generation ended without a result".into()))
                    }
                }
            });
            match event {
                None => {
                    if let Err(e) = py.check_signals() {
                        st.stream.cancel();
                        st.done = true;
                        return Err(e);
                    }
                }
                Some(Event::Token(t)) => {
                    st.ids.push(t.id);
                    let piece = match &self.tokenizer {
                        Some(tok) => {
                            let text = tok.decode(&st.ids).unwrap_or_default();
                            if text.starts_with(st.text.as_str()) && !text.ends_with('\u{fffd}') {
                                let piece = text[st.text.len()..].to_string();
                                st.text = text;
                                piece
                            } else {
                                String::new()
                            }
                        }
                        None => String::new(),
                    };
                    return Ok((t.id, piece));
                }
                Some(Event::Done(_)) => {
                    st.done = true;
                    return Err(PyStopIteration::new_err(()));
                }
                Some(Event::Error(e)) => {
                    st.done = true;
                    return Err(PyValueError::new_err(e));
                }
            }
        }
    }
}

/// The receiver's error names, shortened.
mod tokio_like {
    pub use t5rt::engine::TryRecvError::{Disconnected, Empty};
}

/// Text <-> ids with the model's tokenizer.json (a `</s>` is appended when encoding, as the
/// T5 tokenizers do).
#[pyclass(frozen, module = "t5rt")]
struct Tokenizer {
    inner: Arc<T5Tokenizer>,
}

#[pymethods]
impl Tokenizer {
    /// Text -> token ids.
    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        self.inner.encode(text).map_err(to_py_err)
    }

    /// Token ids -> text, without special tokens.
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        self.inner.decode(&ids).map_err(to_py_err)
    }

    /// Tokens in the vocabulary, added ones included.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
}

/// One generated sequence: its text (None without a tokenizer), its ids (after the decoder
/// start token, EOS included when produced) and its beam score (None when not beam search).
#[pyclass(frozen, get_all, module = "t5rt")]
struct GenerationResult {
    text: Option<String>,
    ids: Vec<u32>,
    score: Option<f32>,
}

#[pymethods]
impl GenerationResult {
    fn __repr__(&self) -> String {
        format!(
            "GenerationResult(text={:?}, ids={:?}, score={:?})",
            self.text, self.ids, self.score
        )
    }
}

#[pymodule]
fn _t5rt(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<Tokenizer>()?;
    m.add_class::<GenerationResult>()?;
    m.add_class::<TokenStream>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
