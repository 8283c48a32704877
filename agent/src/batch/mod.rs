//! Batching: released readings → wire-format records that fit one Kinesis record. Pure and synchronous.
//!
//! The readings arrive grouped by device (the series key without its last segment, plus tags) and, within a
//! series, in event-time order. [`Builder::build`] cuts them into batches **only between devices**, so all readings of
//! one device and time travel together (one Timestream multi-measure record). A batch closes when its estimated
//! compressed size reaches `target_record_bytes` or it holds `max_readings`; the estimate is the bytes per
//! reading of the batches built before (so it follows the wire format version, `wire_version`: version 2 packs
//! two to three times as many readings into a record). Every record is actually encoded, and one above
//! `max_record_bytes` is split in two (between devices if it has several, else between readings) until it fits:
//! no record exceeds Kinesis' limit whatever the estimate said.

mod config;
pub use config::{BatchConfig, MAX_RECORD_BYTES};

use fieldlink_proto::{Batch, EncodeError, Encoder, Reading, Series};
use foldhash::{HashMap, HashMapExt};

/// A released reading with the buffer's id of its series.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The buffer's series id.
    pub series_id: i64,
    /// The reading (its `series` field is reassigned per batch).
    pub reading: Reading,
}

/// One built record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// Its batch sequence number.
    pub seq: u64,
    /// The record bytes.
    pub record: Vec<u8>,
    /// Readings inside.
    pub readings: usize,
}

/// Builds the batch for `rows`, numbering series in first-appearance order.
pub fn assemble(
    agent_id: &str,
    epoch: u64,
    seq: u64,
    rows: &[Row],
    series_of: &dyn Fn(i64) -> Option<Series>,
) -> Result<Batch, EncodeError> {
    let mut index: HashMap<i64, u32> = HashMap::new();
    let mut batch = Batch {
        agent_id: agent_id.to_owned(),
        epoch,
        seq,
        series: Vec::new(),
        readings: Vec::with_capacity(rows.len()),
    };
    // Rows come grouped by series (`device_order`): the index is looked up once per run, not per row.
    let mut last: Option<(i64, u32)> = None;
    for row in rows {
        let next = batch.series.len() as u32;
        let idx = match last.filter(|l| l.0 == row.series_id).map(|l| l.1) {
            Some(i) => i,
            None => match index.get(&row.series_id) {
                Some(&i) => i,
                None => {
                    let s = series_of(row.series_id).ok_or_else(|| EncodeError::Invalid {
                        what: "series",
                        why: format!("buffer has no series with id {}", row.series_id),
                    })?;
                    batch.series.push(s);
                    index.insert(row.series_id, next);
                    next
                }
            },
        };
        last = Some((row.series_id, idx));
        let mut r = row.reading.clone();
        r.series = idx;
        batch.readings.push(r);
    }
    Ok(batch)
}

/// Splits device groups (their reading counts, in order) into runs of groups: each run closes once its estimated
/// size reaches `target_bytes` or adding the next group would pass `max_readings`. Returns the group count of
/// each run.
pub fn plan(
    group_lens: &[usize],
    bytes_per_reading: f64,
    target_bytes: usize,
    max_readings: usize,
) -> Vec<usize> {
    let mut runs = Vec::new();
    let mut g = 0;
    while g < group_lens.len() {
        let run = next_run(
            &group_lens[g..],
            bytes_per_reading,
            target_bytes,
            max_readings,
        );
        runs.push(run);
        g += run;
    }
    runs
}

/// The first run of [`plan`]: how many of `group_lens` go into the next record (at least one).
pub fn next_run(
    group_lens: &[usize],
    bytes_per_reading: f64,
    target_bytes: usize,
    max_readings: usize,
) -> usize {
    let (mut groups, mut readings) = (0usize, 0usize);
    for &len in group_lens {
        if groups > 0
            && (readings + len > max_readings
                || readings as f64 * bytes_per_reading >= target_bytes as f64)
        {
            break;
        }
        groups += 1;
        readings += len;
    }
    groups
}

/// Context of one [`Builder::build`] call.
pub struct Builder<'a> {
    /// Reused encoder.
    pub encoder: &'a mut Encoder,
    /// Agent id written in every record.
    pub agent_id: &'a str,
    /// The buffer's epoch, written in every record.
    pub epoch: u64,
    /// Series lookup.
    pub series_of: &'a dyn Fn(i64) -> Option<Series>,
    /// Limits.
    pub cfg: &'a BatchConfig,
}

