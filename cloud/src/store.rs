//! Where files go: a local directory or an S3 bucket, chosen by URL (`file:///path`, a plain path, or
//! `s3://bucket/prefix`). Writes are whole-object and atomic: a reader never sees a partial file, and a write
//! to an existing key replaces it in one step (S3: `PutObject`, or a multipart upload completed in one step for a
//! file larger than [`UPLOAD_PART_BYTES`]; a local directory: a hidden temporary file in
//! the target directory, fsynced, renamed over the target, then the directory fsynced).
//!
//! Keys are `/`-separated paths relative to the location. Besides writing, the compactor
//! ([`crate::compaction`]) lists keys under a prefix, reads objects (whole, or streamed into a local file, with
//! the ETag of the version read) and deletes them.
//!
//! The compactor's writes are conditional ([`Expect`]): S3 replaces an object only if it is still the version
//! the writer read (`If-Match` its ETag) or creates it only if there is none (`If-None-Match: *`), and answers
//! 412 otherwise ([`StoreError::Changed`]): a writer that lost its lease, or whose request outlived it, cannot
//! overwrite what another wrote since. A local directory ignores the conditions (one host; it is fenced by time
//! only).

use crate::land::retry::{SinkMonitor, Stopped};
use fieldlink_ops::aws_error::CallError;
use std::path::{Path, PathBuf};
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

    /// Whether one location lies inside the other (or they are the same): a table under another table's
    /// location would be read as part of it.
    pub fn overlaps(&self, other: &Location) -> bool {
        fn within(a: &str, b: &str) -> bool {
            b.is_empty() || a == b || a.starts_with(&format!("{b}/"))
        }
        match (self, other) {
            (Location::Local(a), Location::Local(b)) => a.starts_with(b) || b.starts_with(a),
            (
                Location::S3 { bucket, prefix },
                Location::S3 {
                    bucket: b2,
                    prefix: p2,
                },
            ) => bucket == b2 && (within(prefix, p2) || within(p2, prefix)),
            _ => false,
        }
    }
}

/// What a write requires of the object it replaces (S3 conditional writes; a local directory ignores it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Nothing: the write replaces whatever is there.
    Any,
    /// No object at the key (`If-None-Match: *`).
    Absent,
    /// The version of this ETag, as read (`If-Match`).
    ETag(String),
}

/// Whether an S3 error answering a write made with `expect` says the object is not what the writer expected:
/// 412 `PreconditionFailed`, 409 `ConditionalRequestConflict` (another conditional write of the key was under
/// way: S3 asks to read the ETag again), or, for `If-Match`, 404 `NoSuchKey` (the object is gone). Pure.
pub fn is_changed(expect: &Expect, code: Option<&str>, status: Option<u16>) -> bool {
    if *expect == Expect::Any {
        return false;
    }
    let gone = matches!(expect, Expect::ETag(_))
        && (code == Some("NoSuchKey") || (code.is_none() && status == Some(404)));
    gone || matches!(
        code,
        Some("PreconditionFailed" | "ConditionalRequestConflict")
    ) || (code.is_none() && matches!(status, Some(409 | 412)))
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
    #[error("S3 {op} {key}: {error}")]
    S3 {
        /// The S3 operation.
        op: &'static str,
        /// The key.
        key: String,
        /// The cause, classified.
        error: CallError,
    },
    /// A conditional write refused: the object is not the version the writer read ([`Expect`]). Nothing was
    /// written; the writer reads the object again before writing it.
    #[error("S3 {op} {key}: the object changed since it was read ({}); nothing written", error.kind)]
    Changed {
        /// The S3 operation.
        op: &'static str,
        /// The key.
        key: String,
        /// S3's answer (transient: it clears once the writer reads again).
        error: CallError,
    },
}

impl StoreError {
    /// The cause, classified (transient or permanent) and in one sentence.
    pub fn call_error(&self) -> CallError {
        match self {
            StoreError::Io { source, .. } => CallError::of_io(source),
            StoreError::S3 { error, .. } => error.clone(),
            StoreError::Changed { error, .. } => CallError {
                class: fieldlink_ops::aws_error::ErrorClass::Transient,
                ..error.clone()
            },
        }
    }

