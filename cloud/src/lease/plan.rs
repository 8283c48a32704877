//! The pure part of lease coordination: which leases have expired, and which ones this worker should take.
//!
//! Expiry follows the Kinesis Client Library: a worker cannot trust other workers' clocks, so a lease is
//! expired when *this* worker has watched its `leaseCounter` stay unchanged for a whole lease duration (an
//! owner renews by incrementing the counter). A lease with no owner is free at once.
//!
//! Balance: with `W` live workers (owners of live leases, plus this one) and `L` leases that may be worked
//! on, each worker aims at `ceil(L / W)`. Below that, a worker first takes free and expired leases; if there
//! are none it steals one lease per round from the most loaded worker, if that worker holds more than the
//! target or at least two more than itself (workers that hold nothing are invisible to the others, so their
//! targets can be too generous). One steal per round, and only across a gap of two, keeps workers from trading
//! shards back and forth.
//!
//! A lease may be worked on when its shard is not finished (`SHARD_END`) and every parent it names is
//! finished or unknown (a parent trimmed from the stream long ago): children start after their parents.

use std::collections::{BTreeMap, HashMap, HashSet};

/// The checkpoint of a shard read to its end.
pub const SHARD_END: &str = "SHARD_END";
/// The checkpoint of a shard nobody has read yet, to be read from its oldest record.
pub const TRIM_HORIZON: &str = "TRIM_HORIZON";
/// The checkpoint of a shard nobody has read yet, to be read from new records only, as versions before December
/// 2026 wrote it: resolved again at every take, so a restart before the first checkpoint skipped what arrived
/// meanwhile. Leases are now created at [`at_timestamp`] instead; a lease still holding this is read so.
pub const LATEST: &str = "LATEST";
/// The prefix of the checkpoint of a shard nobody has read yet, to be read from the records that arrived at or
/// after a moment: `AT_TIMESTAMP:<Unix ms>` ([`at_timestamp`]).
pub const AT_TIMESTAMP: &str = "AT_TIMESTAMP:";

/// The checkpoint of a new lease read from the records that arrived at `unix_ms` or later (`start = "latest"`: the
/// moment the consumer created the lease, the same at every take until the first checkpoint).
pub fn at_timestamp(unix_ms: i64) -> String {
    format!("{AT_TIMESTAMP}{unix_ms}")
}

/// One lease item (the Kinesis Client Library's schema).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// `leaseKey`: the shard id.
    pub key: String,
    /// `leaseOwner`: the worker holding it, if any.
    pub owner: Option<String>,
    /// `leaseCounter`: incremented by every renewal and ownership change.
    pub counter: u64,
    /// `checkpoint`: the last sequence number landed in every sink, or one of [`TRIM_HORIZON`], [`at_timestamp`],
    /// [`SHARD_END`] (or [`LATEST`], written by earlier versions).
    pub checkpoint: String,
    /// `pendingCheckpoint`: a commit that was started (its end) and may not have finished; the next reader
    /// repeats exactly that commit.
    pub pending: Option<String>,
    /// `parentShardIds`.
    pub parents: Vec<String>,
    /// `leaseTakeCounter`: the `leaseCounter` the take that gave the lease to its owner wrote. Renewals leave it
    /// alone; every take changes it (the counter only grows). Commits are fenced on it: see [`Fence`].
    pub take_counter: Option<u64>,
    /// `watermarkMs`: the shard's time watermark, Unix ms: every record that arrived in the shard before it is
    /// checkpointed (durable in every sink). Written with each checkpoint, and while the shard is idle and read
    /// to its tip. The compactor publishes an hour once every live shard's watermark is past the hour's end
    /// plus a grace ([`crate::compaction`]). `None`: never written (no reader has committed since).
    pub watermark_ms: Option<i64>,
}

impl Lease {
    /// Whether the shard was read to its end.
    pub fn finished(&self) -> bool {
        self.checkpoint == SHARD_END
    }
}

