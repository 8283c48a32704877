#!/usr/bin/env python3
"""Creates the AWS resources a test or the demo needs, on an emulator (moto server).

Usage: aws_setup.py ENDPOINT STREAM SHARDS DATABASE TABLE BUCKET
"""
import sys
import time

import boto3

endpoint, stream, shards, database, table, bucket = sys.argv[1:7]
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
kinesis = boto3.client("kinesis", **kw)
kinesis.create_stream(StreamName=stream, ShardCount=int(shards))
for _ in range(100):
    if kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
        break
    time.sleep(0.1)
ts = boto3.client("timestream-write", **kw)
ts.create_database(DatabaseName=database)
ts.create_table(DatabaseName=database, TableName=table)
boto3.client("s3", **kw).create_bucket(Bucket=bucket)
print("created", stream, database, table, bucket)
