//! Delivery guarantees of the agent against real Mosquitto and moto server (through a fault-injecting proxy where
//! moto cannot produce the fault): SIGKILL at random moments, Kinesis outages, a buffer cap that is too small,
//! rejected entries and throttled calls.
//!
//! `FIELDLINK_CRASH_ROUNDS` sets the number of kill rounds (default 20; `deploy/crash-test.sh` runs 100).

use fieldlink_e2e::*;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// Each batch id that appears more than once in the stream has identical content.
fn assert_resends_identical(records: &[DumpedRecord]) -> usize {
    let mut by_id: HashMap<(String, u64), &str> = HashMap::new();
    let mut resent = 0;
    for r in records {
        if let Some(prev) = by_id.insert((r.agent.clone(), r.seq), &r.sha256) {
            assert_eq!(
                prev, r.sha256,
                "batch {} of {} was resent with different content",
                r.seq, r.agent
            );
            resent += 1;
        }
    }
    resent
}

/// Asserts each acknowledged number is in Kinesis exactly once (a batch the agent resent counts once, as the
/// cloud skips it; its copies must be byte-identical): a multiset, so a doubled reading fails.
fn assert_exactly_once(acked: &[u64], records: &[DumpedRecord]) {
    let problem = exactly_once(acked, &numbers_in(&unique_batches(records)));
    assert!(problem.is_empty(), "{problem}");
}

/// The acknowledged numbers not (yet) in Kinesis.
fn missing(acked: &[u64], records: &[DumpedRecord]) -> Vec<u64> {
    let got: BTreeSet<u64> = numbers_in(records).into_iter().collect();
    acked.iter().copied().filter(|n| !got.contains(n)).collect()
}

