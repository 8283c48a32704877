#!/usr/bin/env python3
"""Checks the IAM documents of the CloudFormation template against the AWS calls the code makes.

Usage: aws_iam_check.py TEMPLATE REPO_ROOT
Prints a JSON report; exits 1 with one line per problem when a check fails.

How the calls are found (mechanically, so a new call in the code fails this check until the template allows it):
- every `.rs` file under cloud/src and ops/src (the cloud service) or agent/src (the agent), without its
  `#[cfg(test)] mod tests` part, is searched for the AWS SDK crates it names (`aws_sdk_kinesis`, ...; a file that
  names none, for all those the component names anywhere: it may call a client built elsewhere);
- in such a file, every fluent call `.<name>()` whose name is an operation of one of those services is a call of
  that operation (`.put_object()` is S3 PutObject). The operation names come from botocore's service models (the
  Rust SDK names its builders after the same operations, in snake case); a name two of the file's services share is
  reported as ambiguous;
- each operation maps to the IAM actions AWS authorizes it with (`OPERATION_ACTIONS`; by default the service's IAM
  prefix and the operation name, e.g. kinesis:GetRecords); a Timestream client with endpoint discovery
  (`with_endpoint_discovery_enabled`) also calls timestream:DescribeEndpoints.

Checks:
- task role: every action the cloud code calls is allowed, or named in NOT_REACHED with the reason the stack's
  configuration never reaches it (and the template facts that reason rests on are checked); every allowed action
  is called or named in ANTICIPATED with its reason; Resource "*" only where IAM has no resource
  (DescribeEndpoints, GetAuthorizationToken);
- agent policy: exactly kinesis:PutRecords, PutRecord and DescribeStreamSummary on the stack's stream, and the
  agent code needs nothing else;
- nothing in any policy uses a wildcard action.
"""
import json
import re
import sys
from pathlib import Path

import botocore.session
from cfnlint.decode import decode_str

# SDK crate -> (botocore service, IAM action prefix)
SERVICES = {
    "kinesis": ("kinesis", "kinesis"),
    "dynamodb": ("dynamodb", "dynamodb"),
    "s3": ("s3", "s3"),
    "timestreamwrite": ("timestream-write", "timestream"),
    "sns": ("sns", "sns"),
}

# Operations authorized by other action names than their own (Service Authorization Reference).
OPERATION_ACTIONS = {
    ("s3", "ListObjectsV2"): ["s3:ListBucket"],
    ("s3", "ListObjects"): ["s3:ListBucket"],
    ("s3", "HeadBucket"): ["s3:ListBucket"],
    ("s3", "HeadObject"): ["s3:GetObject"],
    ("s3", "GetObjectAttributes"): ["s3:GetObject", "s3:GetObjectAttributes"],
    ("s3", "DeleteObjects"): ["s3:DeleteObject"],
    ("s3", "CopyObject"): ["s3:GetObject", "s3:PutObject"],
    ("s3", "CreateMultipartUpload"): ["s3:PutObject"],
    ("s3", "UploadPart"): ["s3:PutObject"],
    ("s3", "CompleteMultipartUpload"): ["s3:PutObject"],
    ("s3", "UploadPartCopy"): ["s3:GetObject", "s3:PutObject"],
}

# Granted to the task role before the code calls them, each with its reason. Remove an entry when the reason is gone.
ANTICIPATED = {
    "s3:GetObject": "hourly compaction (issue 12): reads landing files under <prefix>/_landing/",
    "s3:DeleteObject": "hourly compaction (issue 12): deletes compacted landing files",
    "s3:ListBucket": "hourly compaction (issue 12): lists <prefix>/_landing/ and the published partitions",
    "dynamodb:GetItem": "hourly compaction (issue 12): reads its own row of the lease table",
}