impl std::fmt::Debug for Builder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

impl Builder<'_> {
    /// Builds the records of `rows` (grouped by device), numbered from `first_seq`. `bytes_per_reading` is the
    /// running estimate; it is updated from what was built.
    pub fn build(
        &mut self,
        rows: &[Row],
        first_seq: u64,
        bytes_per_reading: &mut f64,
    ) -> Result<Vec<Built>, EncodeError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // Device group boundaries.
        let mut bounds = vec![0usize];
        // Each series' device as a small number, looked up once per series (not a key clone per reading).
        let mut device_of: HashMap<i64, usize> = HashMap::new();
        let mut devices: HashMap<String, usize> = HashMap::new();
        let mut prev: Option<usize> = None;
        for (i, r) in rows.iter().enumerate() {
            let dev = *device_of.entry(r.series_id).or_insert_with(|| {
                let key = (self.series_of)(r.series_id)
                    .map(|s| device_key(&s))
                    .unwrap_or_default();
                let n = devices.len();
                *devices.entry(key).or_insert(n)
            });
            if prev.is_some_and(|p| p != dev) {
                bounds.push(i);
            }
            prev = Some(dev);
        }
        bounds.push(rows.len());
        let lens: Vec<usize> = bounds.windows(2).map(|w| w[1] - w[0]).collect();
        let mut out = Vec::new();
        let mut seq = first_seq;
        let mut g = 0usize;
        while g < lens.len() {
            let run = next_run(
                &lens[g..],
                *bytes_per_reading,
                self.cfg.target_record_bytes,
                self.cfg.max_readings,
            );
            let (start, end) = (bounds[g], bounds[g + run]);
            let inner: Vec<usize> = bounds[g..=g + run].iter().map(|b| b - start).collect();
            let before = out.len();
            self.encode_span(&rows[start..end], &inner, &mut seq, &mut out)?;
            g += run;
            // A record closed by the estimate (more follow) measures what a full record costs a reading now: plan
            // the next one with it, so the estimate follows the data (and the wire version) within one seal. The
            // last record of a seal is usually short, and dearer per reading (its series table is shared by
            // fewer): it only nudges the estimate.
            let (bytes, readings) = out[before..]
                .iter()
                .fold((0, 0), |(b, n), x| (b + x.record.len(), n + x.readings));
            if readings > 0 {
                let measured = bytes as f64 / readings as f64;
                *bytes_per_reading = if g < lens.len() {
                    measured
                } else {
                    0.5 * *bytes_per_reading + 0.5 * measured
                };
            }
        }
        Ok(out)
    }

    /// Encodes `rows` as one record, splitting in two while it is too large. `bounds` are the device boundaries
    /// inside `rows` (first 0, last `rows.len()`).
    fn encode_span(
        &mut self,
        rows: &[Row],
        bounds: &[usize],
        seq: &mut u64,
        out: &mut Vec<Built>,
    ) -> Result<(), EncodeError> {
        let record = self.encoder.encode_version(
            &assemble(self.agent_id, self.epoch, *seq, rows, self.series_of)?,
            self.cfg.version(),
        )?;
        if record.len() <= self.cfg.max_record_bytes {
            out.push(Built {
                seq: *seq,
                record,
                readings: rows.len(),
            });
            *seq += 1;
            return Ok(());
        }
        if bounds.len() > 2 {
            let mid = bounds.len() / 2;
            let cut = bounds[mid];
            let right: Vec<usize> = bounds[mid..].iter().map(|b| b - cut).collect();
            self.encode_span(&rows[..cut], &bounds[..=mid], seq, out)?;
            return self.encode_span(&rows[cut..], &right, seq, out);
        }
        if rows.len() > 1 {
            let cut = rows.len() / 2;
            self.encode_span(&rows[..cut], &[0, cut], seq, out)?;
            return self.encode_span(&rows[cut..], &[0, rows.len() - cut], seq, out);
        }
        Err(EncodeError::Invalid {
            what: "reading",
            why: format!("one reading encodes to {} bytes", record.len()),
        })
    }
}

