#!/usr/bin/env bash
# Builds the agent's Debian package (amd64, arm64 or armhf) with dpkg-deb alone, no packaging tool to install.
#
#   deploy/package-deb.sh [--target TRIPLE] [--binary PATH] [--out DIR]
#
# The shipped packages carry the static binaries deploy/build-static.sh builds (x86_64-unknown-linux-musl,
# aarch64-unknown-linux-musl: no libc dependency at all; armv7-unknown-linux-gnueabihf: glibc >= 2.28, as no musl
# standard library for armv7 is available to us). Without --binary it builds the release binary for TRIPLE, default
# this machine's (a glibc build). Prints the path of the .deb (default directory target/deb/).
#
# The package installs /usr/bin/fieldlink-agent, the systemd units (deploy/systemd/: the agent, and the drain, never
# enabled), /etc/fieldlink/agent.toml (a conffile: the documented example, `check-config` clean) and the README. Its
# postinst creates the system user `fieldlink`, makes the configuration readable by root and that group only, and
# enables the service without starting it (the example configuration names no real broker or stream); an upgrade
# restarts a running agent (SIGTERM: it seals and drains, then the new binary resumes from the same buffer).
# Removing the package stops the agent; purging keeps /var/lib/fieldlink, which may hold readings not yet sent. A
# static binary (no program interpreter, no shared libraries) depends on nothing; for a dynamic one libc6's minimum
# version is read off the binary's GLIBC_ symbol versions.
set -euo pipefail
cd "$(dirname "$0")/.."

target="" binary="" out="target/deb"
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "package-deb: unknown argument $1" >&2; exit 2 ;;
  esac
done
triple=${target:-$(rustc -vV | sed -n 's/^host: //p')}
case "$triple" in
  x86_64-unknown-linux-gnu|x86_64-unknown-linux-musl) arch=amd64 ;;
  aarch64-unknown-linux-gnu|aarch64-unknown-linux-musl) arch=arm64 ;;
  armv7-unknown-linux-gnueabihf) arch=armhf ;;
  *) echo "package-deb: no Debian architecture for $triple" >&2; exit 2 ;;
esac
if [ -z "$binary" ]; then
  cargo build --release --locked -p fieldlink-agent --bin fieldlink-agent ${target:+--target "$target"} >&2
  binary="target/${target:+$target/}release/fieldlink-agent"
