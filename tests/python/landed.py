#!/usr/bin/env python3
"""Reads back what fieldlink landed on an emulator: Timestream records (moto's /moto-api/data.json) and the
Parquet files under s3://BUCKET/PREFIX (read with pyarrow, an independent Parquet reader).

Usage: landed.py ENDPOINT DATABASE TABLE BUCKET PREFIX
Prints JSON: {"timestream": [[series, ts_ms, value], ...], "timestream_records": N,
              "parquet": [[series, ts_ms, value], ...], "parquet_files": [key, ...]}
Numeric (double) readings only; values printed with repr (exact round trip).
"""
import json
import sys
import urllib.request

import pyarrow.dataset as ds
import pyarrow.fs as pafs

endpoint, database, table, bucket, prefix = sys.argv[1:6]
data = json.load(urllib.request.urlopen(endpoint + "/moto-api/data.json"))
rows, n_records = [], 0
for t in data.get("timestreamwrite", {}).get("TimestreamTable", []):
    if t["db_name"] != database or t["name"] != table:
        continue
    for rec in t["records"]:
        n_records += 1
        dims = {d["Name"]: d["Value"] for d in rec["Dimensions"]}
        for m in rec["MeasureValues"]:
            if m["Name"].endswith("_quality") or m["Type"] != "DOUBLE":
                continue
            rows.append([dims["device"] + "/" + m["Name"], int(rec["Time"]), repr(float(m["Value"]))])

host = endpoint.split("://", 1)[1]
s3 = pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key="testing", secret_key="testing", region="us-east-1")
base = f"{bucket}/{prefix}".rstrip("/")
files = [f.path for f in s3.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)) if f.path.endswith(".parquet")]
parquet = []
if files:
    table_ = ds.dataset(files, filesystem=s3, format="parquet").to_table(columns=["series", "time", "value_double"])
    times = table_.column("time").cast("int64").to_pylist()
    for s, t, v in zip(table_.column("series").to_pylist(), times, table_.column("value_double").to_pylist()):
        if v is not None:
            parquet.append([s, t, repr(v)])
print(json.dumps({"timestream": rows, "timestream_records": n_records, "parquet": parquet, "parquet_files": files}))