    /// The failed operation, for messages.
    pub fn operation(&self) -> &'static str {
        match self {
            StoreError::Io { .. } => "file system",
            StoreError::S3 { op, .. } | StoreError::Changed { op, .. } => op,
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
        self.put_expecting(key, bytes, &Expect::Any).await
    }

    /// [`Store::put`] if the object at `key` is what `expect` says (S3; a local directory ignores it), else
    /// [`StoreError::Changed`] with nothing written.
    pub async fn put_expecting(
        &self,
        key: &str,
        bytes: Vec<u8>,
        expect: &Expect,
    ) -> Result<(), StoreError> {
        match self {
            Store::Local(root) => {
                let path = root.join(key);
                let target = path.clone();
                blocking(&path, move || {
                    replace_file(&target, |f| {
                        use std::io::Write;
                        f.write_all(&bytes)
                    })
                })
                .await
            }
            Store::S3 {
                client,
                bucket,
                prefix,
            } => {
                let full = full_key(prefix, key);
                let (if_match, if_none_match) = conditions(expect);
                client
                    .put_object()
                    .bucket(bucket)
                    .key(&full)
                    .body(bytes.into())
                    .set_if_match(if_match)
                    .set_if_none_match(if_none_match)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| s3_write_error("PutObject", &full, expect, &e))
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

/// Runs blocking file work off the async runtime; errors name `path`.
async fn blocking<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    let io = |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| io(std::io::Error::other(e)))?
        .map_err(io)
}

/// The error of S3 operation `op` on `key`.
fn s3_error<'a>(op: &'static str, key: &'a str) -> impl Fn(CallError) -> StoreError + 'a {
    move |error| StoreError::S3 {
        op,
        key: key.to_owned(),
        error,
    }
}

/// The `If-Match` and `If-None-Match` headers of a write made with `expect`.
fn conditions(expect: &Expect) -> (Option<String>, Option<String>) {
    match expect {
        Expect::Any => (None, None),
        Expect::Absent => (None, Some("*".to_owned())),
        Expect::ETag(tag) => (Some(tag.clone()), None),
    }
}

/// The error of S3 write `op` on `key` made with `expect`: [`StoreError::Changed`] when S3 says the object is
/// not the one `expect` names ([`is_changed`]).
fn s3_write_error<E>(
    op: &'static str,
    key: &str,
    expect: &Expect,
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StoreError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_s3::error::ProvideErrorMetadata;
    let error = CallError::of_sdk(e);
    let status = e.raw_response().map(|r| r.status().as_u16());
    if is_changed(expect, e.code(), status) {
        return StoreError::Changed {
            op,
            key: key.to_owned(),
            error,
        };
    }
    s3_error(op, key)(error)
}

/// Files larger than this are written to S3 in parts of this size ([`Store::put_file`]). At the default
/// `[aws] attempt_timeout_ms` (10 s), a part needs 0.8 MiB/s; one `PutObject` of a 512 MiB hour needed 51 MiB/s.
/// (S3 takes parts of 5 MiB to 5 GiB, at most 10,000: up to 80 GB here.)
pub const UPLOAD_PART_BYTES: u64 = 8 * 1024 * 1024;

/// [`Store::put_file`] of a file larger than one part: `CreateMultipartUpload`, `UploadPart` per
/// [`UPLOAD_PART_BYTES`] of the file (each streamed from the file at its offset), `CompleteMultipartUpload`
/// (conditional on `expect`: S3 checks it when the object would appear); `may_write` asked before each. On a
/// refusal or an error the upload is aborted (best effort: an upload a crash left behind is not visible as an
/// object; a bucket lifecycle rule removes it, see docs/bronze.md).
async fn multipart_upload(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    src: &Path,
    size: u64,
    expect: &Expect,
    may_write: &(dyn Fn() -> bool + Sync),
) -> Result<bool, StoreError> {
    use aws_sdk_s3::primitives::{ByteStream, Length};
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    if !may_write() {
        return Ok(false);
    }
    let created = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| s3_error("CreateMultipartUpload", key)(CallError::of_sdk(&e)))?;
    let Some(id) = created.upload_id().map(str::to_owned) else {
        return Err(s3_error("CreateMultipartUpload", key)(body_error(
            "the answer has no upload id",
        )));
    };
    let parts = async {
        let mut parts = Vec::new();
        let mut offset = 0u64;
        while offset < size {
            if !may_write() {
                return Ok(None);
            }
            let len = UPLOAD_PART_BYTES.min(size - offset);
            let number = parts.len() as i32 + 1;
            let err = s3_error("UploadPart", key);
            let body = ByteStream::read_from()
                .path(src)
                .offset(offset)
                .length(Length::Exact(len))
                .build()
                .await
                .map_err(|e| err(body_error(e)))?;
            let out = client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(&id)
                .part_number(number)
                .body(body)
                .send()
                .await
                .map_err(|e| err(CallError::of_sdk(&e)))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .build(),
            );
            offset += len;
        }
        Ok(may_write().then_some(parts))
    }
    .await;
    let (if_match, if_none_match) = conditions(expect);
    let done = match parts {
        Ok(Some(parts)) => client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .set_if_match(if_match)
            .set_if_none_match(if_none_match)
            .send()
            .await
            .map(|_| true)
            .map_err(|e| s3_write_error("CompleteMultipartUpload", key, expect, &e)),
        Ok(None) => Ok(false),
        Err(e) => Err(e),
    };
    if !matches!(done, Ok(true)) {
        if let Err(e) = client
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&id)
            .send()
            .await
        {
            tracing::warn!(key, error = %CallError::of_sdk(&e).sentence("AbortMultipartUpload"), "an unfinished upload stays until the bucket's lifecycle rule removes it");
        }
    }
    done
}

