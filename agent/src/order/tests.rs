use super::*;
use proptest::prelude::*;

fn p(series: i64, ts: i64, v: f64) -> Pending {
    Pending {
        series,
        ts_ms: ts,
        value: Value::F64(v),
        quality: Quality::Good,
    }
}

fn rules(late: LatePolicy) -> Rules {
    Rules {
        dedup_window_ms: 10_000,
        max_recent: 1024,
        late,
    }
}

/// A released reading as the model tests compare it: `(series, ts, value bits, late)`.
type Out4 = (i64, i64, u64, bool);

/// Every released reading, in order.
fn readings_of(r: &Released) -> Vec<Out4> {
    r.out
        .iter()
        .map(|o| (o.series, o.ts_ms, bits(&o.value), o.late))
        .collect()
}

fn bits(v: &Value) -> u64 {
    match v {
        Value::F64(f) => f.to_bits(),
        _ => 0,
    }
}

fn ts_of(r: &Released) -> Vec<(i64, i64, bool)> {
    r.out.iter().map(|o| (o.series, o.ts_ms, o.late)).collect()
}

#[test]
fn readings_within_one_release_leave_sorted_per_series() {
    let mut st = HashMap::default();
    let r = release(
        vec![p(2, 30, 0.0), p(1, 20, 0.0), p(2, 10, 0.0), p(1, 5, 0.0)],
        &mut st,
        rules(LatePolicy::Flag),
    );
    assert_eq!(
        ts_of(&r),
        vec![
            (1, 5, false),
            (1, 20, false),
            (2, 10, false),
            (2, 30, false)
        ]
    );
}

#[test]
fn a_redelivered_reading_is_dropped_even_in_a_later_release() {
    let mut st = HashMap::default();
    release(
        vec![p(1, 100, 1.5), p(1, 200, 2.5)],
        &mut st,
        rules(LatePolicy::Flag),
    );
    let r = release(
        vec![p(1, 100, 1.5), p(1, 200, 2.5), p(1, 300, 3.5)],
        &mut st,
        rules(LatePolicy::Flag),
    );
    assert_eq!(r.duplicates, 2);
    assert_eq!(ts_of(&r), vec![(1, 300, false)]);
    // Same timestamp, different value: not a duplicate, and not late (same time as the newest).
    let r = release(vec![p(1, 300, 9.0)], &mut st, rules(LatePolicy::Flag));
    assert_eq!((r.duplicates, ts_of(&r)), (0, vec![(1, 300, false)]));
}

#[test]
fn duplicates_inside_one_release_are_dropped() {
    let mut st = HashMap::default();
    let r = release(
        vec![p(1, 5, 1.0), p(1, 5, 1.0), p(1, 5, 1.0)],
        &mut st,
        rules(LatePolicy::Flag),
    );
    assert_eq!((r.out.len(), r.duplicates), (1, 2));
}

#[test]
fn late_readings_are_flagged_or_dead_lettered() {
    let mut st = HashMap::default();
    release(vec![p(1, 100, 0.0)], &mut st, rules(LatePolicy::Flag));
    let r = release(
        vec![p(1, 50, 0.0), p(1, 150, 0.0)],
        &mut st,
        rules(LatePolicy::Flag),
    );
    assert_eq!(
        (ts_of(&r), r.late_flagged),
        (vec![(1, 50, true), (1, 150, false)], 1)
    );
    let r = release(vec![p(1, 60, 0.0)], &mut st, rules(LatePolicy::DeadLetter));
    assert!(r.out.is_empty());
    assert_eq!(r.dead_lettered, vec![p(1, 60, 0.0)]);
}

#[test]
fn state_memory_is_bounded_by_window_and_count() {
    let mut st = HashMap::default();
    let many: Vec<_> = (0..5000).map(|i| p(1, i * 10, 0.0)).collect();
    release(
        many,
        &mut st,
        Rules {
            dedup_window_ms: 1000,
            max_recent: 64,
            late: LatePolicy::Flag,
        },
    );
    let s = &st[&1];
    assert!(s.remembered() <= 64);
    assert!(s.recent().all(|(ts, _)| ts >= s.last_ts - 1000));
    assert_eq!(SeriesState::from_bytes(&s.to_bytes()), *s);
}

