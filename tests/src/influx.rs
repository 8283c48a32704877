//! Harness for the InfluxDB sink: real InfluxDB 1.x and VictoriaMetrics servers (Debian's `influxdb` and
//! `victoria-metrics`, installed by deploy/setup.sh) on free loopback ports with their data in a temp dir, the
//! InfluxDB fault proxy, a cloud service configured for the sink, and read-back through the servers' query
//! APIs as `(series, time, value bits)` multisets.

use crate::{aws_env, bin, cloud_toml, free_port, http_get, wait_for, Key, Proc};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn installed(name: &str) -> PathBuf {
    for d in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(d).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not installed: run deploy/setup.sh");
}

/// POST with a form body to `http://127.0.0.1:port/path`; the status and body.
fn post_form(port: u16, path: &str, form: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    )
    .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    // Chunked answers: keep the JSON between the chunk sizes.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut text = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            text.push_str(tail.get(..n)?);
            rest = tail.get(n + 2..)?;
        }
        text
    } else {
        body.to_owned()
    };
    Some((status, body))
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// An InfluxDB 1.x server (`influxd`) with its data under a temp dir.
pub struct InfluxD {
    pub port: u16,
    pub proc: Proc,
}

impl InfluxD {
    /// Starts `influxd` and creates `database`.
    pub fn start(dir: &Path, database: &str) -> Self {
        Self::start_on(dir, database, free_port())
    }

