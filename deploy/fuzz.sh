#!/usr/bin/env bash
# Fuzzes the wire-format decoder (versions 1 and 2: records, and bodies directly) with cargo-fuzz (libFuzzer).
# Usage: deploy/fuzz.sh [SECONDS]   (default 300)
# Stable toolchain: RUSTC_BOOTSTRAP enables the coverage flags cargo-fuzz passes; no sanitizer is needed because
# fieldlink-proto contains no unsafe code. libFuzzer's -malloc_limit_mb fails the run on any allocation above
# 64 MB, which the decoder's limits forbid.
set -euo pipefail
cd "$(dirname "$0")/../proto"
seconds=${1:-300}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
mkdir -p fuzz/corpus/decode
for v in "" _v2; do
  python3 -c "import sys;open('fuzz/corpus/decode/sample$v','wb').write(bytes.fromhex(open('tests/sample_record$v.hex').read().strip()))"
done
RUSTC_BOOTSTRAP=1 cargo fuzz run -s none decode -- -max_total_time="$seconds" -rss_limit_mb=1024 -malloc_limit_mb=64 2>&1 | tail -n 3
