#!/usr/bin/env python3
"""Puts pre-encoded fieldlink records into a Kinesis stream (boto3), one PutRecord at a time so the order per
partition key is the order of the file, optionally resharding while it goes.

Usage: put_records.py ENDPOINT STREAM FILE [--rate N] [--at I:split:SHARD] [--at I:merge:SHARD:ADJACENT]...
FILE: JSON lines {"pk": partition key, "hex": record bytes in hex, "hash": optional explicit hash key}.
--rate: records per second (default: as fast as possible). --at I:...: before record I, split SHARD at the
middle of its hash range, or merge SHARD with ADJACENT.
Prints JSON {"put": N, "by_shard": {shard: count}, "reshards": [...]}.
"""
import argparse
import json
import time

import boto3

ap = argparse.ArgumentParser()
ap.add_argument("endpoint")
ap.add_argument("stream")
ap.add_argument("file")
ap.add_argument("--rate", type=float, default=0)
ap.add_argument("--at", action="append", default=[])
a = ap.parse_args()

kinesis = boto3.client("kinesis", endpoint_url=a.endpoint, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
actions = {}
for spec in a.at:
    i, rest = spec.split(":", 1)
    actions.setdefault(int(i), []).append(rest.split(":"))


def reshard(op):
    if op[0] == "split":
        shard = next(s for s in kinesis.list_shards(StreamName=a.stream)["Shards"] if s["ShardId"] == op[1])
        lo, hi = int(shard["HashKeyRange"]["StartingHashKey"]), int(shard["HashKeyRange"]["EndingHashKey"])
        kinesis.split_shard(StreamName=a.stream, ShardToSplit=op[1], NewStartingHashKey=str((lo + hi) // 2))
    else:
        kinesis.merge_shards(StreamName=a.stream, ShardToMerge=op[1], AdjacentShardToMerge=op[2])


by_shard, done, n = {}, [], 0
start = time.monotonic()
with open(a.file) as f:
    for i, line in enumerate(f):
        for op in actions.get(i, []):
            reshard(op)
            done.append(":".join([str(i)] + op))
        rec = json.loads(line)
        kw = dict(StreamName=a.stream, PartitionKey=rec["pk"], Data=bytes.fromhex(rec["hex"]))
        if rec.get("hash"):
            kw["ExplicitHashKey"] = rec["hash"]
        shard = kinesis.put_record(**kw)["ShardId"]
        by_shard[shard] = by_shard.get(shard, 0) + 1
        n += 1
        if a.rate:
            ahead = n / a.rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
print(json.dumps({"put": n, "by_shard": by_shard, "reshards": done}))
