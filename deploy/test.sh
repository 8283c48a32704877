#!/usr/bin/env bash
# The one command that runs every check and test (CI runs exactly this through .ci/run):
# installs what is missing, then formatting, clippy with warnings as errors, the unit, integration and
# end-to-end tests against real Mosquitto and moto server, cross-builds of the agent for ARM and their Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - start ))s)"; }

step "setup"
deploy/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cfn-lint deploy/aws/*.yaml (the AWS stack; informational checks too)"
.venv/bin/cfn-lint --include-checks I -- deploy/aws/*.yaml

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build binaries (the end-to-end tests run them)"
cargo build --workspace --bins --locked

step "cross-build the agent for aarch64 and armv7 (tests/tests/arm.rs runs them under qemu-user)"
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
  cargo build -p fieldlink-agent --bin fieldlink-agent --locked --target "$t"
  file "target/$t/debug/fieldlink-agent" 2>/dev/null || ls -l "target/$t/debug/fieldlink-agent"
done

step "tests"
cargo test --workspace --locked

step "wire format and agent unit tests on aarch64, under qemu-user"
cargo test --locked --target aarch64-unknown-linux-gnu -p fieldlink-proto -p fieldlink-agent --lib --tests

step "Debian packages of the cross-built agents (the amd64 one is installed by tests/tests/package.rs)"
for spec in aarch64-unknown-linux-gnu:arm64:AArch64 armv7-unknown-linux-gnueabihf:armhf:ARM; do
  IFS=: read -r triple arch machine <<< "$spec"
  deb=$(deploy/package-deb.sh --target "$triple" --binary "target/$triple/debug/fieldlink-agent" --out target/deb-check)
  got=$(dpkg-deb --field "$deb" Architecture)
  [ "$got" = "$arch" ] || { echo "$deb: Architecture $got, expected $arch"; exit 1; }
  dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/fieldlink-agent > target/deb-check/agent.bin
  readelf -h target/deb-check/agent.bin | grep -q "Machine: *$machine\$" \
    || { echo "$deb: the binary is not $machine"; readelf -h target/deb-check/agent.bin; exit 1; }
  echo "$deb: $arch, $(dpkg-deb --field "$deb" Depends), $machine binary"
done

step "fuzz the wire-format decoder (30 s)"
deploy/fuzz.sh 30

step "all checks passed"
