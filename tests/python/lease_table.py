#!/usr/bin/env python3
"""Deletes a DynamoDB lease table on an emulator (moto server), and with `recreate` creates it again empty with
the same key schema: what an operator does to a running cloud service. `checkpointed` waits (up to 60 s) until
every shard lease has checkpointed a record (a sequence number) and prints the checkpoints.

Usage: lease_table.py ENDPOINT TABLE delete|recreate|checkpointed
"""
import sys
import time

import boto3

endpoint, table, action = sys.argv[1:4]
db = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
if action == "checkpointed":
    for _ in range(600):
        items = db.scan(TableName=table, ConsistentRead=True)["Items"]
        shards = [i for i in items if "leaseKind" not in i]
        if shards and all(i["checkpoint"]["S"].isdigit() for i in shards):
            print(" ".join(i["checkpoint"]["S"] for i in shards))
            sys.exit(0)
        time.sleep(0.1)
    sys.exit(f"no checkpoint in {table}: {items}")
db.delete_table(TableName=table)
if action == "recreate":
    for _ in range(100):
        try:
            db.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                            KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}],
                            AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}])
            break
        except db.exceptions.ResourceInUseException:
            time.sleep(0.1)
elif action != "delete":
    sys.exit(f"unknown action {action!r}")
print(action, table)
