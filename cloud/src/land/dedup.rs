//! Batch-level deduplication of producer resends, and detection of agent ids shared by two live agents. Pure.
//!
//! # Batch identity
//! A batch is identified by `(agent_id, epoch, seq)`: the epoch is drawn at random when the agent creates its
//! buffer file (see `proto/FORMAT.md`), so a re-imaged gateway, a replaced SD card or a recovered buffer, which
//! number batches from 1 again, never collide with the batches of the buffer they replace. Records written
//! before epochs existed carry epoch 0 and are keyed like any other epoch.
//!
//! `(agent_id, epoch, seq)` landed before *from another Kinesis record* → skip. Each landed batch is
//! remembered with a tag of the record it came from (a hash of shard id and sequence number). Reading the
//! *same* record again (a replay after a restart or a lease move) is not a duplicate: the replay must produce
//! the same rows as the first pass so that rewritten Parquet files replace the old ones with identical content.
//! Only a *different* record carrying an already landed batch (the agent resent it) is skipped.
//!
//! Per `(agent, epoch)`, a window of the last [`WINDOW`] sequence numbers below the highest seen is kept.
//! Above the window's top a number is new; inside it, it is new unless its slot holds a tag; below the window
//! it is treated as new (landing twice is repaired by the sinks' idempotence, dropping would lose data).
//!
//! # Two live agents with one agent id
//! A config copied to a second box gives two buffers (two epochs) under one agent id, both sending. A
//! re-image looks alike at first (a new epoch appears) but the old epoch stops. The difference: after a
//! newer epoch of the agent started, an *older* epoch keeps landing *new* batches (never seen, not a resend
//! or replay). To let the last batches of a re-imaged box trail, an older epoch's new batches count as a
//! conflict only once the agent landed [`CONFLICT_GRACE`] new batches (of any epoch) since the newer epoch's
//! first one. Epoch 0 (records from before epochs) is never part of a conflict: an upgraded agent sends its
//! old backlog under epoch 0 while it seals new batches under its epoch. Resends and replays never count.
//!
//! Per agent at most [`MAX_EPOCHS`] epochs are remembered (the oldest is forgotten first); the window of an
//! older epoch that landed no new batch while the agent landed [`RETIRE_AFTER`] new ones is freed (a late
//! resend of it is then treated as new).

use std::collections::HashMap;

/// Sequence numbers remembered per `(agent, epoch)` below the highest seen.
pub const WINDOW: u64 = 16_384;

/// New batches an agent lands after a newer epoch's first one before an older epoch's new batches count as
/// a conflict (the last batches of a re-imaged box may trail).
pub const CONFLICT_GRACE: u64 = 32;

/// Epochs remembered per agent.
pub const MAX_EPOCHS: usize = 4;

/// An older epoch's window is freed once the agent landed this many new batches since that epoch's last.
pub const RETIRE_AFTER: u64 = 4_096;

/// At most one conflict report per agent in this many milliseconds.
pub const REPORT_EVERY_MS: i64 = 60_000;

/// The tag of a Kinesis record: never 0 (0 marks an empty slot).
pub fn tag(shard: &str, sequence_number: &str) -> u32 {
    // FNV-1a, 32 bit: stable across processes and platforms.
    let mut h: u32 = 0x811c_9dc5;
    for b in shard.bytes().chain([0u8]).chain(sequence_number.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

#[derive(Debug, Clone)]
struct Window {
    high: u64,
    tags: Vec<u32>, // slot (seq % WINDOW): tag of the record that landed seq, valid for seq in (high - WINDOW, high]
}

impl Window {
    fn new() -> Self {
        Self {
            high: 0,
            tags: vec![0; WINDOW as usize],
        }
    }
    fn get(&self, seq: u64) -> u32 {
        if seq > self.high || self.high - seq >= WINDOW {
            return 0;
        }
        self.tags[(seq % WINDOW) as usize]
    }
    fn insert(&mut self, seq: u64, tag: u32) {
        if seq > self.high {
            // Clear the slots of the numbers that fall out of the window.
            let advance = seq - self.high;
            if advance >= WINDOW {
                self.tags.iter_mut().for_each(|t| *t = 0);
            } else {
                for s in self.high + 1..=seq {
                    self.tags[(s % WINDOW) as usize] = 0;
                }
            }
            self.high = seq;
        } else if self.high - seq >= WINDOW {
            return;
        }
        self.tags[(seq % WINDOW) as usize] = tag;
    }
}

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Never seen: land it.
    New,
    /// Seen from this same record (a replay): land it again, identically.
    Replay,
    /// Landed from another record (the agent resent it): skip it.
    Resend,
}

impl Verdict {
    /// Whether the batch goes to the sinks.
    pub fn lands(self) -> bool {
        self != Verdict::Resend
    }
}

/// A new batch of an older epoch while a newer epoch of the same agent id is sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    /// The epoch of the batch.
    pub older: u64,
    /// The newest epoch of the agent id.
    pub newer: u64,
    /// Whether to log it (at most once per agent per [`REPORT_EVERY_MS`]); count it either way.
    pub report: bool,
}

