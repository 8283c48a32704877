//! Test harness: real Mosquitto and moto server on free loopback ports, the fieldlink binaries as child
//! processes, and the Python helpers in `tests/python` (run with the repo's `.venv`).
//!
//! Everything started here is stopped when its guard drops. Nothing uses a fixed port or a fixed sleep: waits
//! poll a condition with a deadline.
#![allow(clippy::unwrap_used, unreachable_pub, missing_debug_implementations)]

pub mod bronze;
pub mod influx;
pub mod powercut;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The venv's Python (created by `deploy/setup.sh`), or `FIELDLINK_PYTHON`.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("FIELDLINK_PYTHON") {
        return p.into();
    }
    let p = root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: run deploy/setup.sh (the README's test command does)",
        p.display()
    );
    p
}

/// A helper script under `tests/python`.
pub fn script(name: &str) -> PathBuf {
    root().join("tests/python").join(name)
}

/// Runs a command to its end and returns its stdout; panics with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a Python helper and returns its stdout; panics with its output on failure.
pub fn run_python(args: &[&str]) -> String {
    run_ok(Command::new(python()).args(args))
}

/// A binary of this workspace, built by `cargo build --workspace --bins` (the test command does this first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // A test runs from target/<profile>/deps/, a binary from target/<profile>/; the binaries are in the latter.
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// A binary of this workspace cross-built for `triple` (`cargo build --target <triple>`, which the test command
/// runs before the tests).
pub fn cross_bin(triple: &str, name: &str) -> PathBuf {
    let native = bin(name);
    // target/<profile>/<name> → target/<triple>/<profile>/<name>
    let profile_dir = native.parent().unwrap();
    let target_dir = profile_dir.parent().unwrap();
    let p = target_dir
        .join(triple)
        .join(profile_dir.file_name().unwrap())
        .join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p fieldlink-agent --target {triple}` first (deploy/test.sh does)",
        p.display()
    );
    p
}

/// The cargo profile of the static builds the tests run (`deploy/build-static.sh --profile …`, which the test
/// command runs before the tests): `FIELDLINK_STATIC_PROFILE`, default `ci-static`.
pub fn static_profile() -> String {
    std::env::var("FIELDLINK_STATIC_PROFILE").unwrap_or_else(|_| "ci-static".into())
}

/// A binary of the static build for `triple` (`target/<triple>/<static profile>/<name>`): the musl builds
/// (x86_64, aarch64) and the armv7 one (glibc 2.28) that ship in the packages and the container image.
pub fn static_bin(triple: &str, name: &str) -> PathBuf {
    // target/<profile>/<name> → target/
    let target_dir = bin(name).parent().unwrap().parent().unwrap().to_path_buf();
    let profile = static_profile();
    let p = target_dir.join(triple).join(&profile).join(name);
    assert!(
        p.exists(),
        "{} missing: run `deploy/build-static.sh --profile {profile} --no-images` first (deploy/test.sh does)",
        p.display()
    );
    p
}

/// The `THP_enabled` line of `/proc/<pid>/status` (`pid` "self" for this process): `THP_enabled:\t0` once a
/// process turned transparent huge pages off for itself. The flag is inherited across fork and exec, so a test of
/// a child's flag first checks that this process has it on ([`assert_thp_on_here`]).
pub fn thp_enabled_line(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("THP_enabled"))
        .unwrap_or("no THP_enabled line")
        .to_owned()
}

/// Panics unless this process has transparent huge pages on: otherwise a child would show them off without
/// turning them off itself.
pub fn assert_thp_on_here() {
    assert_eq!(
        thp_enabled_line("self"),
        "THP_enabled:\t1",
        "this test process already has transparent huge pages off: a child's own flag cannot be told apart"
    );
}

/// Ports [`free_port`] hands out: below Linux's ephemeral range (32768–60999 by default), so the kernel never
/// gives one to an outgoing connection or to another `bind(0)` between our check and the server's bind. (A port
/// from `bind(0)` was taken that way once: an agent in a CI run failed with "Address already in use".)
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_768;

/// A claim older than this is taken for a leftover of an earlier run, and its port handed out again.
const PORT_CLAIM_TTL: Duration = Duration::from_secs(3600);

/// A port nobody listens on right now, and that no other test of this machine got from here within the last hour:
/// each is claimed by a file created exclusively under the temporary directory (test binaries run as separate
/// processes, their tests as threads).
pub fn free_port() -> u16 {
    let dir = std::env::temp_dir().join("fieldlink-test-ports");
    std::fs::create_dir_all(&dir).expect("creating the test ports' claim directory");
    for _ in 0..10_000 {
        let port = fastrand::u16(TEST_PORTS);
        if claim_port(&dir.join(port.to_string())) && TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!(
        "no free test port in {TEST_PORTS:?} after 10,000 tries (claims in {})",
        dir.display()
    );
}

/// Claims the port whose claim file is `file`: creates it, or replaces a claim older than [`PORT_CLAIM_TTL`].
fn claim_port(file: &Path) -> bool {
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(file)
            .is_ok()
    };
    if create() {
        return true;
    }
    let stale = std::fs::metadata(file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > PORT_CLAIM_TTL);
    // Two processes finding one claim stale at the same moment could both take it (one removing the other's new
    // claim); the bind check still refuses a port already listened on.
    stale && std::fs::remove_file(file).is_ok() && create()
}

/// Polls `cond` every 100 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, cond: impl FnMut() -> Option<T>) -> T {
    wait_for_or(what, timeout, cond, String::new)
}

/// [`wait_for`], whose panic at the timeout ends with `diagnose()`: what the test can tell about why.
pub fn wait_for_or<T>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Option<T>,
    diagnose: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                diagnose()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A child process killed (SIGKILL) when dropped unless stopped before.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Self {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = cmd
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self {
            name: name.into(),
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    /// The exit status if the process has exited (without waiting).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `sig` (`kill` syntax: "-TERM", "-STOP", "-CONT", …); whether it was delivered.
    pub fn signal(&self, sig: &str) -> bool {
        Command::new("kill")
            .arg(sig)
            .arg(self.pid().to_string())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit (panics if it does not exit or fails).
    pub fn terminate(&mut self, timeout: Duration) {
        let _ = self.signal("-TERM"); // it may have exited already: `wait` tells
        self.wait(timeout);
    }

    /// Waits up to `timeout` for the process to exit by itself (panics if it does not exit or fails).
    pub fn wait(&mut self, timeout: Duration) {
        // The child stays in `self` while waiting, so a timeout's panic still kills it (on drop).
        let child = self.child.as_mut().unwrap();
        let status = wait_for(&format!("{} to exit", self.name), timeout, || {
            child.try_wait().unwrap()
        });
        self.child = None;
        assert!(
            status.success(),
            "{} exited with {status}; log:\n{}",
            self.name,
            self.log_text()
        );
    }

    /// SIGKILL now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Mosquitto broker on a free loopback port (config file, large queues, no persistence).
pub struct Mosquitto {
    pub port: u16,
    pub proc: Proc,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, "")
    }

    /// A broker on `port` that keeps sessions and queued messages across restarts (saved on shutdown, in
    /// `dir/mosquitto-store-<port>/`); starting it again on the same `dir` and `port` restores them.
    pub fn start_persistent(dir: &Path, port: u16) -> Self {
        let conf = dir.join(format!("mosquitto-persistent-{port}.conf"));
        let store = dir.join(format!("mosquitto-store-{port}"));
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(
            &conf,
            format!(
                // Started as root (CI), Mosquitto switches to its own user, which cannot write the store in our
                // private temporary directory: it would then lose every session on restart (it logs "Error saving
                // in-memory database"). `user root` keeps it (ignored when not started as root).
                "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\npersistence true\npersistence_location {}/\n",
                store.display()
            ),
        )
        .unwrap();
        // The port is fixed (a restart must come back on it), so it can be taken while the broker is down: by a
        // client's outgoing connection that got it as its local port (a connection to a closed port in the
        // ephemeral range can even connect to itself). Mosquitto then exits at once ("Address already in use"),
        // and a new start a moment later binds: up to 30 s of such starts, each exit shown in the panic.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut exits = Vec::new();
        loop {
            let mut cmd = Command::new(mosquitto_bin());
            cmd.arg("-c").arg(&conf);
            let log = dir.join(format!("mosquitto-{port}-{}.log", fieldlink_ops::unix_ms()));
            let mut proc = Proc::spawn("mosquitto", cmd, &log);
            let exited = loop {
                if port_open(port) && proc.exited().is_none() {
                    return Self { port, proc };
                }
                if let Some(status) = proc.exited() {
                    break status;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "mosquitto did not listen on {port} within 30 s (earlier starts: {exits:?}); log:\n{}",
                    proc.log_text()
                );
                std::thread::sleep(Duration::from_millis(100));
            };
            exits.push(format!("{exited}: {}", proc.log_text().trim()));
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not start on {port} within 30 s: {exits:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A broker whose plain listener is `port`, with `extra` appended to its configuration (more listeners).
    pub fn start_with(dir: &Path, extra: &str) -> Self {
        let port = free_port();
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!("per_listener_settings false\nallow_anonymous true\nmax_queued_messages 1000000\npersistence false\nlistener {port} 127.0.0.1\n{extra}"),
        )
        .unwrap();
        let mut cmd = Command::new(mosquitto_bin());
        cmd.arg("-c").arg(&conf);
        let proc = Proc::spawn("mosquitto", cmd, &dir.join("mosquitto.log"));
        wait_for("mosquitto to listen", Duration::from_secs(10), || {
            port_open(port).then_some(())
        });
        Self { port, proc }
    }
}

fn mosquitto_bin() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("mosquitto not installed: run deploy/setup.sh");
}

/// A moto server on a port it chooses.
pub struct Moto {
    pub endpoint: String,
    pub proc: Proc,
}

impl Moto {
    pub fn start(dir: &Path) -> Self {
        let log = dir.join("moto.log");
        // moto with Kinesis resharding as AWS documents it (see the script's header).
        let mut cmd = Command::new(python());
        cmd.arg(script("moto_server.py"))
            .args(["-H", "127.0.0.1", "-p", "0"]);
        let proc = Proc::spawn("moto", cmd, &log);
        let port: u16 = wait_for("moto to print its port", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&log).ok()?;
            let at = text.find("Running on http://127.0.0.1:")?;
            text[at + 28..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        });
        wait_for("moto to listen", Duration::from_secs(10), || {
            port_open(port).then_some(())
        });
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            proc,
        }
    }

    /// Creates a stream with `shards` shards, a Timestream database and table, and a bucket.
    pub fn create(&self, stream: &str, shards: u32, database: &str, table: &str, bucket: &str) {
        run_python(&[
            script("aws_setup.py").to_str().unwrap(),
            &self.endpoint,
            stream,
            &shards.to_string(),
            database,
            table,
            bucket,
        ]);
    }
}

/// Environment for our binaries talking to moto.
pub fn aws_env(cmd: &mut Command) {
    cmd.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE");
}

/// `(series, ts_ms, value)` of the first `n` readings of `shared/datasets/sensors.csv.gz`.
pub fn dataset(n: usize) -> Vec<(String, i64, f64)> {
    let path = dataset_path();
    let mut gz = flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap());
    let mut text = String::new();
    gz.read_to_string(&mut text).unwrap();
    text.lines()
        .skip(1)
        .take(n)
        .map(|l| {
            let mut f = l.splitn(3, ',');
            let ts = f.next().unwrap().parse().unwrap();
            let series = f.next().unwrap().to_owned();
            let v = f.next().unwrap().parse().unwrap();
            (series, ts, v)
        })
        .collect()
}

/// Where the shared dataset is (`../shared/datasets/sensors.csv.gz` beside the repo, or `FIELDLINK_DATASET`).
pub fn dataset_path() -> PathBuf {
    if let Ok(p) = std::env::var("FIELDLINK_DATASET") {
        return p.into();
    }
    let p = root()
        .parent()
        .unwrap()
        .join("shared/datasets/sensors.csv.gz");
    assert!(
        p.exists(),
        "{} missing (set FIELDLINK_DATASET)",
        p.display()
    );
    p
}

/// GET http://127.0.0.1:port/path, returning the status code and the body (for /health).
pub fn http_status(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// GET http://127.0.0.1:port/path, returning the body (for /metrics).
pub fn http_get(port: u16, path: &str) -> Option<String> {
    http_status(port, path).map(|(_, body)| body)
}

/// The value of an unlabelled metric in a Prometheus text body.
pub fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// What the agent's delivery tests start from: a broker, moto with a Kinesis stream of `shards` shards (and an unused
/// database and bucket), and the fault proxy in front of moto.
pub fn broker_and_proxied_stream(
    dir: &Path,
    stream: &str,
    shards: u32,
) -> (Mosquitto, Moto, FaultProxy) {
    let broker = Mosquitto::start(dir);
    let moto = Moto::start(dir);
    moto.create(stream, shards, "unused-db", "unused-table", "unused-bucket");
    let proxy = FaultProxy::start(dir, &moto.endpoint);
    (broker, moto, proxy)
}

/// The fault-injecting proxy (`tests/python/fault_proxy.py`) in front of an upstream (moto).
pub struct FaultProxy {
    pub endpoint: String,
    pub proc: Proc,
}

/// Starts the Python proxy `script` with `args` (it prints "listening on PORT"); the process and its port.
pub fn start_proxy(dir: &Path, script_name: &str, args: &[&str]) -> (Proc, u16) {
    let log = dir.join(format!("{script_name}-{}.log", free_port()));
    let mut cmd = Command::new(python());
    cmd.arg("-u").arg(script(script_name)).args(args);
    let proc = Proc::spawn(script_name, cmd, &log);
    let port = wait_for(
        &format!("{script_name} to listen"),
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log)
                .ok()?
                .split("listening on ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        },
    );
    (proc, port)
}

impl FaultProxy {
    pub fn start(dir: &Path, upstream: &str) -> Self {
        let (proc, port) = start_proxy(dir, "fault_proxy.py", &[upstream]);
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            proc,
        }
    }

    fn port(&self) -> u16 {
        self.endpoint.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Sets fault parameters, e.g. `throttle=0.2&reject=0.3&down=0`; returns the counters.
    pub fn set(&self, query: &str) -> serde_json::Value {
        serde_json::from_str(&http_get(self.port(), &format!("/__fault/set?{query}")).unwrap())
            .unwrap()
    }

    /// The counters.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&http_get(self.port(), "/__fault/stats").unwrap()).unwrap()
    }
}

/// One decoded Kinesis record.
#[derive(Debug, Clone)]
pub struct DumpedRecord {
    pub agent: String,
    /// The agent buffer's epoch (0: none).
    pub epoch: u64,
    pub seq: u64,
    pub sha256: String,
    /// `(series, ts_ms, value as text, late)`.
    pub readings: Vec<(String, i64, String, bool)>,
    /// Quality code of each reading (0 good, 1 uncertain, 2 bad), in the same order.
    pub quality: Vec<u8>,
    /// Series tags of each reading, in the same order.
    pub tags: Vec<Vec<(String, String)>>,
    /// Alarm events of an alarm-event record (as `fieldlink_decode.py` gives them); empty for readings.
    pub alarms: Vec<serde_json::Value>,
    /// When Kinesis took the record (`ApproximateArrivalTimestamp`), Unix ms.
    pub arrival_ms: i64,
}

/// Every record in the stream, decoded by the independent Python decoder.
pub fn kinesis_dump(endpoint: &str, stream: &str) -> Vec<DumpedRecord> {
    let out = run_python(&[
        script("kinesis_dump.py").to_str().unwrap(),
        endpoint,
        stream,
    ]);
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            DumpedRecord {
                agent: v["agent"].as_str().unwrap().to_owned(),
                epoch: v["epoch"].as_u64().unwrap(),
                seq: v["seq"].as_u64().unwrap(),
                sha256: v["sha256"].as_str().unwrap().to_owned(),
                readings: v["readings"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        (
                            r[0].as_str().unwrap().to_owned(),
                            r[1].as_i64().unwrap(),
                            r[2].as_str().unwrap().to_owned(),
                            r[3].as_bool().unwrap(),
                        )
                    })
                    .collect(),
                quality: v["readings"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r[4].as_u64().unwrap() as u8)
                    .collect(),
                tags: v["readings"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| serde_json::from_value(r[5].clone()).unwrap())
                    .collect(),
                alarms: v["alarms"].as_array().cloned().unwrap_or_default(),
                arrival_ms: v["arrival_ms"].as_i64().unwrap_or(0),
            }
        })
        .collect()
}

/// The value of a labelled metric, e.g. `metric_with(body, "fieldlink_modbus_requests_total", "device=\"m1\"")`.
pub fn metric_with(body: &str, name: &str, label: &str) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A Modbus device served by pymodbus (`tests/python/modbus_device.py`): TCP on a free port, or RTU (units 1 and
/// 2) on a serial path. `requests()` reads the server-side request counts.
pub struct ModbusDevice {
    pub port: u16,
    pub counts: PathBuf,
    pub proc: Proc,
}

impl ModbusDevice {
    pub fn tcp(dir: &Path, port: u16) -> Self {
        let counts = dir.join(format!("modbus-{port}.json"));
        let mut cmd = Command::new(python());
        cmd.arg("-u")
            .arg(script("modbus_device.py"))
            .arg("tcp")
            .arg(port.to_string())
            .arg(&counts);
        let log = dir.join(format!("modbus-{port}.log"));
        let proc = Proc::spawn("pymodbus", cmd, &log);
        wait_for("pymodbus to listen", Duration::from_secs(20), || {
            port_open(port).then_some(())
        });
        Self { port, counts, proc }
    }

    pub fn rtu(dir: &Path, serial: &Path) -> Self {
        Self::rtu_slowed(dir, serial, None)
    }

    /// [`ModbusDevice::rtu`] where every `every`-th request to unit 1 is answered `delay_ms` late (`slow`).
    pub fn rtu_slowed(dir: &Path, serial: &Path, slow: Option<(u32, u64)>) -> Self {
        let counts = dir.join("modbus-rtu.json");
        let mut cmd = Command::new(python());
        cmd.arg("-u")
            .arg(script("modbus_device.py"))
            .arg("rtu")
            .arg(serial)
            .arg(&counts);
        if let Some((every, delay_ms)) = slow {
            cmd.env("FIELDLINK_MODBUS_SLOW", format!("{every}:{delay_ms}"));
        }
        let log = dir.join("modbus-rtu.log");
        let proc = Proc::spawn("pymodbus rtu", cmd, &log);
        wait_for("pymodbus to serve", Duration::from_secs(20), || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("serving")
                .then_some(())
        });
        Self {
            port: 0,
            counts,
            proc,
        }
    }

    /// `(all requests, by function code)` served so far.
    pub fn requests(&self) -> (u64, std::collections::BTreeMap<String, u64>) {
        let v: serde_json::Value = std::fs::read_to_string(&self.counts)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let by = v["by_function"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        (v["requests"].as_u64().unwrap_or(0), by)
    }
}

/// Writes libfaketime's offset file (e.g. `"-3600"`) whole: a new file renamed over the old, so the process never
/// reads it half written.
pub fn set_clock_offset(file: &Path, offset: &str) {
    let tmp = file.with_extension("new");
    std::fs::write(&tmp, offset).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// The environment that runs a process under Debian's libfaketime (package `libfaketime`, installed by
/// `deploy/setup.sh`) with its wall clock set by `setting`: `("FAKETIME", "-7200")` (two hours behind), or
/// `("FAKETIME_TIMESTAMP_FILE", path)` to step it while it runs (the file read at every call). The monotonic clock
/// is left alone, as a clock step leaves it.
pub fn faketime_env(setting: (&str, &str)) -> Vec<(String, String)> {
    let lib = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime missing: run deploy/setup.sh");
    [
        ("LD_PRELOAD", lib.display().to_string().as_str()),
        ("DONT_FAKE_MONOTONIC", "1"),
        ("FAKETIME_NO_CACHE", "1"),
        setting,
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A fieldlink agent process with its config, restartable.
pub struct AgentProc {
    pub config: PathBuf,
    pub metrics_port: u16,
    pub log: PathBuf,
    pub proc: Option<Proc>,
    /// Extra environment for the agent process.
    pub env: Vec<(String, String)>,
    /// How to start the agent, if not as this workspace's native binary: e.g. qemu-user, its options and a
    /// cross-built binary.
    pub launcher: Vec<std::ffi::OsString>,
}

impl AgentProc {
    /// Writes a config (MQTT on `mqtt_port`, topics `#`, Kinesis `stream` at `endpoint`) with `extra` TOML
    /// appended to the `[buffer]` section and `sections` appended after it.
    pub fn new(
        dir: &Path,
        id: &str,
        mqtt_port: u16,
        endpoint: &str,
        stream: &str,
        buffer_extra: &str,
        sections: &str,
    ) -> Self {
        let mqtt = format!(
            r##"[[mqtt]]
name = "local"
host = "127.0.0.1"
port = {mqtt_port}
keep_alive_s = 5
[[mqtt.topics]]
filter = "#"
qos = 1
"##
        );
        Self::with_sources(
            dir,
            id,
            endpoint,
            stream,
            buffer_extra,
            &format!("{sections}\n{mqtt}"),
        )
    }

    /// Like [`AgentProc::new`] with the sources (`[[mqtt]]`, `[[modbus]]` tables) given whole in `sections`.
    pub fn with_sources(
        dir: &Path,
        id: &str,
        endpoint: &str,
        stream: &str,
        buffer_extra: &str,
        sections: &str,
    ) -> Self {
        let metrics_port = free_port();
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                r##"agent_id = "{id}"
metrics_listen = "127.0.0.1:{metrics_port}"
[aws]
endpoint_url = "{endpoint}"
attempt_timeout_ms = 3000
[buffer]
path = "{buffer}"
{buffer_extra}
[batch]
linger_ms = 200
[order]
reorder_window_ms = 200
[kinesis]
stream = "{stream}"
shutdown_drain_ms = 2000
{sections}
"##,
                buffer = dir.join(format!("{id}.db")).display()
            ),
        )
        .unwrap();
        Self {
            config,
            metrics_port,
            log: dir.join(format!("{id}.log")),
            proc: None,
            env: Vec::new(),
            launcher: Vec::new(),
        }
    }

    /// Appends TOML to the configuration (after the `[[mqtt]]` section: `[mqtt.tls]` lands there).
    pub fn append_config(&self, toml: &str) {
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        text.push_str(toml);
        std::fs::write(&self.config, text).unwrap();
    }

    /// Starts the agent without waiting for anything.
    pub fn spawn(&mut self) {
        let mut cmd = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args);
                c
            }
            None => Command::new(bin("fieldlink-agent")),
        };
        cmd.arg("run").arg("--config").arg(&self.config);
        aws_env(&mut cmd);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.proc = Some(Proc::spawn("fieldlink-agent", cmd, &self.log));
    }

    /// Starts the agent and waits until every MQTT connection has subscribed. If it does not within 30 s, the
    /// panic says what `/health` answered last and ends with the agent's log.
    pub fn start(&mut self) {
        self.spawn();
        let port = self.metrics_port;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        loop {
            let health = http_get(port, "/health");
            if let Some(b) = &health {
                let mut mqtt = b.lines().filter(|l| l.starts_with("mqtt:")).peekable();
                if mqtt.peek().is_some() && mqtt.all(|l| l.contains(": ok")) {
                    return;
                }
            }
            last = health.or(last);
            if Instant::now() >= deadline {
                panic!(
                    "timed out after 30s waiting for the agent to subscribe; /health last said {last:?}; the agent's log ends:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's intake and sending counters and the end of its log, for a failing test's message.
    pub fn diagnosis(&self) -> String {
        let m = http_get(self.metrics_port, "/metrics").unwrap_or_default();
        let g = |n: &str| metric(&m, n).map_or("?".into(), |v| v.to_string());
        format!(
            "agent: received {}, sent {}, unsealed {}, pending {}, deduplicated {}, PutRecords failed {}, rate {}; /health: {:?}; its log ends:\n{}",
            g("fieldlink_readings_received_total"),
            g("fieldlink_readings_sent_total"),
            g("fieldlink_buffer_unsealed_readings"),
            g("fieldlink_buffer_pending_readings"),
            g("fieldlink_readings_deduplicated_total"),
            g("fieldlink_put_calls_failed_total"),
            g("fieldlink_send_rate_bytes_per_second"),
            http_get(self.metrics_port, "/health"),
            self.log_tail(40)
        )
    }

    /// The last `lines` lines of the agent's log (for a failing test's message).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The running agent's memory settings (`agent/src/memory.rs`): its start-up log's `memory settings` line,
    /// waited for, and its `THP_enabled` status line (for a cross-built agent, of the qemu-user process that runs
    /// it).
    pub fn memory_settings(&self) -> (String, String) {
        let proc = self.proc.as_ref().expect("the agent is not running");
        let line = wait_for(
            "the memory settings log line",
            Duration::from_secs(20),
            || {
                proc.log_text()
                    .lines()
                    .find(|l| l.contains("memory settings"))
                    .map(str::to_owned)
            },
        );
        (line, thp_enabled_line(&proc.pid().to_string()))
    }

    /// `fieldlink-agent drain` on this agent's configuration, with the AWS test environment.
    pub fn drain_command(&self, timeout_s: u64) -> Command {
        let mut cmd = Command::new(bin("fieldlink-agent"));
        cmd.arg("drain")
            .arg("--config")
            .arg(&self.config)
            .arg("--timeout-s")
            .arg(timeout_s.to_string());
        aws_env(&mut cmd);
        cmd
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM and a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(30));
        }
    }

    /// Value of an unlabelled metric (0 if absent).
    pub fn metric(&self, name: &str) -> f64 {
        http_get(self.metrics_port, "/metrics")
            .and_then(|m| metric(&m, name))
            .unwrap_or(0.0)
    }

    /// Checks the reading ledger: received (+ derived window readings) = sent + deduplicated + dead-lettered +
    /// dropped (+ raw readings withheld by windows) + unsealed + pending.
    pub fn ledger(&self) -> (f64, f64) {
        let m = http_get(self.metrics_port, "/metrics").unwrap();
        let g = |n: &str| metric(&m, n).unwrap_or(0.0);
        let received =
            g("fieldlink_readings_received_total") + g("fieldlink_window_readings_derived_total");
        let accounted = g("fieldlink_readings_sent_total")
            + g("fieldlink_readings_deduplicated_total")
            + g("fieldlink_readings_dead_lettered_total")
            + g("fieldlink_readings_dropped_total")
            + g("fieldlink_window_raw_withheld_total")
            + g("fieldlink_buffer_unsealed_readings")
            + g("fieldlink_buffer_pending_readings");
        (received, accounted)
    }
}

/// Publishes `count` numbered readings (`publish_numbered.py`) and returns the numbers the broker acknowledged.
pub fn publish_numbered(port: u16, count: usize, rate: f64, pad: usize, dir: &Path) -> Vec<u64> {
    publish_numbered_from(port, 0, count, rate, pad, dir)
}

/// Like [`publish_numbered`], numbering from `first`.
pub fn publish_numbered_from(
    port: u16,
    first: u64,
    count: usize,
    rate: f64,
    pad: usize,
    dir: &Path,
) -> Vec<u64> {
    NumberedPublisher::spawn(port, "crash", first, count, rate, pad, dir, 1).finish(
        Duration::from_secs(count as u64 / rate.max(1.0) as u64 + 600),
    )
}

/// A `publish_numbered.py` process running in the background (killed when dropped): numbers `first..first+count`
/// on topics `prefix/devK` at `rate` per second.
pub struct NumberedPublisher {
    acked: PathBuf,
    proc: Proc,
}

impl NumberedPublisher {
    /// Publishes at `qos` (1 or 2).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        port: u16,
        prefix: &str,
        first: u64,
        count: usize,
        rate: f64,
        pad: usize,
        dir: &Path,
        qos: u8,
    ) -> Self {
        let tag = free_port();
        let acked = dir.join(format!("acked-{tag}.txt"));
        let mut cmd = Command::new(python());
        cmd.arg(script("publish_numbered.py"))
            .args(["127.0.0.1", &port.to_string(), &count.to_string()])
            .arg(rate.to_string())
            .arg(&acked)
            .args([pad.to_string(), first.to_string(), prefix.to_owned()])
            .env("FIELDLINK_PUBLISH_QOS", qos.to_string());
        let proc = Proc::spawn(
            &format!("publisher {prefix}"),
            cmd,
            &dir.join(format!("publisher-{tag}.log")),
        );
        Self { acked, proc }
    }

    /// Waits up to `timeout` for the publisher to finish; the numbers the broker acknowledged.
    pub fn finish(mut self, timeout: Duration) -> Vec<u64> {
        self.proc.wait(timeout);
        std::fs::read_to_string(&self.acked)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.parse().unwrap())
            .collect()
    }
}

