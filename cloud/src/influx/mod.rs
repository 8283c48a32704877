//! InfluxDB sink: a batch's readings as line protocol ([`lines`], the schema and why a replay overwrites) over
//! HTTP(S), to the v2 write API (InfluxDB 2 and 3, Timestream for InfluxDB, VictoriaMetrics) or the v1 one
//! (InfluxDB 1.x). [`Sink::write`] returns when the server acknowledged every line, so the shard's checkpoint
//! never passes unwritten data (like Timestream).
//!
//! A batch's lines are cut into requests of at most `max_lines_per_request` lines and `max_bytes_per_request`
//! bytes (gzip-compressed if `gzip`), `max_requests_in_flight` at once per shard. What an answer means is
//! decided by [`answer`] (pure):
//! - 2xx: written; 3xx: permanent (the configured URL redirects);
//! - 429, 503 (and other 5xx, 408, timeouts, connection errors): sent again, after the server's `Retry-After`
//!   when it gives one (seconds, capped at 5 minutes), else after a capped, jittered backoff;
//! - 413: the request is split in halves, each sent on its own; a single line too large is dead-lettered;
//! - 400 or 422 naming line errors (`unable to parse '<line>': …`, `partial write: …`, InfluxDB 3's
//!   `line_number`s): the lines named are dead-lettered with the server's message and the rest is sent again
//!   (rewriting points the server already took is a no-op); when the server does not say which lines, the
//!   request is split in halves until the refused lines stand alone;
//! - other 4xx (401, 403, 404, a 400 about the request rather than its lines) and a server certificate the
//!   client refuses: permanent; `/health` fails for `influxdb` and the request is tried again every
//!   `sink_failing_retry_ms` ([`crate::land::retry`]).
//!
//! Dead letters go to `influxdb/<agent>-<epoch>-<seq>-<shard>-<sequence number>.jsonl` under the dead-letter
//! location, one JSON object per line with `reason` and the `line` (or `series` and `time_ms` for a reading the
//! builder refused).

mod config;
pub mod lines;

pub use config::{InfluxApi, InfluxConfig};

use crate::land::dead::DeadLetters;
use crate::land::retry::SinkMonitor;
use crate::land::{Origin, Sink, SinkError, SinkFuture};
use crate::metrics::CloudMetrics;
use bytes::Bytes;
use fieldlink_ops::aws_error::CallError;
use fieldlink_proto::Batch;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The sink's name in logs, metrics, `/health` and the dead-letter location.
pub const NAME: &str = "influxdb";

/// Bytes of an answer's body read at most (error messages; InfluxDB's are short).
const MAX_ANSWER: usize = 64 * 1024;

/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What an answer to a write request means. Pure; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Every line written.
    Written,
    /// Send the same request again (after `after` if the server said so).
    Again {
        /// Why.
        error: CallError,
        /// The server's `Retry-After`.
        after: Option<Duration>,
    },
    /// Too large: split it.
    TooLarge(String),
    /// Some lines were refused: `lines` are their indices in the request (empty: the server did not say).
    LineErrors {
        /// The server's message.
        message: String,
        /// Refused lines, indices in the request.
        lines: Vec<usize>,
    },
    /// Refused for a reason an operator must fix.
    Permanent(CallError),
}

/// Whether a 400/422 body speaks of lines rather than of the request.
fn mentions_lines(body: &str) -> bool {
    let b = body.to_ascii_lowercase();
    [
        "unable to parse",
        "partial write",
        "field type conflict",
        "line_number",
        "invalid field",
        "invalid tag",
        "invalid measurement",
        "points beyond retention",
        "out of range",
    ]
    .iter()
    .any(|k| b.contains(k))
}