/// What one shard task may write to its lease under: the owner and the take that started the task.
///
/// The Kinesis Client Library fences commits on owner and lease counter. The counter also moves with every
/// renewal, which the coordinator does beside the task, so fencing on it would refuse a commit that raced a
/// renewal. The take counter moves only when ownership changes: a renewal never fences the task, while a
/// lease lost and taken back (even by the same worker, whose old task may still be running) fences the old task
/// out. Pending checkpoints, checkpoints and releases are all conditional on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The worker.
    pub owner: String,
    /// The `leaseTakeCounter` its take wrote.
    pub take_counter: u64,
}

impl Fence {
    /// The fence of a lease as its take returned it; `None` if it has no owner or was not taken by a take.
    pub fn of(lease: &Lease) -> Option<Self> {
        Some(Self {
            owner: lease.owner.clone()?,
            take_counter: lease.take_counter?,
        })
    }

    /// Whether `lease` (as stored) still belongs to the task holding this fence: the condition of every
    /// fenced write, evaluated in memory.
    pub fn holds(&self, lease: &Lease) -> bool {
        lease.owner.as_deref() == Some(self.owner.as_str())
            && lease.take_counter == Some(self.take_counter)
    }
}

/// What this worker saw of each lease, and since when.
#[derive(Debug, Default)]
pub struct Observer {
    seen: HashMap<String, (u64, Option<String>, u64)>,
}

impl Observer {
    /// An observer that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a scan of the table taken at `now_ms` (this worker's monotonic clock).
    pub fn observe(&mut self, leases: &[Lease], now_ms: u64) {
        let keys: HashSet<&str> = leases.iter().map(|l| l.key.as_str()).collect();
        self.seen.retain(|k, _| keys.contains(k.as_str()));
        for l in leases {
            let unchanged = self
                .seen
                .get(&l.key)
                .is_some_and(|(counter, owner, _)| *counter == l.counter && *owner == l.owner);
            if !unchanged {
                self.seen
                    .insert(l.key.clone(), (l.counter, l.owner.clone(), now_ms));
            }
        }
    }

    /// Whether `lease` has no owner or has not been renewed for `lease_ms` as far as this worker saw.
    pub fn expired(&self, lease: &Lease, now_ms: u64, lease_ms: u64) -> bool {
        if lease.owner.is_none() {
            return true;
        }
        match self.seen.get(&lease.key) {
            Some((counter, _, since)) if *counter == lease.counter => {
                now_ms.saturating_sub(*since) >= lease_ms
            }
            _ => false,
        }
    }
}

/// A lease change this worker should attempt (a conditional write on `counter`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Take a free or expired lease.
    Take {
        /// Shard id.
        key: String,
        /// The counter the write is conditional on.
        counter: u64,
    },
    /// Take a live lease from an overloaded worker.
    Steal {
        /// Shard id.
        key: String,
        /// The counter the write is conditional on.
        counter: u64,
        /// The worker losing it.
        from: String,
    },
}

/// Whether a lease may be worked on: not finished, and its parents finished or unknown.
pub fn ready(lease: &Lease, by_key: &HashMap<&str, &Lease>) -> bool {
    !lease.finished()
        && lease
            .parents
            .iter()
            .all(|p| by_key.get(p.as_str()).is_none_or(|l| l.finished()))
}

