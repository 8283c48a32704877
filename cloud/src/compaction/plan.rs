//! What a compaction round does, decided from the lease table and a listing of the landing area. Pure.

use crate::lease::Lease;
use crate::parquet::encode::parse_partition;
use crate::parquet::{partition, LANDING};
use crate::store::ObjectInfo;
use std::collections::BTreeMap;

/// One hour, ms.
pub const HOUR_MS: i64 = 3_600_000;

/// The directory (under the location) of the compactor's own records, outside the table.
pub const STATE: &str = "_compaction";

/// The time before which every live shard has checkpointed every record that arrived: the lowest watermark of
/// the shards not read to their end. `None` while that is unknown: no lease at all, or a live shard whose
/// reader has not written a watermark yet (nothing can be closed then). Every lease finished: `i64::MAX`.
pub fn fleet_watermark(leases: &[Lease]) -> Option<i64> {
    if leases.is_empty() {
        return None;
    }
    leases
        .iter()
        .filter(|l| !l.finished())
        .try_fold(i64::MAX, |min, l| Some(min.min(l.watermark_ms?)))
}

/// The closing rule, for the hour starting at `hour * HOUR_MS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    /// How long after an hour's end its late data is waited for, ms.
    pub grace_ms: i64,
    /// Hours are published as soon as they have begun (and republished while data arrives).
    pub open_hours: bool,
}

impl Closing {
    /// Whether `hour` is closed at fleet watermark `watermark`: every live shard's watermark is past the hour's
    /// end plus the grace (with `open_hours`: past the hour's start).
    pub fn closed(&self, hour: i64, watermark: Option<i64>) -> bool {
        let Some(w) = watermark else { return false };
        let due = if self.open_hours {
            hour.saturating_mul(HOUR_MS)
        } else {
            (hour.saturating_add(1))
                .saturating_mul(HOUR_MS)
                .saturating_add(self.grace_ms)
        };
        due <= w
    }
}

/// The hour of a landing key `_landing/dt=YYYY-MM-DD/hour=HH/<name>.parquet`; `None` for anything else.
pub fn landing_hour(key: &str) -> Option<i64> {
    let rest = key.strip_prefix(LANDING)?.strip_prefix('/')?;
    let (part, name) = rest.rsplit_once('/')?;
    if !name.ends_with(".parquet") || name.contains('/') {
        return None;
    }
    parse_partition(part)
}

/// The published prefix of `hour`: `dt=YYYY-MM-DD/hour=HH/`.
pub fn published_prefix(hour: i64) -> String {
    format!("{}/", partition(hour))
}

/// The key of published part `name` of `hour`.
pub fn published_key(hour: i64, name: &str) -> String {
    format!("{}/{name}", partition(hour))
}

/// Whether a key under an hour's directory is a published part (`…/part-NNNNN.parquet`).
pub fn is_part(key: &str) -> bool {
    let name = key.rsplit('/').next().unwrap_or(key);
    name.strip_prefix("part-")
        .and_then(|r| r.strip_suffix(".parquet"))
        .is_some_and(|n| n.len() == 5 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The key of the record of an hour's part boundaries (written before its first publication's parts; an empty
/// list for an hour of one part).
pub fn boundaries_key(hour: i64) -> String {
    format!("{STATE}/{}/boundaries.json", partition(hour))
}

/// One hour to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourWork {
    /// Hours since the Unix epoch.
    pub hour: i64,
    /// Its landing files, by key.
    pub inputs: Vec<ObjectInfo>,
}

/// What a round does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Closed hours with landing files, oldest first.
    pub hours: Vec<HourWork>,
    /// Hours with landing files that are not closed yet.
    pub open: Vec<i64>,
    /// Landing keys that are not landing files of an hour (left alone).
    pub strays: Vec<String>,
}

/// The round for a listing of the landing area at fleet watermark `watermark`.
pub fn plan(landing: &[ObjectInfo], watermark: Option<i64>, closing: Closing) -> Plan {
    let mut by_hour: BTreeMap<i64, Vec<ObjectInfo>> = BTreeMap::new();
    let mut strays = Vec::new();
    for o in landing {
        match landing_hour(&o.key) {
            Some(h) => by_hour.entry(h).or_default().push(o.clone()),
            None => strays.push(o.key.clone()),
        }
    }
    let mut p = Plan {
        strays,
        ..Plan::default()
    };
    for (hour, inputs) in by_hour {
        if closing.closed(hour, watermark) {
            p.hours.push(HourWork { hour, inputs });
        } else {
            p.open.push(hour);
        }
    }
    p
}

