#!/usr/bin/env python3
"""Helpers of the bronze compaction tests (tests/tests/compaction.rs), on moto or a local directory.

  bronze.py upload ENDPOINT BUCKET PREFIX DIR
      Uploads every file under DIR to s3://BUCKET/PREFIX/<its path under DIR> (creating the bucket).
  bronze.py lease ENDPOINT TABLE KEY CHECKPOINT [WATERMARK_MS]
      Writes a shard lease (Kinesis Client Library schema, as fieldlink-cloud keeps it) into TABLE (created if
      missing): what a consumer that checkpointed KEY up to WATERMARK_MS would have left.
  bronze.py read LOCATION [ENDPOINT]
      What a reader of the bronze table sees at LOCATION (s3://bucket/prefix with ENDPOINT, or a local directory):
      the published hours only (dt=…/hour=…/*.parquet; "_" directories are outside the table). Prints JSON
      {"rows": [[series, time_ms, agent_id, batch_epoch, batch_seq, repr(value_double)], ...],
       "files": {key: md5}, "landing_files": [key, ...], "landing_rows": N}. Each file is read with one GET, so a
      part replaced meanwhile is read whole, before or after.
  bronze.py readers DIR
      Reads the published hours of a local directory with pyarrow's dataset API and with DuckDB, both with Hive
      partitioning, and prints JSON {"pyarrow": {...}, "duckdb": {...}}: rows, distinct (series, time, agent_id,
      batch_epoch, batch_seq), rows whose dt/hour columns disagree with their time, files.
"""
import hashlib
import io
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def s3_client(endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def upload(endpoint, bucket, prefix, directory):
    s3 = s3_client(endpoint)
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    n = 0
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            s3.upload_file(path, bucket, f"{prefix.rstrip('/')}/{rel}" if prefix else rel)
            n += 1
    print(json.dumps({"uploaded": n}))


def lease(endpoint, table, key, checkpoint, watermark=None):
    import boto3

    db = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    try:
        db.create_table(TableName=table, KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}],
                        AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}],
                        BillingMode="PAY_PER_REQUEST")
    except db.exceptions.ResourceInUseException:
        pass
    item = {"leaseKey": {"S": key}, "leaseCounter": {"N": "1"}, "checkpoint": {"S": checkpoint},
            "checkpointSubSequenceNumber": {"N": "0"}, "ownerSwitchesSinceCheckpoint": {"N": "0"}}
    if watermark is not None:
        item["watermarkMs"] = {"N": str(int(watermark))}
    db.put_item(TableName=table, Item=item)
    print(json.dumps({"lease": key}))


def published(rel):
    parts = rel.split("/")
    return (len(parts) == 3 and parts[0].startswith("dt=") and parts[1].startswith("hour=")
            and parts[2].endswith(".parquet") and not any(p.startswith((".", "_")) for p in parts))


def read(location, endpoint=None):
    objects = {}  # relative key -> bytes loader
    if location.startswith("s3://"):
        bucket, _, prefix = location[5:].partition("/")
        prefix = prefix.strip("/")
        s3 = s3_client(endpoint)
        keys = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            keys += [o["Key"] for o in page.get("Contents", [])]
        for k in keys:
            rel = k[len(prefix) + 1:] if prefix else k
            objects[rel] = (lambda k=k: s3.get_object(Bucket=bucket, Key=k)["Body"].read())
    else:
        root = location[7:] if location.startswith("file://") else location
        for d, _, names in os.walk(root):
            for name in names:
                path = os.path.join(d, name)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                objects[rel] = (lambda path=path: open(path, "rb").read())
    rows, files, landing, landing_rows = [], {}, [], 0
    for rel in sorted(objects):
        if rel.startswith("_landing/") and rel.endswith(".parquet"):
            landing.append(rel)
            try:
                landing_rows += pq.ParquetFile(io.BytesIO(objects[rel]())).metadata.num_rows
            except Exception:  # published and deleted since the listing
                pass
            continue
        if not published(rel):
            continue
        data = objects[rel]()
        files[rel] = hashlib.md5(data).hexdigest()
        t = pq.read_table(pa.BufferReader(data))
        cols = [t.column(c).to_pylist() for c in ("series", "agent_id", "batch_epoch", "batch_seq", "value_double")]
        times = t.column("time").cast("int64").to_pylist()
        for i, time in enumerate(times):
            rows.append([cols[0][i], time, cols[1][i], cols[2][i], cols[3][i], repr(cols[4][i])])
    print(json.dumps({"rows": rows, "files": files, "landing_files": landing, "landing_rows": landing_rows}))


def readers(directory):
    import datetime

    import duckdb
    import pyarrow.dataset as ds

    def hour_of(ms):
        t = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
        return t.strftime("%Y-%m-%d"), t.hour

    # pyarrow: the directory as a Hive-partitioned dataset (it skips "_" and "." paths by itself).
    dataset = ds.dataset(directory, format="parquet", partitioning="hive")
    t = dataset.to_table(columns=["series", "time", "agent_id", "batch_epoch", "batch_seq", "dt", "hour"])
    times = t.column("time").cast("int64").to_pylist()
    keys = list(zip(t.column("series").to_pylist(), times, t.column("agent_id").to_pylist(),
                    t.column("batch_epoch").to_pylist(), t.column("batch_seq").to_pylist()))
    dts, hours = t.column("dt").to_pylist(), t.column("hour").to_pylist()
    wrong = sum(1 for i, ms in enumerate(times) if hour_of(ms) != (str(dts[i]), int(hours[i])))
    out = {"pyarrow": {"rows": len(keys), "distinct": len(set(keys)), "wrong_partition": wrong,
                       "files": len(dataset.files)}}
    # DuckDB: the glob Athena's table location amounts to, with Hive partitioning.
    con = duckdb.connect()
    glob = os.path.join(directory, "dt=*", "hour=*", "*.parquet")
    rows, distinct, wrong, nfiles = con.execute(
        f"""SELECT count(*), count(DISTINCT (series, epoch_ms(time), agent_id, batch_epoch, batch_seq)),
                   count(*) FILTER (WHERE strftime(time AT TIME ZONE 'UTC', '%Y-%m-%d') <> CAST(dt AS VARCHAR)
                                      OR hour(time AT TIME ZONE 'UTC') <> CAST(hour AS INTEGER)),
                   count(DISTINCT filename)
            FROM read_parquet('{glob}', hive_partitioning = true, filename = true)""").fetchone()
    out["duckdb"] = {"rows": rows, "distinct": distinct, "wrong_partition": wrong, "files": nfiles}
    print(json.dumps(out))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"upload": upload, "lease": lease, "read": read, "readers": readers}[cmd](*args)