/// The changes worker `me` should attempt. `held` are the leases it holds and works on; `expired` says
/// which leases are expired (see [`Observer::expired`]); `max_leases` caps what one worker holds.
pub fn plan(
    me: &str,
    leases: &[Lease],
    held: &HashSet<String>,
    expired: impl Fn(&Lease) -> bool,
    max_leases: usize,
) -> Vec<Action> {
    let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
    let mut workable: Vec<&Lease> = leases.iter().filter(|l| ready(l, &by_key)).collect();
    workable.sort_by(|a, b| a.key.cmp(&b.key));

    // Live owners and what they hold (this worker counts only what it actually works on).
    let mut load: BTreeMap<&str, Vec<&Lease>> = BTreeMap::new();
    load.insert(me, Vec::new());
    let mut free: Vec<&Lease> = Vec::new();
    // Leases in this worker's name that another process works on (see below).
    let mut twin = 0;
    for l in &workable {
        if held.contains(&l.key) {
            load.entry(me).or_default().push(l);
            continue;
        }
        match &l.owner {
            // Ours by name but not worked on here: another process may run under this worker id (an id set once in
            // a configuration every replica shares), so it is left alone until it expires, and not counted as this
            // process's (which would keep it from the shards nobody reads). Taking it back at once, as before
            // December 2026, had the two take each other's leases every round, and no checkpoint advanced. A
            // worker restarted under its old id, or whose task for the shard ended, waits `lease_ms` for it.
            Some(o) if o == me && !expired(l) => twin += 1,
            Some(o) if !expired(l) => load.entry(o.as_str()).or_default().push(l),
            _ => free.push(l),
        }
    }
    let workers = load.len();
    let target = workable.len().div_ceil(workers).min(max_leases);
    let mine = load.get(me).map_or(0, Vec::len);
    if mine >= target {
        return Vec::new();
    }
    let need = target - mine;
    let mut actions: Vec<Action> = free
        .iter()
        .take(need)
        .map(|l| Action::Take {
            key: l.key.clone(),
            counter: l.counter,
        })
        .collect();
    if actions.is_empty() {
        let busiest = load
            .iter()
            .filter(|(w, _)| **w != me)
            .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)));
        if let Some((w, ls)) = busiest {
            // Over the target, or (a worker holding nothing is invisible to the others, so targets can be
            // too generous) at least two more than this worker: either way the steal narrows the gap. This
            // worker's name holds its twin's leases too: the others balance against the name, and counting only
            // this process's, a twin and a third worker stole one lease back and forth every round.
            if ls.len() > target || ls.len() >= mine + twin + 2 {
                if let Some(l) = ls.last() {
                    actions.push(Action::Steal {
                        key: l.key.clone(),
                        counter: l.counter,
                        from: (*w).to_owned(),
                    });
                }
            }
        }
    }
    actions
}