#[test]
fn every_acknowledged_reading_survives_sigkill_at_random_moments() {
    let rounds: usize = std::env::var("FIELDLINK_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    moto.create("crash", 1, "unused-db", "unused-table", "unused-bucket");
    let mut agent = AgentProc::new(
        dir.path(),
        "crash-agent",
        broker.port,
        &moto.endpoint,
        "crash",
        "durability = \"full\"",
        "",
    );
    agent.start(); // the persistent session exists from here on: the broker queues for the agent while it is dead

    let rate = 1500.0;
    let count = (rate * 0.45 * rounds as f64) as usize + 1000;
    let (port, path) = (broker.port, dir.path().to_path_buf());
    let publisher = std::thread::spawn(move || {
        let acked = publish_numbered(port, count, rate, 0, &path);
        (acked, Instant::now())
    });
    let kills = sigkill_rounds(&mut agent, rounds);
    let (acked, published) = publisher.join().unwrap();
    assert!(
        acked.len() > count * 9 / 10,
        "the broker acknowledged only {} of {count}",
        acked.len()
    );
    // The kills must hit an agent taking data, not one idling after the publisher finished.
    let while_publishing = kills.iter().filter(|&&k| k < published).count();
    assert!(
        while_publishing >= rounds / 4,
        "only {while_publishing} of {rounds} kills came while readings were published"
    );

    wait_for(
        "every acknowledged reading in Kinesis",
        Duration::from_secs(120),
        || {
            let records = kinesis_dump(&moto.endpoint, "crash");
            missing(&acked, &records).is_empty().then_some(())
        },
    );
    // Judged on what the stream holds once the agent has stopped (a graceful stop sends what it holds): a copy
    // sent after the first complete dump counts too.
    agent.stop();
    let records = kinesis_dump(&moto.endpoint, "crash");
    let resent = assert_resends_identical(&records);
    assert_exactly_once(&acked, &records);
    eprintln!(
        "{rounds} SIGKILL rounds ({while_publishing} while publishing): {} readings acknowledged by the broker, all in Kinesis; {} records, {resent} resent byte-identical",
        acked.len(),
        records.len()
    );
}

#[test]
fn an_outage_is_buffered_and_drained_and_a_small_cap_drops_exactly_what_it_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, moto, proxy) = broker_and_proxied_stream(dir.path(), "outage", 1);

    // Ample cap: everything is kept through the outage and drains afterwards.
    let mut agent = AgentProc::new(
        dir.path(),
        "outage-agent",
        broker.port,
        &proxy.endpoint,
        "outage",
        "",
        "",
    );
    agent.start();
    proxy.set("down=1");
    let acked = publish_numbered(broker.port, 3000, 3000.0, 0, dir.path());
    wait_for(
        "the agent to buffer every reading",
        Duration::from_secs(30),
        || (agent.metric("fieldlink_readings_received_total") >= acked.len() as f64).then_some(()),
    );
    wait_for(
        "readings sealed while Kinesis is down",
        Duration::from_secs(30),
        || (agent.metric("fieldlink_buffer_pending_readings") > 0.0).then_some(()),
    );
    assert_eq!(agent.metric("fieldlink_readings_sent_total"), 0.0);
    let health = http_get(agent.metrics_port, "/health").unwrap();
    let line = health
        .lines()
        .find(|l| l.starts_with("kinesis: FAIL"))
        .unwrap_or_else(|| panic!("{health}"));
    // One short sentence naming the failure, not the SDK's nested debug structures.
    assert!(
        line.len() < 200 && !line.contains('{') && line.contains("on PutRecords (transient)"),
        "{line}"
    );
    proxy.set("down=0");
    wait_for("the backlog to drain", Duration::from_secs(90), || {
        (agent.metric("fieldlink_readings_sent_total") >= acked.len() as f64
            && agent.metric("fieldlink_buffer_pending_readings") == 0.0)
            .then_some(())
    });
    let records = kinesis_dump(&moto.endpoint, "outage");
    assert_exactly_once(&acked, &records);
    let (received, accounted) = agent.ledger();
    assert_eq!(received, accounted, "ledger");
    agent.stop();

    // A 1 MiB cap with 1 KB readings: drop_oldest must drop, and count exactly what it dropped.
    let mut small = AgentProc::new(
        dir.path(),
        "small-agent",
        broker.port,
        &proxy.endpoint,
        "outage",
        "max_bytes = 1048576\noverflow = \"drop_oldest\"",
        "",
    );
    small.start();
    proxy.set("down=1");
    let acked = publish_numbered(broker.port, 3000, 3000.0, 1000, dir.path());
    wait_for(
        "the agent to take every reading",
        Duration::from_secs(30),
        || {
            (small.metric("fieldlink_readings_received_total") >= 2.0 * acked.len() as f64)
                .then_some(())
        },
    );
    wait_for("the cap to be enforced", Duration::from_secs(30), || {
        (small.metric("fieldlink_readings_dropped_total") > 0.0).then_some(())
    });
    wait_for("/health to show the drops", Duration::from_secs(15), || {
        http_get(small.metrics_port, "/health")
            .filter(|h| h.contains("buffer: FAIL drop_oldest dropped"))
    });
    wait_for("the burst to be sealed", Duration::from_secs(30), || {
        (small.metric("fieldlink_buffer_unsealed_readings") == 0.0).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500)); // one more seal tick and a failed call
    let bytes = small.metric("fieldlink_buffer_bytes");
    assert!(
        bytes <= 1_048_576.0,
        "buffer at {bytes} bytes, above its 1 MiB cap"
    );
    proxy.set("down=0");
    wait_for("the rest to drain", Duration::from_secs(90), || {
        (small.metric("fieldlink_buffer_pending_readings") == 0.0
            && small.metric("fieldlink_buffer_unsealed_readings") == 0.0)
            .then_some(())
    });
    let (received, accounted) = small.ledger();
    assert_eq!(received, accounted, "ledger with drops");
    let sent = small.metric("fieldlink_readings_sent_total");
    let dropped = small.metric("fieldlink_readings_dropped_total");
    // Each batch once (a resend after a lost response may repeat one).
    let mut seen = BTreeSet::new();
    let in_stream: usize = kinesis_dump(&moto.endpoint, "outage")
        .iter()
        .filter(|r| r.agent == "small-agent" && seen.insert(r.seq))
        .map(|r| r.readings.len())
        .sum();
    assert_eq!(
        in_stream as f64, sent,
        "Kinesis holds exactly the readings counted as sent"
    );
    assert_eq!(
        sent + dropped,
        2.0 * acked.len() as f64,
        "every reading is sent or counted as dropped"
    );
    small.stop();

    // The same cap with backpressure: the agent stops taking data (the broker holds it), drops nothing, and
    // after the outage every acknowledged reading arrives.
    let mut bp = AgentProc::new(
        dir.path(),
        "bp-agent",
        broker.port,
        &proxy.endpoint,
        "outage",
        "max_bytes = 1048576\noverflow = \"backpressure\"",
        "",
    );
    bp.start();
    proxy.set("down=1");
    let acked_bp = publish_numbered(broker.port, 3000, 3000.0, 1000, dir.path());
    wait_for("the cap to be reached", Duration::from_secs(30), || {
        (bp.metric("fieldlink_buffer_bytes") >= 1_048_576.0 * 0.9).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let taken = bp.metric("fieldlink_readings_received_total");
    assert!(
        taken < 2.0 * acked_bp.len() as f64 * 0.8,
        "backpressure did not stop intake: {taken} readings taken"
    );
    // Intake resumes only while seals shrink the counted size below the cap (records are compressed): the
    // buffer stays at its cap, past it by one commit at most.
    for _ in 0..10 {
        let bytes = bp.metric("fieldlink_buffer_bytes");
        assert!(
            bytes <= 1.25 * 1_048_576.0,
            "backpressure let the buffer grow to {bytes} bytes, cap 1 MiB"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for("/health to show the pause", Duration::from_secs(15), || {
        http_get(bp.metrics_port, "/health").filter(|h| h.contains("intake paused"))
    });
    proxy.set("down=0");
    wait_for(
        "everything to arrive after the outage",
        Duration::from_secs(120),
        || {
            (bp.metric("fieldlink_readings_received_total") >= 2.0 * acked_bp.len() as f64
                && bp.metric("fieldlink_buffer_pending_readings") == 0.0
                && bp.metric("fieldlink_buffer_unsealed_readings") == 0.0)
                .then_some(())
        },
    );
    let bp_records: Vec<DumpedRecord> = kinesis_dump(&moto.endpoint, "outage")
        .into_iter()
        .filter(|r| r.agent == "bp-agent")
        .collect();
    assert_exactly_once(&acked_bp, &bp_records);
    assert_eq!(bp.metric("fieldlink_readings_dropped_total"), 0.0);
    let (received, accounted) = bp.ledger();
    assert_eq!(received, accounted, "ledger with backpressure");
    bp.stop();
    eprintln!("outage: 3000 readings buffered and drained; drop_oldest: {sent} sent, {dropped} dropped (counted exactly); backpressure: intake paused at {taken} readings, nothing lost");
}

/// A backlog left by an outage drains at about one shard's rate: the fault proxy refuses `PutRecords` entries past
/// a 256 KiB/s budget as a Kinesis shard past its 1 MiB/s does, and the agent's rate is set to that shard's. Each
/// call holds at most one second at the current rate. Before December 2026 a call held up to Kinesis' 5 MiB:
/// every call of the backlog had entries refused, each halved the rate, and the rate sat at its floor (a backlog
/// of hours drained at about 3 KiB/s while new data came faster, until the cap dropped it).
#[test]
fn a_backlog_drains_at_the_shards_rate_after_an_outage() {
    const RATE: f64 = 262_144.0;
    let dir = tempfile::tempdir().unwrap();
    let (broker, moto, proxy) = broker_and_proxied_stream(dir.path(), "shard", 1);
    let mut agent = AgentProc::new(
        dir.path(),
        "shard-agent",
        broker.port,
        &proxy.endpoint,
        "shard",
        "",
        &format!("max_bytes_per_second = {RATE}\n"),
    );
    // A loaded machine can hold an attempt past the tests' usual 3 s, and a timed-out call halves the rate: not
    // what this test measures.
    let config = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("attempt_timeout_ms = 3000", "attempt_timeout_ms = 15000");
    std::fs::write(&agent.config, config).unwrap();
    agent.start();
    proxy.set("down=1");
    let acked = publish_numbered(broker.port, 4000, 4000.0, 1000, dir.path());
    wait_for(
        "the backlog sealed while Kinesis is down",
        Duration::from_secs(60),
        || {
            (agent.metric("fieldlink_readings_received_total") >= acked.len() as f64
                && agent.metric("fieldlink_buffer_unsealed_readings") == 0.0)
                .then_some(())
        },
    );
    proxy.set(&format!("down=0&shard_bytes_per_s={RATE}"));
    let restored = std::time::Instant::now();
    let state = |what: &str| format!("{what}: proxy {}; {}", proxy.stats(), agent.diagnosis());
    // Timed from the first record sent: the backoff left from the outage (up to 20 s) is not the drain. On a
    // loaded machine the first calls can also time out (15 s each, each followed by a backoff).
    while agent.metric("fieldlink_readings_sent_total") == 0.0 {
        assert!(
            restored.elapsed() < Duration::from_secs(120),
            "{}",
            state("nothing sent 120 s after Kinesis came back")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = std::time::Instant::now();
    eprintln!(
        "first record sent {:.1} s after Kinesis came back",
        (started - restored).as_secs_f64()
    );
    while !(agent.metric("fieldlink_buffer_pending_readings") == 0.0
        && agent.metric("fieldlink_readings_sent_total") >= acked.len() as f64)
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{}",
            state("the backlog did not drain in 120 s")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = started.elapsed().as_secs_f64();
    let stats = proxy.stats();
    let bytes = stats["shard_accepted_bytes"].as_f64().unwrap();
    let ideal = bytes / RATE;
    eprintln!(
        "backlog of {:.0} KiB drained in {took:.1} s at the shard's {:.0} KiB/s (ideal {ideal:.1} s); {} entries refused past the shard's budget",
        bytes / 1024.0,
        RATE / 1024.0,
        stats["shard_refused_entries"]
    );
    assert!(
        bytes > 8.0 * RATE,
        "a backlog of {bytes} bytes is too small to tell"
    );
    assert!(
        took <= 2.0 * ideal + 5.0,
        "drained in {took:.1} s, the shard allowed {ideal:.1} s"
    );
    let records = kinesis_dump(&moto.endpoint, "shard");
    assert_exactly_once(&acked, &records);
    agent.stop();
}

/// A gateway whose clock is off by hours (booted without a battery-backed clock before NTP, or on a plant network
/// without NTP): AWS refuses a signature more than 5 minutes from its clock, so every call would fail and the
/// buffer fill until the clock is set. The AWS SDK measures the skew from the service's `Date` and signs by it;
/// this test holds the agent to that, for a clock behind and one ahead, through a proxy that refuses signatures
/// as AWS does (moto checks none).
#[test]
fn a_gateway_clock_hours_off_still_sends_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, moto, proxy) = broker_and_proxied_stream(dir.path(), "skew", 1);
    proxy.set("max_skew_s=300");
    let mut acked = Vec::new();
    for (i, offset) in ["-7200", "+5400"].into_iter().enumerate() {
        let mut agent = AgentProc::new(
            dir.path(),
            &format!("skew-agent-{i}"),
            broker.port,
            &proxy.endpoint,
            "skew",
            "",
            "",
        );
        agent.env = faketime_env(("FAKETIME", offset));
        agent.start();
        let refused = proxy.stats()["skew_refused"].as_u64().unwrap();
        acked.extend(publish_numbered_from(
            broker.port,
            i as u64 * 1000,
            300,
            300.0,
            0,
            dir.path(),
        ));
        let health = wait_for(
            &format!("clock {offset} s: everything sent"),
            Duration::from_secs(60),
            || {
                (agent.metric("fieldlink_readings_sent_total") >= 300.0)
                    .then(|| http_get(agent.metrics_port, "/health"))
                    .flatten()
            },
        );
        agent.stop();
        let now_refused = proxy.stats()["skew_refused"].as_u64().unwrap();
        eprintln!("clock {offset} s: {} calls refused for their signature's time before the agent signed by Kinesis' clock", now_refused - refused);
        assert!(
            now_refused > refused,
            "the proxy refused no call of the agent whose clock is {offset} s off: the test would not see a failure"
        );
        assert!(health.contains("kinesis: ok"), "{health}");
    }
    assert_exactly_once(&acked, &kinesis_dump(&moto.endpoint, "skew"));
}

#[test]
fn rejected_entries_and_throttled_calls_lose_nothing_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, moto, proxy) = broker_and_proxied_stream(dir.path(), "faults", 2);
    // First every entry rejected: Kinesis answers, nothing moves, and /health says so.
    proxy.set("reject=1");
    let mut agent = AgentProc::new(
        dir.path(),
        "fault-agent",
        broker.port,
        &proxy.endpoint,
        "faults",
        "",
        "",
    );
    // Small records, so that each call carries many entries to reject.
    let config = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("[batch]\n", "[batch]\ntarget_record_bytes = 1024\n");
    std::fs::write(&agent.config, config).unwrap();
    agent.start();
    let first = publish_numbered(broker.port, 300, 3000.0, 0, dir.path());
    let line = wait_for(
        "/health to report the rejected records",
        Duration::from_secs(30),
        || {
            http_get(agent.metrics_port, "/health")?
                .lines()
                .find(|l| l.starts_with("kinesis: FAIL") && l.contains("records rejected"))
                .map(str::to_owned)
        },
    );
    assert!(
        line.contains("ProvisionedThroughputExceededException") || line.contains("InternalFailure"),
        "{line}"
    );
    assert_eq!(agent.metric("fieldlink_readings_sent_total"), 0.0);
    // Then random shares, plus every fourth call throttled: the whole run takes only ten or so calls.
    proxy.set("reject=0.3&throttle=0.25&throttle_every=4");
    let mut acked = first;
    acked.extend(publish_numbered_from(
        broker.port,
        300,
        5700,
        3000.0,
        0,
        dir.path(),
    ));
    wait_for(
        "every reading sent despite the faults",
        Duration::from_secs(120),
        || {
            (agent.metric("fieldlink_readings_sent_total") >= acked.len() as f64
                && agent.metric("fieldlink_buffer_pending_readings") == 0.0)
                .then_some(())
        },
    );
    let records = kinesis_dump(&moto.endpoint, "faults");
    assert_exactly_once(&acked, &records);
    assert_resends_identical(&records);
    let stats = proxy.stats();
    let rejected = stats["rejected_entries"].as_f64().unwrap();
    let throttled = stats["throttled_calls"].as_f64().unwrap();
    assert!(
        rejected > 0.0 && throttled > 0.0,
        "the proxy injected nothing: {stats}"
    );
    // The agent counted exactly what the proxy injected.
    assert_eq!(agent.metric("fieldlink_records_rejected_total"), rejected);
    assert_eq!(agent.metric("fieldlink_put_calls_failed_total"), throttled);
    assert!(agent.metric("fieldlink_send_throttled_total") > 0.0);
    let (received, accounted) = agent.ledger();
    assert_eq!(received, accounted, "ledger");
    let health = http_get(agent.metrics_port, "/health").unwrap();
    assert!(health.contains("kinesis: ok"), "{health}");
    agent.stop();
    eprintln!("faults: {} readings, {rejected} entries rejected and {throttled} calls throttled by the proxy, all retried, none lost", acked.len());
}

/// A graceful stop lets the `PutRecords` call in flight finish and records its acknowledgements before the process
/// exits: with a slow Kinesis (the fault proxy holds every call 600 ms, so a call is in flight at almost every
/// SIGTERM) and a steady QoS 1 stream, several SIGTERM/restart rounds leave every batch `(agent, epoch, seq)` in
/// Kinesis exactly once, and every reading the broker acknowledged exactly once.
#[test]
fn graceful_stops_finish_the_call_in_flight_and_resend_nothing() {
    let rounds = 5;
    let dir = tempfile::tempdir().unwrap();
    let (broker, moto, proxy) = broker_and_proxied_stream(dir.path(), "graceful", 1);
    let mut agent = AgentProc::new(
        dir.path(),
        "graceful-agent",
        broker.port,
        &proxy.endpoint,
        "graceful",
        "",
        "",
    );
    // Small records: each call carries several, and some are pending behind the call in flight.
    let config = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("[batch]\n", "[batch]\ntarget_record_bytes = 1024\n");
    std::fs::write(&agent.config, config).unwrap();
    proxy.set("delay_ms=600");
    agent.start();

    let (rate, count) = (800.0, 8000);
    let (port, path) = (broker.port, dir.path().to_path_buf());
    let publisher = std::thread::spawn(move || publish_numbered(port, count, rate, 0, &path));
    let seed = fastrand::u64(..);
    eprintln!("stop schedule seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut calls_at_stop = Vec::new();
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(rng.u64(800..1600)));
        let before = proxy.stats()["calls"].as_u64().unwrap();
        agent.stop();
        calls_at_stop.push(proxy.stats()["calls"].as_u64().unwrap() - before);
        agent.start();
    }
    let acked = publisher.join().unwrap();
    assert!(
        acked.len() > count * 9 / 10,
        "the broker acknowledged only {} of {count}",
        acked.len()
    );
    proxy.set("delay_ms=0");
    wait_for(
        "every acknowledged reading in Kinesis",
        Duration::from_secs(120),
        || {
            let records = kinesis_dump(&moto.endpoint, "graceful");
            missing(&acked, &records).is_empty().then_some(())
        },
    );
    agent.stop();
    let records = kinesis_dump(&moto.endpoint, "graceful");
    assert_exactly_once(&acked, &records);
    let mut batches: HashMap<(String, u64, u64), usize> = HashMap::new();
    for r in &records {
        *batches
            .entry((r.agent.clone(), r.epoch, r.seq))
            .or_insert(0) += 1;
    }
    let resent: Vec<_> = batches.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        resent.is_empty(),
        "{} of {} batches are in Kinesis more than once after {rounds} graceful stops, e.g. {:?}",
        resent.len(),
        batches.len(),
        resent.iter().take(5).collect::<Vec<_>>()
    );
    let mut numbers: HashMap<u64, usize> = HashMap::new();
    for n in numbers_in(&records) {
        *numbers.entry(n).or_insert(0) += 1;
    }
    let doubled: Vec<_> = numbers.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(doubled.is_empty(), "readings doubled, e.g. {doubled:?}");
    assert_eq!(
        numbers.len(),
        acked.len(),
        "every acknowledged reading once"
    );
    eprintln!(
        "{rounds} graceful stops with a 600 ms Kinesis: {} batches and {} readings in Kinesis, each once; PutRecords calls seen during each stop: {calls_at_stop:?}",
        batches.len(),
        acked.len()
    );
}

