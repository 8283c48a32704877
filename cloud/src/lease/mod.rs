//! Shard leases and checkpoints in DynamoDB, the Kinesis Client Library's way: workers renew the leases they
//! hold, take over expired ones and even out the load when workers join or leave; all through conditional
//! writes, so no shard ever has two owners that can both commit. [`plan`] is the pure decision logic,
//! [`table`] the DynamoDB shell; the coordinator that runs them is in [`crate::consumer`].

mod config;
pub mod plan;
pub mod table;

pub use config::LeaseConfig;
pub use plan::{at_timestamp, Fence, Lease, AT_TIMESTAMP, LATEST, SHARD_END, TRIM_HORIZON};
pub use table::{LeaseTable, TableError};
