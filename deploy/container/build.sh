#!/usr/bin/env bash
# Builds the fieldlink-cloud container images with podman from the static binaries deploy/build-static.sh made:
# one image per architecture (FROM scratch: the binary and Debian's CA bundle, user 65532, OCI labels) and a
# manifest list over them; with --out, the list with its images as one OCI archive. No RUN step, so images for an
# architecture this machine cannot execute (arm64 here: no binfmt_misc) are built all the same.
#
#   deploy/container/build.sh [--profile P] [--arch amd64,arm64] [--name NAME] [--out DIR]
#
# --profile  the cargo profile whose binaries to take: target/<triple>/<P>/fieldlink-cloud (default release)
# --arch     comma-separated (default amd64,arm64)
# --name     image name (default localhost/fieldlink-cloud); tags NAME:<version>-<arch>, list NAME:<version>
# --out      write DIR/fieldlink-cloud-<version>.oci.tar (the list and every image; `skopeo copy --all` or
#            `podman load` take it)
# Prints one line per image: its reference and size.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF="$PWD/deploy/container/containers.conf"

profile=release arches=amd64,arm64 name=localhost/fieldlink-cloud out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --arch) arches=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "container/build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
source=$(sed -n '/^\[workspace.package\]/,/^\[/s/^repository = "\(.*\)"/\1/p' Cargo.toml)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && ! git diff --quiet HEAD 2>/dev/null; then revision="$revision-dirty"; fi
bundle=/etc/ssl/certs/ca-certificates.crt   # Debian's ca-certificates
[ -s "$bundle" ] || { echo "container/build.sh: $bundle missing (apt-get install ca-certificates)" >&2; exit 1; }

list="$name:$version"
podman manifest exists "$list" 2>/dev/null && podman manifest rm "$list" >/dev/null
podman manifest create "$list" >/dev/null
IFS=, read -ra want <<< "$arches"
for arch in "${want[@]}"; do
  case "$arch" in
    amd64) triple=x86_64-unknown-linux-musl ;;
    arm64) triple=aarch64-unknown-linux-musl ;;
    *) echo "container/build.sh: no static target for $arch" >&2; exit 2 ;;
  esac
  binary="target/$triple/$profile/fieldlink-cloud"
  [ -x "$binary" ] || { echo "container/build.sh: $binary missing (deploy/build-static.sh --profile $profile)" >&2; exit 1; }
  if readelf -lW "$binary" | grep -q 'INTERP'; then
    echo "container/build.sh: $binary is not static" >&2; exit 1
  fi
  ctx="target/container/$arch"
  rm -rf "$ctx" && mkdir -p "$ctx"
  cp "$binary" "$ctx/fieldlink-cloud"
  cp "$bundle" "$ctx/ca-certificates.crt"
  mkdir -p "$ctx/tmp"   # the compactor's work_dir (/tmp/fieldlink-compaction): writable by the image's user
  tag="$name:$version-$arch"
  podman build -q --platform "linux/$arch" -f deploy/container/Containerfile \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" --build-arg SOURCE="$source" \
    -t "$tag" "$ctx" >/dev/null
  podman manifest add "$list" "containers-storage:$tag" >/dev/null
  echo "$tag $(podman image inspect --format '{{.Size}}' "$tag") bytes"
done
if [ -n "$out" ]; then
  mkdir -p "$out"
  archive="$out/fieldlink-cloud-$version.oci.tar"
  rm -f "$archive"
  podman manifest push --all --quiet "$list" "oci-archive:$archive:$list" >/dev/null
  echo "$archive $(stat -c %s "$archive") bytes"
fi
