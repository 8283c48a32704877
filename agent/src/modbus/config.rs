use super::deadband::Deadband;
use super::decode::{DataType, WordOrder};
use super::plan::Table;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};

/// How a device is reached.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Modbus TCP (`address = "host:port"`).
    Tcp,
    /// Modbus RTU over a serial line (`port = "/dev/ttyUSB0"`, `baud`, `parity`, `data_bits`, `stop_bits`).
    Rtu,
}

/// Serial parity.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// None (default).
    #[default]
    None,
    /// Even.
    Even,
    /// Odd.
    Odd,
}

/// A poll group: points read together at one interval.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollGroup {
    /// Name the points refer to.
    pub name: String,
    /// Interval, milliseconds. Ticks are aligned to multiples of the interval since the Unix epoch; a tick missed
    /// because the previous poll took too long is skipped, never burst.
    pub interval_ms: u64,
}

/// One point: a value read from a device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointConfig {
    /// Measure name; the series is `<series_prefix>/<name>`.
    pub name: String,
    /// Poll group.
    pub group: String,
    /// `coil`, `discrete`, `holding` or `input`.
    pub register: Table,
    /// Address (0-based, as on the wire).
    pub address: u16,
    /// `bool`, `i16`, `u16` (default for registers), `i32`, `u32`, `i64`, `u64`, `f32`, `f64` or `string`.
    /// Coils and discrete inputs are `bool`.
    #[serde(rename = "type", default)]
    pub dtype: Option<DataType>,
    /// Byte/word order of multi-register values: `ABCD` (default), `DCBA`, `BADC`, `CDAB`.
    #[serde(default)]
    pub order: WordOrder,
    /// For `bool` in a register: the bit, 0 (least significant) to 15.
    #[serde(default)]
    pub bit: Option<u8>,
    /// For `string`: length in registers (two characters each).
    #[serde(default)]
    pub length: u16,
    /// Multiplier applied to numeric values (the result is a double).
    #[serde(default)]
    pub scale: Option<f64>,
    /// Added after `scale` (the result is a double).
    #[serde(default)]
    pub offset: Option<f64>,
    /// Engineering unit, added as tag `unit`.
    #[serde(default)]
    pub unit: Option<String>,
    /// Extra tags of this point's series.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Report by exception (optional).
    #[serde(default)]
    pub deadband: Option<Deadband>,
}

impl PointConfig {
    /// The data type, with the table's default.
    pub fn data_type(&self) -> DataType {
        self.dtype.unwrap_or(match self.register {
            Table::Coil | Table::Discrete => DataType::Bool,
            Table::Holding | Table::Input => DataType::U16,
        })
    }

    /// Registers (or bits) the point occupies.
    pub fn size(&self) -> u16 {
        match self.register {
            Table::Coil | Table::Discrete => 1,
            _ => self.data_type().registers(self.length),
        }
    }
}

/// One Modbus device (`[[modbus]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    /// Device name: logs, metrics, and the default series prefix.
    pub name: String,
    /// `tcp` or `rtu`.
    pub transport: Transport,
    /// TCP: `host:port`.
    #[serde(default)]
    pub address: Option<String>,
    /// RTU: serial device. Devices with the same `port` share the bus, one request at a time.
    #[serde(default)]
    pub port: Option<String>,
    /// RTU: baud rate. Default 9600.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// RTU: `none` (default), `even`, `odd`.
    #[serde(default)]
    pub parity: Parity,
    /// RTU: data bits, 7 or 8. Default 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// RTU: stop bits, 1 or 2. Default 1.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Unit (slave) id. Default 1.
    #[serde(default = "default_unit")]
    pub unit_id: u8,
    /// Timeout of one request (and of connecting), milliseconds. Default 1000.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Unused registers a request may span to serve two points with one read. Default 8.
    #[serde(default = "default_gap")]
    pub max_gap: u16,
    /// Series prefix. Default: the device name.
    #[serde(default)]
    pub series_prefix: Option<String>,
    /// Tags of every series of this device.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Poll groups.
    pub groups: Vec<PollGroup>,
    /// Points.
    pub points: Vec<PointConfig>,
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_unit() -> u8 {
    1
}
fn default_timeout() -> u64 {
    1000
}
fn default_gap() -> u16 {
    8
}

/// Longest deadband heartbeat, seconds: a year.
const MAX_HEARTBEAT_S: u64 = 366 * 86_400;

/// Problems between devices (each is `modbus[i]`): devices on one serial port must name it one way (not another
/// path to the same device file, which would make two buses) and agree on the line's settings (the port is opened
/// with the settings of whichever device connects it), and no two devices may write one series (key and tags).
pub fn fleet_problems(devices: &[ModbusConfig]) -> Vec<String> {
    let mut p = Vec::new();
    let line = |d: &ModbusConfig| (d.baud, d.parity, d.data_bits, d.stop_bits);
    let mut ports: Vec<(usize, String, std::path::PathBuf)> = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let Some(port) = d.port.as_deref().filter(|_| d.transport == Transport::Rtu) else {
            continue;
        };
        let file = std::fs::canonicalize(port).unwrap_or_else(|_| port.into());
        for (j, other_port, other_file) in &ports {
            let o = &devices[*j];
            if *other_file != file {
                continue;
            }
            if other_port != port {
                p.push(format!(
                    "modbus[{i}].port: {port:?} is the serial device of modbus[{j}] ({other_port:?}): name it the same way, so its units share one bus"
                ));
            } else if line(o) != line(d) {
                p.push(format!(
                    "modbus[{i}]: baud, parity, data_bits and stop_bits must be those of modbus[{j}] on the same port {port:?}"
                ));
            }
        }
        ports.push((i, port.to_owned(), file));
    }
    // A series is its key and its tags (the device's, the point's, `unit`; in name order): two devices under one
    // prefix told apart by a tag write distinct series.
    let mut series: std::collections::HashMap<fieldlink_proto::Series, usize> =
        std::collections::HashMap::new();
    for (i, d) in devices.iter().enumerate() {
        for pt in &d.points {
            let s = super::point_series(d, pt);
            let key = s.key.clone();
            let j = *series.entry(s).or_insert(i);
            if j != i {
                p.push(format!(
                    "modbus[{i}].points: the series {key:?} (with the same tags) is also modbus[{j}]'s (set series_prefix or a tag)"
                ));
            }
        }
    }
    p
}

