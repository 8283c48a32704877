//! The agent's TOML configuration: one file, documented defaults, every problem reported at once.
//!
//! Each component owns its section's struct (`mqtt::MqttConfig`, `buffer::BufferConfig`, ...); this module
//! assembles them and runs every `validate()` before anything starts.

use crate::alarm::AlarmsConfig;
use crate::batch::BatchConfig;
use crate::buffer::BufferConfig;
use crate::kinesis::KinesisConfig;
use crate::modbus::ModbusConfig;
use crate::mqtt::MqttConfig;
use crate::order::OrderConfig;
use crate::window::WindowsConfig;
use fieldlink_ops::aws::AwsSettings;
pub use fieldlink_ops::config::{ConfigError, Validate};
use fieldlink_ops::logging::LogSettings;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This agent's id: 1 to 64 characters of `[A-Za-z0-9._-]`. It names the agent in every batch and is the
    /// Kinesis partition key, so it must be unique per site and must not change (the buffer remembers it).
    pub agent_id: String,
    /// Logging.
    #[serde(default)]
    pub log: LogSettings,
    /// Address of the `/metrics` and `/health` endpoint. Default `127.0.0.1:9464`.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// AWS connection settings (region, endpoint override, timeouts).
    #[serde(default)]
    pub aws: AwsSettings,
    /// The on-disk buffer.
    pub buffer: BufferConfig,
    /// When a batch is sealed.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Ordering, deduplication and late readings.
    #[serde(default)]
    pub order: OrderConfig,
    /// The Kinesis stream batches go to.
    pub kinesis: KinesisConfig,
    /// MQTT connections (`[[mqtt]]`, one table per broker).
    #[serde(default)]
    pub mqtt: Vec<MqttConfig>,
    /// Modbus devices (`[[modbus]]`, one table per device).
    #[serde(default)]
    pub modbus: Vec<ModbusConfig>,
    /// Alarm rules (`[[alarms.rules]]`) and their local MQTT status (see `docs/alarms.md`).
    #[serde(default)]
    pub alarms: AlarmsConfig,
    /// Windowed aggregates (`[[windows.rules]]`, see `docs/windows.md`).
    #[serde(default)]
    pub windows: WindowsConfig,
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

/// Checks an agent id: 1..=64 bytes of `[A-Za-z0-9._-]`.
pub fn agent_id_problem(id: &str) -> Option<String> {
    if id.is_empty() || id.len() > fieldlink_proto::limits::MAX_AGENT_ID_BYTES {
        return Some(format!(
            "agent_id: must be 1 to 64 characters, got {}",
            id.len()
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some(format!(
            "agent_id: only letters, digits, '.', '_' and '-' are allowed, got {id:?}"
        ));
    }
    None
}

impl Config {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        fieldlink_ops::config::from_toml(text)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        fieldlink_ops::config::load(path)
    }

    /// What a valid configuration may still get wrong on this host, each naming its field: printed by
    /// `check-config` and logged at start, never refused (a test may want its buffer in RAM).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = self
            .windows
            .dedup_warnings("windows", self.order.dedup_window_ms);
        w.extend(self.windows.idle_warnings(
            "windows",
            self.order.reorder_window_ms + self.batch.linger_ms,
        ));
        if let Some(fs) = crate::buffer::volatile_filesystem(&self.buffer.path) {
            w.push(format!(
                "buffer.path: {} is on a {fs} (memory): every reading buffered there is lost at a reboot or a \
                 power loss, whatever `durability` says (a read-only root filesystem often mounts /var/lib so); \
                 put it on persistent storage (under systemd also allow it: ReadWritePaths= in a drop-in)",
                self.buffer.path.display()
            ));
        }
        w
    }
}