/// An operator who does not want to wait for the drain signals again: the agent exits at once (status 130)
/// instead of draining for its full `shutdown_drain_ms` with Kinesis unreachable, and the next start sends every
/// acknowledged reading once.
#[test]
fn a_second_signal_during_the_drain_exits_at_once_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, moto, proxy) = broker_and_proxied_stream(dir.path(), "second", 1);
    let mut agent = AgentProc::new(
        dir.path(),
        "second-agent",
        broker.port,
        &proxy.endpoint,
        "second",
        "",
        "",
    );
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace("shutdown_drain_ms = 2000", "shutdown_drain_ms = 60000"),
    )
    .unwrap();
    agent.start();
    proxy.set("down=1");
    let acked = publish_numbered(broker.port, 1000, 1000.0, 0, dir.path());
    wait_for(
        "the agent to take every reading",
        Duration::from_secs(30),
        || (agent.metric("fieldlink_readings_received_total") >= acked.len() as f64).then_some(()),
    );

    let proc = agent.proc.as_mut().unwrap();
    assert!(proc.signal("-TERM"));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        proc.exited().is_none(),
        "with Kinesis down the stop drains for up to 60 s"
    );
    let t = Instant::now();
    assert!(proc.signal("-TERM"));
    let status = wait_for("the exit", Duration::from_secs(5), || proc.exited());
    let took = t.elapsed();
    assert_eq!(status.code(), Some(130), "{}", proc.log_text());
    assert!(took < Duration::from_secs(2), "the exit took {took:?}");
    assert!(proc.log_text().contains("second shutdown signal"));
    agent.proc = None;

    proxy.set("down=0");
    agent.start();
    wait_for(
        "every acknowledged reading in Kinesis",
        Duration::from_secs(60),
        || {
            let got: BTreeSet<u64> = numbers_in(&kinesis_dump(&moto.endpoint, "second"))
                .into_iter()
                .collect();
            acked.iter().all(|n| got.contains(n)).then_some(())
        },
    );
    agent.stop();
    assert_exactly_once(&acked, &kinesis_dump(&moto.endpoint, "second"));
    eprintln!(
        "second signal: exit 130 after {took:?}; {} acknowledged readings each once after the next start",
        acked.len()
    );
}
