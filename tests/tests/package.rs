//! The agent's Debian package (`deploy/package-deb.sh`) and tarball (`deploy/package-tar.sh`), built from the
//! static x86_64 test build (`deploy/build-static.sh --profile ci-static`). The .deb is installed with the real dpkg
//! into a scratch root (`dpkg --root`, maintainer scripts run with `$DPKG_ROOT`): install, upgrade with an edited
//! configuration, remove, purge. The tarball's install.sh runs with `DESTDIR`: first install, then again over an
//! edited configuration.
#![allow(clippy::unwrap_used)]

use fieldlink_e2e::{root, run_ok as run, static_bin};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs a command that must succeed; its stdout and stderr.
fn said(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn dpkg(scratch: &Path, args: &[&str]) -> String {
    said(
        Command::new("dpkg")
            .arg(format!("--root={}", scratch.display()))
            // Scripts run outside a chroot with $DPKG_ROOT set; libc6 is not "installed" in the scratch root.
            .args(["--force-script-chrootless", "--force-depends"])
            .args(args),
    )
}

/// A configuration this version refuses (an unknown key), as an upgrade may meet one that an earlier version
/// accepted: the upgrade says so and does not restart the agent.
fn refused_config(conf: &Path) -> String {
    let text = std::fs::read_to_string(conf).unwrap();
    std::fs::write(
        conf,
        text.replacen("[buffer]", "[buffer]\nmax_bytez = 5", 1),
    )
    .unwrap();
    text
}

fn assert_not_restarted(said: &str) {
    assert!(
        said.contains("NOT restarted") && said.contains("max_bytez"),
        "{said}"
    );
}

/// `d/root` with empty account files and an empty dpkg database.
fn scratch_root(d: &Path) -> PathBuf {
    let scratch = d.join("root");
    for sub in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        std::fs::create_dir_all(scratch.join(sub)).unwrap();
    }
    for f in [
        "var/lib/dpkg/status",
        "etc/passwd",
        "etc/group",
        "etc/shadow",
        "etc/gshadow",
    ] {
        std::fs::write(scratch.join(f), "").unwrap();
    }
    scratch
}

/// The gid of group `fieldlink` in the root's /etc/group.
fn fieldlink_gid(scratch: &Path) -> u32 {
    let group = std::fs::read_to_string(scratch.join("etc/group")).unwrap();
    group
        .lines()
        .find_map(|l| l.strip_prefix("fieldlink:x:"))
        .and_then(|r| r.split(':').next())
        .unwrap_or_else(|| panic!("no group fieldlink in {group:?}"))
        .parse()
        .unwrap()
}

