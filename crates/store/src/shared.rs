//! A store shared by several `bluebatch serve` replicas (PostgreSQL): the database is the truth,
//! each replica keeps a cache of every record that it brings up to date before it answers.
//!
//! Every committed transaction is one revision: its changes are applied to the records and
//! appended to a change log under that revision, so a replica whose cache is at revision `r`
//! catches up by reading the changes after `r` (or the whole snapshot when the log no longer
//! goes back that far). Writers of every replica are serialized by [`SharedBackend::lock`] (a row
//! lock held by an open transaction, not an advisory lock): the holder first catches up, then
//! decides and writes on a cache nobody else can change meanwhile.

use crate::{Op, Result};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Every record at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub rev: u64,
    /// In key order.
    pub records: Vec<(String, Vec<u8>)>,
}

/// One change of a committed revision, in commit order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub rev: u64,
    pub op: Op,
}

/// Acknowledgements one replica took from its agents (node key, revision the node enforces),
/// told to the other replicas before they are durable: the writes waiting there for those
/// nodes answer without waiting for the acknowledgement's commit. A hint only: the commit
/// follows and says the same; a notice lost changes nothing but how soon they answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckNotice {
    /// The replica that took them (its own notices come back to it; it skips them).
    pub replica: String,
    pub acks: Vec<(String, u64)>,
}

/// A store shared by replicas. Every backend must pass `tests/shared_conformance.rs`.
pub trait SharedBackend: Send + Sync + 'static {
    /// Every record at one revision (one consistent read).
    fn snapshot(&self) -> BoxFuture<'_, Result<Snapshot>>;
    /// The last committed revision.
    fn head(&self) -> BoxFuture<'_, Result<u64>>;
    /// The changes of every revision after `after`, in order; `None` when the change log no
    /// longer goes back to `after` (read the snapshot instead).
    fn changes_since(&self, after: u64) -> BoxFuture<'_, Result<Option<Vec<Change>>>>;
    /// Takes the store-wide write lock, waiting for the replica that holds it. Dropping the
    /// [`Locked`] without committing releases it and writes nothing.
    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn Locked>>>;
    /// [`SharedBackend::lock`] for a caller that will catch up from revision `after` next: a
    /// backend may read those changes along with taking the lock (one round trip instead of
    /// two), answering [`Locked::changes_since`] of `after` (or later) from what it read.
    fn lock_after(&self, after: u64) -> BoxFuture<'_, Result<Box<dyn Locked>>> {
        let _ = after;
        self.lock()
    }
    /// Claims lease `name` for `holder` until `ttl` from now (the database's clock), or renews
    /// it if `holder` has it: whether `holder` holds it now. A lease whose expiry passed is
    /// anyone's.
    fn claim_lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool>>;
    /// Gives up lease `name` if `holder` has it.
    fn release_lease<'a>(&'a self, name: &'a str, holder: &'a str) -> BoxFuture<'a, Result<()>>;
    /// Resolves when a commit may have happened on another replica (a wake-up only, it decides
    /// nothing: callers read [`SharedBackend::head`]) or after `max`, whichever is first.
    fn changed(&self, max: Duration) -> BoxFuture<'_, ()>;
    /// The changes that came with the wake-ups since the last call (a backend whose
    /// notifications carry the commits' changes), in commit order; `None` when some wake-up
    /// came without them (notifications lost, a commit too large to carry): read the log.
    /// Another replica's commits only; the caller checks that they follow its revision.
    fn take_pushed(&self) -> Option<Vec<Change>> {
        None
    }
    /// Tells every replica's [`SharedBackend::ack_notices`] (best effort: an error or a notice
    /// too large may drop it).
    fn announce_acks<'a>(&'a self, notice: &'a AckNotice) -> BoxFuture<'a, ()> {
        let _ = notice;
        Box::pin(async {})
    }
    /// The notices of every replica from now on (`None`: the backend carries none).
    fn ack_notices(&self) -> Option<tokio::sync::broadcast::Receiver<std::sync::Arc<AckNotice>>> {
        None
    }
    /// Records that these hosts (agents) were seen just now by some replica.
    fn hosts_seen<'a>(&'a self, hosts: &'a [String]) -> BoxFuture<'a, Result<()>>;
    /// How long ago each host was last seen by any replica (the database's clock).
    fn host_ages(&self) -> BoxFuture<'_, Result<Vec<(String, Duration)>>>;
    /// Whether the database answers (readiness).
    fn ping(&self) -> BoxFuture<'_, Result<()>>;
    /// The node records (values) of one pool in node-id order, a query rather than a scan:
    /// those after node id `after`, only in `state` (the record's lowercase state) if given, at
    /// most `limit`.
    fn pool_nodes<'a>(
        &'a self,
        account: &'a str,
        pool_key: &'a str,
        after: Option<&'a str>,
        state: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Vec<u8>>>>;
}

/// The store-wide write lock, held by an open transaction.
pub trait Locked: Send {
    /// The last committed revision (nobody else can commit while this is held).
    fn rev(&self) -> u64;
    /// [`SharedBackend::changes_since`], read in this transaction.
    fn changes_since(&mut self, after: u64) -> BoxFuture<'_, Result<Option<Vec<Change>>>>;
    /// [`SharedBackend::snapshot`], read in this transaction.
    fn snapshot(&mut self) -> BoxFuture<'_, Result<Snapshot>>;
    /// Applies `ops` in order as revision `rev() + 1`, logs them, commits and releases the lock:
    /// the new revision. With no ops, releases the lock and answers `rev()`.
    fn commit(self: Box<Self>, ops: Vec<Op>) -> BoxFuture<'static, Result<u64>>;
}
