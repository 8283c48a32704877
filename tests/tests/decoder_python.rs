//! The independent Python decoder (`tests/python/fieldlink_decode.py`, written from `proto/FORMAT.md`) reads
//! records of both format versions made by the Rust encoder and gets the same readings, doubles bit for bit.
#![allow(clippy::unwrap_used)]

use fieldlink_e2e::{run_python, script};
use fieldlink_proto::{decode, Batch, Encoder, Quality, Reading, Series, Value, Version};
use serde_json::Value as Json;

fn batches() -> Vec<Batch> {
    // Every type, quality and the late flag; tags; negative deltas; extreme values.
    let edge = Batch {
        agent_id: "edge-1".into(),
        epoch: 0,
        seq: u64::MAX,
        series: vec![
            Series {
                key: "a/x".into(),
                tags: vec![
                    ("site".into(), "münchen".into()),
                    ("line".into(), String::new()),
                ],
            },
            Series::new("b"),
        ],
        readings: vec![
            Reading {
                series: 1,
                ts_ms: i64::MIN,
                value: Value::I64(i64::MAX),
                quality: Quality::Good,
                late: false,
            },
            Reading {
                series: 1,
                ts_ms: i64::MAX,
                value: Value::I64(i64::MIN),
                quality: Quality::Bad,
                late: true,
            },
            Reading {
                series: 0,
                ts_ms: 5,
                value: Value::F64(f64::NAN),
                quality: Quality::Uncertain,
                late: false,
            },
            Reading {
                series: 0,
                ts_ms: 3,
                value: Value::F64(-0.0),
                quality: Quality::Good,
                late: true,
            },
            Reading {
                series: 0,
                ts_ms: 4,
                value: Value::Bool(false),
                quality: Quality::Good,
                late: false,
            },
            Reading {
                series: 1,
                ts_ms: 0,
                value: Value::Str("ünïcødé".into()),
                quality: Quality::Good,
                late: false,
            },
        ],
    };
    // Real data: the first 5000 readings of the dataset.
    let data = fieldlink_e2e::dataset(5000);
    let mut keys: Vec<String> = data.iter().map(|(s, _, _)| s.clone()).collect();
    keys.sort();
    keys.dedup();
    let real = Batch {
        agent_id: "edge-2".into(),
        epoch: 0x0123_4567_89ab_cdef,
        seq: 42,
        series: keys.iter().map(Series::new).collect(),
        readings: data
            .iter()
            .map(|(s, ts, v)| Reading {
                series: keys.binary_search(s).unwrap() as u32,
                ts_ms: *ts,
                value: Value::F64(*v),
                quality: Quality::Good,
                late: false,
            })
            .collect(),
    };
    // Doubles that take every version 2 path: decimals with exceptions (NaN payloads, -0.0, infinities,
    // subnormals, 17-digit values) among them, a series of nothing but exceptions, integers as differences.
    let specials = [
        f64::from_bits(0x7ff8_dead_beef_0001),
        -0.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::from_bits(1),
        0.1 + 0.2,
        9_007_199_254_740_992.0,
        1e22,
        1e-22,
    ];
    let mut exact = Batch {
        agent_id: "edge-3".into(),
        epoch: 3,
        seq: 3,
        series: vec![
            Series {
                key: "plant/meter/000/value".into(),
                tags: vec![("site".into(), "muc".into())],
            },
            Series {
                key: "plant/meter/001/value".into(),
                tags: vec![("site".into(), "muc".into())],
            },
            Series::new("plant/meter/001/count"),
        ],
        readings: Vec::new(),
    };
    for i in 0..400i64 {
        let decimal: f64 = format!("{}.{:02}", 230 + i % 13, (i * 37) % 100)
            .parse()
            .unwrap();
        let v0 = if i % 40 == 7 {
            specials[(i / 40) as usize % specials.len()]
        } else {
            decimal
        };
        for (series, value) in [
            (0, Value::F64(v0)),
            (1, Value::F64(specials[i as usize % specials.len()])),
            (2, Value::I64(1_000_000 + i * 3)),
        ] {
            exact.readings.push(Reading {
                series,
                ts_ms: 1_772_431_200_000 + i * 1000 + (i % 3),
                value,
                quality: Quality::Good,
                late: false,
            });
        }
    }
    vec![edge, real, exact]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn as_json(b: &Batch) -> Json {
    let readings: Vec<Json> = b
        .readings
        .iter()
        .map(|r| {
            let (t, v) = match &r.value {
                Value::F64(f) => ("f64", Json::from(hex(&f.to_le_bytes()))),
                Value::I64(i) => ("i64", Json::from(*i)),
                Value::Bool(x) => ("bool", Json::from(*x)),
                Value::Str(s) => ("str", Json::from(s.clone())),
            };
            serde_json::json!([r.series, r.ts_ms, t, v, r.quality as u8, r.late])
        })
        .collect();
    let series: Vec<Json> = b
        .series
        .iter()
        .map(|s| {
            serde_json::json!([
                s.key,
                s.tags.iter().map(|(k, v)| [k, v]).collect::<Vec<_>>()
            ])
        })
        .collect();
    serde_json::json!({"agent_id": b.agent_id, "epoch": b.epoch, "seq": b.seq, "series": series, "readings": readings})
}

#[test]
fn python_decoder_reads_what_the_rust_encoder_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![script("fieldlink_decode.py").to_str().unwrap().to_owned()];
    let mut expected = Vec::new();
    let mut encoder = Encoder::new(3).unwrap();
    for (i, b) in batches().iter().enumerate() {
        for version in [Version::V1, Version::V2] {
            let record = encoder.encode_version(b, version).unwrap();
            let path = dir.path().join(format!("r{i}-{}.bin", version as u8));
            std::fs::write(&path, &record).unwrap();
            args.push(path.to_str().unwrap().to_owned());
            let mut want = as_json(&decode(&record).unwrap());
            want["version"] = Json::from(record[4]);
            expected.push(want);
        }
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_python(&refs);
    let got: Vec<Json> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g, e);
    }
    // Both versions of the real-data batch really carried 5000 readings, and the larger batches were version 2.
    assert_eq!(got[2]["readings"].as_array().map(Vec::len), Some(5000));
    assert_eq!(got[3]["readings"].as_array().map(Vec::len), Some(5000));
    let versions: Vec<u64> = got.iter().map(|g| g["version"].as_u64().unwrap()).collect();
    assert_eq!(versions[2..], [1, 2, 1, 2]);
}

