#!/usr/bin/env python3
"""Reads back what fieldlink landed on an emulator: Timestream records (moto's /moto-api/data.json) and the
published bronze hours under s3://BUCKET/PREFIX (read with pyarrow, an independent Parquet reader).

Usage: landed.py ENDPOINT DATABASE TABLE BUCKET PREFIX
Prints JSON: {"timestream": [[series, ts_ms, value], ...], "timestream_records": N (writes moto stored),
              "timestream_rewrites": N, "timestream_replaced": N, "timestream_erased_measures": N,
              "timestream_conflicts": N, "timestream_over_limits": [why, ...],
              "parquet": [[series, ts_ms, value], ...], "parquet_files": [key, ...],
              "landing_rows": N, "landing_files": [key, ...], "dead_letters": [key, ...],
              "dead_letter_lines": [the JSON lines of every .jsonl dead letter]}
"parquet" is what a reader of the bronze table sees: the rows of the published hours only
(PREFIX/dt=YYYY-MM-DD/hour=HH/*.parquet, as Athena and Glue read them); files under "_"-prefixed directories
(the landing area _landing/, _compaction/, _dead_letter/) are not part of the table. The landing area's files and
row count are reported beside it ("landing_files", "landing_rows": landed but not yet published).
Numeric (double) readings only; values printed with repr (exact round trip).
"""
import json
import os
import sys
import time

import boto3
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

endpoint, database, table, bucket, prefix = sys.argv[1:6]


def moto_data():
    """moto's dump of its models (moto 5.2.5, moto_api/_internal/responses.py `model_data`) iterates every
    model's tracked instances and json-dumps their attributes with no lock while its threaded server handles the
    cloud's writes, so a change under it is a RuntimeError and a 500 (seen once in CI, December 2026): an error
    of the emulator's dump, not of what fieldlink wrote. Asked up to 5 times; any other error, or a fifth 500,
    fails the test as before."""
    for attempt in range(5):
        try:
            return json.load(urllib.request.urlopen(endpoint + "/moto-api/data.json"))
        except urllib.error.HTTPError as e:
            if e.code != 500 or attempt == 4:
                raise
            time.sleep(0.2)


data = moto_data()
# moto appends every write. Timestream keeps one record per identity (dimensions, time, measure name) and, for a
# write to an existing identity, applies its documented upsert rule, replayed here in write order:
# - a higher Version REPLACES the record: its measure set becomes the new write's (measures the new write does
#   not carry vanish; counted in timestream_replaced and timestream_erased_measures);
# - the same Version with the same measures and values is a no-op (timestream_rewrites);
# - the same Version with other content, or a lower Version, is rejected (timestream_conflicts).
# Version defaults to 1 when a write has none.
# moto validates none of Timestream's limits on a record; AWS rejects a record that breaks one. Every write is
# checked here against the documented ones (Record, Dimension, MeasureValue and the quotas page), so a test
# fails where AWS would have refused what moto stored ("timestream_over_limits").
VALUE_BYTES = {"BOOLEAN": lambda v: 1, "BIGINT": lambda v: 8, "DOUBLE": lambda v: 8,
               "VARCHAR": lambda v: len(v.encode()), "TIMESTAMP": lambda v: 8}


def over_limits(rec):
    why = []
    dims, measures = rec["Dimensions"], rec.get("MeasureValues", [])
    if len(dims) > 128:
        why.append(f"{len(dims)} dimensions")
    for d in dims:
        if not 1 <= len(d["Name"].encode()) <= 60 or not 1 <= len(d["Value"].encode()) <= 2048:
            why.append(f"dimension {d['Name'][:40]!r} of {len(d['Name'].encode())}/{len(d['Value'].encode())} bytes")
    if sum(len(d["Name"].encode()) + len(d["Value"].encode()) for d in dims) > 2048:
        why.append("dimensions over 2 KB together")
    if not 1 <= len(measures) <= 256:
        why.append(f"{len(measures)} measures")
    names = [m["Name"] for m in measures]
    if len(set(names)) != len(names):
        why.append("a repeated measure name")
    for m in measures:
        if not 1 <= len(m["Name"].encode()) <= 256:
            why.append(f"measure name of {len(m['Name'].encode())} bytes")
        if m["Type"] == "VARCHAR" and not 1 <= len(m["Value"].encode()) <= 2048:
            why.append(f"VARCHAR of {len(m['Value'].encode())} bytes")
    value_bytes = sum(VALUE_BYTES[m["Type"]](m["Value"]) for m in measures)
    if value_bytes > 2048:
        why.append(f"measure values of {value_bytes} bytes together")
    return why


