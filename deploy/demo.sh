#!/usr/bin/env bash
# The local demo, on real local services it starts itself:
#   Mosquitto (MQTT broker) and moto server (Kinesis, Timestream, S3 emulator) on free loopback ports
#   (deploy/services.sh),
#   fieldlink-cloud (Kinesis -> Timestream on moto + one Parquet file per hour in .demo/bronze),
#   fieldlink-agent (MQTT -> SQLite buffer -> Kinesis),
#   then publishes readings from ../shared/datasets/sensors.csv.gz with paho-mqtt and shows what landed where.
#   With --influx the cloud also writes to VictoriaMetrics (Debian's victoria-metrics, started here) through its
#   InfluxDB sink (line protocol on /api/v2/write, as to Timestream for InfluxDB), and the demo counts what it holds.
# Usage: deploy/demo.sh [READINGS] [--influx]     (default 50000; everything is stopped at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
influx=0
args=()
for a in "$@"; do
  if [ "$a" = "--influx" ]; then influx=1; else args+=("$a"); fi
done
readings=${args[0]:-50000}
dataset=${FIELDLINK_DATASET:-../shared/datasets/sensors.csv.gz}
demo=.demo
rm -rf "$demo" && mkdir -p "$demo/bronze"

deploy/setup.sh --no-cross
cargo build --workspace --bins --locked -q
py=.venv/bin/python
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; deploy/services.sh stop "$demo"; wait 2>/dev/null || true; }
trap cleanup EXIT

deploy/services.sh start "$demo" > /dev/null
# shellcheck disable=SC1091
. "$demo/services.env"
mqtt_port=$MQTT_PORT
endpoint=$MOTO_ENDPOINT
echo "demo: mosquitto on 127.0.0.1:$mqtt_port, moto server on $endpoint"
"$py" tests/python/aws_setup.py "$endpoint" fieldlink-demo 2 fieldlink readings fieldlink-bronze

agent_port=$(free_port); cloud_port=$(free_port)
cat > "$demo/agent.toml" <<TOML
agent_id = "edge-demo-1"
metrics_listen = "127.0.0.1:$agent_port"
[aws]
endpoint_url = "$endpoint"
[buffer]
path = "$demo/agent-buffer.db"
[batch]
linger_ms = 1000
[kinesis]
stream = "fieldlink-demo"
[[mqtt]]
name = "local"
host = "127.0.0.1"
port = $mqtt_port
[[mqtt.topics]]
filter = "#"
qos = 1
TOML
cat > "$demo/cloud.toml" <<TOML
metrics_listen = "127.0.0.1:$cloud_port"
[log]
format = "text"
[aws]
endpoint_url = "$endpoint"
[kinesis]
stream = "fieldlink-demo"
idle_poll_ms = 200
commit_idle_ms = 2000
[leases]
lease_ms = 3000
[timestream]
database = "fieldlink"
table = "readings"
magnetic_store_writes = true   # the dataset is months old (memory store: 6 h)
[parquet]
location = "$demo/bronze"
TOML
if [ $influx = 1 ]; then
  vm_port=$(free_port)
  victoria-metrics -httpListenAddr="127.0.0.1:$vm_port" -storageDataPath="$demo/victoria-metrics" \
    -retentionPeriod=100y -dedup.minScrapeInterval=1ms -loggerLevel=WARN > "$demo/victoria-metrics.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -s "http://127.0.0.1:$vm_port/health" >/dev/null 2>&1 && break; sleep 0.1; done
  echo "demo: victoria-metrics on 127.0.0.1:$vm_port (the InfluxDB sink writes line protocol to /api/v2/write)"
  cat >> "$demo/cloud.toml" <<TOML
[influxdb]
url = "http://127.0.0.1:$vm_port"
api = "v2"
org = "demo"
bucket = "demo"
token_env = "DEMO_INFLUX_TOKEN"
TOML
  export DEMO_INFLUX_TOKEN=demo
fi
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
target/debug/fieldlink-agent check-config --config "$demo/agent.toml"
target/debug/fieldlink-cloud check-config --config "$demo/cloud.toml"
target/debug/fieldlink-cloud run --config "$demo/cloud.toml" > "$demo/cloud.log" 2>&1 & cloud_pid=$!; pids+=($cloud_pid)
target/debug/fieldlink-agent run --config "$demo/agent.toml" > "$demo/agent.log" 2>&1 & agent_pid=$!; pids+=($agent_pid)

metric() { curl -s "http://127.0.0.1:$1/metrics" 2>/dev/null | awk -v m="$2" '$1==m {print $2}'; }
for _ in $(seq 300); do curl -s "http://127.0.0.1:$agent_port/health" 2>/dev/null | grep -q "mqtt:local: ok" && break; sleep 0.1; done

echo "demo: publishing $readings readings from $dataset (paho-mqtt, QoS 1)"
"$py" tests/python/publish.py 127.0.0.1 "$mqtt_port" "$dataset" "$readings"
for _ in $(seq 600); do [ "$(metric "$agent_port" fieldlink_readings_sent_total)" = "$readings" ] && break; sleep 0.1; done
for _ in $(seq 600); do [ "$(metric "$cloud_port" fieldlink_cloud_readings_landed_total)" = "$readings" ] && break; sleep 0.1; done

echo "demo: agent metrics"
curl -s "http://127.0.0.1:$agent_port/metrics" | grep -E "^fieldlink_(readings|records|batches|record_bytes|buffer_pending_readings)" | sed 's/^/  /'
echo "demo: stopping (SIGTERM: the cloud writes its staged Parquet files, the agent drains its buffer)"
kill -TERM "$cloud_pid" "$agent_pid"; wait "$cloud_pid" "$agent_pid" || true
echo "demo: publishing the closed hours of the landing area as one bronze file per hour (compact --once)"
target/debug/fieldlink-cloud compact --once --config "$demo/cloud.toml" >> "$demo/cloud.log" 2>&1
"$py" deploy/demo_report.py "$endpoint" fieldlink readings "$demo/bronze" "$readings"
if [ $influx = 1 ]; then
  curl -s "http://127.0.0.1:$vm_port/internal/force_flush" >/dev/null
  points=$(curl -s "http://127.0.0.1:$vm_port/api/v1/export" --data-urlencode 'match[]={__name__=~"fieldlink_.*"}' \
    --data-urlencode 'start=0' | "$py" -c 'import json,sys; print(sum(len(json.loads(l)["values"]) for l in sys.stdin if l.strip()))')
  echo "InfluxDB sink (VictoriaMetrics): $points points for $readings published readings: $([ "$points" = "$readings" ] && echo OK || echo MISMATCH)"
  [ "$points" = "$readings" ]
fi
