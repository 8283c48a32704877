//! The AWS stack (`deploy/aws/fieldlink.yaml`) created through moto server's CloudFormation, then used: an agent and
//! a cloud service run against the resources the stack made (names from its outputs, the cloud's configuration the
//! very TOML the stack gives the ECS task), each with only the permissions of its IAM policy, and every reading
//! must land exactly once in Parquet on the stack's bucket and in Timestream.
//!
//! What moto 5.2.5 cannot do, and what is checked instead:
//! - its CloudFormation does not create `AWS::S3::BucketPolicy`, `AWS::Timestream::*`, `AWS::Glue::*` or
//!   `AWS::Athena::WorkGroup` (it skips them with a warning; nor the `WaitConditionHandle`, which is nothing):
//!   the test asserts exactly this list ([`NOT_CREATED_BY_MOTO`]), checks those resources in the template,
//!   creates the Timestream database and table itself from the template's properties, and checks the Glue table's
//!   columns against a Parquet file the cloud wrote;
//! - it ignores some properties of resources it creates (stream mode and encryption, the bucket's public access
//!   block, lifecycle and ownership, the table's point-in-time recovery, the task definition's Fargate settings and
//!   the service's network configuration): the test asserts moto really left each one out (so the list stays true)
//!   and checks the template for it;
//! - its IAM authorization checks resources for S3 only (Kinesis, DynamoDB and Timestream calls are authorized
//!   against `*`) and evaluates no condition keys: the processes run under copies of the policies with the other
//!   services' resources widened to `*` and conditions dropped (actions are checked for every service, S3 keys
//!   against the real resource), and the live policy documents are compared with the stack's ARNs.
#![allow(clippy::unwrap_used)]

use fieldlink_e2e::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Resources of the template moto's CloudFormation does not create, with their types.
const NOT_CREATED_BY_MOTO: &[(&str, &str)] = &[
    ("AthenaWorkGroup", "AWS::Athena::WorkGroup"),
    ("BucketPolicy", "AWS::S3::BucketPolicy"),
    ("GlueDatabase", "AWS::Glue::Database"),
    ("GlueTable", "AWS::Glue::Table"),
    ("TimestreamDatabase", "AWS::Timestream::Database"),
    ("TimestreamTable", "AWS::Timestream::Table"),
    // A placeholder for a conditional dependency; it creates nothing in AWS either.
    (
        "WaitForTimestream",
        "AWS::CloudFormation::WaitConditionHandle",
    ),
];

const N: usize = 6_000;

fn template() -> PathBuf {
    root().join("deploy/aws/fieldlink.yaml")
}

fn stack_py(args: &[&str]) -> Value {
    let mut all = vec![script("aws_stack.py").to_str().unwrap().to_owned()];
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    serde_json::from_str(&run_python(&all)).unwrap()
}

/// Creates stack `name` with `params` on `moto` and returns `aws_stack.py create`'s report.
fn create_stack(moto: &Moto, name: &str, params: &[&str]) -> Value {
    let template = template();
    let mut args = vec!["create", &moto.endpoint, name, template.to_str().unwrap()];
    args.extend_from_slice(params);
    let r = stack_py(&args);
    assert_eq!(
        r["status"], "CREATE_COMPLETE",
        "stack {name}: {}",
        r["reason"]
    );
    r
}

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{pointer} is not a string in {v}"))
}

