//! The lease table in DynamoDB, in the Kinesis Client Library's schema: hash key `leaseKey` (the shard id),
//! `leaseOwner`, `leaseCounter`, `checkpoint`, `checkpointSubSequenceNumber` (always 0: fieldlink does not
//! aggregate records), `ownerSwitchesSinceCheckpoint`, `parentShardIds`, plus `pendingCheckpoint` (see
//! [`super::plan::Lease::pending`]), `leaseTakeCounter` (see [`Fence`]) and `watermarkMs` (see
//! [`super::plan::Lease::watermark_ms`]).
//!
//! Leases that are not shards (the compactor's, [`crate::compaction`]) live in the same table with
//! `leaseKind` set; [`LeaseTable::list`] leaves them out, [`LeaseTable::get`] reads one.
//!
//! Every change is a conditional write, so two workers never both believe they own a shard, and no task
//! commits for a lease it no longer holds: taking is conditional on the counter the taker saw, renewing on
//! owner and counter, pending checkpoints, checkpoints and releases on owner and take counter (the task's
//! [`Fence`]; renewals do not change it, a lost and retaken lease does).

use super::plan::{Fence, Lease};
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ScalarAttributeType, TableStatus,
};
use aws_sdk_dynamodb::Client;
use std::collections::HashMap;
use std::time::Duration;

/// A DynamoDB call failed (not a failed condition, which is an answer).
#[derive(Debug, thiserror::Error)]
#[error("lease table {table}: {message}")]
pub struct TableError {
    table: String,
    message: String,
}

/// The lease table.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    client: Client,
    name: String,
}

type Item = HashMap<String, AttributeValue>;

/// The condition of every write a shard task makes: the lease still has the owner and take counter of the
/// task's [`Fence`].
const FENCE_CONDITION: &str = "leaseOwner = :me AND leaseTakeCounter = :taken";

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}
fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn is_condition_failure<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    e.as_service_error()
        .and_then(|s| s.code())
        .is_some_and(|c| c == "ConditionalCheckFailedException")
}

/// Reads a lease from an item; `None` if the item is not a lease.
fn lease_of(item: &Item) -> Option<Lease> {
    let key = item.get("leaseKey")?.as_s().ok()?.clone();
    let owner = item
        .get("leaseOwner")
        .and_then(|v| v.as_s().ok())
        .filter(|o| !o.is_empty())
        .cloned();
    let counter = item
        .get("leaseCounter")
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let checkpoint = item
        .get("checkpoint")
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_else(|| super::plan::TRIM_HORIZON.to_owned());
    let pending = item
        .get("pendingCheckpoint")
        .and_then(|v| v.as_s().ok())
        .cloned();
    let parents = item
        .get("parentShardIds")
        .and_then(|v| v.as_ss().ok())
        .cloned()
        .unwrap_or_default();
    let take_counter = item
        .get("leaseTakeCounter")
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok());
    let watermark_ms = item
        .get("watermarkMs")
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok());
    Some(Lease {
        key,
        owner,
        counter,
        checkpoint,
        pending,
        parents,
        take_counter,
        watermark_ms,
    })
}

/// Whether an item is a shard lease (not a singleton such as the compactor's).
fn is_shard(item: &Item) -> bool {
    !item.contains_key("leaseKind")
}

impl LeaseTable {
    /// A handle to table `name`.
    pub fn new(client: Client, name: &str) -> Self {
        Self {
            client,
            name: name.to_owned(),
        }
    }