/// The lines of `sent` a 400/422 `body` names: `unable to parse '<line>'` (InfluxDB 1.x, 2.x) or
/// `"line_number": n` (1-based, InfluxDB 3).
/// A JSON body's `error` text is matched decoded.
pub fn named_lines(body: &str, sent: &[&str]) -> Vec<usize> {
    let mut out = Vec::new();
    let json = serde_json::from_str::<serde_json::Value>(body).ok();
    let text = json.as_ref().and_then(json_message).unwrap_or(body);
    let mut rest = text;
    while let Some(at) = rest.find("unable to parse '") {
        rest = &rest[at + "unable to parse '".len()..];
        // The line ends at the last `': ` before the next `unable to parse` (a line may contain `': `).
        let end_of_item = rest.find("unable to parse '").unwrap_or(rest.len());
        if let Some(end) = rest[..end_of_item].rfind("': ") {
            let line = &rest[..end];
            if let Some(i) = sent.iter().position(|l| *l == line) {
                out.push(i);
            }
        }
    }
    if let Some(v) = &json {
        if let Some(items) = v.get("data").and_then(|d| d.as_array()) {
            for it in items {
                let n = it.get("line_number").and_then(|n| n.as_u64()).unwrap_or(0) as usize;
                if (1..=sent.len()).contains(&n) {
                    out.push(n - 1);
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// A request that got no answer, from the innermost cause: a TLS certificate the client refuses (unknown issuer,
/// wrong name, expired) needs an operator (permanent: `/health` fails); anything else (refused, reset, DNS) is
/// transient.
pub fn transport_error(cause: &str) -> CallError {
    let c = cause.to_ascii_lowercase();
    if c.contains("certificate") || c.contains("invalid peer") {
        CallError {
            class: fieldlink_ops::aws_error::ErrorClass::Permanent,
            kind: "TLS error".into(),
            ..CallError::of_transport(false, cause)
        }
    } else {
        CallError::of_transport(false, cause)
    }
}

/// The server's `Retry-After` (delay in seconds; an HTTP date is ignored), capped.
pub fn retry_after(value: Option<&str>) -> Option<Duration> {
    let secs: f64 = value?.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs).min(MAX_RETRY_AFTER))
}

/// What an answer with `status` means for the request of `sent` lines.
pub fn answer(status: u16, retry_after_header: Option<&str>, body: &str, sent: &[&str]) -> Answer {
    match status {
        200..=299 => Answer::Written,
        // A redirect (http:// to https://, a moved endpoint): the URL in the config needs fixing.
        300..=399 => Answer::Permanent(CallError {
            class: fieldlink_ops::aws_error::ErrorClass::Permanent,
            ..CallError::of_http(status, "redirected: set influxdb.url to the final address")
        }),
        413 => Answer::TooLarge(first_line(body)),
        400 | 422 if mentions_lines(body) => Answer::LineErrors {
            message: first_line(&error_text(body)),
            lines: named_lines(body, sent),
        },
        _ => {
            let error = CallError::of_http(status, &error_text(body));
            match error.class {
                fieldlink_ops::aws_error::ErrorClass::Transient => Answer::Again {
                    error,
                    after: retry_after(retry_after_header),
                },
                fieldlink_ops::aws_error::ErrorClass::Permanent => Answer::Permanent(error),
            }
        }
    }
}

/// The message of a JSON error body: `error` (InfluxDB 1.x and 3) or `message` (InfluxDB 2).
fn json_message(v: &serde_json::Value) -> Option<&str> {
    v.get("error")
        .or_else(|| v.get("message"))
        .and_then(|e| e.as_str())
}

/// A JSON body's message, else the body.
fn error_text(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| json_message(&v).map(str::to_owned))
        .unwrap_or_else(|| body.to_owned())
}

fn first_line(body: &str) -> String {
    let l = body.lines().next().unwrap_or("").trim();
    match l.char_indices().nth(1000) {
        Some((at, _)) => l[..at].to_owned(),
        None => l.to_owned(),
    }
}

fn encode_query(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// The write URL of `cfg`.
pub fn write_url(cfg: &InfluxConfig) -> String {
    let base = cfg.url.trim_end_matches('/');
    let q = |v: &Option<String>| encode_query(v.as_deref().unwrap_or(""));
    match cfg.api {
        InfluxApi::V2 => format!(
            "{base}/api/v2/write?org={}&bucket={}&precision=ms",
            q(&cfg.org),
            q(&cfg.bucket)
        ),
        InfluxApi::V1 => {
            let mut u = format!("{base}/write?db={}&precision=ms", q(&cfg.database));
            if cfg.retention_policy.is_some() {
                u.push_str(&format!("&rp={}", q(&cfg.retention_policy)));
            }
            u
        }
    }
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("influxdb: environment variable {name} is not set"))
}

/// The `Authorization` header of `cfg`, read from the environment.
fn authorization(cfg: &InfluxConfig) -> Result<Option<String>, String> {
    use base64::Engine as _;
    if let Some(t) = &cfg.token_env {
        return Ok(Some(format!("Token {}", env(t)?)));
    }
    if let (Some(u), Some(p)) = (&cfg.username_env, &cfg.password_env) {
        let pair = format!("{}:{}", env(u)?, env(p)?);
        return Ok(Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )));
    }
    Ok(None)
}

/// The connection to the server, shared by every shard worker of the process (clones share the pool).
#[derive(Clone)]
pub struct InfluxClient {
    http: HttpClient,
    url: http::Uri,
    auth: Option<http::HeaderValue>,
    gzip: bool,
    timeout: Duration,
}

