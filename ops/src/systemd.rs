//! The systemd service notification protocol (`sd_notify(3)`) without libsystemd: one datagram per message to the
//! socket named by `$NOTIFY_SOCKET` (a filesystem path, or `@name` for a Linux abstract socket).
//!
//! Started by systemd as `Type=notify` with `WatchdogSec=`, a service must send `READY=1` once it serves and then
//! `WATCHDOG=1` more often than every `$WATCHDOG_USEC` microseconds, or systemd kills and restarts it. Outside
//! systemd (no `$NOTIFY_SOCKET`) every call here does nothing. Sends never block: the socket is non-blocking and
//! a message the manager cannot take at once is dropped (the next watchdog message comes half an interval later).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where and how often to notify the service manager.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
}

/// Why `$NOTIFY_SOCKET` could not be used (logged; the service runs on without notifications).
#[derive(Debug, thiserror::Error)]
#[error("NOTIFY_SOCKET={socket:?}: {why}")]
pub struct NotifyError {
    socket: String,
    why: String,
}

impl Notifier {
    /// From the environment systemd sets: `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Result<Self, NotifyError> {
        let var = |k: &str| std::env::var(k).ok();
        Self::from_vars(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
    }

    /// From the given variable values, for process `pid`. The watchdog applies only when `WATCHDOG_USEC` is a
    /// positive number and `WATCHDOG_PID` is absent or `pid` (systemd sets it to the service's main process).
    pub fn from_vars(
        notify_socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        pid: u32,
    ) -> Result<Self, NotifyError> {
        let Some(name) = notify_socket.filter(|s| !s.is_empty()) else {
            return Ok(Self::default());
        };
        let err = |why: String| NotifyError {
            socket: name.to_string(),
            why,
        };
        let addr = socket_addr(name).map_err(|e| err(e.to_string()))?;
        let socket = UnixDatagram::unbound().map_err(|e| err(e.to_string()))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| err(e.to_string()))?;
        let ours = watchdog_pid.is_none_or(|p| p.trim().parse() == Ok(pid));
        let watchdog = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && ours)
            .map(Duration::from_micros);
        Ok(Self {
            target: Some(Target { socket, addr }),
            watchdog,
        })
    }

    /// The watchdog timeout systemd enforces, if any. Send [`Notifier::watchdog`] at least twice per timeout.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// The service is up (`READY=1`), with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// Still starting: asks systemd for `needed` more than its start timeout has left, if that is shorter
    /// (`EXTEND_TIMEOUT_USEC`), with a status line. Send it again before `needed` runs out.
    pub fn extend_start(&self, status: &str, needed: Duration) {
        self.send(&format!(
            "STATUS={}\nEXTEND_TIMEOUT_USEC={}",
            one_line(status),
            needed.as_micros()
        ));
    }

    /// Still alive (`WATCHDOG=1`).
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// Shutting down (`STOPPING=1`); asks systemd to allow `needed` more for the stop than its `TimeoutStopSec`
    /// if that is shorter (`EXTEND_TIMEOUT_USEC`).
    pub fn stopping(&self, status: &str, needed: Duration) {
        self.send(&format!(
            "STOPPING=1\nSTATUS={}\nEXTEND_TIMEOUT_USEC={}",
            one_line(status),
            needed.as_micros()
        ));
    }

    fn send(&self, msg: &str) {
        if let Some(t) = &self.target {
            if let Err(e) = t.socket.send_to_addr(msg.as_bytes(), &t.addr) {
                tracing::debug!(error = %e, "systemd notification not sent");
            }
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

fn socket_addr(name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    if let Some(abstract_name) = name.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            return std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes());
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = abstract_name;
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "abstract sockets exist on Linux only",
            ));
        }
    }
    std::os::unix::net::SocketAddr::from_pathname(name)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn recv(s: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn without_notify_socket_nothing_is_sent_and_there_is_no_watchdog() {
        let n = Notifier::from_vars(None, Some("1000000"), None, 1).unwrap();
        assert!(n.target.is_none());
        assert_eq!(n.watchdog_timeout(), None);
        n.ready("up");
        n.watchdog();
    }

    #[test]
    fn messages_reach_a_path_socket_and_the_watchdog_follows_watchdog_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let p = path.to_str().unwrap();
        let n = Notifier::from_vars(Some(p), Some("3000000"), Some("42"), 42).unwrap();
        assert_eq!(n.watchdog_timeout(), Some(Duration::from_secs(3)));
        n.ready("serving\nfine");
        assert_eq!(recv(&manager), "READY=1\nSTATUS=serving fine");
        n.watchdog();
        assert_eq!(recv(&manager), "WATCHDOG=1");
        n.stopping("draining", Duration::from_millis(35_000));
        assert_eq!(
            recv(&manager),
            "STOPPING=1\nSTATUS=draining\nEXTEND_TIMEOUT_USEC=35000000"
        );
        // The watchdog is for another process (a child systemd did not start us as), or malformed: none here.
        for (usec, pid) in [("3000000", Some("41")), ("0", None), ("soon", None)] {
            let n = Notifier::from_vars(Some(p), Some(usec), pid, 42).unwrap();
            assert_eq!(n.watchdog_timeout(), None, "{usec} {pid:?}");
            n.ready("still notified");
            assert_eq!(recv(&manager), "READY=1\nSTATUS=still notified");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_sockets_are_named_with_an_at_sign() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("fieldlink-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let manager = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::from_vars(Some(&format!("@{name}")), None, None, 1).unwrap();
        n.ready("hello");
        assert_eq!(recv(&manager), "READY=1\nSTATUS=hello");
    }

    #[test]
    fn a_manager_that_does_not_read_never_blocks_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let _manager = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_vars(path.to_str(), None, None, 1).unwrap();
        for _ in 0..10_000 {
            n.watchdog();
        }
    }
}
