#!/usr/bin/env python3
"""Publishes readings from a ts_ms,series,value CSV (optionally gzipped) to MQTT with paho-mqtt (an independent
MQTT client), QoS 1, one JSON message per (device, ts): {"ts": ts_ms, "<measure>": value, ...} on topic
<device>, where device/measure split the series key at its last '/'. Waits for every PUBACK.

Usage: publish.py HOST PORT CSV LIMIT_READINGS [RATE_PER_S]
Prints the number of readings and messages published.
"""
import csv
import gzip
import json
import sys
import time

import paho.mqtt.client as mqtt

host, port, path, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rate = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
opener = gzip.open if path.endswith(".gz") else open
messages, readings = [], 0
with opener(path, "rt") as f:
    rows = csv.reader(f)
    next(rows)
    current = {}
    for ts, series, value in rows:
        if readings >= limit:
            break
        device, measure = series.rsplit("/", 1)
        key = (device, int(ts))
        if key not in current:
            current[key] = {"ts": int(ts)}
            messages.append((device, current[key]))
        current[key][measure] = float(value)
        readings += 1

client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fieldlink-test-publisher")
client.max_inflight_messages_set(1000)
client.max_queued_messages_set(0)
client.connect(host, port)
client.loop_start()
infos, start = [], time.monotonic()
for i, (topic, payload) in enumerate(messages):
    infos.append(client.publish(topic, json.dumps(payload), qos=1))
    if rate:
        ahead = (i + 1) / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
for info in infos:
    info.wait_for_publish(timeout=60)
    if not info.is_published():
        sys.exit("a message was not acknowledged by the broker")
client.disconnect()
client.loop_stop()
print(json.dumps({"readings": readings, "messages": len(messages), "seconds": round(time.monotonic() - start, 3)}))
