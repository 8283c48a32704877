//! Batching: turning buffered rows into wire-format batches that fit one Kinesis record.
//!
//! Pure and synchronous. [`fit`] finds the longest prefix of rows whose encoded record fits the size limit,
//! halving on overflow, so a batch is always a prefix of the buffer in arrival order: the buffer can then delete
//! exactly the rows it sealed.

mod config;
pub use config::{BatchConfig, MAX_RECORD_BYTES};

use fieldlink_proto::{Batch, EncodeError, Encoder, Reading, Series};
use std::collections::HashMap;

/// A buffered reading as the batcher sees it: the buffer's series id plus the wire reading fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The buffer's series id.
    pub series_id: i64,
    /// The reading (its `series` field is ignored and reassigned per batch).
    pub reading: Reading,
}

/// Builds the batch for `rows`, numbering series in first-appearance order.
pub fn assemble(
    agent_id: &str,
    seq: u64,
    rows: &[Row],
    series_of: &dyn Fn(i64) -> Option<Series>,
) -> Result<Batch, EncodeError> {
    let mut index: HashMap<i64, u32> = HashMap::new();
    let mut batch = Batch {
        agent_id: agent_id.to_owned(),
        seq,
        series: Vec::new(),
        readings: Vec::with_capacity(rows.len()),
    };
    for row in rows {
        let next = batch.series.len() as u32;
        let idx = match index.get(&row.series_id) {
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
        };
        let mut r = row.reading.clone();
        r.series = idx;
        batch.readings.push(r);
    }
    Ok(batch)
}

/// Encodes the longest prefix of `rows` (at most all of them) whose record is at most `max_bytes`.
/// Returns how many rows it took and the record. Halves the prefix while the record is too large.
pub fn fit(
    encoder: &mut Encoder,
    agent_id: &str,
    seq: u64,
    rows: &[Row],
    max_bytes: usize,
    series_of: &dyn Fn(i64) -> Option<Series>,
) -> Result<(usize, Vec<u8>), EncodeError> {
    let mut n = rows.len();
    loop {
        let record = encoder.encode(&assemble(agent_id, seq, &rows[..n], series_of)?)?;
        if record.len() <= max_bytes || n == 1 {
            if record.len() > max_bytes {
                return Err(EncodeError::Invalid {
                    what: "reading",
                    why: format!("one reading encodes to {} bytes", record.len()),
                });
            }
            return Ok((n, record));
        }
        n = n.div_ceil(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldlink_proto::{decode, Quality, Value};

    fn rows(n: usize, series: i64) -> Vec<Row> {
        (0..n)
            .map(|i| Row {
                series_id: (i as i64) % series,
                reading: Reading {
                    series: 0,
                    ts_ms: 1_000 + i as i64,
                    value: Value::Str(format!("{i:0>200}")),
                    quality: Quality::Good,
                    late: false,
                },
            })
            .collect()
    }

    fn lookup(id: i64) -> Option<Series> {
        Some(Series::new(format!("dev/{id}")))
    }

    #[test]
    fn assemble_numbers_series_by_first_appearance_and_keeps_row_order() {
        let r = rows(5, 2);
        let b = assemble("a", 1, &r, &lookup).unwrap_or_default();
        assert_eq!(b.series, vec![Series::new("dev/0"), Series::new("dev/1")]);
        assert_eq!(
            b.readings.iter().map(|r| r.series).collect::<Vec<_>>(),
            vec![0, 1, 0, 1, 0]
        );
    }

    #[test]
    fn fit_takes_everything_when_it_fits() {
        let mut enc = Encoder::new(3).unwrap_or_else(|e| panic!("{e}"));
        let r = rows(100, 3);
        let (n, rec) =
            fit(&mut enc, "a", 1, &r, 1 << 20, &lookup).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, 100);
        assert_eq!(decode(&rec).map(|b| b.readings.len()).ok(), Some(100));
    }

    #[test]
    fn fit_shrinks_to_a_prefix_under_the_limit() {
        let mut enc = Encoder::new(1).unwrap_or_else(|e| panic!("{e}"));
        // Incompressible strings so the size is predictable.
        let r: Vec<Row> = (0..2000)
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
        let (n, rec) =
            fit(&mut enc, "a", 1, &r, 16 * 1024, &lookup).unwrap_or_else(|e| panic!("{e}"));
        assert!(rec.len() <= 16 * 1024);
        assert!(n < 2000 && n > 100, "took {n}");
        assert_eq!(decode(&rec).map(|b| b.readings.len()).ok(), Some(n));
    }
}
