#!/usr/bin/env python3
"""The CloudFormation stack of deploy/aws/fieldlink.yaml on moto server, for tests/tests/aws_stack.rs.

Usage:
  aws_stack.py create ENDPOINT STACK TEMPLATE [Key=Value ...]
      Creates the stack through moto's CloudFormation (VpcId/SubnetIds default to moto's default VPC, ImageUri to a
      placeholder), waits for it and prints JSON: status, params, outputs, created {logical id: type},
      not_created {logical id: type} (resources whose condition holds but moto's CloudFormation did not create),
      live (what moto holds for the created resources, read back through their own APIs; a failed read is
      {"error": code}) and template (the template's Resources, decoded).
  aws_stack.py principals ENDPOINT STACK
      Copies the stack's task role policy and agent policy onto two IAM users, "cloud-task" and "agent", with
      access keys, and prints them as JSON {name: {key, secret, policy}}. moto checks resources only for S3 (it
      authorizes Kinesis, DynamoDB and Timestream calls against resource "*" and evaluates no condition keys), so
      in the copies the other services' resources become "*" and conditions are dropped: actions are checked for
      every service, resources for S3.
  aws_stack.py timestream-standin ENDPOINT STACK TEMPLATE
      Creates the Timestream database and table the template declares (moto's CloudFormation cannot), with the
      template's properties resolved from the stack's parameters, and prints them as JSON.
  aws_stack.py schema ENDPOINT BUCKET PREFIX
      Prints the Arrow schema of the first Parquet file under s3://BUCKET/PREFIX/dt=... as [[column, type], ...]
      (pyarrow's names), with the Parquet logical type of each integer column, e.g. "uint64 (Int(bitWidth=64,
      isSigned=false))".
  aws_stack.py enforce ENDPOINT on|off
      Turns moto's IAM authorization on (every later request must be signed by a known key and allowed) or off.
"""
import ast
import json
import os
import sys
import time
import urllib.request

import boto3
from botocore.exceptions import ClientError
from cfnlint.decode import decode_str

REGION = "us-east-1"


def clients(endpoint, key="testing", secret="testing"):
    kw = dict(endpoint_url=endpoint, region_name=REGION, aws_access_key_id=key, aws_secret_access_key=secret)
    return lambda name: boto3.client(name, **kw)


def read(call, *keys):
    """The answer of `call` (narrowed by `keys`), or {"error": code}."""
    try:
        out = call()
    except ClientError as e:
        return {"error": e.response["Error"]["Code"]}
    out.pop("ResponseMetadata", None)
    for k in keys:
        out = out[k]
    return out


def condition(template, name, params):
    """Evaluates the template's simple conditions (Equals, Not, And, Or over Ref parameters)."""

    def value(node):
        if isinstance(node, dict) and "Ref" in node:
            return params[node["Ref"]]
        if isinstance(node, dict) and "Condition" in node:
            return condition(template, node["Condition"], params)
        return node

    def ev(c):
        (fn, args), = c.items()
        if fn == "Fn::Equals":
            return str(value(args[0])) == str(value(args[1]))
        if fn == "Fn::Not":
            return not ev(args[0])
        if fn == "Fn::And":
            return all(ev(a) if isinstance(a, dict) and "Condition" not in a else value(a) for a in args)
        if fn == "Fn::Or":
            return any(ev(a) if isinstance(a, dict) and "Condition" not in a else value(a) for a in args)
        raise ValueError(f"condition function {fn}")

    return ev(template["Conditions"][name])


