//! The cloud service's TOML configuration; every problem is reported at once.

use crate::alarms::AlarmsConfig;
use crate::compaction::CompactionConfig;
use crate::consumer::ConsumerConfig;
use crate::influx::InfluxConfig;
use crate::land::DedupConfig;
use crate::lease::LeaseConfig;
use crate::parquet::ParquetConfig;
use crate::timestream::TimestreamConfig;
use fieldlink_ops::aws::AwsSettings;
pub use fieldlink_ops::config::{ConfigError, Validate};
use fieldlink_ops::logging::LogSettings;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Logging.
    #[serde(default)]
    pub log: LogSettings,
    /// Address of `/metrics` and `/health`. Default `0.0.0.0:9465` (it runs in a container).
    #[serde(default = "default_listen")]
    pub metrics_listen: SocketAddr,
    /// AWS connection settings.
    #[serde(default)]
    pub aws: AwsSettings,
    /// The stream to consume.
    pub kinesis: ConsumerConfig,
    /// Shard leases and checkpoints.
    #[serde(default)]
    pub leases: LeaseConfig,
    /// The memory of landed batches that skips producer resends (bounded).
    #[serde(default)]
    pub dedup: DedupConfig,
    /// Where records and readings that cannot be landed go, with the reason: `s3://bucket/prefix`,
    /// `file:///path` or a path. Default: `_dead_letter` under the Parquet location.
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// Timestream sink; absent = off.
    #[serde(default)]
    pub timestream: Option<TimestreamConfig>,
    /// InfluxDB sink (line protocol over HTTP: InfluxDB 1.x/2/3, Timestream for InfluxDB, VictoriaMetrics);
    /// absent = off.
    #[serde(default)]
    pub influxdb: Option<InfluxConfig>,
    /// Parquet sink; absent = off.
    #[serde(default)]
    pub parquet: Option<ParquetConfig>,
    /// Publishing the Parquet landing files as one bronze file per closed hour (used with `[parquet]`).
    #[serde(default)]
    pub compaction: CompactionConfig,
    /// The alarm table and SNS notifications for alarm-event records; absent = alarm records are dead-lettered.
    #[serde(default)]
    pub alarms: Option<AlarmsConfig>,
    /// How often a sink call that failed with a permanent error (access denied, a deleted table or bucket) is
    /// tried again, milliseconds. Meanwhile `/health` fails for that sink and its shards' checkpoints wait;
    /// the sink recovers by itself at the next try after the operator fixed the cause. Transient errors
    /// (throttling, 5xx, timeouts) are retried sooner, with a capped backoff. Default 30000.
    #[serde(default = "default_sink_failing_retry_ms")]
    pub sink_failing_retry_ms: u64,
    /// How long one sink call's transient failures (throttling, 5xx, timeouts, refused connections) last before
    /// `/health` fails for that sink, milliseconds: a throttling spell does not, a sink down for longer does.
    /// Default 60000.
    #[serde(default = "default_sink_transient_failing_ms")]
    pub sink_transient_failing_ms: u64,
}

fn default_sink_failing_retry_ms() -> u64 {
    30_000
}

fn default_sink_transient_failing_ms() -> u64 {
    60_000
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9465))
}

impl Config {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        fieldlink_ops::config::from_toml(text)
    }

    /// The dead-letter location.
    pub fn dead_letter_location(&self) -> String {
        match (&self.dead_letter, &self.parquet) {
            (Some(d), _) => d.clone(),
            (None, Some(p)) => format!("{}/_dead_letter", p.location.trim_end_matches('/')),
            (None, None) => String::new(),
        }
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        fieldlink_ops::config::load(path)
    }
}

impl Validate for Config {
    /// Every problem, each naming its field.
    fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        p.extend(self.log.validate("log"));
        p.extend(self.aws.validate("aws"));
        p.extend(self.kinesis.validate("kinesis"));
        p.extend(self.leases.validate("leases"));
        p.extend(self.dedup.validate("dedup"));
        match (&self.dead_letter, &self.parquet) {
            (Some(d), _) => {
                if let Err(e) = crate::store::Location::parse(d) {
                    p.push(format!("dead_letter: {e}"));
                }
            }
            (None, None) => p.push(
                "dead_letter: required when there is no [parquet] section (it defaults to <parquet.location>/_dead_letter)".into(),
            ),
            (None, Some(_)) => {}
        }
        if let Some(t) = &self.timestream {
            p.extend(t.validate("timestream"));
        }
        if let Some(i) = &self.influxdb {
            p.extend(i.validate("influxdb"));
        }
        if let Some(q) = &self.parquet {
            p.extend(q.validate("parquet"));
        }
        p.extend(self.compaction.validate("compaction"));
        if let Some(a) = &self.alarms {
            if self.parquet.is_none() {
                p.push("alarms: needs a [parquet] section (the compactor that publishes bronze publishes the alarm table; the encoding settings are shared)".into());
            }
            p.extend(a.validate("alarms", self.parquet.as_ref().map(|q| q.location.as_str())));
        }
        if !(100..=86_400_000).contains(&self.sink_transient_failing_ms) {
            p.push(format!(
                "sink_transient_failing_ms: must be 100..=86400000, got {}",
                self.sink_transient_failing_ms
            ));
        }
        if !(100..=3_600_000).contains(&self.sink_failing_retry_ms) {
            p.push(format!(
                "sink_failing_retry_ms: must be 100..=3600000, got {}",
                self.sink_failing_retry_ms
            ));
        }
        if self.timestream.is_none() && self.parquet.is_none() && self.influxdb.is_none() {
            p.push("timestream, influxdb, parquet: configure at least one sink".into());
        }
        p
    }
}

/// The shipped example, `deploy/cloud.example.toml` (tested).
pub const EXAMPLE: &str = include_str!("../../deploy/cloud.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_is_valid() {
        if let Err(e) = Config::from_toml(EXAMPLE) {
            panic!("deploy/cloud.example.toml: {e}");
        }
    }

    #[test]
    fn every_problem_is_named() {
        let text = EXAMPLE
            .replace("max_records_per_get = 1000", "max_records_per_get = 0")
            .replace(
                "location = \"s3://fieldlink-bronze/bronze\"",
                "location = \"gs://x\"",
            );
        let Err(ConfigError::Invalid(p)) = Config::from_toml(&text) else {
            panic!("expected invalid")
        };
        let all = p.join("\n");
        assert!(
            all.contains("kinesis.max_records_per_get") && all.contains("parquet.location"),
            "{all}"
        );
    }
}
