#!/usr/bin/env bash
# Installs what the demo and the tests need, skipping what is already there:
#   Debian: mosquitto, mosquitto-clients, socat, openssl (test CA for MQTT TLS), influxdb (1.x) and
#           victoria-metrics (the InfluxDB sink's e2e tests), systemd (systemd-analyze verifies
#           the shipped unit), podman and runc (builds and runs the cloud's container image), qemu-user-static
#           and Debian's armhf libraries (run the ARM builds)
#   rustup: x86_64-unknown-linux-musl, aarch64-unknown-linux-musl and armv7-unknown-linux-gnueabihf targets (the
#           static builds of deploy/build-static.sh), clippy, rustfmt
#   .venv:  the pinned Python packages of tests/python/requirements.txt (moto server, pyarrow, zstandard, paho-mqtt;
#           ziglang and cargo-zigbuild, the C compiler and linker of the static builds)
# Usage: deploy/setup.sh [--no-cross]
set -euo pipefail
cd "$(dirname "$0")/.."
cross=1
[ "${1:-}" = "--no-cross" ] && cross=0

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pkgs=(mosquitto mosquitto-clients socat openssl systemd influxdb victoria-metrics libfaketime)
[ $cross = 1 ] && pkgs+=(libc6-armhf-cross qemu-user-static podman runc netavark aardvark-dns ca-certificates)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo_ apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if command -v rustup >/dev/null; then
  have=$(rustup component list --installed 2>/dev/null || true)
  for c in clippy rustfmt; do echo "$have" | grep -q "^$c" || rustup component add "$c"; done
  if [ $cross = 1 ]; then
    targets=$(rustup target list --installed)
    for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf; do
      echo "$targets" | grep -qx "$t" || rustup target add "$t"
    done
  fi
fi

req=tests/python/requirements.txt
if [ ! -x .venv/bin/python ] || ! cmp -s "$req" .venv/.requirements 2>/dev/null; then
  echo "setup: creating .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r "$req"
  # Lines "# nodeps: <package>==<version>": packages whose declared dependencies conflict with the pins above.
  sed -n 's/^# nodeps: //p' "$req" | xargs -r .venv/bin/pip install -q --disable-pip-version-check --no-deps
  cp "$req" .venv/.requirements
fi
echo "setup: ok"