/// The grouping key of a series' device: device path and tags.
pub fn device_key(s: &Series) -> String {
    let mut k = s.device().to_owned();
    for (n, v) in &s.tags {
        k.push('\u{1f}');
        k.push_str(n);
        k.push('=');
        k.push_str(v);
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldlink_proto::{decode, Quality, Value};

    fn lookup(id: i64) -> Option<Series> {
        // Series ids 0..: device = id / 6, six measures per device.
        Some(Series::new(format!("dev/{}/m{}", id / 6, id % 6)))
    }

    fn builder<'a>(encoder: &'a mut Encoder, cfg: &'a BatchConfig) -> Builder<'a> {
        Builder {
            encoder,
            agent_id: "a",
            epoch: 1,
            series_of: &lookup,
            cfg,
        }
    }

    fn rows_for(devices: i64, per_device_ts: i64, value: impl Fn(i64) -> Value) -> Vec<Row> {
        let mut rows = Vec::new();
        for d in 0..devices {
            for m in 0..6 {
                for t in 0..per_device_ts {
                    rows.push(Row {
                        series_id: d * 6 + m,
                        reading: Reading {
                            series: 0,
                            ts_ms: t,
                            value: value(t),
                            quality: Quality::Good,
                            late: false,
                        },
                    });
                }
            }
        }
        rows
    }

    #[test]
    fn a_series_met_again_after_another_keeps_its_index() {
        let mut rows = rows_for(1, 2, |t| Value::F64(t as f64));
        rows.truncate(4); // series 0, 0, 1, 1
        rows.push(rows[0].clone()); // series 0 again
        let b = assemble("a", 1, 1, &rows, &lookup).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.series.len(), 2);
        let idx: Vec<u32> = b.readings.iter().map(|r| r.series).collect();
        assert_eq!(idx, vec![0, 0, 1, 1, 0]);
    }

    #[test]
    fn plan_closes_runs_on_size_target_and_count() {
        assert_eq!(plan(&[10, 10, 10, 10], 1.0, 20, 1000), vec![2, 2]);
        assert_eq!(plan(&[10, 10, 10, 10], 0.001, 1 << 20, 25), vec![2, 2]);
        assert_eq!(plan(&[100], 1.0, 10, 10), vec![1]); // one group alone may exceed
        assert!(plan(&[], 1.0, 10, 10).is_empty());
    }

    #[test]
    fn batches_are_cut_only_between_devices_and_hold_every_reading() {
        let rows = rows_for(40, 20, |t| Value::F64(t as f64 * 0.37));
        let mut enc = Encoder::new(3).unwrap_or_else(|e| panic!("{e}"));
        let cfg = BatchConfig {
            target_record_bytes: 2000,
            ..BatchConfig::default()
        };
        let mut b = builder(&mut enc, &cfg);
        let mut ratio = 10.0;
        let built = b.build(&rows, 7, &mut ratio).unwrap_or_default();
        assert!(
            built.len() > 1,
            "expected several batches, got {}",
            built.len()
        );
        assert_eq!(
            built.iter().map(|x| x.seq).collect::<Vec<_>>(),
            (7..7 + built.len() as u64).collect::<Vec<_>>()
        );
        let mut devices_seen = std::collections::HashSet::new();
        let mut total = 0;
        for x in &built {
            let batch = decode(&x.record).unwrap_or_default();
            total += batch.readings.len();
            let devices: std::collections::HashSet<String> =
                batch.series.iter().map(|s| s.device().to_owned()).collect();
            for d in devices {
                assert!(
                    devices_seen.insert(d.clone()),
                    "device {d} split across batches"
                );
            }
        }
        assert_eq!(total, rows.len());
    }

    #[test]
    fn oversized_records_are_split_until_they_fit() {
        // Incompressible strings: one device with 2000 readings of 64 random bytes is far above 16 KiB.
        let rows: Vec<Row> = (0..2000)
            .map(|i| Row {
                series_id: 0,
                reading: Reading {
                    series: 0,
                    ts_ms: i,
                    value: Value::Str((0..64).map(|_| fastrand::alphanumeric()).collect()),
                    quality: Quality::Good,
                    late: false,
                },
            })
            .collect();
        let mut enc = Encoder::new(1).unwrap_or_else(|e| panic!("{e}"));
        let cfg = BatchConfig {
            max_record_bytes: 16 * 1024,
            target_record_bytes: 1 << 20,
            ..BatchConfig::default()
        };
        let mut b = builder(&mut enc, &cfg);
        let built = b.build(&rows, 1, &mut 10.0).unwrap_or_default();
        assert!(built.len() >= 8);
        assert!(built.iter().all(|x| x.record.len() <= 16 * 1024));
        assert_eq!(built.iter().map(|x| x.readings).sum::<usize>(), 2000);
    }

    /// `devices` devices of six decimal measures, `per_device_ts` readings each, 1 s apart: values as a sensor
    /// prints them (three decimals), a random walk per series: about 1.8 bytes a reading in version 2.
    fn decimal_rows(devices: i64, per_device_ts: i64) -> Vec<Row> {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut level = 0i64;
        rows_for(devices, per_device_ts, |_| Value::F64(0.0))
            .into_iter()
            .map(|mut r| {
                if r.reading.ts_ms == 0 {
                    level = rng.i64(100_000..500_000);
                }
                level += rng.i64(-300..=300);
                let text = format!("{}.{:03}", level / 1000, level % 1000);
                r.reading.value = Value::F64(text.parse().unwrap_or_default());
                r.reading.ts_ms = 1_772_431_200_000 + 1000 * r.reading.ts_ms;
                r
            })
            .collect()
    }

    #[test]
    fn v2_records_fill_to_the_target_and_stay_within_the_limits() {
        let rows = decimal_rows(400, 40); // 96,000 readings
        let mut enc = Encoder::new(3).unwrap_or_else(|e| panic!("{e}"));
        let cfg = BatchConfig::default();
        assert_eq!(cfg.version(), fieldlink_proto::Version::V2);
        let mut b = builder(&mut enc, &cfg);
        // The estimate starts where the buffer starts it (10 bytes a reading) and learns from each build.
        let mut ratio = 10.0;
        let _ = b.build(&rows, 1, &mut ratio).unwrap_or_default();
        let built = b.build(&rows, 100, &mut ratio).unwrap_or_default();
        assert!(built.len() >= 3, "{} records", built.len());
        let mut total = 0;
        for (i, x) in built.iter().enumerate() {
            assert_eq!(x.record[4], 2, "record {i} is not version 2");
            assert!(x.record.len() <= cfg.max_record_bytes);
            let batch = decode(&x.record).unwrap_or_default();
            assert_eq!(batch.readings.len(), x.readings);
            total += x.readings;
            if i + 1 < built.len() {
                // Filled toward 24 KiB, not cut short by the reading cap.
                assert!(
                    x.record.len() * 10 >= cfg.target_record_bytes * 9,
                    "record {i}: {} bytes, {} readings ({:.2} B/reading)",
                    x.record.len(),
                    x.readings,
                    x.record.len() as f64 / x.readings as f64
                );
                assert!(x.record.len() <= cfg.target_record_bytes * 5 / 4);
            }
        }
        assert_eq!(total, rows.len());
    }

    #[test]
    fn wire_version_1_is_written_when_configured() {
        let rows = decimal_rows(20, 40);
        let mut enc = Encoder::new(3).unwrap_or_else(|e| panic!("{e}"));
        for (version, byte) in [(1u8, 1u8), (2, 2)] {
            let cfg = BatchConfig {
                wire_version: version,
                ..BatchConfig::default()
            };
            let mut b = builder(&mut enc, &cfg);
            let built = b.build(&rows, 1, &mut 10.0).unwrap_or_default();
            assert!(!built.is_empty());
            for x in &built {
                assert_eq!(x.record[4], byte);
                assert_eq!(
                    decode(&x.record).unwrap_or_default().readings.len(),
                    x.readings
                );
            }
        }
    }

    #[test]
    fn an_unknown_wire_version_is_refused_naming_the_field() {
        for bad in [0u8, 3, 255] {
            let cfg = BatchConfig {
                wire_version: bad,
                ..BatchConfig::default()
            };
            let problems = cfg.validate("batch");
            assert_eq!(
                problems,
                vec![format!("batch.wire_version: must be 1 or 2, got {bad}")]
            );
        }
        assert!(BatchConfig::default().validate("batch").is_empty());
    }
}
