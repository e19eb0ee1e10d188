//! A restricted pickle reader for torch checkpoints.
//!
//! Pickle is a program for a stack machine whose GLOBAL/REDUCE opcodes import and call
//! arbitrary Python callables; loading an untrusted checkpoint with Python's `pickle`
//! runs whatever it names. This reader runs none: it understands the data opcodes torch
//! writes and knows, as data, exactly the globals a state dict needs (tensor rebuilding,
//! storage types, `collections.OrderedDict`). Any other global is refused when it is
//! named, before anything could call it, and the error names it.
//!
//! Values live in an arena and refer to each other by index, so memo aliasing (a list
//! appended to after it was memoised) behaves as in Python, and hostile nesting or cycles
//! cannot overflow the stack when the values are dropped.

use std::collections::{BTreeMap, HashMap};
use thiserror::Error;

/// Index of a value in [`Pickle::values`].
pub type Id = usize;

/// Storage element types of torch's typed storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The storage class torch names in the pickle (`torch.<name>`).
    fn from_storage_class(name: &str) -> Option<DType> {
        Some(match name {
            "DoubleStorage" => DType::F64,
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }
}

/// A global the reader knows as data. Nothing is ever imported or called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `collections.OrderedDict`: calling it builds an (ordered) dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2`: a tensor view of a storage.
    RebuildTensorV2,
    /// `torch._utils._rebuild_parameter`: a parameter wrapping a tensor.
    RebuildParameter,
    /// `torch.<T>Storage`: only meaningful inside a persistent id.
    StorageType(DType),
}

/// The globals a state dict may name, as `module.name`, for error messages.
pub const ALLOWED_GLOBALS: &str = "collections.OrderedDict, torch._utils._rebuild_tensor_v2, \
     torch._utils._rebuild_parameter, torch.<Type>Storage";

fn known_global(module: &str, name: &str) -> Option<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch", n) => DType::from_storage_class(n).map(Global::StorageType),
        _ => None,
    }
}

/// A storage named by a persistent id: its bytes live outside the pickle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: DType,
    /// Elements in the storage.
    pub numel: usize,
    pub location: String,
}

/// A tensor: a strided view of a storage (elements, not bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl TensorRef {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Storage index of every element in row-major order of `shape`.
    pub fn indices(&self) -> Vec<usize> {
        let n = self.numel();
        let mut out = Vec::with_capacity(n);
        if n == 0 {
            return out;
        }
        let mut idx = vec![0usize; self.shape.len()];
        for _ in 0..n {
            let at: usize = self.offset
                + idx
                    .iter()
                    .zip(&self.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            out.push(at);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }
}

/// A pickled value. Containers hold [`Id`]s into the arena.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    /// Python int (wider than 128 bits is refused).
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    /// dict or OrderedDict, in insertion order (a repeated key replaces the value).
    Dict(Vec<(Id, Id)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum PickleError {
    #[error(
        "refused: the pickle names `{module}.{name}` (byte {offset}); a checkpoint's weights never \
         need it, and nothing was imported or executed (allowed: {ALLOWED_GLOBALS})"
    )]
    ForbiddenGlobal {
        module: String,
        name: String,
        offset: usize,
    },
    #[error(
        "refused: the pickle uses opcode {name} (byte {offset}), which builds arbitrary objects; \
         nothing was executed{detail}"
    )]
    ForbiddenOpcode {
        name: &'static str,
        offset: usize,
        detail: String,
    },
    #[error("unsupported pickle opcode {opcode:#04x} at byte {offset}")]
    UnknownOpcode { opcode: u8, offset: usize },
    #[error("the pickle ends early at byte {offset} (truncated or corrupt)")]
    Truncated { offset: usize },
    #[error("malformed pickle at byte {offset}: {message}")]
    Malformed { offset: usize, message: String },
}

/// A parsed pickle: the value arena, the root value and every storage it references.
#[derive(Debug, Clone)]
pub struct Pickle {
    pub values: Vec<Value>,
    pub root: Id,
    /// Storages by key, from the persistent ids.
    pub storages: BTreeMap<String, StorageRef>,
}

