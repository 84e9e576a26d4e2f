//! Python values <-> the library's types: inputs, options, results, errors.

use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use t5rt::{EarlyStopping, GenerationConfig, Hypothesis, T5Config, T5Error, T5Tokenizer};

use crate::GenerationResult;

/// The library's error as the Python exception a user expects, with the same message the CLI
/// prints: ValueError for bad input, FileNotFoundError for a missing file, OSError for other
/// I/O, KeyboardInterrupt for a cancelled call, RuntimeError for a device failure.
pub fn to_py_err(e: T5Error) -> PyErr {
    let msg = e.to_string();
    match &e {
        T5Error::MissingFile { .. } => PyFileNotFoundError::new_err(msg),
        T5Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(msg)
        }
        T5Error::Io { .. } => PyOSError::new_err(msg),
        T5Error::Cancelled => PyKeyboardInterrupt::new_err(msg),
        T5Error::Backend(_) => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// `inputs` as given.
pub enum Inputs {
    /// Texts; `single` when one string was given (the result is then not a list).
    Texts { texts: Vec<String>, single: bool },
    /// Token ids; `single` when one flat list of ids was given.
    Ids { ids: Vec<Vec<u32>>, single: bool },
}

const INPUTS_TYPE: &str =
    "inputs must be a string, a list of strings, or token ids (a list of ints, a list of lists of ints, or a 2-D numpy array)";

fn ids_of(rows: Vec<Vec<i64>>) -> PyResult<Vec<Vec<u32>>> {
    rows.into_iter()
        .map(|row| {
            row.into_iter()
                .map(|id| {
                    u32::try_from(id).map_err(|_| {
                        PyValueError::new_err(format!("token id {id} is not a valid id"))
                    })
                })
                .collect()
        })
        .collect()
}

impl Inputs {
    pub fn from_py(obj: &Bound<'_, PyAny>) -> PyResult<Inputs> {
        if let Ok(s) = obj.downcast::<PyString>() {
            return Ok(Inputs::Texts {
                texts: vec![s.to_str()?.to_string()],
                single: true,
            });
        }
        // A numpy array (or anything array-like with `ndim` and `tolist`).
        if obj.hasattr("tolist")? && obj.hasattr("ndim")? {
            let ndim: usize = obj.getattr("ndim")?.extract()?;
            if ndim != 2 {
                return Err(PyValueError::new_err(format!(
                    "an array of token ids must have 2 dimensions (sequences, ids), not {ndim}"
                )));
            }
            let rows: Vec<Vec<i64>> = obj
                .call_method0("tolist")?
                .extract()
                .map_err(|_| PyTypeError::new_err("an array of token ids must hold integers"))?;
            return Ok(Inputs::Ids {
                ids: ids_of(rows)?,
                single: false,
            });
        }
        let list = obj
            .downcast::<PyList>()
            .map_err(|_| PyTypeError::new_err(INPUTS_TYPE))?;
        if list.is_empty() {
            return Err(PyValueError::new_err("inputs is an empty list"));
        }
        let first = list.get_item(0)?;
        if first.is_instance_of::<pyo3::types::PyInt>() {
            // One sequence of ids.
            let row: Vec<i64> = list
                .extract()
                .map_err(|_| PyTypeError::new_err(INPUTS_TYPE))?;
            return Ok(Inputs::Ids {
                ids: ids_of(vec![row])?,
                single: true,
            });
        }
        if first.is_instance_of::<PyString>() {
            let texts: Vec<String> = list.extract().map_err(|_| {
                PyTypeError::new_err("a list of inputs must be all strings or all lists of ids")
            })?;
            return Ok(Inputs::Texts {
                texts,
                single: false,
            });
        }
        let rows: Vec<Vec<i64>> = list
            .extract()
            .map_err(|_| PyTypeError::new_err(INPUTS_TYPE))?;
        Ok(Inputs::Ids {
            ids: ids_of(rows)?,
            single: false,
        })
    }

    /// Token ids: texts through the tokenizer (an error without one).
    pub fn ids(&self, tok: Option<&T5Tokenizer>) -> PyResult<Vec<Vec<u32>>> {
        match self {
            Inputs::Ids { ids, .. } => Ok(ids.clone()),
            Inputs::Texts { texts, .. } => texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    if t.trim().is_empty() {
                        return Err(PyValueError::new_err(format!("input {} is empty", i + 1)));
                    }
                    t5rt::Input::Text(t.clone()).encode(tok).map_err(to_py_err)
                })
                .collect(),
        }
    }
}

