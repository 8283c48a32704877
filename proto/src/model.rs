//! The in-memory form of a batch.

/// A named series: the key (e.g. `plant/meter-a/001/value`) and its tags (e.g. `site=muc`).
///
/// Tags are kept in the order given; producers should sort them so equal series compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Series {
    /// Slash-separated series key. The last segment is the measure; the rest names the device.
    pub key: String,
    /// `(name, value)` pairs.
    pub tags: Vec<(String, String)>,
}

impl Series {
    /// A series without tags.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            tags: Vec::new(),
        }
    }

    /// The device part of the key (everything before the last `/`), or the whole key if it has no `/`.
    pub fn device(&self) -> &str {
        self.key
            .rsplit_once('/')
            .map_or(self.key.as_str(), |(d, _)| d)
    }

    /// The measure part of the key (the last segment).
    pub fn measure(&self) -> &str {
        self.key
            .rsplit_once('/')
            .map_or(self.key.as_str(), |(_, m)| m)
    }
}

/// A reading's value.
#[derive(Debug, Clone)]
pub enum Value {
    /// IEEE 754 double.
    F64(f64),
    /// Signed 64-bit integer.
    I64(i64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string (at most [`crate::limits::MAX_STRING_BYTES`]).
    Str(String),
}

impl PartialEq for Value {
    /// Bitwise for floats, so that a NaN round-trips equal and `-0.0 != 0.0`.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::F64(a), Value::F64(b)) => a.to_bits() == b.to_bits(),
            (Value::I64(a), Value::I64(b)) => a == b,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Str(a), Value::Str(b)) => a == b,
            _ => false,
        }
    }
}

impl Value {
    /// The type code written in the kind byte.
    pub(crate) fn type_code(&self) -> u8 {
        match self {
            Value::F64(_) => 0,
            Value::I64(_) => 1,
            Value::Bool(_) => 2,
            Value::Str(_) => 3,
        }
    }
}

/// How far a reading can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Quality {
    /// The source reported the value normally.
    #[default]
    Good = 0,
    /// The value may be stale or imprecise (e.g. a device reported a degraded state).
    Uncertain = 1,
    /// The value is not valid (e.g. a Modbus exception); the value field carries no information.
    Bad = 2,
}

impl Quality {
    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Quality::Good),
            1 => Some(Quality::Uncertain),
            2 => Some(Quality::Bad),
            _ => None,
        }
    }

    /// A lower-case name for logs and columns.
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Good => "good",
            Quality::Uncertain => "uncertain",
            Quality::Bad => "bad",
        }
    }
}

/// One reading: which series, when, what, and how good.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Index into [`Batch::series`].
    pub series: u32,
    /// Event time, Unix milliseconds UTC.
    pub ts_ms: i64,
    /// The value.
    pub value: Value,
    /// The quality flag.
    pub quality: Quality,
    /// Arrived after the agent's reorder window had closed for its series.
    pub late: bool,
}

/// One batch: what one Kinesis record carries.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// The producing agent's id (1 to 64 bytes).
    pub agent_id: String,
    /// The agent buffer's epoch: a random non-zero number drawn when the agent's buffer file is created, kept
    /// for the file's life. A re-imaged gateway, a replaced SD card or a buffer recreated after corruption starts
    /// numbering batches at 1 again under a new epoch, so `(agent_id, epoch, seq)` identifies a batch for good.
    /// `0`: none (records written before epochs existed, header flag unset).
    pub epoch: u64,
    /// Per-epoch sequence number; `(agent_id, epoch, seq)` identifies a batch and keys idempotent landing.
    pub seq: u64,
    /// The series this batch's readings refer to.
    pub series: Vec<Series>,
    /// The readings.
    pub readings: Vec<Reading>,
}
