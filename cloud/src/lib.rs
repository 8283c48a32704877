//! fieldlink cloud service: consumes the Kinesis stream the agents write, decodes each record (one batch,
//! `fieldlink-proto` format v1) and lands the readings in Timestream and in hourly Parquet bronze files.
//!
//! Flow (see `ARCHITECTURE.md`): [`consumer`] holds shard leases in DynamoDB ([`lease`], the Kinesis Client
//! Library's schema) and runs one worker per held shard; the worker reads its shard from the checkpoint into a
//! bounded channel, its [`land::Lander`] skips resent batches (`(agent_id, seq)` from another record,
//! [`land::dedup`]), dead-letters undecodable records with the reason ([`land::dead`]) and hands each batch to
//! every [`land::Sink`]: [`timestream`], [`influx`] (InfluxDB line protocol over HTTP) and [`parquet`] (through
//! [`store`], into a landing area that [`compaction`] publishes as one file per hour).
//!
//! # Guarantees
//! - A shard's checkpoint moves only after everything before it is durable in every sink; a restarted or
//!   replacing worker resumes from it, and repeats an interrupted commit exactly (same records, same object
//!   names), so Parquet files are replaced, not added.
//! - Timestream writes are idempotent: the record version is the batch sequence number, so a rewrite of the
//!   same batch is a no-op upsert.
//! - InfluxDB writes are idempotent: a point is identified by measurement, tags and time, and every part of a
//!   line is a function of the readings alone ([`influx::lines`]), so a rewrite sets the same values again.
//! - A batch the agent resent (same `(agent_id, seq)` in another Kinesis record) is skipped if this process
//!   landed the first copy within the last 16,384 batches of that agent. If the copies are read by different
//!   processes, Timestream still holds it once and the Parquet landing area twice; the [`compaction`] step that
//!   publishes each closed hour as one bronze file drops the repeated rows, so the published table holds it once.
//! - Parquet: shard commits land files in `_landing/`; the compactor (one at a time, by lease) publishes each hour
//!   as `dt=…/hour=…/part-00000.parquet`, deleting landing files only after the hour's file is durable, and
//!   republishes an hour whole when late data arrives.
//! - Children of a split or merge are read only after their parents are read to the end.
//! - Alarm-event records ([`alarms`]) land in their own hourly table (same landing and compaction, each event once
//!   in the published table) and, with `[alarms.sns]`, are published to SNS once per event (a marker object per
//!   event; a crash between the publish and the marker write publishes that event again).

pub mod alarms;
pub mod compaction;
pub mod config;
pub mod consumer;
pub mod influx;
pub mod land;
pub mod lease;
pub mod metrics;
pub mod parquet;
mod run;
pub mod store;
pub mod timestream;

pub use run::{compact, run, RunError};
