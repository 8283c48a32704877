#!/usr/bin/env python3
"""Reads the cloud's published alarm table back with pyarrow (Hive partitions dt/hour, `_` directories skipped).

Usage: alarm_table.py ENDPOINT BUCKET PREFIX
Prints {"rows": [...], "landing": N}: every row of dt=*/hour=*/*.parquet (times in Unix ms, the partition of each
row as "dt"/"hour") and the number of files still in _landing/.
"""
import json
import sys

import pyarrow.dataset as ds
import pyarrow.fs as pafs

endpoint, bucket, prefix = sys.argv[1:4]
fs = pafs.S3FileSystem(endpoint_override=endpoint.replace("http://", ""), scheme="http", region="us-east-1",
                       access_key="testing", secret_key="testing")
root = f"{bucket}/{prefix}"
rows = []
try:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
except FileNotFoundError:
    infos = []
landing = sum(1 for i in infos if "/_landing/" in i.path and i.path.endswith(".parquet"))
if any(i.path.endswith(".parquet") and "/_" not in i.path[len(root):] for i in infos):
    table = ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive").to_table()
    for r in table.to_pylist():
        for k in ("time", "cause_time"):
            if r[k] is not None:
                r[k] = round(r[k].timestamp() * 1000)
        r["tags"] = dict(r["tags"]) if r["tags"] is not None else {}
        r["hour"] = str(r["hour"])
        r["dt"] = str(r["dt"])
        rows.append(r)
print(json.dumps({"rows": rows, "landing": landing}, default=str))