impl ModbusConfig {
    /// Problems with this device, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.name.is_empty() {
            p.push(format!("{path}.name: must not be empty"));
        }
        match self.transport {
            Transport::Tcp => match &self.address {
                Some(a)
                    if a.rsplit_once(':')
                        .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok()) => {}
                _ => p.push(format!(
                    "{path}.address: tcp needs \"host:port\", got {:?}",
                    self.address
                )),
            },
            Transport::Rtu => {
                if self.port.as_deref().is_none_or(str::is_empty) {
                    p.push(format!(
                        "{path}.port: rtu needs a serial device, e.g. \"/dev/ttyUSB0\""
                    ));
                }
                if !(7..=8).contains(&self.data_bits) {
                    p.push(format!("{path}.data_bits: 7 or 8, got {}", self.data_bits));
                }
                if !(1..=2).contains(&self.stop_bits) {
                    p.push(format!("{path}.stop_bits: 1 or 2, got {}", self.stop_bits));
                }
                if self.baud == 0 {
                    p.push(format!("{path}.baud: must be positive"));
                }
                // 0 is the broadcast address (no unit answers it), 248..=255 are reserved.
                if !(1..=247).contains(&self.unit_id) {
                    p.push(format!(
                        "{path}.unit_id: a serial unit is 1..=247, got {}",
                        self.unit_id
                    ));
                }
            }
        }
        if !(10..=60_000).contains(&self.timeout_ms) {
            p.push(format!(
                "{path}.timeout_ms: must be 10..=60000, got {}",
                self.timeout_ms
            ));
        }
        let mut groups = HashSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            if !groups.insert(g.name.as_str()) {
                p.push(format!(
                    "{path}.groups[{i}].name: {:?} is used twice",
                    g.name
                ));
            }
            if !(10..=86_400_000).contains(&g.interval_ms) {
                p.push(format!(
                    "{path}.groups[{i}].interval_ms: must be 10..=86400000, got {}",
                    g.interval_ms
                ));
            }
        }
        if self.points.is_empty() {
            p.push(format!("{path}.points: at least one point is required"));
        }
        let mut names = HashSet::new();
        for (i, pt) in self.points.iter().enumerate() {
            let at = format!("{path}.points[{i}]");
            if pt.name.is_empty() || pt.name.contains('/') {
                p.push(format!(
                    "{at}.name: must be non-empty without '/', got {:?}",
                    pt.name
                ));
            }
            if !names.insert(pt.name.as_str()) {
                p.push(format!("{at}.name: {:?} is used twice", pt.name));
            }
            if !groups.contains(pt.group.as_str()) {
                p.push(format!("{at}.group: no poll group named {:?}", pt.group));
            }
            let dtype = pt.data_type();
            let bits = matches!(pt.register, Table::Coil | Table::Discrete);
            if bits && (dtype != DataType::Bool || pt.bit.is_some()) {
                p.push(format!(
                    "{at}.type: coils and discrete inputs are bool without a bit"
                ));
            }
            if !bits && dtype == DataType::Bool && pt.bit.is_none_or(|b| b >= 16) {
                p.push(format!("{at}.bit: a bool in a register needs bit = 0..15"));
            }
            if dtype == DataType::String && !(1..=125).contains(&pt.length) {
                p.push(format!(
                    "{at}.length: a string needs length = 1..=125 registers"
                ));
            }
            if u32::from(pt.address) + u32::from(pt.size()) > 65_536 {
                p.push(format!(
                    "{at}.address: {} + {} registers runs past 65535",
                    pt.address,
                    pt.size()
                ));
            }
            if let Some(d) = &pt.deadband {
                if !d.value.is_finite() || d.value < 0.0 {
                    p.push(format!(
                        "{at}.deadband.value: must be a finite number >= 0, got {}",
                        d.value
                    ));
                }
                if d.heartbeat_s > MAX_HEARTBEAT_S {
                    p.push(format!(
                        "{at}.deadband.heartbeat_s: at most {MAX_HEARTBEAT_S} (a year), got {}",
                        d.heartbeat_s
                    ));
                }
            }
            if (pt.scale.is_some() || pt.offset.is_some())
                && matches!(dtype, DataType::Bool | DataType::String)
            {
                p.push(format!("{at}.scale: only numeric points can be scaled"));
            }
            // What the wire format refuses: checked here, or the readings would be buffered and every seal that
            // takes them refused.
            let series = super::point_series(self, pt);
            if let Err(e) = fieldlink_proto::check_series(&series.key, &series.tags) {
                let mut short: String = series.key.chars().take(48).collect();
                if short.len() < series.key.len() {
                    short.push('…');
                }
                let why = match e {
                    fieldlink_proto::EncodeError::Invalid { what, why } => format!("{what}: {why}"),
                    other => other.to_string(),
                };
                p.push(format!(
                    "{at}: the series {short:?} cannot be sent, {why} (its key is series_prefix or name, '/', \
                     the point's name; its tags are the device's and the point's tags and unit)"
                ));
            }
        }
        p
    }
}
