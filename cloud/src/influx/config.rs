use serde::Deserialize;

/// Which write API the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InfluxApi {
    /// `POST /api/v2/write?org=&bucket=&precision=ms` with `Authorization: Token …` (InfluxDB 2 and 3,
    /// Timestream for InfluxDB, VictoriaMetrics).
    V2,
    /// `POST /write?db=&rp=&precision=ms` with optional basic auth (InfluxDB 1.x and compatible servers).
    V1,
}

/// The InfluxDB sink (`[influxdb]`): line protocol over HTTP(S), schema in `influx::lines`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfluxConfig {
    /// Base URL of the server, `http://` or `https://` (e.g. the endpoint of a Timestream for InfluxDB
    /// instance, `https://<id>-<account>.timestream-influxdb.<region>.on.aws:8086`). Required.
    pub url: String,
    /// `v2` (default) or `v1`.
    #[serde(default = "default_api")]
    pub api: InfluxApi,
    /// v2: organization (required with `v2`).
    #[serde(default)]
    pub org: Option<String>,
    /// v2: bucket (required with `v2`).
    #[serde(default)]
    pub bucket: Option<String>,
    /// v2: name of the environment variable holding the API token, sent as `Authorization: Token <token>`.
    /// Absent: no token is sent.
    #[serde(default)]
    pub token_env: Option<String>,
    /// v1: database (required with `v1`).
    #[serde(default)]
    pub database: Option<String>,
    /// v1: retention policy; absent = the database's default.
    #[serde(default)]
    pub retention_policy: Option<String>,
    /// v1: name of the environment variable holding the user name (basic auth). Absent: no auth.
    #[serde(default)]
    pub username_env: Option<String>,
    /// v1: name of the environment variable holding the password (with `username_env`).
    #[serde(default)]
    pub password_env: Option<String>,
    /// Measurement of every line. Default `fieldlink`.
    #[serde(default = "default_measurement")]
    pub measurement: String,
    /// Compress request bodies with gzip (`Content-Encoding: gzip`). Default true.
    #[serde(default = "default_true")]
    pub gzip: bool,
    /// Lines per request at most. Default 5000 (InfluxDB's recommended batch size).
    #[serde(default = "default_max_lines")]
    pub max_lines_per_request: usize,
    /// Uncompressed bytes per request at most (a longer single line goes alone). Default 1048576.
    #[serde(default = "default_max_bytes")]
    pub max_bytes_per_request: usize,
    /// Requests of one shard in flight at once. Default 4.
    #[serde(default = "default_in_flight")]
    pub max_requests_in_flight: usize,
    /// Timeout of one request (connect, send, answer), milliseconds. Default 10000.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_api() -> InfluxApi {
    InfluxApi::V2
}
fn default_measurement() -> String {
    "fieldlink".into()
}
fn default_true() -> bool {
    true
}
fn default_max_lines() -> usize {
    5000
}
fn default_max_bytes() -> usize {
    1 << 20
}
fn default_in_flight() -> usize {
    4
}
fn default_timeout() -> u64 {
    10_000
}

fn blank(v: &Option<String>) -> bool {
    v.as_deref().is_none_or(|s| s.trim().is_empty())
}

impl InfluxConfig {
    /// Problems with this section, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if !(self.url.starts_with("http://") || self.url.starts_with("https://"))
            || self.url.parse::<http::Uri>().is_err()
        {
            p.push(format!(
                "{path}.url: must be an http:// or https:// URL, got {:?}",
                self.url
            ));
        }
        match self.api {
            InfluxApi::V2 => {
                for (field, v) in [("org", &self.org), ("bucket", &self.bucket)] {
                    if blank(v) {
                        p.push(format!("{path}.{field}: required with api = \"v2\""));
                    }
                }
                for (field, v) in [
                    ("database", &self.database),
                    ("retention_policy", &self.retention_policy),
                    ("username_env", &self.username_env),
                    ("password_env", &self.password_env),
                ] {
                    if v.is_some() {
                        p.push(format!(
                            "{path}.{field}: only with api = \"v1\" (v2 uses org, bucket, token_env)"
                        ));
                    }
                }
            }
            InfluxApi::V1 => {
                if blank(&self.database) {
                    p.push(format!("{path}.database: required with api = \"v1\""));
                }
                for (field, v) in [
                    ("org", &self.org),
                    ("bucket", &self.bucket),
                    ("token_env", &self.token_env),
                ] {
                    if v.is_some() {
                        p.push(format!(
                            "{path}.{field}: only with api = \"v2\" (v1 uses database, retention_policy, username_env, password_env)"
                        ));
                    }
                }
                if self.username_env.is_some() != self.password_env.is_some() {
                    p.push(format!(
                        "{path}.username_env, {path}.password_env: set both or neither"
                    ));
                }
            }
        }
        for (field, v) in [
            ("token_env", &self.token_env),
            ("username_env", &self.username_env),
            ("password_env", &self.password_env),
        ] {
            if let Some(v) = v {
                if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    p.push(format!(
                        "{path}.{field}: must name an environment variable (letters, digits, _), got {v:?}"
                    ));
                }
            }
        }
        let m = &self.measurement;
        if m.is_empty() || m.len() > 255 || m.starts_with('_') || m.contains(['\\', '\n', '\r']) {
            p.push(format!(
                "{path}.measurement: must be 1 to 255 characters, not start with _ and have no backslash or line break, got {m:?}"
            ));
        }
        if !(1..=100_000).contains(&self.max_lines_per_request) {
            p.push(format!("{path}.max_lines_per_request: must be 1..=100000"));
        }
        if !(1024..=(64 << 20)).contains(&self.max_bytes_per_request) {
            p.push(format!(
                "{path}.max_bytes_per_request: must be 1024..=67108864"
            ));
        }
        if !(1..=64).contains(&self.max_requests_in_flight) {
            p.push(format!("{path}.max_requests_in_flight: must be 1..=64"));
        }
        if !(100..=600_000).contains(&self.timeout_ms) {
            p.push(format!("{path}.timeout_ms: must be 100..=600000"));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> InfluxConfig {
        toml::from_str(text).expect("parses")
    }

    #[test]
    fn every_problem_is_named() {
        let c = parse(
            r#"url = "ftp://x"
               api = "v1"
               org = "o"
               username_env = "U"
               measurement = "_m"
               max_lines_per_request = 0
               max_bytes_per_request = 10
               max_requests_in_flight = 0
               timeout_ms = 1"#,
        );
        let all = c.validate("influxdb").join("\n");
        for f in [
            "influxdb.url",
            "influxdb.database",
            "influxdb.org",
            "influxdb.username_env, influxdb.password_env",
            "influxdb.measurement",
            "influxdb.max_lines_per_request",
            "influxdb.max_bytes_per_request",
            "influxdb.max_requests_in_flight",
            "influxdb.timeout_ms",
        ] {
            assert!(all.contains(f), "{f} missing in:\n{all}");
        }
        let v2 = parse(
            r#"url = "https://h:8086"
               database = "d"
               token_env = "bad name""#,
        );
        let all = v2.validate("influxdb").join("\n");
        for f in [
            "influxdb.org",
            "influxdb.bucket",
            "influxdb.database",
            "influxdb.token_env",
        ] {
            assert!(all.contains(f), "{f} missing in:\n{all}");
        }
        assert!(toml::from_str::<InfluxConfig>("url = \"http://h\"\nbukcet = \"b\"").is_err());
    }
}