/// The records of the dump with every batch once: a batch the agent resent (same agent, epoch and sequence
/// number, as the cloud's dedup skips it) counts once; the copies must be byte-identical.
pub fn unique_batches(records: &[DumpedRecord]) -> Vec<DumpedRecord> {
    let mut seen: BTreeMap<(String, u64, u64), &str> = BTreeMap::new();
    let mut out = Vec::new();
    for r in records {
        match seen.get(&(r.agent.clone(), r.epoch, r.seq)) {
            Some(sha) => assert_eq!(
                *sha, r.sha256,
                "batch {}/{:x}/{} resent with different content",
                r.agent, r.epoch, r.seq
            ),
            None => {
                seen.insert((r.agent.clone(), r.epoch, r.seq), &r.sha256);
                out.push(r.clone());
            }
        }
    }
    out
}

/// Multiset check of numbered readings: every number in `acked` appears exactly once in `got` (numbers outside
/// `acked` — taken by the agent but not acknowledged to the publisher — may appear once). Returns a description of
/// what is missing or doubled, empty if all is well.
pub fn exactly_once(acked: &[u64], got: &[u64]) -> String {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for n in got {
        *counts.entry(*n).or_insert(0) += 1;
    }
    let missing: Vec<u64> = acked
        .iter()
        .filter(|n| !counts.contains_key(n))
        .copied()
        .collect();
    let doubled: Vec<(u64, usize)> = counts.into_iter().filter(|(_, c)| *c > 1).collect();
    if missing.is_empty() && doubled.is_empty() {
        return String::new();
    }
    format!(
        "{} missing (first {:?}), {} doubled (first {:?})",
        missing.len(),
        &missing[..missing.len().min(10)],
        doubled.len(),
        &doubled[..doubled.len().min(10)]
    )
}