/// How far the published hours trail the closed ones, seconds: from the start of the oldest closed hour still in
/// the landing area (`pending`, after a round: the hours it could not publish) to the end of the newest closed
/// hour (at most the newest hour with landing files). 0 when every closed hour is published.
pub fn lag_seconds(pending: &[i64], watermark: Option<i64>, closing: Closing) -> i64 {
    let Some(&oldest) = pending.iter().min() else {
        return 0;
    };
    let newest_pending = pending.iter().copied().max().unwrap_or(oldest);
    let newest_closed = match watermark {
        Some(w) if w == i64::MAX => newest_pending,
        Some(w) if closing.open_hours => w.div_euclid(HOUR_MS),
        Some(w) => (w - closing.grace_ms).div_euclid(HOUR_MS) - 1,
        None => return 0,
    };
    ((newest_closed.min(newest_pending) + 1 - oldest) * HOUR_MS / 1000).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{SHARD_END, TRIM_HORIZON};

    fn lease(key: &str, checkpoint: &str, watermark: Option<i64>) -> Lease {
        Lease {
            key: key.into(),
            owner: None,
            counter: 0,
            checkpoint: checkpoint.into(),
            pending: None,
            parents: Vec::new(),
            take_counter: None,
            watermark_ms: watermark,
        }
    }

    fn obj(key: &str) -> ObjectInfo {
        ObjectInfo {
            key: key.into(),
            size: 1,
        }
    }

    const H: i64 = 492_342; // 2026-03-02T06:00Z

    #[test]
    fn the_fleet_watermark_is_the_lowest_live_shard_watermark() {
        assert_eq!(fleet_watermark(&[]), None);
        let a = lease("a", "5", Some(100));
        let b = lease("b", "7", Some(50));
        let done = lease("c", SHARD_END, None);
        assert_eq!(
            fleet_watermark(&[a.clone(), b.clone(), done.clone()]),
            Some(50)
        );
        // A live shard no reader has committed holds everything back.
        let fresh = lease("d", TRIM_HORIZON, None);
        assert_eq!(fleet_watermark(&[a, fresh]), None);
        // Every shard read to its end: everything that will ever arrive is in.
        assert_eq!(fleet_watermark(&[done]), Some(i64::MAX));
    }

    #[test]
    fn an_hour_closes_when_the_watermark_passes_its_end_plus_the_grace() {
        let c = Closing {
            grace_ms: 600_000,
            open_hours: false,
        };
        let end = (H + 1) * HOUR_MS;
        assert!(!c.closed(H, None));
        assert!(!c.closed(H, Some(end)));
        assert!(!c.closed(H, Some(end + 599_999)));
        assert!(c.closed(H, Some(end + 600_000)));
        assert!(c.closed(H, Some(i64::MAX)));
        let open = Closing {
            grace_ms: 600_000,
            open_hours: true,
        };
        assert!(open.closed(H, Some(H * HOUR_MS)));
        assert!(!open.closed(H, Some(H * HOUR_MS - 1)));
        assert!(!open.closed(H, None));
    }

    #[test]
    fn landing_keys_name_their_hour() {
        assert_eq!(
            landing_hour("_landing/dt=2026-03-02/hour=06/shardId-000000000001-49.parquet"),
            Some(H)
        );
        assert_eq!(
            landing_hour("dt=2026-03-02/hour=06/part-00000.parquet"),
            None
        );
        assert_eq!(landing_hour("_landing/dt=2026-03-02/hour=06/x.json"), None);
        assert_eq!(landing_hour("_landing/dt=2026-03-02/x.parquet"), None);
        assert_eq!(
            landing_hour("_landing/dt=2026-03-02/hour=06/a/x.parquet"),
            None
        );
        assert_eq!(
            published_key(H, "part-00000.parquet"),
            "dt=2026-03-02/hour=06/part-00000.parquet"
        );
        assert_eq!(published_prefix(H), "dt=2026-03-02/hour=06/");
        assert!(is_part("dt=2026-03-02/hour=06/part-00000.parquet"));
        assert!(is_part("dt=2026-03-02/hour=06/part-00012.parquet"));
        assert!(!is_part(
            "dt=2026-03-02/hour=06/shardId-000000000000-49.parquet"
        ));
        assert!(!is_part("dt=2026-03-02/hour=06/part-0.parquet"));
        assert_eq!(
            boundaries_key(H),
            "_compaction/dt=2026-03-02/hour=06/boundaries.json"
        );
    }

    #[test]
    fn a_round_takes_the_closed_hours_oldest_first() {
        let c = Closing {
            grace_ms: 0,
            open_hours: false,
        };
        let listing = [
            obj("_landing/dt=2026-03-02/hour=07/s-2.parquet"),
            obj("_landing/dt=2026-03-02/hour=05/s-1.parquet"),
            obj("_landing/dt=2026-03-02/hour=06/s-1.parquet"),
            obj("_landing/dt=2026-03-02/hour=06/s-2.parquet"),
            obj("_landing/notes.txt"),
        ];
        let p = plan(&listing, Some((H + 1) * HOUR_MS), c);
        assert_eq!(
            p.hours
                .iter()
                .map(|h| (h.hour, h.inputs.len()))
                .collect::<Vec<_>>(),
            vec![(H - 1, 1), (H, 2)]
        );
        assert_eq!(p.open, vec![H + 1]);
        assert_eq!(p.strays, vec!["_landing/notes.txt".to_owned()]);
        assert!(plan(&listing, None, c).hours.is_empty());
    }

    #[test]
    fn lag_counts_from_the_oldest_unpublished_closed_hour() {
        let c = Closing {
            grace_ms: 0,
            open_hours: false,
        };
        let w = Some((H + 1) * HOUR_MS); // H is the newest closed hour
        assert_eq!(lag_seconds(&[], w, c), 0);
        assert_eq!(lag_seconds(&[H], w, c), 3600);
        assert_eq!(lag_seconds(&[H - 2, H], w, c), 3 * 3600);
        assert_eq!(lag_seconds(&[H - 2], Some(i64::MAX), c), 3600);
    }
}
