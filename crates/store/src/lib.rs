//! bluebatch-store: durable state as ordered key/value records.
//!
//! The service owns the state in memory and writes every change through a [`Backend`] before it
//! answers. [`GroupCommit`] gives the backends group commit: a lone change is committed on the
//! caller's thread, and every change queued while a transaction was syncing is committed in the
//! next one, so the throughput is not bounded by the disk's fsync rate.

pub mod conformance;
mod group;
mod mem;
mod memshared;
mod shared;
mod sqlite;

pub use group::{Done, GroupCommit, Ticket};
pub use mem::MemBackend;
pub use memshared::MemShared;
pub use shared::{AckNotice, BoxFuture, Change, Locked, SharedBackend, Snapshot};
pub use sqlite::SqliteBackend;

use std::fmt;

/// One change to the stored records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    /// Deletes every key that starts with `prefix`, which must end with `/`.
    DeletePrefix {
        prefix: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store: {}", self.0)
    }
}

impl std::error::Error for StoreError {}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A storage backend. Every backend must pass `tests/conformance.rs`.
pub trait Backend: Send + 'static {
    /// Every record, in key order (start-up).
    fn load_all(&mut self) -> Result<Vec<(String, Vec<u8>)>>;
    /// Applies `ops` in order as one durable transaction: all or nothing, synced before return.
    fn commit(&mut self, ops: &[Op]) -> Result<()>;
    /// Whether a commit waits for a disk (decides whether a caller commits inline under load).
    fn syncs(&self) -> bool {
        true
    }
    /// Whether [`Backend::maintain`] should run now that the writer is idle.
    fn maintenance_due(&self) -> bool {
        false
    }
    /// Whether maintenance is so overdue it should run between two batches of a load that
    /// never leaves the writer idle.
    fn maintenance_overdue(&self) -> bool {
        false
    }
    /// Work kept out of the commits (SQLite: the checkpoint). An error stops the store like a
    /// failed commit.
    fn maintain(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A backend chosen at run time (`serve`: a file, or `--in-memory`).
impl Backend for Box<dyn Backend> {
    fn load_all(&mut self) -> Result<Vec<(String, Vec<u8>)>> {
        (**self).load_all()
    }
    fn commit(&mut self, ops: &[Op]) -> Result<()> {
        (**self).commit(ops)
    }
    fn syncs(&self) -> bool {
        (**self).syncs()
    }
    fn maintenance_due(&self) -> bool {
        (**self).maintenance_due()
    }
    fn maintenance_overdue(&self) -> bool {
        (**self).maintenance_overdue()
    }
    fn maintain(&mut self) -> Result<()> {
        (**self).maintain()
    }
}
