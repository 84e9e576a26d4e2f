//! A restricted unpickler for PyTorch state dicts (`torch.save` of a `state_dict()`): it knows
//! the opcodes such a pickle uses and a fixed list of globals (an ordered dict, the tensor
//! rebuild functions, the storage types), and refuses everything else with an error that names
//! it. Nothing in the file is ever executed or constructed beyond these values: a pickle that
//! asks for `os.system` or any other global is an error, not a call.

use std::collections::HashMap;

use safetensors::Dtype;

/// A value on the unpickler's stack.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// A dict or an ordered dict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// One of the allowed globals.
    Global(Allowed),
    /// A storage named by a persistent id: its element type, its key (the archive entry
    /// `data/<key>`) and its length in elements.
    Storage {
        dtype: Dtype,
        key: String,
        numel: usize,
    },
    Tensor(TensorRef),
}

/// A tensor: a view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub dtype: Dtype,
    pub key: String,
    pub storage_numel: usize,
    /// In elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// The globals a state dict may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(StorageKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    Float,
    Half,
    BFloat16,
}

impl StorageKind {
    fn dtype(self) -> Dtype {
        match self {
            StorageKind::Float => Dtype::F32,
            StorageKind::Half => Dtype::F16,
            StorageKind::BFloat16 => Dtype::BF16,
        }
    }
}

fn allowed(module: &str, name: &str) -> Result<Allowed, String> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Allowed::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Allowed::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Allowed::RebuildParameter,
        ("torch", "FloatStorage") => Allowed::Storage(StorageKind::Float),
        ("torch", "HalfStorage") => Allowed::Storage(StorageKind::Half),
        ("torch", "BFloat16Storage") => Allowed::Storage(StorageKind::BFloat16),
        ("torch", s) if s.ends_with("Storage") => {
            return Err(format!(
                "tensors stored as torch.{s}: t5rt reads float32, float16 and bfloat16 weights"
            ))
        }
        _ => {
            return Err(format!(
                "refusing to load global `{module}.{name}`: a weights file may only name tensors \
                 and their storages (this pickle would run or build other Python objects)"
            ))
        }
    })
}

/// Unpickles `data`: the value at STOP.
pub fn load(data: &[u8]) -> Result<Value, String> {
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| "the pickle is truncated".to_string())?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("the pickle is truncated")?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| "a global name is not UTF-8")?
            .to_string();
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> Result<Value, String> {
        let b = self.take(n)?;
        Ok(Value::Str(
            String::from_utf8(b.to_vec()).map_err(|_| "a string is not UTF-8")?,
        ))
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "the pickle's stack underflows".into())
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| "the pickle's stack underflows".into())
    }

    /// The values pushed since the last MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let at = self.marks.pop().ok_or("a pickle opcode needs a MARK")?;
        if at > self.stack.len() {
            return Err("the pickle's MARK is past its stack".into());
        }
        Ok(self.stack.split_off(at))
    }

    fn memo_put(&mut self, key: u32) -> Result<(), String> {
        let v = self
            .stack
            .last()
            .ok_or("the pickle's stack underflows")?
            .clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), String> {
        let v = self
            .memo
            .get(&key)
            .ok_or_else(|| format!("the pickle reads memo {key}, never written"))?
            .clone();
        self.stack.push(v);
        Ok(())
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("pickle protocol {proto} is unknown"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err("an integer wider than 64 bits".into());
                    }
                    let b = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n); // negative: sign-extend
                    }
                    self.stack.push(Value::Int(v))
                }
                b'G' => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                    self.stack.push(Value::Float(v))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?).map_err(|_| "a string too long")?;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(v))
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(v))
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("the pickle's stack underflows".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items))
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return Err("APPEND to something that is not a list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err("APPENDS to something that is not a list".into()),
                    }
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(pairs(items)?))
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => return Err("SETITEM on something that is not a dict".into()),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let items = pairs(items)?;
                    match self.top()? {
                        Value::Dict(d) => d.extend(items),
                        _ => return Err("SETITEMS on something that is not a dict".into()),
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(allowed(&module, &name)?))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.stack.push(Value::Global(allowed(&m, &n)?))
                        }
                        _ => return Err("STACK_GLOBAL without two names".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent(pid)?)
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(reduce(callable, args)?)
                }
                b'b' => {
                    // BUILD: state for the object below (an ordered dict's `_metadata`):
                    // ignored, and only allowed on dicts and tensors.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        _ => return Err("BUILD on an object t5rt does not make".into()),
                    }
                }
                other => {
                    return Err(format!(
                        "pickle opcode 0x{other:02x} is not one a tensor state dict uses"
                    ))
                }
            }
        }
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, String> {
    if !items.len().is_multiple_of(2) {
        return Err("a dict with a key and no value".into());
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// `('storage', <storage type>, key, location, numel)`: a storage of the archive.
fn persistent(pid: Value) -> Result<Value, String> {
    let Value::Tuple(items) = pid else {
        return Err("a persistent id that is not a tuple".into());
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(Allowed::Storage(kind)), Value::Str(key), _location, Value::Int(numel)]
            if tag == "storage" && *numel >= 0 =>
        {
            Ok(Value::Storage {
                dtype: kind.dtype(),
                key: key.clone(),
                numel: *numel as usize,
            })
        }
        _ => Err("a persistent id that is not a tensor storage".into()),
    }
}

fn usizes(v: &Value, what: &str) -> Result<Vec<usize>, String> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|i| match i {
                Value::Int(n) if *n >= 0 => Ok(*n as usize),
                _ => Err(format!("a tensor's {what} holds a non-integer")),
            })
            .collect(),
        _ => Err(format!("a tensor's {what} is not a tuple")),
    }
}