/// The root's passwd lines of user `fieldlink`.
fn fieldlink_users(scratch: &Path) -> Vec<String> {
    std::fs::read_to_string(scratch.join("etc/passwd"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("fieldlink:"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_deb_installs_upgrades_keeping_an_edited_config_removes_and_purges_keeping_the_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = static_bin("x86_64-unknown-linux-musl", "fieldlink-agent");
    let deb = run(Command::new(root().join("deploy/package-deb.sh"))
        .arg("--binary")
        .arg(&agent)
        .arg("--out")
        .arg(d.join("out")));
    let deb = PathBuf::from(deb.trim());
    assert!(
        deb.ends_with(format!(
            "fieldlink-agent_{}_amd64.deb",
            env!("CARGO_PKG_VERSION")
        )),
        "{deb:?}"
    );

    // A static binary: no Depends at all (it runs without any libc on the system).
    let field = |f: &str| run(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(f));
    assert_eq!(field("Architecture").trim(), "amd64");
    assert_eq!(field("Depends").trim(), "");
    let program_headers = run(Command::new("readelf").arg("-lW").arg(&agent));
    assert!(!program_headers.contains("INTERP"), "{program_headers}");

    // Contents and modes.
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for (mode, path) in [
        ("-rwxr-xr-x root/root", "./usr/bin/fieldlink-agent"),
        (
            "-rw-r--r-- root/root",
            "./lib/systemd/system/fieldlink-agent.service",
        ),
        (
            "-rw-r--r-- root/root",
            "./lib/systemd/system/fieldlink-agent-drain.service",
        ),
        ("-rw-r--r-- root/root", "./etc/fieldlink/agent.toml"),
        (
            "-rw-r--r-- root/root",
            "./usr/share/doc/fieldlink-agent/README.md",
        ),
    ] {
        assert!(
            contents
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{mode} {path} not in:\n{contents}"
        );
    }

    // A scratch root with an empty dpkg database and empty account files.
    let scratch = scratch_root(d);
    let said = dpkg(&scratch, &["-i", deb.to_str().unwrap()]);
    assert!(said.contains("edit /etc/fieldlink/agent.toml"), "{said}");

    // The system user and group, the configuration readable by root and that group only.
    let users = fieldlink_users(&scratch);
    assert_eq!(users.len(), 1, "{users:?}");
    assert!(
        users[0].ends_with(":/var/lib/fieldlink:/usr/sbin/nologin"),
        "{users:?}"
    );
    let gid = fieldlink_gid(&scratch);
    let conf = scratch.join("etc/fieldlink/agent.toml");
    let meta = std::fs::metadata(&conf).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o777),
        (0, gid, 0o640)
    );

    // The installed binary accepts the installed configuration, and the unit is the one in deploy/systemd/.
    let installed = scratch.join("usr/bin/fieldlink-agent");
    let checked = run(Command::new(&installed)
        .args(["check-config", "--config"])
        .arg(&conf));
    assert!(checked.contains(": OK"), "{checked}");
    for unit in ["fieldlink-agent.service", "fieldlink-agent-drain.service"] {
        assert_eq!(
            std::fs::read(scratch.join("lib/systemd/system").join(unit)).unwrap(),
            std::fs::read(root().join("deploy/systemd").join(unit)).unwrap(),
            "{unit}"
        );
    }
    let conffiles =
        std::fs::read_to_string(scratch.join("var/lib/dpkg/info/fieldlink-agent.conffiles"))
            .unwrap();
    assert_eq!(conffiles.trim(), "/etc/fieldlink/agent.toml");

    // Upgrade (the same version again): the operator's edit survives, the user is not created twice.
    let mut edited = std::fs::read_to_string(&conf).unwrap();
    edited.push_str("# site edit\n");
    std::fs::write(&conf, &edited).unwrap();
    let said = dpkg(&scratch, &["-i", deb.to_str().unwrap()]);
    assert!(!said.contains("edit /etc/fieldlink/agent.toml"), "{said}");
    assert!(!said.contains("NOT restarted"), "{said}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), edited);
    assert_eq!(fieldlink_users(&scratch).len(), 1);

    // An upgrade over a configuration the new version refuses: installed, not restarted, the problem named.
    let kept = refused_config(&conf);
    assert_not_restarted(&dpkg(&scratch, &["-i", deb.to_str().unwrap()]));
    std::fs::write(&conf, kept).unwrap();

    // Remove keeps the configuration; purge removes it but keeps the buffer directory (unsent readings).
    let state = scratch.join("var/lib/fieldlink");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("buffer.db"), "unsent").unwrap();
    dpkg(&scratch, &["--remove", "fieldlink-agent"]);
    assert!(!installed.exists());
    assert!(conf.exists());
    let said = dpkg(&scratch, &["--purge", "fieldlink-agent"]);
    assert!(!conf.exists());
    assert!(said.contains("kept"), "{said}");
    assert_eq!(
        std::fs::read_to_string(state.join("buffer.db")).unwrap(),
        "unsent"
    );
    eprintln!(
        "package: {} ({} bytes), static, no Depends; installed, upgraded with an edited conffile kept, removed, purged",
        deb.display(),
        std::fs::metadata(&deb).unwrap().len()
    );
}

#[test]
fn the_tarball_installs_into_a_root_and_a_second_install_keeps_the_edited_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = static_bin("x86_64-unknown-linux-musl", "fieldlink-agent");
    let tarball = run(Command::new(root().join("deploy/package-tar.sh"))
        .args(["--target", "x86_64-unknown-linux-musl", "--binary"])
        .arg(&agent)
        .arg("--out")
        .arg(d.join("out")));
    let tarball = PathBuf::from(tarball.trim());
    let name = format!("fieldlink-agent-{}-x86_64", env!("CARGO_PKG_VERSION"));
    assert!(tarball.ends_with(format!("{name}.tar.gz")), "{tarball:?}");
    let listing = run(Command::new("tar").arg("-tvzf").arg(&tarball));
    let mut files: Vec<(String, String)> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_owned(), f[f.len() - 1].to_owned())
        })
        .collect();
    files.sort();
    let want = |mode: &str, f: &str| (mode.to_owned(), format!("{name}/{f}"));
    let mut expected = vec![
        want("-rw-r--r--", "agent.example.toml"),
        want("-rw-r--r--", "fieldlink-agent.service"),
        want("-rw-r--r--", "fieldlink-agent-drain.service"),
        want("-rwxr-xr-x", "fieldlink-agent"),
        want("-rwxr-xr-x", "install.sh"),
    ];
    expected.sort();
    assert_eq!(files, expected, "{listing}");

    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(d));
    let scratch = scratch_root(d);
    let install = || said(Command::new(d.join(&name).join("install.sh")).env("DESTDIR", &scratch));
    let said = install();
    assert!(said.contains("edit /etc/fieldlink/agent.toml"), "{said}");

    // The binary, the unit, the user, the configuration (root:fieldlink 0640), the buffer directory.
    let installed = scratch.join("usr/bin/fieldlink-agent");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(&agent).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    for unit in ["fieldlink-agent.service", "fieldlink-agent-drain.service"] {
        assert_eq!(
            std::fs::read(scratch.join("etc/systemd/system").join(unit)).unwrap(),
            std::fs::read(root().join("deploy/systemd").join(unit)).unwrap(),
            "{unit}"
        );
    }
    let users = fieldlink_users(&scratch);
    assert_eq!(users.len(), 1, "{users:?}");
    assert!(
        users[0].ends_with(":/var/lib/fieldlink:/usr/sbin/nologin"),
        "{users:?}"
    );
    let uid: u32 = users[0].split(':').nth(2).unwrap().parse().unwrap();
    let gid = fieldlink_gid(&scratch);
    let conf = scratch.join("etc/fieldlink/agent.toml");
    let meta = std::fs::metadata(&conf).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o777),
        (0, gid, 0o640)
    );
    assert_eq!(
        std::fs::read(&conf).unwrap(),
        std::fs::read(root().join("deploy/agent.example.toml")).unwrap()
    );
    let state = std::fs::metadata(scratch.join("var/lib/fieldlink")).unwrap();
    assert_eq!(
        (state.uid(), state.gid(), state.permissions().mode() & 0o777),
        (uid, gid, 0o750)
    );
    let checked = run(Command::new(&installed)
        .args(["check-config", "--config"])
        .arg(&conf));
    assert!(checked.contains(": OK"), "{checked}");

    // Again (an upgrade): the edited configuration stays, the user is not created twice.
    let mut edited = std::fs::read_to_string(&conf).unwrap();
    edited.push_str("# site edit\n");
    std::fs::write(&conf, &edited).unwrap();
    let said = install();
    assert!(said.contains("kept /etc/fieldlink/agent.toml"), "{said}");
    assert!(!said.contains("NOT restarted"), "{said}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), edited);
    assert_eq!(fieldlink_users(&scratch).len(), 1);
    // Over a configuration this version refuses: said, and the configuration left as it is.
    let kept = refused_config(&conf);
    let refused = std::fs::read_to_string(&conf).unwrap();
    assert_not_restarted(&install());
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), refused);
    std::fs::write(&conf, kept).unwrap();
    // A buffer kept from another install (another uid, as after a re-image) is given to the user.
    let buffer = scratch.join("var/lib/fieldlink/buffer.db");
    std::fs::write(&buffer, "unsent").unwrap();
    std::os::unix::fs::chown(&buffer, Some(uid + 1), Some(gid + 1)).unwrap();
    install();
    let meta = std::fs::metadata(&buffer).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    eprintln!(
        "tarball: {} ({} bytes) installed into a root and again over an edited configuration",
        tarball.display(),
        std::fs::metadata(&tarball).unwrap().len()
    );
}