impl Pickle {
    /// Parses one pickle from the start of `bytes`; returns it and the bytes consumed
    /// (through STOP), since torch's legacy format concatenates several.
    pub fn parse(bytes: &[u8]) -> Result<(Pickle, usize), PickleError> {
        Machine::new(bytes).run()
    }

    pub fn get(&self, id: Id) -> &Value {
        &self.values[id]
    }

    /// The string at `id`, if it is one.
    pub fn str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value under string key `key` of the dict at `id` (the last one if repeated).
    pub fn dict_get(&self, id: Id, key: &str) -> Option<Id> {
        match self.get(id) {
            Value::Dict(items) => items
                .iter()
                .rev()
                .find(|(k, _)| self.str(*k) == Some(key))
                .map(|(_, v)| *v),
            _ => None,
        }
    }

    /// A short description of a value for error messages.
    pub fn describe(&self, id: Id) -> String {
        match self.get(id) {
            Value::Str(s) => format!("str {s:?}"),
            Value::Int(i) => format!("int {i}"),
            v => v.kind().to_string(),
        }
    }
}

/// Opcodes by byte, with their pickletools names for messages.
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const INST: u8 = b'i';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const OBJ: u8 = b'o';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const EXT1: u8 = 0x82;
    pub const EXT2: u8 = 0x83;
    pub const EXT4: u8 = 0x84;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
}

/// What sits on the machine's stack: a value, or a MARK.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Mark,
    Val(Id),
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Start of the opcode being executed (for messages).
    at: usize,
    values: Vec<Value>,
    stack: Vec<Slot>,
    memo: HashMap<u32, Id>,
    storages: BTreeMap<String, StorageRef>,
}