/// A reference model: remembers every released reading forever.
#[derive(Default)]
struct Model {
    last: HashMap<i64, i64>,
    seen: HashMap<i64, Vec<(i64, u64)>>,
}

impl Model {
    fn release(&mut self, mut input: Vec<Pending>, rules: Rules) -> (Vec<Out4>, u64, usize) {
        input.sort_by_key(|p| p.series); // stable, like grouping
        let mut series: Vec<i64> = input.iter().map(|p| p.series).collect();
        series.dedup();
        let (mut out, mut dups, mut dead) = (Vec::new(), 0, 0);
        for s in series {
            let mut rows: Vec<&Pending> = input.iter().filter(|p| p.series == s).collect();
            rows.sort_by_key(|p| p.ts_ms);
            for p in rows {
                let last = *self.last.get(&s).unwrap_or(&i64::MIN);
                let horizon = last.saturating_sub(rules.dedup_window_ms);
                let bits = bits(&p.value);
                let seen = self.seen.entry(s).or_default();
                if p.ts_ms >= horizon
                    && seen
                        .iter()
                        .any(|&(ts, b)| ts == p.ts_ms && b == bits && ts >= horizon)
                {
                    dups += 1;
                    continue;
                }
                seen.push((p.ts_ms, bits));
                let late = p.ts_ms < last;
                self.last.insert(s, last.max(p.ts_ms));
                if late && rules.late == LatePolicy::DeadLetter {
                    dead += 1;
                } else {
                    out.push((s, p.ts_ms, bits, late));
                }
            }
        }
        (out, dups, dead)
    }
}

fn arb_calls() -> impl Strategy<Value = Vec<Vec<Pending>>> {
    let reading = (0i64..3, 0i64..40, 0u8..3).prop_map(|(s, ts, v)| p(s, ts, f64::from(v)));
    prop::collection::vec(prop::collection::vec(reading, 0..20), 1..8)
}

proptest! {
    #[test]
    fn release_matches_the_model(calls in arb_calls(), window in 0i64..30, dead in any::<bool>()) {
        let rules = Rules { dedup_window_ms: window, max_recent: usize::MAX, late: if dead { LatePolicy::DeadLetter } else { LatePolicy::Flag } };
        let (mut states, mut model) = (HashMap::default(), Model::default());
        for call in calls {
            let n = call.len();
            let r = release(call.clone(), &mut states, rules);
            let (out, dups, dead_n) = model.release(call, rules);
            prop_assert_eq!(readings_of(&r), out);
            prop_assert_eq!(r.duplicates, dups);
            prop_assert_eq!(r.dead_lettered.len(), dead_n);
            // Every reading is accounted for exactly once.
            prop_assert_eq!(r.out.len() + r.duplicates as usize + r.dead_lettered.len(), n);
            // Non-late output is in event-time order per series.
            for w in r.out.windows(2) {
                if w[0].series == w[1].series && !w[1].late {
                    prop_assert!(w[0].ts_ms <= w[1].ts_ms);
                }
            }
        }
    }
}

