//! The compactor lease: one item in the shard lease table (`leaseKey` = [`KEY`], `leaseKind` = `compactor`), held
//! like a shard lease: taken with a write conditional on the counter the taker saw, renewed every third of
//! `lease_ms` by incrementing the counter (conditional on owner and counter), taken over once a worker has
//! watched the counter stand still for `lease_ms` ([`Observer`]), released on shutdown. A lease in this worker's
//! name that this process does not hold is taken only once expired, like any other: another process may run under
//! the same `worker_id` (before December 2026 the two took it from each other every round, both fresh, both
//! compacting).
//!
//! The compactor fences its writes twice. By time: it starts a write (an upload, a delete) only while its last
//! renewal is less than half a lease old ([`Hold::fresh`]); another worker can take the lease only after
//! watching it unrenewed for a whole lease. By version: every part it writes replaces only the version its round
//! read, or is created only where there was none (S3 conditional writes, [`crate::store::Expect`]), because the
//! time fence cannot bound when a request started in time ends (the SDK's retries, S3 completing a large upload,
//! a paused process). A local directory store has only the time fence (docs/bronze.md).

use crate::lease::plan::Observer;
use crate::lease::{Fence, LeaseTable, TableError};
use fieldlink_ops::metrics::Gauge;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The compactor lease's key.
pub const KEY: &str = "fieldlink-compactor";
/// Its `leaseKind`.
pub const KIND: &str = "compactor";

#[derive(Debug, Clone)]
struct Held {
    counter: u64,
    fence: Fence,
    renewed: Instant,
}

/// Whether this process holds the compactor lease, shared between the task keeping it and the compactor.
#[derive(Debug, Clone)]
pub struct Hold {
    held: Arc<Mutex<Option<Held>>>,
    lease: Duration,
    gauge: Gauge,
}

impl Hold {
    /// Nothing held yet; leases last `lease`; `gauge` is 1 while the lease is held.
    pub fn new(lease: Duration, gauge: Gauge) -> Self {
        Self {
            held: Arc::new(Mutex::new(None)),
            lease,
            gauge,
        }
    }

    fn get(&self) -> Option<Held> {
        self.held.lock().ok().and_then(|h| h.clone())
    }

    fn set(&self, v: Option<Held>) {
        self.gauge.set(i64::from(v.is_some()));
        if let Ok(mut h) = self.held.lock() {
            *h = v;
        }
    }

    /// Whether the lease is held and was renewed less than half a lease ago: a write may start.
    pub fn fresh(&self) -> bool {
        self.get()
            .is_some_and(|h| h.renewed.elapsed() < self.lease / 2)
    }

    /// Whether the lease is held.
    pub fn held(&self) -> bool {
        self.get().is_some()
    }
}

/// One step of keeping the lease: renew it if held, else create it if missing and take it if free or expired.
/// Returns whether it is held now.
async fn step(
    table: &LeaseTable,
    me: &str,
    hold: &Hold,
    observer: &mut Observer,
    clock: Instant,
) -> Result<bool, TableError> {
    if let Some(h) = hold.get() {
        match table.renew(KEY, h.counter, me).await {
            Ok(true) => {
                hold.set(Some(Held {
                    counter: h.counter + 1,
                    renewed: Instant::now(),
                    ..h
                }));
                return Ok(true);
            }
            Ok(false) => {
                tracing::warn!(
                    since_renewal_ms = h.renewed.elapsed().as_millis() as u64,
                    "compactor lease lost to another worker"
                );
                hold.set(None);
            }
            Err(e) => {
                if h.renewed.elapsed() >= hold.lease {
                    tracing::warn!(error = %e, "compactor lease could not be renewed in time; given up");
                    hold.set(None);
                }
                return Err(e);
            }
        }
    }
    let lease = match table.get(KEY).await? {
        Some(l) => l,
        None => {
            table.create_singleton(KEY, KIND).await?;
            match table.get(KEY).await? {
                Some(l) => l,
                None => return Ok(false),
            }
        }
    };
    let now_ms = clock.elapsed().as_millis() as u64;
    observer.observe(std::slice::from_ref(&lease), now_ms);
    let lease_ms = hold.lease.as_millis() as u64;
    if !observer.expired(&lease, now_ms, lease_ms) {
        return Ok(false);
    }
    match table.take(KEY, lease.counter, me).await? {
        Some(taken) => match Fence::of(&taken) {
            Some(fence) => {
                tracing::info!(worker = %me, previous = ?lease.owner, counter = lease.counter, "compactor lease taken");
                hold.set(Some(Held {
                    counter: taken.counter,
                    fence,
                    renewed: Instant::now(),
                }));
                Ok(true)
            }
            None => Ok(false),
        },
        None => Ok(false),
    }
}

/// Keeps trying to hold the compactor lease until `cancel` fires, then releases it if held.
pub async fn keep(table: LeaseTable, me: String, hold: Hold, cancel: CancellationToken) {
    let clock = Instant::now();
    let mut observer = Observer::new();
    let round = hold.lease / 3;
    while !cancel.is_cancelled() {
        if let Err(e) = step(&table, &me, &hold, &mut observer, clock).await {
            tracing::warn!(error = %e, "compactor lease: lease table call failed");
        }
        // The gauge says whether the compactor may write: held and renewed within half a lease.
        hold.gauge.set(i64::from(hold.fresh()));
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(round) => {}
        }
    }
    if let Some(h) = hold.get() {
        hold.set(None);
        match table.release(KEY, &h.fence).await {
            Ok(true) => tracing::info!("compactor lease released"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "releasing the compactor lease failed"),
        }
    }
}
