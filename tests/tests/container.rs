//! The cloud's container image (`deploy/container/`), built from the static test build and run with podman on
//! the host network against moto (Kinesis, DynamoDB, Timestream, S3), with native agents feeding Kinesis from
//! Mosquitto: it lands every reading once, `podman stop` writes the staged Parquet files, releases the leases and
//! exits 0 within the stop timeout, and of two containers sharing four shards the survivor of a `podman kill`
//! takes them all. The configuration reaches the containers as a mounted file and as `FIELDLINK_CLOUD_CONFIG`.
//!
//! Podman runs with `deploy/container/containers.conf` (runc, cgroupfs, ulimits within CI's limits). Every
//! container is removed when its guard drops, a failing test included.

#![allow(clippy::unwrap_used)]

use fieldlink_e2e::*;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the test image goes (tag `<version>-amd64`).
const IMAGE_NAME: &str = "localhost/fieldlink-cloud-test";

fn podman() -> Command {
    let mut c = Command::new("podman");
    c.env(
        "CONTAINERS_CONF",
        root().join("deploy/container/containers.conf"),
    );
    c
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// The amd64 image of the static test build (`deploy/container/build.sh`), built once per test process.
fn image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        static_bin("x86_64-unknown-linux-musl", "fieldlink-cloud");
        let out = run_ok(
            Command::new(root().join("deploy/container/build.sh"))
                .args(["--profile", &static_profile(), "--arch", "amd64"])
                .args(["--name", IMAGE_NAME]),
        );
        // "<reference> <size> bytes"
        out.split_whitespace().next().unwrap().to_owned()
    })
}

/// How the configuration reaches the container.
#[derive(Clone, Copy, Debug)]
enum ConfigBy {
    /// Mounted read-only at the default path, /etc/fieldlink/cloud.toml.
    File,
    /// The TOML text in `FIELDLINK_CLOUD_CONFIG`.
    Env,
}

/// A running `fieldlink-cloud` container (host network), removed (`podman rm -f`) when dropped.
struct Container {
    name: String,
    /// Its /metrics and /health port on the host network.
    port: u16,
}

impl Container {
    /// Starts worker `worker` on `stream` with [`cloud_toml`] (Parquet in `s3://CLOUD_BUCKET/<stream>`), changed by
    /// `edit`, and waits until it serves /health.
    fn start(
        dir: &Path,
        worker: &str,
        endpoint: &str,
        stream: &str,
        by: ConfigBy,
        edit: impl Fn(String) -> String,
    ) -> Self {
        let port = free_port();
        let config = edit(cloud_toml(
            port,
            endpoint,
            stream,
            worker,
            &format!("s3://{CLOUD_BUCKET}/{stream}"),
            // publish_numbered.py's readings are of March 2026: only the magnetic store takes them.
            "magnetic_store_writes = true",
        ));
        let name = format!("fieldlink-test-{worker}-{port}");
        let mut cmd = podman();
        cmd.args(["run", "-d", "--name", &name, "--network", "host"]);
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ] {
            cmd.args(["--env", &format!("{k}={v}")]);
        }
        match by {
            ConfigBy::File => {
                let path = dir.join(format!("{name}.toml"));
                std::fs::write(&path, &config).unwrap();
                cmd.arg("--volume")
                    .arg(format!("{}:/etc/fieldlink/cloud.toml:ro", path.display()));
            }
            // As an ECS task definition passes it: podman takes the value from its own environment.
            ConfigBy::Env => {
                cmd.env("FIELDLINK_CLOUD_CONFIG", &config)
                    .args(["--env", "FIELDLINK_CLOUD_CONFIG"]);
            }
        }
        cmd.arg(image());
        run_ok(&mut cmd);
        let c = Self { name, port };
        wait_for(
            &format!("container {} to serve /health", c.name),
            Duration::from_secs(30),
            || http_get(port, "/health"),
        );
        c
    }

    /// Value of an unlabelled metric (0 if absent).
    fn metric(&self, name: &str) -> f64 {
        http_get(self.port, "/metrics")
            .and_then(|m| metric(&m, name))
            .unwrap_or(0.0)
    }

    /// `podman stop -t timeout_s`: how long it took and the exit code.
    fn stop(&self, timeout_s: u32) -> (Duration, i64) {
        let t = Instant::now();
        run_ok(podman().args(["stop", "-t", &timeout_s.to_string(), &self.name]));
        let took = t.elapsed();
        (took, self.exit_code())
    }

    fn exit_code(&self) -> i64 {
        run_ok(podman().args(["inspect", "--format", "{{.State.ExitCode}}", &self.name]))
            .trim()
            .parse()
            .unwrap()
    }

    /// `podman kill -s KILL`.
    fn kill9(&self) {
        run_ok(podman().args(["kill", "-s", "KILL", &self.name]));
    }

    fn logs(&self) -> String {
        let out = output(podman().args(["logs", &self.name]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of container {}:\n{}", self.name, self.logs());
        }
        let _ = podman().args(["rm", "-f", "-t", "0", &self.name]).output();
    }
}