fn not_created(r: &Value) -> BTreeSet<(String, String)> {
    r["not_created"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect()
}

fn expected_not_created(timestream: bool) -> BTreeSet<(String, String)> {
    NOT_CREATED_BY_MOTO
        .iter()
        .filter(|(id, _)| timestream || !id.starts_with("Timestream"))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// The `FIELDLINK_CLOUD_CONFIG` the task definition gives the container, as moto stored it.
fn cloud_config(r: &Value) -> String {
    let env = r
        .pointer("/live/task_definition/containerDefinitions/0/environment")
        .and_then(Value::as_array)
        .unwrap();
    assert_eq!(env.len(), 1, "the task's environment: {env:?}");
    assert_eq!(env[0]["name"], "FIELDLINK_CLOUD_CONFIG");
    env[0]["value"].as_str().unwrap().to_owned()
}

/// `fieldlink-cloud check-config` accepts `toml`.
fn check_config(dir: &Path, toml: &str) -> String {
    let path = dir.join("stack-cloud.toml");
    std::fs::write(&path, toml).unwrap();
    run_ok(
        Command::new(bin("fieldlink-cloud"))
            .arg("check-config")
            .arg("--config")
            .arg(&path),
    )
}

/// The task role's statements as moto resolved them (moto keeps `AWS::NoValue` items as nulls: dropped).
fn task_statements(r: &Value) -> Vec<Value> {
    r["live"]["task_role"]["fieldlink-cloud"]["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s.is_null())
        .cloned()
        .collect()
}

fn statement<'a>(statements: &'a [Value], sid: &str) -> &'a Value {
    statements
        .iter()
        .find(|s| s["Sid"] == sid)
        .unwrap_or_else(|| panic!("no statement {sid} in {statements:?}"))
}

/// What moto creates and applies, read back live, and what it ignores, checked in the template (after asserting
/// moto really ignored it, so this split stays true).
fn check_resources(r: &Value, shards: u64, retention_hours: u64) {
    let live = &r["live"];
    let t = &r["template"];
    let o = &r["outputs"];

    // Kinesis: shard count and retention live; mode and encryption in the template.
    assert_eq!(s(live, "/stream/StreamStatus"), "ACTIVE");
    assert_eq!(live["stream"]["OpenShardCount"], shards);
    assert_eq!(live["stream"]["RetentionPeriodHours"], retention_hours);
    assert_eq!(
        s(live, "/stream/EncryptionType"),
        "NONE",
        "moto now applies StreamEncryption: check it live"
    );
    assert_eq!(
        t["Stream"]["Properties"]["StreamEncryption"],
        serde_json::json!({"EncryptionType": "KMS", "KeyId": "alias/aws/kinesis"})
    );
    assert_eq!(
        t["Stream"]["Properties"]["StreamModeDetails"]["StreamMode"]["Ref"],
        "StreamMode"
    );
    assert_eq!(s(live, "/stream/StreamARN"), s(o, "/StreamArn"));

    // S3: default encryption live; the rest in the template.
    assert_eq!(
        s(
            live,
            "/bucket/encryption/Rules/0/ApplyServerSideEncryptionByDefault/SSEAlgorithm"
        ),
        "AES256"
    );
    for (what, code) in [
        (
            "public_access_block",
            "NoSuchPublicAccessBlockConfiguration",
        ),
        ("lifecycle", "NoSuchLifecycleConfiguration"),
        ("ownership", "OwnershipControlsNotFoundError"),
        ("policy", "NoSuchBucketPolicy"),
    ] {
        assert_eq!(
            live["bucket"][what]["error"], code,
            "moto now applies the bucket's {what}: check it live"
        );
    }
    let bucket = &t["Bucket"]["Properties"];
    for flag in [
        "BlockPublicAcls",
        "BlockPublicPolicy",
        "IgnorePublicAcls",
        "RestrictPublicBuckets",
    ] {
        assert_eq!(
            bucket["PublicAccessBlockConfiguration"][flag], true,
            "{flag}"
        );
    }
    assert_eq!(
        bucket["OwnershipControls"]["Rules"][0]["ObjectOwnership"],
        "BucketOwnerEnforced"
    );
    let rules = bucket["LifecycleConfiguration"]["Rules"]
        .as_array()
        .unwrap();
    let bronze = rules
        .iter()
        .find(|r| r["Id"] == "bronze-to-cold-storage")
        .unwrap();
    assert_eq!(
        bronze["Transitions"][0]["StorageClass"]["Ref"],
        "BronzeColdStorageClass"
    );
    assert!(rules
        .iter()
        .any(|r| r["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 7));
    // The cloud never deletes SNS markers (docs/alarms.md): the bucket expires them.
    assert!(rules.iter().any(|r| r["Prefix"]
        == serde_json::json!({"Fn::Sub": "${AlarmsPrefix}/_notified/"})
        && r["ExpirationInDays"] == 400));
    let tls = &t["BucketPolicy"]["Properties"]["PolicyDocument"]["Statement"][0];
    assert_eq!(tls["Effect"], "Deny");
    assert_eq!(tls["Principal"], "*");
    assert_eq!(tls["Action"], "s3:*");
    assert_eq!(tls["Condition"]["Bool"]["aws:SecureTransport"], "false");
    assert_eq!(
        tls["Resource"],
        serde_json::json!([{"Fn::GetAtt": ["Bucket", "Arn"]}, {"Fn::Sub": "${Bucket.Arn}/*"}])
    );

    // DynamoDB: the cloud's key schema and on-demand billing live; point-in-time recovery in the template.
    let table = &live["lease_table"];
    assert_eq!(
        table["KeySchema"],
        serde_json::json!([{"AttributeName": "leaseKey", "KeyType": "HASH"}])
    );
    assert_eq!(
        table["AttributeDefinitions"],
        serde_json::json!([{"AttributeName": "leaseKey", "AttributeType": "S"}])
    );
    assert_eq!(
        s(table, "/BillingModeSummary/BillingMode"),
        "PAY_PER_REQUEST"
    );
    assert_eq!(
        s(
            live,
            "/lease_table_backups/PointInTimeRecoveryDescription/PointInTimeRecoveryStatus"
        ),
        "DISABLED",
        "moto now applies point-in-time recovery: check it live"
    );
    assert_eq!(
        t["LeaseTable"]["Properties"]["PointInTimeRecoverySpecification"]
            ["PointInTimeRecoveryEnabled"],
        true
    );

    // IAM, resolved by moto: the agent policy allows exactly three actions on this stream.
    let agent = live["agent_policy"]["Statement"].as_array().unwrap();
    assert_eq!(agent.len(), 1, "{agent:?}");
    assert_eq!(agent[0]["Effect"], "Allow");
    assert_eq!(
        agent[0]["Action"],
        serde_json::json!([
            "kinesis:PutRecords",
            "kinesis:PutRecord",
            "kinesis:DescribeStreamSummary"
        ])
    );
    assert_eq!(agent[0]["Resource"], o["StreamArn"]);
    // The task role's statements name this stack's stream, table and bucket prefix.
    let task = task_statements(r);
    assert_eq!(
        statement(&task, "ReadTheStream")["Resource"],
        o["StreamArn"]
    );
    assert_eq!(
        statement(&task, "Leases")["Resource"],
        table["TableArn"],
        "lease statement"
    );
    assert_eq!(
        s(statement(&task, "BronzeObjects"), "/Resource"),
        format!("arn:aws:s3:::{}/bronze/*", s(o, "/BucketName"))
    );
    let list = statement(&task, "BronzeList");
    assert_eq!(
        s(list, "/Resource"),
        format!("arn:aws:s3:::{}", s(o, "/BucketName"))
    );
    assert_eq!(
        list["Condition"]["StringLike"]["s3:prefix"],
        serde_json::json!(["bronze/*", "alarms/*"])
    );
    assert_eq!(
        s(statement(&task, "AlarmObjects"), "/Resource"),
        format!("arn:aws:s3:::{}/alarms/*", s(o, "/BucketName"))
    );

    // ECS: the container as moto stores it; the Fargate settings it ignores in the template.
    let container = &live["task_definition"]["containerDefinitions"][0];
    assert_eq!(container["stopTimeout"], 120);
    assert_eq!(container["portMappings"][0]["containerPort"], 9465);
    assert_eq!(container["essential"], true);
    assert_eq!(
        container["logConfiguration"]["options"]["awslogs-group"],
        o["LogGroupName"]
    );
    assert_eq!(s(container, "/image"), s(r, "/params/ImageUri"));
    assert_eq!(
        s(live, "/task_definition/networkMode"),
        "bridge",
        "moto now applies NetworkMode: check it live"
    );
    let td = &t["TaskDefinition"]["Properties"];
    assert_eq!(td["NetworkMode"], "awsvpc");
    assert_eq!(
        td["RequiresCompatibilities"],
        serde_json::json!(["FARGATE"])
    );
    assert_eq!(
        td["TaskRoleArn"],
        serde_json::json!({"Fn::GetAtt": ["TaskRole", "Arn"]})
    );
    let service = &live["service"][0];
    assert_eq!(service["desiredCount"], 1);
    assert_eq!(
        service["networkConfiguration"],
        serde_json::json!({}),
        "moto now applies the network configuration: check it live"
    );
    let net = &t["Service"]["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"];
    assert_eq!(net["AssignPublicIp"]["Ref"], "AssignPublicIp");
    assert_eq!(net["Subnets"]["Ref"], "SubnetIds");
    assert_eq!(t["Service"]["Properties"]["LaunchType"], "FARGATE");
    // The service starts after the Timestream table, when there is one.
    assert_eq!(t["Service"]["DependsOn"], "WaitForTimestream");
    assert_eq!(
        t["WaitForTimestream"]["Metadata"]["TimestreamTable"]["Fn::If"][1],
        serde_json::json!({"Ref": "TimestreamTable"})
    );
    assert_eq!(live["log_group"][0]["retentionInDays"], 30);
}

/// The Glue table's columns are the columns of a Parquet file the cloud wrote, in order, each of the type Athena
/// reads it as; its partition projection matches the keys the file was written under.
fn check_glue_table(r: &Value, moto: &Moto, files: &[&str]) {
    let bucket = s(r, "/outputs/BucketName");
    let schema = stack_py(&["schema", &moto.endpoint, bucket, "bronze"]);
    let parquet: Vec<(String, String)> = schema["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c[0].as_str().unwrap().to_owned(),
                c[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let athena_type = |arrow: &str| -> &'static str {
        match arrow {
            "timestamp[ms, tz=UTC]" => "timestamp",
            "string" | "large_string" => "string",
            t if t.starts_with("dictionary<values=string") => "string",
            "double" => "double",
            "bool" => "boolean",
            "map<string, string>" => "map<string,string>",
            t if t.starts_with("int64 (Int(bitWidth=64, isSigned=true))") => "bigint",
            t if t.starts_with("int64 (None)") => "bigint",
            // Athena (Trino) reads an INT64 with an unsigned annotation only as bigint (the same 64 bits).
            t if t.starts_with("uint64 (Int(bitWidth=64, isSigned=false))") => "bigint",
            t => panic!("no Athena type for Parquet column type {t}"),
        }
    };
    let table = &r["template"]["GlueTable"]["Properties"]["TableInput"];
    let glue: Vec<(String, String)> = table["StorageDescriptor"]["Columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["Name"].as_str().unwrap().to_owned(),
                c["Type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = parquet
        .iter()
        .map(|(n, t)| (n.clone(), athena_type(t).to_owned()))
        .collect();
    assert_eq!(
        glue, expected,
        "Glue columns vs {} ({parquet:?})",
        schema["file"]
    );
    let p = &table["Parameters"];
    assert_eq!(p["projection.enabled"], "true");
    assert_eq!(p["projection.dt.type"], "date");
    assert_eq!(p["projection.dt.format"], "yyyy-MM-dd");
    assert_eq!(p["projection.hour.type"], "integer");
    assert_eq!(p["projection.hour.range"], "0,23");
    assert_eq!(p["projection.hour.digits"], "2");
    assert_eq!(
        p["storage.location.template"]["Fn::Sub"],
        "s3://${Bucket}/${BronzePrefix}/dt=${!dt}/hour=${!hour}/"
    );
    let keys: Vec<&str> = table["PartitionKeys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["Name"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["dt", "hour"]);
    // Every bronze file is where the projection looks: <bucket>/bronze/dt=yyyy-MM-dd/hour=HH/<file>.
    for f in files {
        let rest = f
            .strip_prefix(&format!("{bucket}/bronze/dt="))
            .unwrap_or_else(|| panic!("{f} is not under the bronze prefix"));
        let (dt, rest) = rest.split_once("/hour=").unwrap();
        let (hour, name) = rest.split_once('/').unwrap();
        assert!(
            dt.len() == 10 && dt.as_bytes()[4] == b'-' && dt.as_bytes()[7] == b'-',
            "{f}: dt"
        );
        assert!(
            hour.len() == 2 && hour.parse::<u8>().is_ok_and(|h| h < 24),
            "{f}: hour"
        );
        assert!(
            name.ends_with(".parquet") && !name.contains('/'),
            "{f}: file"
        );
    }
}

/// The log lines of `logs` that report a refused AWS call (access denied), each prefixed with its process.
fn refused_calls(logs: &[(&str, PathBuf)]) -> String {
    let mut out = String::new();
    for (name, path) in logs {
        for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
            if line.contains("AccessDenied") || line.contains("not authorized") {
                out.push_str(&format!("{name}: {line}\n"));
            }
        }
    }
    out
}

/// Polls `done` until it holds; on timeout, fails with the refused calls of `logs` (the likely cause here).
fn wait_explained(
    what: &str,
    timeout: Duration,
    logs: &[(&str, PathBuf)],
    mut done: impl FnMut() -> bool,
) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; refused calls:\n{}",
            refused_calls(logs)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn iam_policies_allow_exactly_the_calls_the_code_makes() {
    let check = |template: &Path| {
        Command::new(python())
            .arg(script("aws_iam_check.py"))
            .arg(template)
            .arg(root())
            .output()
            .unwrap()
    };
    let out = check(&template());
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!(
        "cloud calls {:?}; granted ahead for compaction: {}",
        report["cloud_calls"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        report["anticipated_not_yet_called"]
    );

    // The check fails when the role lacks a call the code makes, or allows one it does not.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(template()).unwrap();
    for (from, to, expected) in [
        (
            "                  - s3:PutObject\n",
            "",
            "TaskRole does not allow s3:PutObject, which the cloud calls at cloud/src/store.rs",
        ),
        (
            "                  - kinesis:GetRecords\n",
            "                  - kinesis:GetRecords\n                  - kinesis:DeleteStream\n",
            "TaskRole allows kinesis:DeleteStream, which the cloud code never calls",
        ),
        (
            "              - kinesis:DescribeStreamSummary\n",
            "              - kinesis:DescribeStreamSummary\n              - kinesis:GetRecords\n",
            "AgentPolicy allows",
        ),
    ] {
        // Every statement that has the line loses it (s3:PutObject: the bronze and the alarm objects).
        assert!(text.contains(from), "{from:?} in the template");
        let broken = dir.path().join("broken.yaml");
        std::fs::write(&broken, text.replace(from, to)).unwrap();
        let out = check(&broken);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(expected),
            "expected a failure naming {expected:?}, got: {stderr}"
        );
    }
}

#[test]
fn stack_on_moto_lands_agent_readings_exactly_once_under_its_iam_policies() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    // The dataset is from March 2026: a magnetic store that keeps it, whatever today's date.
    let r = create_stack(
        &moto,
        "fl-stack",
        &[
            "Timestream=true",
            "StreamMode=PROVISIONED",
            "ShardCount=2",
            "StreamRetentionHours=48",
            "TimestreamMagneticDays=73000",
        ],
    );
    assert_eq!(
        not_created(&r),
        expected_not_created(true),
        "resources moto's CloudFormation did not create"
    );
    eprintln!(
        "moto's CloudFormation did not create {:?}: checked in the template (Timestream: created from it here)",
        r["not_created"]
    );
    check_resources(&r, 2, 48);
    let task = task_statements(&r);
    assert_eq!(
        s(statement(&task, "TimestreamWrite"), "/Resource"),
        "arn:aws:timestream:us-east-1:123456789012:database/fieldlink/table/readings"
    );
    assert_eq!(
        statement(&task, "TimestreamEndpointDiscovery")["Action"],
        "timestream:DescribeEndpoints"
    );
    let o = r["outputs"].clone();
    let (stream, bucket) = (s(&o, "/StreamName"), s(&o, "/BucketName"));
    let (database, table) = (
        s(&o, "/TimestreamDatabaseName"),
        s(&o, "/TimestreamTableName"),
    );

    // The configuration the ECS task gets is valid and names the stack's resources.
    let config = cloud_config(&r);
    let checked = check_config(dir.path(), &config);
    assert!(
        checked.contains(&format!("stream {stream}"))
            && checked.contains(&format!("timestream {database}.{table}"))
            && checked.contains(&format!("parquet {}", s(&o, "/BronzeLocation"))),
        "{checked}"
    );
    assert!(
        config.contains(&format!("table = \"{}\"", s(&o, "/LeaseTableName"))),
        "{config}"
    );

    let standin = stack_py(&[
        "timestream-standin",
        &moto.endpoint,
        "fl-stack",
        template().to_str().unwrap(),
    ]);
    assert_eq!(
        standin["table"]["MagneticStoreWriteProperties"]["EnableMagneticStoreWrites"],
        true
    );
    let keys = stack_py(&["principals", &moto.endpoint, "fl-stack"]);
    let creds = |who: &str| {
        vec![
            (
                "AWS_ACCESS_KEY_ID".to_owned(),
                s(&keys, &format!("/{who}/key")).to_owned(),
            ),
            (
                "AWS_SECRET_ACCESS_KEY".to_owned(),
                s(&keys, &format!("/{who}/secret")).to_owned(),
            ),
        ]
    };
    stack_py(&["enforce", &moto.endpoint, "on"]);

    // The cloud service with the stack's configuration, pointed at moto, as the task role.
    let port = free_port();
    let listen = "metrics_listen = \"0.0.0.0:9465\"\n";
    let aws = "[aws]\n";
    assert!(config.contains(listen) && config.contains(aws), "{config}");
    let local = config
        .replace(listen, &format!("metrics_listen = \"127.0.0.1:{port}\"\n"))
        .replace(
            aws,
            &format!("[aws]\nendpoint_url = \"{}\"\n", moto.endpoint),
        );
    let cloud_path = dir.path().join("cloud.toml");
    std::fs::write(&cloud_path, &local).unwrap();
    let mut cmd = Command::new(bin("fieldlink-cloud"));
    cmd.arg("run").arg("--config").arg(&cloud_path);
    aws_env(&mut cmd);
    cmd.envs(creds("cloud-task"));
    let mut cloud = Proc::spawn("fieldlink-cloud", cmd, &dir.path().join("cloud.log"));

    // An agent writing to the stack's stream with the agent policy.
    let mut agent = AgentProc::new(
        dir.path(),
        "stack-agent",
        broker.port,
        &moto.endpoint,
        stream,
        "",
        "",
    );
    agent.env = creds("agent");
    agent.start();
    let published = run_python(&[
        script("publish.py").to_str().unwrap(),
        "127.0.0.1",
        &broker.port.to_string(),
        dataset_path().to_str().unwrap(),
        &N.to_string(),
    ]);
    eprintln!("published: {published}");
    let logs = [
        ("cloud", dir.path().join("cloud.log")),
        ("agent", agent.log.clone()),
    ];
    wait_explained(
        "the agent to send every reading",
        Duration::from_secs(60),
        &logs,
        || agent.metric("fieldlink_readings_sent_total") as usize >= N,
    );
    let metric = |name: &str| {
        http_get(port, "/metrics")
            .and_then(|m| metric(&m, name))
            .unwrap_or(0.0)
    };
    wait_explained(
        "the cloud to land every reading",
        Duration::from_secs(90),
        &logs,
        || metric("fieldlink_cloud_readings_landed_total") as usize >= N,
    );
    let (status, health) = http_status(port, "/health").unwrap();
    assert_eq!(status, 200, "{health}");
    assert_eq!(metric("fieldlink_cloud_sink_errors_total"), 0.0);
    // A graceful stop commits the staged Parquet files (S3 PutObject under the task role) and the checkpoints.
    cloud.terminate(Duration::from_secs(60));
    agent.stop();
    // One compaction round publishes the closed hours (the dataset's are long past) under the task role too: its
    // S3 list, get, put and delete under the prefix and the compactor's lease item.
    let mut compact = Command::new(bin("fieldlink-cloud"));
    compact
        .arg("compact")
        .arg("--once")
        .arg("--config")
        .arg(&cloud_path);
    aws_env(&mut compact);
    compact.envs(creds("cloud-task"));
    eprintln!("compact --once: {}", run_ok(&mut compact));
    stack_py(&["enforce", &moto.endpoint, "off"]);
    assert_eq!(refused_calls(&logs), "", "calls were refused");

    let v: Value = read_landed(&moto.endpoint, database, table, bucket, "bronze");
    let expected = counted(
        dataset(N)
            .into_iter()
            .map(|(s, ts, v)| (s, ts, v.to_bits())),
    );
    for sink in ["timestream", "parquet"] {
        let got = counted(landed_rows(&v, sink));
        assert!(
            got == expected,
            "{}",
            describe_difference(sink, &expected, &got)
        );
    }
    assert_eq!(v["dead_letters"], serde_json::json!([]));
    let files: Vec<&str> = v["parquet_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    check_glue_table(&r, &moto, &files);
    eprintln!(
        "{N} readings landed once in s3://{bucket}/bronze ({} files) and {database}.{table}",
        files.len()
    );
}

#[test]
fn stack_without_timestream_configures_parquet_only() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let r = create_stack(&moto, "fl-default", &[]);
    assert_eq!(not_created(&r), expected_not_created(false));
    // Defaults: on-demand stream (moto makes one provisioned shard of it: checked in the template), 24 h.
    check_resources(&r, 1, 24);
    assert_eq!(s(&r, "/params/StreamMode"), "ON_DEMAND");
    assert_eq!(
        r["template"]["Stream"]["Properties"]["ShardCount"]["Fn::If"][2]["Ref"],
        "AWS::NoValue"
    );
    for key in ["TimestreamDatabaseName", "TimestreamTableName"] {
        assert!(r["outputs"].get(key).is_none(), "output {key}");
    }
    let task = task_statements(&r);
    assert!(
        task.iter()
            .all(|s| !s["Sid"].as_str().unwrap().starts_with("Timestream")),
        "{task:?}"
    );
    let config = cloud_config(&r);
    assert!(!config.contains("[timestream]"), "{config}");
    let checked = check_config(dir.path(), &config);
    assert!(checked.contains("timestream off"), "{checked}");
}