over = []
n_records, rewrites, replaced, erased, conflicts = 0, 0, 0, 0, 0
state = {}
for t in data.get("timestreamwrite", {}).get("TimestreamTable", []):
    if t["db_name"] != database or t["name"] != table:
        continue
    for rec in t["records"]:
        n_records += 1
        over += [f"record at {rec['Time']}: {w}" for w in over_limits(rec)]
        dims = tuple(sorted((d["Name"], d["Value"]) for d in rec["Dimensions"]))
        key = (dims, rec["Time"], rec.get("MeasureName"))
        version = int(rec.get("Version", 1))
        measures = tuple(sorted((m["Name"], m["Type"], m["Value"]) for m in rec["MeasureValues"]))
        old = state.get(key)
        if old is None:
            state[key] = (version, measures)
        elif version > old[0]:
            replaced += 1
            erased += len({m[0] for m in old[1]} - {m[0] for m in measures})
            state[key] = (version, measures)
        elif version == old[0] and measures == old[1]:
            rewrites += 1
        else:
            conflicts += 1
rows = []
for (dims, time, _), (_, measures) in state.items():
    d = dict(dims)
    for name, typ, value in measures:
        if name.endswith("_quality") or typ != "DOUBLE":
            continue
        rows.append([d["device"] + "/" + name, int(time), repr(float(value))])

host = endpoint.split("://", 1)[1]
s3 = pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key="testing", secret_key="testing", region="us-east-1")
base = f"{bucket}/{prefix}".rstrip("/")
everything = [f.path for f in s3.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
              if f.type == pafs.FileType.File and f.path.endswith(".parquet")]


def relative_parts(path):
    return path[len(base) + 1:].split("/")


# Published: dt=…/hour=…/<file> directly under the prefix. Anything under a "_" directory is outside the table.
files = [p for p in everything
         if len(relative_parts(p)) == 3 and not any(x.startswith("_") for x in relative_parts(p))
         and relative_parts(p)[0].startswith("dt=") and relative_parts(p)[1].startswith("hour=")]
landing = [p for p in everything if relative_parts(p)[0] == "_landing"]
landing_rows = 0
for path in landing:
    try:
        landing_rows += pq.ParquetFile(s3.open_input_file(path)).metadata.num_rows
    except Exception:  # published and deleted since the listing
        pass
parquet = []
boto = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                    aws_secret_access_key="testing")
for path in files:
    # One plain GET per file: a part republished while it is read is read whole, before or after (ranged reads
    # could mix the footer of one version with the data of the next).
    data = boto.get_object(Bucket=bucket, Key=path[len(bucket) + 1:])["Body"].read()
    table_ = pq.read_table(pa.BufferReader(data), columns=["series", "time", "value_double"])
    times = table_.column("time").cast("int64").to_pylist()
    for s, t, v in zip(table_.column("series").to_pylist(), times, table_.column("value_double").to_pylist()):
        if v is not None:
            parquet.append([s, t, repr(v)])
dead = [f.path for f in s3.get_file_info(pafs.FileSelector(base + "/_dead_letter", recursive=True, allow_not_found=True)) if f.type == pafs.FileType.File]
dead_lines = []
for path in dead:
    if path.endswith(".jsonl"):
        with s3.open_input_stream(path) as f:
            dead_lines += [json.loads(line) for line in f.read().decode().splitlines() if line]
print(json.dumps({"timestream_over_limits": over[:20], "timestream": rows, "timestream_records": n_records, "timestream_rewrites": rewrites,
                  "timestream_replaced": replaced, "timestream_erased_measures": erased,
                  "timestream_conflicts": conflicts, "parquet": parquet, "parquet_files": files,
                  "landing_rows": landing_rows, "landing_files": landing, "dead_letters": dead,
                  "dead_letter_lines": dead_lines}))
# pyarrow's S3 client can abort the interpreter's exit after the answer is out ("terminate called without an
# active exception": its C++ teardown, apache/arrow#41087 and kin; seen once in CI): leave without that teardown.
sys.stdout.flush()
os._exit(0)