impl Validate for Config {
    /// Every problem, each naming its field. Empty means valid.
    fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        p.extend(agent_id_problem(&self.agent_id));
        p.extend(self.log.validate("log"));
        p.extend(self.aws.validate("aws"));
        p.extend(self.buffer.validate("buffer"));
        p.extend(self.batch.validate("batch"));
        p.extend(self.order.validate("order"));
        p.extend(self.kinesis.validate("kinesis"));
        if self.mqtt.is_empty() && self.modbus.is_empty() {
            p.push(
                "mqtt, modbus: at least one [[mqtt]] connection or [[modbus]] device is required"
                    .into(),
            );
        }
        let mut devices = std::collections::HashSet::new();
        for (i, m) in self.modbus.iter().enumerate() {
            p.extend(m.validate(&format!("modbus[{i}]")));
            if !devices.insert(m.name.as_str()) {
                p.push(format!("modbus[{i}].name: {:?} is used twice", m.name));
            }
        }
        p.extend(crate::modbus::fleet_problems(&self.modbus));
        let connections: Vec<(String, Vec<String>)> = self
            .mqtt
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
                    m.topics.iter().map(|t| t.filter.clone()).collect(),
                )
            })
            .collect();
        p.extend(self.alarms.validate("alarms", &connections));
        p.extend(self.windows.validate("windows"));
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.mqtt.iter().enumerate() {
            p.extend(m.validate(&format!("mqtt[{i}]")));
            if !names.insert(m.name.as_str()) {
                p.push(format!("mqtt[{i}].name: {:?} is used twice", m.name));
            }
        }
        p
    }
}

/// The example configuration shipped in `deploy/agent.example.toml` (tested to parse and validate).
pub const EXAMPLE: &str = include_str!("../../deploy/agent.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_is_valid() {
        if let Err(e) = Config::from_toml(EXAMPLE) {
            panic!("deploy/agent.example.toml: {e}");
        }
    }

    #[test]
    fn a_config_without_alarms_is_valid() {
        let start = EXAMPLE.find("[alarms]").unwrap_or(EXAMPLE.len());
        if let Err(e) = Config::from_toml(&EXAMPLE[..start]) {
            panic!("the example without [alarms]: {e}");
        }
    }

    #[test]
    fn the_readmes_edge_rules_are_valid() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\n[[alarms.rules]]").unwrap() + 8;
        let end = start + readme[start..].find("```").unwrap();
        let base = &EXAMPLE[..EXAMPLE.find("[alarms]").unwrap()];
        let cfg = Config::from_toml(&format!("{base}{}", &readme[start..end]))
            .unwrap_or_else(|e| panic!("README.md, Edge rules: {e}"));
        assert_eq!((cfg.alarms.rules.len(), cfg.windows.rules.len()), (2, 1));
    }

    #[test]
    fn a_buffer_in_memory_is_warned_of() {
        let with_path = |path: &str| {
            let example_path = EXAMPLE.lines().find(|l| l.starts_with("path = ")).unwrap();
            let text = EXAMPLE.replacen(example_path, &format!("path = {path:?}"), 1);
            Config::from_toml(&text).unwrap().warnings().join("\n")
        };
        // /dev/shm is a tmpfs on Linux (containers included); the build directory is not.
        let shm = with_path("/dev/shm/fieldlink-test/buffer.db");
        assert!(
            shm.contains("buffer.path") && shm.contains("tmpfs"),
            "{shm}"
        );
        let disk = with_path(concat!(env!("CARGO_MANIFEST_DIR"), "/buffer.db"));
        assert!(!disk.contains("buffer.path"), "{disk}");
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let text = EXAMPLE.replace("[buffer]", "[buffer]\nmax_bytez = 5");
        let err = Config::from_toml(&text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("max_bytez"), "{err}");
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let text = EXAMPLE
            .replace("agent_id = \"edge-demo-1\"", "agent_id = \"bad id!\"")
            .replace("stream = \"fieldlink-demo\"", "stream = \"\"")
            .replace("linger_ms = 1000", "linger_ms = 0");
        let Err(ConfigError::Invalid(problems)) = Config::from_toml(&text) else {
            panic!("expected invalid")
        };
        let all = problems.join("\n");
        for field in ["agent_id", "kinesis.stream", "batch.linger_ms"] {
            assert!(all.contains(field), "{field} missing from:\n{all}");
        }
    }
}
