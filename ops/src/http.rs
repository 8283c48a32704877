//! `GET /metrics` and `GET /health` over HTTP/1.1 (one request per connection, `Connection: close`).

use crate::metrics::{Health, Registry};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const MAX_REQUEST_BYTES: usize = 8 * 1024;
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// A process's metrics registry and health board, served on one address.
#[derive(Debug, Clone)]
pub struct Telemetry {
    /// The metrics.
    pub registry: Registry,
    /// The health board.
    pub health: Health,
    /// Where they are served.
    pub addr: SocketAddr,
}

/// The telemetry endpoint could not bind.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics and health on {addr}: {source}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// The cause.
    pub source: std::io::Error,
}

impl Telemetry {
    /// New registry and health board, served on `addr` until `cancel` fires.
    pub async fn start(addr: SocketAddr, cancel: CancellationToken) -> Result<Self, BindError> {
        let (registry, health) = (Registry::new(), Health::new());
        let bound = serve(addr, registry.clone(), health.clone(), cancel)
            .await
            .map_err(|source| BindError { addr, source })?;
        tracing::info!(addr = %bound, "metrics and health endpoint listening");
        Ok(Self {
            registry,
            health,
            addr: bound,
        })
    }
}

/// Binds `addr` and serves until `cancel` fires. Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    health: Health,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let (registry, health) = (registry.clone(), health.clone());
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(CONNECTION_TIMEOUT, handle(stream, &registry, &health)).await;
                    });
                }
            }
        }
    });
    Ok(local)
}

async fn handle(
    mut stream: TcpStream,
    registry: &Registry,
    health: &Health,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST_BYTES {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", registry.render()),
        ("GET", "/health") => {
            let (ok, body) = health.report();
            (
                if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                },
                "text/plain",
                body,
            )
        }
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap_or_default();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap_or_default();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let reg = Registry::new();
        reg.counter("x_total", "X.", &[]).add(2);
        let health = Health::new();
        health.set("a", true, "");
        let cancel = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
            reg,
            health.clone(),
            cancel.clone(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(get(addr, "/metrics").await.contains("x_total 2"));
        assert!(get(addr, "/health").await.starts_with("HTTP/1.1 200"));
        health.set("b", false, "down");
        assert!(get(addr, "/health").await.starts_with("HTTP/1.1 503"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        cancel.cancel();
    }
}
