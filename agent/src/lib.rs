//! fieldlink edge agent.
//!
//! Flow of a reading (see `ARCHITECTURE.md`): [`mqtt`] maps a message to readings and queues them to the
//! [`buffer`] thread, which commits them to SQLite and only then acknowledges the message to the broker; the
//! buffer seals the oldest readings into wire-format records ([`batch`], `fieldlink-proto`) with a persisted
//! sequence number; [`kinesis`] sends sealed records and the buffer deletes each one Kinesis accepted.
//!
//! Invariants:
//! - A message is acknowledged to its source only after its readings are committed (durability per
//!   `[buffer] durability`); a message that gives no reading only after it is committed to the bounded `refused`
//!   table.
//! - A reading is deleted from the disk only after Kinesis accepted the record holding it.
//! - A record, once sealed, is resent byte-identical under the same `(agent_id, seq)`.
//! - Every queue is bounded (`[buffer] queue_capacity`, MQTT in-flight window, one `PutRecords` in flight).

pub mod alarm;
pub mod batch;
pub mod buffer;
pub mod config;
#[cfg(test)]
#[path = "../build/hot_text.rs"]
mod hot_text;
pub mod kinesis;
pub mod memory;
pub mod metrics;
pub mod modbus;
pub mod mqtt;
pub mod order;
mod run;
pub mod window;

pub use run::{drain, run, RunError};