    fn err<E>(&self, what: &str, e: &SdkError<E>) -> TableError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        TableError {
            table: self.name.clone(),
            message: format!("{what}: {}", DisplayErrorContext(e)),
        }
    }

    /// Whether the table is known not to exist (`DescribeTable` says so; any other answer or error: no).
    pub async fn missing(&self) -> bool {
        match self
            .client
            .describe_table()
            .table_name(&self.name)
            .send()
            .await
        {
            Ok(_) => false,
            Err(e) => e
                .as_service_error()
                .is_some_and(|s| s.is_resource_not_found_exception()),
        }
    }

    /// Creates the table (on-demand capacity) if it does not exist, and waits until it is active.
    pub async fn ensure(&self) -> Result<(), TableError> {
        let exists = match self
            .client
            .describe_table()
            .table_name(&self.name)
            .send()
            .await
        {
            Ok(_) => true,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                false
            }
            Err(e) => return Err(self.err("DescribeTable", &e)),
        };
        if !exists {
            let key = KeySchemaElement::builder()
                .attribute_name("leaseKey")
                .key_type(KeyType::Hash)
                .build()
                .map_err(|e| self.build_err(e))?;
            let attr = AttributeDefinition::builder()
                .attribute_name("leaseKey")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| self.build_err(e))?;
            match self
                .client
                .create_table()
                .table_name(&self.name)
                .key_schema(key)
                .attribute_definitions(attr)
                .billing_mode(BillingMode::PayPerRequest)
                .send()
                .await
            {
                Ok(_) => tracing::info!(table = %self.name, "lease table created"),
                // Another worker created it first.
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_resource_in_use_exception()) => {}
                Err(e) => return Err(self.err("CreateTable", &e)),
            }
        }
        for _ in 0..120 {
            let d = self
                .client
                .describe_table()
                .table_name(&self.name)
                .send()
                .await
                .map_err(|e| self.err("DescribeTable", &e))?;
            if d.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(TableError {
            table: self.name.clone(),
            message: "not active after 60 s".into(),
        })
    }

    fn build_err(&self, e: aws_sdk_dynamodb::error::BuildError) -> TableError {
        TableError {
            table: self.name.clone(),
            message: e.to_string(),
        }
    }

    /// Every shard lease (a consistent scan; singletons such as the compactor's lease are left out).
    pub async fn list(&self) -> Result<Vec<Lease>, TableError> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let resp = self
                .client
                .scan()
                .table_name(&self.name)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.err("Scan", &e))?;
            out.extend(
                resp.items()
                    .iter()
                    .filter(|i| is_shard(i))
                    .filter_map(lease_of),
            );
            match resp.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(out),
            }
        }
    }

    /// Creates the lease of a new shard unless it exists. Returns whether it was created.
    pub async fn create(
        &self,
        shard: &str,
        parents: &[String],
        checkpoint: &str,
    ) -> Result<bool, TableError> {
        self.put_new(shard, parents, checkpoint, None, 0).await
    }

    /// Creates again, unless it exists, a lease the table lost (deleted and recreated under the running service),
    /// as `last` was listed: its checkpoint ([`LeaseTable::checkpoint_again`]), its begun commit as listed (the next
    /// reader repeats that commit, whose files a paused writer may still be putting; a commit begun after the
    /// listing is not known), its parents, no owner, and a counter that no fence of the old table can hold: above
    /// the last one listed and at least the current Unix time in ms (the old table's counters may have moved on
    /// since the listing by a few renewals and takes, never by the milliseconds elapsed since the lease was
    /// created). Returns whether it was created.
    pub async fn create_again(&self, last: &Lease) -> Result<bool, TableError> {
        let checkpoint = Self::checkpoint_again(last);
        // A `LATEST` lease's begun commit started where `LATEST` resolved, not at the shard's start: not repeated.
        let pending = last
            .pending
            .as_deref()
            .filter(|_| last.checkpoint != super::plan::LATEST);
        let listed = last.counter.max(last.take_counter.unwrap_or(0));
        let counter = listed
            .saturating_add(1)
            .max(fieldlink_ops::unix_ms().max(0) as u64);
        self.put_new(&last.key, &last.parents, checkpoint, pending, counter)
            .await
    }

    /// The checkpoint [`LeaseTable::create_again`] writes for `last`: its own, or the shard's start for a `LATEST`
    /// one (written by earlier versions, never checkpointed: `LATEST` now would skip what arrived since).
    pub fn checkpoint_again(last: &Lease) -> &str {
        if last.checkpoint == super::plan::LATEST {
            super::plan::TRIM_HORIZON
        } else {
            last.checkpoint.as_str()
        }
    }

    async fn put_new(
        &self,
        shard: &str,
        parents: &[String],
        checkpoint: &str,
        pending: Option<&str>,
        counter: u64,
    ) -> Result<bool, TableError> {
        let mut req = self
            .client
            .put_item()
            .table_name(&self.name)
            .item("leaseKey", s(shard))
            .item("leaseCounter", n(counter))
            .item("checkpoint", s(checkpoint))
            .item("checkpointSubSequenceNumber", n(0))
            .item("ownerSwitchesSinceCheckpoint", n(0))
            .condition_expression("attribute_not_exists(leaseKey)");
        if !parents.is_empty() {
            req = req.item("parentShardIds", AttributeValue::Ss(parents.to_vec()));
        }
        if let Some(p) = pending {
            req = req.item("pendingCheckpoint", s(p));
        }
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(self.err("PutItem", &e)),
        }
    }

    /// Creates the lease of a singleton task (not a shard: `leaseKind` = `kind`) unless it exists. Returns
    /// whether it was created.
    pub async fn create_singleton(&self, key: &str, kind: &str) -> Result<bool, TableError> {
        let req = self
            .client
            .put_item()
            .table_name(&self.name)
            .item("leaseKey", s(key))
            .item("leaseKind", s(kind))
            .item("leaseCounter", n(0))
            .condition_expression("attribute_not_exists(leaseKey)");
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(self.err("PutItem", &e)),
        }
    }

    /// One lease (a consistent read), shard or singleton; `None` if there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Lease>, TableError> {
        let resp = self
            .client
            .get_item()
            .table_name(&self.name)
            .key("leaseKey", s(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.err("GetItem", &e))?;
        Ok(resp.item().and_then(lease_of))
    }

    /// Takes `shard` if its counter is still `counter`. Returns the lease as now stored (its [`Fence`] is the
    /// new task's), or `None` if someone else changed it first.
    pub async fn take(
        &self,
        shard: &str,
        counter: u64,
        me: &str,
    ) -> Result<Option<Lease>, TableError> {
        let resp = self
            .client
            .update_item()
            .table_name(&self.name)
            .key("leaseKey", s(shard))
            .update_expression(
                "SET leaseOwner = :me, leaseCounter = :next, leaseTakeCounter = :next, \
                 ownerSwitchesSinceCheckpoint = if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :one",
            )
            .condition_expression("leaseCounter = :c")
            .expression_attribute_values(":me", s(me))
            .expression_attribute_values(":c", n(counter))
            .expression_attribute_values(":next", n(counter + 1))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match resp {
            Ok(out) => Ok(out.attributes().and_then(lease_of)),
            Err(e) if is_condition_failure(&e) => Ok(None),
            Err(e) => Err(self.err("UpdateItem (take)", &e)),
        }
    }

    /// Renews a held lease: increments the counter if owner and counter are as expected. `false`: lost.
    pub async fn renew(&self, shard: &str, counter: u64, me: &str) -> Result<bool, TableError> {
        let resp = self
            .client
            .update_item()
            .table_name(&self.name)
            .key("leaseKey", s(shard))
            .update_expression("SET leaseCounter = :next")
            .condition_expression("leaseOwner = :me AND leaseCounter = :c")
            .expression_attribute_values(":me", s(me))
            .expression_attribute_values(":c", n(counter))
            .expression_attribute_values(":next", n(counter + 1))
            .send()
            .await;
        match resp {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(self.err("UpdateItem (renew)", &e)),
        }
    }

    /// Records the end of a commit about to be written (`pendingCheckpoint`), if the task holding `fence`
    /// still holds the lease.
    pub async fn begin_commit(
        &self,
        shard: &str,
        last: &str,
        fence: &Fence,
    ) -> Result<bool, TableError> {
        self.fenced_update(
            shard,
            fence,
            "SET pendingCheckpoint = :v",
            &[(":v", s(last))],
            "begin commit",
        )
        .await
    }

    /// Advances the checkpoint to `checkpoint` and clears the pending commit, if the task holding `fence` still
    /// holds the lease.
    pub async fn checkpoint(
        &self,
        shard: &str,
        checkpoint: &str,
        fence: &Fence,
    ) -> Result<bool, TableError> {
        self.checkpoint_at(shard, checkpoint, None, fence).await
    }

    /// [`LeaseTable::checkpoint`], and sets the shard's time watermark to `watermark_ms` if given (in the same
    /// write).
    pub async fn checkpoint_at(
        &self,
        shard: &str,
        checkpoint: &str,
        watermark_ms: Option<i64>,
        fence: &Fence,
    ) -> Result<bool, TableError> {
        let mut values = vec![(":v", s(checkpoint)), (":zero", n(0))];
        let update = match watermark_ms {
            Some(w) => {
                values.push((":w", AttributeValue::N(w.to_string())));
                "SET checkpoint = :v, ownerSwitchesSinceCheckpoint = :zero, watermarkMs = :w REMOVE pendingCheckpoint"
            }
            None => {
                "SET checkpoint = :v, ownerSwitchesSinceCheckpoint = :zero REMOVE pendingCheckpoint"
            }
        };
        self.fenced_update(shard, fence, update, &values, "checkpoint")
            .await
    }

    /// Sets the shard's time watermark (nothing is uncommitted and the shard was read to its tip), if the task
    /// holding `fence` still holds the lease.
    pub async fn watermark(
        &self,
        shard: &str,
        watermark_ms: i64,
        fence: &Fence,
    ) -> Result<bool, TableError> {
        self.fenced_update(
            shard,
            fence,
            "SET watermarkMs = :w",
            &[(":w", AttributeValue::N(watermark_ms.to_string()))],
            "watermark",
        )
        .await
    }

    /// Gives a lease up (graceful shutdown) so another worker takes it without waiting for expiry, if the task
    /// holding `fence` still holds it.
    pub async fn release(&self, shard: &str, fence: &Fence) -> Result<bool, TableError> {
        self.fenced_update(shard, fence, "REMOVE leaseOwner", &[], "release")
            .await
    }

    /// An update conditional on [`FENCE_CONDITION`]: [`Fence::holds`], evaluated by DynamoDB.
    async fn fenced_update(
        &self,
        shard: &str,
        fence: &Fence,
        update: &str,
        values: &[(&str, AttributeValue)],
        what: &str,
    ) -> Result<bool, TableError> {
        let mut req = self
            .client
            .update_item()
            .table_name(&self.name)
            .key("leaseKey", s(shard))
            .update_expression(update)
            .condition_expression(FENCE_CONDITION)
            .expression_attribute_values(":me", s(&fence.owner))
            .expression_attribute_values(":taken", n(fence.take_counter));
        for (name, v) in values {
            req = req.expression_attribute_values(*name, v.clone());
        }
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(self.err(&format!("UpdateItem ({what})"), &e)),
        }
    }
}
