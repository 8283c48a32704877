#!/usr/bin/env python3
"""Publishes the crafted reading sequences of the alarm end-to-end test (tests/tests/alarms.rs) with paho-mqtt,
QoS 1, and prints the readings the agent must produce.

Usage: publish_alarm_sequences.py HOST PORT T0_MS
Event times are T0_MS plus offsets. Sequences:
- line3/robot-a/000 {"vib": f64}: crosses warning/critical with dwell times (hysteresis, on/off delays), some
  neighbours published in swapped order (out of order inside the reorder window);
- line3/robot-b/000 {"vib": int}: whole numbers across the same rule, also partly swapped;
- line3/oven/000 {"temp": f64}: a slow, then fast, then flat ramp (rate of change);
- plant/meter/000 {"kwh": f64}: gaps of 3 s and 7.75 s in event time, then nothing (stale);
- Sparkplug B plant/gw1/pump "pressure": birth, data, DDEATH (the agent marks it bad), rebirth, data.
Prints a JSON list [[series, ts_ms, [type, value], quality], ...] in publish order.
"""
import json
import sys

import paho.mqtt.client as mqtt
import pysparkplug as spb

host, port, t0 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
messages, expected = [], []


def swapped(seq, pairs):
    seq = list(seq)
    for i in pairs:
        seq[i], seq[i + 1] = seq[i + 1], seq[i]
    return seq


vib_a = [2.0, 3.0, 4.5, 4.6, 4.4, 4.7, 4.8, 5.0, 5.2, 8.5, 8.6, 8.2, 8.4, 8.3, 7.8, 7.6, 7.4, 7.0, 6.0, 3.8, 3.6,
         3.7, 3.9, 3.6, 3.4, 3.0, 2.0, 0.5, 0.7, 1.1, 1.3, 2.0, 4.2, 3.9, 4.3, 4.4, 4.5, 4.6, 4.9, 2.0, 2.0, 2.0, 2.0,
         2.0, 2.0, 2.0, 2.0, 2.0]
for i in swapped(range(len(vib_a)), [3, 10, 20, 30]):
    ts = t0 + 250 * i
    messages.append(("line3/robot-a/000", json.dumps({"ts": ts, "vib": vib_a[i]})))
    expected.append(["line3/robot-a/000/vib", ts, ["f64", repr(vib_a[i])], 0])

vib_b = [0, 5, 5, 5, 5, 9, 9, 9, 9, 9, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0]
for i in swapped(range(len(vib_b)), [1, 6, 12]):
    ts = t0 + 300 * i + 7
    messages.append(("line3/robot-b/000", json.dumps({"ts": ts, "vib": vib_b[i]})))
    expected.append(["line3/robot-b/000/vib", ts, ["f64", repr(float(vib_b[i]))], 0])  # JSON numbers are f64

temp = [20.0, 20.5, 21.0, 21.5, 22.0, 24.0, 27.0, 30.0, 33.0, 33.5, 34.0, 34.2, 34.3, 34.3, 34.3, 34.3, 34.3]
for i in swapped(range(len(temp)), [5]):
    ts = t0 + 500 * i + 3
    messages.append(("line3/oven/000", json.dumps({"ts": ts, "temp": temp[i]})))
    expected.append(["line3/oven/000/temp", ts, ["f64", repr(temp[i])], 0])

for k, off in enumerate([0, 500, 1000, 4000, 4250, 12000, 12250]):
    ts, v = t0 + off + 11, 100.0 + k
    messages.append(("plant/meter/000", json.dumps({"ts": ts, "kwh": v})))
    expected.append(["plant/meter/000/kwh", ts, ["f64", repr(v)], 0])

M, D = spb.Metric, spb.DataType
g, node, dev = "plant", "gw1", "pump"
bd = M(timestamp=t0, name="bdSeq", datatype=D.UINT64, value=0)
messages.append((f"spBv1.0/{g}/NBIRTH/{node}", spb.NBirth(timestamp=t0, seq=0, metrics=(bd,)).encode()))


def pressure(ts, seq, v, kind):
    metric = M(timestamp=ts, name="pressure", datatype=D.DOUBLE, value=v, alias=1)
    if kind == "DBIRTH":
        return (f"spBv1.0/{g}/DBIRTH/{node}/{dev}", spb.DBirth(timestamp=ts, seq=seq, metrics=(metric,)).encode())
    metric = M(timestamp=ts, name=None, datatype=D.DOUBLE, value=v, alias=1)
    return (f"spBv1.0/{g}/DDATA/{node}/{dev}", spb.DData(timestamp=ts, seq=seq, metrics=(metric,)).encode())


messages.append(pressure(t0 + 100, 1, 5.0, "DBIRTH"))
messages.append(pressure(t0 + 600, 2, 5.5, "DDATA"))
messages.append((f"spBv1.0/{g}/DDEATH/{node}/{dev}", spb.DDeath(timestamp=t0 + 1100, seq=3).encode()))
messages.append(pressure(t0 + 5000, 4, 5.2, "DBIRTH"))
messages.append(pressure(t0 + 5500, 5, 5.4, "DDATA"))
series = "plant/gw1/pump/pressure"
expected += [
    [series, t0 + 100, ["f64", repr(5.0)], 0],
    [series, t0 + 600, ["f64", repr(5.5)], 0],
    [series, t0 + 1100, ["f64", repr(5.5)], 2],  # the DDEATH: the last value again, quality bad
    [series, t0 + 5000, ["f64", repr(5.2)], 0],
    [series, t0 + 5500, ["f64", repr(5.4)], 0],
]

c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alarm-sequences")
c.connect(host, port)
c.loop_start()
infos = [c.publish(topic, payload, qos=1) for topic, payload in messages]
for info in infos:
    info.wait_for_publish(timeout=30)
    if not info.is_published():
        sys.exit("a message was not acknowledged by the broker")
c.disconnect()
c.loop_stop()
print(json.dumps(expected))