/// `early_stopping`: True, False (or None) or "never".
pub fn early_stopping(v: Option<&Bound<'_, PyAny>>) -> PyResult<EarlyStopping> {
    let Some(v) = v else {
        return Ok(EarlyStopping::False);
    };
    if let Ok(b) = v.extract::<bool>() {
        return Ok(if b {
            EarlyStopping::True
        } else {
            EarlyStopping::False
        });
    }
    match v.extract::<String>() {
        Ok(s) if s == "never" => Ok(EarlyStopping::Never),
        _ => Err(PyValueError::new_err(
            "early_stopping must be True, False or \"never\"",
        )),
    }
}

/// `stop`: None, a string or a list of strings.
pub fn stop_strings(v: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    match v {
        None => Ok(Vec::new()),
        Some(v) if v.is_none() => Ok(Vec::new()),
        Some(v) => {
            if let Ok(s) = v.extract::<String>() {
                return Ok(vec![s]);
            }
            v.extract::<Vec<String>>()
                .map_err(|_| PyTypeError::new_err("stop must be a string or a list of strings"))
        }
    }
}

/// The decoding options of a call.
pub struct Options {
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: usize,
    pub num_beams: usize,
    pub num_return_sequences: usize,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    pub do_sample: bool,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub no_repeat_ngram_size: usize,
    pub seed: u64,
    pub stop: Vec<String>,
    pub batch_size: usize,
}

impl Options {
    /// The library's config: these options over the model's defaults (its
    /// generation_config.json supplies `max_new_tokens` when None, and the options not here).
    pub fn config(self, defaults: &GenerationConfig) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: self.max_new_tokens.unwrap_or(defaults.max_new_tokens),
            min_new_tokens: self.min_new_tokens,
            num_beams: self.num_beams,
            num_return_sequences: self.num_return_sequences,
            length_penalty: self.length_penalty,
            early_stopping: self.early_stopping,
            do_sample: self.do_sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            seed: self.seed,
            stop_strings: self.stop,
            batch_size: self.batch_size,
            ..defaults.clone()
        }
    }
}

/// Results in the shape the call asked for (see `Model.generate`).
pub fn outputs<'py>(
    py: Python<'py>,
    inputs: &Inputs,
    out: Vec<Vec<Hypothesis>>,
    tok: Option<&T5Tokenizer>,
    n_best: bool,
    details: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let texts = matches!(inputs, Inputs::Texts { .. });
    let one = |h: Hypothesis| -> PyResult<Bound<'py, PyAny>> {
        let text = tok
            .map(|t| t.decode(&h.ids))
            .transpose()
            .map_err(to_py_err)?;
        if details {
            let r = GenerationResult {
                text,
                ids: h.ids,
                score: h.score,
            };
            return Ok(Bound::new(py, r)?.into_any());
        }
        if texts {
            Ok(text.unwrap_or_default().into_pyobject(py)?.into_any())
        } else {
            Ok(h.ids.into_pyobject(py)?.into_any())
        }
    };
    let mut per_input = Vec::with_capacity(out.len());
    for hyps in out {
        let item = if n_best {
            let all = hyps.into_iter().map(one).collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, all)?.into_any()
        } else {
            let best = hyps
                .into_iter()
                .next()
                .ok_or_else(|| PyRuntimeError::new_err("no sequence was generated"))?;
            one(best)?
        };
        per_input.push(item);
    }
    if let Inputs::Texts { single: true, .. } | Inputs::Ids { single: true, .. } = inputs {
        return per_input
            .into_iter()
            .next()
            .ok_or_else(|| PyRuntimeError::new_err("no result"));
    }
    Ok(PyList::new(py, per_input)?.into_any())
}

/// config.json's fields as a dict.
pub fn config_dict<'py>(py: Python<'py>, c: &T5Config) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("model_type", &c.model_type)?;
    d.set_item("vocab_size", c.vocab_size)?;
    d.set_item("d_model", c.d_model)?;
    d.set_item("d_kv", c.d_kv)?;
    d.set_item("d_ff", c.d_ff)?;
    d.set_item("num_layers", c.num_layers)?;
    d.set_item("num_decoder_layers", c.num_decoder_layers)?;
    d.set_item("num_heads", c.num_heads)?;
    d.set_item(
        "relative_attention_num_buckets",
        c.relative_attention_num_buckets,
    )?;
    d.set_item(
        "relative_attention_max_distance",
        c.relative_attention_max_distance,
    )?;
    d.set_item("layer_norm_epsilon", c.layer_norm_epsilon)?;
    let act = match c.activation {
        t5rt::Activation::Relu => "relu",
        t5rt::Activation::GeluNew => "gelu_new",
        t5rt::Activation::Silu => "silu",
    };
    d.set_item("dense_act_fn", act)?;
    d.set_item("is_gated_act", c.is_gated_act)?;
    d.set_item("tie_word_embeddings", c.tie_word_embeddings)?;
    d.set_item("pad_token_id", c.pad_token_id)?;
    d.set_item("eos_token_id", c.eos_token_id)?;
    d.set_item("decoder_start_token_id", c.decoder_start_token_id)?;
    Ok(d)
}
