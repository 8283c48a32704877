#!/usr/bin/env python3
"""Deletes or creates a Timestream table on an emulator (moto server): what an operator does by mistake and
then to repair it.

Usage: timestream_table.py ENDPOINT DATABASE TABLE delete|create
"""
import sys

import boto3

endpoint, database, table, action = sys.argv[1:5]
ts = boto3.client("timestream-write", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
if action == "delete":
    ts.delete_table(DatabaseName=database, TableName=table)
elif action == "create":
    ts.create_table(DatabaseName=database, TableName=table)
else:
    sys.exit(f"unknown action {action!r}")
print(action, database, table)