/// Characters outside `[A-Za-z0-9._-]` as `%XX`, so any agent id or rule name is one key segment; a segment of
/// dots only (`.`, `..`) is escaped whole, so no key names a parent directory of a local store, and an empty one
/// is `%`.
pub fn segment(s: &str) -> String {
    if s.is_empty() {
        return "%".into();
    }
    let dots_only = s.bytes().all(|b| b == b'.');
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b.is_ascii_alphanumeric() || b"._-".contains(&b)) && !dots_only {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An error reading an S3 response body.
fn body_error(e: impl std::fmt::Display) -> CallError {
    CallError::of_io(&std::io::Error::other(e.to_string()))
}

/// What [`Store::get_to_file`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes written to the file.
    pub bytes: u64,
    /// The ETag of the version read (S3).
    pub etag: Option<String>,
}

/// An object found by [`Store::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the location.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// `prefix/key`, or `key` when the location has no prefix.
fn full_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}/{key}")
    }
}

/// Replaces `target` atomically: `write` fills a hidden temporary file in the same directory (a name no reader
/// lists: it starts with `.`), which is fsynced and renamed over `target`; then the directory is fsynced, so the
/// new file survives a power loss once this returns. Missing directories are created.
pub fn replace_file(
    target: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = target
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, target)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Every file under `dir` (recursively), as keys relative to `root`; hidden names (temporary files) are skipped.
fn walk(root: &Path, dir: &Path, out: &mut Vec<ObjectInfo>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let meta = match entry.metadata() {
            Ok(m) => m,
            // Deleted since the directory was read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            let key = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push(ObjectInfo {
                key,
                size: meta.len(),
            });
        }
    }
    Ok(())
}

