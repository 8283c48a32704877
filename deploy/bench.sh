#!/usr/bin/env bash
# The benchmark: pipeline readings/s on one core (the dataset and 1,000 dense series, with the bytes the buffer
# writes per reading), bytes per reading on the wire (and wire format v1 against v2: bytes
# per reading in 24 KiB records and in 1-second batches beside sorted CSV + zstd, the series table's share,
# encode/decode readings/s on one core with zstd's share; tests/src/bin/wire-size.rs), payload mapping of 10-field
# messages (JSON, line protocol), MQTT ingest with durable acks (1- and 10-field JSON)
# next to a bare subscriber on the same broker, the agent's peak RSS at 10,000 readings/s, and Modbus
# points/s of the coalesced plan next to a naive one-request-per-point poller; the cloud's decode + Parquet
# readings/s on one core next to pyarrow writing the same readings.
# Usage: deploy/bench.sh     (release build; starts its own Mosquitto and moto server)
# The RSS figure alone: target/release/bench rss; after a 2 s stall of the agent: FIELDLINK_BENCH_RSS_STALL_S=2
# target/release/bench rss (options and what the RSS is made of: docs/memory.md).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh --no-cross
cargo build --release --locked -p fieldlink-agent -p fieldlink-e2e --bins -q
target/release/wire-size
target/release/bench
target/release/modbus-bench
target/release/cloud-bench
