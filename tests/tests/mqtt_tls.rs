//! MQTT over TLS and mutual TLS against a real Mosquitto configured with a test CA made here (openssl): readings
//! arrive over TLS and mutual TLS; a client without a certificate, with a certificate from another CA, or
//! trusting another CA is refused and never delivers; `check-config` names a bad TLS file.

#![allow(clippy::unwrap_used)]

use fieldlink_e2e::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` making a new P-256 key `<name>.key` and, with `extra`, a certificate or a request.
fn new_key(dir: &Path, name: &str, extra: &[&str]) {
    let (key, subj) = (format!("{name}.key"), format!("/CN={name}"));
    let mut args = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &key,
        "-subj",
        &subj,
    ];
    args.extend_from_slice(extra);
    openssl(dir, &args);
}

/// A self-signed CA `ca` (`<ca>.crt`, `<ca>.key`).
fn ca(dir: &Path, ca: &str) {
    let crt = format!("{ca}.crt");
    new_key(
        dir,
        ca,
        &[
            "-x509",
            "-out",
            &crt,
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A key and a certificate for `name` signed by `ca`, with the X.509 extensions in `ext`.
fn signed(dir: &Path, ca: &str, name: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    new_key(dir, name, &["-out", &format!("{name}.csr")]);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

struct Pki<'a> {
    dir: &'a Path,
}

impl Pki<'_> {
    fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }
}

fn agent(dir: &Path, id: &str, port: u16, tls: &str) -> AgentProc {
    // Kinesis is not needed here: the agent buffers; readings received are counted on commit.
    let a = AgentProc::new(dir, id, port, "http://127.0.0.1:9", "none", "", "");
    a.append_config(&format!("[mqtt.tls]\n{tls}\n"));
    a
}

#[test]
fn tls_and_mutual_tls_deliver_and_clients_without_a_valid_certificate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "test-ca");
    ca(d, "other-ca");
    let server_ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n";
    let client_ext = "extendedKeyUsage=clientAuth\n";
    signed(d, "test-ca", "broker", server_ext);
    signed(d, "test-ca", "edge-1", client_ext);
    signed(d, "other-ca", "intruder", client_ext);
    let pki = Pki { dir: d };

    let (tls_port, mtls_port) = (free_port(), free_port());
    let listener = |port: u16, require: bool| {
        format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require}\n",
            pki.path("test-ca.crt"),
            pki.path("broker.crt"),
            pki.path("broker.key")
        )
    };
    let broker = Mosquitto::start_with(
        d,
        // Run as root (CI), Mosquitto would switch to its own user before reading the keys in our private
        // temporary directory; `user root` keeps it (ignored when not started as root).
        &format!(
            "user root\n{}{}",
            listener(tls_port, false),
            listener(mtls_port, true)
        ),
    );
    wait_for("the TLS listeners", Duration::from_secs(10), || {
        (std::net::TcpStream::connect(("127.0.0.1", mtls_port)).is_ok()).then_some(())
    });

    let ca_only = format!("ca_file = \"{}\"", pki.path("test-ca.crt"));
    let mutual = format!(
        "{ca_only}\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
        pki.path("edge-1.crt"),
        pki.path("edge-1.key")
    );
    let intruder = format!(
        "{ca_only}\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
        pki.path("intruder.crt"),
        pki.path("intruder.key")
    );
    let wrong_ca = format!("ca_file = \"{}\"", pki.path("other-ca.crt"));

    // Good: server verification only, and mutual TLS.
    let mut tls = agent(d, "tls", tls_port, &ca_only);
    let mut mtls = agent(d, "mtls", mtls_port, &mutual);
    tls.start();
    mtls.start();
    // Refused: no client certificate, a certificate from another CA, trusting another CA.
    let mut refused: Vec<AgentProc> = [
        ("nocert", mtls_port, &ca_only),
        ("intruder", mtls_port, &intruder),
        ("wrongca", tls_port, &wrong_ca),
    ]
    .into_iter()
    .map(|(id, port, t)| {
        let mut a = agent(d, id, port, t);
        a.spawn();
        a
    })
    .collect();

    let acked = publish_numbered(broker.port, 300, 2000.0, 0, d);
    assert_eq!(acked.len(), 300);
    for a in [&tls, &mtls] {
        wait_for("every reading over TLS", Duration::from_secs(20), || {
            (a.metric("fieldlink_readings_received_total") == 300.0).then_some(())
        });
    }
    for a in &refused {
        wait_for(
            "the refused client to retry",
            Duration::from_secs(20),
            || {
                let m = http_get(a.metrics_port, "/metrics")?;
                (metric_with(&m, "fieldlink_mqtt_reconnects_total", "local")? >= 2.0).then_some(())
            },
        );
        let health = http_get(a.metrics_port, "/health").unwrap();
        assert!(!health.contains("mqtt:local: ok"), "{health}");
        assert_eq!(a.metric("fieldlink_readings_received_total"), 0.0);
    }
    for a in refused.iter_mut().chain([&mut tls, &mut mtls]) {
        a.stop();
    }

    // check-config loads the files and names the field of a bad one.
    let bad = agent(
        d,
        "bad",
        mtls_port,
        &format!(
            "{ca_only}\nclient_cert_file = \"{}\"\nclient_key_file = \"/nonexistent/key.pem\"",
            pki.path("edge-1.crt")
        ),
    );
    let out = Command::new(bin("fieldlink-agent"))
        .arg("check-config")
        .arg("--config")
        .arg(&bad.config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("mqtt[0].tls: client_key_file /nonexistent/key.pem"),
        "{text}"
    );
}