/// Calls one of the allowed functions on `args`.
fn reduce(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global(f) = callable else {
        return Err("REDUCE of something that is not an allowed global".into());
    };
    let Value::Tuple(args) = args else {
        return Err("REDUCE arguments that are not a tuple".into());
    };
    match f {
        Allowed::OrderedDict => Ok(Value::Dict(Vec::new())),
        Allowed::RebuildTensorV2 => match args.as_slice() {
            [Value::Storage { dtype, key, numel }, Value::Int(offset), size, stride, ..]
                if *offset >= 0 =>
            {
                Ok(Value::Tensor(TensorRef {
                    dtype: *dtype,
                    key: key.clone(),
                    storage_numel: *numel,
                    offset: *offset as usize,
                    shape: usizes(size, "size")?,
                    stride: usizes(stride, "stride")?,
                }))
            }
            _ => Err("_rebuild_tensor_v2 with unexpected arguments".into()),
        },
        Allowed::RebuildParameter => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err("_rebuild_parameter without a tensor".into()),
        },
        Allowed::Storage(_) => Err("a storage type called as a function".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_os_system_and_unknown_opcodes() {
        // cos\nsystem\n(S'echo pwned'\ntR.  (protocol 0, as a hand-made exploit looks)
        let evil = b"cos\nsystem\n(S'echo pwned'\ntR.";
        let err = load(evil).unwrap_err();
        assert!(err.contains("os.system"), "{err}");
        // builtins.eval through STACK_GLOBAL
        let mut p = vec![0x80, 4, 0x8c, 8];
        p.extend(b"builtins");
        p.extend([0x8c, 4]);
        p.extend(b"eval");
        p.extend([0x93, b'.']);
        assert!(load(&p).unwrap_err().contains("builtins.eval"));
        // INST (protocol 0 object creation) is not an allowed opcode
        assert!(load(b"(iposix\nsystem\n.").unwrap_err().contains("0x69"));
        assert!(load(b"").unwrap_err().contains("truncated"));
        assert!(load(&[0x80, 2, b'K']).unwrap_err().contains("truncated"));
    }

    #[test]
    fn reads_ints_strings_and_containers() {
        // {'a': (1, -2, 300, 70000), 'b': [None, True]} at protocol 2
        let mut p = vec![0x80, 2, b'}', b'(', b'X', 1, 0, 0, 0, b'a', b'('];
        p.extend([b'K', 1, 0x8a, 1, 0xfe, b'M', 0x2c, 0x01, b'J']);
        p.extend(70000i32.to_le_bytes());
        p.extend([
            b't', b'X', 1, 0, 0, 0, b'b', b']', b'(', b'N', 0x88, b'e', b'u', b'.',
        ]);
        let v = load(&p).unwrap();
        assert_eq!(
            v,
            Value::Dict(vec![
                (
                    Value::Str("a".into()),
                    Value::Tuple(vec![
                        Value::Int(1),
                        Value::Int(-2),
                        Value::Int(300),
                        Value::Int(70000)
                    ])
                ),
                (
                    Value::Str("b".into()),
                    Value::List(vec![Value::None, Value::Bool(true)])
                ),
            ])
        );
    }
}