impl Store {
    /// The local file of `key`, for a local-directory store (readers can use it in place).
    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        match self {
            Store::Local(root) => Some(root.join(key)),
            Store::S3 { .. } => None,
        }
    }

    /// Every object whose key starts with `prefix` (a directory: end it with `/`), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut out = Vec::new();
        match self {
            Store::Local(root) => {
                let (root, dir) = (root.clone(), root.join(prefix));
                let dir2 = dir.clone();
                out = blocking(&dir, move || {
                    let mut v = Vec::new();
                    walk(&root, &dir2, &mut v).map(|_| v)
                })
                .await?;
            }
            Store::S3 {
                client,
                bucket,
                prefix: base,
            } => {
                let full = full_key(base, prefix);
                let strip = if base.is_empty() { 0 } else { base.len() + 1 };
                let mut token: Option<String> = None;
                loop {
                    let resp = client
                        .list_objects_v2()
                        .bucket(bucket)
                        .prefix(&full)
                        .set_continuation_token(token.take())
                        .send()
                        .await
                        .map_err(|e| s3_error("ListObjectsV2", &full)(CallError::of_sdk(&e)))?;
                    for o in resp.contents() {
                        if let Some(k) = o.key() {
                            out.push(ObjectInfo {
                                key: k.get(strip..).unwrap_or(k).to_owned(),
                                size: o.size().unwrap_or(0).max(0) as u64,
                            });
                        }
                    }
                    match resp.next_continuation_token() {
                        Some(t) if resp.is_truncated() == Some(true) => token = Some(t.to_owned()),
                        _ => break,
                    }
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// The whole object at `key`, or `None` if there is none (for small objects).
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Store::Local(root) => {
                let path = root.join(key);
                match tokio::fs::read(&path).await {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(StoreError::Io {
                        path: path.display().to_string(),
                        source,
                    }),
                }
            }
            Store::S3 {
                client,
                bucket,
                prefix,
            } => {
                let full = full_key(prefix, key);
                let err = s3_error("GetObject", &full);
                match client.get_object().bucket(bucket).key(&full).send().await {
                    Ok(out) => {
                        let body = out.body.collect().await.map_err(|e| err(body_error(e)))?;
                        Ok(Some(body.into_bytes().to_vec()))
                    }
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
                    Err(e) => Err(err(CallError::of_sdk(&e))),
                }
            }
        }
    }

    /// Streams the object at `key` into the local file `dest` (created or truncated, then fsynced); returns its
    /// size and the ETag of the version read (S3; a local directory has none). Memory: one network buffer,
    /// whatever the object's size.
    pub async fn get_to_file(&self, key: &str, dest: &Path) -> Result<Fetched, StoreError> {
        let io = |source| StoreError::Io {
            path: dest.display().to_string(),
            source,
        };
        match self {
            Store::Local(root) => tokio::fs::copy(root.join(key), dest)
                .await
                .map(|bytes| Fetched { bytes, etag: None })
                .map_err(io),
            Store::S3 {
                client,
                bucket,
                prefix,
            } => {
                use tokio::io::AsyncWriteExt;
                let full = full_key(prefix, key);
                let err = s3_error("GetObject", &full);
                let mut out = client
                    .get_object()
                    .bucket(bucket)
                    .key(&full)
                    .send()
                    .await
                    .map_err(|e| err(CallError::of_sdk(&e)))?;
                let etag = out.e_tag().map(str::to_owned);
                let mut file = tokio::fs::File::create(dest).await.map_err(io)?;
                let mut n = 0u64;
                while let Some(chunk) = out.body.try_next().await.map_err(|e| err(body_error(e)))? {
                    n += chunk.len() as u64;
                    file.write_all(&chunk).await.map_err(io)?;
                }
                file.flush().await.map_err(io)?;
                Ok(Fetched { bytes: n, etag })
            }
        }
    }

    /// Writes the local file `src` at `key`, replacing any object there in one step (see the module doc).
    /// Memory: streamed from the file, whatever its size. S3: one `PutObject` up to [`UPLOAD_PART_BYTES`], a
    /// multipart upload in parts of that size beyond (each part one request, so within one attempt timeout
    /// whatever the file's size; the object appears whole at `CompleteMultipartUpload`, as S3 promises).
    ///
    /// The write is conditional on `expect` (S3; a local directory ignores it): [`StoreError::Changed`] if the
    /// object is not what it says, with nothing written. `may_write` is asked before each request that writes
    /// (the compactor's fencing by time, see [`crate::compaction::lease`]): `Ok(false)` once it says no, with
    /// nothing written at `key` and a multipart upload in progress aborted. `Ok(true)`: written.
    pub async fn put_file(
        &self,
        key: &str,
        src: &Path,
        expect: &Expect,
        may_write: &(dyn Fn() -> bool + Sync),
    ) -> Result<bool, StoreError> {
        match self {
            Store::Local(root) => {
                if !may_write() {
                    return Ok(false);
                }
                let target = root.join(key);
                let (t, s) = (target.clone(), src.to_path_buf());
                blocking(&target, move || {
                    replace_file(&t, |f| {
                        let mut from = std::fs::File::open(&s)?;
                        std::io::copy(&mut from, f).map(|_| ())
                    })
                })
                .await?;
                Ok(true)
            }
            Store::S3 {
                client,
                bucket,
                prefix,
            } => {
                let full = full_key(prefix, key);
                let size = tokio::fs::metadata(src)
                    .await
                    .map_err(|source| StoreError::Io {
                        path: src.display().to_string(),
                        source,
                    })?
                    .len();
                if size > UPLOAD_PART_BYTES {
                    return multipart_upload(client, bucket, &full, src, size, expect, may_write)
                        .await;
                }
                if !may_write() {
                    return Ok(false);
                }
                let body = aws_sdk_s3::primitives::ByteStream::from_path(src)
                    .await
                    .map_err(|e| s3_error("PutObject", &full)(body_error(e)))?;
                let (if_match, if_none_match) = conditions(expect);
                client
                    .put_object()
                    .bucket(bucket)
                    .key(&full)
                    .body(body)
                    .set_if_match(if_match)
                    .set_if_none_match(if_none_match)
                    .send()
                    .await
                    .map(|_| true)
                    .map_err(|e| s3_write_error("PutObject", &full, expect, &e))
            }
        }
    }

    /// Deletes the object at `key`; deleting what is not there succeeds. A local store also removes the
    /// directories the deletion left empty (up to the location).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Local(root) => {
                let path = root.join(key);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(StoreError::Io {
                            path: path.display().to_string(),
                            source,
                        })
                    }
                }
                let mut dir = path.parent().map(Path::to_path_buf);
                while let Some(d) = dir {
                    if d == *root
                        || !d.starts_with(root)
                        || tokio::fs::remove_dir(&d).await.is_err()
                    {
                        break;
                    }
                    dir = d.parent().map(Path::to_path_buf);
                }
                Ok(())
            }
            Store::S3 {
                client,
                bucket,
                prefix,
            } => {
                let full = full_key(prefix, key);
                client
                    .delete_object()
                    .bucket(bucket)
                    .key(&full)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| s3_error("DeleteObject", &full)(CallError::of_sdk(&e)))
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

    #[test]
    fn refused_conditions_are_changes_and_nothing_else_is() {
        let tag = Expect::ETag("\"abc\"".into());
        for expect in [&Expect::Absent, &tag] {
            assert!(is_changed(expect, Some("PreconditionFailed"), Some(412)));
            assert!(is_changed(expect, None, Some(412)));
            assert!(is_changed(
                expect,
                Some("ConditionalRequestConflict"),
                Some(409)
            ));
            assert!(!is_changed(expect, Some("AccessDenied"), Some(403)));
            assert!(!is_changed(expect, Some("SlowDown"), Some(503)));
            assert!(!is_changed(expect, None, None));
        }
        // If-Match on a key that is gone: S3 answers 404.
        assert!(is_changed(&tag, Some("NoSuchKey"), Some(404)));
        assert!(!is_changed(&Expect::Absent, Some("NoSuchKey"), Some(404)));
        assert!(!is_changed(
            &Expect::Any,
            Some("PreconditionFailed"),
            Some(412)
        ));
        assert_eq!(conditions(&Expect::Any), (None, None));
        assert_eq!(conditions(&Expect::Absent), (None, Some("*".into())));
        assert_eq!(conditions(&tag), (Some("\"abc\"".into()), None));
    }
}