/// A tmpfs of `bytes` mounted at `dir/name` (needs root, as CI runs): a small filesystem the test can fill.
/// Unmounted on drop.
pub struct SmallFs {
    pub path: PathBuf,
}

impl SmallFs {
    pub fn mount(dir: &Path, name: &str, bytes: u64) -> Self {
        let path = dir.join(name);
        std::fs::create_dir_all(&path).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={bytes}"))
                .arg("tmpfs")
                .arg(&path),
        );
        Self { path }
    }

    /// Bytes free on it.
    pub fn free(&self) -> u64 {
        let out = run_ok(
            Command::new("df")
                .args(["-B1", "--output=avail"])
                .arg(&self.path),
        );
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

/// Writes up to `bytes` into a new file at `path`, like another process's data (a runaway log, a core dump): less
/// if the filesystem fills first, so `u64::MAX` fills it to the last byte.
pub fn fill(path: &Path, bytes: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5a_u8; 1 << 20];
    let mut written = 0;
    while written < bytes {
        let n = (bytes - written).min(chunk.len() as u64) as usize;
        if f.write_all(&chunk[..n]).is_err() {
            break;
        }
        written += n as u64;
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// The numbers `n` carried by `crash/devK/n` readings in the dump.
pub fn numbers_in(records: &[DumpedRecord]) -> Vec<u64> {
    records
        .iter()
        .flat_map(|r| r.readings.iter())
        .filter(|(s, _, _, _)| s.starts_with("crash/") && s.ends_with("/n"))
        .map(|(_, _, v, _)| v.parse::<f64>().unwrap() as u64)
        .collect()
}

/// `(series, ts_ms, value bits)`: one landed reading.
pub type Key = (String, i64, u64);

pub fn counted(rows: impl IntoIterator<Item = Key>) -> BTreeMap<Key, usize> {
    let mut m = BTreeMap::new();
    for r in rows {
        *m.entry(r).or_insert(0) += 1;
    }
    m
}

pub fn landed_rows(v: &serde_json::Value, which: &str) -> Vec<Key> {
    v[which]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let value: f64 = r[2].as_str().unwrap().parse().unwrap();
            (
                r[0].as_str().unwrap().to_owned(),
                r[1].as_i64().unwrap(),
                value.to_bits(),
            )
        })
        .collect()
}