/// The answer to [`BatchDedup::claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Land or skip.
    pub verdict: Verdict,
    /// Set when the batch shows two live agents sharing its agent id.
    pub conflict: Option<Conflict>,
}

#[derive(Debug)]
struct EpochState {
    epoch: u64,
    /// `None` once retired.
    window: Option<Window>,
    /// Agent clock at this epoch's first and last new batch.
    first: u64,
    last: u64,
}

#[derive(Debug, Default)]
struct AgentState {
    /// New batches landed for this agent.
    clock: u64,
    /// Ordered by first sight: the newest epoch is last.
    epochs: Vec<EpochState>,
    last_report_ms: Option<i64>,
}

/// Remembers which batches were landed, and from which record.
#[derive(Debug, Default)]
pub struct BatchDedup {
    agents: HashMap<String, AgentState>,
}

impl BatchDedup {
    /// An empty memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `(agent, epoch, seq)` for the record tagged `tag` at `now_ms` (for rate-limiting reports).
    pub fn claim(&mut self, agent: &str, epoch: u64, seq: u64, tag: u32, now_ms: i64) -> Claim {
        let a = match self.agents.get_mut(agent) {
            Some(a) => a,
            None => self.agents.entry(agent.to_owned()).or_default(),
        };
        let idx = match a.epochs.iter().position(|e| e.epoch == epoch) {
            Some(i) => i,
            None => {
                if a.epochs.len() >= MAX_EPOCHS {
                    a.epochs.remove(0);
                }
                a.epochs.push(EpochState {
                    epoch,
                    window: None,
                    first: a.clock + 1,
                    last: a.clock + 1,
                });
                a.epochs.len() - 1
            }
        };
        let w = a.epochs[idx].window.get_or_insert_with(Window::new);
        let verdict = match w.get(seq) {
            0 => {
                w.insert(seq, tag);
                Verdict::New
            }
            t if t == tag => Verdict::Replay,
            _ => Verdict::Resend,
        };
        if verdict != Verdict::New {
            return Claim {
                verdict,
                conflict: None,
            };
        }
        a.clock += 1;
        let clock = a.clock;
        a.epochs[idx].last = clock;
        // A newer epoch (first seen after this one) that started more than the grace ago.
        let newer = (epoch != 0)
            .then(|| {
                a.epochs[idx + 1..]
                    .iter()
                    .rev()
                    .find(|e| e.epoch != 0 && clock - e.first >= CONFLICT_GRACE)
                    .map(|e| e.epoch)
            })
            .flatten();
        let newest = a.epochs.len() - 1;
        for e in &mut a.epochs[..newest] {
            if clock - e.last > RETIRE_AFTER {
                e.window = None;
            }
        }
        let conflict = newer.map(|newer| {
            let report = a
                .last_report_ms
                .is_none_or(|t| now_ms.saturating_sub(t) >= REPORT_EVERY_MS);
            if report {
                a.last_report_ms = Some(now_ms);
            }
            Conflict {
                older: epoch,
                newer,
                report,
            }
        });
        Claim { verdict, conflict }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lands(d: &mut BatchDedup, agent: &str, epoch: u64, seq: u64, tag: u32) -> bool {
        d.claim(agent, epoch, seq, tag, 0).verdict.lands()
    }

    #[test]
    fn a_resend_is_skipped_but_a_replay_of_the_same_record_is_not() {
        let mut d = BatchDedup::new();
        let (r1, r2) = (tag("shard-1", "100"), tag("shard-2", "100"));
        assert_ne!(r1, r2);
        assert_eq!(d.claim("a", 7, 1, r1, 0).verdict, Verdict::New);
        assert_eq!(
            d.claim("a", 7, 1, r1, 0).verdict,
            Verdict::Replay,
            "a replay of the same record lands again"
        );
        assert_eq!(
            d.claim("a", 7, 1, r2, 0).verdict,
            Verdict::Resend,
            "a resend in another record is skipped"
        );
        assert!(lands(&mut d, "b", 7, 1, r2), "agents are separate");
        assert!(lands(&mut d, "a", 7, 2, r2));
    }

    #[test]
    fn a_new_buffer_epoch_numbering_from_one_again_is_not_taken_for_resends() {
        let mut d = BatchDedup::new();
        for seq in 1..=100 {
            assert!(lands(&mut d, "gw", 11, seq, tag("s", &seq.to_string())));
        }
        // Re-imaged: epoch 22 starts at 1 again, in other records.
        for seq in 1..=100 {
            let c = d.claim("gw", 22, seq, tag("s", &(1000 + seq).to_string()), 0);
            assert_eq!(c.verdict, Verdict::New, "seq {seq}");
            assert_eq!(c.conflict, None);
        }
    }

    #[test]
    fn a_re_image_with_trailing_batches_is_no_conflict_but_two_live_agents_are() {
        let mut d = BatchDedup::new();
        let mut rec = 0u32;
        let mut next = || {
            rec += 1;
            rec
        };
        for seq in 1..=50 {
            d.claim("gw", 11, seq, next(), 0);
        }
        // The new box starts; the old one's last batches and resends trail for a while.
        for seq in 1..=10 {
            assert_eq!(d.claim("gw", 22, seq, next(), 0).conflict, None);
        }
        for seq in 45..=55 {
            assert_eq!(d.claim("gw", 11, seq, next(), 0).conflict, None, "{seq}");
        }
        for seq in 11..=200 {
            assert_eq!(d.claim("gw", 22, seq, next(), 0).conflict, None);
        }
        // A resend of the old epoch much later is no conflict either.
        assert_eq!(d.claim("gw", 11, 50, next(), 0).conflict, None);
        // The old epoch landing new batches long after the new one started: two live agents.
        let c = d.claim("gw", 11, 56, next(), 1_000).conflict;
        assert_eq!(
            c,
            Some(Conflict {
                older: 11,
                newer: 22,
                report: true
            })
        );
        // Counted every time, reported at most once a minute.
        let c = d.claim("gw", 11, 57, next(), 2_000).conflict.unwrap();
        assert!(!c.report);
        let c = d.claim("gw", 11, 58, next(), 62_000).conflict.unwrap();
        assert!(c.report);
    }

    #[test]
    fn interleaved_epochs_are_a_conflict_once_past_the_grace() {
        let mut d = BatchDedup::new();
        let mut conflicts = 0;
        for seq in 1..=100u64 {
            for (epoch, base) in [(5u64, 0u32), (9, 1_000)] {
                if d.claim("twin", epoch, seq, base + seq as u32, 0)
                    .conflict
                    .is_some()
                {
                    conflicts += 1;
                }
            }
        }
        // Epoch 5 was first: from the grace on, each of its new batches is a conflict.
        assert!(
            conflicts >= 100 - CONFLICT_GRACE as usize / 2 - 1,
            "{conflicts}"
        );
    }

    #[test]
    fn epoch_zero_backlog_after_an_upgrade_is_no_conflict() {
        let mut d = BatchDedup::new();
        for seq in 1..=500u64 {
            // Sealed before the upgrade (epoch 0) and after (epoch 3), sent interleaved.
            assert_eq!(d.claim("up", 3, seq + 500, seq as u32, 0).conflict, None);
            assert_eq!(d.claim("up", 0, seq, 10_000 + seq as u32, 0).conflict, None);
        }
    }

    #[test]
    fn an_old_epoch_stops_holding_its_window() {
        let mut d = BatchDedup::new();
        d.claim("gw", 1, 1, 1, 0);
        for seq in 1..=RETIRE_AFTER + 1 {
            d.claim("gw", 2, seq, 10 + seq as u32, 0);
        }
        let a = &d.agents["gw"];
        assert!(a.epochs[0].window.is_none(), "old epoch retired");
        assert!(a.epochs[1].window.is_some());
        // A late resend of it is treated as new (never skipped).
        assert!(lands(&mut d, "gw", 1, 1, 99));
    }

    proptest! {
        /// Against a model map: within the window the answer is exact; a batch is never skipped unless
        /// another record landed it.
        #[test]
        fn matches_a_map_within_the_window(ops in prop::collection::vec((0u64..2, 0u64..50_000, 0u32..3), 1..400)) {
            let mut d = BatchDedup::new();
            let mut model: HashMap<(u64, u64), u32> = HashMap::new();
            let mut high: HashMap<u64, u64> = HashMap::new();
            for (epoch, seq, rec) in ops {
                let t = rec + 1;
                let h = high.entry(epoch).or_insert(0);
                let in_window = seq + WINDOW > *h;
                let landed = lands(&mut d, "a", epoch, seq, t);
                if !in_window {
                    prop_assert!(landed, "below the window a batch is treated as new");
                } else if let Some(first) = model.get(&(epoch, seq)) {
                    prop_assert_eq!(landed, *first == t, "epoch {} seq {} tag {}", epoch, seq, t);
                } else {
                    prop_assert!(landed);
                    model.insert((epoch, seq), t);
                }
                *h = (*h).max(seq);
            }
        }
    }
}