/// Mosquitto, moto with `stream` (`shards` shards), the Timestream table and the bucket.
fn services(dir: &Path, stream: &str, shards: u32) -> (Mosquitto, Moto) {
    let broker = Mosquitto::start(dir);
    let moto = Moto::start(dir);
    moto.create(stream, shards, CLOUD_DB, CLOUD_TABLE, CLOUD_BUCKET);
    (broker, moto)
}

/// `n` agents on one broker; agent k takes the devices `crash/devD` with D % n == k (`publish_numbered.py` spreads
/// its numbers over dev0..dev9), so each reading goes through exactly one agent. The agent ids are the partition
/// keys: the MD5 hashes of `ctr-agent-0` … `ctr-agent-3` fall in the four quarters of the hash key range, so with
/// four shards (moto splits the range evenly) every shard carries one agent's records.
fn agents(dir: &Path, n: usize, broker: &Mosquitto, moto: &Moto, stream: &str) -> Vec<AgentProc> {
    (0..n)
        .map(|k| {
            let topics: String = (0..10)
                .filter(|d| d % n == k)
                .map(|d| format!("[[mqtt.topics]]\nfilter = \"crash/dev{d}\"\nqos = 1\n"))
                .collect();
            let sources = format!(
                "[[mqtt]]\nname = \"local\"\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n{topics}",
                broker.port
            );
            let mut a = AgentProc::with_sources(
                dir,
                &format!("ctr-agent-{k}"),
                &moto.endpoint,
                stream,
                "",
                &sources,
            );
            a.start();
            a
        })
        .collect()
}

#[test]
fn the_image_is_from_scratch_non_root_labelled_small_and_refuses_a_bad_env_config_by_name() {
    let image = image();
    let inspect =
        |format: &str| run_ok(podman().args(["image", "inspect", "--format", format, image]));
    assert_eq!(inspect("{{.Config.User}}").trim(), "65532:65532");
    assert_eq!(
        inspect("{{json .Config.Entrypoint}}").trim(),
        r#"["/fieldlink-cloud","run"]"#
    );
    let labels: serde_json::Value = serde_json::from_str(&inspect("{{json .Labels}}")).unwrap();
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap();
    assert!(
        revision.len() >= 40 && revision[..40].chars().all(|c| c.is_ascii_hexdigit()),
        "revision {revision}"
    );
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .unwrap()
            .starts_with("https://"),
        "{labels}"
    );
    // Nothing but the binary and the CA bundle (the release image's size is in docs/deploy.md).
    let size: u64 = inspect("{{.Size}}").trim().parse().unwrap();
    let binary = std::fs::metadata(static_bin("x86_64-unknown-linux-musl", "fieldlink-cloud"))
        .unwrap()
        .len();
    let bundle_len = std::fs::metadata("/etc/ssl/certs/ca-certificates.crt")
        .unwrap()
        .len();
    assert!(
        size <= binary + bundle_len + 64 * 1024,
        "image of {size} bytes for a binary of {binary} and a CA bundle of {bundle_len}"
    );

    // Exactly two files: the binary and Debian's CA bundle, byte for byte.
    let dir = tempfile::tempdir().unwrap();
    let name = format!("fieldlink-test-export-{}", free_port());
    run_ok(podman().args(["create", "--name", &name, image]));
    let tar = dir.path().join("fs.tar");
    let exported = output(podman().args(["export", "-o"]).arg(&tar).arg(&name));
    let _ = podman().args(["rm", "-f", &name]).output();
    assert!(exported.status.success(), "{exported:?}");
    let listing = run_ok(Command::new("tar").arg("-tf").arg(&tar));
    let files: Vec<&str> = listing.lines().filter(|l| !l.ends_with('/')).collect();
    assert!(
        files.contains(&"fieldlink-cloud") && files.contains(&"etc/ssl/certs/ca-certificates.crt"),
        "{files:?}"
    );
    let bundle = output(
        Command::new("tar")
            .arg("-xOf")
            .arg(&tar)
            .arg("etc/ssl/certs/ca-certificates.crt"),
    );
    assert_eq!(
        bundle.stdout,
        std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap()
    );

    // A configuration in the environment that does not validate: exit 1, the variable named with the field.
    let out = output(
        podman()
            .args(["run", "--rm", "--network", "none"])
            .env("FIELDLINK_CLOUD_CONFIG", "[kinesis]\nstream = \"\"\n")
            .args(["--env", "FIELDLINK_CLOUD_CONFIG", image]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("configuration $FIELDLINK_CLOUD_CONFIG") && err.contains("kinesis.stream"),
        "{err}"
    );
    eprintln!("image {image}: {size} bytes, user 65532, labels {labels}");
}

