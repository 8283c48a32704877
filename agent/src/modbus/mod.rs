//! Modbus source: TCP and RTU polling with request coalescing, fault isolation and report by exception.
//!
//! - [`plan`] (pure) merges each poll group's points into the fewest requests; [`decode`] (pure) turns registers
//!   into values for every data type and byte/word order; [`deadband`] (pure) decides what is worth sending.
//! - [`compile`] turns the configuration into per-device plans once at start (`check-config` prints them).
//! - `poller` runs one task per TCP device and one per serial bus, so a slow or dead device never delays another
//!   (devices on one RTU bus share it one request at a time, as the bus requires).
//!
//! A Modbus **exception** (the device answered "illegal address", "busy") is data about the device: the points of
//! that request are sent with quality `bad` and the exception is counted. A **transport fault** (timeout, reset,
//! refused) drops the connection and reconnects with capped exponential backoff; ticks during the backoff are
//! skipped. Reading timestamps are the time the response arrived.

mod config;
pub mod deadband;
pub mod decode;
pub mod plan;
mod poller;

pub use config::{fleet_problems, ModbusConfig, Parity, PointConfig, PollGroup, Transport};
pub use poller::run;

use decode::{DataType, Raw, WordOrder};
use fieldlink_proto::{Series, Value};
use plan::{coalesce, Request, Span};
use std::sync::Arc;

/// A point ready for polling.
#[derive(Debug, Clone)]
pub struct Point {
    /// Its series (key and tags), shared by its readings.
    pub series: Arc<Series>,
    /// Data type.
    pub dtype: DataType,
    /// Byte/word order.
    pub order: WordOrder,
    /// Bit for `bool` in a register.
    pub bit: Option<u8>,
    /// Registers (or bits) it occupies.
    pub size: u16,
    /// Scale and offset, if any.
    pub scale: Option<(f64, f64)>,
    /// Report-by-exception rule.
    pub deadband: Option<deadband::Deadband>,
}

/// One poll group of one device.
#[derive(Debug, Clone)]
pub struct GroupPlan {
    /// Name.
    pub name: String,
    /// Interval, ms.
    pub interval_ms: u64,
    /// Requests, each with the points it serves (indices into [`DevicePlan::points`]).
    pub requests: Vec<Request>,
}

/// Everything needed to poll one device.
#[derive(Debug, Clone)]
pub struct DevicePlan {
    /// The device's configuration.
    pub cfg: ModbusConfig,
    /// Its points.
    pub points: Vec<Point>,
    /// Its poll groups.
    pub groups: Vec<GroupPlan>,
}

/// The series of point `p` of device `cfg`: key `<series_prefix, or the device's name>/<point name>`; the device's
/// tags, the point's over them, and its unit as the tag `unit`.
pub fn point_series(cfg: &ModbusConfig, p: &config::PointConfig) -> Series {
    let prefix = cfg.series_prefix.as_deref().unwrap_or(&cfg.name);
    let mut tags = cfg.tags.clone();
    tags.extend(p.tags.clone());
    if let Some(u) = &p.unit {
        tags.insert("unit".into(), u.clone());
    }
    Series {
        key: format!("{prefix}/{}", p.name),
        tags: tags.into_iter().collect(),
    }
}

/// Builds the plan of a (validated) device.
pub fn compile(cfg: &ModbusConfig) -> DevicePlan {
    let points: Vec<Point> = cfg
        .points
        .iter()
        .map(|p| Point {
            series: Arc::new(point_series(cfg, p)),
            dtype: p.data_type(),
            order: p.order,
            bit: p.bit,
            size: p.size(),
            scale: (p.scale.is_some() || p.offset.is_some())
                .then(|| (p.scale.unwrap_or(1.0), p.offset.unwrap_or(0.0))),
            deadband: p.deadband,
        })
        .collect();
    let groups = cfg
        .groups
        .iter()
        .map(|g| {
            let spans: Vec<Span> = cfg
                .points
                .iter()
                .enumerate()
                .filter(|(_, p)| p.group == g.name)
                .map(|(i, p)| (i, p.register, p.address, p.size()))
                .collect();
            GroupPlan {
                name: g.name.clone(),
                interval_ms: g.interval_ms,
                requests: coalesce(&spans, cfg.max_gap),
            }
        })
        .collect();
    DevicePlan {
        cfg: cfg.clone(),
        points,
        groups,
    }
}

