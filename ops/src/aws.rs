//! AWS SDK configuration with one TLS stack and explicit timeouts.

use aws_config::{retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Region, SdkConfig};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use serde::Deserialize;
use std::time::Duration;

/// Where and how to reach AWS. Shared by every AWS client a binary builds.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AwsSettings {
    /// AWS region, e.g. `eu-central-1`. Default: the SDK's region chain (`AWS_REGION`, profile, IMDS).
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint override for every service (a local emulator such as moto or LocalStack), e.g.
    /// `http://127.0.0.1:5000`. Default: the real AWS endpoints. With an override, Timestream endpoint discovery
    /// is turned off (discovery would send requests to real AWS).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Timeout for establishing a TCP/TLS connection, milliseconds. Default 3000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Timeout for one attempt of one API call, milliseconds. Default 10000.
    #[serde(default = "default_attempt_timeout_ms")]
    pub attempt_timeout_ms: u64,
    /// Attempts the SDK makes for a transient transport error before the caller sees it. Default 3.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

fn default_connect_timeout_ms() -> u64 {
    3000
}
fn default_attempt_timeout_ms() -> u64 {
    10_000
}
fn default_max_attempts() -> u32 {
    3
}

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            region: None,
            endpoint_url: None,
            connect_timeout_ms: default_connect_timeout_ms(),
            attempt_timeout_ms: default_attempt_timeout_ms(),
            max_attempts: default_max_attempts(),
        }
    }
}

impl AwsSettings {
    /// Problems with these settings, each prefixed by `path` (e.g. `aws.endpoint_url`).
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut errs = Vec::new();
        if let Some(url) = &self.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                errs.push(format!(
                    "{path}.endpoint_url: must start with http:// or https://, got {url:?}"
                ));
            }
        }
        if let Some(r) = &self.region {
            if r.is_empty() {
                errs.push(format!("{path}.region: must not be empty"));
            }
        }
        if self.connect_timeout_ms == 0 || self.attempt_timeout_ms == 0 {
            errs.push(format!("{path}: timeouts must be positive"));
        }
        if self.max_attempts == 0 {
            errs.push(format!("{path}.max_attempts: must be at least 1"));
        }
        errs
    }

    /// Builds the SDK configuration (credentials and region from the default chains).
    pub async fn sdk_config(&self) -> SdkConfig {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_millis(self.connect_timeout_ms))
                    .operation_attempt_timeout(Duration::from_millis(self.attempt_timeout_ms))
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(self.max_attempts));
        if let Some(region) = &self.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        loader.load().await
    }
}
