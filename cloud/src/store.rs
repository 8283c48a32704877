//! Where files go: a local directory or an S3 bucket, chosen by URL (`file:///path`, a plain path, or
//! `s3://bucket/prefix`). Writes are whole-object and atomic: a reader never sees a partial file.

use crate::land::retry::{SinkMonitor, Stopped};
use fieldlink_ops::aws_error::CallError;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A store location parsed from config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local directory.
    Local(PathBuf),
    /// An S3 bucket and key prefix (no leading or trailing `/`).
    S3 {
        /// Bucket.
        bucket: String,
        /// Prefix.
        prefix: String,
    },
}

impl Location {
    /// Parses `s3://bucket/prefix`, `file:///path` or a plain path.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.len() < 3 || bucket.len() > 63 {
                return Err(format!("bucket name must be 3 to 63 characters in {s:?}"));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            });
        }
        let path = s.strip_prefix("file://").unwrap_or(s);
        if path.is_empty() {
            return Err("empty path".into());
        }
        if s.contains("://") && !s.starts_with("file://") {
            return Err(format!(
                "unsupported scheme in {s:?} (use s3:// or file://)"
            ));
        }
        Ok(Location::Local(PathBuf::from(path)))
    }
}

/// Errors writing an object; the caller retries.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Local file system.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// S3.
    #[error("S3 PutObject {key}: {error}")]
    S3 {
        /// The key.
        key: String,
        /// The cause, classified.
        error: CallError,
    },
}

impl StoreError {
    /// The cause, classified (transient or permanent) and in one sentence.
    pub fn call_error(&self) -> CallError {
        match self {
            StoreError::Io { source, .. } => CallError::of_io(source),
            StoreError::S3 { error, .. } => error.clone(),
        }
    }

    /// The failed operation, for messages.
    pub fn operation(&self) -> &'static str {
        match self {
            StoreError::Io { .. } => "file write",
            StoreError::S3 { .. } => "PutObject",
        }
    }
}

/// An open store.
#[derive(Debug, Clone)]
pub enum Store {
    /// Local directory.
    Local(PathBuf),
    /// S3.
    S3 {
        /// Client.
        client: aws_sdk_s3::Client,
        /// Bucket.
        bucket: String,
        /// Prefix.
        prefix: String,
    },
}

impl Store {
    /// Opens `location`. For S3 with an endpoint override (an emulator), path-style addressing is used.
    pub fn open(location: &Location, sdk: &aws_config::SdkConfig, endpoint_override: bool) -> Self {
        match location {
            Location::Local(p) => Store::Local(p.clone()),
            Location::S3 { bucket, prefix } => {
                let conf = aws_sdk_s3::config::Builder::from(sdk)
                    .force_path_style(endpoint_override)
                    .build();
                Store::S3 {
                    client: aws_sdk_s3::Client::from_conf(conf),
                    bucket: bucket.clone(),
                    prefix: prefix.clone(),
                }
            }
        }
    }

    /// Writes `bytes` at `key` (relative to the location), replacing any object there.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        match self {
            Store::Local(root) => {
                let path = root.join(key);
                let tmp = path.with_extension("tmp");
                let io = |source| StoreError::Io {
                    path: path.display().to_string(),
                    source,
                };
                if let Some(dir) = path.parent() {
                    tokio::fs::create_dir_all(dir).await.map_err(io)?;
                }
                let tmp2 = tmp.clone();
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    use std::io::Write;
                    let mut f = std::fs::File::create(&tmp2)?;
                    f.write_all(&bytes)?;
                    f.sync_all()
                })
                .await
                .map_err(|e| io(std::io::Error::other(e)))?
                .map_err(io)?;
                tokio::fs::rename(&tmp, &path).await.map_err(io)
            }
            Store::S3 {
                client,
                bucket,
                prefix,
            } => {
                let full = if prefix.is_empty() {
                    key.to_owned()
                } else {
                    format!("{prefix}/{key}")
                };
                client
                    .put_object()
                    .bucket(bucket)
                    .key(&full)
                    .body(bytes.into())
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| StoreError::S3 {
                        key: full,
                        error: CallError::of_sdk(&e),
                    })
            }
        }
    }
}

impl Store {
    /// [`Store::put`], retried until it succeeds (see [`crate::land::retry`]: capped backoff for transient
    /// errors, `/health` and a slow cadence for permanent ones). A shard whose output cannot be written must
    /// not move on (its checkpoint would pass data that is not durable). `Err(Stopped)`: `cancel` fired first.
    pub async fn put_until_done(
        &self,
        key: &str,
        bytes: Vec<u8>,
        monitor: &SinkMonitor,
        cancel: &CancellationToken,
    ) -> Result<(), Stopped> {
        let mut retry = monitor.retry(cancel, Duration::from_millis(200), Duration::from_secs(30));
        loop {
            match self.put(key, bytes.clone()).await {
                Ok(()) => {
                    retry.succeeded();
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(key, error = %e, "write failed");
                    retry.failed(e.operation(), &e.call_error()).await?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_by_scheme() {
        assert_eq!(
            Location::parse("s3://bronze/fieldlink/"),
            Ok(Location::S3 {
                bucket: "bronze".into(),
                prefix: "fieldlink".into()
            })
        );
        assert_eq!(
            Location::parse("s3://bronze"),
            Ok(Location::S3 {
                bucket: "bronze".into(),
                prefix: String::new()
            })
        );
        assert_eq!(
            Location::parse("file:///data/x"),
            Ok(Location::Local("/data/x".into()))
        );
        assert_eq!(
            Location::parse("./out"),
            Ok(Location::Local("./out".into()))
        );
        assert!(Location::parse("gs://x/y").is_err());
        assert!(Location::parse("s3://ab").is_err());
    }
}