#[test]
fn python_decoder_reads_alarm_records_the_rust_encoder_writes() {
    use fieldlink_proto::alarm::{AlarmBatch, AlarmEncoder, AlarmEvent, Cause, Level};
    let level = |severity: u8, name: &str| Level {
        severity,
        name: name.into(),
    };
    let causes = [
        Some(Cause {
            ts_ms: -3,
            value: Value::F64(-0.0),
            quality: Quality::Uncertain,
        }),
        Some(Cause {
            ts_ms: i64::MAX,
            value: Value::I64(i64::MIN),
            quality: Quality::Bad,
        }),
        Some(Cause {
            ts_ms: 0,
            value: Value::Bool(true),
            quality: Quality::Good,
        }),
        Some(Cause {
            ts_ms: 1,
            value: Value::Str("tür offen".into()),
            quality: Quality::Good,
        }),
        None,
    ];
    let batch = AlarmBatch {
        agent_id: "edge-1".into(),
        epoch: u64::MAX,
        seq: 7,
        events: causes
            .iter()
            .enumerate()
            .map(|(i, c)| AlarmEvent {
                rule: format!("rule-{i}"),
                rule_seq: u64::MAX - i as u64,
                series: Series {
                    key: "line3/robot/vib".into(),
                    tags: vec![("site".into(), "münchen".into())],
                },
                from: level(0, "ok"),
                to: level(255, "critical"),
                ts_ms: i64::MIN + i as i64,
                cause: c.clone(),
            })
            .collect(),
    };
    let record = AlarmEncoder::new(3).unwrap().encode(&batch).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alarms.bin");
    std::fs::write(&path, &record).unwrap();
    let out = run_python(&[
        script("fieldlink_decode.py").to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    let got: Json = serde_json::from_str(out.trim()).unwrap();
    let events: Vec<Json> = batch
        .events
        .iter()
        .map(|e| {
            let cause = e.cause.as_ref().map(|c| {
                let (t, v) = match &c.value {
                    Value::F64(f) => ("f64", Json::from(hex(&f.to_le_bytes()))),
                    Value::I64(i) => ("i64", Json::from(*i)),
                    Value::Bool(x) => ("bool", Json::from(*x)),
                    Value::Str(s) => ("str", Json::from(s.clone())),
                };
                serde_json::json!([c.ts_ms, t, v, c.quality as u8])
            });
            serde_json::json!({"rule": e.rule, "rule_seq": e.rule_seq, "series": e.series.key,
                "tags": [["site", "münchen"]], "from": [e.from.severity, e.from.name],
                "to": [e.to.severity, e.to.name], "ts_ms": e.ts_ms, "cause": cause})
        })
        .collect();
    assert_eq!(
        got,
        serde_json::json!({"version": 1, "agent_id": "edge-1", "epoch": u64::MAX, "seq": 7, "series": [], "readings": [],
            "alarms": events})
    );
}
