#!/usr/bin/env bash
# The long crash test: SIGKILL the agent at random moments while numbered readings are published at QoS 1,
# then check that every reading the broker acknowledged is in Kinesis and every resent batch is byte-identical.
# Usage: deploy/crash-test.sh [ROUNDS]   (default 100; CI runs 20 as part of deploy/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh --no-cross
cargo build --workspace --bins --locked -q
FIELDLINK_CRASH_ROUNDS=${1:-100} cargo test --locked -p fieldlink-e2e --test delivery every_acknowledged_reading_survives_sigkill -- --nocapture
