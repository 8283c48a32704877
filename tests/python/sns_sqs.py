#!/usr/bin/env python3
"""SNS topic and SQS subscriptions on an emulator (moto server), and reading back what the queues received.

Usage:
  sns_sqs.py ENDPOINT setup TOPIC QUEUE=FILTER_JSON...   creates the topic and one queue per argument, subscribed
                                                         with that filter policy on message attributes ("" = none);
                                                         prints {"topic_arn": ..., "queues": {QUEUE: url}}
  sns_sqs.py ENDPOINT drain QUEUE_URL                    receives (and deletes) every message until the queue is
                                                         empty; prints a JSON list of {"message": <parsed body>,
                                                         "attributes": {name: value}} from the SNS envelopes
"""
import json
import sys

import boto3

endpoint, action = sys.argv[1:3]
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
sns = boto3.client("sns", **kw)
sqs = boto3.client("sqs", **kw)

if action == "setup":
    topic_arn = sns.create_topic(Name=sys.argv[3])["TopicArn"]
    queues = {}
    for spec in sys.argv[4:]:
        name, policy = spec.split("=", 1)
        url = sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        attrs = {"FilterPolicy": policy} if policy else {}
        sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=arn, Attributes=attrs)
        queues[name] = url
    print(json.dumps({"topic_arn": topic_arn, "queues": queues}))
elif action == "drain":
    url = sys.argv[3]
    out, empty = [], 0
    while empty < 2:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not got:
            empty += 1
            continue
        empty = 0
        for m in got:
            envelope = json.loads(m["Body"])
            attrs = {k: v["Value"] for k, v in envelope.get("MessageAttributes", {}).items()}
            out.append({"message": json.loads(envelope["Message"]), "attributes": attrs})
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    print(json.dumps(out))
else:
    sys.exit(f"unknown action {action}")