pub fn describe_difference(
    name: &str,
    expected: &BTreeMap<Key, usize>,
    got: &BTreeMap<Key, usize>,
) -> String {
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(5)
        .collect();
    let doubled: Vec<_> = got.iter().filter(|(_, n)| **n > 1).take(5).collect();
    let extra: Vec<_> = got
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .take(5)
        .collect();
    format!(
        "{name}: expected {} readings, got {} ({} distinct); missing e.g. {missing:?}; doubled e.g. {doubled:?}; unexpected e.g. {extra:?}",
        expected.len(),
        got.values().sum::<usize>(),
        got.len()
    )
}

/// A `fieldlink-cloud` configuration for tests: short leases and commits, landed-batch debug logs, both sinks, and
/// a compactor that publishes every hour (open ones too) within a second of its landing files.
/// `timestream_extra` goes into the `[timestream]` section.
pub fn cloud_toml(
    metrics_port: u16,
    endpoint: &str,
    stream: &str,
    worker: &str,
    parquet_location: &str,
    timestream_extra: &str,
) -> String {
    format!(
        r#"metrics_listen = "127.0.0.1:{metrics_port}"
sink_failing_retry_ms = 1000
[log]
level = "info,fieldlink_cloud::landed=debug"
format = "text"
[aws]
endpoint_url = "{endpoint}"
[kinesis]
stream = "{stream}"
idle_poll_ms = 200
shard_refresh_ms = 1000
commit_interval_ms = 2000
commit_idle_ms = 1000
[leases]
table = "leases-{stream}"
worker_id = "{worker}"
lease_ms = 3000
[timestream]
database = "fieldlink"
table = "readings"
{timestream_extra}
[parquet]
location = "{parquet_location}"
max_rows_per_file = 5000
[compaction]
interval_ms = 1000
grace_s = 0
publish_open_hours = true
work_dir = "{work_dir}"
"#,
        work_dir = std::env::temp_dir()
            .join(format!(
                "fieldlink-compaction-{}-{stream}",
                std::process::id()
            ))
            .display()
    )
}

