#!/usr/bin/env bash
# Starts or stops the local services fieldlink runs against, on free loopback ports:
#   Mosquitto (MQTT broker; config file with a large queue, no persistence) and moto server (Kinesis, Timestream,
#   S3, DynamoDB emulator). Run deploy/setup.sh first (the demo and test commands do).
# Usage:
#   deploy/services.sh start DIR   # starts both, writes DIR/services.env (MQTT_PORT, MOTO_ENDPOINT, pids), prints it
#   deploy/services.sh stop DIR    # stops what `start DIR` started
set -euo pipefail
cmd=${1:?usage: services.sh start|stop DIR}
dir=${2:?usage: services.sh start|stop DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
py="$root/.venv/bin/python"
mkdir -p "$dir"
env_file="$dir/services.env"

case "$cmd" in
start)
  free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
  mqtt_port=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\npersistence false\n' "$mqtt_port" > "$dir/mosquitto.conf"
  /usr/sbin/mosquitto -c "$dir/mosquitto.conf" > "$dir/mosquitto.log" 2>&1 &
  mosquitto_pid=$!
  "$root/.venv/bin/python" "$root/tests/python/moto_server.py" -H 127.0.0.1 -p 0 > "$dir/moto.log" 2>&1 &
  moto_pid=$!
  endpoint=""
  for _ in $(seq 200); do
    endpoint=$(grep -o "http://127.0.0.1:[0-9]*" "$dir/moto.log" 2>/dev/null | head -1 || true)
    [ -n "$endpoint" ] && break
    sleep 0.1
  done
  [ -n "$endpoint" ] || { echo "moto server did not start; see $dir/moto.log" >&2; kill $mosquitto_pid $moto_pid; exit 1; }
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$mqtt_port") 2>/dev/null && break; sleep 0.1; done
  cat > "$env_file" <<ENV
MQTT_PORT=$mqtt_port
MOTO_ENDPOINT=$endpoint
MOSQUITTO_PID=$mosquitto_pid
MOTO_PID=$moto_pid
ENV
  cat "$env_file"
  ;;
stop)
  [ -f "$env_file" ] || exit 0
  # shellcheck disable=SC1090
  . "$env_file"
  kill "$MOSQUITTO_PID" "$MOTO_PID" 2>/dev/null || true
  rm -f "$env_file"
  ;;
*)
  echo "usage: services.sh start|stop DIR" >&2
  exit 2
  ;;
esac
