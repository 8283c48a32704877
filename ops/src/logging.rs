//! Structured logging setup.

use serde::Deserialize;
use std::str::FromStr;
use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt, Layer};

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Filter in `target=level` form, e.g. `info,fieldlink_agent=debug`. Default `info`. `FIELDLINK_LOG` overrides.
    #[serde(default = "default_level")]
    pub level: String,
    /// `text` or `json`. Default `text`.
    #[serde(default)]
    pub format: LogFormat,
}

fn default_level() -> String {
    "info".into()
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: default_level(),
            format: LogFormat::Text,
        }
    }
}

impl LogSettings {
    /// Problems with these settings, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        match Targets::from_str(&self.level) {
            Ok(_) => Vec::new(),
            Err(e) => vec![format!("{path}.level: {e}")],
        }
    }

    /// Installs the global subscriber (logs go to stderr). Call once.
    pub fn init(&self) {
        let spec = std::env::var("FIELDLINK_LOG").unwrap_or_else(|_| self.level.clone());
        let filter = Targets::from_str(&spec)
            .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
        let layer = match self.format {
            // Colours only on a terminal: journald and log files get plain text.
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .boxed(),
        };
        let _ = tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .try_init();
    }
}
