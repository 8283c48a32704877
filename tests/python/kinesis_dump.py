#!/usr/bin/env python3
"""Reads every record of a Kinesis stream on an emulator and decodes it with the independent decoder.

Usage: kinesis_dump.py ENDPOINT STREAM
Prints one JSON line per record: {"shard", "agent", "epoch", "seq", "sha256", "readings": [[series, ts_ms, value_repr, late, quality, [[tag, value], ...]], ...], "alarms": [event, ...], "arrival_ms"}
(alarm events as fieldlink_decode.py gives them; "alarms" is empty for a readings record; "arrival_ms" is the
record's ApproximateArrivalTimestamp in Unix ms)
"""
import hashlib
import json
import os
import sys

import boto3

sys.path.insert(0, os.path.dirname(__file__))
from fieldlink_decode import decode  # noqa: E402

endpoint, stream = sys.argv[1:3]
k = boto3.client("kinesis", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
for shard in k.list_shards(StreamName=stream)["Shards"]:
    sid = shard["ShardId"]
    it = k.get_shard_iterator(StreamName=stream, ShardId=sid, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    while it:
        resp = k.get_records(ShardIterator=it, Limit=10000)
        for r in resp["Records"]:
            data = r["Data"]
            b = decode(data)
            readings = []
            for si, ts, typ, v, q, late in b["readings"]:
                if typ == "f64":
                    import struct
                    v = repr(struct.unpack("<d", bytes.fromhex(v))[0])
                readings.append([b["series"][si][0], ts, v if isinstance(v, str) else json.dumps(v), late, q, b["series"][si][1]])
            arrival = r.get("ApproximateArrivalTimestamp")
            arrival_ms = int(arrival.timestamp() * 1000) if arrival is not None else 0
            print(json.dumps({"shard": sid, "agent": b["agent_id"], "epoch": b["epoch"], "seq": b["seq"], "sha256": hashlib.sha256(data).hexdigest(), "readings": readings, "alarms": b.get("alarms", []), "arrival_ms": arrival_ms}))
        if not resp["Records"] and resp.get("MillisBehindLatest", 0) == 0:
            break
        it = resp.get("NextShardIterator")
