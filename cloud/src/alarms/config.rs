use serde::Deserialize;

/// The cloud side of alarms (`[alarms]`): the alarm table and, optionally, SNS notifications.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmsConfig {
    /// Where the alarm table goes: `s3://bucket/prefix`, `file:///path` or a local path, outside the `[parquet]`
    /// location (a reader of the bronze table must not find alarm files in it). Published hours
    /// `dt=…/hour=…/part-00000.parquet`, landing files in `_landing/`, SNS deduplication markers in `_notified/`.
    pub location: String,
    /// A shard commits (writes its alarm landing files) when it has staged this many events. Default 100000.
    #[serde(default = "default_max_rows")]
    pub max_rows_per_file: usize,
    /// SNS notifications; absent = off.
    #[serde(default)]
    pub sns: Option<SnsConfig>,
}

/// Publishing every alarm event to an SNS topic (`[alarms.sns]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnsConfig {
    /// The topic: `arn:aws:sns:<region>:<account>:<name>`.
    pub topic_arn: String,
    /// Time limit of one `Publish` call (and of one deduplication-marker read or write), milliseconds. Default 5000.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// First wait after a failed call, milliseconds (doubling, jittered). Default 200.
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    /// Longest wait between retries of a transient failure, milliseconds. Default 30000.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
}

fn default_max_rows() -> usize {
    100_000
}
fn default_timeout() -> u64 {
    5_000
}
fn default_backoff_initial() -> u64 {
    200
}
fn default_backoff_max() -> u64 {
    30_000
}

impl AlarmsConfig {
    /// Problems with this section, prefixed by `path`; `bronze` is the `[parquet]` location, if any.
    pub fn validate(&self, path: &str, bronze: Option<&str>) -> Vec<String> {
        let mut p = Vec::new();
        match crate::store::Location::parse(&self.location) {
            Err(e) => p.push(format!("{path}.location: {e}")),
            Ok(mine) => {
                if let Some(Ok(b)) = bronze.map(crate::store::Location::parse) {
                    if mine.overlaps(&b) {
                        p.push(format!(
                            "{path}.location: {:?} overlaps parquet.location {:?}: give the alarm table its own location (e.g. a sibling prefix)",
                            self.location,
                            bronze.unwrap_or_default()
                        ));
                    }
                }
            }
        }
        if self.max_rows_per_file == 0 {
            p.push(format!("{path}.max_rows_per_file: must be positive"));
        }
        if let Some(s) = &self.sns {
            p.extend(s.validate(&format!("{path}.sns")));
        }
        p
    }
}

impl SnsConfig {
    /// Problems with this section, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        let parts: Vec<&str> = self.topic_arn.split(':').collect();
        if parts.len() != 6 || parts[0] != "arn" || parts[2] != "sns" || parts[5].is_empty() {
            p.push(format!(
                "{path}.topic_arn: expected arn:<partition>:sns:<region>:<account>:<topic>, got {:?}",
                self.topic_arn
            ));
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            p.push(format!(
                "{path}.timeout_ms: must be 100..=60000, got {}",
                self.timeout_ms
            ));
        }
        if self.backoff_initial_ms == 0 || self.backoff_initial_ms > self.backoff_max_ms {
            p.push(format!(
                "{path}.backoff_initial_ms: must be positive and at most backoff_max_ms, got {}",
                self.backoff_initial_ms
            ));
        }
        if self.backoff_max_ms > 3_600_000 {
            p.push(format!(
                "{path}.backoff_max_ms: at most 3600000, got {}",
                self.backoff_max_ms
            ));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_field_is_named_and_an_overlapping_location_is_refused() {
        let bad = AlarmsConfig {
            location: "s3://bkt/bronze/alarms".into(),
            max_rows_per_file: 0,
            sns: Some(SnsConfig {
                topic_arn: "arn:aws:sqs:us-east-1:1:x".into(),
                timeout_ms: 10,
                backoff_initial_ms: 0,
                backoff_max_ms: 4_000_000,
            }),
        };
        let p = bad.validate("alarms", Some("s3://bkt/bronze")).join("\n");
        for field in [
            "alarms.location",
            "alarms.max_rows_per_file",
            "alarms.sns.topic_arn",
            "alarms.sns.timeout_ms",
            "alarms.sns.backoff_initial_ms",
            "alarms.sns.backoff_max_ms",
        ] {
            assert!(p.contains(field), "{field} missing in:\n{p}");
        }
        let good = AlarmsConfig {
            location: "s3://bkt/alarms".into(),
            max_rows_per_file: 10,
            sns: Some(SnsConfig {
                topic_arn: "arn:aws:sns:us-east-1:123456789012:alarms".into(),
                timeout_ms: 5000,
                backoff_initial_ms: 200,
                backoff_max_ms: 30000,
            }),
        };
        assert_eq!(
            good.validate("alarms", Some("s3://bkt/bronze")),
            Vec::<String>::new()
        );
        assert!(!good.validate("alarms", Some("s3://bkt")).is_empty());
    }
}
