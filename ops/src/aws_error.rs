//! What a failed AWS call means: [`ErrorClass::Transient`] (throttling, 5xx, timeouts, connection errors: retry
//! after a backoff, it goes away by itself) or [`ErrorClass::Permanent`] (access denied, a deleted table or
//! bucket, a request the service refuses as invalid: it stays until an operator acts). [`CallError`] reduces an
//! SDK error to its class and one short sentence for `/health` and logs; the SDK's own `Debug` and
//! `DisplayErrorContext` output is a page of nested structures.
//!
//! The decision ([`classify`]) is pure: the service's error code first, then the HTTP status (429, 408 and 5xx
//! transient, other 4xx permanent); an error with neither is transient.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use std::fmt;

/// How a caller should react to a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Retry after a capped, jittered backoff; it clears by itself.
    Transient,
    /// Needs an operator (permissions, a missing resource, an invalid request): report it, retry slowly.
    Permanent,
}

impl ErrorClass {
    /// `transient` or `permanent` (metric labels, log fields).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// Error codes that clear by themselves, whatever their HTTP status.
const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "LimitExceededException",
    "KMSThrottlingException",
    "SlowDown",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "TransactionInProgressException",
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "InternalServerException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    // Timestream: the discovered endpoint moved; the client discovers it again.
    "InvalidEndpointException",
    // Role and instance credentials expire and are refreshed by the provider before the next call.
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",
    // S3: a conflicting operation on the bucket is under way.
    "OperationAborted",
];

/// Error codes that need an operator, for answers without a 4xx status.
const PERMANENT_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidSignatureException",
    "ResourceNotFoundException",
    "NoSuchBucket",
    "PermanentRedirect",
    "ValidationException",
    "InvalidBucketName",
];

/// The class of a service's answer with error `code` and HTTP `status`. Pure.
pub fn classify(code: Option<&str>, status: Option<u16>) -> ErrorClass {
    if code.is_some_and(|c| TRANSIENT_CODES.contains(&c)) {
        return ErrorClass::Transient;
    }
    if code.is_some_and(|c| PERMANENT_CODES.contains(&c)) {
        return ErrorClass::Permanent;
    }
    match status {
        Some(408 | 409 | 429) => ErrorClass::Transient,
        Some(s) if (400..500).contains(&s) => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// A failed call, reduced to its class and a short description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// What the caller should do.
    pub class: ErrorClass,
    /// The error's name: the service's code (`AccessDeniedException`), `HTTP 503`, `timeout`,
    /// `connection error`, `invalid request`.
    pub kind: String,
    /// The service's message or the innermost cause, first line, at most [`MAX_MESSAGE`] characters; may be
    /// empty.
    pub message: String,
}

/// Characters of a message kept in a [`CallError`].
pub const MAX_MESSAGE: usize = 120;

fn short(text: &str) -> String {
    let line = text
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .trim_end_matches('.');
    match line.char_indices().nth(MAX_MESSAGE) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_owned(),
    }
}

