//! Operational plumbing shared by `fieldlink-agent` and `fieldlink-cloud`.
//!
//! - [`aws`]: one way to build AWS SDK configuration: a single TLS stack (rustls + ring), explicit connect and
//!   operation timeouts, optional endpoint override for local emulators.
//! - [`aws_error`]: what a failed AWS call means for the caller (retry soon, or tell the operator) and one short
//!   readable sentence for `/health` and logs instead of the SDK's debug structures.
//! - [`metrics`]: counters and gauges rendered in the Prometheus text format. Counters only go up and are
//!   incremented where the event happens; gauges are set from a source of truth, never adjusted by deltas.
//! - [`http`]: a deliberately tiny HTTP/1.1 responder for `GET /metrics` and `GET /health` (bounded request size,
//!   per-connection timeout), so the binaries need no HTTP server framework.
//! - [`config`]: TOML loading with `deny_unknown_fields` schemas and a [`config::Validate`] pass that reports
//!   every problem at once.
//! - [`logging`], [`shutdown`], [`backoff`]: structured logs, one cancellation token, capped exponential backoff
//!   with full jitter.
//! - [`systemd`]: `sd_notify` readiness, status, stopping and watchdog messages (no libsystemd).

pub mod aws;
pub mod aws_error;
pub mod backoff;
pub mod config;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod shutdown;
pub mod systemd;

/// Milliseconds since the Unix epoch by the system clock (0 if the clock is before 1970).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