    /// [`InfluxD::start`] with its HTTP API on `port`.
    pub fn start_on(dir: &Path, database: &str, port: u16) -> Self {
        let rpc = free_port();
        let data = dir.join("influxdb");
        let conf = dir.join("influxdb.toml");
        std::fs::write(
            &conf,
            format!(
                r#"reporting-disabled = true
bind-address = "127.0.0.1:{rpc}"
[meta]
  dir = "{d}/meta"
[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
  max-row-limit = 0
[ifql]
  enabled = false
[logging]
  level = "warn"
"#,
                d = data.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(installed("influxd"));
        cmd.arg("run").arg("-config").arg(&conf);
        let proc = Proc::spawn("influxd", cmd, &dir.join("influxd.log"));
        wait_for("influxd to answer /ping", Duration::from_secs(30), || {
            crate::http_status(port, "/ping").filter(|(s, _)| *s == 204)
        });
        let me = Self { port, proc };
        me.query(&format!("CREATE DATABASE \"{database}\""), "");
        me
    }

    /// Runs an InfluxQL statement (in `db` if not empty); the JSON answer.
    pub fn query(&self, q: &str, db: &str) -> serde_json::Value {
        let form = format!("q={}&db={}&epoch=ms", form_encode(q), form_encode(db));
        let (status, body) = post_form(self.port, "/query", &form).expect("influxd answers");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    /// Every field value of `measurement` in `db` as `(<device>/<field>, time, value bits)`; `_quality`
    /// fields and the tags `agent` and `device` are left out.
    pub fn readings(&self, db: &str, measurement: &str) -> Vec<Key> {
        let v = self.query(&format!("SELECT * FROM \"{measurement}\""), db);
        let mut out = Vec::new();
        for s in v["results"][0]["series"].as_array().into_iter().flatten() {
            let cols: Vec<&str> = s["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap())
                .collect();
            let at = |n: &str| cols.iter().position(|c| *c == n).unwrap();
            let (t, dev) = (at("time"), at("device"));
            for row in s["values"].as_array().unwrap() {
                let row = row.as_array().unwrap();
                for (i, c) in cols.iter().enumerate() {
                    if matches!(*c, "time" | "agent" | "device") || c.ends_with("_quality") {
                        continue;
                    }
                    if let Some(x) = row[i].as_f64() {
                        out.push((
                            format!("{}/{c}", row[dev].as_str().unwrap()),
                            row[t].as_i64().unwrap(),
                            x.to_bits(),
                        ));
                    }
                }
            }
        }
        out
    }
}

/// A VictoriaMetrics single-node server with its data under a temp dir. Deduplication at 1 ms
/// (`-dedup.minScrapeInterval=1ms`) makes a rewritten sample replace the first instead of adding one: without
/// it VictoriaMetrics keeps every copy of a replayed point.
pub struct VictoriaMetrics {
    pub port: u16,
    pub proc: Proc,
}

impl VictoriaMetrics {
    pub fn start(dir: &Path) -> Self {
        let port = free_port();
        let mut cmd = Command::new(installed("victoria-metrics"));
        cmd.arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!(
                "-storageDataPath={}",
                dir.join("victoria-metrics").display()
            ))
            .arg("-retentionPeriod=100y")
            .arg("-dedup.minScrapeInterval=1ms")
            .arg("-loggerLevel=WARN");
        let proc = Proc::spawn("victoria-metrics", cmd, &dir.join("victoria-metrics.log"));
        wait_for(
            "victoria-metrics to listen",
            Duration::from_secs(30),
            || (port_open(port) && http_get(port, "/health").is_some()).then_some(()),
        );
        Self { port, proc }
    }

    /// Every sample of the metrics `<measurement>_<field>` as `(<device>/<field>, time, value bits)`.
    pub fn readings(&self, measurement: &str) -> Vec<Key> {
        http_get(self.port, "/internal/force_flush");
        let form = format!(
            "match[]={}",
            form_encode(&format!("{{__name__=~\"{measurement}_.*\"}}"))
        );
        let (status, body) = post_form(self.port, "/api/v1/export", &form).expect("export");
        assert_eq!(status, 200, "{body}");
        let mut out = Vec::new();
        for l in body.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let name = v["metric"]["__name__"].as_str().unwrap();
            let field = name.strip_prefix(&format!("{measurement}_")).unwrap();
            let device = v["metric"]["device"].as_str().unwrap();
            let values = v["values"].as_array().unwrap();
            let times = v["timestamps"].as_array().unwrap();
            for (x, t) in values.iter().zip(times) {
                out.push((
                    format!("{device}/{field}"),
                    t.as_i64().unwrap(),
                    x.as_f64().unwrap().to_bits(),
                ));
            }
        }
        out
    }
}

/// The InfluxDB fault proxy (`tests/python/influx_fault_proxy.py`) in front of a server.
pub struct InfluxFaultProxy {
    pub port: u16,
    pub proc: Proc,
}

impl InfluxFaultProxy {
    pub fn start(dir: &Path, upstream_port: u16) -> Self {
        let upstream = format!("http://127.0.0.1:{upstream_port}");
        let (proc, port) = crate::start_proxy(dir, "influx_fault_proxy.py", &[&upstream, "log"]);
        Self { port, proc }
    }

    /// Sets fault shares, e.g. `r429=0.1&r413=0.1`; returns the counters.
    pub fn set(&self, query: &str) -> serde_json::Value {
        serde_json::from_str(&http_get(self.port, &format!("/__fault/set?{query}")).unwrap())
            .unwrap()
    }

    /// The counters.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&http_get(self.port, "/__fault/stats").unwrap()).unwrap()
    }

    /// Every line the server answered 2xx for (at least once).
    pub fn acknowledged(&self) -> Vec<String> {
        serde_json::from_str(&http_get(self.port, "/__fault/acknowledged").unwrap()).unwrap()
    }
}

/// A `fieldlink-cloud` process writing to the InfluxDB sink only (`influxdb_section` is the whole
/// `[influxdb]` section), dead letters under `<dir>/dead`.
pub struct InfluxCloud {
    pub proc: Option<Proc>,
    pub port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
    pub env: Vec<(String, String)>,
}

impl InfluxCloud {
    pub fn new(dir: &Path, endpoint: &str, stream: &str, influxdb_section: &str) -> Self {
        let port = free_port();
        let config = dir.join("cloud-influx.toml");
        // The test settings of `cloud_toml` (short leases and commits, landed-batch logs) without its sinks.
        let base = cloud_toml(port, endpoint, stream, "influx-worker", "unused", "");
        let common = &base[..base
            .find("[timestream]")
            .expect("cloud_toml has a [timestream] section")];
        std::fs::write(
            &config,
            format!(
                "dead_letter = \"file://{}\"\n{common}{influxdb_section}\n",
                dir.join("dead").display()
            ),
        )
        .unwrap();
        Self {
            proc: None,
            port,
            config,
            log: dir.join("cloud-influx.log"),
            env: Vec::new(),
        }
    }

    /// Starts the process and waits for `/health`.
    pub fn start(&mut self) {
        let mut cmd = Command::new(bin("fieldlink-cloud"));
        cmd.arg("run").arg("--config").arg(&self.config);
        aws_env(&mut cmd);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.proc = Some(Proc::spawn("fieldlink-cloud", cmd, &self.log));
        let port = self.port;
        wait_for(
            "the cloud service to serve /health",
            Duration::from_secs(30),
            || http_get(port, "/health"),
        );
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// The value of a metric line starting with `name_and_labels` (0 if absent).
    pub fn metric(&self, name_and_labels: &str) -> f64 {
        http_get(self.port, "/metrics")
            .and_then(|m| {
                m.lines().find_map(|l| {
                    l.strip_prefix(name_and_labels)
                        .and_then(|r| r.strip_prefix(' '))
                        .and_then(|v| v.trim().parse().ok())
                })
            })
            .unwrap_or(0.0)
    }

    /// The dead-lettered lines of the sink: `(reason, line)`.
    pub fn dead_lines(&self) -> Vec<(String, String)> {
        let dir = self.config.parent().unwrap().join("dead/influxdb");
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten() {
            // The store writes a hidden staging file (`.{name}.tmp-…`, cloud/src/store.rs) and renames it: a staging
            // file may be half written, and one listed mid-rename is gone. Its lines are read under the final name
            // at a later call (callers wait for the count they expect).
            let path = e.unwrap().path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                r => r.unwrap(),
            };
            for l in text.lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                out.push((
                    v["reason"].as_str().unwrap_or("").to_owned(),
                    v["line"].as_str().unwrap_or("").to_owned(),
                ));
            }
        }
        out
    }
}