def create(endpoint, stack, template_path, pairs):
    c = clients(endpoint)
    text = open(template_path).read()
    template, matches = decode_str(text)
    if matches:
        sys.exit(f"{template_path}: {matches}")
    ec2 = c("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnets = [s["SubnetId"] for s in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]]
    given = {"VpcId": vpc, "SubnetIds": ",".join(subnets[:2]), "ImageUri": "example.invalid/fieldlink-cloud:test"}
    given.update(dict(p.split("=", 1) for p in pairs))
    cf = c("cloudformation")
    cf.create_stack(
        StackName=stack,
        TemplateBody=text,
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in given.items()],
        Capabilities=["CAPABILITY_IAM"],
    )
    for _ in range(300):
        s = cf.describe_stacks(StackName=stack)["Stacks"][0]
        if not s["StackStatus"].endswith("IN_PROGRESS"):
            break
        time.sleep(0.1)
    params = {k: str(v.get("Default", "")) for k, v in template["Parameters"].items()}
    params.update(given)
    outputs = {o["OutputKey"]: o["OutputValue"] for o in s.get("Outputs", [])}
    created = {
        r["LogicalResourceId"]: r["ResourceType"]
        for r in cf.describe_stack_resources(StackName=stack)["StackResources"]
        if "LogicalResourceId" in r
    }
    wanted = {
        name: r["Type"]
        for name, r in template["Resources"].items()
        if "Condition" not in r or condition(template, r["Condition"], params)
    }
    report = {
        "status": s["StackStatus"],
        "reason": s.get("StackStatusReason"),
        "params": params,
        "outputs": outputs,
        "created": created,
        "not_created": {k: v for k, v in wanted.items() if k not in created},
        "live": live(c, outputs, created, cf, stack) if s["StackStatus"] == "CREATE_COMPLETE" else {},
        "template": template["Resources"],
    }
    print(json.dumps(report, default=str))


def document(d):
    """A policy document as moto returns it: a dict, JSON text, or (for role policies CloudFormation created) the
    Python repr of a dict."""
    if isinstance(d, str):
        try:
            return json.loads(d)
        except json.JSONDecodeError:
            return ast.literal_eval(d)
    return d


def physical(cf, stack, logical):
    # describe_stack_resource fails on moto for stacks with resources it did not create; the list works.
    for r in cf.describe_stack_resources(StackName=stack)["StackResources"]:
        if r.get("LogicalResourceId") == logical:
            return r["PhysicalResourceId"]
    raise KeyError(logical)


def live(c, outputs, created, cf, stack):
    kinesis, s3, ddb, iam, ecs, logs = (c(n) for n in ("kinesis", "s3", "dynamodb", "iam", "ecs", "logs"))
    bucket, table, stream = outputs["BucketName"], outputs["LeaseTableName"], outputs["StreamName"]
    task_role = physical(cf, stack, "TaskRole")
    policy_arn = outputs["AgentPolicyArn"]
    version = iam.get_policy(PolicyArn=policy_arn)["Policy"]["DefaultVersionId"]
    cluster = physical(cf, stack, "Cluster")
    return {
        "stream": read(lambda: kinesis.describe_stream_summary(StreamName=stream), "StreamDescriptionSummary"),
        "bucket": {
            "encryption": read(lambda: s3.get_bucket_encryption(Bucket=bucket), "ServerSideEncryptionConfiguration"),
            "public_access_block": read(lambda: s3.get_public_access_block(Bucket=bucket)),
            "policy": read(lambda: s3.get_bucket_policy(Bucket=bucket)),
            "lifecycle": read(lambda: s3.get_bucket_lifecycle_configuration(Bucket=bucket)),
            "ownership": read(lambda: s3.get_bucket_ownership_controls(Bucket=bucket)),
        },
        "lease_table": read(lambda: ddb.describe_table(TableName=table), "Table"),
        "lease_table_backups": read(
            lambda: ddb.describe_continuous_backups(TableName=table), "ContinuousBackupsDescription"
        ),
        "task_role": {
            name: document(iam.get_role_policy(RoleName=task_role, PolicyName=name)["PolicyDocument"])
            for name in iam.list_role_policies(RoleName=task_role)["PolicyNames"]
        },
        "agent_policy": document(
            iam.get_policy_version(PolicyArn=policy_arn, VersionId=version)["PolicyVersion"]["Document"]
        ),
        "task_definition": read(
            lambda: ecs.describe_task_definition(taskDefinition=outputs["TaskDefinitionArn"]), "taskDefinition"
        ),
        "service": read(
            lambda: ecs.describe_services(cluster=cluster, services=[outputs["ServiceName"]]), "services"
        ),
        "log_group": read(lambda: logs.describe_log_groups(logGroupNamePrefix=outputs["LogGroupName"]), "logGroups"),
    }