/// Runs `fieldlink-cloud compact --once` with the configuration at `config` (one compaction round: every closed
/// hour of the landing area published) and returns what it printed; panics unless it succeeds.
pub fn compact_once(config: &Path) -> String {
    let mut cmd = Command::new(bin("fieldlink-cloud"));
    cmd.arg("compact").arg("--once").arg("--config").arg(config);
    aws_env(&mut cmd);
    run_ok(&mut cmd)
}

/// The Timestream database and table and the S3 bucket of [`Cloud`] (Parquet under `s3://CLOUD_BUCKET/<stream>`).
pub const CLOUD_DB: &str = "fieldlink";
pub const CLOUD_TABLE: &str = "readings";
pub const CLOUD_BUCKET: &str = "bronze-cloud";

/// A `fieldlink-cloud` worker process configured by [`cloud_toml`] (worker id `name`), killed when dropped.
pub struct Cloud {
    pub proc: Proc,
    pub port: u16,
    pub log: PathBuf,
}

impl Cloud {
    /// Starts worker `name` on `stream` and waits until it serves /health; `extra` goes into `[timestream]`.
    pub fn start(dir: &Path, name: &str, endpoint: &str, stream: &str, extra: &str) -> Self {
        let port = free_port();
        let config = cloud_toml(
            port,
            endpoint,
            stream,
            name,
            &format!("s3://{CLOUD_BUCKET}/{stream}"),
            extra,
        );
        Self::start_config(dir, name, port, &config)
    }