/// The innermost cause of `e`, first line, at most [`MAX_MESSAGE`] characters: for an error that is not a call's
/// (the SDK's own setup, e.g. Timestream's endpoint discovery), in one short sentence.
pub fn brief(e: &(dyn std::error::Error + 'static)) -> String {
    short(&root_cause(e))
}

/// The innermost cause of `e` (the SDK wraps the interesting part several levels deep).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

impl CallError {
    /// A failed call of an AWS SDK client.
    pub fn of_sdk<E>(e: &SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let status = e.raw_response().map(|r| r.status().as_u16());
        match e {
            SdkError::ServiceError(s) => {
                let err = s.err();
                let code = err.code();
                Self {
                    class: classify(code, status),
                    kind: code
                        .map_or_else(|| format!("HTTP {}", status.unwrap_or(0)), str::to_owned),
                    message: short(err.message().unwrap_or("")),
                }
            }
            SdkError::TimeoutError(_) => Self {
                class: ErrorClass::Transient,
                kind: "timeout".into(),
                message: String::new(),
            },
            SdkError::DispatchFailure(d) => {
                let (class, kind) = if d.is_timeout() {
                    (ErrorClass::Transient, "timeout")
                } else if d.is_user() {
                    (ErrorClass::Permanent, "invalid request")
                } else {
                    // I/O and unclassified failures: a refused, reset or closed connection.
                    (ErrorClass::Transient, "connection error")
                };
                Self {
                    class,
                    kind: kind.into(),
                    message: short(&root_cause(e)),
                }
            }
            // A garbled answer comes from a broken connection or proxy, whatever its status: retried soon.
            SdkError::ResponseError(_) => Self {
                class: ErrorClass::Transient,
                kind: format!("unreadable response (HTTP {})", status.unwrap_or(0)),
                message: short(&root_cause(e)),
            },
            SdkError::ConstructionFailure(_) => Self {
                class: ErrorClass::Permanent,
                kind: "invalid request".into(),
                message: short(&root_cause(e)),
            },
            _ => Self {
                class: ErrorClass::Transient,
                kind: "error".into(),
                message: short(&root_cause(e)),
            },
        }
    }

    /// A non-2xx answer of a plain HTTP service (no AWS error code): classified by its status, the first line
    /// of `body` as the message.
    pub fn of_http(status: u16, body: &str) -> Self {
        Self {
            class: classify(None, Some(status)),
            kind: format!("HTTP {status}"),
            message: short(body),
        }
    }

    /// A plain HTTP call that got no answer: a timeout or a connection error (transient).
    pub fn of_transport(timeout: bool, message: &str) -> Self {
        Self {
            class: ErrorClass::Transient,
            kind: if timeout {
                "timeout"
            } else {
                "connection error"
            }
            .into(),
            message: short(message),
        }
    }

    /// A failed local file operation: permissions, a read-only or full file system need an operator.
    pub fn of_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        let class = match e.kind() {
            PermissionDenied | ReadOnlyFilesystem | StorageFull | QuotaExceeded | NotADirectory => {
                ErrorClass::Permanent
            }
            _ => ErrorClass::Transient,
        };
        Self {
            class,
            kind: format!("{:?}", e.kind()),
            message: short(&e.to_string()),
        }
    }

    /// One short sentence: `AccessDeniedException on WriteRecords (permanent): <message>`.
    pub fn sentence(&self, operation: &str) -> String {
        let mut s = format!("{} on {operation} ({})", self.kind, self.class.as_str());
        if !self.message.is_empty() {
            s.push_str(": ");
            s.push_str(&self.message);
        }
        s
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind, self.class.as_str())?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for CallError {}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_runtime_api::client::result::ConnectorError;
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    fn service(code: &str, status: u16, message: &str) -> SdkError<ErrorMetadata, HttpResponse> {
        SdkError::service_error(
            ErrorMetadata::builder().code(code).message(message).build(),
            HttpResponse::new(status.try_into().unwrap(), SdkBody::empty()),
        )
    }

    #[test]
    fn service_errors_are_classified_by_code_then_status() {
        use ErrorClass::*;
        let cases = [
            ("AccessDeniedException", 403, Permanent),
            ("AccessDenied", 403, Permanent),
            ("ResourceNotFoundException", 400, Permanent),
            ("NoSuchBucket", 404, Permanent),
            ("ValidationException", 400, Permanent),
            ("UnrecognizedClientException", 400, Permanent),
            ("ThrottlingException", 400, Transient),
            ("ProvisionedThroughputExceededException", 400, Transient),
            ("SlowDown", 503, Transient),
            ("InternalServerException", 500, Transient),
            ("ServiceUnavailable", 503, Transient),
            ("RequestTimeout", 400, Transient),
            ("SomethingNew", 502, Transient),
            ("SomethingNew", 429, Transient),
            ("SomethingNew", 409, Transient),
            ("SomethingNew", 404, Permanent),
            ("ExpiredTokenException", 400, Transient),
            ("OperationAborted", 409, Transient),
        ];
        for (code, status, class) in cases {
            let e = CallError::of_sdk(&service(code, status, "why"));
            assert_eq!(e.class, class, "{code} {status}");
            assert_eq!(e.kind, code);
        }
        assert_eq!(classify(Some("AccessDenied"), None), Permanent);
        assert_eq!(classify(None, None), Transient);
    }

    #[test]
    fn transport_failures_are_transient_and_unbuildable_requests_permanent() {
        let io: SdkError<ErrorMetadata, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::io(Box::new(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "Connection refused (os error 111)",
            ))));
        let e = CallError::of_sdk(&io);
        assert_eq!(
            (e.class, e.kind.as_str(), e.message.as_str()),
            (
                ErrorClass::Transient,
                "connection error",
                "Connection refused (os error 111)"
            )
        );
        let t: SdkError<ErrorMetadata, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::timeout("slow".into()));
        assert_eq!(CallError::of_sdk(&t).class, ErrorClass::Transient);
        let t: SdkError<ErrorMetadata, HttpResponse> = SdkError::timeout_error("attempt timeout");
        assert_eq!(CallError::of_sdk(&t).kind, "timeout");
        let c: SdkError<ErrorMetadata, HttpResponse> = SdkError::construction_failure("no region");
        assert_eq!(CallError::of_sdk(&c).class, ErrorClass::Permanent);
        let r: SdkError<ErrorMetadata, HttpResponse> = SdkError::response_error(
            "truncated body",
            HttpResponse::new(403u16.try_into().unwrap(), SdkBody::empty()),
        );
        assert_eq!(CallError::of_sdk(&r).class, ErrorClass::Transient);
    }

    #[test]
    fn the_sentence_is_one_short_line() {
        let long = format!("first line {}\nsecond line", "x".repeat(500));
        let e = CallError::of_sdk(&service("AccessDeniedException", 403, &long));
        let s = e.sentence("WriteRecords");
        assert!(
            s.starts_with("AccessDeniedException on WriteRecords (permanent): first line xxx"),
            "{s}"
        );
        assert!(!s.contains('\n') && s.chars().count() < 200, "{s}");
        let e = CallError::of_io(&std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(e.class, ErrorClass::Permanent);
        assert!(e
            .sentence("write")
            .starts_with("PermissionDenied on write (permanent)"));
    }
}
