#!/usr/bin/env python3
"""A Sparkplug B edge node (pysparkplug encodes and decodes, paho-mqtt carries) that was born before the host
application (fieldlink) connected, and answers Rebirth requests.

Usage: sparkplug_edge_node.py PORT BORN_FILE GO_FILE OUT_FILE
1. Publishes NBIRTH + DBIRTH (QoS 1), writes BORN_FILE.
2. Waits for GO_FILE (the agent is subscribed), then publishes three alias-only DDATA messages (values 1, 2, 3): an
   agent that missed the births cannot map them.
3. On the first NCMD `Node Control/Rebirth` = true it publishes NBIRTH + DBIRTH again (at T+10) and a DDATA (value
   10 at T+11).
4. Five seconds after the first rebirth it writes OUT_FILE (JSON: every NCMD it got, decoded, and the timestamps it
   used) and exits; exits 1 if no NCMD came within 30 s.
"""
import json
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pysparkplug as spb

port, born, go, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
M, D = spb.Metric, spb.DataType
G, NODE, DEV = "plant", "gw9", "pump"
T = int(time.time() * 1000) - 60_000  # a minute ago: inside the agent's timestamp bounds
bd = M(timestamp=T, name="bdSeq", datatype=D.UINT64, value=0)
seq = 0
commands = []
got_rebirth = threading.Event()


def next_seq():
    global seq
    s = seq
    seq = (seq + 1) % 256
    return s


def births(c, ts):
    global seq
    seq = 0
    c.publish(f"spBv1.0/{G}/NBIRTH/{NODE}", spb.NBirth(timestamp=ts, seq=next_seq(), metrics=(
        bd, M(timestamp=ts, name="uptime", datatype=D.INT64, value=ts - T, alias=1),
    )).encode(), qos=1).wait_for_publish(10)
    c.publish(f"spBv1.0/{G}/DBIRTH/{NODE}/{DEV}", spb.DBirth(timestamp=ts, seq=next_seq(), metrics=(
        M(timestamp=ts, name="temp", datatype=D.DOUBLE, value=20.0, alias=2),
    )).encode(), qos=1).wait_for_publish(10)


def ddata(c, ts, value):
    c.publish(f"spBv1.0/{G}/DDATA/{NODE}/{DEV}", spb.DData(timestamp=ts, seq=next_seq(), metrics=(
        M(timestamp=ts, name=None, datatype=D.DOUBLE, value=value, alias=2),
    )).encode(), qos=1)


def on_message(client, userdata, msg):
    cmd = spb.NCmd.decode(msg.payload)
    metrics = [[m.name, m.datatype.name, m.value] for m in cmd.metrics]
    commands.append({"topic": msg.topic, "timestamp": cmd.timestamp, "metrics": metrics})
    if ["Node Control/Rebirth", "BOOLEAN", True] in metrics:
        got_rebirth.set()  # answered by the main thread (a callback must not wait for its own acknowledgements)


c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sparkplug-edge-gw9")
c.on_message = on_message
c.connect("127.0.0.1", port, keepalive=30)
c.loop_start()
c.subscribe(f"spBv1.0/{G}/NCMD/{NODE}", qos=0)
births(c, T)
open(born, "w").write("born")
deadline = time.time() + 30
while not os.path.exists(go):
    if time.time() > deadline:
        sys.exit("no go")
    time.sleep(0.05)
for i in range(3):
    ddata(c, T + 2 + i, float(i + 1))
if not got_rebirth.wait(30):
    sys.exit(f"no rebirth request within 30 s; commands: {commands}")
births(c, T + 10)
ddata(c, T + 11, 10.0)
time.sleep(5)  # further requests within the agent's interval would be a fault
c.loop_stop()
c.disconnect()
with open(out + ".tmp", "w") as f:
    json.dump({"T": T, "commands": commands}, f)
os.replace(out + ".tmp", out)