impl std::fmt::Debug for InfluxClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InfluxClient")
            .field("url", &self.url)
            .finish()
    }
}

/// One answer as received: status (or the transport failure), `Retry-After`, body.
#[derive(Debug)]
enum Reply {
    Answered(u16, Option<String>, String),
    Failed(CallError),
}

impl InfluxClient {
    /// A client for `cfg` (credentials read from the environment now): HTTPS through rustls with the ring
    /// provider and the system's roots, the TLS stack the AWS SDK already uses.
    pub fn new(cfg: &InfluxConfig) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
        if roots.is_empty() && cfg.url.starts_with("https://") {
            return Err("influxdb: no CA certificates found in the system's store".into());
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("influxdb: TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_millis(cfg.timeout_ms)));
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        let auth = authorization(cfg)?
            .map(|a| {
                http::HeaderValue::from_str(&a)
                    .map_err(|_| "influxdb: credentials are not a valid header".to_owned())
            })
            .transpose()?
            .map(|mut h| {
                h.set_sensitive(true);
                h
            });
        Ok(Self {
            http: client,
            url: write_url(cfg)
                .parse()
                .map_err(|e| format!("influxdb.url: {e}"))?,
            auth,
            gzip: cfg.gzip,
            timeout: Duration::from_millis(cfg.timeout_ms),
        })
    }

    fn body(&self, lines: &[&str]) -> Bytes {
        let mut text = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for l in lines {
            text.extend_from_slice(l.as_bytes());
            text.push(b'\n');
        }
        if !self.gzip {
            return text.into();
        }
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(
            Vec::with_capacity(text.len() / 4),
            flate2::Compression::fast(),
        );
        // Writing to a Vec cannot fail.
        let _ = gz.write_all(&text);
        gz.finish().unwrap_or_default().into()
    }

    async fn post(&self, lines: &[&str]) -> Reply {
        let mut req = http::Request::post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8");
        if self.gzip {
            req = req.header(http::header::CONTENT_ENCODING, "gzip");
        }
        if let Some(a) = &self.auth {
            req = req.header(http::header::AUTHORIZATION, a.clone());
        }
        let req = match req.body(Full::new(self.body(lines))) {
            Ok(r) => r,
            Err(e) => return Reply::Failed(CallError::of_http(400, &e.to_string())),
        };
        let call = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| transport_error(&fieldlink_ops::aws_error::brief(&e)))?;
            let status = resp.status().as_u16();
            let after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = match Limited::new(resp.into_body(), MAX_ANSWER).collect().await {
                Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                Err(e) => format!("(answer unreadable: {e})"),
            };
            Ok::<_, CallError>(Reply::Answered(status, after, body))
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Reply::Failed(e),
            Err(_) => Reply::Failed(CallError::of_transport(
                true,
                &format!("no answer within {} ms", self.timeout.as_millis()),
            )),
        }
    }
}

/// What the requests of a batch ended with.
#[derive(Debug, Default)]
struct Delivered {
    written: usize,
    dead: Vec<(usize, String)>,
}

/// The request-level state shared by the tasks of one batch.
#[derive(Debug)]
struct Writer {
    client: InfluxClient,
    metrics: CloudMetrics,
    monitor: SinkMonitor,
    cancel: CancellationToken,
}