# Calls the code makes that the stack's configuration never reaches, each with the check that keeps it so.
NOT_REACHED = {
    "dynamodb:CreateTable": "lease/table.rs creates the lease table only when DescribeTable says it is missing; "
    "the stack creates it (LeaseTable, hash key leaseKey of type S)",
    "timestream:UpdateTable": "timestream/mod.rs enables magnetic store writes only with [timestream] "
    "magnetic_store_writes = true; the stack's table has them on and its configuration leaves the option off",
}

# Actions IAM cannot scope to a resource.
RESOURCELESS = {"timestream:DescribeEndpoints", "ecr:GetAuthorizationToken"}

AGENT_ACTIONS = {"kinesis:PutRecords", "kinesis:PutRecord", "kinesis:DescribeStreamSummary"}


def strip_tests(text):
    m = re.search(r"^#\[cfg\(test\)\]\s*\n\s*mod tests", text, re.M)
    return text[: m.start()] if m else text


def snake_names(service):
    model = botocore.session.get_session().get_service_model(service)
    return {botocore.xform_name(op): op for op in model.operation_names}


def sdk_calls(root, dirs):
    """{IAM action: ["file:line (Operation)", ...]} for the SDK calls in `dirs`, and problems."""
    names = {crate: snake_names(svc) for crate, (svc, _) in SERVICES.items()}
    used, problems = {}, []
    files = [(path, strip_tests(path.read_text())) for d in dirs for path in sorted((root / d).rglob("*.rs"))]
    # The services the component's code names anywhere: a file that names none may call a client of any of them.
    component = set()
    for _, text in files:
        component |= set(re.findall(r"\baws_sdk_([a-z0-9]+)", text)) & set(SERVICES)
    for path, text in files:
        crates = set(re.findall(r"\baws_sdk_([a-z0-9]+)", text))
        unknown = crates - set(SERVICES)
        if unknown:
            problems.append(f"{path.relative_to(root)}: SDK crate(s) {sorted(unknown)} not in SERVICES here")
        # A file that names no SDK crate may still call a client another file built (`self.client.get_object()`):
        # it is searched for the operations of every service the component uses.
        crates = (crates & set(SERVICES)) or component
        for m in re.finditer(r"\.([a-z][a-z0-9_]*)\(\)", text):
            name = m.group(1)
            owners = [c for c in sorted(crates) if name in names[c]]
            if not owners:
                continue
            line = text.count("\n", 0, m.start()) + 1
            where = f"{path.relative_to(root)}:{line}"
            if len(owners) > 1:
                problems.append(f"{where}: .{name}() is an operation of several services {owners}")
                continue
            svc, prefix = SERVICES[owners[0]]
            op = names[owners[0]][name]
            for action in OPERATION_ACTIONS.get((svc, op), [f"{prefix}:{op}"]):
                used.setdefault(action, []).append(f"{where} ({op})")
        if "timestreamwrite" in crates and "with_endpoint_discovery_enabled" in text:
            used.setdefault("timestream:DescribeEndpoints", []).append(
                f"{path.relative_to(root)} (endpoint discovery)"
            )
    return used, problems


def resolve_if(node, conditions_true=True):
    """Resolves Fn::If with every condition true (the widest grant) and drops AWS::NoValue."""
    if isinstance(node, dict):
        if "Fn::If" in node:
            _, yes, no = node["Fn::If"]
            return resolve_if(yes if conditions_true else no, conditions_true)
        return {k: resolve_if(v, conditions_true) for k, v in node.items()}
    if isinstance(node, list):
        out = [resolve_if(v, conditions_true) for v in node]
        return [v for v in out if v != {"Ref": "AWS::NoValue"}]
    return node


def as_list(v):
    return v if isinstance(v, list) else [v]


def statements(resource, policy_path):
    props = resource["Properties"]
    if policy_path == "managed":
        docs = [props["PolicyDocument"]]
    else:
        docs = [p["PolicyDocument"] for p in props.get("Policies", [])]
    return [s for d in docs for s in resolve_if(d)["Statement"]]