/// Compares two Kinesis sequence numbers (decimal strings of any length) numerically.
pub fn cmp_seq(a: &str, b: &str) -> std::cmp::Ordering {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lease(key: &str, owner: Option<&str>, counter: u64) -> Lease {
        Lease {
            key: key.into(),
            owner: owner.map(str::to_owned),
            counter,
            checkpoint: TRIM_HORIZON.into(),
            pending: None,
            parents: Vec::new(),
            take_counter: owner.map(|_| counter),
            watermark_ms: None,
        }
    }

    fn keys(actions: &[Action]) -> Vec<&str> {
        actions
            .iter()
            .map(|a| match a {
                Action::Take { key, .. } | Action::Steal { key, .. } => key.as_str(),
            })
            .collect()
    }

    #[test]
    fn a_lease_expires_only_after_its_counter_stood_still_for_the_duration() {
        let mut o = Observer::new();
        let l = lease("s1", Some("b"), 5);
        o.observe(std::slice::from_ref(&l), 1_000);
        assert!(!o.expired(&l, 5_000, 10_000));
        o.observe(std::slice::from_ref(&l), 10_000);
        assert!(o.expired(&l, 11_000, 10_000));
        let renewed = lease("s1", Some("b"), 6);
        o.observe(std::slice::from_ref(&renewed), 11_500);
        assert!(!o.expired(&renewed, 20_000, 10_000));
        assert!(o.expired(&renewed, 21_500, 10_000));
        assert!(o.expired(&lease("s2", None, 0), 0, 10_000));
    }

    #[test]
    fn a_new_worker_takes_free_leases_up_to_its_share() {
        let leases: Vec<Lease> = (0..4).map(|i| lease(&format!("s{i}"), None, 0)).collect();
        let a = plan("a", &leases, &HashSet::new(), |l| l.owner.is_none(), 100);
        assert_eq!(keys(&a), ["s0", "s1", "s2", "s3"]);
    }

    #[test]
    fn a_joining_worker_steals_one_lease_per_round_from_the_busiest() {
        let leases: Vec<Lease> = (0..4)
            .map(|i| lease(&format!("s{i}"), Some("a"), 3))
            .collect();
        let b = plan("b", &leases, &HashSet::new(), |_| false, 100);
        assert_eq!(
            b,
            vec![Action::Steal {
                key: "s3".into(),
                counter: 3,
                from: "a".into()
            }]
        );
        // Balanced (2 and 2, or 3 and 2 with five): nothing moves.
        let mut leases = leases;
        leases[3].owner = Some("b".into());
        leases[2].owner = Some("b".into());
        let held: HashSet<String> = ["s2".to_string(), "s3".to_string()].into();
        assert!(plan("b", &leases, &held, |_| false, 100).is_empty());
        leases.push(lease("s4", Some("a"), 1));
        assert!(plan("b", &leases, &held, |_| false, 100).is_empty());
    }

    #[test]
    fn expired_leases_of_a_dead_worker_are_taken() {
        let leases = vec![
            lease("s0", Some("a"), 1),
            lease("s1", Some("dead"), 1),
            lease("s2", Some("dead"), 1),
        ];
        let held: HashSet<String> = ["s0".to_string()].into();
        let acts = plan(
            "a",
            &leases,
            &held,
            |l| l.owner.as_deref() == Some("dead"),
            100,
        );
        assert_eq!(keys(&acts), ["s1", "s2"]);
    }

    #[test]
    fn children_wait_for_their_parents_and_finished_shards_are_left_alone() {
        let mut parent = lease("p", Some("a"), 1);
        let mut child = lease("c", None, 0);
        child.parents = vec!["p".into(), "gone".into()];
        let held: HashSet<String> = ["p".to_string()].into();
        let acts = plan("a", &[parent.clone(), child.clone()], &held, |_| false, 100);
        assert!(acts.is_empty(), "{acts:?}");
        parent.checkpoint = SHARD_END.into();
        let acts = plan("a", &[parent, child], &HashSet::new(), |_| false, 100);
        assert_eq!(keys(&acts), ["c"]);
    }

    #[test]
    fn two_processes_under_one_worker_id_take_nothing_from_each_other() {
        // Process 1 works on s0 and s1, process 2 on s2 and s3, both as "a", beside worker "b" holding nothing.
        let leases: Vec<Lease> = ["s0", "s1", "s2", "s3"]
            .iter()
            .map(|k| lease(k, Some("a"), 9))
            .collect();
        for held in [["s0", "s1"], ["s2", "s3"]] {
            let held: HashSet<String> = held.iter().map(|k| k.to_string()).collect();
            let acts = plan("a", &leases, &held, |_| false, 100);
            assert!(acts.is_empty(), "{acts:?}");
        }
        // A worker restarted under its old id takes its leases back once they expired.
        let acts = plan("a", &leases, &HashSet::new(), |_| true, 100);
        assert_eq!(keys(&acts), ["s0", "s1", "s2", "s3"]);
    }

    #[test]
    fn a_twin_beside_a_third_worker_steals_nothing() {
        // "a" (another process) works on s0 and s1, "b" on s2 and s3; a second process "a" starts.
        let leases = vec![
            lease("s0", Some("a"), 9),
            lease("s1", Some("a"), 9),
            lease("s2", Some("b"), 9),
            lease("s3", Some("b"), 9),
        ];
        let acts = plan("a", &leases, &HashSet::new(), |_| false, 100);
        assert!(acts.is_empty(), "{acts:?}");
        // And b, seeing "a" at 2, steals nothing either.
        let held: HashSet<String> = ["s2".to_string(), "s3".to_string()].into();
        assert!(plan("b", &leases, &held, |_| false, 100).is_empty());
    }

    #[test]
    fn the_other_process_under_one_worker_id_does_not_keep_this_one_from_free_shards() {
        // Process 1 ("a") works on s0..s3, its cap; s4 and s5 are free. Process 2, also "a", cap 4: takes them.
        let mut leases: Vec<Lease> = ["s0", "s1", "s2", "s3"]
            .iter()
            .map(|k| lease(k, Some("a"), 9))
            .collect();
        leases.extend(["s4", "s5"].iter().map(|k| lease(k, None, 0)));
        let acts = plan("a", &leases, &HashSet::new(), |l| l.owner.is_none(), 4);
        assert_eq!(keys(&acts), ["s4", "s5"]);
    }

    /// The table's writes as the coordinator and its tasks do them (take, renew) on an in-memory lease.
    fn take(l: &mut Lease, by: &str) {
        l.counter += 1;
        l.owner = Some(by.into());
        l.take_counter = Some(l.counter);
    }

    #[test]
    fn renewals_keep_a_task_s_fence_and_a_lost_and_retaken_lease_breaks_it() {
        let mut l = lease("s0", None, 4);
        assert_eq!(Fence::of(&l), None, "no owner, no fence");
        take(&mut l, "w1");
        let first = Fence::of(&l).unwrap();
        assert!(first.holds(&l));
        for _ in 0..3 {
            l.counter += 1; // renewal
        }
        assert!(
            first.holds(&l),
            "a renewal by the same worker fenced its task"
        );
        take(&mut l, "w2");
        assert!(!first.holds(&l));
        take(&mut l, "w1");
        let second = Fence::of(&l).unwrap();
        assert!(
            !first.holds(&l),
            "the old task of a retaken lease still holds it"
        );
        assert!(second.holds(&l));
        l.owner = None; // released
        assert!(!second.holds(&l));
    }

    #[test]
    fn sequence_numbers_compare_as_numbers_beyond_u128() {
        use std::cmp::Ordering::*;
        let big = "49590338271490256608559692538361571095921575989136588898";
        let bigger = "49590338271490256608559692538361571095921575989136588899";
        assert_eq!(cmp_seq(big, bigger), Less);
        assert_eq!(cmp_seq("9", "10"), Less);
        assert_eq!(cmp_seq("010", "10"), Equal);
    }

    proptest! {
        /// Workers that keep planning against a shared table (conditional writes: a take succeeds only if
        /// the counter is unchanged) end up with every workable lease owned once and loads within one.
        #[test]
        fn workers_converge_to_a_balanced_exclusive_assignment(
            shards in 1usize..20, workers in 1usize..5, order in prop::collection::vec(0usize..5, 40..120)
        ) {
            let mut table: Vec<Lease> = (0..shards).map(|i| lease(&format!("s{i:02}"), None, 0)).collect();
            let names: Vec<String> = (0..workers).map(|w| format!("w{w}")).collect();
            let mut held: Vec<HashSet<String>> = vec![HashSet::new(); workers];
            let mut turns: Vec<usize> = order.into_iter().map(|o| o % workers).collect();
            // Then enough round-robin turns to settle.
            for _ in 0..(shards + 2) * 2 { turns.extend(0..workers); }
            for w in turns {
                // Lost leases are noticed (a failed renewal).
                held[w].retain(|k| table.iter().any(|l| &l.key == k && l.owner.as_deref() == Some(names[w].as_str())));
                for act in plan(&names[w], &table, &held[w], |l| l.owner.is_none(), 100) {
                    let (key, counter) = match &act { Action::Take { key, counter } | Action::Steal { key, counter, .. } => (key.clone(), *counter) };
                    let l = table.iter_mut().find(|l| l.key == key).unwrap();
                    if l.counter == counter {
                        l.counter += 1;
                        l.owner = Some(names[w].clone());
                        held[w].insert(key);
                    }
                }
            }
            for w in 0..workers {
                held[w].retain(|k| table.iter().any(|l| &l.key == k && l.owner.as_deref() == Some(names[w].as_str())));
            }
            let total: usize = held.iter().map(HashSet::len).sum();
            prop_assert_eq!(total, shards);
            let loads: Vec<usize> = held.iter().map(HashSet::len).collect();
            let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
            prop_assert!(max - min <= 1, "{:?}", loads);
        }
    }
}