/// The buffer stores a state as a whole now and then and as deltas (what it remembered since) in between: a state
/// loaded from them decides every later reading as the live state does (but for identities whose folds match,
/// which these values never have), and equals it once its series was released.
fn check_deltas_decide_as_live(
    calls: Vec<Vec<Pending>>,
    rules: Rules,
    deltas_per_whole: usize,
) -> Result<(), TestCaseError> {
    let mut live: HashMap<i64, SeriesState> = HashMap::default();
    // Per series: the whole state last stored (empty before the first) and the deltas stored after it.
    let mut stored: std::collections::BTreeMap<i64, (Vec<u8>, Vec<Vec<u8>>)> = Default::default();
    for call in calls {
        let mut loaded: HashMap<i64, SeriesState> = stored
            .iter()
            .map(|(sid, (whole, deltas))| {
                let mut st = SeriesState::from_bytes(whole);
                for d in deltas {
                    st.apply_delta(d);
                }
                (*sid, st)
            })
            .collect();
        let involved: Vec<i64> = call.iter().map(|p| p.series).collect();
        let a = release(call.clone(), &mut live, rules);
        let b = release(call, &mut loaded, rules);
        prop_assert_eq!(ts_of(&a), ts_of(&b));
        prop_assert_eq!(a.duplicates, b.duplicates);
        for (sid, st) in &live {
            // A loaded state may still hold what the live one forgot until its series is released again (a
            // release forgets first, so that decides nothing).
            prop_assert_eq!(
                st.high.len(),
                if st.is_wide() { st.recent.len() } else { 0 }
            );
            prop_assert!(st.high.capacity() <= 2 * st.high.len() + 40);
            if involved.contains(sid) {
                let l = &loaded[sid];
                prop_assert_eq!(Some(st), loaded.get(sid));
                // ...and does not keep the room of everything it replayed.
                prop_assert!(l.recent.capacity() <= 2 * l.recent.len() + 40);
            }
        }
        for run in a.remembered.chunk_by(|x, y| x.0 == y.0) {
            let st = &live[&run[0].0];
            let (whole, deltas) = stored.entry(run[0].0).or_default();
            if deltas.len() >= deltas_per_whole {
                *whole = st.to_bytes();
                deltas.clear();
            } else {
                deltas.push(delta_bytes(st.last_ts, run));
            }
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn a_state_stored_as_deltas_decides_as_the_live_one(
        calls in arb_calls(),
        window in 0i64..30,
        max_recent in 1usize..10,
        deltas_per_whole in 0usize..4,
    ) {
        let rules = Rules { dedup_window_ms: window, max_recent, late: LatePolicy::Flag };
        check_deltas_decide_as_live(calls, rules, deltas_per_whole)?;
    }

    /// The same across the 49-day offset rebases of a state (replaying a delta may rebase it).
    #[test]
    fn a_state_stored_as_deltas_decides_as_the_live_one_across_rebases(
        calls in arb_far_calls(),
        window in prop_oneof![0i64..30, Just(86_400_000i64)],
        max_recent in 1usize..10,
        deltas_per_whole in 0usize..4,
    ) {
        let rules = Rules { dedup_window_ms: window, max_recent, late: LatePolicy::Flag };
        check_deltas_decide_as_live(calls, rules, deltas_per_whole)?;
    }
}

/// `calls` released give what the model gives, and every state remembers only readings within the window (its
/// high halves one per entry when wide), also when stored and loaded between calls (`reload`).
fn check_matches_the_model(
    calls: Vec<Vec<Pending>>,
    window: i64,
    reload: bool,
) -> Result<(), TestCaseError> {
    let rules = Rules {
        dedup_window_ms: window,
        max_recent: usize::MAX,
        late: LatePolicy::Flag,
    };
    let (mut states, mut model) = (HashMap::default(), Model::default());
    for call in calls {
        let r = release(call.clone(), &mut states, rules);
        let (out, dups, _) = model.release(call, rules);
        prop_assert_eq!(readings_of(&r), out);
        prop_assert_eq!(r.duplicates, dups);
        for st in states.values_mut() {
            // Every remembered reading is within the window, and persistence keeps exactly them.
            prop_assert!(st
                .recent()
                .all(|(ts, _)| ts >= st.last_ts.saturating_sub(window)));
            prop_assert_eq!(
                st.high.len(),
                if st.is_wide() { st.recent.len() } else { 0 }
            );
            if reload {
                *st = SeriesState::from_bytes(&st.to_bytes());
            }
        }
    }
    Ok(())
}

/// Timestamps around the 65,535 ms short entries span (and the windows near it, below), so states move their
/// base, and lay their entries short and long, at and next to the boundary.
fn arb_layout_calls() -> impl Strategy<Value = Vec<Vec<Pending>>> {
    let near = prop_oneof![
        Just(0i64),
        Just(4_000),
        Just(61_438),
        Just(65_533),
        Just(65_535),
        Just(65_536),
        Just(70_000),
        Just(131_071),
        Just(200_000),
    ];
    let reading =
        (0i64..3, near, 0i64..4, 0u8..3).prop_map(|(s, t, j, v)| p(s, t + j, f64::from(v)));
    prop::collection::vec(prop::collection::vec(reading, 0..20), 1..8)
}

/// Windows around the span of short entries.
fn arb_layout_window() -> impl Strategy<Value = i64> {
    prop_oneof![
        0i64..30,
        59_000i64..67_000,
        Just(65_532),
        Just(65_535),
        Just(65_536),
        Just(140_000)
    ]
}

proptest! {
    #[test]
    fn release_matches_the_model_around_the_short_entries_span(
        calls in arb_layout_calls(),
        window in arb_layout_window(),
        reload in any::<bool>(),
    ) {
        check_matches_the_model(calls, window, reload)?;
    }

    #[test]
    fn a_state_stored_as_deltas_decides_as_the_live_one_around_the_short_entries_span(
        calls in arb_layout_calls(),
        window in arb_layout_window(),
        max_recent in 1usize..10,
        deltas_per_whole in 0usize..4,
    ) {
        let rules = Rules { dedup_window_ms: window, max_recent, late: LatePolicy::Flag };
        check_deltas_decide_as_live(calls, rules, deltas_per_whole)?;
    }
}

/// Timestamps that jump by more than the 49 days a state's 32-bit offsets span (and to the ends of i64), so
/// states rebase, forget and round-trip through bytes between calls.
fn arb_far_calls() -> impl Strategy<Value = Vec<Vec<Pending>>> {
    let ts = prop_oneof![
        0i64..40,
        (0i64..40).prop_map(|t| t + (1 << 32)),
        (0i64..40).prop_map(|t| t - (1 << 33)),
        (0i64..40).prop_map(|t| i64::MAX - t),
        (0i64..40).prop_map(|t| i64::MIN + t),
    ];
    let reading = (0i64..2, ts, 0u8..3).prop_map(|(s, ts, v)| p(s, ts, f64::from(v)));
    prop::collection::vec(prop::collection::vec(reading, 0..20), 1..8)
}

proptest! {
    #[test]
    fn release_matches_the_model_across_offset_rebases(
        calls in arb_far_calls(),
        window in prop_oneof![0i64..30, Just(86_400_000i64)],
        reload in any::<bool>(),
    ) {
        check_matches_the_model(calls, window, reload)?;
    }
}

/// A series at 5 readings/s with a 60 s window, sealed every second: the rules and the next second's readings.
fn five_per_second() -> (Rules, impl FnMut() -> Vec<Pending>) {
    let rules = Rules {
        dedup_window_ms: 60_000,
        max_recent: 1024,
        late: LatePolicy::Flag,
    };
    let mut ts = 0;
    let call = move || {
        (0..5)
            .map(|_| {
                ts += 200;
                p(1, ts, 0.5)
            })
            .collect()
    };
    (rules, call)
}

#[test]
fn a_state_at_its_window_does_not_grow_its_allocation() {
    // 300 remembered readings; then seals of 1 s each.
    let (rules, mut call) = five_per_second();
    let mut st = HashMap::default();
    for _ in 0..200 {
        release(call(), &mut st, rules);
    }
    let s = &st[&1];
    assert_eq!(s.remembered(), 301);
    // Room for one more call's readings at most, never the doubling of a growing Vec (512 entries).
    assert!(
        s.recent.capacity() <= s.remembered() + 5,
        "capacity {} for {} readings",
        s.recent.capacity(),
        s.remembered()
    );
    // 6 bytes per reading: a 60 s window spans less than short entries hold, and a series with one reading per
    // millisecond stays narrow.
    assert_eq!((s.recent.entry_bytes(), s.recent.is_short()), (6, true));
    assert!(!s.is_wide());
    assert_eq!(s.heap_bytes(), s.recent.capacity() * 6);
}

#[test]
fn a_state_loaded_from_its_deltas_keeps_no_more_room_than_a_live_one() {
    // As above, stored whole once and then as 20 deltas of 5 readings.
    let (rules, mut call) = five_per_second();
    let mut st = HashMap::default();
    for _ in 0..200 {
        release(call(), &mut st, rules);
    }
    let whole = st[&1].to_bytes();
    let mut deltas = Vec::new();
    for _ in 0..20 {
        let r = release(call(), &mut st, rules);
        deltas.push(delta_bytes(st[&1].last_ts, &r.remembered));
    }
    let mut loaded = SeriesState::from_bytes(&whole);
    for d in &deltas {
        loaded.apply_delta(d);
    }
    let mut loaded = HashMap::from_iter([(1, loaded)]);
    let c = call();
    release(c.clone(), &mut st, rules);
    release(c, &mut loaded, rules);
    let (live, l) = (&st[&1], &loaded[&1]);
    assert_eq!(live, l);
    assert!(
        l.recent.capacity() <= l.remembered() + 5,
        "capacity {} for {} readings (live: {})",
        l.recent.capacity(),
        l.remembered(),
        live.recent.capacity()
    );
}

#[test]
fn a_delta_replayed_over_a_whole_state_that_holds_it_adds_nothing() {
    let mut states = HashMap::default();
    let r = release(
        (0..10).map(|i| p(1, i * 100, i as f64)).collect(),
        &mut states,
        rules(LatePolicy::Flag),
    );
    let live = states.remove(&1).unwrap();
    let mut replayed = SeriesState::from_bytes(&live.to_bytes());
    replayed.apply_delta(&delta_bytes(live.last_ts, &r.remembered));
    assert_eq!(replayed.remembered(), 10);
    assert_eq!(replayed, live);
}

#[test]
fn a_delta_49_days_behind_the_state_leaves_the_state_as_it_was() {
    // A whole state written after a delta it does not include (an earlier version ran on the file in between),
    // holding readings more than 2^32 ms (49.7 days) newer than the delta's: the replay must not rebase the
    // state to the delta's time, which would cut the newer offsets to 32 bits.
    let far = 1i64 << 33;
    let mut states = HashMap::default();
    let rules = rules(LatePolicy::Flag);
    let old = release(vec![p(1, 0, 1.0)], &mut states, rules);
    let mut newer = HashMap::default();
    release(
        vec![p(1, far, 2.0), p(1, far + 100, 3.0)],
        &mut newer,
        rules,
    );
    let whole = newer.remove(&1).unwrap();
    let mut replayed = SeriesState::from_bytes(&whole.to_bytes());
    replayed.apply_delta(&delta_bytes(0, &old.remembered));
    assert_eq!(replayed, whole);
    let again = release(
        vec![p(1, far + 100, 3.0)],
        &mut HashMap::from_iter([(1, replayed)]),
        rules,
    );
    assert_eq!(again.duplicates, 1, "the newer reading is still recognised");
}

proptest! {
    /// The counting sort by series gives what a stable sort by (series, time) gives, arrival order kept among a
    /// series' readings of one timestamp (the values tell them apart), with each series' run. One to 19 series:
    /// with few, their runs are long enough that an unstable sort would show.
    #[test]
    fn by_series_and_time_is_the_stable_sort(
        readings in prop::collection::vec((0i64..19, 0i64..6), 0..300),
        series in 1i64..20,
        sorted_runs in any::<bool>(),
        sparse in any::<bool>(),
    ) {
        // Series ids close together (found through a table) or far apart (through a hash map), negative ones too.
        let id = |s: i64| if sparse { (s % series - 1) * 1_000_003 } else { s % series - 1 };
        let mut input: Vec<Pending> =
            readings.iter().enumerate().map(|(i, &(s, ts))| p(id(s), ts, i as f64)).collect();
        if sorted_runs {
            // Each series in time order already (the usual arrival): the runs need no sort.
            input.sort_by_key(|p| p.ts_ms);
        }
        let mut want = input.clone();
        want.sort_by_key(|p| (p.series, p.ts_ms));
        let (got, runs) = by_series_and_time(input);
        prop_assert_eq!(&got, &want);
        let want_runs: Vec<(i64, usize)> =
            want.chunk_by(|a, b| a.series == b.series).map(|r| (r[0].series, r.len())).collect();
        prop_assert_eq!(runs, want_runs);
    }
}

/// Series ids at the ends of i64 are ordered too: far apart (through the hash map) and next to each other at the top
/// (through the table).
#[test]
fn by_series_and_time_orders_extreme_series_ids() {
    for ids in [
        [i64::MAX, i64::MIN, 0],
        [i64::MAX, i64::MAX - 1, i64::MAX - 2],
    ] {
        let input: Vec<Pending> = (0..9)
            .map(|i| p(ids[i % 3], 9 - i as i64, i as f64))
            .collect();
        let mut want = input.clone();
        want.sort_by_key(|p| (p.series, p.ts_ms));
        assert_eq!(by_series_and_time(input).0, want);
    }
}

/// Two values of millisecond `ts` whose identities differ but share their folded 32 bits.
fn colliding_pair(ts: i64) -> (f64, f64) {
    let mut seen: HashMap<u32, f64> = HashMap::default();
    (0..10_000_000u32)
        .find_map(|i| {
            let v = f64::from(i) / 1000.0;
            seen.insert(fold(identity(ts, &Value::F64(v))), v)
                .map(|w| (w, v))
        })
        .expect("a pair sharing 32 bits")
}

#[test]
fn distinct_readings_of_one_millisecond_whose_identities_share_32_bits_are_both_sent() {
    // Timestamps in µs or ns are cut to milliseconds: a series faster than 1 kHz has several distinct readings per
    // millisecond, each compared with the others. Compared by 32 bits, two of them would be taken for one about
    // every 2^32 comparisons. The series' first distinct pair of one millisecond turns it wide (64-bit
    // comparisons): after that, such a pair goes out whole, in one release and in two.
    let ts = 1_000;
    let (a, b) = colliding_pair(ts);
    assert_ne!(identity(ts, &Value::F64(a)), identity(ts, &Value::F64(b)));
    let rules = rules(LatePolicy::Flag);
    let sent = |v: f64| (1, ts, v.to_bits(), false);
    let first_pair = || vec![p(1, ts - 1, 0.5), p(1, ts - 1, 0.25)];
    let wide = || {
        let mut states = HashMap::default();
        release(first_pair(), &mut states, rules);
        assert!(states[&1].is_wide());
        states
    };
    let mut states = wide();
    let r = release(vec![p(1, ts, a), p(1, ts, b)], &mut states, rules);
    assert_eq!((readings_of(&r), r.duplicates), (vec![sent(a), sent(b)], 0));
    let mut states = wide();
    release(vec![p(1, ts, a)], &mut states, rules);
    let r = release(vec![p(1, ts, b)], &mut states, rules);
    assert_eq!((readings_of(&r), r.duplicates), (vec![sent(b)], 0));
    // And each is still recognised when it comes again.
    let r = release(vec![p(1, ts, a), p(1, ts, b)], &mut states, rules);
    assert_eq!((r.out.len(), r.duplicates), (0, 2));
    // The first pair and the colliding one in one release: it turns wide on the way.
    let mut states = HashMap::default();
    let mut call = first_pair();
    call.extend([p(1, ts, a), p(1, ts, b)]);
    let r = release(call, &mut states, rules);
    assert_eq!((r.out.len(), r.duplicates), (4, 0));
    // The colliding pair in the millisecond that turns the series wide, after a third reading: the reading that
    // turns it wide keeps its whole identity, so the next one is compared by 64 bits.
    let c = 0.125;
    assert_ne!(
        fold(identity(ts, &Value::F64(c))),
        fold(identity(ts, &Value::F64(a)))
    );
    let mut states = HashMap::default();
    let r = release(
        vec![p(1, ts, c), p(1, ts, a), p(1, ts, b)],
        &mut states,
        rules,
    );
    assert_eq!(
        (readings_of(&r), r.duplicates),
        (vec![sent(c), sent(a), sent(b)], 0)
    );
    // A late pair in a wide series, behind newer readings.
    let mut states = wide();
    release(vec![p(1, ts + 5, 1.0)], &mut states, rules);
    let r = release(vec![p(1, ts, a), p(1, ts, b)], &mut states, rules);
    assert_eq!((r.out.len(), r.late_flagged, r.duplicates), (2, 2, 0));
}

#[test]
fn a_series_turns_wide_at_its_first_distinct_pair_of_one_millisecond_and_starts_narrow_when_loaded()
{
    let rules = rules(LatePolicy::Flag);
    let mut states = HashMap::default();
    // One reading per millisecond, and redeliveries of them: narrow, 8 bytes a reading.
    let calls = [
        vec![p(1, 1, 1.0), p(1, 2, 2.0)],
        vec![p(1, 2, 2.0), p(1, 3, 3.0)],
    ];
    for call in calls {
        release(call, &mut states, rules);
    }
    let s = &states[&1];
    assert_eq!((s.remembered(), s.is_wide()), (3, false));
    assert_eq!(s.high.capacity(), 0);
    // A distinct reading of a millisecond it holds: wide from then on, every entry with a high half.
    let r = release(vec![p(1, 3, 3.5), p(1, 4, 4.0)], &mut states, rules);
    assert_eq!((r.out.len(), r.duplicates), (2, 0));
    let s = &states[&1];
    assert!(s.is_wide());
    assert_eq!((s.remembered(), s.high.len()), (5, 5));
    // The entries since it turned wide (the one that turned it included) keep their whole identity, the older ones
    // their fold.
    let id = |ts: i64, v: f64| identity(ts, &Value::F64(v));
    let expect: Vec<(i64, u64)> = [(1, 1.0), (2, 2.0), (3, 3.0), (3, 3.5), (4, 4.0)]
        .into_iter()
        .map(|(ts, v)| {
            let i = id(ts, v);
            (ts, if v > 3.0 { i } else { u64::from(fold(i)) })
        })
        .collect();
    assert_eq!(s.recent().collect::<Vec<_>>(), expect);
    // Stored and loaded: narrow again, the same readings, and every one of them recognised.
    let loaded = SeriesState::from_bytes(&s.to_bytes());
    assert!(!loaded.is_wide());
    assert_eq!(&loaded, s);
    let again: Vec<Pending> = expect
        .iter()
        .zip([1.0, 2.0, 3.0, 3.5, 4.0])
        .map(|(&(ts, _), v)| p(1, ts, v))
        .collect();
    let mut from_file = HashMap::from_iter([(1, loaded)]);
    for st in [&mut states, &mut from_file] {
        let r = release(again.clone(), st, rules);
        assert_eq!((r.out.len(), r.duplicates), (0, 5));
    }
}

#[test]
fn a_narrow_series_takes_a_first_pair_of_one_millisecond_whose_folds_match_for_one_reading() {
    // The price of 8-byte entries (odds 2^-32 per series and start; docs/memory.md), shown. The same pair in a wide
    // series goes out whole (above).
    let ts = 1_000;
    let (a, b) = colliding_pair(ts);
    let mut states = HashMap::default();
    let r = release(
        vec![p(1, ts, a), p(1, ts, b)],
        &mut states,
        rules(LatePolicy::Flag),
    );
    assert_eq!((r.out.len(), r.duplicates), (1, 1));
    assert!(!states[&1].is_wide());
}

#[test]
fn entries_are_short_within_65_s_long_beyond_and_short_again_when_they_fit() {
    let window = |ms: i64| Rules {
        dedup_window_ms: ms,
        max_recent: 1024,
        late: LatePolicy::Flag,
    };
    let rules = window(60_000);
    // One reading a second of series 1, seconds `from..to`.
    let call = |from: i64, to: i64| -> Vec<Pending> {
        (from..to).map(|i| p(1, i * 1000, i as f64)).collect()
    };
    let mut st = HashMap::default();
    release(call(0, 50), &mut st, rules);
    assert!(st[&1].recent.is_short());
    // A catch-up of 200 s in one release: the base moves on the way, behind the window, and the entries stay
    // short; every reading of the window is recognised when it comes again.
    let r = release(call(50, 250), &mut st, rules);
    assert_eq!((r.out.len(), r.duplicates), (200, 0));
    assert!(st[&1].recent.is_short());
    let r = release(call(190, 250), &mut st, rules);
    assert_eq!((r.out.len(), r.duplicates), (0, 60));
    // Time moves on for 15 minutes (the base moves forward every few seconds): still short, and the window's
    // readings, the oldest one's millisecond included, recognised.
    for k in 25..115 {
        let r = release(call(k * 10, k * 10 + 10), &mut st, rules);
        assert_eq!((r.out.len(), r.duplicates), (10, 0));
    }
    let r = release(call(1090, 1150), &mut st, rules);
    assert_eq!((r.out.len(), r.duplicates), (0, 60));
    let s = &st[&1];
    assert!(s.recent.is_short());
    assert_eq!((s.remembered(), s.last_ts), (61, 1_149_000));
    // And a reading newer than all of them goes out.
    let r = release(call(1150, 1151), &mut st, rules);
    assert_eq!((r.out.len(), r.duplicates), (1, 0));
    // A series with a reading every 10 s: what it holds would span 70 s for a moment at each release, until
    // the release forgets the oldest; forgotten first, it stays short (it flipped to long and back at every
    // release).
    let mut st = HashMap::default();
    for k in 0..50 {
        release(vec![p(2, k * 10_000, k as f64)], &mut st, rules);
        assert!(st[&2].recent.is_short(), "long after reading {k}");
    }
    let r = release(
        (44..50).map(|k| p(2, k * 10_000, k as f64)).collect(),
        &mut st,
        rules,
    );
    assert_eq!((r.out.len(), r.duplicates), (0, 6));
    // A 2-minute window spans more than short entries hold: long, and recognised alike.
    let rules = window(120_000);
    let mut st = HashMap::default();
    release(call(0, 300), &mut st, rules);
    assert!(!st[&1].recent.is_short());
    let r = release(call(180, 300), &mut st, rules);
    assert_eq!((r.out.len(), r.duplicates), (0, 120));
    // Short entries whose zero moved (a late reading moves the base back), then laid long: still recognised.
    let mut st3 = HashMap::default();
    let at = |ms: &[i64]| -> Vec<Pending> { ms.iter().map(|&t| p(3, t, t as f64)).collect() };
    release(at(&[4_000]), &mut st3, rules);
    release(at(&[0]), &mut st3, rules);
    assert!(st3[&3].recent.is_short());
    release(at(&[70_000]), &mut st3, rules);
    assert!(!st3[&3].recent.is_short());
    let r = release(at(&[0, 4_000, 70_000]), &mut st3, rules);
    assert_eq!((r.out.len(), r.duplicates), (0, 3));
    // Quiet for a while: the next release forgets what fell out of the window, and the one after lays what is
    // left short again.
    release(call(1000, 1001), &mut st, rules);
    let r = release(call(1000, 1002), &mut st, rules);
    assert_eq!((r.out.len(), r.duplicates), (1, 1));
    assert!(st[&1].recent.is_short());
}

/// Memory: the output of `release` is written into the allocation the readings were sorted into (`Out` has
/// `Pending`'s layout), not into a vector of its own.
#[test]
fn release_writes_its_output_into_the_readings_allocation() {
    let n = 1000;
    let mut pending: Vec<Pending> = (0..n)
        .map(|i| Pending {
            series: (i % 7) as i64,
            ts_ms: 1_000_000 - i as i64,
            value: Value::F64(i as f64),
            quality: Quality::Good,
        })
        .collect();
    pending.extend(pending[..10].to_vec()); // ten duplicates, dropped
    let (sorted, runs) = by_series_and_time(pending);
    let at = sorted.as_ptr() as usize;
    let mut states = HashMap::default();
    let r = release_sorted(sorted, runs, &mut states, rules(LatePolicy::Flag));
    assert_eq!((r.out.len(), r.duplicates), (n, 10));
    assert_eq!(
        r.out.as_ptr() as usize,
        at,
        "the output was not written into the sorted readings' allocation"
    );
}
