//! The agent's Debian package (`deploy/package-deb.sh`), built from the test build's binary and installed with the
//! real dpkg into a scratch root (`dpkg --root`, maintainer scripts run with `$DPKG_ROOT`): install, upgrade with
//! an edited configuration, remove, purge.
#![allow(clippy::unwrap_used)]

use fieldlink_e2e::{bin, root, run_ok as run};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn dpkg(scratch: &Path, args: &[&str]) -> String {
    run(Command::new("dpkg")
        .arg(format!("--root={}", scratch.display()))
        // Scripts run outside a chroot with $DPKG_ROOT set; libc6 is not "installed" in the scratch root.
        .args(["--force-script-chrootless", "--force-depends"])
        .args(args))
}

#[test]
fn the_deb_installs_upgrades_keeping_an_edited_config_removes_and_purges_keeping_the_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = bin("fieldlink-agent");
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

    // Fields: libc6's minimum is the newest GLIBC_ symbol version the binary needs (read here with objdump, the
    // script uses readelf).
    let field = |f: &str| run(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(f));
    assert_eq!(field("Architecture").trim(), "amd64");
    let needed = run(Command::new("objdump").arg("-T").arg(&agent))
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .map(|v| {
            v.split('.')
                .map(|n| n.parse::<u32>().unwrap())
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap();
    let needed = needed
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(".");
    assert_eq!(field("Depends").trim(), format!("libc6 (>= {needed})"));

    // Contents and modes.
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for (mode, path) in [
        ("-rwxr-xr-x root/root", "./usr/bin/fieldlink-agent"),
        (
            "-rw-r--r-- root/root",
            "./lib/systemd/system/fieldlink-agent.service",
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
    let said = dpkg(&scratch, &["-i", deb.to_str().unwrap()]);
    assert!(said.contains("edit /etc/fieldlink/agent.toml"), "{said}");

    // The system user and group, the configuration readable by root and that group only.
    let passwd = std::fs::read_to_string(scratch.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("fieldlink:"))
        .unwrap_or_else(|| panic!("no user fieldlink in {passwd:?}"));
    assert!(
        user.ends_with(":/var/lib/fieldlink:/usr/sbin/nologin"),
        "{user}"
    );
    let group = std::fs::read_to_string(scratch.join("etc/group")).unwrap();
    let gid: u32 = group
        .lines()
        .find_map(|l| l.strip_prefix("fieldlink:x:"))
        .and_then(|r| r.split(':').next())
        .unwrap()
        .parse()
        .unwrap();
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
    assert_eq!(
        std::fs::read(scratch.join("lib/systemd/system/fieldlink-agent.service")).unwrap(),
        std::fs::read(root().join("deploy/systemd/fieldlink-agent.service")).unwrap()
    );
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
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), edited);
    let passwd = std::fs::read_to_string(scratch.join("etc/passwd")).unwrap();
    assert_eq!(
        passwd
            .lines()
            .filter(|l| l.starts_with("fieldlink:"))
            .count(),
        1
    );

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
        "package: {} ({} bytes), libc6 >= {needed}; installed, upgraded with an edited conffile kept, removed, purged",
        deb.display(),
        std::fs::metadata(&deb).unwrap().len()
    );
}
