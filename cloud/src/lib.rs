//! fieldlink cloud service: consumes the Kinesis stream the agents write, decodes each record (one batch,
//! `fieldlink-proto` format v1) and lands the readings in Timestream and in hourly Parquet bronze files.
//!
//! Flow (see `ARCHITECTURE.md`): [`consumer`] reads every shard into a bounded channel; [`land::Lander`]
//! skips batches already landed (`(agent_id, seq)`, [`land::dedup`]), dead-letters undecodable records by
//! reason, and hands each batch to every [`land::Sink`]: [`timestream`] and [`parquet`] (through [`store`]).
//!
//! Guarantees of this version: a batch is landed once per process lifetime (in-memory dedup window), and
//! Timestream writes are idempotent (record version = batch sequence number). Shard checkpoints and leases
//! (resume after restart, several consumers) are not implemented yet: a restarted consumer reads from its
//! configured start position.

pub mod config;
pub mod consumer;
pub mod land;
pub mod metrics;
pub mod parquet;
mod run;
pub mod store;
pub mod timestream;

pub use run::{run, RunError};