impl DevicePlan {
    /// One line per request, for `check-config`.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for g in &self.groups {
            out.push(format!(
                "modbus {} group {} every {} ms: {} request(s) for {} point(s)",
                self.cfg.name,
                g.name,
                g.interval_ms,
                g.requests.len(),
                g.requests.iter().map(|r| r.points.len()).sum::<usize>()
            ));
            for r in &g.requests {
                let names: Vec<&str> = r
                    .points
                    .iter()
                    .map(|&(i, _)| self.cfg.points[i].name.as_str())
                    .collect();
                out.push(format!(
                    "  {:?} {}..{} ({} registers/bits): {}",
                    r.table,
                    r.start,
                    u32::from(r.start) + u32::from(r.count),
                    r.count,
                    names.join(", ")
                ));
            }
        }
        out
    }

    /// Decodes point `i` from a register response (`regs` are the point's registers) into a value.
    pub fn value_from_registers(&self, i: usize, regs: &[u16]) -> Value {
        let p = &self.points[i];
        to_value(decode::decode(regs, p.dtype, p.order, p.bit), p.scale)
    }
}

/// Applies scale/offset and picks the wire type: integers stay `i64` unless scaled (then `f64`); a `u64` above
/// `i64::MAX` becomes `f64`.
pub fn to_value(raw: Raw, scale: Option<(f64, f64)>) -> Value {
    match (raw, scale) {
        (Raw::Bool(b), _) => Value::Bool(b),
        (Raw::Str(s), _) => Value::Str(s),
        (Raw::Int(i), Some((k, o))) => Value::F64(i as f64 * k + o),
        (Raw::Float(f), Some((k, o))) => Value::F64(f * k + o),
        (Raw::Int(i), None) => i64::try_from(i).map_or(Value::F64(i as f64), Value::I64),
        (Raw::Float(f), None) => Value::F64(f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICE: &str = r#"
name = "meter-a"
transport = "tcp"
address = "127.0.0.1:5020"
tags = { site = "muc" }
[[groups]]
name = "fast"
interval_ms = 1000
[[groups]]
name = "slow"
interval_ms = 10000
[[points]]
name = "voltage"
group = "fast"
register = "holding"
address = 0
type = "f32"
unit = "V"
[[points]]
name = "current"
group = "fast"
register = "holding"
address = 2
type = "i16"
scale = 0.01
[[points]]
name = "energy"
group = "slow"
register = "input"
address = 100
type = "u64"
order = "CDAB"
[[points]]
name = "breaker"
group = "fast"
register = "coil"
address = 5
"#;

    #[test]
    fn a_device_compiles_to_coalesced_requests_with_tagged_series() {
        let cfg: ModbusConfig = toml::from_str(DEVICE).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            cfg.validate("modbus[0]").is_empty(),
            "{:?}",
            cfg.validate("modbus[0]")
        );
        let plan = compile(&cfg);
        let fast = &plan.groups[0];
        assert_eq!(
            fast.requests.len(),
            2,
            "holding 0..3 in one request, the coil in another"
        );
        assert_eq!(plan.groups[1].requests.len(), 1);
        assert_eq!(plan.points[0].series.key, "meter-a/voltage");
        assert_eq!(
            plan.points[0].series.tags,
            vec![("site".into(), "muc".into()), ("unit".into(), "V".into())]
        );
        assert_eq!(plan.value_from_registers(1, &[0xFF38]), Value::F64(-2.0));
        assert!(plan.describe()[0].contains("2 request(s) for 3 point(s)"));
    }

    #[test]
    fn every_configuration_problem_is_reported() {
        let bad = DEVICE
            .replace("address = \"127.0.0.1:5020\"", "address = \"nohost\"")
            .replace("group = \"slow\"", "group = \"nope\"")
            .replace(
                "type = \"i16\"\nscale = 0.01",
                "type = \"string\"\nscale = 0.01",
            );
        let cfg: ModbusConfig = toml::from_str(&bad).unwrap_or_else(|e| panic!("{e}"));
        let p = cfg.validate("modbus[0]").join("\n");
        for needle in [
            "modbus[0].address",
            "points[2].group",
            "points[1].length",
            "points[1].scale",
        ] {
            assert!(p.contains(needle), "{needle} missing in:\n{p}");
        }
    }

    #[test]
    fn devices_sharing_a_port_or_a_series_are_checked_together() {
        let rtu = |unit: u8, baud: u32, prefix: &str| -> ModbusConfig {
            toml::from_str(
                &DEVICE
                    .replace(
                        "transport = \"tcp\"\naddress = \"127.0.0.1:5020\"",
                        &format!("transport = \"rtu\"\nport = \"/dev/ttyNONE9\"\nbaud = {baud}\nunit_id = {unit}\nseries_prefix = \"{prefix}\""),
                    ),
            )
            .unwrap_or_else(|e| panic!("{e}"))
        };
        assert!(fleet_problems(&[rtu(1, 9600, "a"), rtu(2, 9600, "b")]).is_empty());
        let p = fleet_problems(&[rtu(1, 9600, "a"), rtu(1, 19200, "a")]).join("\n");
        for needle in [
            "modbus[1]: baud, parity",
            "the series \"a/voltage\" (with the same tags) is also modbus[0]'s",
        ] {
            assert!(p.contains(needle), "{needle} missing in:\n{p}");
        }
        // One prefix, told apart by a device tag: distinct series (a gateway's units, say).
        let mut tagged = rtu(2, 9600, "a");
        tagged.tags.insert("meter".into(), "4".into());
        let p = fleet_problems(&[rtu(1, 9600, "a"), tagged]);
        assert!(p.is_empty(), "{p:?}");
        // Broadcast and reserved serial unit ids, and a deadband that cannot compare.
        let bad = rtu(0, 9600, "a");
        assert!(bad
            .validate("m")
            .join("\n")
            .contains("m.unit_id: a serial unit is 1..=247"));
        let nan: ModbusConfig = toml::from_str(&DEVICE.replace(
            "unit = \"V\"",
            "unit = \"V\"\ndeadband = { mode = \"absolute\", value = nan, heartbeat_s = 99999999999 }",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let p = nan.validate("m").join("\n");
        assert!(p.contains("points[0].deadband.value"), "{p}");
        assert!(p.contains("points[0].deadband.heartbeat_s"), "{p}");
    }

    #[test]
    fn a_series_the_wire_format_would_refuse_is_a_configuration_problem() {
        // Readings of such a series would be buffered, and every seal taking them refused by the encoder.
        let device =
            || -> ModbusConfig { toml::from_str(DEVICE).unwrap_or_else(|e| panic!("{e}")) };
        let problems = |cfg: &ModbusConfig| cfg.validate("modbus[0]").join("\n");

        let mut cfg = device();
        cfg.series_prefix = Some("p".repeat(1100));
        let text = problems(&cfg);
        for i in 0..4 {
            let needle = format!("modbus[0].points[{i}]: the series \"pppp");
            assert!(text.contains(&needle), "{needle} missing in:\n{text}");
        }
        assert!(
            text.contains("series key: 1108 bytes, allowed 1..=1024"),
            "{text}"
        );

        let mut cfg = device();
        cfg.points[0].unit = Some("V".repeat(1025));
        cfg.points[2]
            .tags
            .insert(String::new(), "empty name".into());
        let text = problems(&cfg);
        for needle in [
            "modbus[0].points[0]: the series \"meter-a/voltage\" cannot be sent, tag value: 1025 bytes",
            "modbus[0].points[2]: the series \"meter-a/energy\" cannot be sent, tag name: 0 bytes",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
        assert!(
            !text.contains("points[1]") && !text.contains("points[3]"),
            "{text}"
        );

        // 64 tags are allowed: the device's site and 63 more, then the unit makes 65 on the voltage only.
        let mut cfg = device();
        cfg.tags
            .extend((0..63).map(|i| (format!("t{i}"), "x".into())));
        let text = problems(&cfg);
        assert!(
            text.contains("points[0]") && text.contains("65 tags"),
            "{text}"
        );
        assert!(!text.contains("points[1]"), "{text}");
    }

    #[test]
    fn values_keep_integer_types_unless_scaled() {
        assert_eq!(to_value(Raw::Int(5), None), Value::I64(5));
        assert_eq!(
            to_value(Raw::Int(i128::from(u64::MAX)), None),
            Value::F64(u64::MAX as f64)
        );
        assert_eq!(to_value(Raw::Int(5), Some((0.5, 1.0))), Value::F64(3.5));
    }
}