    /// Starts worker `name` with the configuration text `config`, whose `metrics_listen` is on `port`, and waits
    /// until it serves /health.
    pub fn start_config(dir: &Path, name: &str, port: u16, config: &str) -> Self {
        let path = dir.join(format!("cloud-{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let log = dir.join(format!("cloud-{name}.log"));
        let mut cmd = Command::new(bin("fieldlink-cloud"));
        cmd.arg("run").arg("--config").arg(&path);
        aws_env(&mut cmd);
        let proc = Proc::spawn(&format!("cloud {name}"), cmd, &log);
        wait_for(
            "the cloud service to serve /health",
            Duration::from_secs(30),
            || http_get(port, "/health"),
        );
        Self { proc, port, log }
    }

    /// Value of an unlabelled metric (0 if absent).
    pub fn metric(&self, name: &str) -> f64 {
        http_get(self.port, "/metrics")
            .and_then(|m| metric(&m, name))
            .unwrap_or(0.0)
    }

    /// `(agent, seq)` of every batch in the order this process landed them.
    pub fn landing_order(&self) -> Vec<(String, u64)> {
        let text = std::fs::read_to_string(&self.log).unwrap();
        text.lines()
            .filter(|l| l.contains("batch landed"))
            .map(|l| {
                let field = |k: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(k))
                        .unwrap_or_else(|| panic!("no {k} in {l}"))
                        .to_owned()
                };
                (field("agent="), field("seq=").parse().unwrap())
            })
            .collect()
    }
}

