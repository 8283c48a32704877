#!/usr/bin/env python3
"""The windowed-aggregate end-to-end test's data and its reference computation (tests/tests/windows.rs).

Usage:
  window_feed.py plan CSV OUT_DIR SEED   -> writes OUT_DIR/phase1.json, OUT_DIR/phase2.json (lists of
                                            [topic, payload]) and prints the reference as JSON
  window_feed.py publish HOST PORT FILE RATE  -> publishes FILE's messages with paho-mqtt, QoS 1, at RATE per
                                            second, waits for every PUBACK

The plan takes the first hour of the shared dataset for plant/meter/000..019/value (rule "meter": sizes 60 s and
300 s, every function, lateness 30 s, late = raw, keep_raw = false) and plant/meter-b/000..004/value (rule
"meter-b": 60 s, count and mean, lateness 30 s, late = drop, keep_raw = true). Phase 1 is the hour without 3
held-back readings per series from its first half, in event-time order, then shuffled within blocks of 40
messages (< 20 s of event time per series, below the lateness: no shuffled reading can be late whatever the
agent's seal boundaries). Phase 2, published once phase 1 is sealed, is the held-back readings (late: their
windows closed long before) and one reading per series at hour + 340 s that closes every window of the hour.

The reference is computed with pyarrow from the readings the agent aggregates (every phase-1 reading and the
closers; not the late ones): windows aligned to the epoch, grouped by (series, size, start); count/min/max/first/
last exactly, sum with pyarrow's sum, mean = sum / count. Only windows whose end is at or before the series'
watermark (newest - lateness) are closed: "after_phase1" uses phase 1's newest, "derived" the closer's.
"""
import gzip
import csv
import json
import random
import sys

import pyarrow as pa
import pyarrow.compute as pc

T0 = 1772431200000
HOUR = 3_600_000
LATENESS = 30_000
RULES = {
    "meter": {"sizes": [60_000, 300_000], "funcs": ["count", "min", "max", "mean", "sum", "first", "last"]},
    "meter-b": {"sizes": [60_000], "funcs": ["count", "mean"]},
}


def rule_of(series):
    return "meter-b" if series.startswith("plant/meter-b/") else "meter"


def suffix(size):
    return f"{size // 1000}s" if size % 1000 == 0 else f"{size}ms"


def plan(path, out_dir, seed):
    rng = random.Random(seed)
    wanted = {f"plant/meter/{i:03d}/value" for i in range(20)} | {f"plant/meter-b/{i:03d}/value" for i in range(5)}
    rows = []
    with gzip.open(path, "rt") as f:
        r = csv.reader(f)
        next(r)
        for ts, series, value in r:
            ts = int(ts)
            if series in wanted and T0 <= ts < T0 + HOUR:
                rows.append((series, ts, float(value)))
    rows.sort(key=lambda x: (x[1], x[0]))
    late, phase1 = [], []
    by_series = {}
    for row in rows:
        by_series.setdefault(row[0], []).append(row)
    held = set()
    for s, rs in by_series.items():
        for row in rng.sample(rs[10: len(rs) // 2], 3):
            held.add(row)
    for row in rows:
        (late if row in held else phase1).append(row)
    # Shuffle within blocks of 40 consecutive messages.
    shuffled = []
    for i in range(0, len(phase1), 40):
        block = phase1[i: i + 40]
        rng.shuffle(block)
        shuffled.extend(block)
    closers = [(s, T0 + HOUR + 340_000, 0.0) for s in sorted(by_series)]
    rng.shuffle(late)

    def msg(row):
        device, measure = row[0].rsplit("/", 1)
        return [device, json.dumps({"ts": row[1], measure: row[2]})]

    with open(f"{out_dir}/phase1.json", "w") as f:
        json.dump([msg(r) for r in shuffled], f)
    with open(f"{out_dir}/phase2.json", "w") as f:
        json.dump([msg(r) for r in late + closers], f)

    newest1 = {s: max(ts for _, ts, _ in rs if (s, ts, _) not in held) for s, rs in by_series.items()}
    aggregated = phase1 + closers
    derived = reference(aggregated, {s: ts for s, ts, _ in closers})
    after1 = reference(phase1, newest1)
    print(json.dumps({
        "seed": seed,
        "readings": len(rows) + len(closers),
        "phase1": len(phase1),
        "late": [[s, ts, repr(v)] for s, ts, v in sorted(late)],
        "raw_kept": [[s, ts, repr(v)] for s, ts, v in sorted(rows + closers) if rule_of(s) == "meter-b"],
        "after_phase1": len(after1),
        "derived": derived,
    }))


def reference(readings, newest):
    """[[derived series, start, function, value repr]] of every closed window."""
    t = pa.table({
        "series": [r[0] for r in readings],
        "ts": pa.array([r[1] for r in readings], pa.int64()),
        "v": pa.array([r[2] for r in readings], pa.float64()),
    })
    # Event-time order (first/last by event time); the summation order of the agent is release order, the same
    # per series except across seals, hence the tolerance on sum and mean in the test.
    t = t.sort_by([("series", "ascending"), ("ts", "ascending")])
    out = []
    for rule, spec in RULES.items():
        mask = pc.starts_with(t["series"], "plant/meter-b/" if rule == "meter-b" else "plant/meter/")
        rt = t.filter(mask)
        for size in spec["sizes"]:
            start = pc.multiply(pc.floor(pc.divide(pc.cast(rt["ts"], pa.float64()), float(size))).cast(pa.int64()), size)
            g = rt.append_column("start", start).group_by(["series", "start"], use_threads=False).aggregate(
                [("v", "count"), ("v", "min"), ("v", "max"), ("v", "sum"), ("v", "first"), ("v", "last")])
            for row in g.to_pylist():
                s, st = row["series"], row["start"]
                if st + size > newest[s] - LATENESS:
                    continue  # still open
                vals = {
                    "count": str(row["v_count"]),
                    "min": repr(row["v_min"]),
                    "max": repr(row["v_max"]),
                    "sum": repr(row["v_sum"]),
                    "mean": repr(row["v_sum"] / row["v_count"]),
                    "first": repr(row["v_first"]),
                    "last": repr(row["v_last"]),
                }
                for fn in spec["funcs"]:
                    out.append([f"{s}/{fn}_{suffix(size)}", st, fn, vals[fn]])
    out.sort()
    return out


def publish(host, port, path, rate):
    import time
    import paho.mqtt.client as mqtt

    with open(path) as f:
        messages = json.load(f)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fieldlink-windows-{random.randrange(1 << 30)}")
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    infos, start = [], time.monotonic()
    for i, (topic, payload) in enumerate(messages):
        infos.append(client.publish(topic, payload, qos=1))
        ahead = (i + 1) / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    for info in infos:
        info.wait_for_publish(timeout=120)
        if not info.is_published():
            sys.exit("a message was not acknowledged by the broker")
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"messages": len(messages), "seconds": round(time.monotonic() - start, 2)}))


if __name__ == "__main__":
    if sys.argv[1] == "plan":
        plan(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        publish(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
