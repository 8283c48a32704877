#!/usr/bin/env bash
# The one command that runs every check and test (CI runs exactly this through .ci/run):
# installs what is missing, then formatting, clippy with warnings as errors, the unit, integration and
# end-to-end tests against real Mosquitto and moto server, the static builds for x86_64, aarch64 and armv7 (run
# under qemu-user and in the cloud's container image by the tests), their Debian packages and tarballs.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
# A clean run (CI's fresh clone) gains nothing from incremental compilation and its cache takes ~4 GB of
# disk beside ~5 GB of artifacts; a developer re-running this can export CARGO_INCREMENTAL=1.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
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

step "static builds: binaries, packages, container images (profile ci-static; the tests run them)"
deploy/build-static.sh --profile ci-static

step "tests"
cargo test --workspace --locked

step "wire format and agent unit tests on aarch64 (static), under qemu-user"
PATH="$PWD/.venv/bin:$PATH" cargo-zigbuild test --locked --profile ci-static --target aarch64-unknown-linux-musl \
  -p fieldlink-proto -p fieldlink-agent --lib --tests

step "the packages and images of the static builds"
for spec in x86_64:amd64:X86-64 aarch64:arm64:AArch64 armv7:armhf:ARM; do
  IFS=: read -r cpu arch machine <<< "$spec"
  deb=$(ls target/dist/fieldlink-agent_*_"$arch".deb)
  got=$(dpkg-deb --field "$deb" Architecture)
  [ "$got" = "$arch" ] || { echo "$deb: Architecture $got, expected $arch"; exit 1; }
  depends=$(dpkg-deb --field "$deb" Depends)
  case "$arch" in
    armhf) [ "$depends" = "libc6 (>= 2.28)" ] || { echo "$deb: Depends '$depends'"; exit 1; } ;;
    *) [ -z "$depends" ] || { echo "$deb: Depends '$depends' (static binary)"; exit 1; } ;;
  esac
  mkdir -p target/deb-check
  dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/fieldlink-agent > target/deb-check/agent.bin
  readelf -h target/deb-check/agent.bin | grep -Eq "Machine:.*[[:space:]]$machine\$" \
    || { echo "$deb: the binary is not $machine"; readelf -h target/deb-check/agent.bin; exit 1; }
  tarball=$(ls target/dist/fieldlink-agent-*-"$cpu".tar.gz)
  tar -xzOf "$tarball" --wildcards '*/fieldlink-agent' | cmp - target/deb-check/agent.bin \
    || { echo "$tarball: not the binary of $deb"; exit 1; }
  echo "$deb: $arch, ${depends:-no Depends}, $machine binary; $tarball holds the same binary"
done
for arch in amd64 arm64; do
  export CONTAINERS_CONF="$PWD/deploy/container/containers.conf"
  got=$(podman image inspect --format '{{.Architecture}} {{.Config.User}}' "localhost/fieldlink-cloud:$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)-$arch")
  [ "$got" = "$arch 65532:65532" ] || { echo "image $arch: $got"; exit 1; }
done
ls -l target/dist

step "fuzz the wire-format decoder (30 s)"
deploy/fuzz.sh 30

step "all checks passed"
