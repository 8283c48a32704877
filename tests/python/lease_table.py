#!/usr/bin/env python3
"""Deletes a DynamoDB lease table on an emulator (moto server), and with `recreate` creates it again empty with
the same key schema: what an operator (or a CloudFormation replacement) does to a running cloud service.

Usage: lease_table.py ENDPOINT TABLE delete|recreate
"""
import sys
import time

import boto3

endpoint, table, action = sys.argv[1:4]
db = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
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