/// What the cloud landed for `stream` on moto, as `landed.py` reads it back (Timestream with its upsert rule
/// applied, Parquet through pyarrow, dead letters), in the tests' database, table and bucket.
pub fn landed(moto: &Moto, stream: &str) -> serde_json::Value {
    read_landed(&moto.endpoint, CLOUD_DB, CLOUD_TABLE, CLOUD_BUCKET, stream)
}

/// `landed.py` on `endpoint` for a Timestream `database.table` and the bronze table under `s3://bucket/prefix`.
/// Fails if a Timestream record moto stored breaks one of the limits AWS enforces (moto does not).
pub fn read_landed(
    endpoint: &str,
    database: &str,
    table: &str,
    bucket: &str,
    prefix: &str,
) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&run_python(&[
        script("landed.py").to_str().unwrap(),
        endpoint,
        database,
        table,
        bucket,
        prefix,
    ]))
    .unwrap();
    assert_eq!(
        v["timestream_over_limits"],
        serde_json::json!([]),
        "Timestream records AWS would reject"
    );
    v
}

/// One batch of double readings `(series, ts_ms, value)`, with its series table, as an agent seals it.
pub fn batch_of(rows: &[(String, i64, f64)], agent: &str, seq: u64) -> fieldlink_proto::Batch {
    use fieldlink_proto::{Quality, Reading, Series, Value};
    let mut index: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    let mut batch = fieldlink_proto::Batch {
        agent_id: agent.into(),
        epoch: 0,
        seq,
        series: Vec::new(),
        readings: Vec::with_capacity(rows.len()),
    };
    for (s, ts, v) in rows {
        let next = index.len() as u32;
        let i = *index.entry(s.as_str()).or_insert_with(|| {
            batch.series.push(Series::new(s.clone()));
            next
        });
        batch.readings.push(Reading {
            series: i,
            ts_ms: *ts,
            value: Value::F64(*v),
            quality: Quality::Good,
            late: false,
        });
    }
    batch
}

