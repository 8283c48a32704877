//! Loading a TOML configuration: parse with the schema (unknown fields are errors), then validate every field
//! and report all problems at once, each naming its field.

use serde::de::DeserializeOwned;
use std::path::Path;

/// A configuration that can check itself.
pub trait Validate {
    /// Every problem, each prefixed by the field it concerns (`kinesis.stream: …`). Empty means valid.
    fn validate(&self) -> Vec<String>;
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Not valid TOML for the schema (syntax, unknown field, wrong type, missing field); names the place.
    #[error("{0}")]
    Parse(String),
    /// The values are invalid; every problem is listed.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Parses and validates TOML text.
pub fn from_toml<T: DeserializeOwned + Validate>(text: &str) -> Result<T, ConfigError> {
    let cfg: T = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
    let problems = cfg.validate();
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// Reads, parses and validates a file.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    })?;
    from_toml(&text)
}