impl Writer {
    /// Delivers the lines `first` (indices into `lines`): every line ends written or dead-lettered, or the
    /// worker stopped (`None`).
    async fn deliver(&self, lines: &[String], first: Vec<usize>) -> Option<Delivered> {
        let mut jobs = vec![first];
        let mut out = Delivered::default();
        while let Some(job) = jobs.pop() {
            let mut retry = self.monitor.retry(
                &self.cancel,
                Duration::from_millis(100),
                Duration::from_secs(20),
            );
            let sent: Vec<&str> = job.iter().map(|&i| lines[i].as_str()).collect();
            loop {
                let reply = self.client.post(&sent).await;
                let (label, ans) = match reply {
                    Reply::Answered(status, after, body) => (
                        status.to_string(),
                        answer(status, after.as_deref(), &body, &sent),
                    ),
                    Reply::Failed(e) => (
                        if e.kind == "timeout" {
                            "timeout".to_owned()
                        } else {
                            "connection".to_owned()
                        },
                        Answer::Again {
                            error: e,
                            after: None,
                        },
                    ),
                };
                self.metrics.influx_requests(&label).inc();
                let halves = |job: &[usize]| {
                    let (a, b) = job.split_at(job.len() / 2);
                    [a.to_vec(), b.to_vec()]
                };
                match ans {
                    Answer::Written => {
                        out.written += job.len();
                        break;
                    }
                    Answer::Again { error, after } => {
                        self.metrics.influx_retries(&label).inc();
                        retry.failed_after("write", &error, after).await.ok()?;
                    }
                    Answer::Permanent(error) => {
                        self.metrics.influx_retries(&label).inc();
                        retry.failed("write", &error).await.ok()?;
                    }
                    Answer::TooLarge(msg) => {
                        if job.len() == 1 {
                            out.dead.push((
                                job[0],
                                format!("HTTP 413: line too large for the server: {msg}"),
                            ));
                        } else {
                            self.metrics.influx_retries(&label).inc();
                            jobs.extend(halves(&job));
                        }
                        break;
                    }
                    Answer::LineErrors {
                        message,
                        lines: named,
                    } => {
                        let reason = format!("HTTP {label}: {message}");
                        if !named.is_empty() {
                            out.dead
                                .extend(named.iter().map(|&i| (job[i], reason.clone())));
                            let rest: Vec<usize> = job
                                .iter()
                                .enumerate()
                                .filter(|(i, _)| named.binary_search(i).is_err())
                                .map(|(_, &l)| l)
                                .collect();
                            if !rest.is_empty() {
                                self.metrics.influx_retries(&label).inc();
                                jobs.push(rest);
                            }
                        } else if job.len() == 1 {
                            out.dead.push((job[0], reason));
                        } else {
                            self.metrics.influx_retries(&label).inc();
                            jobs.extend(halves(&job));
                        }
                        break;
                    }
                }
            }
            retry.succeeded();
        }
        Some(out)
    }
}

/// The sink (one per shard worker).
#[derive(Debug)]
pub struct InfluxSink {
    cfg: InfluxConfig,
    writer: Arc<Writer>,
    dead: DeadLetters,
}

impl InfluxSink {
    /// A sink writing through `client`; failed requests are retried until they succeed or `cancel` fires,
    /// failures reported through `monitor`.
    pub fn new(
        client: InfluxClient,
        cfg: InfluxConfig,
        dead: DeadLetters,
        metrics: CloudMetrics,
        monitor: SinkMonitor,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            cfg,
            writer: Arc::new(Writer {
                client,
                metrics,
                monitor,
                cancel,
            }),
            dead,
        }
    }

    async fn write_batch(&mut self, batch: &Batch, origin: &Origin) -> Result<(), SinkError> {
        let built = lines::build(batch, &self.cfg.measurement);
        let mut dead: Vec<serde_json::Value> = built
            .refused
            .iter()
            .map(|r| serde_json::json!({"reason": r.reason, "series": r.series, "time_ms": r.time_ms}))
            .collect();
        let all = Arc::new(built.lines);
        let chunks = lines::chunks(
            &all,
            self.cfg.max_lines_per_request,
            self.cfg.max_bytes_per_request,
        );
        let mut next = chunks.into_iter();
        let mut running = tokio::task::JoinSet::new();
        let mut dead_lines = Vec::new();
        loop {
            while running.len() < self.cfg.max_requests_in_flight {
                let Some(range) = next.next() else { break };
                let (w, all) = (self.writer.clone(), all.clone());
                running.spawn(async move { w.deliver(&all, range.collect()).await });
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            let delivered = done
                .map_err(|e| SinkError {
                    sink: NAME,
                    message: e.to_string(),
                })?
                .ok_or_else(|| SinkError {
                    sink: NAME,
                    message: "stopped while retrying a write".into(),
                })?;
            self.writer
                .metrics
                .influx_points
                .add(delivered.written as u64);
            dead_lines.extend(delivered.dead);
        }
        if !dead_lines.is_empty() {
            self.writer
                .metrics
                .influx_dead_lines
                .add(dead_lines.len() as u64);
            dead_lines.sort_unstable();
            dead.extend(
                dead_lines
                    .into_iter()
                    .map(|(i, why)| serde_json::json!({"reason": why, "line": all[i]})),
            );
        }
        self.dead
            .readings(NAME, origin, &batch.agent_id, batch.epoch, batch.seq, dead)
            .await
    }
}