/// The cloud's AWS SDK configuration for `moto` (its endpoint, moto's test credentials), with a runtime to drive
/// the clients built from it in this process.
pub fn moto_sdk(moto: &Moto) -> (tokio::runtime::Runtime, aws_config::SdkConfig) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let settings = fieldlink_ops::aws::AwsSettings {
        region: Some("us-east-1".into()),
        endpoint_url: Some(moto.endpoint.clone()),
        ..Default::default()
    };
    let sdk = rt
        .block_on(settings.sdk_config())
        .to_builder()
        .credentials_provider(aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
            aws_sdk_dynamodb::config::Credentials::new("testing", "testing", None, None, "test"),
        ))
        .build();
    (rt, sdk)
}

/// The cloud's lease table `name` on moto's DynamoDB (real conditional writes), with a runtime to drive it.
pub fn lease_table(
    moto: &Moto,
    name: &str,
) -> (tokio::runtime::Runtime, fieldlink_cloud::lease::LeaseTable) {
    let (rt, sdk) = moto_sdk(moto);
    let conf = aws_sdk_dynamodb::config::Builder::from(&sdk).build();
    let table =
        fieldlink_cloud::lease::LeaseTable::new(aws_sdk_dynamodb::Client::from_conf(conf), name);
    rt.block_on(table.ensure()).unwrap();
    (rt, table)
}

/// The numbers `n` of the `crash/devK/n` readings landed in `sink` ("parquet" or "timestream") of a [`landed`]
/// answer, each as often as it landed.
pub fn landed_numbers(v: &serde_json::Value, sink: &str) -> Vec<u64> {
    landed_rows(v, sink)
        .into_iter()
        .filter(|(s, _, _)| s.starts_with("crash/") && s.ends_with("/n"))
        .map(|(_, _, bits)| f64::from_bits(bits) as u64)
        .collect()
}

/// Waits until every number in `acked` is in Parquet and in Timestream, then checks each sink holds each exactly
/// once (multisets; numbers the broker did not acknowledge at most once) and no Timestream conflict; panics naming
/// `what` otherwise. Returns the [`landed`] answer.
pub fn assert_numbers_landed_once(
    moto: &Moto,
    stream: &str,
    acked: &[u64],
    timeout: Duration,
    what: &str,
) -> serde_json::Value {
    let v = wait_for(
        &format!("{what}: every acknowledged reading in Parquet and Timestream"),
        timeout,
        || {
            let v = landed(moto, stream);
            ["parquet", "timestream"]
                .iter()
                .all(|sink| {
                    let got: std::collections::BTreeSet<u64> =
                        landed_numbers(&v, sink).into_iter().collect();
                    acked.iter().all(|n| got.contains(n))
                })
                .then_some(v)
        },
    );
    for sink in ["parquet", "timestream"] {
        let problem = exactly_once(acked, &landed_numbers(&v, sink));
        assert!(problem.is_empty(), "{what}, {sink}: {problem}");
    }
    assert_eq!(v["timestream_conflicts"], 0, "{what}: Timestream conflicts");
    v
}

/// Runs the independent alarm model (`tests/python/alarm_model.py`) on `rules` (the `[[alarms.rules]]` tables as
/// JSON) and `items` (see the script); its transitions `[rule, rule_seq, series_id, from, to, ts, cause_ts]`.
pub fn alarm_model(
    rules: &serde_json::Value,
    items: &[serde_json::Value],
) -> Vec<serde_json::Value> {
    use std::io::Write;
    let mut child = Command::new(python())
        .arg(script("alarm_model.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input = serde_json::json!({"rules": rules, "items": items}).to_string();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "alarm_model.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `rounds` SIGKILLs of a running agent at seeded random moments (50–600 ms apart; the seed is printed), each
/// followed by a restart; the agent runs at the end. Returns the moments of the kills.
pub fn sigkill_rounds(agent: &mut AgentProc, rounds: usize) -> Vec<Instant> {
    let seed = fastrand::u64(..);
    eprintln!("kill schedule seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut kills = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(rng.u64(50..600)));
        agent.kill9();
        kills.push(Instant::now());
        agent.start();
    }
    kills
}