impl<'a> Machine<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            pos: 0,
            at: 0,
            values: Vec::new(),
            stack: Vec::new(),
            memo: HashMap::new(),
            storages: BTreeMap::new(),
        }
    }

    fn malformed<T>(&self, message: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError::Malformed {
            offset: self.at,
            message: message.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(PickleError::Truncated {
                offset: self.bytes.len(),
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    /// A length field that must fit in the remaining input.
    fn len(&mut self, n: u64) -> Result<usize, PickleError> {
        let rest = (self.bytes.len() - self.pos) as u64;
        if n > rest {
            return Err(PickleError::Truncated {
                offset: self.bytes.len(),
            });
        }
        Ok(n as usize)
    }

    /// A newline-terminated text argument (protocol 0 opcodes).
    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.bytes[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated {
                offset: self.bytes.len(),
            })?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).or_else(|_| self.malformed("text argument is not UTF-8"))
    }

    fn push(&mut self, v: Value) {
        self.values.push(v);
        self.stack.push(Slot::Val(self.values.len() - 1));
    }

    fn pop(&mut self) -> Result<Id, PickleError> {
        match self.stack.pop() {
            Some(Slot::Val(id)) => Ok(id),
            Some(Slot::Mark) => self.malformed("a value was expected, found a MARK"),
            None => self.malformed("stack underflow"),
        }
    }

    fn top(&self) -> Result<Id, PickleError> {
        match self.stack.last() {
            Some(Slot::Val(id)) => Ok(*id),
            _ => self.malformed("a value was expected on the stack"),
        }
    }

    /// Pops everything down to the last MARK (and the MARK).
    fn pop_mark(&mut self) -> Result<Vec<Id>, PickleError> {
        let m =
            self.stack
                .iter()
                .rposition(|s| *s == Slot::Mark)
                .ok_or(PickleError::Malformed {
                    offset: self.at,
                    message: "no MARK on the stack".into(),
                })?;
        let items = self.stack[m + 1..]
            .iter()
            .map(|s| match s {
                Slot::Val(id) => *id,
                Slot::Mark => unreachable!("rposition found the last mark"),
            })
            .collect();
        self.stack.truncate(m);
        Ok(items)
    }

    fn int(&self, id: Id) -> Option<i128> {
        match self.values[id] {
            Value::Int(i) => Some(i),
            Value::Bool(b) => Some(i128::from(b)),
            _ => None,
        }
    }

    fn usize_of(&self, id: Id, what: &str) -> Result<usize, PickleError> {
        match self.int(id).and_then(|i| usize::try_from(i).ok()) {
            Some(v) => Ok(v),
            None => self.malformed(format!("{what} must be a non-negative int")),
        }
    }

    fn usizes_of(&self, id: Id, what: &str) -> Result<Vec<usize>, PickleError> {
        match &self.values[id] {
            Value::Tuple(items) | Value::List(items) => items
                .clone()
                .into_iter()
                .map(|i| self.usize_of(i, what))
                .collect(),
            _ => self.malformed(format!("{what} must be a tuple of ints")),
        }
    }

    fn dict_insert(&mut self, dict: Id, k: Id, v: Id) -> Result<(), PickleError> {
        let key = self.values[k].clone();
        // Only hashable scalar keys can repeat meaningfully; compare those by value.
        let same = |other: &Value| match (&key, other) {
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            _ => false,
        };
        let pos = match &self.values[dict] {
            Value::Dict(items) => items.iter().position(|(ek, _)| same(&self.values[*ek])),
            other => return self.malformed(format!("SETITEM on a {}", other.kind())),
        };
        let Value::Dict(items) = &mut self.values[dict] else {
            unreachable!("checked above")
        };
        match pos {
            Some(i) => items[i].1 = v,
            None => items.push((k, v)),
        }
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        match known_global(module, name) {
            Some(g) => {
                self.push(Value::Global(g));
                Ok(())
            }
            None => Err(PickleError::ForbiddenGlobal {
                module: module.to_string(),
                name: name.to_string(),
                offset: self.at,
            }),
        }
    }

    /// A persistent id: torch's `('storage', StorageType, key, location, numel[, view])`.
    fn persistent(&mut self, pid: Id) -> Result<(), PickleError> {
        let Value::Tuple(items) = self.values[pid].clone() else {
            return self.malformed("a persistent id must be a tuple");
        };
        if items.len() < 5 || self.values[items[0]] != Value::Str("storage".into()) {
            return self
                .malformed("persistent id is not ('storage', type, key, location, numel, ...)");
        }
        let Value::Global(Global::StorageType(dtype)) = self.values[items[1]] else {
            return self.malformed("persistent id: the storage type is not a torch storage class");
        };
        let (Value::Str(key), Value::Str(location)) =
            (self.values[items[2]].clone(), self.values[items[3]].clone())
        else {
            return self.malformed("persistent id: key and location must be strings");
        };
        let numel = self.usize_of(items[4], "storage size")?;
        if items.len() > 5 && self.values[items[5]] != Value::None {
            return self.malformed(format!("storage {key}: storage views are not supported"));
        }
        let s = StorageRef {
            key: key.clone(),
            dtype,
            numel,
            location,
        };
        if let Some(prev) = self.storages.get(&key)
            && (prev.dtype != s.dtype || prev.numel != s.numel)
        {
            return self.malformed(format!(
                "storage {key} is declared twice with different types or sizes"
            ));
        }
        self.storages.insert(key, s.clone());
        self.push(Value::Storage(s));
        Ok(())
    }

    /// REDUCE: applies one of the known callables to its argument tuple, as data.
    fn reduce(&mut self, f: Id, args: Id) -> Result<(), PickleError> {
        let Value::Tuple(a) = self.values[args].clone() else {
            return self.malformed("REDUCE arguments must be a tuple");
        };
        let g = match &self.values[f] {
            Value::Global(g) => *g,
            other => return self.malformed(format!("REDUCE calls a {}", other.kind())),
        };
        match g {
            Global::OrderedDict => {
                self.push(Value::Dict(Vec::new()));
                let d = self.top()?;
                match a.as_slice() {
                    [] => {}
                    [pairs] => {
                        let items = match &self.values[*pairs] {
                            Value::List(v) | Value::Tuple(v) => v.clone(),
                            _ => {
                                return self.malformed("OrderedDict(x): x must be a list of pairs");
                            }
                        };
                        for p in items {
                            match self.values[p].clone() {
                                Value::Tuple(kv) if kv.len() == 2 => {
                                    self.dict_insert(d, kv[0], kv[1])?
                                }
                                _ => {
                                    return self
                                        .malformed("OrderedDict(x): x must be a list of pairs");
                                }
                            }
                        }
                    }
                    _ => return self.malformed("OrderedDict takes at most one argument"),
                }
            }
            Global::RebuildTensorV2 => {
                if !(6..=7).contains(&a.len()) {
                    return self.malformed(format!(
                        "_rebuild_tensor_v2 takes 6 or 7 arguments, got {}",
                        a.len()
                    ));
                }
                let Value::Storage(storage) = self.values[a[0]].clone() else {
                    return self.malformed("_rebuild_tensor_v2: the first argument is no storage");
                };
                let offset = self.usize_of(a[1], "tensor storage offset")?;
                let shape = self.usizes_of(a[2], "tensor size")?;
                let stride = self.usizes_of(a[3], "tensor stride")?;
                match &self.values[a[5]] {
                    Value::Dict(h) if h.is_empty() => {}
                    Value::None => {}
                    _ => return self.malformed("tensor with backward hooks"),
                }
                if shape.len() != stride.len() {
                    return self.malformed("tensor size and stride differ in length");
                }
                // The view must stay inside its storage.
                let numel = shape
                    .iter()
                    .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                    .ok_or(PickleError::Malformed {
                        offset: self.at,
                        message: "tensor size overflows".into(),
                    })?;
                if numel > 0 {
                    let last = shape.iter().zip(&stride).try_fold(offset, |acc, (&d, &s)| {
                        (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
                    });
                    match last {
                        Some(l) if l < storage.numel => {}
                        _ => {
                            return self.malformed(format!(
                                "tensor of size {shape:?} (stride {stride:?}, offset {offset}) reaches past \
                                 its storage {} of {} elements",
                                storage.key, storage.numel
                            ));
                        }
                    }
                }
                self.push(Value::Tensor(TensorRef {
                    storage,
                    offset,
                    shape,
                    stride,
                }));
            }
            Global::RebuildParameter => {
                if a.len() != 3 {
                    return self.malformed("_rebuild_parameter takes 3 arguments");
                }
                let Value::Tensor(t) = self.values[a[0]].clone() else {
                    return self.malformed("_rebuild_parameter: the first argument is no tensor");
                };
                self.push(Value::Tensor(t));
            }
            Global::StorageType(_) => {
                return Err(PickleError::ForbiddenOpcode {
                    name: "REDUCE",
                    offset: self.at,
                    detail: ": it calls a torch storage class".into(),
                });
            }
        }
        Ok(())
    }

    fn memo_put(&mut self, key: u32) -> Result<(), PickleError> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), PickleError> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(Slot::Val(id));
                Ok(())
            }
            None => self.malformed(format!("memo key {key} was never stored")),
        }
    }

    fn text_int(&self, s: &str) -> Result<i128, PickleError> {
        let t = s.trim_end_matches('L');
        match t {
            "00" => Ok(0),
            "01" => Ok(1),
            _ => t
                .parse::<i128>()
                .or_else(|_| self.malformed(format!("bad integer literal {s:?}"))),
        }
    }

    fn long(&self, b: &[u8]) -> Result<i128, PickleError> {
        if b.len() > 16 {
            return self.malformed("integer wider than 128 bits");
        }
        if b.is_empty() {
            return Ok(0);
        }
        let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
        let mut buf = [fill; 16];
        buf[..b.len()].copy_from_slice(b);
        Ok(i128::from_le_bytes(buf))
    }

    fn string(&self, b: &[u8]) -> Result<String, PickleError> {
        String::from_utf8(b.to_vec()).or_else(|_| self.malformed("string is not UTF-8"))
    }

    fn run(mut self) -> Result<(Pickle, usize), PickleError> {
        loop {
            self.at = self.pos;
            let code = self.u8()?;
            match code {
                op::PROTO => {
                    let v = self.u8()?;
                    if v > 5 {
                        return self.malformed(format!("pickle protocol {v} is unknown"));
                    }
                }
                op::FRAME => {
                    self.u64()?;
                }
                op::STOP => {
                    let root = self.pop()?;
                    let p = Pickle {
                        values: self.values,
                        root,
                        storages: self.storages,
                    };
                    return Ok((p, self.pos));
                }
                op::MARK => self.stack.push(Slot::Mark),
                op::POP => match self.stack.pop() {
                    Some(_) => {}
                    None => return self.malformed("POP on an empty stack"),
                },
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let id = self.top()?;
                    self.stack.push(Slot::Val(id));
                }
                op::NONE => self.push(Value::None),
                op::NEWTRUE => self.push(Value::Bool(true)),
                op::NEWFALSE => self.push(Value::Bool(false)),
                op::INT => {
                    let s = self.line()?;
                    let v = match s {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(self.text_int(s)?),
                    };
                    self.push(v);
                }
                op::LONG => {
                    let s = self.line()?;
                    let v = self.text_int(s)?;
                    self.push(Value::Int(v));
                }
                op::BININT => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v.into()));
                }
                op::BININT1 => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()));
                }
                op::BININT2 => {
                    let v = self.u16()?;
                    self.push(Value::Int(v.into()));
                }
                op::LONG1 | op::LONG4 => {
                    let n = if code == op::LONG1 {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    let v = self.long(b)?;
                    self.push(Value::Int(v));
                }
                op::FLOAT => {
                    let s = self.line()?;
                    let v = s
                        .parse::<f64>()
                        .or_else(|_| self.malformed(format!("bad float literal {s:?}")))?;
                    self.push(Value::Float(v));
                }
                op::BINFLOAT => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8"));
                    self.push(Value::Float(v));
                }
                op::BINUNICODE | op::SHORT_BINUNICODE | op::BINUNICODE8 => {
                    let n = match code {
                        op::SHORT_BINUNICODE => self.u8()? as u64,
                        op::BINUNICODE => self.u32()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    let s = self.string(b)?;
                    self.push(Value::Str(s));
                }
                op::BINSTRING | op::SHORT_BINSTRING => {
                    // Python 2 str: text when it is UTF-8, bytes otherwise.
                    let n = if code == op::SHORT_BINSTRING {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    let v = match std::str::from_utf8(b) {
                        Ok(s) => Value::Str(s.to_string()),
                        Err(_) => Value::Bytes(b.to_vec()),
                    };
                    self.push(v);
                }
                op::BINBYTES | op::SHORT_BINBYTES | op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = match code {
                        op::SHORT_BINBYTES => self.u8()? as u64,
                        op::BINBYTES => self.u32()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b));
                }
                op::EMPTY_TUPLE => self.push(Value::Tuple(Vec::new())),
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items));
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = (code - op::TUPLE1 + 1) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(items));
                }
                op::EMPTY_LIST => self.push(Value::List(Vec::new())),
                op::LIST => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items));
                }
                op::APPEND | op::APPENDS => {
                    let items = if code == op::APPEND {
                        vec![self.pop()?]
                    } else {
                        self.pop_mark()?
                    };
                    let l = self.top()?;
                    match &mut self.values[l] {
                        Value::List(v) => v.extend(items),
                        other => {
                            let k = other.kind();
                            return self.malformed(format!("APPEND to a {k}"));
                        }
                    }
                }
                op::EMPTY_DICT => self.push(Value::Dict(Vec::new())),
                op::DICT => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.malformed("DICT with an odd number of items");
                    }
                    self.push(Value::Dict(Vec::new()));
                    let d = self.top()?;
                    for kv in items.chunks_exact(2) {
                        self.dict_insert(d, kv[0], kv[1])?;
                    }
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.dict_insert(d, k, v)?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.malformed("SETITEMS with an odd number of items");
                    }
                    let d = self.top()?;
                    for kv in items.chunks_exact(2) {
                        self.dict_insert(d, kv[0], kv[1])?;
                    }
                }
                op::PUT => {
                    let s = self.line()?;
                    let k = s
                        .parse::<u32>()
                        .or_else(|_| self.malformed(format!("bad memo key {s:?}")))?;
                    self.memo_put(k)?;
                }
                op::BINPUT => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?;
                }
                op::LONG_BINPUT => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                op::MEMOIZE => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?;
                }
                op::GET => {
                    let s = self.line()?;
                    let k = s
                        .parse::<u32>()
                        .or_else(|_| self.malformed(format!("bad memo key {s:?}")))?;
                    self.memo_get(k)?;
                }
                op::BINGET => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?;
                }
                op::LONG_BINGET => {
                    let k = self.u32()?;
                    self.memo_get(k)?;
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&self.values[module], &self.values[name]) {
                        (Value::Str(m), Value::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(&m, &n)?;
                        }
                        _ => return self.malformed("STACK_GLOBAL needs two strings"),
                    }
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    self.reduce(f, args)?;
                }
                op::BUILD => {
                    // Only the state of an OrderedDict (torch's `_metadata` attribute) is
                    // accepted; it carries nothing the weights need, so it is dropped.
                    let state = self.pop()?;
                    let obj = self.top()?;
                    let ok = matches!(self.values[obj], Value::Dict(_))
                        && matches!(self.values[state], Value::Dict(_) | Value::None);
                    if !ok {
                        return Err(PickleError::ForbiddenOpcode {
                            name: "BUILD",
                            offset: self.at,
                            detail: format!(
                                " (state {} on a {})",
                                self.values[state].kind(),
                                self.values[obj].kind()
                            ),
                        });
                    }
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    self.persistent(pid)?;
                }
                op::INST | op::OBJ | op::NEWOBJ | op::NEWOBJ_EX => {
                    let (name, detail) = match code {
                        op::INST => {
                            let module = self.line()?;
                            let name = self.line()?;
                            ("INST", format!(" (class {module}.{name})"))
                        }
                        op::OBJ => ("OBJ", String::new()),
                        op::NEWOBJ => ("NEWOBJ", String::new()),
                        _ => ("NEWOBJ_EX", String::new()),
                    };
                    return Err(PickleError::ForbiddenOpcode {
                        name,
                        offset: self.at,
                        detail,
                    });
                }
                op::EXT1 | op::EXT2 | op::EXT4 | op::PERSID => {
                    let name = match code {
                        op::PERSID => "PERSID",
                        _ => "EXT (copyreg extension registry)",
                    };
                    return Err(PickleError::ForbiddenOpcode {
                        name,
                        offset: self.at,
                        detail: String::new(),
                    });
                }
                _ => {
                    return Err(PickleError::UnknownOpcode {
                        opcode: code,
                        offset: self.at,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protocol-2 pickle bytes from a list of opcodes/arguments.
    fn bin_unicode(s: &str) -> Vec<u8> {
        let mut v = vec![op::BINUNICODE];
        v.extend((s.len() as u32).to_le_bytes());
        v.extend(s.as_bytes());
        v
    }

    #[test]
    fn reads_containers_memo_aliasing_and_ints() {
        // d = {}; l = []; d['a'] = l (memo 1); l.append(300); d['b'] = get(1) -> same list;
        // d['big'] = 2**70; d['f'] = 1.5; d['t'] = (True, None)
        let mut p = vec![op::PROTO, 2, op::EMPTY_DICT, op::BINPUT, 0];
        p.extend(bin_unicode("a"));
        p.extend([op::EMPTY_LIST, op::BINPUT, 1, op::SETITEM]);
        p.extend([op::BINGET, 1, op::BININT2]);
        p.extend(300u16.to_le_bytes());
        p.extend([op::APPEND, op::POP]);
        p.extend(bin_unicode("b"));
        p.extend([op::BINGET, 1, op::SETITEM]);
        p.extend(bin_unicode("big"));
        p.extend([op::LONG1, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0x40]);
        p.push(op::SETITEM);
        p.extend(bin_unicode("neg"));
        p.extend([op::LONG1, 1, 0xff, op::SETITEM]);
        p.extend(bin_unicode("f"));
        p.push(op::BINFLOAT);
        p.extend(1.5f64.to_be_bytes());
        p.push(op::SETITEM);
        p.extend(bin_unicode("t"));
        p.extend([op::NEWTRUE, op::NONE, op::TUPLE2, op::SETITEM, op::STOP]);
        p.extend(b"trailing");
        let (pk, used) = Pickle::parse(&p).unwrap();
        assert_eq!(used, p.len() - 8);
        let a = pk.dict_get(pk.root, "a").unwrap();
        let b = pk.dict_get(pk.root, "b").unwrap();
        assert_eq!(a, b, "memo GET returns the same object");
        let Value::List(items) = pk.get(a) else {
            panic!()
        };
        assert_eq!(pk.get(items[0]), &Value::Int(300));
        let big = pk.dict_get(pk.root, "big").unwrap();
        assert_eq!(pk.get(big), &Value::Int(1i128 << 70));
        let neg = pk.dict_get(pk.root, "neg").unwrap();
        assert_eq!(pk.get(neg), &Value::Int(-1));
        let f = pk.dict_get(pk.root, "f").unwrap();
        assert_eq!(pk.get(f), &Value::Float(1.5));
    }

    #[test]
    fn refuses_foreign_globals_by_name() {
        let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.";
        let e = Pickle::parse(p).unwrap_err();
        assert!(
            matches!(&e, PickleError::ForbiddenGlobal { module, name, .. } if module == "os" && name == "system"),
            "{e:?}"
        );
        assert!(e.to_string().contains("`os.system`"), "{e}");
        let mut p = vec![op::PROTO, 4];
        p.extend([op::SHORT_BINUNICODE, 8]);
        p.extend(b"builtins");
        p.extend([op::SHORT_BINUNICODE, 4]);
        p.extend(b"eval");
        p.extend([op::STACK_GLOBAL, op::STOP]);
        let e = Pickle::parse(&p).unwrap_err().to_string();
        assert!(e.contains("`builtins.eval`"), "{e}");
        // A class instantiation opcode names the class too.
        let e = Pickle::parse(b"(isubprocess\nPopen\n.")
            .unwrap_err()
            .to_string();
        assert!(e.contains("INST") && e.contains("subprocess.Popen"), "{e}");
        // Calling a storage class (an allowed name) is still refused.
        let e = Pickle::parse(b"\x80\x02ctorch\nFloatStorage\n)R.")
            .unwrap_err()
            .to_string();
        assert!(e.contains("REDUCE"), "{e}");
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        let p = b"\x80\x02}q\x00X\x05\x00\x00\x00helloK\x01s.";
        Pickle::parse(p).unwrap();
        for n in 0..p.len() {
            assert!(Pickle::parse(&p[..n]).is_err(), "prefix {n} accepted");
        }
        assert!(matches!(
            Pickle::parse(b"\x80\x02X\xff\xff\xff\x7fab."),
            Err(PickleError::Truncated { .. })
        ));
        assert!(matches!(
            Pickle::parse(b"\xfe"),
            Err(PickleError::UnknownOpcode { opcode: 0xfe, .. })
        ));
        assert!(Pickle::parse(b"h\x05.").is_err(), "memo miss");
        assert!(Pickle::parse(b"s.").is_err(), "underflow");
    }

    #[test]
    fn tensor_views_must_fit_their_storage() {
        // _rebuild_tensor_v2(('storage', FloatStorage, 'k', 'cpu', 6), 1, (2, 3), (3, 1), False, OrderedDict())
        let build = |numel: u8| {
            let mut p = vec![op::PROTO, 2];
            p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
            p.push(op::MARK);
            p.extend(bin_unicode("storage"));
            p.extend(b"ctorch\nFloatStorage\n");
            p.extend(bin_unicode("k"));
            p.extend(bin_unicode("cpu"));
            p.extend([op::BININT1, numel, op::TUPLE, op::BINPERSID]);
            p.extend([op::BININT1, 1, op::BININT1, 2, op::BININT1, 3, op::TUPLE2]);
            p.extend([op::BININT1, 3, op::BININT1, 1, op::TUPLE2, op::NEWFALSE]);
            p.extend(b"ccollections\nOrderedDict\n)R");
            p.extend([op::TUPLE, op::REDUCE, op::STOP]);
            p
        };
        let (pk, _) = Pickle::parse(&build(7)).unwrap();
        let Value::Tensor(t) = pk.get(pk.root) else {
            panic!("{:?}", pk.get(pk.root))
        };
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.indices(), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(pk.storages["k"].numel, 7);
        let e = Pickle::parse(&build(6)).unwrap_err().to_string();
        assert!(e.contains("reaches past"), "{e}");
    }
}