fi
[ -x "$binary" ] || { echo "package-deb: $binary is not an executable" >&2; exit 2; }

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "package-deb: no version in Cargo.toml" >&2; exit 1; }
if readelf -lW "$binary" | grep -q INTERP || readelf -dW "$binary" | grep -q NEEDED; then
  glibc=$(readelf -W --version-info "$binary" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
  [ -n "$glibc" ] || { echo "package-deb: a dynamic binary without GLIBC_ symbol versions" >&2; exit 1; }
  depends="Depends: libc6 (>= $glibc)"
else
  depends=""   # static: needs nothing from the system
fi

root=$(mktemp -d)
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT
install -D -m 0755 "$binary" "$root/usr/bin/fieldlink-agent"
install -D -m 0644 deploy/systemd/fieldlink-agent.service "$root/lib/systemd/system/fieldlink-agent.service"
install -D -m 0644 deploy/systemd/fieldlink-agent-drain.service "$root/lib/systemd/system/fieldlink-agent-drain.service"
install -D -m 0644 deploy/agent.example.toml "$root/etc/fieldlink/agent.toml"
install -D -m 0644 README.md "$root/usr/share/doc/fieldlink-agent/README.md"
printf 'fieldlink-agent\nLicense: Apache-2.0\n' > "$root/usr/share/doc/fieldlink-agent/copyright"
mkdir -p "$root/DEBIAN"
installed_kib=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: fieldlink-agent
Version: $version
Architecture: $arch
Maintainer: fieldlink developers <fieldlink@example.invalid>
${depends:+$depends
}Section: net
Priority: optional
Installed-Size: $installed_kib
Homepage: https://example.invalid/fieldlink
Description: edge agent: MQTT and Modbus readings to AWS Kinesis, buffered on disk
 fieldlink-agent reads sensors and meters over MQTT (3.1.1 and 5, TLS, Sparkplug B)
 and Modbus TCP/RTU, keeps every acknowledged reading in a SQLite buffer until
 Kinesis accepted it, and sends deduplicated, ordered, zstd-compressed batches.
 Runs as the systemd service fieldlink-agent (Type=notify, watchdog).
EOF
echo /etc/fieldlink/agent.toml > "$root/DEBIAN/conffiles"

# Maintainer scripts. With $DPKG_ROOT set (an install into another root, e.g. the tests) they act on that root
# and leave the running system's systemd alone.
cat > "$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if [ -n "${DPKG_ROOT:-}" ]; then
        grep -q '^fieldlink:' "$DPKG_ROOT/etc/passwd" && exists=1 || exists=0
    else
        getent passwd fieldlink >/dev/null && exists=1 || exists=0
    fi
    if [ "$exists" = 0 ]; then
        if [ -n "${DPKG_ROOT:-}" ]; then
            useradd --prefix "$DPKG_ROOT" --system --user-group --home-dir /var/lib/fieldlink --no-create-home \
                --shell /usr/sbin/nologin fieldlink
        else
            useradd --system --user-group --home-dir /var/lib/fieldlink --no-create-home \
                --shell /usr/sbin/nologin fieldlink
        fi
    fi
    gid=$(sed -n 's/^fieldlink:[^:]*:\([0-9]*\):.*/\1/p' "${DPKG_ROOT:-}/etc/group")
    chown "root:$gid" "${DPKG_ROOT:-}/etc/fieldlink/agent.toml"
    chmod 0640 "${DPKG_ROOT:-}/etc/fieldlink/agent.toml"
    # An upgrade restarts a running agent only if the new version accepts the configuration: a refused one would
    # stop a working agent for good (ExecStartPre runs check-config). The running agent keeps the old version.
    accepted=1
    # Into another root, only if the binary runs here (it may be for another architecture); on this system, a
    # binary that does not run (a libc too old) is not restarted into either.
    if [ -n "$2" ] && ! "${DPKG_ROOT:-}/usr/bin/fieldlink-agent" --version >/dev/null 2>&1; then
        if [ -z "${DPKG_ROOT:-}" ]; then
            accepted=0
            echo "fieldlink-agent: NOT restarted: the new binary does not run on this system" >&2
        fi
    elif [ -n "$2" ]; then
        if ! problems=$("${DPKG_ROOT:-}/usr/bin/fieldlink-agent" check-config \
                --config "${DPKG_ROOT:-}/etc/fieldlink/agent.toml" 2>&1); then
            accepted=0
            echo "fieldlink-agent: NOT restarted: this version refuses /etc/fieldlink/agent.toml:" >&2
            echo "$problems" >&2
            echo "fieldlink-agent: a running agent keeps the old version until it restarts (then systemd retries" \
                "every 10 s); fix the configuration, check it with 'fieldlink-agent check-config'," \
                "then 'systemctl restart fieldlink-agent'." >&2
        fi
    fi
    if [ -z "${DPKG_ROOT:-}" ] && command -v systemctl >/dev/null; then
        if [ -d /run/systemd/system ]; then
            systemctl daemon-reload || true
        fi
        systemctl enable fieldlink-agent.service >/dev/null 2>&1 || true
        if [ -n "$2" ] && [ "$accepted" = 1 ] && [ -d /run/systemd/system ]; then
            systemctl try-restart fieldlink-agent.service || true
        fi
    fi
    if [ -z "$2" ]; then
        echo "fieldlink-agent: edit /etc/fieldlink/agent.toml, check it with 'fieldlink-agent check-config'," \
            "then 'systemctl start fieldlink-agent'."
    fi
fi
exit 0
EOF
cat > "$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
    systemctl stop fieldlink-agent.service || true
fi
exit 0
EOF
cat > "$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
    systemctl disable fieldlink-agent.service >/dev/null 2>&1 || true
    systemctl daemon-reload || true
fi
if [ "$1" = purge ] && [ -d "${DPKG_ROOT:-}/var/lib/fieldlink" ]; then
    echo "fieldlink-agent: kept ${DPKG_ROOT:-}/var/lib/fieldlink (the buffer may hold readings not yet sent)"
fi
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/fieldlink-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
