#!/usr/bin/env python3
"""Publishes one of every payload format to two brokers and prints the readings the agent must produce.

Broker A gets MQTT 3.1.1 publishes: a JSON object on a tagged topic, InfluxDB line protocol, a bare number.
Broker B gets MQTT 5 publishes: a JSON object, and a Sparkplug B session encoded by pysparkplug (an independent
implementation of Sparkplug B on Google's protobuf runtime): NBIRTH, DBIRTH with aliases, DDATA by alias only,
NDATA, DDEATH and NDEATH (which mark the device's and node's series stale), plus an NCMD the agent passes over.

Usage: publish_formats.py PORT_A PORT_B
Prints a JSON list of expected readings: [series, ts_ms or null (arrival time), value as kinesis_dump prints it,
quality, [[tag, value], ...]].
"""
import json
import sys
import time

import paho.mqtt.client as mqtt
import pysparkplug as spb

port_a, port_b = int(sys.argv[1]), int(sys.argv[2])
T = int(time.time() * 1000) - 60_000  # a minute ago: inside the agent's timestamp bounds
expected = []


def client(port, protocol, cid):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=protocol)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def publish_all(c, messages):
    infos = [c.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(timeout=30)
        if not info.is_published():
            sys.exit("a message was not acknowledged by the broker")
    c.disconnect()
    c.loop_stop()


def f(x):
    return repr(float(x))


# ---- broker A, MQTT 3.1.1 ----
a = []
a.append(("site/muc/line/3/pump-7", json.dumps({"ts": T, "flow": 1.5, "on": True, "mode": "auto", "n": {"p": 2}, "debug": "x"})))
tags = [["line", "3"], ["site", "muc"]]
expected += [
    ["site/muc/line/3/pump-7/flow", T, f(1.5), 0, tags],
    ["site/muc/line/3/pump-7/on", T, "true", 0, tags],
    ["site/muc/line/3/pump-7/mode", T, "auto", 0, tags],
    ["site/muc/line/3/pump-7/n/p", T, f(2), 0, tags],
]  # "debug" is excluded by the configuration
ns = T * 1_000_000
a.append(("influx/plant", f"weather,site=muc,loc=roof temp=21.5,hum=40i,ok=t {ns}\nweather,site=ham temp=19,state=\"rain, light\" {ns + 1_000_000}\n"))
expected += [
    ["weather/temp", T, f(21.5), 0, [["loc", "roof"], ["site", "muc"]]],
    ["weather/hum", T, "40", 0, [["loc", "roof"], ["site", "muc"]]],
    ["weather/ok", T, "true", 0, [["loc", "roof"], ["site", "muc"]]],
    ["weather/temp", T + 1, f(19), 0, [["site", "ham"]]],
    ["weather/state", T + 1, "rain, light", 0, [["site", "ham"]]],
]
a.append(("plain/temp", "23.25"))
expected.append(["plain/temp", None, f(23.25), 0, []])
publish_all(client(port_a, mqtt.MQTTv311, "formats-a"), a)

# ---- broker B, MQTT 5 ----
b = [("v5/dev1", json.dumps({"ts": T, "v": 7}))]
expected.append(["v5/dev1/v", T, f(7), 0, []])

M = spb.Metric
D = spb.DataType
g, node, dev = "plant", "gw1", "pump"
bd = M(timestamp=T, name="bdSeq", datatype=D.UINT64, value=0)
b.append((f"spBv1.0/{g}/NBIRTH/{node}", spb.NBirth(timestamp=T, seq=0, metrics=(
    bd,
    M(timestamp=T, name="uptime", datatype=D.INT64, value=100, alias=1),
)).encode()))
expected.append(["plant/gw1/uptime", T, "100", 0, []])
b.append((f"spBv1.0/{g}/DBIRTH/{node}/{dev}", spb.DBirth(timestamp=T + 1, seq=1, metrics=(
    M(timestamp=T + 1, name="temp", datatype=D.FLOAT, value=21.5, alias=2),
    M(timestamp=T + 1, name="level", datatype=D.INT16, value=-2, alias=3),
    M(timestamp=T + 1, name="running", datatype=D.BOOLEAN, value=True, alias=4),
    M(timestamp=T + 1, name="label", datatype=D.STRING, value="P-7", alias=5),
)).encode()))
expected += [
    ["plant/gw1/pump/temp", T + 1, f(21.5), 0, []],
    ["plant/gw1/pump/level", T + 1, "-2", 0, []],
    ["plant/gw1/pump/running", T + 1, "true", 0, []],
    ["plant/gw1/pump/label", T + 1, "P-7", 0, []],
]
# Data by alias only (pysparkplug leaves out names and data types in DATA messages).
b.append((f"spBv1.0/{g}/DDATA/{node}/{dev}", spb.DData(timestamp=T + 2, seq=2, metrics=(
    M(timestamp=T + 2, name=None, datatype=D.FLOAT, value=22.0, alias=2),
    M(timestamp=T + 2, name=None, datatype=D.INT16, value=40, alias=3),
)).encode()))
expected += [
    ["plant/gw1/pump/temp", T + 2, f(22.0), 0, []],
    ["plant/gw1/pump/level", T + 2, "40", 0, []],
]
b.append((f"spBv1.0/{g}/NDATA/{node}", spb.NData(timestamp=T + 3, seq=3, metrics=(
    M(timestamp=T + 3, name=None, datatype=D.INT64, value=160, alias=1),
)).encode()))
expected.append(["plant/gw1/uptime", T + 3, "160", 0, []])
# A command to the node is not data.
b.append((f"spBv1.0/{g}/NCMD/{node}", spb.NCmd(timestamp=T + 3, metrics=(
    M(timestamp=T + 3, name="Node Control/Rebirth", datatype=D.BOOLEAN, value=True),
)).encode()))
b.append((f"spBv1.0/{g}/DDEATH/{node}/{dev}", spb.DDeath(timestamp=T + 4, seq=4).encode()))
expected += [  # stale: the last values again, quality bad
    ["plant/gw1/pump/temp", T + 4, f(22.0), 2, []],
    ["plant/gw1/pump/level", T + 4, "40", 2, []],
    ["plant/gw1/pump/running", T + 4, "true", 2, []],
    ["plant/gw1/pump/label", T + 4, "P-7", 2, []],
]
b.append((f"spBv1.0/{g}/NDEATH/{node}", spb.NDeath(timestamp=T + 5, bd_seq_metric=bd).encode()))
expected.append(["plant/gw1/uptime", T + 5, "160", 2, []])
publish_all(client(port_b, mqtt.MQTTv5, "formats-b"), b)

print(json.dumps(expected))
