#!/usr/bin/env bash
# Builds the agent's tarball for gateways without dpkg (Yocto, Buildroot, Alpine, any Linux with systemd or not):
#
#   deploy/package-tar.sh --target TRIPLE --binary PATH [--out DIR]
#
# Writes DIR/fieldlink-agent-<version>-<arch>.tar.gz (arch x86_64, aarch64 or armv7; default DIR target/dist) and
# prints its path. Inside, under fieldlink-agent-<version>-<arch>/: the binary, the systemd units
# (deploy/systemd/), the documented example configuration, and install.sh (deploy/install-agent.sh), which does
# what the .deb's maintainer scripts do: the system user `fieldlink`, /etc/fieldlink/agent.toml (never overwritten),
# /var/lib/fieldlink, the agent's unit enabled but not started (the drain's never enabled).
set -euo pipefail
cd "$(dirname "$0")/.."

target="" binary="" out="target/dist"
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "package-tar: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$target" in
  x86_64-*) arch=x86_64 ;;
  aarch64-*) arch=aarch64 ;;
  armv7-*) arch=armv7 ;;
  *) echo "package-tar: --target x86_64-…, aarch64-… or armv7-… required" >&2; exit 2 ;;
esac
[ -x "$binary" ] || { echo "package-tar: --binary $binary is not an executable" >&2; exit 2; }
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)

name="fieldlink-agent-$version-$arch"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
install -D -m 0755 "$binary" "$stage/$name/fieldlink-agent"
install -m 0644 deploy/systemd/fieldlink-agent.service "$stage/$name/fieldlink-agent.service"
install -m 0644 deploy/systemd/fieldlink-agent-drain.service "$stage/$name/fieldlink-agent-drain.service"
install -m 0644 deploy/agent.example.toml "$stage/$name/agent.example.toml"
install -m 0755 deploy/install-agent.sh "$stage/$name/install.sh"
mkdir -p "$out"
tarball="$out/$name.tar.gz"
# Reproducible: fixed owner, order and times.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$stage" -cf - "$name" | gzip -9n > "$tarball"
echo "$tarball"