#[test]
fn check_config_reads_fieldlink_cloud_config_unless_a_file_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let good = cloud_toml(
        9465,
        "http://127.0.0.1:1",
        "env-stream",
        "w",
        "s3://bucket-x/p",
        "",
    );
    let check = |env: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new(bin("fieldlink-cloud"));
        cmd.arg("check-config").args(args);
        match env {
            Some(text) => cmd.env("FIELDLINK_CLOUD_CONFIG", text),
            None => cmd.env_remove("FIELDLINK_CLOUD_CONFIG"),
        };
        let out = output(&mut cmd);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = check(Some(&good), &[]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.starts_with("$FIELDLINK_CLOUD_CONFIG: OK (stream env-stream"),
        "{stdout}"
    );
    let (code, _, stderr) = check(Some("[kinesis]\nstream = \"\"\n"), &[]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.starts_with("$FIELDLINK_CLOUD_CONFIG: invalid configuration")
            && stderr.contains("kinesis.stream"),
        "{stderr}"
    );
    // --config wins over the variable.
    let file = dir.path().join("cloud.toml");
    std::fs::write(&file, good.replace("env-stream", "file-stream")).unwrap();
    let (code, stdout, _) = check(Some("not toml"), &["--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("OK (stream file-stream"), "{stdout}");
    // Neither: the default path, named.
    let (code, _, stderr) = check(None, &[]);
    if !Path::new("/etc/fieldlink/cloud.toml").exists() {
        assert_eq!(code, Some(1));
        assert!(
            stderr.starts_with("/etc/fieldlink/cloud.toml: cannot read"),
            "{stderr}"
        );
    }
}

#[test]
fn the_container_on_the_host_network_lands_an_agents_readings_in_parquet_and_timestream_exactly_once(
) {
    let dir = tempfile::tempdir().unwrap();
    let stream = "container-land";
    let (broker, moto) = services(dir.path(), stream, 1);
    let cloud = Container::start(
        dir.path(),
        "land",
        &moto.endpoint,
        stream,
        ConfigBy::File,
        |c| c,
    );
    let mut agents = agents(dir.path(), 1, &broker, &moto, stream);
    let acked = publish_numbered(broker.port, 2000, 1000.0, 0, dir.path());
    assert!(
        acked.len() >= 1900,
        "the broker acknowledged {}",
        acked.len()
    );
    assert_numbers_landed_once(
        &moto,
        stream,
        &acked,
        Duration::from_secs(90),
        "container, config file",
    );
    agents[0].stop();
    let (took, code) = cloud.stop(30);
    assert_eq!(code, 0, "exit code; log:\n{}", cloud.logs());
    eprintln!(
        "container: {} readings landed once in Parquet and Timestream; stopped in {took:?}",
        acked.len()
    );
}

#[test]
fn podman_stop_writes_the_staged_parquet_files_releases_the_leases_and_exits_0_within_the_timeout()
{
    let dir = tempfile::tempdir().unwrap();
    let stream = "container-stop";
    let (broker, moto) = services(dir.path(), stream, 2);
    // No commit by time: the Parquet rows stay staged until the stop.
    let cloud = Container::start(
        dir.path(),
        "stop",
        &moto.endpoint,
        stream,
        ConfigBy::Env,
        |c| {
            c.replace("commit_interval_ms = 2000", "commit_interval_ms = 600000")
                .replace("commit_idle_ms = 1000", "commit_idle_ms = 600000")
        },
    );
    wait_for("both leases held", Duration::from_secs(30), || {
        (cloud.metric("fieldlink_cloud_leases_held") == 2.0).then_some(())
    });
    let mut agents = agents(dir.path(), 1, &broker, &moto, stream);
    let acked = publish_numbered(broker.port, 1000, 1000.0, 0, dir.path());
    agents[0].stop();
    // Timestream lands as records are read; Parquet waits for the shard's commit.
    wait_for(
        "every reading in Timestream",
        Duration::from_secs(60),
        || {
            let got = landed_numbers(&landed(&moto, stream), "timestream");
            acked.iter().all(|n| got.contains(n)).then_some(())
        },
    );
    let staged = landed(&moto, stream);
    assert!(
        landed_numbers(&staged, "parquet").is_empty(),
        "Parquet written before the stop"
    );

    let timeout = 20;
    let (took, code) = cloud.stop(timeout);
    let log = cloud.logs();
    assert_eq!(code, 0, "exit code; log:\n{log}");
    assert!(
        took < Duration::from_secs(timeout.into()),
        "stop took {took:?}"
    );
    assert!(
        log.contains("shutdown requested"),
        "SIGTERM not seen:\n{log}"
    );
    // Written at the stop into the landing area; one compaction round (the host's binary, same configuration)
    // publishes them: each reading once (Timestream too).
    let at_stop = landed(&moto, stream);
    assert_eq!(
        at_stop["landing_rows"].as_u64(),
        Some(acked.len() as u64),
        "the stop wrote the staged rows: {at_stop}"
    );
    let config = dir.path().join("compact.toml");
    std::fs::write(
        &config,
        cloud_toml(
            free_port(),
            &moto.endpoint,
            stream,
            "compact",
            &format!("s3://{CLOUD_BUCKET}/{stream}"),
            "magnetic_store_writes = true",
        ),
    )
    .unwrap();
    compact_once(&config);
    let v = landed(&moto, stream);
    for sink in ["parquet", "timestream"] {
        let problem = exactly_once(&acked, &landed_numbers(&v, sink));
        assert!(problem.is_empty(), "after podman stop, {sink}: {problem}");
    }
    // Leases released, checkpoints committed (none pending).
    let (rt, table) = lease_table(&moto, &format!("leases-{stream}"));
    let leases = rt.block_on(table.list()).unwrap();
    assert_eq!(leases.len(), 2);
    for l in &leases {
        assert_eq!(l.owner, None, "{l:?}");
        assert_eq!(l.pending, None, "{l:?}");
    }
    assert!(
        leases
            .iter()
            .any(|l| l.checkpoint != fieldlink_cloud::lease::TRIM_HORIZON),
        "no checkpoint moved: {leases:?}"
    );
    eprintln!(
        "podman stop -t {timeout}: exit 0 after {took:?}; {} staged readings written to Parquet, 2 leases released",
        acked.len()
    );
}

#[test]
fn two_containers_share_four_shards_and_the_survivor_takes_over_after_podman_kill() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "container-kill";
    let (broker, moto) = services(dir.path(), stream, 4);
    let a = Container::start(
        dir.path(),
        "a",
        &moto.endpoint,
        stream,
        ConfigBy::File,
        |c| c,
    );
    wait_for("a to take all four shards", Duration::from_secs(30), || {
        (a.metric("fieldlink_cloud_leases_held") == 4.0).then_some(())
    });
    let b = Container::start(
        dir.path(),
        "b",
        &moto.endpoint,
        stream,
        ConfigBy::Env,
        |c| c,
    );
    wait_for("the leases shared 2 and 2", Duration::from_secs(30), || {
        (a.metric("fieldlink_cloud_leases_held") == 2.0
            && b.metric("fieldlink_cloud_leases_held") == 2.0)
            .then_some(())
    });
    let mut agents = agents(dir.path(), 4, &broker, &moto, stream);
    let publisher =
        NumberedPublisher::spawn(broker.port, "crash", 0, 4000, 500.0, 0, dir.path(), 1);
    wait_for("a to checkpoint twice", Duration::from_secs(60), || {
        (a.metric("fieldlink_cloud_checkpoints_total") >= 2.0).then_some(())
    });
    a.kill9();
    let killed = Instant::now();
    let takeover = wait_for("b to hold all four shards", Duration::from_secs(60), || {
        (b.metric("fieldlink_cloud_leases_held") == 4.0).then(|| killed.elapsed())
    });
    let acked = publisher.finish(Duration::from_secs(120));
    assert!(
        acked.len() >= 3800,
        "the broker acknowledged {}",
        acked.len()
    );
    assert_numbers_landed_once(
        &moto,
        stream,
        &acked,
        Duration::from_secs(120),
        "two containers, one killed",
    );
    for agent in &mut agents {
        agent.stop();
    }
    let (_, code) = b.stop(30);
    assert_eq!(code, 0, "exit code of b; log:\n{}", b.logs());
    eprintln!(
        "two containers, four shards: b held all four {takeover:?} after podman kill -s KILL of a (3 s leases); \
         {} readings landed once",
        acked.len()
    );
}
