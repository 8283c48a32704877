#!/usr/bin/env bash
# Builds the shipped artifacts: static binaries, Debian packages, tarballs and the cloud container images.
#
#   deploy/build-static.sh [--profile P] [--no-images]
#
# Binaries (cargo-zigbuild, zig as the C compiler and linker; deploy/setup.sh installs both pinned):
#   fieldlink-agent  x86_64-unknown-linux-musl, aarch64-unknown-linux-musl (fully static),
#                    armv7-unknown-linux-gnueabihf against glibc 2.28 (no musl standard library for armv7 is
#                    available to us: rustup's armv7-unknown-linux-musleabihf download fails here)
#   fieldlink-cloud  x86_64-unknown-linux-musl, aarch64-unknown-linux-musl (fully static)
# each checked: a static one has no program interpreter and no NEEDED entry; the armv7 one needs no GLIBC_ symbol
# newer than 2.28. Then into target/dist/: a .deb and a tarball per agent architecture
# (deploy/package-deb.sh, deploy/package-tar.sh) and, unless --no-images, the amd64 and arm64 images of the cloud in
# one manifest list with its OCI archive (deploy/container/build.sh).
#
# --profile  release (default: what ships: opt-level s, fat LTO, stripped) or ci-static (what the tests run: no LTO,
#            16 codegen units, opt-level 1; minutes faster per target on 2 cores)
# Prints what it built with sizes and the seconds each step took.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"   # cargo-zigbuild and zig (pip packages ziglang, cargo-zigbuild)

profile=release images=1
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --no-images) images=0; shift ;;
    *) echo "build-static: unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v cargo-zigbuild >/dev/null || { echo "build-static: cargo-zigbuild missing: run deploy/setup.sh" >&2; exit 1; }
dist=target/dist
mkdir -p "$dist"
t0=$(date +%s)
took() { local now; now=$(date +%s); echo "build-static: $* took $((now - t0)) s"; t0=$now; }

# triple (for cargo-zigbuild) : packages
builds=(
  "x86_64-unknown-linux-musl:fieldlink-agent fieldlink-cloud"
  "aarch64-unknown-linux-musl:fieldlink-agent fieldlink-cloud"
  "armv7-unknown-linux-gnueabihf.2.28:fieldlink-agent"
)
for b in "${builds[@]}"; do
  zig_triple=${b%%:*}
  triple=${zig_triple%.2.28}
  pkgs=()
  for p in ${b#*:}; do pkgs+=(-p "$p"); done
  cargo zigbuild --locked --profile "$profile" --target "$zig_triple" "${pkgs[@]}" --bins
  for p in ${b#*:}; do
    bin="target/$triple/$profile/$p"
    if [ "$triple" = armv7-unknown-linux-gnueabihf ]; then
      newest=$(readelf -W --version-info "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
      [ "$(printf '%s\n2.28\n' "$newest" | sort -V | tail -1)" = 2.28 ] \
        || { echo "build-static: $bin needs glibc $newest (> 2.28)" >&2; exit 1; }
      echo "$bin: dynamic, glibc >= $newest, $(stat -c %s "$bin") bytes"
    else
      if readelf -lW "$bin" | grep -q INTERP || readelf -dW "$bin" | grep -q NEEDED; then
        echo "build-static: $bin is not static:" >&2; readelf -lW "$bin" | grep -A1 INTERP >&2 || true
        readelf -dW "$bin" | grep NEEDED >&2 || true; exit 1
      fi
      echo "$bin: static, $(stat -c %s "$bin") bytes"
    fi
    if [ "$p" = fieldlink-agent ]; then
      # agent/build.rs laid the functions the agent runs out first (deploy/hot-text/agent.order): check it did.
      hot=$(readelf -SW "$bin" | sed -n 's/.* \.text\.hot  *PROGBITS  *[0-9a-f]*  *[0-9a-f]*  *\([0-9a-f]*\) .*/\1/p')
      [ -n "$hot" ] && [ $((16#$hot)) -gt 1048576 ] \
        || { echo "build-static: $bin has no .text.hot of its hot functions (agent/build.rs)" >&2; exit 1; }
      echo "$bin: .text.hot $((16#$hot / 1024)) KiB"
    fi
  done
  took "$triple ($profile)"
done

for triple in x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf; do
  bin="target/$triple/$profile/fieldlink-agent"
  deb=$(deploy/package-deb.sh --target "$triple" --binary "$bin" --out "$dist")
  tarball=$(deploy/package-tar.sh --target "$triple" --binary "$bin" --out "$dist")
  echo "$deb: $(stat -c %s "$deb") bytes, $(dpkg-deb --field "$deb" Depends | sed 's/^$/no Depends/')"
  echo "$tarball: $(stat -c %s "$tarball") bytes"
done
took "packages"

if [ $images = 1 ]; then
  deploy/container/build.sh --profile "$profile" --out "$dist"
  took "container images"
fi
