#!/usr/bin/env bash
# Records which functions the agent runs and writes deploy/hot-text/agent.order, the list agent/build.rs lays out
# first in the shipped static builds (so the kernel keeps ~3 MiB of code resident instead of ~5.5 on x86_64: docs/memory.md).
#
#   deploy/hot-text.sh
#
# Run it after a toolchain or dependency update, or a large change of the agent; commit agent.order. Takes ~6 min:
#   1. the trace build: the shipped profile (release, x86_64 musl, exactly what build-static.sh builds, so symbol
#      names match) linked with deploy/hot-text/trace.ld, every function on its own 64 KiB, not stripped;
#   2. `bench rss` twice on it (75 s at 10,000 readings/s; then with a 2 s stall, for the catch-up's code), each
#      writing the code pages mapped in the agent just before it stops;
#   3. deploy/hot-text/order.py: the functions with a mapped page, in link order;
#   4. a check: the shipped build with the new list, not stripped: every listed function is in it, in .text.hot.
# Needs no root; needs what the benchmark needs (deploy/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
target=x86_64-unknown-linux-musl
bin=target/$target/release/fieldlink-agent
work=$(mktemp -d /tmp/hot-text.XXXXXX)
trap 'rm -rf "$work"' EXIT

echo "hot-text: 1. trace build"
# -C strip=none after the profile's strip: cargo's own flags (and so the symbols' hashes) stay the shipped ones.
FIELDLINK_HOT_TEXT=0 cargo-zigbuild rustc --locked --release --target "$target" -p fieldlink-agent \
  --bin fieldlink-agent -- -C strip=none -C "link-arg=-Wl,-T,$PWD/deploy/hot-text/trace.ld"
cp "$bin" "$work/fieldlink-agent"
CARGO_PROFILE_RELEASE_LTO=false cargo build --locked --release -p fieldlink-e2e --bin bench

echo "hot-text: 2. traced runs"
FIELDLINK_BENCH_AGENT="$work/fieldlink-agent" FIELDLINK_BENCH_TEXT_PAGES="$work/steady.pages" \
  target/release/bench rss
FIELDLINK_BENCH_AGENT="$work/fieldlink-agent" FIELDLINK_BENCH_TEXT_PAGES="$work/stall.pages" \
  FIELDLINK_BENCH_RSS_STALL_S=2 target/release/bench rss

echo "hot-text: 3. the list"
HOT_TEXT_PROVENANCE="$(printf 'traced %s on %s from %s (%s, %s)' "$(date -u +%F)" "$target" \
  "$(git rev-parse --short HEAD)" "$(rustc -V)" "Cargo.lock $(sha256sum Cargo.lock | cut -c1-12)")" \
  python3 deploy/hot-text/order.py "$work/fieldlink-agent" deploy/hot-text/agent.order \
  "$work/steady.pages" "$work/stall.pages"

echo "hot-text: 4. check"
cargo-zigbuild rustc --locked --release --target "$target" -p fieldlink-agent --bin fieldlink-agent -- \
  -C strip=none
python3 - "$bin" deploy/hot-text/agent.order <<'PY'
import subprocess, sys
binary, order = sys.argv[1:]
sections = subprocess.run(["readelf", "-SW", binary], check=True, capture_output=True, text=True).stdout
hot = next(l.split() for l in sections.splitlines() if " .text.hot " in l)
lo = int(hot[hot.index(".text.hot") + 2], 16); hi = lo + int(hot[hot.index(".text.hot") + 4], 16)
want = {l.strip() for l in open(order) if l.strip() and not l.startswith(("#", "warm "))}
inside = outside = 0
for line in subprocess.run(["nm", "--defined-only", binary], check=True, capture_output=True, text=True).stdout.splitlines():
    f = line.split()
    if len(f) == 3 and f[2] in want:
        want.discard(f[2])
        if lo <= int(f[0], 16) < hi: inside += 1
        else: outside += 1; print("hot-text: outside .text.hot:", f[2])
print(f"hot-text: .text.hot {(hi - lo) / 1024:.0f} KiB; {inside} listed functions in it, {outside} outside, "
      f"{len(want)} not in the binary")
sys.exit(1 if outside or want or not inside else 0)
PY
echo "hot-text: done; the shipped build (deploy/build-static.sh) now uses deploy/hot-text/agent.order"