def not_reached_still_holds(res):
    """The template facts NOT_REACHED relies on."""
    problems = []
    table = res["LeaseTable"]["Properties"]
    if table.get("KeySchema") != [{"AttributeName": "leaseKey", "KeyType": "HASH"}] or table.get(
        "AttributeDefinitions"
    ) != [{"AttributeName": "leaseKey", "AttributeType": "S"}]:
        problems.append("LeaseTable: the key schema must be the cloud's (lease/table.rs): leaseKey, HASH, type S")
    ts = res["TimestreamTable"]["Properties"]
    if ts.get("MagneticStoreWriteProperties", {}).get("EnableMagneticStoreWrites") is not True:
        problems.append("TimestreamTable: magnetic store writes must be on (the task role has no UpdateTable)")
    config = json.dumps(res["TaskDefinition"]["Properties"]["ContainerDefinitions"])
    if "magnetic_store_writes" in config:
        problems.append("TaskDefinition: the configuration must not set magnetic_store_writes (no UpdateTable)")
    return problems


def main():
    template_path, root = Path(sys.argv[1]), Path(sys.argv[2])
    template, matches = decode_str(template_path.read_text())
    if matches:
        sys.exit(f"{template_path}: {matches}")
    res = template["Resources"]
    problems = []

    cloud_used, p = sdk_calls(root, ["cloud/src", "ops/src"])
    problems += p
    agent_used, p = sdk_calls(root, ["agent/src"])
    problems += p

    task = statements(res["TaskRole"], "inline")
    granted = {}
    for s in task:
        if s.get("Effect") != "Allow":
            problems.append(f"TaskRole statement {s.get('Sid')}: only Allow statements expected")
        for a in as_list(s["Action"]):
            if "*" in a:
                problems.append(f"TaskRole statement {s.get('Sid')}: wildcard action {a}")
            granted.setdefault(a, []).append(s)
            if s["Resource"] == "*" and a not in RESOURCELESS:
                problems.append(f"TaskRole: {a} on Resource '*' (only {sorted(RESOURCELESS)} may be)")
    problems += not_reached_still_holds(res)
    for a, where in sorted(cloud_used.items()):
        if a not in granted and a not in NOT_REACHED:
            problems.append(f"TaskRole does not allow {a}, which the cloud calls at {', '.join(where)}")
    for a in sorted(granted):
        if a not in cloud_used and a not in ANTICIPATED:
            problems.append(f"TaskRole allows {a}, which the cloud code never calls (and ANTICIPATED does not name)")

    agent = statements(res["AgentPolicy"], "managed")
    agent_actions = [a for s in agent for a in as_list(s["Action"])]
    if sorted(agent_actions) != sorted(AGENT_ACTIONS):
        problems.append(f"AgentPolicy allows {sorted(agent_actions)}, expected exactly {sorted(AGENT_ACTIONS)}")
    for s in agent:
        if s.get("Effect") != "Allow" or s.get("Resource") != {"Fn::GetAtt": ["Stream", "Arn"]} or "Condition" in s:
            problems.append(f"AgentPolicy statement {s.get('Sid')}: must Allow on the stream ARN only, got {s}")
    for a, where in sorted(agent_used.items()):
        if a not in agent_actions:
            problems.append(f"AgentPolicy does not allow {a}, which the agent calls at {', '.join(where)}")

    for name in ("ExecutionRole",):
        for s in statements(res[name], "inline"):
            for a in as_list(s["Action"]):
                if "*" in a:
                    problems.append(f"{name}: wildcard action {a}")
                if s["Resource"] == "*" and a not in RESOURCELESS:
                    problems.append(f"{name}: {a} on Resource '*'")

    report = {
        "cloud_calls": cloud_used,
        "agent_calls": agent_used,
        "task_role_actions": sorted(granted),
        "not_reached": {a: NOT_REACHED[a] for a in sorted(cloud_used) if a in NOT_REACHED and a not in granted},
        "anticipated_not_yet_called": sorted(a for a in ANTICIPATED if a in granted and a not in cloud_used),
        "agent_policy_actions": sorted(agent_actions),
        "problems": problems,
    }
    print(json.dumps(report, indent=1))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
