#!/usr/bin/env python3
"""A reference subscriber: paho-mqtt with a persistent session (clean_session=False), QoS 1, reconnecting by itself,
recording the numbers `n` of crash/# messages it receives. Used to tell what the broker delivered from what fieldlink
did with it.

Usage: subscribe_numbered.py HOST PORT READY_FILE OUT_FILE SECONDS
Writes READY_FILE once subscribed; after SECONDS writes the received numbers to OUT_FILE
(atomically), one per line, and exits.
"""
import json
import os
import sys
import time

import paho.mqtt.client as mqtt

host, port, ready, out, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
got = set()


def on_connect(client, userdata, flags, reason_code, properties=None):
    client.subscribe("crash/#", qos=1)


def on_subscribe(client, userdata, mid, reason_codes, properties=None):
    open(ready, "w").write("subscribed")


def on_message(client, userdata, msg):
    got.add(json.loads(msg.payload)["n"])


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fieldlink-reference-subscriber", clean_session=False)
client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
client.reconnect_delay_set(min_delay=0.1, max_delay=1)
client.connect(host, port, keepalive=5)
client.loop_start()
time.sleep(seconds)
client.loop_stop()
with open(out + ".tmp", "w") as f:
    f.write("\n".join(str(n) for n in sorted(got)))
os.replace(out + ".tmp", out)
