//! The agent's alarm engine against an independent Python model (`tests/python/alarm_model.py`, written from
//! `docs/alarms.md`): seeded random sequences of readings (random walks across the limits, gaps longer than the
//! stale times, bad and uncertain quality, strings, booleans, NaN) and stale-clock ticks go through both; the
//! transitions must be identical, sequence numbers included. The seed is printed; `ALARM_SEED=<n>` replays one.
#![allow(clippy::unwrap_used)]

use fieldlink_agent::alarm::{AlarmsConfig, Engine, Obs, Transition};
use fieldlink_e2e::*;
use fieldlink_proto::{Quality, Series, Value};
use serde_json::{json, Value as Json};

const RULES: &str = r##"
[[rules]]
name = "vib"
series = "line3/+/+/vib"
condition = "above"
levels = [{ name = "warning", limit = 4.0 }, { name = "critical", limit = 8.0 }]
hysteresis = 0.5
on_delay_ms = 2000
off_delay_ms = 5000

[[rules]]
name = "vib-fast"
series = "line3/#"
tags = { cell = "a" }
condition = "above"
levels = [{ name = "high", limit = 6.0 }]

[[rules]]
name = "low"
series = "line3/+/+/vib"
condition = "below"
levels = [{ name = "low", limit = 1.0 }, { name = "very-low", limit = -2.0 }]
hysteresis = 0.3
off_delay_ms = 1000

[[rules]]
name = "ramp"
series = "line3/+/+/vib"
condition = "rate"
span_ms = 5000
levels = [{ name = "fast", limit = 1.5 }, { name = "very-fast", limit = 3.0 }]
hysteresis = 0.2
on_delay_ms = 1000

[[rules]]
name = "silent"
series = "#"
condition = "stale"
levels = [{ name = "late", after_ms = 20000 }, { name = "dead", after_ms = 60000 }]

[[rules]]
name = "quality"
series = "line3/#"
condition = "quality"
levels = [{ name = "doubtful", quality = "uncertain" }, { name = "bad", quality = "bad" }]
on_delay_ms = 1500
"##;

fn value_json(v: &Value) -> Json {
    match v {
        Value::F64(f) => json!(["f64", format!("{f}")]),
        Value::I64(i) => json!(["i64", i]),
        Value::Bool(b) => json!(["bool", b]),
        Value::Str(s) => json!(["str", s]),
    }
}

fn transition_json(e: &Engine, t: &Transition) -> Json {
    json!([
        e.rules()[t.rule].name,
        t.rule_seq,
        t.series_id,
        t.from,
        t.to,
        t.ts_ms,
        t.cause.as_ref().map(|c| c.ts_ms)
    ])
}

fn one_run(seed: u64) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    let cfg: AlarmsConfig = toml::from_str(RULES).unwrap();
    assert!(cfg.validate("alarms", &[]).is_empty());
    let rules_json: Json = toml::from_str::<Json>(RULES).unwrap()["rules"].clone();
    let mut engine = Engine::from_config(&cfg);
    let series = [
        Series {
            key: "line3/robot/000/vib".into(),
            tags: vec![("cell".into(), "a".into())],
        },
        Series::new("line3/robot/001/vib"),
        Series::new("plant/meter/kwh"),
    ];
    let mut ts = [0i64; 3];
    let mut level = [3.0f64; 3];
    let (mut items, mut got) = (Vec::new(), Vec::new());
    let mut out = Vec::new();
    for _ in 0..400 {
        if rng.u8(..) < 20 {
            // A tick of the stale clock somewhere ahead of the readings.
            let clock = ts.iter().max().unwrap() + rng.i64(0..90_000);
            engine.tick(clock, &mut out);
            items.push(json!({ "tick": clock }));
            continue;
        }
        let s = rng.usize(0..3);
        ts[s] += match rng.u8(..) {
            0..=9 => rng.i64(20_000..120_000), // a gap: stale levels
            10..=19 => 0,                      // the same time again
            _ => rng.i64(1..2_500),
        };
        level[s] = (level[s] + rng.f64() * 4.0 - 2.0).clamp(-5.0, 12.0);
        let value = match rng.u8(..) {
            0..=4 => Value::Str("fault".into()),
            5..=9 => Value::Bool(rng.bool()),
            10..=12 => Value::F64(f64::NAN),
            13..=20 => Value::I64(level[s].round() as i64),
            _ => Value::F64((level[s] * 100.0).round() / 100.0),
        };
        let quality = match rng.u8(..) {
            0..=14 => Quality::Bad,
            15..=29 => Quality::Uncertain,
            _ => Quality::Good,
        };
        let sid = s as i64 + 1;
        engine.observe(
            sid,
            &series[s],
            Obs {
                ts_ms: ts[s],
                value: &value,
                quality,
            },
            &mut out,
        );
        items.push(json!({ "obs": [sid, series[s].key, series[s].tags, ts[s], value_json(&value), quality as u8] }));
    }
    got.extend(out.iter().map(|t| transition_json(&engine, t)));
    let want = alarm_model(&rules_json, &items);
    if got != want {
        let first = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "seed {seed}: engine and model differ at transition {first} (engine {} transitions, model {}):\n engine: {:?}\n model:  {:?}",
            got.len(),
            want.len(),
            got.get(first),
            want.get(first)
        );
    }
    got.len()
}

#[test]
fn the_engine_gives_exactly_the_transitions_of_the_python_model() {
    let seeds: Vec<u64> = match std::env::var("ALARM_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => {
            let base = fastrand::u64(..);
            (0..40).map(|i| base.wrapping_add(i)).collect()
        }
    };
    let mut total = 0;
    for seed in &seeds {
        eprintln!("seed {seed}");
        total += one_run(*seed);
    }
    eprintln!("{} runs, {total} transitions, all equal", seeds.len());
    assert!(
        total > seeds.len() * 10,
        "too few transitions to mean anything: {total}"
    );
}
