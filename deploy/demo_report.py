#!/usr/bin/env python3
"""Prints what the demo landed: Timestream records on moto and the published bronze hours in the local directory."""
import json
import os
import sys
import urllib.request

import pyarrow.parquet as pq

endpoint, database, table, bronze, expected = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
data = json.load(urllib.request.urlopen(endpoint + "/moto-api/data.json"))
records = measures = 0
sample = None
for t in data.get("timestreamwrite", {}).get("TimestreamTable", []):
    if t["db_name"] == database and t["name"] == table:
        for r in t["records"]:
            records += 1
            measures += sum(1 for m in r["MeasureValues"] if not m["Name"].endswith("_quality"))
            sample = sample or r
print(f"\nTimestream {database}.{table} (moto): {records} multi-measure records holding {measures} readings")
if sample:
    dims = ", ".join(f"{d['Name']}={d['Value']}" for d in sample["Dimensions"])
    ms = ", ".join(f"{m['Name']}={m['Value']}" for m in sample["MeasureValues"])
    print(f"  e.g. time={sample['Time']} {dims}: {ms} (version {sample['Version']})")

rows = 0
print(f"\nPublished bronze hours under {bronze} (the landing area _landing/ is outside the table):")
for root, dirs, files in sorted(os.walk(bronze)):
    dirs[:] = sorted(d for d in dirs if not d.startswith("_"))
    for f in sorted(files):
        if f.endswith(".parquet"):
            path = os.path.join(root, f)
            t = pq.read_table(path)
            rows += t.num_rows
            print(f"  {os.path.relpath(path, bronze)}: {t.num_rows} rows, {os.path.getsize(path)} bytes")
if rows:
    first = pq.read_table(path).slice(0, 1).to_pylist()[0]
    print(f"  e.g. {first}")
ok = measures == expected and rows == expected
print(f"\npublished {expected} readings; Timestream holds {measures}, Parquet holds {rows}: {'OK' if ok else 'MISMATCH'}")
sys.exit(0 if ok else 1)