impl Sink for InfluxSink {
    fn name(&self) -> &'static str {
        NAME
    }
    fn write<'a>(&'a mut self, batch: &'a Batch, origin: &'a Origin) -> SinkFuture<'a> {
        Box::pin(self.write_batch(batch, origin))
    }
    fn commit<'a>(&'a mut self, _first: &'a Origin) -> SinkFuture<'a> {
        // Every write is acknowledged by the server when it returns.
        Box::pin(async { Ok(()) })
    }
    fn discard(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_mean_what_the_module_doc_says() {
        let sent = ["m a=1 1", "m a=\"x': y\" 2", "m a=3 3"];
        assert_eq!(answer(204, None, "", &sent), Answer::Written);
        let Answer::Again { error, after } = answer(429, Some("2"), "slow down", &sent) else {
            panic!()
        };
        assert_eq!(
            (error.kind.as_str(), after),
            ("HTTP 429", Some(Duration::from_secs(2)))
        );
        assert!(matches!(
            answer(503, Some("Wed, 21 Oct 2015 07:28:00 GMT"), "", &sent),
            Answer::Again { after: None, .. }
        ));
        assert!(matches!(answer(500, None, "", &sent), Answer::Again { .. }));
        assert!(matches!(
            answer(413, None, "too big", &sent),
            Answer::TooLarge(_)
        ));
        assert!(matches!(
            answer(401, None, "unauthorized", &sent),
            Answer::Permanent(_)
        ));
        assert!(matches!(
            answer(404, None, "bucket not found", &sent),
            Answer::Permanent(_)
        ));
        assert!(
            matches!(
                answer(400, None, "{\"error\":\"invalid precision\"}", &sent),
                Answer::Permanent(_)
            ),
            "a 400 about the request is not a line error"
        );
        assert_eq!(
            answer(400, None, "{\"error\":\"unable to parse 'm a=\\\"x': y\\\" 2': bad\\nunable to parse 'm a=3 3': worse\"}", &sent),
            Answer::LineErrors {
                message: "unable to parse 'm a=\"x': y\" 2': bad".into(),
                lines: vec![1, 2],
            },
            "a JSON error is matched decoded"
        );
        let Answer::LineErrors { lines, .. } = answer(
            400,
            None,
            "unable to parse 'm a=\"x': y\" 2': bad\nunable to parse 'm a=1 1': x",
            &sent,
        ) else {
            panic!()
        };
        assert_eq!(lines, vec![0, 1]);
        let v3 = r#"{"error":"partial write of line protocol occurred","data":[{"original_line":"m a=3 3","line_number":3,"error_message":"bad"}]}"#;
        assert!(
            matches!(answer(400, None, v3, &sent), Answer::LineErrors { lines, .. } if lines == vec![2])
        );
        assert!(
            matches!(answer(307, None, "", &sent), Answer::Permanent(e) if e.kind == "HTTP 307"),
            "a redirect is a configuration error, not retried quickly"
        );
        let v2 =
            r#"{"code":"invalid","message":"unable to parse 'm a=\"x': y\" 2': missing fields"}"#;
        assert!(
            matches!(answer(400, None, v2, &sent), Answer::LineErrors { message, lines } if lines == vec![1] && message.starts_with("unable to parse")),
            "InfluxDB 2 puts its message under `message`"
        );
        let conflict = "{\"error\":\"partial write: field type conflict: input field \\\"a\\\" on measurement \\\"m\\\" is type integer, already exists as type float dropped=1\"}";
        assert!(
            matches!(answer(422, None, conflict, &sent), Answer::LineErrors { lines, .. } if lines.is_empty())
        );
    }

    #[test]
    fn a_refused_certificate_is_permanent_a_refused_connection_transient() {
        let tls = transport_error("invalid peer certificate: UnknownIssuer");
        assert_eq!(
            (tls.class, tls.kind.as_str()),
            (fieldlink_ops::aws_error::ErrorClass::Permanent, "TLS error")
        );
        let refused = transport_error("Connection refused (os error 111)");
        assert_eq!(
            refused.class,
            fieldlink_ops::aws_error::ErrorClass::Transient
        );
    }

    #[test]
    fn retry_after_is_seconds_capped() {
        assert_eq!(retry_after(Some(" 3 ")), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(Some("0.5")), Some(Duration::from_millis(500)));
        assert_eq!(retry_after(Some("86400")), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(Some("-1")), None);
        assert_eq!(retry_after(None), None);
    }

    #[test]
    fn write_urls_are_escaped() {
        let mut c: InfluxConfig =
            toml::from_str("url = \"https://h:8086/\"\norg = \"my org\"\nbucket = \"b/1&x\"")
                .expect("toml");
        assert_eq!(
            write_url(&c),
            "https://h:8086/api/v2/write?org=my%20org&bucket=b%2F1%26x&precision=ms"
        );
        c.api = InfluxApi::V1;
        c.database = Some("db".into());
        c.retention_policy = Some("rp".into());
        assert_eq!(
            write_url(&c),
            "https://h:8086/write?db=db&precision=ms&rp=rp"
        );
    }
}
