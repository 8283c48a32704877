#!/usr/bin/env python3
"""Publishes uniquely numbered readings at QoS 1 (FIELDLINK_PUBLISH_QOS=2: QoS 2) with paho-mqtt and records which
ones the broker acknowledged (PUBACK, or PUBCOMP at QoS 2).

Usage: publish_numbered.py HOST PORT COUNT RATE_PER_S ACKED_FILE [PAD_BYTES [START [PREFIX]]]
Message i (START <= i < START + COUNT, START default 0) goes to topic PREFIX/dev<i % 10> (PREFIX default crash) as
{"ts": 1772431200000 + i, "n": i} (plus a "pad" string of PAD_BYTES random characters if PAD_BYTES > 0). When done, ACKED_FILE holds the numbers whose PUBACK arrived, one per line.
"""
import json
import os
import random
import string
import sys
import time

import paho.mqtt.client as mqtt

host, port, count, rate, acked_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
pad = int(sys.argv[6]) if len(sys.argv) > 6 else 0
first = int(sys.argv[7]) if len(sys.argv) > 7 else 0
prefix = sys.argv[8] if len(sys.argv) > 8 else "crash"
qos = int(os.environ.get("FIELDLINK_PUBLISH_QOS", "1"))
infos = []


def published(info):
    """Whether the broker acknowledged it; a message sent while disconnected (broker restart) never was."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False

client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fieldlink-numbered-{random.randrange(1 << 30)}")
# At QoS 2 no more in flight than Mosquitto takes from one publisher (its max_inflight_messages, 20): past that it
# drops an incoming QoS 2 message with PUBREC reason code 151 (quota exceeded), which an MQTT 3.1.1 publisher never
# sees, so it completes the exchange and counts as acknowledged a message no subscriber ever gets (a loaded machine
# hit it: the QoS 2 tests then waited for readings the broker had dropped).
client.max_inflight_messages_set(20 if qos == 2 else 100)
client.max_queued_messages_set(0)
client.connect(host, port)
client.loop_start()
start = time.monotonic()
for i in range(first, first + count):
    payload = {"ts": 1772431200000 + i, "n": i}
    if pad:
        payload["pad"] = "".join(random.choices(string.ascii_letters, k=pad))
    infos.append(client.publish(f"{prefix}/dev{i % 10}", json.dumps(payload), qos=qos))
    ahead = (i - first + 1) / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
deadline = time.monotonic() + 60
while not all(published(info) or info.rc != 0 for info in infos) and time.monotonic() < deadline:
    time.sleep(0.05)
acked = [first + k for k, info in enumerate(infos) if published(info)]
client.disconnect()
client.loop_stop()
with open(acked_path, "w") as f:
    f.write("\n".join(str(i) for i in acked))
print(json.dumps({"published": count, "acked": len(acked), "seconds": round(time.monotonic() - start, 2)}))