def principals(endpoint, stack):
    c = clients(endpoint)
    cf, iam = c("cloudformation"), c("iam")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in cf.describe_stacks(StackName=stack)["Stacks"][0]["Outputs"]}
    task_role = physical(cf, stack, "TaskRole")
    task_docs = [
        document(iam.get_role_policy(RoleName=task_role, PolicyName=n)["PolicyDocument"])
        for n in iam.list_role_policies(RoleName=task_role)["PolicyNames"]
    ]
    arn = outputs["AgentPolicyArn"]
    version = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
    agent_doc = document(iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"]["Document"])

    def for_moto(doc):
        statements = []
        for s in doc["Statement"]:
            if s is None:  # moto keeps AWS::NoValue list items as null
                continue
            s = dict(s)
            s.pop("Condition", None)
            resources = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
            if not all(r.startswith("arn:aws:s3:::") for r in resources):
                s["Resource"] = "*"
            statements.append(s)
        return {"Version": "2012-10-17", "Statement": statements}

    out = {}
    for name, docs in (("cloud-task", task_docs), ("agent", [agent_doc])):
        iam.create_user(UserName=name)
        merged = {"Version": "2012-10-17", "Statement": [s for d in docs for s in for_moto(d)["Statement"]]}
        iam.put_user_policy(UserName=name, PolicyName="copy", PolicyDocument=json.dumps(merged))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        out[name] = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"], "policy": merged}
    print(json.dumps(out))


def timestream_standin(endpoint, stack, template_path):
    c = clients(endpoint)
    template, _ = decode_str(open(template_path).read())
    params = {
        p["ParameterKey"]: p["ParameterValue"]
        for p in c("cloudformation").describe_stacks(StackName=stack)["Stacks"][0]["Parameters"]
    }

    def resolve(node):
        if isinstance(node, dict) and set(node) == {"Ref"}:
            ref = node["Ref"]
            if ref == "TimestreamDatabase":  # Ref of AWS::Timestream::Database is its name
                return resolve(template["Resources"]["TimestreamDatabase"]["Properties"]["DatabaseName"])
            return params.get(ref, template["Parameters"].get(ref, {}).get("Default"))
        if isinstance(node, dict):
            return {k: resolve(v) for k, v in node.items()}
        return node

    db = resolve(template["Resources"]["TimestreamDatabase"]["Properties"])
    table = resolve(template["Resources"]["TimestreamTable"]["Properties"])
    ts = c("timestream-write")
    ts.create_database(DatabaseName=db["DatabaseName"])
    retention = {k: int(v) for k, v in table["RetentionProperties"].items()}
    ts.create_table(
        DatabaseName=table["DatabaseName"],
        TableName=table["TableName"],
        RetentionProperties=retention,
        MagneticStoreWriteProperties=table["MagneticStoreWriteProperties"],
    )
    print(json.dumps({"database": db, "table": table}))


def schema(endpoint, bucket, prefix):
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    s3 = pafs.S3FileSystem(
        endpoint_override=endpoint.split("://", 1)[1], scheme="http", access_key="testing", secret_key="testing",
        region=REGION,
    )
    files = sorted(
        f.path
        for f in s3.get_file_info(pafs.FileSelector(f"{bucket}/{prefix}", recursive=True))
        if f.path.endswith(".parquet") and "/dt=" in f.path
    )
    with s3.open_input_file(files[0]) as f:
        meta = pq.ParquetFile(f).metadata
    arrow = meta.schema.to_arrow_schema()
    leaves = {meta.schema.column(j).path: meta.schema.column(j).logical_type for j in range(meta.num_columns)}
    out = []
    for field in arrow:
        t = str(field.type)
        if isinstance(field.type, pa.MapType):  # without the entries' field names
            t = f"map<{field.type.key_type}, {field.type.item_type}>"
        if t in ("int64", "uint64"):
            t += f" ({leaves[field.name]})"
        out.append([field.name, t])
    print(json.dumps({"file": files[0], "columns": out}))


def enforce(endpoint, on):
    req = urllib.request.Request(
        endpoint + "/moto-api/reset-auth",
        data=b"0" if on == "on" else b"inf",
        headers={"Content-Type": "text/plain"},  # not a form: moto reads the raw body
        method="POST",
    )
    print(urllib.request.urlopen(req).read().decode())


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "create":
        create(args[0], args[1], args[2], args[3:])
    elif cmd == "principals":
        principals(args[0], args[1])
    elif cmd == "timestream-standin":
        timestream_standin(args[0], args[1], args[2])
    elif cmd == "schema":
        schema(args[0], args[1], args[2])
        # pyarrow's S3 client can abort the interpreter's exit after the answer is out (its C++ teardown,
        # apache/arrow#41087 and kin): leave without that teardown.
        sys.stdout.flush()
        os._exit(0)
    elif cmd == "enforce":
        enforce(args[0], args[1])
    else:
        sys.exit(__doc__)
